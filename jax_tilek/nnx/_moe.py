"""The MoE layer: a router, the routed experts on the fused expert-major layout, shared experts, and
the load-balancing loss."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tilek import gemm, moe
from jax_tilek.nnx._layers import EMBED, EXPERT, MLP, Impl, SwiGLU, param, rows
from jax_tilek.nnx._moe_parallel import axis_size, expert_parallel
from jax_tilek.swiglu import swiglu

Gate = Literal["sqrtsoftplus", "top2_sum"]
SCORINGS = ("sigmoid", "sqrtsoftplus", "softmax")


class RouterBias(nnx.Variable):
    """The router's ranking bias (DeepSeek-V3's auxiliary-loss-free balancing): not a ``Param``, so
    ``nnx.grad`` and optimizers leave it alone; the training loop may adjust it."""


def scores(logits: jax.Array, scoring_func: str) -> jax.Array:
    """The unbiased router scores, float32 ``[T, E]``: sigmoid, sqrt(softplus) or softmax of the logits."""
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    if scoring_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    return jax.nn.softmax(logits, axis=-1)


class Router(nnx.Module):
    """Routes each token to ``num_topk`` of ``num_experts`` experts.

    ``gate="sqrtsoftplus"``: ``jax_tilek.moe.topk_gate_weights`` (TileKernels 2.1's gate; its weights
    differentiate through ``moe_topk_gate_backward``). ``gate="top2_sum"``: ``jax_tilek.moe.top2_sum_gate``
    (TileKernels 1.0) with ``scoring_func`` and optional group-limited routing (``num_groups``,
    ``num_topk_groups``); its weights are recomputed from the chosen experts in JAX (the same formula,
    ``s_k / (sum_k s_k + 1e-20) · routed_scaling_factor`` on the unbiased scores) so they differentiate.
    The biased scores rank, the unbiased ones weigh. ``w`` float32 ``[dim, E]`` (axes ``"embed",
    "expert"``); logits are computed in float32.
    """

    def __init__(self, dim: int, num_experts: int, num_topk: int, *, gate: Gate = "sqrtsoftplus", scoring_func: str = "sqrtsoftplus",
                 num_groups: int = 0, num_topk_groups: int = 0, routed_scaling_factor: float = 1.0, impl: Impl = None, rngs: nnx.Rngs):  # fmt: skip
        if gate not in ("sqrtsoftplus", "top2_sum"):
            raise ValueError(f"Router: gate must be 'sqrtsoftplus' or 'top2_sum', got {gate!r}")
        if scoring_func not in SCORINGS or (gate == "sqrtsoftplus" and scoring_func != "sqrtsoftplus"):
            raise ValueError(f"Router: scoring_func must be one of {SCORINGS} (only 'sqrtsoftplus' with gate='sqrtsoftplus'), got {scoring_func!r}")
        if gate == "sqrtsoftplus" and (num_groups or num_topk_groups):
            raise ValueError("Router: group-limited routing needs gate='top2_sum'")
        self.num_experts, self.num_topk, self.gate, self.scoring_func = num_experts, num_topk, gate, scoring_func
        self.num_groups, self.num_topk_groups, self.routed_scaling_factor, self.impl = num_groups, num_topk_groups, routed_scaling_factor, impl
        self.w = param(rngs, nnx.initializers.normal(dim**-0.5), (dim, num_experts), jnp.float32, (EMBED, EXPERT))
        self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For ``x[T, dim]``: ``(topk_idx, topk_weights, probs)``: int32 ``[T, K]``, float32 ``[T, K]``, and
        float32 ``[T, E]`` the scores normalized per token (for the load-balancing loss)."""
        logits = x.astype(jnp.float32) @ self.w[...]
        s = scores(logits, self.scoring_func)
        bias = self.bias[...]
        if self.gate == "sqrtsoftplus":
            idx, weights = moe.topk_gate_weights(logits, self.num_topk, self.routed_scaling_factor, bias, impl=self.impl)
        else:  # the gate has no derivative rule: it sees constants
            idx, _ = moe.top2_sum_gate(jax.lax.stop_gradient(logits), bias, self.num_topk, self.num_topk_groups, self.num_groups, False, 0, self.routed_scaling_factor,
                                       0, 1, 0, 1, self.scoring_func, impl=self.impl)  # fmt: skip
            chosen = jnp.take_along_axis(s, idx, axis=1)
            weights = chosen / (jnp.sum(chosen, axis=1, keepdims=True) + 1e-20) * self.routed_scaling_factor
        # The indices are constants to differentiation.
        return jax.lax.stop_gradient(idx), weights, s / jnp.sum(s, axis=1, keepdims=True)


def load_balancing_loss(topk_idx: jax.Array, probs: jax.Array) -> jax.Array:
    """DeepSeek-V3's balance loss over the batch: ``sum_e f_e · P_e``, with ``f_e`` the routed fraction
    ``count_e · E / (T · K)`` (``jax_tilek.moe.aux_fi``, no gradient) and ``P_e`` the mean normalized
    score (1 when either is uniform; E / K when every token goes to the same K experts and only they score).
    float32 scalar."""
    t, k = topk_idx.shape
    if not t:
        return jnp.float32(0)
    f = moe.aux_fi(topk_idx, probs.shape[1], k)
    return jnp.sum(jax.lax.stop_gradient(f) * jnp.mean(probs, axis=0))


class MoE(nnx.Module):
    """A DeepSeek-style MoE FFN: routed SwiGLU experts plus optional always-on shared experts.

    Per call, for ``x[..., dim]`` flattened to T tokens:
    ``Router`` -> ``get_fused_mapping`` (static capacity, segments aligned to ``alignment`` rows, no host
    sync) -> ``expand_to_fused`` -> ``grouped_matmul`` with ``w_up`` ``[E, dim, 2·ffn]`` on the
    mapping's ``expert_start``/``expert_end`` segments -> ``swiglu`` -> ``grouped_matmul`` with
    ``w_down`` ``[E, ffn, dim]`` -> ``reduce_fused`` with the routing weights; plus ``SwiGLU`` shared
    experts of hidden size ``num_shared_experts · ffn``. Differentiable end to end; every token is
    routed (the capacity is the exact bound, nothing is dropped).

    Returns ``(y, aux_loss)``: ``y`` like x (in ``dtype``) and the float32 load-balancing loss
    (:func:`load_balancing_loss`; weigh it in your objective). The kernel path needs ``dtype``
    bfloat16/float16 and dim, ffn multiples of 128 (``impl="xla"`` takes any). Expert weights have
    axes ``"expert", "embed", "mlp"`` / ``"expert", "mlp", "embed"``. ``fp8=True`` runs the routed
    experts' two products on ``jax_tilek.gemm.grouped_matmul_quantized`` (e4m3, 1 × 128 activation and
    128 × 128 weight block scales, the backward products in FP8 too, straight through the casts) and the shared
    experts' on ``FP8Linear``'s product; it needs dtype bfloat16 and dim, ffn multiples of 128.

    ``expert_axis``: expert parallelism over that axis of the mesh in context (``jax.set_mesh``): the
    experts' weights and the tokens are split over it (E and the token count divisible by its size);
    each device routes its tokens, sends the rows to the experts' devices with a ragged all-to-all, and
    combines what comes back (``jax_tilek.nnx._moe_parallel``; exact, nothing dropped). Results equal
    the single-device layer's. ``dispatch_fp8=True`` (with ``expert_axis``; dim a multiple of 128) sends
    the rows as e4m3 with 1 × 128 scales, half the bytes; the experts then see the rows dequantized, and
    the gradient goes straight through that rounding. Map ``"expert"`` to the axis in
    ``nnx.logical_axis_rules`` so the expert weights live where they are used; the router's and shared
    experts' weights are used replicated.
    """

    def __init__(self, dim: int, ffn: int, num_experts: int, num_topk: int, *, num_shared_experts: int = 0, gate: Gate = "sqrtsoftplus",
                 scoring_func: str = "sqrtsoftplus", num_groups: int = 0, num_topk_groups: int = 0, routed_scaling_factor: float = 1.0,
                 alignment: int = 128, clamp_value: float | None = None, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32,
                 fp8: bool = False, impl: Impl = None, expert_axis: str | None = None, dispatch_fp8: bool = False,
                 rngs: nnx.Rngs):  # fmt: skip
        if dispatch_fp8 and (expert_axis is None or dim % 128 or np.dtype(dtype) not in (jnp.bfloat16, jnp.float32)):
            raise ValueError(f"MoE(dispatch_fp8=True) needs expert_axis, dim a multiple of 128 and dtype bfloat16 or float32, "
                             f"got expert_axis={expert_axis!r}, dim {dim}, {np.dtype(dtype).name}")  # fmt: skip
        if fp8 and (np.dtype(dtype) != jnp.bfloat16 or dim % 128 or ffn % 128):
            raise ValueError(f"MoE(fp8=True) needs dtype bfloat16 and dim, ffn multiples of 128, got {np.dtype(dtype).name}, {dim}, {ffn}")
        self.dim, self.ffn, self.num_experts, self.num_topk, self.fp8 = dim, ffn, num_experts, num_topk, fp8
        self.alignment, self.clamp_value, self.dtype, self.impl = alignment, clamp_value, dtype, impl
        self.expert_axis, self.dispatch_fp8 = expert_axis, dispatch_fp8
        if expert_axis is not None and not jax.sharding.get_abstract_mesh().empty:
            axis_size(self)
        self.router = Router(dim, num_experts, num_topk, gate=gate, scoring_func=scoring_func, num_groups=num_groups, num_topk_groups=num_topk_groups,
                             routed_scaling_factor=routed_scaling_factor, impl=impl, rngs=rngs)  # fmt: skip
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.w_up = param(rngs, init, (num_experts, dim, 2 * ffn), param_dtype, (EXPERT, EMBED, MLP))
        self.w_down = param(rngs, init, (num_experts, ffn, dim), param_dtype, (EXPERT, MLP, EMBED))
        self.shared = (SwiGLU(dim, num_shared_experts * ffn, clamp_value=clamp_value, dtype=dtype, param_dtype=param_dtype, fp8=fp8, impl=impl,
                              rngs=rngs) if num_shared_experts else None)  # fmt: skip

    def experts(self, x: jax.Array, start: jax.Array, end: jax.Array) -> jax.Array:
        """The routed experts on fused rows: ``x[P, dim]`` whose segment ``[start[e], end[e])`` belongs to
        expert e -> ``[P, dim]`` (rows outside every segment give zeros)."""
        matmul = gemm.grouped_matmul_quantized if self.fp8 else gemm.grouped_matmul
        h = matmul(x, self.w_up[...].astype(self.dtype), expert_start=start, expert_end=end, impl=self.impl)
        a = swiglu(h, clamp_value=self.clamp_value, impl=self.impl)
        return matmul(a, self.w_down[...].astype(self.dtype), expert_start=start, expert_end=end, impl=self.impl)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.expert_axis is not None:
            return expert_parallel(self, x)
        tokens = rows(x).astype(self.dtype)
        idx, weights, probs = self.router(tokens)
        pos_to_expert, _, _, token_topk_to_pos, start, end, _, _ = moe.get_fused_mapping(idx, self.num_experts, 0, self.alignment, impl=self.impl)
        fused = moe.expand_to_fused(tokens, token_topk_to_pos, pos_to_expert, impl=self.impl)
        y = moe.reduce_fused(self.experts(fused, start, end), weights, token_topk_to_pos, impl=self.impl)
        if self.shared is not None:
            y = y + self.shared(tokens)
        return y.reshape(x.shape), load_balancing_loss(idx, probs)
