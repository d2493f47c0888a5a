"""TileKernels v2.1's routing gate: ``moe_topk_gate`` (= ``moe_topk_gate_forward``), its backward
``moe_topk_gate_backward``, and ``topk_gate_weights``, the gate's weights with that backward as their VJP
(v2 §2.2).

Forward: sqrt-softplus scores u, ranking r = u + bias (``image_bias`` for image tokens), the K largest r
(ties to the smaller expert), w_k = routed_scaling_factor * u_k / (butterfly sum of the chosen u + 1e-20),
shared slots, the physical map. It runs :func:`jax_tilek.moe._top2_sum_gate.gate_kernel` (version 2),
whose docstring gives the order of operations. No EP/TP masking, no groups (as in 2.1).

``force_random`` (TileKernels: below ``mask``, above fix-routing) draws from a caller-given JAX key
instead of TileLang's per-lane Philox stream, which no reference models: K + S distinct experts, uniform
among the physical experts (sum of ``logical_count``, else E + S), by Floyd's sampling in lane order,
and a uniform [0, 1) weight per lane; unmapped ids -1, scores 0. It is applied in JAX over the kernel's
``[T, K + S]`` outputs (and the scores), so kernel and reference paths share it.

Backward (per token, D = sum_k u_k, g the weights' cotangent, s the scaling factor):
dL/du[idx_k] += (s g_k - <g, w>) / (D + 1e-20) for idx_k >= 0 (duplicates accumulate, in k order); with
``grad_scores_sum`` h (one row per sequence of T / num_seqs consecutive tokens) and ``mask``:
dL/du += (h - <h, u> / sum(u)) / sum(u) on masked-in tokens; dL/dx = dL/du * dy/dx(u), with
dy/dx = (1 - exp(-u^2)) / (2u), as TileKernels' kernel evaluates it: u/2 (1 + u^2 Q(u^2)) for u^2 < 1 (its
degree-5 polynomial), else 0.5 (1 - exp(-u^2)) / u. Sums over k are butterflies over 32 lanes, sums
over experts per lane (lane l owns l, l + 32, ...) then a butterfly; every product and sum is rounded
on its own (no FMA), as the reference does. TileKernels computes the same with fast math and in an
unspecified order (its torch reference in float64), so results agree to rounding.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.moe._top2_sum_gate import (
    GATE_OPERANDS, MAX_TOPK, GateSpec, butterfly_sum, check_gate_operands, gate_arrays, gate_launch, gate_reference_tuple,
    gate_results, gate_rows, separated_gate_logits,
)  # fmt: skip
from jax_tilek.moe._topk_gate import MAX_EXPERTS, MAX_TOKENS, TOKENS_PER_CTA, WARP
from jax_tilek.op import Launch, Rows, Static, TileOp, uses, with_vjp
from jax_tilek.testing import ArgSpec

EPS = 1e-20
# TileKernels' Q(v) of dy/dx = y/2 (1 + v Q(v)), v = y^2 < 1, highest power first.
DYDX_POLY = (0.000129130945, -0.00130112655, 0.00827621203, -0.041647464, 0.166663632, -0.499999821)


# ---------------------------------------------------------------------------------------------
# Forward.


def _check_forward(*operands, topk, shared, **_) -> None:
    check_gate_operands("moe_topk_gate", *operands, topk=topk, shared=shared)


def _forward_reference(*operands, **static):
    return gate_reference_tuple(*operands, version=2, scoring="sqrtsoftplus", groups=0, topk_groups=0, **static)


def _forward_launch(*operands, **static) -> Launch:
    return gate_launch(*operands, version=2, scoring="sqrtsoftplus", groups=0, topk_groups=0, **static)


_forward_op = TileOp(
    name="moe_topk_gate", launch=_forward_launch, operands=GATE_OPERANDS, results=gate_results, reference=_forward_reference,
    check=_check_forward, rows=gate_rows,
)  # fmt: skip


def _forward(op: TileOp, logits, bias=None, image_bias=None, image_token_mask=None, mask=None, fix_routing_mask=None,
             to_physical_map=None, logical_count=None, unmapped_topk_idx=None, *, impl, **static):  # fmt: skip
    return tuple(op(logits, bias, image_bias, image_token_mask, mask, fix_routing_mask, to_physical_map, logical_count,
                    unmapped_topk_idx, impl=impl, **static))  # fmt: skip


def _forward_make(tokens, experts, topk, shared, duplicates, names):
    def make(rng, *structs):
        values = dict(bias=(rng.standard_normal(experts) * 0.1).astype(np.float32))
        values["image_bias"] = (rng.standard_normal(experts) * 0.1).astype(np.float32)
        values["image_token_mask"] = rng.random(tokens) < 0.5
        ranking_bias = values["bias"] if "bias" in names else np.zeros(experts, np.float32)
        if "image_token_mask" in names:
            ranking_bias = np.where(values["image_token_mask"][:, None], values["image_bias"], ranking_bias)
        values["logits"] = separated_gate_logits(rng, tokens, experts, topk, "sqrtsoftplus", ranking_bias)
        values["mask"] = rng.random(tokens) < 0.8
        values["fix_routing_mask"] = rng.random(tokens) < 0.3
        values["unmapped_topk_idx"] = rng.integers(0, experts, (tokens, topk), dtype=np.int32)
        values["to_physical_map"] = rng.integers(0, experts + 32, (experts + shared, max(duplicates, 1)), dtype=np.int32)
        values["logical_count"] = rng.integers(1, max(duplicates, 1) + 1, experts + shared, dtype=np.int32)
        return tuple(values[n] for n in names)

    return make


def _forward_case(name: str, tokens: int, experts: int, topk: int, names=("bias",), shared: int = 0, duplicates: int = 0,
                  with_scores: bool = False, ep_rank: int = 0, bench: bool = False) -> ArgSpec:  # fmt: skip
    """``moe_topk_gate(logits, ...)`` with the optional arrays ``names`` (by keyword)."""
    names = ("logits", *names) + (("to_physical_map", "logical_count") if duplicates else ())
    shapes = dict(
        logits=((tokens, experts), jnp.float32), bias=((experts,), jnp.float32), image_bias=((experts,), jnp.float32),
        image_token_mask=((tokens,), jnp.bool_), mask=((tokens,), jnp.bool_), fix_routing_mask=((tokens,), jnp.bool_),
        to_physical_map=((experts + shared, max(duplicates, 1)), jnp.int32), logical_count=((experts + shared,), jnp.int32),
        unmapped_topk_idx=((tokens, topk), jnp.int32),
    )  # fmt: skip
    kwargs = dict(num_topk=topk, use_shared_as_routed=bool(shared), num_shared_experts=shared, routed_scaling_factor=2.5,
                  ep_rank=ep_rank, with_scores=with_scores)  # fmt: skip
    return GateSpec(
        name, tuple(jax.ShapeDtypeStruct(*shapes[n]) for n in names), kwargs, make=_forward_make(tokens, experts, topk, shared, duplicates, names),
        tolerance=1e-5, bench=bench, names=names, positional=1,
    )  # fmt: skip


FORWARD_SPECS = (
    _forward_case("t1_e8_k1", 1, 8, 1, names=()),
    _forward_case("t4001_e72_k6_mask", 4001, 72, 6, names=("bias", "mask")),
    _forward_case("t136_e256_k8_image_fix_scores", 136, 256, 8, names=("bias", "image_bias", "image_token_mask", "fix_routing_mask", "unmapped_topk_idx"), with_scores=True),
    _forward_case("t37_e256_k8_shared_map", 37, 256, 8, names=("bias", "mask", "unmapped_topk_idx"), shared=2, duplicates=4, ep_rank=3),
    _forward_case("t0_e256_k8", 0, 256, 8),
    _forward_case("t64_e384_k32", 64, 384, 32),
    *(_forward_case(f"bench_t{t}_e256_k8", t, 256, 8, bench=True) for t in (4096, 16384, 65536)),
)


@uses(_forward_op, cases=FORWARD_SPECS)
def moe_topk_gate(
    logits: jax.Array,
    num_topk: int,
    use_shared_as_routed: bool,
    num_shared_experts: int,
    routed_scaling_factor: float,
    ep_rank: int,
    scoring_func: str = "sqrtsoftplus",
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    image_bias: jax.Array | None = None,
    image_token_mask: jax.Array | None = None,
    fix_routing_mask: jax.Array | None = None,
    to_physical_map: jax.Array | None = None,
    logical_count: jax.Array | None = None,
    unmapped_topk_idx: jax.Array | None = None,
    force_random: jax.Array | None = None,
    with_scores: bool = False,
    *,
    force_random_key: jax.Array | None = None,
    impl=None,
    ops,
) -> tuple[jax.Array, ...]:
    """TileKernels v2.1 ``moe_topk_gate`` / ``moe_topk_gate_forward``, functional (module docstring).

    Args:
      logits: float32 ``[T, E]``, E % 4 == 0, E <= 1024, finite.
      num_topk: K, 1 <= K <= min(E, 32).
      use_shared_as_routed, num_shared_experts: S = num_shared_experts (1 or 2) shared slots (index
        E + s, weight 1) when True, else 0; K + S <= 32.
      routed_scaling_factor: multiplies the routed weights.
      ep_rank: >= 0, the duplicate pick ``(ep_rank + token * 23333) % logical_count[e]``.
      scoring_func: must be "sqrtsoftplus".
      mask: bool ``[T]``, False: indices -1, weights 0, unmapped -1, scores 0.
      bias, image_bias: float32 ``[E]`` ranking biases; ``image_bias`` (with ``image_token_mask``,
        bool ``[T]``) replaces ``bias`` for image tokens.
      fix_routing_mask: bool ``[T]``: take those tokens' experts from ``unmapped_topk_idx``.
      to_physical_map, logical_count: int32 ``[E + S, D]`` and ``[E + S]``, together.
      unmapped_topk_idx: int32 ``[T, K]``; given, its updated value is returned.
      force_random: bool ``[T]``: those tokens (where ``mask`` allows) get random experts and weights
        drawn from ``force_random_key`` (module docstring); needs the sum of ``logical_count`` >= K + S.
      with_scores: also return u (TileKernels' ``scores=`` output, which the backward takes).
      force_random_key: a ``jax.random`` key, given exactly when ``force_random`` is.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``(topk_idx, topk_weights)`` int32 / float32 ``[T, K + S]``, then ``unmapped_topk_idx`` int32
      ``[T, K]`` if it was given, then ``scores`` float32 ``[T, E]`` with ``with_scores``.
    """
    name = "moe_topk_gate"
    a = gate_arrays(name, logits=logits, mask=mask, bias=bias, image_bias=image_bias, image_token_mask=image_token_mask,
                    fix_routing_mask=fix_routing_mask, to_physical_map=to_physical_map, logical_count=logical_count,
                    unmapped_topk_idx=unmapped_topk_idx)  # fmt: skip
    k = checks.static_int(name, "num_topk", num_topk)
    use_shared = checks.static_bool(name, "use_shared_as_routed", use_shared_as_routed)
    shared = checks.static_int(name, "num_shared_experts", num_shared_experts) if use_shared else 0
    scale = checks.static_number(name, "routed_scaling_factor", routed_scaling_factor, optional=False)
    ep_rank = checks.static_int(name, "ep_rank", ep_rank)
    with_scores = checks.static_bool(name, "with_scores", with_scores)
    if scoring_func != "sqrtsoftplus":
        raise ValueError(f"{name}: scoring_func must be 'sqrtsoftplus', got {scoring_func!r}")
    if (force_random is None) != (force_random_key is None):
        raise ValueError(f"{name}: force_random and force_random_key must be given together")
    if use_shared and shared not in (1, 2):
        raise ValueError(f"{name}: num_shared_experts must be 1 or 2 with use_shared_as_routed, got {shared}")
    if ep_rank < 0:
        raise ValueError(f"{name}: ep_rank must be >= 0, got {ep_rank}")
    if (a["image_bias"] is None) != (a["image_token_mask"] is None):
        raise ValueError(f"{name}: image_bias and image_token_mask must be given together")
    outputs = _forward(ops[0], **a, impl=impl, topk=k, shared=shared, routed_scaling_factor=scale, ep_rank=ep_rank, with_scores=with_scores)
    if force_random is None:
        return outputs
    tokens, experts = a["logits"].shape
    force = checks.as_array(name, "force_random", force_random)
    if force.shape != (tokens,) or force.dtype != jnp.bool_:
        raise ValueError(f"{name}: force_random must be bool [T={tokens}], got {force.dtype}{list(force.shape)}")
    if a["mask"] is not None:
        force = force & a["mask"]
    count = experts + shared if a["logical_count"] is None else jnp.sum(a["logical_count"])
    return _force_random(outputs, force, force_random_key, count, has_unmapped=a["unmapped_topk_idx"] is not None)


def _force_random(outputs: tuple, force: jax.Array, key: jax.Array, count, *, has_unmapped: bool) -> tuple:
    """Overrides the gate's outputs on the tokens ``force`` marks (module docstring)."""
    idx, weights, *rest = outputs
    tokens, slots = idx.shape
    index_key, weight_key = jax.random.split(key)
    # Floyd: slot i draws r in [0, count - slots + i]; a repeat takes count - slots + i instead.
    highest = count - slots + jnp.arange(slots, dtype=jnp.int32)
    draws = jax.random.randint(index_key, (tokens, slots), 0, highest + 1, dtype=jnp.int32)
    picked = []
    for i in range(slots):
        seen = jnp.zeros((tokens,), jnp.bool_)
        for earlier in picked:
            seen = seen | (earlier == draws[:, i])
        picked.append(jnp.where(seen, highest[i], draws[:, i]))
    forced = force[:, None]
    idx = jnp.where(forced, jnp.stack(picked, axis=1), idx)
    weights = jnp.where(forced, jax.random.uniform(weight_key, (tokens, slots), jnp.float32), weights)
    if has_unmapped:
        rest[0] = jnp.where(forced, -1, rest[0])
    if len(rest) > has_unmapped:
        rest[-1] = jnp.where(forced, jnp.float32(0), rest[-1])
    return (idx, weights, *rest)


moe_topk_gate_forward = moe_topk_gate


# ---------------------------------------------------------------------------------------------
# Backward.


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def gate_backward_kernel(experts: int, topk: int, has_aux: bool):
    """One warp per token, four tokens per CTA. Lane k < K loads slot k and computes its route term;
    lane l owns experts l, l + 32, ... and gathers the terms whose index it owns (broadcast by shuffles,
    in k order); then the aux term and the chain rule, every operation rounded on its own."""
    import tilelang.language as T

    N = T.dynamic("N")
    Q = T.dynamic("Q")
    E, K = experts, topk
    P = -(-E // WARP)
    f32 = "float32"
    fadd, fsub, fmul, fdiv = T.ieee_add, T.ieee_sub, T.ieee_mul, T.ieee_fdiv

    @T.prim_func
    def gate_backward(
        scores: T.Tensor((N, E), f32),
        topk_idx: T.Tensor((N, K), "int32"),
        topk_weights: T.Tensor((N, K), f32),
        grad_topk_weights: T.Tensor((N, K), f32),
        mask: T.Tensor((N,), "bool"),
        grad_scores_sum: T.Tensor((Q, E), f32),
        grad_logits: T.Tensor((N, E), f32),
        routed_scaling_factor: T.float32,
    ):
        with T.Kernel(T.ceildiv(N, TOKENS_PER_CTA), threads=WARP * TOKENS_PER_CTA) as b:
            tid = T.get_thread_binding(0)
            lane = tid % WARP
            token = b * TOKENS_PER_CTA + tid // WARP
            src = T.min(token, N - 1)
            u = T.alloc_local((P,), f32)
            h = T.alloc_local((P,), f32)
            gu = T.alloc_local((P,), f32)
            idx = T.alloc_var("int32")
            g = T.alloc_var(f32)
            wk = T.alloc_var(f32)
            picked = T.alloc_var(f32)
            total = T.alloc_var(f32)
            dot = T.alloc_var(f32)
            term = T.alloc_var(f32)
            other = T.alloc_var("int32")
            moved = T.alloc_var(f32)
            usum = T.alloc_var(f32)
            hdot = T.alloc_var(f32)
            inv = T.alloc_var(f32)
            v = T.alloc_var(f32)
            half = T.alloc_var(f32)
            q = T.alloc_var(f32)
            idx = -1
            g = T.float32(0)
            wk = T.float32(0)
            picked = T.float32(0)
            if lane < K:
                idx = topk_idx[src, T.min(lane, K - 1)]
                if idx >= 0:
                    g = grad_topk_weights[src, T.min(lane, K - 1)]
                    wk = topk_weights[src, T.min(lane, K - 1)]
                    picked = scores[src, T.min(idx, E - 1)]
            total = picked
            for k in T.unroll(5):
                total = fadd(total, T.shfl_xor(total, 16 >> k))
            dot = fmul(g, wk)
            for k in T.unroll(5):
                dot = fadd(dot, T.shfl_xor(dot, 16 >> k))
            term = fdiv(fsub(fmul(routed_scaling_factor, g), dot), fadd(total, T.float32(EPS)))
            for j in device.static_range(P):
                e = j * WARP + lane
                u[j] = T.if_then_else(e < E, scores[src, T.min(e, E - 1)], T.float32(0))
                gu[j] = T.float32(0)
            for k in (T.unroll if K <= 8 else T.serial)(K):
                other = T.shfl_sync(idx, k)
                moved = T.shfl_sync(term, k)
                for j in device.static_range(P):
                    if other == j * WARP + lane:
                        gu[j] = fadd(gu[j], moved)
            if has_aux:
                usum = T.float32(0)
                hdot = T.float32(0)
                for j in device.static_range(P):
                    e = j * WARP + lane
                    h[j] = T.if_then_else(e < E, grad_scores_sum[src // (N // Q), T.min(e, E - 1)], T.float32(0))
                    usum = fadd(usum, u[j])
                    hdot = fadd(hdot, fmul(h[j], u[j]))
                for k in T.unroll(5):
                    usum = fadd(usum, T.shfl_xor(usum, 16 >> k))
                for k in T.unroll(5):
                    hdot = fadd(hdot, T.shfl_xor(hdot, 16 >> k))
                inv = T.if_then_else(mask[src], fdiv(T.float32(1), usum), T.float32(0))
                for j in device.static_range(P):
                    gu[j] = fadd(gu[j], fmul(fsub(h[j], fmul(hdot, inv)), inv))
            for j in device.static_range(P):
                e = j * WARP + lane
                v = fmul(u[j], u[j])
                half = fmul(T.float32(0.5), u[j])
                q = T.float32(DYDX_POLY[0])
                for c in DYDX_POLY[1:]:
                    q = fadd(fmul(q, v), T.float32(c))
                if token < N and e < E:
                    grad_logits[token, e] = fmul(
                        T.if_then_else(
                            v < T.float32(1),
                            fadd(fmul(fmul(v, q), half), half),
                            fmul(T.float32(0.5), fdiv(fsub(T.float32(1), T.exp(-v)), u[j])),
                        ),
                        gu[j],
                    )

    return gate_backward


def dydx_from_u(u: jax.Array) -> jax.Array:
    """dy/dx of y = sqrt(softplus(x)) from y = u, as TileKernels' kernel evaluates it (module docstring)."""
    v = u * u
    half = jnp.float32(0.5) * u
    q = jnp.full_like(u, DYDX_POLY[0])
    for c in DYDX_POLY[1:]:
        q = q * v + jnp.float32(c)
    return jnp.where(v < 1, (v * q) * half + half, jnp.float32(0.5) * ((1 - jnp.exp(-v)) / u))


def lane_strided_sum(values: jax.Array) -> jax.Array:
    """``[T]``: per lane (lane l owns l, l + 32, ... in order), then the xor butterfly."""
    t, e = values.shape
    slots = -(-e // WARP)
    padded = jnp.pad(values, ((0, 0), (0, slots * WARP - e))).reshape(t, slots, WARP)
    partial = jnp.zeros((t, WARP), values.dtype)
    for j in range(slots):
        partial = partial + padded[:, j]
    return butterfly_sum(partial)


def backward_reference(scores, topk_idx, topk_weights, grad_topk_weights, mask, grad_scores_sum, *, routed_scaling_factor: float):
    """grad_logits float32 ``[T, E]``, in the kernel's order of operations (module docstring)."""
    t, e = scores.shape
    valid = topk_idx >= 0
    picked = jnp.where(valid, jnp.take_along_axis(scores, jnp.clip(topk_idx, 0, e - 1), axis=1), 0)
    g = jnp.where(valid, grad_topk_weights, 0)
    w = jnp.where(valid, topk_weights, 0)
    total = butterfly_sum(picked)
    dot = butterfly_sum(g * w)
    term = (jnp.float32(routed_scaling_factor) * g - dot[:, None]) / (total + jnp.float32(EPS))[:, None]
    experts = jnp.arange(e, dtype=jnp.int32)
    gu = jnp.zeros_like(scores)
    for k in range(topk_idx.shape[1]):
        gu = gu + jnp.where(experts == topk_idx[:, k : k + 1], term[:, k : k + 1], jnp.float32(0))
    if grad_scores_sum is not None:
        seqs = grad_scores_sum.shape[0]
        h = jnp.repeat(grad_scores_sum, t // seqs, axis=0) if t else jnp.zeros_like(scores)
        usum = lane_strided_sum(scores)
        hdot = lane_strided_sum(h * scores)
        inv = jnp.where(mask, 1 / usum, jnp.float32(0))[:, None]
        gu = gu + (h - hdot[:, None] * inv) * inv
    return dydx_from_u(scores) * gu


def _check_backward(scores, topk_idx, topk_weights, grad_topk_weights, mask, grad_scores_sum, **_) -> None:
    name = "moe_topk_gate_backward"
    if scores.ndim != 2 or scores.dtype != jnp.float32:
        raise ValueError(f"{name}: scores must be float32 [T, E], got {scores.dtype} {scores.shape}")
    t, e = scores.shape
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"{name}: the number of experts E must be in [1, {MAX_EXPERTS}], got {e}")
    if topk_idx.ndim != 2 or topk_idx.shape[0] != t or topk_idx.dtype != jnp.int32:
        raise ValueError(f"{name}: topk_idx must be int32 [T, K] with T = {t}, got {topk_idx.dtype} {topk_idx.shape}")
    k = topk_idx.shape[1]
    if not 1 <= k <= min(e, MAX_TOPK):
        raise ValueError(f"{name}: K (topk_idx.shape[1]) must be in [1, min(E, {MAX_TOPK})] = [1, {min(e, MAX_TOPK)}], got {k}")
    for arg, value in (("topk_weights", topk_weights), ("grad_topk_weights", grad_topk_weights)):
        if value.shape != (t, k) or value.dtype != jnp.float32:
            raise ValueError(f"{name}: {arg} must be float32 [{t}, {k}] like topk_idx, got {value.dtype} {list(value.shape)}")
    if (mask is None) != (grad_scores_sum is None):
        raise ValueError(f"{name}: grad_scores_sum and mask must be given together")
    if mask is not None:
        if mask.shape != (t,) or mask.dtype != jnp.bool_:
            raise ValueError(f"{name}: mask must be bool [{t}], got {mask.dtype} {list(mask.shape)}")
        q = grad_scores_sum.shape[0] if grad_scores_sum.ndim == 2 else 0
        if grad_scores_sum.ndim != 2 or grad_scores_sum.shape[1] != e or grad_scores_sum.dtype != jnp.float32 or q < 1 or t % q:
            raise ValueError(f"{name}: grad_scores_sum must be float32 [num_seqs, {e}] with num_seqs >= 1 dividing T = {t}, got {grad_scores_sum.dtype} {list(grad_scores_sum.shape)}")
    if t > MAX_TOKENS:
        raise ValueError(f"{name}: scores may have at most {MAX_TOKENS} rows, got {t}")


def _backward_launch(scores, topk_idx, topk_weights, grad_topk_weights, mask, grad_scores_sum, *, routed_scaling_factor) -> Launch:
    return Launch(
        kernel=gate_backward_kernel,
        params=dict(experts=scores.shape[1], topk=topk_idx.shape[1], has_aux=grad_scores_sum is not None),
        scalars=dict(routed_scaling_factor=float(routed_scaling_factor)),
    )


def _backward_rows(*operands, **_) -> Rows | None:
    """Row-wise without the aux term (whose sequence of a token depends on its row number)."""
    if operands[5] is not None:
        return None
    return Rows(("scores", "topk_idx", "topk_weights", "grad_topk_weights"), ("grad_logits",))


_backward_op = TileOp(
    name="moe_topk_gate_backward", launch=_backward_launch,
    operands=("scores", "topk_idx", "topk_weights", "grad_topk_weights", "mask?", "grad_scores_sum?"), results=("grad_logits",),
    reference=backward_reference, check=_check_backward, rows=_backward_rows,
)  # fmt: skip


def _backward_make(tokens, experts, topk, seqs):
    def make(rng, *structs):
        scores = np.sqrt(np.logaddexp(0, rng.standard_normal((tokens, experts)))).astype(np.float32)
        idx = np.argsort(rng.random((tokens, experts)), axis=1)[:, :topk].astype(np.int32)
        idx[rng.random((tokens, topk)) < 0.1] = -1
        weights = rng.random((tokens, topk)).astype(np.float32)
        grads = rng.standard_normal((tokens, topk)).astype(np.float32)
        arrays = [scores, idx, weights, grads]
        if seqs:
            arrays += [rng.random(tokens) < 0.8, rng.standard_normal((seqs, experts)).astype(np.float32)]
        return tuple(arrays)

    return make


def _backward_case(name: str, tokens: int, experts: int, topk: int, seqs: int = 0, bench: bool = False) -> ArgSpec:
    structs = [((tokens, experts), jnp.float32), ((tokens, topk), jnp.int32), ((tokens, topk), jnp.float32), ((tokens, topk), jnp.float32)]
    names = ["scores", "topk_idx", "topk_weights", "grad_topk_weights"]
    if seqs:
        structs += [((tokens,), jnp.bool_), ((seqs, experts), jnp.float32)]
        names += ["mask", "grad_scores_sum"]
    return GateSpec(
        name, tuple(jax.ShapeDtypeStruct(*s) for s in structs), dict(routed_scaling_factor=2.5), make=_backward_make(tokens, experts, topk, seqs),
        tolerance=1e-5, bench=bench, names=tuple(names), positional=4,
    )  # fmt: skip


BACKWARD_SPECS = (
    _backward_case("t1_e8_k1", 1, 8, 1),
    _backward_case("t4001_e72_k6", 4001, 72, 6),
    _backward_case("t136_e256_k8_aux4", 136, 256, 8, seqs=4),
    _backward_case("t0_e256_k8", 0, 256, 8),
    _backward_case("t64_e384_k32", 64, 384, 32),
    *(_backward_case(f"bench_t{t}_e256_k8", t, 256, 8, bench=True) for t in (4096, 16384, 65536)),
)


@uses(_backward_op, cases=BACKWARD_SPECS)
def moe_topk_gate_backward(
    scores: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    grad_topk_weights: jax.Array,
    routed_scaling_factor: float,
    scoring_func: str = "sqrtsoftplus",
    mask: jax.Array | None = None,
    grad_scores_sum: jax.Array | None = None,
    *,
    impl=None,
    ops,
) -> jax.Array:
    """TileKernels v2.1 ``moe_topk_gate_backward``: the gradient of the gate's weights w.r.t. the logits.

    Args:
      scores: float32 ``[T, E]``, the forward's u (``moe_topk_gate(..., with_scores=True)``).
      topk_idx: int32 ``[T, K]`` logical (unmapped) routed experts, -1 for none; K <= min(E, 32).
      topk_weights, grad_topk_weights: float32 ``[T, K]``: the routed weights and their cotangent.
      routed_scaling_factor: the forward's.
      scoring_func: must be "sqrtsoftplus".
      mask, grad_scores_sum: bool ``[T]`` and float32 ``[num_seqs, E]`` (num_seqs dividing T), together:
        the aux-loss term (module docstring).
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      grad_logits, float32 ``[T, E]``.
    """
    name = "moe_topk_gate_backward"
    arrays = {k: checks.as_array(name, k, v, optional=k in ("mask", "grad_scores_sum")) for k, v in dict(
        scores=scores, topk_idx=topk_idx, topk_weights=topk_weights, grad_topk_weights=grad_topk_weights, mask=mask,
        grad_scores_sum=grad_scores_sum).items()}  # fmt: skip
    scale = checks.static_number(name, "routed_scaling_factor", routed_scaling_factor, optional=False)
    if scoring_func != "sqrtsoftplus":
        raise ValueError(f"{name}: scoring_func must be 'sqrtsoftplus', got {scoring_func!r}")
    return ops[0](*arrays.values(), impl=impl, routed_scaling_factor=scale)


# ---------------------------------------------------------------------------------------------
# The differentiable gate.


def _weights_primal(logits, bias, *, impl, topk, routed_scaling_factor, ops):
    return _forward(ops[0], logits, bias, impl=impl, topk=topk, shared=0, routed_scaling_factor=routed_scaling_factor, ep_rank=0)


def _weights_fwd(logits, bias, *, impl, topk, routed_scaling_factor, ops):
    idx, weights, scores = _forward(ops[0], logits, bias, impl=impl, topk=topk, shared=0, routed_scaling_factor=routed_scaling_factor,
                                    ep_rank=0, with_scores=True)  # fmt: skip
    return (idx, weights), (scores, idx, weights, Static(bias is not None))


def _weights_bwd(residuals, cotangent, *, impl, topk, routed_scaling_factor, ops):
    scores, idx, weights, has_bias = residuals
    grad = ops[1](scores, idx, weights, cotangent[1], impl=impl, routed_scaling_factor=routed_scaling_factor)
    return grad, (jnp.zeros(scores.shape[1:], jnp.float32) if has_bias.value else None)


_weights = with_vjp(_weights_primal, _weights_fwd, _weights_bwd)


WEIGHTS_SPECS = (
    _forward_case("t1_e8_k1", 1, 8, 1, names=()),
    _forward_case("t4001_e72_k6_bias", 4001, 72, 6),
    _forward_case("t136_e256_k8_bias", 136, 256, 8),
    _forward_case("t0_e256_k8", 0, 256, 8),
)
WEIGHTS_SPECS = tuple(
    GateSpec(c.name, c.args, dict(num_topk=c.kwargs["num_topk"], routed_scaling_factor=c.kwargs["routed_scaling_factor"]),
             make=c.make, tolerance=c.tolerance, names=c.names, positional=1)  # fmt: skip
    for c in WEIGHTS_SPECS
)


@uses(_forward_op, _backward_op, cases=WEIGHTS_SPECS, differentiable=True)
def topk_gate_weights(
    logits: jax.Array, num_topk: int, routed_scaling_factor: float = 1.0, bias: jax.Array | None = None, *, impl=None, ops
) -> tuple[jax.Array, jax.Array]:
    """The v2.1 gate as a differentiable function: ``moe_topk_gate`` (no shared slots, map or masks)
    whose weights differentiate through ``moe_topk_gate_backward`` (bias gets a zero gradient: the
    weights use the unbiased scores). ``impl="xla"`` differentiates the JAX reference instead.

    Args:
      logits: float32 ``[T, E]``, E % 4 == 0, E <= 1024, finite.
      num_topk: K, 1 <= K <= min(E, 32).
      routed_scaling_factor: multiplies the weights.
      bias: float32 ``[E]`` ranking bias, or None.

    Returns:
      ``(topk_idx, topk_weights)``: int32 and float32 ``[T, K]``.
    """
    name = "topk_gate_weights"
    logits = checks.as_array(name, "logits", logits)
    bias = checks.as_array(name, "bias", bias, optional=True)
    k = checks.static_int(name, "num_topk", num_topk)
    scale = checks.static_number(name, "routed_scaling_factor", routed_scaling_factor, optional=False)
    check_gate_operands(name, logits, bias, None, None, None, None, None, None, None, topk=k, shared=0)
    return _weights(logits, bias, impl=impl, topk=k, routed_scaling_factor=scale, ops=ops)



__all__: Any = ["moe_topk_gate", "moe_topk_gate_forward", "moe_topk_gate_backward", "topk_gate_weights"]
