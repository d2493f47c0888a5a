"""Settings, read from the environment, with context managers for code that wants them scoped.

- ``JAX_TILEK_CACHE_DIR``: where compiled kernels are kept (default ``$XDG_CACHE_HOME/jax_tilek``,
  i.e. ``~/.cache/jax_tilek``).
- ``JAX_TILEK_OFFLINE=1``: never compile; a kernel missing from the cache is an error. Offline mode is
  also implied when TileLang cannot be imported (a deployment machine).
- ``JAX_TILEK_ARCH``: the GPU architecture to compile for (``sm_90a``, ``sm_100a``), overriding the
  one read from the GPU. Needed to lower for "cuda" on a machine without a GPU (precompiling).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

_local = threading.local()


def cache_dir() -> str:
    """The kernel cache directory."""
    override = getattr(_local, "cache_dir", None)
    if override:
        return override
    if os.environ.get("JAX_TILEK_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["JAX_TILEK_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_tilek")


def offline() -> bool:
    """True when kernels must come from the cache (no compiling)."""
    forced = getattr(_local, "offline", None)
    if forced is not None:
        return forced
    if os.environ.get("JAX_TILEK_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    from jax_tilek.compiler import tilelang_available

    return not tilelang_available()


def arch_override() -> str | None:
    """The architecture set by :func:`target_arch` or ``JAX_TILEK_ARCH``, if any."""
    return getattr(_local, "arch", None) or os.environ.get("JAX_TILEK_ARCH") or None


@contextlib.contextmanager
def _scoped(name: str, value) -> Iterator[None]:
    old = getattr(_local, name, None)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, old)


def target_arch(arch: str) -> contextlib.AbstractContextManager[None]:
    """Lowers for ``arch`` (e.g. ``"sm_90a"``) inside the block, whatever GPU (if any) is present."""
    from jax_tilek.compiler import SUPPORTED_ARCHS

    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {arch!r}")
    return _scoped("arch", arch)


def use_cache_dir(path: str) -> contextlib.AbstractContextManager[None]:
    """Uses ``path`` as the kernel cache inside the block."""
    return _scoped("cache_dir", os.path.abspath(path))


def offline_mode(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Forces (or forbids) offline mode inside the block."""
    return _scoped("offline", enabled)
