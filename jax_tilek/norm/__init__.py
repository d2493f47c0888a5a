"""RMSNorm: the differentiable :func:`rms_norm`, and TileKernels v2.1's fused kernels ``norm_forward``
(with residual and weight options), ``norm_forward_and_per_token_cast`` (also re-exported by
:mod:`jax_tilek.quant`) and ``norm_backward``.

Math, per token (one row of ``x[T, H]``; fp32 arithmetic, each step rounded as written):

    s     = round_x(x + residual)                   # norm_input, the residual stream output
    rstd  = 1 / sqrt(sum(s * s) / H + eps)          # fp32
    y     = round_x((s * rstd) * (w * out_scale))   # out; w = 1 without a weight

``round_x`` rounds to x's dtype (bf16 or fp32). The fused cast quantizes y per token in 1 x 32
groups to e4m3 (amax of y, floor 1e-4, TileKernels' scale rules from :mod:`jax_tilek.quant.formats`).
The backward, with ``xh = x * rstd``, ``g = dy * out_scale``, ``gw = g * w``:

    dx = round_x((gw - xh * (sum(xh * gw) / H)) * rstd + residual_out_grad)
    dw = sum over tokens of xh * g                  # fp32

Every product, sum, quotient and square root is rounded once (no FMA contraction), and sums run in
an order fixed by the kernels' thread layout (:func:`row_layout`); ``dw`` is reduced over tokens in a
fixed order too, a partition of the tokens chosen from the shapes alone (``reduce_dw``), so every
GPU computes the same bits. The kernels are bit-exact with that arithmetic (the tests mirror it in
numpy). The JAX references are written in the same order, but XLA, on CPU and GPU alike, contracts a
product feeding a sum into one FMA inside a fusion: where such a product is inexact (fp32 squares,
the products inside the backward's row sums) the references can differ from the kernels in the last
place. bf16 forward outputs (exact squares), the e4m3 cast of a given y and ``dw`` (its products are
rounded before the sums) are bit-exact with the references as well.

Sizes: H <= 8192; B·T < 2^31 - 2^17 tokens (int32 row indices; element offsets are 64-bit).
"""

from jax_tilek.norm._kernels import norm_backward_kernel, norm_forward_kernel, row_layout
from jax_tilek.norm._ops import norm_backward, norm_forward, norm_forward_and_per_token_cast, rms_norm

__all__ = [
    "norm_backward",
    "norm_backward_kernel",
    "norm_forward",
    "norm_forward_and_per_token_cast",
    "norm_forward_kernel",
    "rms_norm",
    "row_layout",
]
