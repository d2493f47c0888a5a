"""Grouped GEMM family: the expert matmuls of an MoE layer, as TileLang kernels (TMA, wgmma, warp
specialization) for Hopper.

``grouped_matmul(x, w, group_sizes | (expert_start, expert_end))``: ``out[r] = x[r] · w[g]`` for the
rows of group g, ``jax.lax.ragged_dot``'s semantics, or over the padded, aligned segments that
``jax_tilek.moe.get_fused_mapping`` returns (rows outside every segment give zeros), bf16/fp16 with
fp32 accumulation; ``transpose_w`` multiplies by ``w[g]ᵀ``. It is differentiable: its custom VJP runs
the same kernel for ``dx = dy · w[g]ᵀ`` and ``grouped_matmul_wgrad`` for ``dw[g] = x_gᵀ · dy_g``.

Kernels take K and N that are multiples of 128; any M (0 included), any group sizes (empty groups,
sizes not multiples of the tile). The segments' M-tile table is computed on the device by XLA, so no
call syncs with the host.
"""

from jax_tilek.gemm._grouped_matmul import GroupedMatmulConfig, grouped_matmul
from jax_tilek.gemm._grouped_wgrad import WgradConfig, grouped_matmul_wgrad

__all__ = ["GroupedMatmulConfig", "WgradConfig", "grouped_matmul", "grouped_matmul_wgrad"]
