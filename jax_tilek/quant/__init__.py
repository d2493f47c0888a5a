"""Quantization family: FP8 / FP4 / E5M6 casts (and re-exports of the fused SwiGLU and RMSNorm + quantize ops).

Semantics follow DeepSeek's TileKernels (the union of v1 and v2.1), as pure functions: new arrays
out, nothing in place. A QuantTensor is a tuple ``(data, sf)``. Shared formats, scale-factor rules and
layouts are in :mod:`jax_tilek.quant.formats`.
"""

from jax_tilek.quant._cast import cast, cast_kernel
from jax_tilek.quant._cast_back import cast_back, per_token_cast_and_cast_back, per_token_cast_back, unpack_from_e2m1fn_x2
from jax_tilek.quant._e5m6 import per_token_cast_to_e5m6
from jax_tilek.quant._per_block_cast import per_block_cast, per_block_cast_kernel, per_block_cast_with_precomputed_sf, per_block_cast_with_sf_only
from jax_tilek.quant._per_block_cast_lossless import per_block_cast_lossless
from jax_tilek.quant._per_channel_cast import per_channel_cast, per_channel_cast_and_transpose, per_channel_cast_fused, per_channel_cast_kernel
from jax_tilek.quant._per_token_cast import per_token_cast, per_token_cast_with_precomputed_sf, per_token_cast_with_sf_only
from jax_tilek.quant._weight_sf import batched_transpose_weight_sf

# The fused quantizing variants of the norm and SwiGLU families, re-exported on first use (PEP 562):
# those families import this package's formats and casts.
_FUSED = {
    "norm_forward_and_per_token_cast": "jax_tilek.norm",
    "swiglu_backward_and_per_token_cast": "jax_tilek.swiglu",
    "swiglu_forward_and_per_channel_cast_and_transpose": "jax_tilek.swiglu",
    "swiglu_forward_and_per_token_cast": "jax_tilek.swiglu",
}


def __getattr__(name: str):
    if name in _FUSED:
        import importlib

        return getattr(importlib.import_module(_FUSED[name]), name)
    raise AttributeError(f"module 'jax_tilek.quant' has no attribute {name!r}")


__all__ = [
    "batched_transpose_weight_sf",
    "cast",
    "cast_back",
    "cast_kernel",
    "norm_forward_and_per_token_cast",
    "per_block_cast",
    "per_block_cast_kernel",
    "per_block_cast_lossless",
    "per_block_cast_with_precomputed_sf",
    "per_block_cast_with_sf_only",
    "per_channel_cast",
    "per_channel_cast_and_transpose",
    "per_channel_cast_fused",
    "per_channel_cast_kernel",
    "per_token_cast",
    "per_token_cast_and_cast_back",
    "per_token_cast_back",
    "per_token_cast_to_e5m6",
    "per_token_cast_with_precomputed_sf",
    "per_token_cast_with_sf_only",
    "swiglu_backward_and_per_token_cast",
    "swiglu_forward_and_per_channel_cast_and_transpose",
    "swiglu_forward_and_per_token_cast",
    "unpack_from_e2m1fn_x2",
]
