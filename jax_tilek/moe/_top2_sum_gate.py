"""top2_sum_gate (TileKernels v1 §1.3), and the routing gate kernel it shares with v2.1's moe_topk_gate.

Per token (one warp): scores u from the logits (sigmoid, sqrt-softplus or softmax), ranking scores
r = u + bias (softmax: logits + bias), optionally limited to the ``num_topk_groups`` best of
``num_groups`` groups by the sum of each group's top two r; the K largest r (ties to the smaller
expert); weights from the *unbiased* u of the chosen experts, w_k = u_k / sum * routed_scaling_factor;
shared-expert slots; the logical -> physical map; EP/TP masking (v1 only).

Where the documents leave an order open this follows TileKernels' kernels (the torch reference
agrees except where noted):

- softmax: the exp's are summed per lane over its experts (lane l owns 4l .. 4l+3 of every 128),
  then by an xor butterfly (16, 8, 4, 2, 1), and u = exp / sum;
- the sum of the chosen u: v1 sequentially from 1e-20 (the torch reference clamps at 1e-20), v2.1 by
  the 32-lane xor butterfly (lanes >= K add 0) plus 1e-20;
- sigmoid is 1 / (1 + exp(-x)), softplus ``x if x > 20 else log1p(exp(x))``;
- the duplicate pick ``(ep_rank + token * 23333) % logical_count[e]`` in exact integers (the v1 kernel
  overflows int32 past 92k tokens; the torch reference is exact), token being the row of ``logits``;
- fixed routing (``fix_routing_mask``) takes the given indices (expected in [0, E): other values are
  clamped where they are read) and recomputes their weights.

Indices are int32 (TileKernels: int64). Results differ from TileKernels' only in the last bits of
the weights (exp, log1p); indices are exact wherever the ranking scores are not within rounding of
a tie.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.moe._topk_gate import MAX_TOKENS, WARP, group_scores, macros, stable_topk, tir_desc_key
from jax_tilek.op import Launch, Rows, TileOp, uses
from jax_tilek.testing import ArgSpec

GATE_TOKENS_PER_CTA = 2  # one warp per token
MAX_EXPERTS = 1024
MAX_TOPK = 32
PRIME = 23333  # TileKernels' duplicate-pick multiplier
SCORINGS = ("sigmoid", "sqrtsoftplus", "softmax")
EPS = 1e-20


# ---------------------------------------------------------------------------------------------
# The kernel.


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def gate_kernel(
    experts: int, topk: int, shared: int, scoring: str, groups: int, topk_groups: int, version: int,
    has_bias: bool, has_image: bool, has_mask: bool, has_fix: bool, has_map: bool, with_unmapped: bool, with_scores: bool,
):  # fmt: skip
    """Two tokens per CTA, a warp each. Lane l loads experts 128i + 4l .. +3 (16-byte loads) and keeps
    u, r and the selection keys (``tir_desc_key``) in registers; u (and r, for groups) also go to the
    warp's row of shared memory. Groups: lane g < G ranks its group (``group_score``/``group_rank``)
    and a ballot tells every lane which groups are in. K rounds of ``select_topk`` leave winner k on
    lane k, which then reads its u, takes part in the sum, maps and stores its slot."""
    import tilelang.language as T

    mac = macros()
    select_topk, group_score, group_rank = mac["select_topk"], mac["group_score"], mac["group_rank"]
    N = T.dynamic("N")
    D = T.dynamic("D")
    R, K, S = experts, topk, shared
    L = R + S
    NI = -(-R // 128)
    P = 4 * NI
    grouped = groups != topk_groups
    M = R // groups if grouped else 1
    f32 = "float32"
    W = GATE_TOKENS_PER_CTA

    @T.prim_func
    def gate(
        logits: T.Tensor((N, R), f32),
        bias: T.Tensor((R,), f32),
        image_bias: T.Tensor((R,), f32),
        image_token_mask: T.Tensor((N,), "bool"),
        mask: T.Tensor((N,), "bool"),
        fix_routing_mask: T.Tensor((N,), "bool"),
        to_physical_map: T.Tensor((L, D), "int32"),
        logical_count: T.Tensor((L,), "int32"),
        unmapped_topk_idx: T.Tensor((N, K), "int32"),
        topk_idx: T.Tensor((N, K + S), "int32"),
        topk_weights: T.Tensor((N, K + S), f32),
        unmapped_topk_idx_out: T.Tensor((N, K), "int32"),
        scores: T.Tensor((N, R), f32),
        routed_scaling_factor: T.float32,
        ep_rank: T.int32,
        num_ep_ranks: T.int32,
        tp_rank: T.int32,
        num_tp_ranks: T.int32,
        num_extra_experts: T.int32,
    ):
        with T.Kernel(T.ceildiv(N, W), threads=WARP * W) as b:
            tid = T.get_thread_binding(0)
            lane = tid % WARP
            w = tid // WARP
            token = b * W + w
            src = T.min(token, N - 1)
            x = T.alloc_local((P,), f32)
            u = T.alloc_local((P,), f32)
            r = T.alloc_local((P,), f32)
            keys = T.alloc_local((P,), "uint64")
            u_row = T.alloc_shared((W, R), f32)
            r_row = T.alloc_shared((W, R if grouped else 4), f32)
            m = T.alloc_var(f32)
            total = T.alloc_var(f32)
            score = T.alloc_var(f32)
            rank = T.alloc_var("int32")
            chosen = T.alloc_var("uint64")
            mine = T.alloc_var("int32")
            picked = T.alloc_var(f32)
            weight = T.alloc_var(f32)
            idx = T.alloc_var("int32")
            row = T.alloc_var("int32")
            dup = T.alloc_var("int32")
            per_rank = T.alloc_var("int32")
            dp = T.alloc_var("int32")
            image = T.alloc_var("int32")
            keep = T.alloc_var("int32")

            image = 0
            if has_image:
                image = T.Cast("int32", image_token_mask[src])
            keep = 1
            if has_mask:
                keep = T.Cast("int32", mask[src])
            # Load: invalid slots (past E) hold -inf, which every scoring maps to u = 0.
            for i in device.static_range(NI):
                base = i * 128 + lane * 4
                if (i + 1) * 128 <= R:
                    for j in T.vectorized(4):
                        x[i * 4 + j] = logits[src, base + j]
                else:
                    if base < R:
                        for j in T.vectorized(4):
                            x[i * 4 + j] = logits[src, base + j]
                    else:
                        for j in T.unroll(4):
                            x[i * 4 + j] = -T.infinity(f32)
            if scoring == "softmax":
                m = -T.infinity(f32)
                for s in T.unroll(P):
                    m = T.max(m, x[s])
                for k in T.unroll(5):
                    m = T.max(m, T.shfl_xor(m, 16 >> k))
                total = T.float32(0)
                for s in T.unroll(P):
                    u[s] = T.exp(x[s] - m)
                    total = total + u[s]
                for k in T.unroll(5):
                    total = total + T.shfl_xor(total, 16 >> k)
                for s in T.unroll(P):
                    u[s] = u[s] / total
            elif scoring == "sigmoid":
                for s in T.unroll(P):
                    u[s] = T.float32(1) / (T.float32(1) + T.exp(-x[s]))
            else:
                for s in T.unroll(P):
                    u[s] = T.sqrt(T.if_then_else(x[s] > T.float32(20), x[s], T.log1p(T.exp(x[s]))))
            for i in device.static_range(NI):
                base = i * 128 + lane * 4
                if base < R:
                    for j in T.unroll(4):
                        e = base + j
                        r[i * 4 + j] = (x[i * 4 + j] if scoring == "softmax" else u[i * 4 + j]) + (
                            T.if_then_else(image != 0, image_bias[e], bias[e] if has_bias else T.float32(0))
                            if has_image
                            else (bias[e] if has_bias else T.float32(0))
                        )
                    for j in T.vectorized(4):
                        u_row[w, base + j] = u[i * 4 + j]
                    if grouped:
                        for j in T.vectorized(4):
                            r_row[w, base + j] = r[i * 4 + j]
                    if with_scores:
                        if token < N:
                            for j in T.vectorized(4):
                                scores[token, base + j] = T.if_then_else(keep != 0, u[i * 4 + j], T.float32(0))
            T.sync_threads()
            chosen = T.uint64(0xFFFFFFFF)
            if grouped:
                score = group_score(r_row, w, lane, groups, M, 2)
                rank = group_rank(score, lane, groups)
                chosen = T.ballot(lane < groups and rank < topk_groups)
            for i in device.static_range(NI):
                base = i * 128 + lane * 4
                for j in device.static_range(4):
                    e = base + j
                    if grouped:
                        keys[i * 4 + j] = T.if_then_else(
                            e < R and ((chosen >> T.Cast("uint64", e // M)) & T.uint64(1)) != T.uint64(0), tir_desc_key(r[i * 4 + j], e), T.uint64(0)
                        )
                    else:
                        keys[i * 4 + j] = T.if_then_else(e < R, tir_desc_key(r[i * 4 + j], e), T.uint64(0))
            mine = select_topk(keys, P, K, lane)
            if has_fix:
                if fix_routing_mask[src] and lane < K:
                    mine = unmapped_topk_idx[src, T.min(lane, K - 1)]
            picked = T.float32(0)
            if lane < K:
                picked = u_row[w, T.max(T.min(mine, R - 1), 0)]
            if version == 1:
                total = T.float32(EPS)
                for k in T.unroll(K):
                    total = total + T.shfl_sync(picked, k)
            else:
                total = picked
                for k in T.unroll(5):
                    total = total + T.shfl_xor(total, 16 >> k)
                total = total + T.float32(EPS)
            weight = T.float32(1)
            idx = R + lane - K
            if lane < K:
                weight = T.ieee_mul(T.ieee_fdiv(picked, total), routed_scaling_factor)
                idx = mine
            if with_unmapped:
                if token < N and lane < K:
                    unmapped_topk_idx_out[token, lane] = T.if_then_else(keep != 0, mine, -1)
            if has_map:
                if lane < K + S:
                    row = T.max(T.min(idx, L - 1), 0)
                    dup = T.Cast(
                        "int32",
                        (T.Cast("int64", ep_rank) + T.Cast("int64", token) * T.int64(PRIME)) % T.Cast("int64", T.max(logical_count[row], 1)),
                    )
                    idx = to_physical_map[row, T.min(dup, D - 1)]
            if version == 1:
                per_rank = (R + num_extra_experts) // num_ep_ranks
                if idx >= 0:
                    if (idx // per_rank) % num_tp_ranks != tp_rank:
                        idx = -1
                    else:
                        idx = idx - tp_rank * per_rank
                        dp = idx // (per_rank * num_tp_ranks)
                        idx = idx - dp * (per_rank * num_tp_ranks) + dp * per_rank
                        if idx < 0:
                            idx = -1
            if token < N and lane < K + S:
                topk_idx[token, lane] = T.if_then_else(keep != 0, idx, -1)
                topk_weights[token, lane] = T.if_then_else(keep != 0, weight, T.float32(0))

    return gate


# ---------------------------------------------------------------------------------------------
# The reference.


def lane_sums(values: jax.Array) -> jax.Array:
    """``[T]``: the kernels' softmax sum of ``values`` ``[T, E]``: per lane (lane l owns entries
    128i + 4l + j, in (i, j) order), then the xor butterfly over the 32 lanes."""
    t, e = values.shape
    chunks = -(-e // 128)
    padded = jnp.pad(values, ((0, 0), (0, chunks * 128 - e))).reshape(t, chunks, WARP, 4)
    partial = jnp.zeros((t, WARP), values.dtype)
    for i in range(chunks):
        for j in range(4):
            partial = partial + padded[:, i, :, j]
    return butterfly_sum(partial)


def butterfly_sum(lanes: jax.Array) -> jax.Array:
    """``[T]``: the xor-butterfly sum (16, 8, 4, 2, 1) of ``lanes`` ``[T, <=32]`` (zeros beyond)."""
    lanes = jnp.pad(lanes, ((0, 0), (0, WARP - lanes.shape[1])))
    lane = np.arange(WARP)
    for delta in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[:, lane ^ delta]
    return lanes[:, 0]


def gate_scores(logits: jax.Array, scoring: str) -> jax.Array:
    """The unbiased scores u, float32 ``[T, E]``, as the kernel computes them."""
    x = logits
    if scoring == "sigmoid":
        return 1 / (1 + jnp.exp(-x))
    if scoring == "sqrtsoftplus":
        return jnp.sqrt(jnp.where(x > 20, x, jnp.log1p(jnp.exp(x))))
    ex = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return ex / lane_sums(ex)[:, None]


def duplicate_pick(tokens: jax.Array, ep_rank: int, count: jax.Array) -> jax.Array:
    """``(ep_rank + tokens * 23333) % count`` exactly, in uint32 (count in [1, 2^31))."""
    c = count.astype(jnp.uint32)
    a = tokens.astype(jnp.uint32) % c
    product = jnp.zeros_like(c)
    for bit in reversed(range(PRIME.bit_length())):  # double and add: every partial stays below 2c
        product = (product * 2) % c
        if PRIME >> bit & 1:
            product = (product + a) % c
    return ((np.uint32(ep_rank) % c + product) % c).astype(jnp.int32)


def gate_reference(
    logits, bias, image_bias, image_token_mask, mask, fix_routing_mask, to_physical_map, logical_count, unmapped_topk_idx, *,
    topk: int, shared: int, scoring: str, groups: int, topk_groups: int, version: int, routed_scaling_factor: float,
    ep_rank: int = 0, num_ep_ranks: int = 1, tp_rank: int = 0, num_tp_ranks: int = 1, with_scores: bool = False,
) -> dict[str, jax.Array]:  # fmt: skip
    """The gate in JAX, step for step as :func:`gate_kernel` (see the module docstring)."""
    t, e = logits.shape
    u = gate_scores(logits, scoring)
    b = jnp.zeros((e,), jnp.float32) if bias is None else bias
    b = jnp.broadcast_to(b, (t, e))
    if image_token_mask is not None:
        b = jnp.where(image_token_mask[:, None], image_bias, b)
    ranking = (logits if scoring == "softmax" else u) + b
    eligible = None
    if groups != topk_groups:
        best = stable_topk(group_scores(ranking.reshape(t, groups, e // groups), 2), topk_groups)
        chosen = (best[:, :, None] == jnp.arange(groups)).any(axis=1)
        eligible = jnp.repeat(chosen, e // groups, axis=1)
    idx = stable_topk(ranking, topk, eligible)
    if fix_routing_mask is not None:
        idx = jnp.where(fix_routing_mask[:, None], unmapped_topk_idx, idx)
    picked = jnp.take_along_axis(u, jnp.clip(idx, 0, e - 1), axis=1)
    if version == 1:
        total = jnp.full((t,), EPS, jnp.float32)
        for k in range(topk):
            total = total + picked[:, k]
    else:
        total = butterfly_sum(picked) + jnp.float32(EPS)
    weights = picked / total[:, None] * jnp.float32(routed_scaling_factor)
    unmapped = idx
    if shared:
        idx = jnp.concatenate([idx, jnp.broadcast_to(jnp.arange(e, e + shared, dtype=jnp.int32), (t, shared))], axis=1)
        weights = jnp.concatenate([weights, jnp.ones((t, shared), jnp.float32)], axis=1)
    if to_physical_map is not None:
        rows = jnp.clip(idx, 0, e + shared - 1)
        dup = duplicate_pick(jnp.arange(t)[:, None], ep_rank, jnp.maximum(logical_count[rows], 1))
        idx = to_physical_map[rows, jnp.minimum(dup, to_physical_map.shape[1] - 1)]
    if version == 1:
        extra = to_physical_map.shape[1] - 1 if to_physical_map is not None else 0
        per_rank = (e + extra) // num_ep_ranks
        per_dp = per_rank * num_tp_ranks
        local = idx - tp_rank * per_rank
        dp = local // per_dp
        remapped = local - dp * per_dp + dp * per_rank
        remapped = jnp.where((idx // per_rank) % num_tp_ranks != tp_rank, -1, jnp.where(remapped < 0, -1, remapped))
        idx = jnp.where(idx >= 0, remapped, idx)
    out = {}
    keep = jnp.ones((t,), bool) if mask is None else mask
    out["topk_idx"] = jnp.where(keep[:, None], idx, -1)
    out["topk_weights"] = jnp.where(keep[:, None], weights, jnp.float32(0))
    if unmapped_topk_idx is not None:
        out["unmapped_topk_idx_out"] = jnp.where(keep[:, None], unmapped, -1)
    if with_scores:
        out["scores"] = jnp.where(keep[:, None], u, jnp.float32(0))
    return out


GATE_OPERANDS = (
    "logits", "bias?", "image_bias?", "image_token_mask?", "mask?", "fix_routing_mask?", "to_physical_map?",
    "logical_count?", "unmapped_topk_idx?",
)  # fmt: skip
GATE_RESULTS = ("topk_idx", "topk_weights", "unmapped_topk_idx_out", "scores")
ROW_OPERANDS = ("logits", "image_token_mask", "mask", "fix_routing_mask", "unmapped_topk_idx")


def gate_results(*operands, with_scores: bool = False, **_) -> tuple[str, ...]:
    with_unmapped = operands[8] is not None
    return tuple(n for n in GATE_RESULTS if n != "unmapped_topk_idx_out" or with_unmapped if n != "scores" or with_scores)


def gate_rows(*operands, **static) -> Rows | None:
    """Row-wise, except with a physical map: its duplicate pick depends on the token's row number."""
    if operands[6] is not None:
        return None
    return Rows(ROW_OPERANDS, gate_results(*operands, **static))


def gate_reference_tuple(*operands, **static) -> tuple[jax.Array, ...]:
    out = gate_reference(*operands, **static)
    return tuple(out[n] for n in gate_results(*operands, **static))


def gate_launch(
    logits, bias, image_bias, image_token_mask, mask, fix_routing_mask, to_physical_map, logical_count, unmapped_topk_idx, *,
    topk, shared, scoring, groups, topk_groups, version, routed_scaling_factor, ep_rank=0, num_ep_ranks=1, tp_rank=0,
    num_tp_ranks=1, with_scores=False,
) -> Launch:  # fmt: skip
    with_unmapped = unmapped_topk_idx is not None
    extra = to_physical_map.shape[1] - 1 if to_physical_map is not None else 0
    return Launch(
        kernel=gate_kernel,
        params=dict(
            experts=logits.shape[1], topk=topk, shared=shared, scoring=scoring, groups=groups, topk_groups=topk_groups,
            version=version, has_bias=bias is not None, has_image=image_token_mask is not None, has_mask=mask is not None,
            has_fix=fix_routing_mask is not None, has_map=to_physical_map is not None, with_unmapped=with_unmapped,
            with_scores=with_scores,
        ),
        scalars=dict(
            routed_scaling_factor=float(routed_scaling_factor), ep_rank=ep_rank, num_ep_ranks=num_ep_ranks, tp_rank=tp_rank,
            num_tp_ranks=num_tp_ranks, num_extra_experts=extra,
        ),
        buffers={"unmapped_topk_idx_out": "unmapped_topk_idx_out" if with_unmapped else None, "scores": "scores" if with_scores else None},
    )  # fmt: skip


def check_gate_operands(
    name: str, logits, bias, image_bias, image_token_mask, mask, fix_routing_mask, to_physical_map, logical_count,
    unmapped_topk_idx, *, topk: int, shared: int,
) -> None:  # fmt: skip
    """ValueErrors naming ``name`` for operands of the wrong shape or dtype, and the gate's limits."""
    if logits.ndim != 2 or logits.dtype != jnp.float32:
        raise ValueError(f"{name}: logits must be float32 [T, E], got {logits.dtype} {logits.shape}")
    t, e = logits.shape
    if e == 0 or e % 4 or e > MAX_EXPERTS:
        raise ValueError(f"{name}: the number of experts E must be a positive multiple of 4 and at most {MAX_EXPERTS}, got {e}")
    if not 1 <= topk <= min(e, MAX_TOPK):
        raise ValueError(f"{name}: num_topk must be in [1, min(E, {MAX_TOPK})] = [1, {min(e, MAX_TOPK)}], got {topk}")
    if topk + shared > MAX_TOPK:
        raise ValueError(f"{name}: num_topk + num_shared_experts must be at most {MAX_TOPK} (one lane each), got {topk + shared}")
    if t > MAX_TOKENS:
        raise ValueError(f"{name}: logits may have at most {MAX_TOKENS} rows, got {t}")
    expect = {
        "bias": ((e,), jnp.float32), "image_bias": ((e,), jnp.float32), "image_token_mask": ((t,), jnp.bool_),
        "mask": ((t,), jnp.bool_), "fix_routing_mask": ((t,), jnp.bool_), "logical_count": ((e + shared,), jnp.int32),
        "unmapped_topk_idx": ((t, topk), jnp.int32),
    }  # fmt: skip
    given = dict(bias=bias, image_bias=image_bias, image_token_mask=image_token_mask, mask=mask, fix_routing_mask=fix_routing_mask,
                 logical_count=logical_count, unmapped_topk_idx=unmapped_topk_idx)  # fmt: skip
    for arg, value in given.items():
        shape, dtype = expect[arg]
        if value is not None and (value.shape != shape or value.dtype != dtype):
            raise ValueError(f"{name}: {arg} must be {jnp.dtype(dtype).name} {list(shape)}, got {value.dtype} {list(value.shape)}")
    if to_physical_map is not None:
        if to_physical_map.ndim != 2 or to_physical_map.shape[0] != e + shared or to_physical_map.shape[1] < 1 or to_physical_map.dtype != jnp.int32:
            raise ValueError(f"{name}: to_physical_map must be int32 [E + S, D] = [{e + shared}, D >= 1], got {to_physical_map.dtype} {list(to_physical_map.shape)}")
    if (to_physical_map is None) != (logical_count is None):
        raise ValueError(f"{name}: to_physical_map and logical_count must be given together")
    if fix_routing_mask is not None and unmapped_topk_idx is None:
        raise ValueError(f"{name}: fix_routing_mask needs unmapped_topk_idx (the indices it keeps)")


def gate_arrays(name: str, **arrays: Any) -> dict[str, jax.Array | None]:
    return {k: checks.as_array(name, k, v, optional=True) for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# top2_sum_gate.


def _check(*operands, topk, shared, groups, topk_groups, num_ep_ranks, num_tp_ranks, **_) -> None:
    name = "top2_sum_gate"
    check_gate_operands(name, *operands, topk=topk, shared=shared)
    logits, to_physical_map = operands[0], operands[6]
    e = logits.shape[1]
    if groups != topk_groups:
        if groups > 32:
            raise ValueError(f"{name}: num_groups must be at most 32 (one lane per group), got {groups}")
        if topk > topk_groups * (e // groups):
            raise ValueError(f"{name}: num_topk ({topk}) must be at most num_topk_groups * E / num_groups = {topk_groups * (e // groups)}")
    extra = to_physical_map.shape[1] - 1 if to_physical_map is not None else 0
    if (e + extra) // num_ep_ranks < 1:
        raise ValueError(f"{name}: num_ep_ranks ({num_ep_ranks}) must be at most E + num_extra_experts = {e + extra}")


def _reference(*operands, **static):
    return gate_reference_tuple(*operands, version=1, **static)


def _launch(*operands, **static) -> Launch:
    return gate_launch(*operands, version=1, **static)


_top2_sum_gate_op = TileOp(
    name="top2_sum_gate", launch=_launch, operands=GATE_OPERANDS, results=gate_results, reference=_reference, check=_check,
    rows=gate_rows,
)  # fmt: skip


def separated_gate_logits(rng: np.random.Generator, tokens: int, experts: int, topk: int, scoring: str, bias=None,
                          groups: int = 0, topk_groups: int = 0, gap: float = 2e-5) -> np.ndarray:  # fmt: skip
    """float32 logits ``[T, E]`` whose ranking scores (float64 estimate) leave ``gap`` between the
    K + 1 best candidates and between the group scores at the group boundary, so that rounding
    differences between the kernel and the reference cannot reorder them (as TileKernels' tests do)."""
    bias = np.zeros(experts) if bias is None else np.asarray(bias, np.float64)
    logits = rng.standard_normal((tokens, experts)).astype(np.float32)
    for _ in range(200):
        x = logits.astype(np.float64)
        if scoring == "sigmoid":
            u = 1 / (1 + np.exp(-x))
        elif scoring == "sqrtsoftplus":
            u = np.sqrt(np.logaddexp(0, x))
        else:
            u = np.exp(x - x.max(-1, keepdims=True))
            u /= u.sum(-1, keepdims=True)
        ranking = (x if scoring == "softmax" else u) + bias
        bad = np.zeros(tokens, bool)
        if groups != topk_groups:
            top = np.sort(ranking.reshape(tokens, groups, experts // groups), axis=-1)
            score = top[..., -1] + top[..., -2]
            ordered = -np.sort(-score, axis=-1)
            bad |= ordered[:, topk_groups - 1] - ordered[:, topk_groups] <= gap
            chosen = score >= ordered[:, topk_groups - 1 : topk_groups]
            ranking = np.where(np.repeat(chosen, experts // groups, axis=1), ranking, -np.inf)
        best = -np.sort(-ranking, axis=-1)[:, : topk + 1]
        bad |= ~(best[:, :-1] - best[:, 1:] > gap).all(axis=-1)
        if not bad.any():
            return logits
        logits[bad] = rng.standard_normal((int(bad.sum()), experts)).astype(np.float32)
    raise RuntimeError("could not draw logits with a stable top-k")


def _make(tokens, experts, topk, scoring, groups, topk_groups, shared, duplicates, flags):
    """``make`` of a case: separated logits and valid optional operands (see ``_case``)."""

    def make(rng, *structs):
        bias = (rng.standard_normal(experts) * 0.1).astype(np.float32)
        logits = separated_gate_logits(rng, tokens, experts, topk, scoring, bias, groups, topk_groups)
        values = dict(logits=logits, bias=bias)
        if "mask" in flags:
            values["mask"] = rng.random(tokens) < 0.8
        if "fix" in flags:
            values["fix_routing_mask"] = rng.random(tokens) < 0.3
        if "unmapped" in flags or "fix" in flags:
            values["unmapped_topk_idx"] = rng.integers(0, experts, (tokens, topk), dtype=np.int32)
        if duplicates:
            values["to_physical_map"] = rng.integers(0, experts + 32, (experts + shared, duplicates), dtype=np.int32)
            values["logical_count"] = rng.integers(1, duplicates + 1, experts + shared, dtype=np.int32)
        return tuple(values.get(n.rstrip("?")) for n in ("logits", "bias", "mask", "fix_routing_mask", "to_physical_map", "logical_count", "unmapped_topk_idx") if n in values)

    return make


def _case(name: str, tokens: int, experts: int, topk: int, scoring: str = "sigmoid", groups: int = 0, topk_groups: int = 0,
          shared: int = 0, duplicates: int = 0, flags: tuple[str, ...] = (), ep=(0, 1, 0, 1), bench: bool = False) -> ArgSpec:  # fmt: skip
    """A call ``top2_sum_gate(logits, bias, ...)`` with the optional arrays named in ``flags`` ("mask",
    "fix", "unmapped") and a physical map of ``duplicates`` columns; ep = (ep_rank, num_ep_ranks,
    tp_rank, num_tp_ranks)."""
    names = ["logits", "bias"] + [n for n, f in (("mask", "mask"), ("fix_routing_mask", "fix")) if f in flags]
    names += ["to_physical_map", "logical_count"] if duplicates else []
    names += ["unmapped_topk_idx"] if ("unmapped" in flags or "fix" in flags) else []
    shapes = dict(
        logits=((tokens, experts), jnp.float32), bias=((experts,), jnp.float32), mask=((tokens,), jnp.bool_),
        fix_routing_mask=((tokens,), jnp.bool_), to_physical_map=((experts + shared, max(duplicates, 1)), jnp.int32),
        logical_count=((experts + shared,), jnp.int32), unmapped_topk_idx=((tokens, topk), jnp.int32),
    )  # fmt: skip
    ep_rank, num_ep_ranks, tp_rank, num_tp_ranks = ep
    kwargs = dict(
        num_topk=topk, num_topk_groups=topk_groups, num_groups=groups, use_shared_as_routed=bool(shared),
        num_shared_experts=shared, routed_scaling_factor=1.5, ep_rank=ep_rank, num_ep_ranks=num_ep_ranks, tp_rank=tp_rank,
        num_tp_ranks=num_tp_ranks, scoring_func=scoring,
    )  # fmt: skip
    return GateSpec(
        name, tuple(jax.ShapeDtypeStruct(*shapes[n]) for n in names), kwargs,
        make=_make(tokens, experts, topk, scoring, groups, topk_groups, shared, duplicates, flags), tolerance=1e-5,
        bench=bench, names=tuple(names),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GateSpec(ArgSpec):
    """A gate case: the arrays after the first ``positional`` are passed by keyword, named by ``names``."""

    names: tuple[str, ...] = ()
    positional: int = 2

    def call(self, fn: Callable[..., Any], impl: Any = None) -> Callable[..., Any]:
        fn = fn.with_config(**self.config) if self.config else fn
        kwargs, names, p = dict(self.kwargs), self.names, self.positional
        return lambda *arrays: fn(*arrays[:p], impl=impl, **dict(zip(names[p:], arrays[p:])), **kwargs)


ARG_SPECS = (
    _case("t1_e8_k1_sigmoid", 1, 8, 1),
    _case("t4001_e72_k6_sqrtsoftplus_mask", 4001, 72, 6, "sqrtsoftplus", flags=("mask",)),
    _case("t136_e256_k8_g8_top4_sigmoid_fix", 136, 256, 8, "sigmoid", 8, 4, flags=("mask", "fix")),
    _case("t37_e256_k8_g8_top4_softmax_shared_map_tp", 37, 256, 8, "softmax", 8, 4, shared=2, duplicates=33, flags=("unmapped",), ep=(1, 4, 1, 2)),
    _case("t0_e256_k8_g8_top4_sigmoid", 0, 256, 8, "sigmoid", 8, 4),
    _case("t64_e384_k8_g16_top4_sqrtsoftplus", 64, 384, 8, "sqrtsoftplus", 16, 4),
    *(_case(f"bench_t{t}_e256_k8_g8_top4", t, 256, 8, "sigmoid", 8, 4, bench=True) for t in (4096, 16384, 65536)),
)


@uses(_top2_sum_gate_op, cases=ARG_SPECS)
def top2_sum_gate(
    logits: jax.Array,
    bias: jax.Array,
    num_topk: int,
    num_topk_groups: int,
    num_groups: int,
    use_shared_as_routed: bool,
    num_shared_experts: int,
    routed_scaling_factor: float,
    ep_rank: int,
    num_ep_ranks: int,
    tp_rank: int,
    num_tp_ranks: int,
    scoring_func: str,
    mask: jax.Array | None = None,
    fix_routing_mask: jax.Array | None = None,
    to_physical_map: jax.Array | None = None,
    logical_count: jax.Array | None = None,
    unmapped_topk_idx: jax.Array | None = None,
    *,
    impl=None,
    ops,
) -> tuple[jax.Array, ...]:
    """TileKernels v1 ``top2_sum_gate``, functional (module docstring: the exact order of operations).

    Args:
      logits: float32 ``[T, E]``, E % 4 == 0, E <= 1024, finite.
      bias: float32 ``[E]``, added to the scores for ranking only.
      num_topk: K, 1 <= K <= min(E, 32).
      num_topk_groups, num_groups: both 0 (no groups) or 1 <= G' <= G <= 32 with E % G == 0; when
        G' < G only the experts of the G' groups with the largest top1 + top2 ranking score compete.
      use_shared_as_routed, num_shared_experts: S = num_shared_experts (1 or 2) shared-expert slots
        when True (K % S == 0, E % (K / S) == 0, and a physical map with at least S extra columns), else 0.
      routed_scaling_factor: multiplies the routed weights.
      ep_rank, num_ep_ranks, tp_rank, num_tp_ranks: the duplicate pick and EP/TP masking.
      scoring_func: "sigmoid", "sqrtsoftplus" or "softmax".
      mask: bool ``[T]``, False: the token is not routed (indices -1, weights 0, unmapped -1).
      fix_routing_mask: bool ``[T]``, True: take the token's experts from ``unmapped_topk_idx``.
      to_physical_map, logical_count: int32 ``[E + S, D]`` and ``[E + S]``, together.
      unmapped_topk_idx: int32 ``[T, K]``; given, its updated value is returned (TileKernels updates it in place).
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``(topk_idx, topk_weights)``, int32 and float32 ``[T, K + S]``, then ``unmapped_topk_idx`` (int32
      ``[T, K]``, the logical routed experts) when it was given.
    """
    name = "top2_sum_gate"
    a = gate_arrays(name, logits=logits, bias=bias, mask=mask, fix_routing_mask=fix_routing_mask, to_physical_map=to_physical_map,
                    logical_count=logical_count, unmapped_topk_idx=unmapped_topk_idx)  # fmt: skip
    if a["bias"] is None:
        raise TypeError(f"{name}: bias is required")
    ints = {k: checks.static_int(name, k, v) for k, v in dict(
        num_topk=num_topk, num_topk_groups=num_topk_groups, num_groups=num_groups, num_shared_experts=num_shared_experts,
        ep_rank=ep_rank, num_ep_ranks=num_ep_ranks, tp_rank=tp_rank, num_tp_ranks=num_tp_ranks).items()}  # fmt: skip
    use_shared = checks.static_bool(name, "use_shared_as_routed", use_shared_as_routed)
    scale = checks.static_number(name, "routed_scaling_factor", routed_scaling_factor, optional=False)
    if scoring_func not in SCORINGS:
        raise ValueError(f"{name}: scoring_func must be one of {SCORINGS}, got {scoring_func!r}")
    e = a["logits"].shape[-1] if a["logits"].ndim == 2 else 0
    k, g, tg = ints["num_topk"], ints["num_groups"], ints["num_topk_groups"]
    if (g == 0) != (tg == 0) or tg > g or g < 0 or tg < 0:
        raise ValueError(f"{name}: num_groups and num_topk_groups must be both 0, or 1 <= num_topk_groups <= num_groups; got {g}, {tg}")
    if g and e % g:
        raise ValueError(f"{name}: num_groups ({g}) must divide the number of experts {e}")
    shared = ints["num_shared_experts"] if use_shared else 0
    if use_shared:
        extra = a["to_physical_map"].shape[-1] - 1 if a["to_physical_map"] is not None else 0
        if shared not in (1, 2) or k % shared or e % (k // shared) or shared > extra:
            raise ValueError(
                f"{name}: use_shared_as_routed needs num_shared_experts in (1, 2) dividing num_topk ({k}), E % (num_topk / "
                f"num_shared_experts) == 0 and a to_physical_map with at least num_shared_experts extra columns; got "
                f"num_shared_experts={shared}, E={e}, {extra} extra columns"
            )
    if ints["num_ep_ranks"] < 1 or ints["num_tp_ranks"] < 1 or not 0 <= ints["tp_rank"] < ints["num_tp_ranks"] or ints["ep_rank"] < 0:
        raise ValueError(f"{name}: need num_ep_ranks >= 1, num_tp_ranks >= 1, 0 <= tp_rank < num_tp_ranks and ep_rank >= 0, got {ints}")
    outs = ops[0](
        a["logits"], a["bias"], None, None, a["mask"], a["fix_routing_mask"], a["to_physical_map"], a["logical_count"],
        a["unmapped_topk_idx"], impl=impl, topk=k, shared=shared, scoring=scoring_func, groups=g if g != tg else 0,
        topk_groups=tg if g != tg else 0, routed_scaling_factor=scale, ep_rank=ints["ep_rank"], num_ep_ranks=ints["num_ep_ranks"],
        tp_rank=ints["tp_rank"], num_tp_ranks=ints["num_tp_ranks"],
    )  # fmt: skip
    return tuple(outs)


__all__: Any = ["top2_sum_gate"]
