"""Quantization family: FP8 / FP4 / E5M6 casts, fused SwiGLU and RMSNorm + quantize.

Semantics follow DeepSeek's TileKernels (the union of v1 and v2.1), as pure functions: new arrays
out, nothing in place. A QuantTensor is a tuple ``(data, sf)``. Shared formats, scale-factor rules and
layouts are in :mod:`jax_tilek.quant.formats`.
"""

from jax_tilek.quant.cast import cast
from jax_tilek.quant.cast_back import cast_back, per_token_cast_and_cast_back, per_token_cast_back, unpack_from_e2m1fn_x2
from jax_tilek.quant.e5m6 import per_token_cast_to_e5m6
from jax_tilek.quant.norm import norm_backward, norm_forward, norm_forward_and_per_token_cast, rms_norm
from jax_tilek.quant.per_block_cast import per_block_cast, per_block_cast_with_precomputed_sf, per_block_cast_with_sf_only
from jax_tilek.quant.per_block_cast_lossless import per_block_cast_lossless
from jax_tilek.quant.per_channel_cast import per_channel_cast, per_channel_cast_and_transpose, per_channel_cast_fused
from jax_tilek.quant.per_token_cast import per_token_cast, per_token_cast_with_precomputed_sf, per_token_cast_with_sf_only
from jax_tilek.quant.swiglu import swiglu, swiglu_backward, swiglu_forward
from jax_tilek.quant.swiglu_quant import (
    swiglu_backward_and_per_token_cast,
    swiglu_forward_and_per_channel_cast_and_transpose,
    swiglu_forward_and_per_token_cast,
)
from jax_tilek.quant.weight_sf import batched_transpose_weight_sf

__all__ = [
    "batched_transpose_weight_sf",
    "cast",
    "cast_back",
    "norm_backward",
    "norm_forward",
    "norm_forward_and_per_token_cast",
    "per_block_cast",
    "per_block_cast_lossless",
    "per_block_cast_with_precomputed_sf",
    "per_block_cast_with_sf_only",
    "per_channel_cast",
    "per_channel_cast_and_transpose",
    "per_channel_cast_fused",
    "per_token_cast",
    "per_token_cast_and_cast_back",
    "per_token_cast_back",
    "per_token_cast_to_e5m6",
    "per_token_cast_with_precomputed_sf",
    "per_token_cast_with_sf_only",
    "rms_norm",
    "swiglu",
    "swiglu_backward",
    "swiglu_backward_and_per_token_cast",
    "swiglu_forward",
    "swiglu_forward_and_per_channel_cast_and_transpose",
    "swiglu_forward_and_per_token_cast",
    "unpack_from_e2m1fn_x2",
]
