"""jax_tilek: TileLang GPU kernels as JAX ops, launched through one XLA FFI custom call."""

from jax_tilek import _ffi
from jax_tilek.cache import CacheError, KernelNotCompiledError
from jax_tilek.call import tilelang_call, tilelang_op
from jax_tilek.compiler import CompileError, NvccNotFoundError
from jax_tilek.config import offline_mode, target_arch, use_cache_dir
from jax_tilek.deploy import EXPORT_DISABLED_CHECKS, export, precompile
from jax_tilek.kernel import TileKernel, kernel, record_kernels
from jax_tilek.op import Launch, ShardingRule, Static, TileOp, View, default_impl, set_default_impl, with_vjp
from jax_tilek.platform import NoTargetArchError, kernels_available

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CompileError",
    "EXPORT_DISABLED_CHECKS",
    "KernelNotCompiledError",
    "NoTargetArchError",
    "NvccNotFoundError",
    "Launch",
    "ShardingRule",
    "Static",
    "TileKernel",
    "TileOp",
    "View",
    "default_impl",
    "export",
    "kernel",
    "kernels_available",
    "offline_mode",
    "precompile",
    "record_kernels",
    "set_default_impl",
    "target_arch",
    "tilelang_call",
    "tilelang_op",
    "use_cache_dir",
    "with_vjp",
]

_ffi.allow_export()
try:
    _ffi.register()
except _ffi.LauncherUnavailableError:
    pass  # imported from a source tree; lowering for "cuda" will say how to install
