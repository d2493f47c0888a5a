"""Settings, read from the environment, with context managers for code that wants them scoped.

- ``JAX_TILEK_CACHE_DIR``: where compiled kernels are kept (default ``$XDG_CACHE_HOME/jax_tilek``,
  i.e. ``~/.cache/jax_tilek``).
- ``JAX_TILEK_OFFLINE``: ``1``/``on``/``true``/``yes`` never compile (a kernel missing from the cache is
  an error); ``0``/``off``/``false``/``no`` or unset compile when TileLang is installed. Offline mode is
  implied when TileLang cannot be imported (a deployment machine). Any other value is an error.
- ``JAX_TILEK_ARCH``: the GPU architecture to compile for (``sm_90a``, ``sm_100a``), overriding the
  one read from the GPU. Needed to lower for "cuda" on a machine without a GPU (precompiling). Read
  when jax_tilek is imported; :func:`target_arch` scopes another one.
- ``JAX_TILEK_LOCK_TIMEOUT``: seconds to wait for another process compiling the same kernel (600).
- ``JAX_TILEK_RECORD``: ``1`` emits launches to the launcher's target with XLA's FFI record stage, so
  that command buffers hold them as kernel nodes instead of stream-captured child graphs (where the
  installed jaxlib's XLA has that stage); off by default. ``jax_tilek.export`` never uses it.

The target architecture is a JAX configuration state (``jax_tilek_arch``) that is part of JAX's trace
context: jit's trace and lowering caches and the compiled-program cache all key on it, so lowering the
same function for sm_90a and then for sm_100a in one process really lowers (and compiles) twice.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from jax._src import config as _jax_config  # config states that JAX's caches key on (no public API)

_local = threading.local()

_TRUE = ("1", "on", "true", "yes")
_FALSE = ("", "0", "off", "false", "no")


def _check_arch(value) -> None:
    from jax_tilek.compiler import SUPPORTED_ARCHS

    if value not in (None, "") and value not in SUPPORTED_ARCHS:
        raise ValueError(f"the jax_tilek target architecture must be one of {SUPPORTED_ARCHS}, got {value!r}")


def _state(name: str, *args, **kwargs):
    """A JAX config state, defined once per process (a reloaded module finds the one it made)."""
    existing = _jax_config.config_states.get(name)
    return existing if existing is not None else _jax_config.string_or_object_state(name, *args, **kwargs)


# Read from JAX_TILEK_ARCH at import (JAX derives the variable's name from the state's name).
_arch_state = _state(
    "jax_tilek_arch",
    None,
    "The GPU architecture jax_tilek compiles kernels for when lowering for 'cuda' (e.g. sm_90a).",
    validator=_check_arch,
    include_in_jit_key=True,
    include_in_trace_context=True,
)

# A fresh value per precompile() call, so that it lowers (and so compiles into the cache and reports)
# every kernel even when JAX has lowered the same program before.
_lowering_pass_state = _state(
    "jax_tilek_lowering_pass",
    None,
    "Internal: set by jax_tilek.precompile to bypass JAX's trace and lowering caches.",
    include_in_trace_context=True,
)


def cache_dir() -> str:
    """The kernel cache directory."""
    override = getattr(_local, "cache_dir", None)
    if override:
        return override
    if os.environ.get("JAX_TILEK_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["JAX_TILEK_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax_tilek")


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1/0, on/off, true/false, yes/no (any case); unset is False."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE + _FALSE:
        return value in _TRUE
    raise ValueError(f"{name}={os.environ[name]!r} is not understood: use one of 1/0, on/off, true/false, yes/no")


def offline() -> bool:
    """True when kernels must come from the cache (no compiling)."""
    forced = getattr(_local, "offline", None)
    if forced is not None:
        return forced
    from jax_tilek.compiler import tilelang_available

    return env_flag("JAX_TILEK_OFFLINE") or not tilelang_available()


def lock_timeout() -> float:
    """Seconds to wait for another process compiling the same kernel (``JAX_TILEK_LOCK_TIMEOUT``)."""
    value = os.environ.get("JAX_TILEK_LOCK_TIMEOUT", "").strip()
    try:
        return float(value) if value else 600.0
    except ValueError:
        raise ValueError(f"JAX_TILEK_LOCK_TIMEOUT={value!r} is not a number of seconds") from None


def record_stage() -> bool:
    """Whether launches are emitted for XLA's FFI record stage (``JAX_TILEK_RECORD``)."""
    forced = getattr(_local, "record_stage", None)
    return forced if forced is not None else env_flag("JAX_TILEK_RECORD")


def without_record_stage() -> contextlib.AbstractContextManager[None]:
    """Emits launches without the record stage inside the block, whatever ``JAX_TILEK_RECORD`` says."""
    return _scoped("record_stage", False)


def arch_override() -> str | None:
    """The architecture set by :func:`target_arch` or ``JAX_TILEK_ARCH``, if any."""
    return _arch_state.value or None


@contextlib.contextmanager
def _scoped(name: str, value) -> Iterator[None]:
    old = getattr(_local, name, None)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, old)


def target_arch(arch: str) -> contextlib.AbstractContextManager[None]:
    """Lowers for ``arch`` (e.g. ``"sm_90a"``) inside the block, whatever GPU (if any) is present.

    The architecture is part of JAX's cache keys, so a function lowered for one architecture is
    lowered again for another.
    """
    from jax_tilek.compiler import SUPPORTED_ARCHS

    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {arch!r}")
    return _arch_state(arch)


_passes = iter(range(1, 1 << 62))
_passes_lock = threading.Lock()


def fresh_lowering() -> contextlib.AbstractContextManager[None]:
    """Inside the block, JAX traces and lowers every function afresh (its caches miss)."""
    with _passes_lock:
        number = next(_passes)
    return _lowering_pass_state(number)


def use_cache_dir(path: str) -> contextlib.AbstractContextManager[None]:
    """Uses ``path`` as the kernel cache inside the block."""
    return _scoped("cache_dir", os.path.abspath(path))


def offline_mode(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Forces (or forbids) offline mode inside the block."""
    return _scoped("offline", enabled)
