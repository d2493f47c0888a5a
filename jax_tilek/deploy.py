"""Compile on a build machine, ship the cache; or export a program with its kernels inside.

A build machine has TileLang and nvcc but needs no GPU. Two ways to deploy:

1. Ship the kernel cache. ``precompile(fn, *example_args, arch="sm_90a")`` lowers ``fn`` for "cuda",
   which compiles every kernel configuration it uses into the cache (``JAX_TILEK_CACHE_DIR``). Copy
   that directory to the GPU machines and point ``JAX_TILEK_CACHE_DIR`` at it there; without TileLang
   they run offline and never compile.
2. Ship an exported program. ``export(fn, *example_args, arch="sm_90a")`` returns a ``jax.export``
   artifact whose custom calls carry their cubins, so it runs on a GPU machine with no cache at all
   (``import jax_tilek`` there first, to register the launcher). Plain ``jax.export.export`` works
   too inside ``with jax_tilek.target_arch(...)``: importing jax_tilek declares ``tilek_launch`` a
   custom call target that is stable for export (its launch record is versioned and checked by the
   launcher, and its cubins travel inside the call).

The target architecture is part of JAX's cache keys (see :mod:`jax_tilek.config`), so one process
may precompile or export the same function for several architectures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jax_tilek import _ffi, config
from jax_tilek.kernel import record_kernels

# jax.export refuses custom calls it does not know unless told; ours carry their own cubins. (Importing
# jax_tilek also registers the target as stable for export; passing this keeps working either way.)
EXPORT_DISABLED_CHECKS = (jax.export.DisabledSafetyCheck.custom_call(_ffi.TARGET),)


def precompile(fn: Callable[..., Any], *args: Any, arch: str, **kwargs: Any) -> list[tuple[str, Any, str, str]]:
    """Compiles into the kernel cache every kernel configuration ``fn(*args, **kwargs)`` uses.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s. Returns ``(kernel, params, arch, cache key)``
    for each kernel the lowering asked for. Every call lowers afresh (JAX's caches are bypassed), so
    it fills the current cache directory and reports every kernel even for a program lowered before.
    """
    with config.target_arch(arch), config.fresh_lowering(), record_kernels() as used:
        jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    return list(used)


def export(fn: Callable[..., Any], *args: Any, arch: str, platforms=("cuda",), **kwargs: Any) -> jax.export.Exported:
    """``jax.export`` of ``fn`` for ``platforms``, with jax_tilek kernels compiled for ``arch``.

    Always to the plain ``tilek_launch`` target (lowered afresh, without the record stage), which every
    jax_tilek that loads the artifact registers."""
    with config.target_arch(arch), config.without_record_stage(), config.fresh_lowering():
        return jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=EXPORT_DISABLED_CHECKS)(
            *args, **kwargs
        )
