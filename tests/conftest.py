"""Shared fixtures.

GPU tests carry ``@pytest.mark.gpu`` and run their jitted program through the ``on_gpu`` fixture,
exactly once per test; they are skipped without a supported GPU. A GPU machine without TileLang runs
them from a kernel cache a build machine filled (``benchmarks/gpu_prepare.sh``: the op families'
``ARG_SPECS`` through ``python -m jax_tilek.testing``, and the other GPU tests' ``GPU_PROGRAMS``
through ``tests/gpu_programs.py prepare``).

Kernel cache: the tests compile into ``JAX_TILEK_CACHE_DIR`` when it is set, else into the checkout's
git-ignored ``.tilek_cache/`` (never ``~/.cache``); subprocesses inherit it. The tests import the
checkout's ``jax_tilek`` (``pythonpath`` in pyproject.toml; ``PYTHONPATH`` for subprocesses), with the
launcher of the installed package.

Without nvcc, a test that needs to compile a kernel missing from the cache is skipped, with one
reason for all of them (``NvccNotFoundError``), instead of failing.
"""

from __future__ import annotations

import hashlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_TILEK_CACHE_DIR", os.path.join(ROOT, ".tilek_cache"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

# Eight host devices for the multi-device tests; set before JAX starts. GPU programs are unaffected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jax_tilek  # noqa: E402
from jax_tilek import compiler  # noqa: E402

NO_NVCC = (
    "nvcc not found and the kernel is not in the cache: install jax_tilek[compile] (it brings nvcc) or set "
    "CUDA_HOME/JAX_TILEK_NVCC (see jax_tilek.compiler.nvcc_path)"
)

HAS_GPU = jax_tilek.kernels_available()

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session", autouse=True)
def xla_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the run, shared by the xdist workers: the suite
    compiles many identical programs (references, training steps run twice), which then load.
    Kernels still lower (and are recorded) per program: the cache key is taken after lowering."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if root.name.startswith("popen-gw") else root
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(shared / "xla_compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def pytest_report_header(config):
    try:
        nvcc = f"{compiler.nvcc_path()} ({compiler.nvcc_version()})"
    except compiler.CompileError as e:
        nvcc = f"none ({e}); tests that must compile a kernel are skipped"
    return [f"jax_tilek: {os.path.dirname(jax_tilek.__file__)}; kernel cache: {os.environ['JAX_TILEK_CACHE_DIR']}; nvcc: {nvcc}"]


def _nvcc_missing(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, compiler.NvccNotFoundError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def require_nvcc() -> None:
    """For a test that compiles in a subprocess: without nvcc, raises what skips it (see below)."""
    compiler.nvcc_path()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as e:
        if _nvcc_missing(e):
            pytest.skip(NO_NVCC)
        raise


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA Hopper/Blackwell GPU (see tests/conftest.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def on_gpu():
    """``run(fn, *args)``: ``jax.jit(fn)(*args)`` on the GPU, with device memory poisoned first."""

    def run(fn, *args, **kwargs):
        compiled = jax.jit(fn).lower(*args, **kwargs).compile()
        _poison_device_memory()
        return jax.block_until_ready(compiled(*args, **kwargs))

    return run


def _poison_device_memory(nbytes: int = 1 << 30) -> None:
    """Fills then frees device memory with 0xFF, so outputs a kernel fails to write hold garbage."""
    poison = jax.block_until_ready(jax.numpy.full((nbytes,), 0xFF, jax.numpy.uint8))
    poison.delete()


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


@pytest.fixture
def key(rng) -> jax.Array:
    return jax.random.key(int(rng.integers(2**31)))


from jax_tilek.testing import pytest_generate_tests  # noqa: E402,F401  (parametrizes OpContract cases)
