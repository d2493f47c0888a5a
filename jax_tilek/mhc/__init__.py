"""mHC family: manifold-constrained hyper-connections (DeepSeek; TileKernels v1 §5 and v2.1 §2.7), as
pure functions.

The residual stream is widened to n = ``mhc_mult`` streams, ``residual [..., n, H]`` bf16 (H a
multiple of 8; 1 <= n <= 8, n = 4 the tuned case). Every sub-layer reads a mix of the streams
(``mhc_pre``) and writes back ``new = post ⊗ out + combᵀ · residual`` (``mhc_post``); the mixes are
predicted per token from the RMS-normalised flattened residual (``mhc_pre_norm_fn``), split
(``mhc_pre_split_mixes``) and comb projected by Sinkhorn (``sinkhorn_normalize``).

Ops with TileLang kernels, forward and backward: ``expand_to_mhc`` / ``expand_from_embedding``,
``sinkhorn_normalize``, ``mhc_pre_split_mixes``, ``mhc_head_compute_mix``, ``mhc_pre_apply_mix``,
``mhc_post``, ``mhc_fn_normw_merge``, ``mhc_reduce_partials_and_rmsnorm``. ``mhc_pre_norm_fn`` runs its
split-K GEMM partials as XLA dots (no TileLang GEMM) and its reduce/rmsnorm and norm-weight merge as
kernels. Composites: ``mhc_pre``, ``mhc_head`` (differentiable; each step's custom VJP runs the
backward kernels and JAX sums the residual's cotangents), ``mhc_pre_big_fuse`` (the same kernels as
``mhc_pre``, not one fused kernel; honours ``norm_weight``) and ``mhc_multilayer_recompute``
(functional, per-layer kernels). Each op's reference follows TileKernels' ``torch/mhc.py``; see the
modules' docstrings for operation orders and deviations.
"""

from jax_tilek.mhc._apply_mix import mhc_pre_apply_mix
from jax_tilek.mhc._expand import expand_from_embedding, expand_to_mhc
from jax_tilek.mhc._norm_fn import mhc_fn_normw_merge, mhc_pre_norm_fn, mhc_reduce_partials_and_rmsnorm
from jax_tilek.mhc._post import mhc_post
from jax_tilek.mhc._pre import mhc_head, mhc_multilayer_recompute, mhc_pre, mhc_pre_big_fuse
from jax_tilek.mhc._sinkhorn import sinkhorn_normalize
from jax_tilek.mhc._split_mixes import mhc_head_compute_mix, mhc_pre_split_mixes

__all__ = [
    "expand_from_embedding",
    "expand_to_mhc",
    "mhc_fn_normw_merge",
    "mhc_head",
    "mhc_head_compute_mix",
    "mhc_multilayer_recompute",
    "mhc_post",
    "mhc_pre",
    "mhc_pre_apply_mix",
    "mhc_pre_big_fuse",
    "mhc_pre_norm_fn",
    "mhc_pre_split_mixes",
    "mhc_reduce_partials_and_rmsnorm",
    "sinkhorn_normalize",
]
