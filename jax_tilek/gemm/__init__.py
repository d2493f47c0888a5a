"""Grouped GEMM family: the expert matmuls of an MoE layer, as TileLang kernels (TMA, wgmma, warp
specialization) for Hopper.

``grouped_matmul(x, w, group_sizes | (expert_start, expert_end))``: ``out[r] = x[r] · w[g]`` for the
rows of group g, ``jax.lax.ragged_dot``'s semantics, or over the padded, aligned segments that
``jax_tilek.moe.get_fused_mapping`` returns (rows outside every segment give zeros), bf16/fp16 with
fp32 accumulation; ``transpose_w`` multiplies by ``w[g]ᵀ``. It is differentiable: its custom VJP runs
the same kernel for ``dx = dy · w[g]ᵀ`` and ``grouped_matmul_wgrad`` for ``dw[g] = x_gᵀ · dy_g``.

``grouped_matmul_fp8(x, x_sf, w, w_sf, groups)``: the same product of float8_e4m3fn operands with
DeepSeek's block scales (1 × 128 per token on x, in ``jax_tilek.quant.per_token_cast``'s layouts;
128 × 128 per block on each ``w[g]``, ``jax_tilek.quant.per_block_cast``'s), fp32 accumulation with
the scales applied per 128-wide K block, bf16 or fp32 out. ``grouped_matmul_quantized(x, w, groups)``
casts bf16 operands with those two casts and runs it, differentiable straight through the casts,
its backward in FP8 as well: ``dx`` by ``grouped_matmul_fp8``, ``dw`` by
``grouped_matmul_wgrad_fp8(x_t, x_sf, dy_t, dy_sf, groups)``, the weight gradient of operands cast
per channel (128 rows a block) and transposed, as ``jax_tilek.quant.per_channel_cast_and_transpose``
writes them.

Kernels take K and N that are multiples of 128; any M (0 included), any group sizes (empty groups,
sizes not multiples of the tile). The segments' M-tile table is computed on the device by XLA, so no
call syncs with the host.
"""

from jax_tilek.gemm._grouped_matmul import GroupedMatmulConfig, grouped_matmul
from jax_tilek.gemm._grouped_matmul_fp8 import GroupedMatmulFp8Config, grouped_matmul_fp8
from jax_tilek.gemm._grouped_matmul_quantized import grouped_matmul_quantized
from jax_tilek.gemm._grouped_wgrad import WgradConfig, grouped_matmul_wgrad
from jax_tilek.gemm._grouped_wgrad_fp8 import WgradFp8Config, grouped_matmul_wgrad_fp8

__all__ = [
    "GroupedMatmulConfig",
    "GroupedMatmulFp8Config",
    "WgradConfig",
    "WgradFp8Config",
    "grouped_matmul",
    "grouped_matmul_fp8",
    "grouped_matmul_quantized",
    "grouped_matmul_wgrad",
    "grouped_matmul_wgrad_fp8",
]
