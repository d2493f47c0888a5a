"""SwiGLU for MoE experts (TileKernels v1 §2.10, v2.1 §1.4/§2.3): ``swiglu_forward``,
``swiglu_backward``, one differentiable ``swiglu``, and the variants fused with FP8 (e4m3) casts,
which :mod:`jax_tilek.quant` re-exports.

For ``x[T, 2H]`` (bf16 or fp32), ``l = x[:, :H]`` and ``r = x[:, H:]`` in fp32. With a clamp ``c``:
``l = min(l, c)``, ``r = clamp(r, -c, c)``. Then ``act = silu(l) · r · w`` with
``silu(l) = l / (1 + exp(-l))`` (TileKernels' formula, an IEEE division) and the per-row weight
``w = topk_weights[t] · routed_scaling_factor`` (either factor optional).

Row layout ("psum", TileKernels v2.1): rows are grouped per expert; ``psum_num_tokens_per_expert``
int32 ``[E]`` (nondecreasing) holds each expert's inclusive end, and expert ``e`` owns rows
``[align(psum[e-1], token_alignment), psum[e])``. Rows owned by no expert are padding: TileKernels
skips them, here every output of a padding row is zero (data, scale factors, gradients) so that
each output element is defined (:func:`valid_rows`).

Exactness: the kernels and the pure-JAX references compute the same bits (jax_tilek's own fp32
:func:`exp_f32`, IEEE division, one :func:`fma_f32` where TileKernels has one), except the backward's
weight gradient, a sum in another order; see :mod:`jax_tilek.swiglu._reference`.

Sizes: T <= 2^31 - 2^17 (int32 row indices, 64-bit element offsets, so T · H is not limited),
H <= 2^28. The persistent kernels' grid is a launch-time value: one cubin per static configuration
serves every GPU, with the same results.

Modules: ``_reference`` (the pure-JAX definitions), ``_kernels`` (the row kernels), ``_ops``
(forward, backward and ``swiglu``), ``_quant`` (the FP8-fused variants and the per-channel kernel),
``_cases`` (helpers for the named cases each op declares).
"""

from jax_tilek.swiglu._kernels import swiglu_backward_kernel, swiglu_forward_kernel
from jax_tilek.swiglu._ops import swiglu, swiglu_backward, swiglu_forward
from jax_tilek.swiglu._quant import (
    swiglu_backward_and_per_token_cast,
    swiglu_forward_and_per_channel_cast_and_transpose,
    swiglu_forward_and_per_token_cast,
    swiglu_per_channel_cast_kernel,
)
from jax_tilek.swiglu._reference import exp_f32, fma_f32, silu_parts, valid_rows

__all__ = [
    "exp_f32",
    "fma_f32",
    "silu_parts",
    "swiglu",
    "swiglu_backward",
    "swiglu_backward_and_per_token_cast",
    "swiglu_backward_kernel",
    "swiglu_forward",
    "swiglu_forward_and_per_channel_cast_and_transpose",
    "swiglu_forward_and_per_token_cast",
    "swiglu_forward_kernel",
    "swiglu_per_channel_cast_kernel",
    "valid_rows",
]
