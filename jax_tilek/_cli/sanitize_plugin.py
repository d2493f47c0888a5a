"""A pytest plugin for ``sanitize`` (``-p jax_tilek._cli.sanitize_plugin``): records which jax_tilek
kernels each test lowered, and which tests failed, into the manifest at ``$JAX_TILEK_SANITIZE_MANIFEST``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from jax_tilek._cli.sanitize import MANIFEST_ENV, Manifest
from jax_tilek.kernel import record_kernels

_manifest = Manifest()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: Any) -> Iterator[None]:
    with record_kernels() as used:
        yield
    _manifest.add(item.nodeid, used)


def pytest_runtest_logreport(report: Any) -> None:
    if report.failed:
        _manifest.failures.append(f"{report.nodeid} ({report.when}) failed")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get(MANIFEST_ENV)
    if path:
        _manifest.save(path)
