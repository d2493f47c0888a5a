"""The Python side of the launcher: registering ``tilek_launch`` with XLA and emitting calls to it."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.interpreters import mlir

from jax_tilek import config
from jax_tilek.compiler import Artifact

TARGET = "tilek_launch"
RECORD_TARGET = "tilek_launch_record"  # TARGET plus XLA's FFI record stage (kernel nodes in command buffers)
STATE_TYPE = "jax_tilek.LaunchState"


class LauncherUnavailableError(RuntimeError):
    """The compiled launcher extension is missing (jax_tilek imported from a source tree)."""


def _installed_launcher():
    """The launcher of an installed jax_tilek, when this jax_tilek is a source tree that shadows it."""
    import importlib.metadata
    import importlib.util

    try:
        files = importlib.metadata.distribution("jax_tilek").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.parts[:1] == ("jax_tilek",) and f.name.startswith("_launcher") and f.suffix == ".so":
            spec = importlib.util.spec_from_file_location("jax_tilek._launcher", f.locate())
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


@functools.cache
def _launcher():
    try:
        from jax_tilek import _launcher

        return _launcher
    except ImportError as e:
        error = e
    launcher = _installed_launcher()
    if launcher is None:
        raise LauncherUnavailableError(
            "jax_tilek's launcher extension (jax_tilek._launcher) is not built; install the package "
            f"with `pip install .` (it builds ffi/ with CMake): {error}"
        )
    return launcher


@functools.cache
def register() -> None:
    """Registers the launcher's FFI state type and handlers for the CUDA platform (once)."""
    launcher = _launcher()
    jax.ffi.register_ffi_type(STATE_TYPE, launcher.state_type(), platform="CUDA")
    jax.ffi.register_ffi_target(TARGET, launcher.handlers(), platform="CUDA", api_version=1)


_record_target_registered = False


def target() -> str:
    """The FFI target calls are emitted to: ``tilek_launch``, or with ``JAX_TILEK_RECORD=1`` (:func:`config.record_stage`) its twin with
    the record stage, so that XLA's command buffers hold our launches as kernel nodes instead of
    stream-captured child graphs. jax.ffi cannot register a record stage (jaxlib 0.11.2), so the launcher
    registers the twin itself, with the FFI API that XLA hands the execute handler when it registers
    ``tilek_launch``; until that has happened (or where the launcher has no record stage), ``tilek_launch``."""
    global _record_target_registered
    register()
    if not config.record_stage():
        return TARGET
    if not _record_target_registered:
        _record_target_registered = _launcher().register_record_target(RECORD_TARGET, "CUDA")
        if not _record_target_registered:
            logging.getLogger(__name__).info("JAX_TILEK_RECORD=1: no record stage (yet); emitting %s", TARGET)
    return RECORD_TARGET if _record_target_registered else TARGET


def allow_export() -> None:
    """Lets plain ``jax.export`` serialize ``tilek_launch`` calls (as it does JAX's own stable targets).

    A call carries its cubin and a launch record whose version the launcher checks, so an exported
    program keeps its meaning; JAX has no public registry for this, so the (private) set of stable
    targets is extended when it exists. ``jax_tilek.export`` passes the equivalent disabled check.
    """
    try:
        from jax._src.export import _export
    except ImportError:
        return
    stable = getattr(_export, "_CUSTOM_CALL_TARGETS_GUARANTEED_STABLE", None)
    if isinstance(stable, set):
        stable.update((TARGET, RECORD_TARGET))


def launch_stats() -> dict[str, int | bool]:
    """Execute-stage calls so far, those made while XLA captured a CUDA graph, record-stage calls that
    created or updated kernel nodes (``records``), and the host time spent in them (``execute_ns``;
    ``encode_ns`` of it encoding TMA descriptors, ``launch_ns`` in the driver's launch calls), at call sites instantiated with
    ``JAX_TILEK_LAUNCH_STATS=1`` (a diagnostic; off by default); ``record_stage``: whether this
    launcher was built with the FFI record stage (a jaxlib whose XLA has it); ``record_target``:
    whether its twin target with that stage is registered (:func:`target`)."""
    return _launcher().launch_stats()


def driver_problem() -> str:
    """Why the CUDA driver cannot be used in this process ('' when it can)."""
    return _launcher().driver_problem()


@functools.lru_cache(maxsize=None)
def _cubin_key(cubin: bytes) -> str:
    return hashlib.sha256(cubin).hexdigest()


def emit(
    ctx: mlir.LoweringRuleContext,
    operands: Sequence,
    result_avals: Sequence[jax.core.ShapedArray],
    *,
    name: str,
    artifact: Artifact,
    record: np.ndarray,
    entries: str,
):
    """Emits one ``tilek_launch`` custom call (:func:`target`); returns its result values."""
    rule = jax.ffi.ffi_lowering(target())
    return rule(
        ctx.replace(avals_out=tuple(result_avals)),
        *operands,
        name=name,
        cubin=artifact.cubin,
        cubin_key=_cubin_key(artifact.cubin),
        entries=entries,
        launch=record,
    )
