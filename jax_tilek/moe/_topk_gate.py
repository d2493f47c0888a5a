"""topk_gate and topk_sum_and_topk_group_idx (TileKernels v1 §1.1-1.2, v2.1 §2.2), and the pieces the
gating ops share: the descending-order key (kernels and references), the stable top-k reference, and
the warp-wide arg-max of the kernels.

Ordering rule of every gating op: descending value, ties to the smaller index (TileKernels'
``stable_topk``, a stable descending sort). -0.0 and +0.0 tie. Inputs are expected finite (TileKernels
v2.1 asserts it on the device); NaNs are ordered as the float total order does, +NaN above +inf and
-NaN below -inf, in kernels and references alike (TileKernels leaves them undefined).

Indices are int32 (TileKernels: int64; JAX runs without 64-bit types by default).

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure, so they must be evaluated when the kernel is built.)
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, View, uses
from jax_tilek.testing import ArgSpec

WARP = 32
TOKENS_PER_CTA = 4  # one warp per token
MAX_TOPK = 32  # one lane per selected expert
MAX_EXPERTS = 1024  # the row lives in registers: 32 keys per lane at most
MAX_GROUPS = 32  # one lane per group
MAX_TOKENS = 2**31 - 2**10


# ---------------------------------------------------------------------------------------------
# Shared by the gating ops: references.


def desc_key(x: jax.Array) -> jax.Array:
    """uint32 keys whose unsigned order is the order of float32 ``x`` (-0.0 taken as +0.0)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32)), jnp.uint32)
    return jnp.where(bits >= np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def stable_topk(values: jax.Array, k: int, eligible: jax.Array | None = None) -> jax.Array:
    """int32 ``[..., k]``: the indices of the k largest of ``values`` along the last axis, in descending
    order, ties to the smaller index; entries where ``eligible`` is False come after all others."""
    iota = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    keys = [~desc_key(values), iota]
    if eligible is not None:
        keys.insert(0, (~eligible).astype(jnp.int32))
    return jax.lax.sort(tuple(keys), dimension=values.ndim - 1, num_keys=len(keys))[-1][..., :k]


def group_scores(scores: jax.Array, num_topk_sum: int) -> jax.Array:
    """``[..., G]``: the sum of the ``num_topk_sum`` (1 or 2) largest scores of each group ``[..., G, M]``
    (top1 + top2 in float32, as TileKernels adds them)."""
    top = jax.lax.top_k(scores, num_topk_sum)[0]
    return top[..., 0] if num_topk_sum == 1 else top[..., 0] + top[..., 1]


# ---------------------------------------------------------------------------------------------
# Shared by the gating ops: TIR helpers (build expressions while a prim_func is parsed).


def tir_desc_key(value, index):
    """The uint64 selection key of (float32 ``value``, int32 ``index``): the ordered bits of the value
    (:func:`desc_key`) above the complement of the index, so the largest key is the largest value with
    the smallest index. Every key is > 0; 0 marks a taken or excluded slot. ``value`` should be a
    register (it is read several times)."""
    import tilelang.language as T

    bits = T.reinterpret(value, "uint32")
    negative = T.if_then_else(bits == T.uint32(0x80000000), T.uint32(0x80000000), bits ^ T.uint32(0xFFFFFFFF))
    ordered = T.if_then_else(bits >= T.uint32(0x80000000), negative, bits | T.uint32(0x80000000))
    low = T.uint32(0xFFFFFFFF) - T.Cast("uint32", index)
    return (T.Cast("uint64", ordered) << T.uint64(32)) | T.Cast("uint64", low)


def tir_key_index(key):
    """The int32 index a :func:`tir_desc_key` key carries."""
    import tilelang.language as T

    return T.Cast("int32", T.uint32(0xFFFFFFFF) - T.Cast("uint32", key & T.uint64(0xFFFFFFFF)))


@functools.cache
def macros() -> dict[str, Any]:
    """TileLang macros shared by the gating kernels (built on first use: TileLang is optional)."""
    import tilelang.language as T

    @T.macro
    def select_topk(keys, slots: int, num_topk: int, lane):
        """K rounds of a warp-wide arg-max over the lanes' ``keys[slots]`` (uint64, 0 = not a
        candidate): each round takes the largest key (the lane's maximum, then a 5-step xor butterfly)
        and clears it in its owner's slot. Returns the k-th winner's index on lane k (-1 on lanes >= K)."""
        best = T.alloc_var("uint64")
        mine = T.alloc_var("int32")
        mine = -1
        for k in (T.unroll if num_topk <= 8 else T.serial)(num_topk):
            best = T.uint64(0)
            for j in T.unroll(slots):
                best = T.max(best, keys[j])
            for s in T.unroll(5):
                best = T.max(best, T.shfl_xor(best, 16 >> s))
            for j in T.unroll(slots):
                if keys[j] == best:
                    keys[j] = T.uint64(0)
            if lane == k:
                mine = tir_key_index(best)
        return mine

    @T.macro
    def group_score(buf, row, lane, num_groups: int, group_size: int, num_topk_sum: int):
        """top1 (+ top2, in float32) of group ``lane`` of ``buf[row, :]``, scanned from a lane-rotated
        start (which cannot change top1/top2); -inf on lanes >= G."""
        top1 = T.alloc_var("float32")
        top2 = T.alloc_var("float32")
        v = T.alloc_var("float32")
        top1 = -T.infinity("float32")
        top2 = -T.infinity("float32")
        if lane < num_groups:
            for j in (T.unroll if group_size <= 32 else T.serial)(group_size):
                v = buf[row, lane * group_size + (j + lane) % group_size]
                if v > top1:
                    top2 = top1
                    top1 = v
                elif v > top2:
                    top2 = v
        return top1 if num_topk_sum == 1 else T.ieee_add(top1, top2)

    @T.macro
    def group_rank(score, lane, num_groups: int):
        """The number of groups g with score_g > score, or score_g == score and g < lane."""
        other = T.alloc_var("float32")
        rank = T.alloc_var("int32")
        rank = 0
        for g in T.unroll(num_groups):
            other = T.shfl_sync(score, g)
            if other > score or (other == score and g < lane):
                rank = rank + 1
        return rank

    return dict(select_topk=select_topk, group_score=group_score, group_rank=group_rank)


# ---------------------------------------------------------------------------------------------
# topk_gate.


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def topk_gate_kernel(num_experts: int, num_topk: int):
    """One warp per token, four tokens per CTA. Lane l holds experts l, l + 32, ... (coalesced loads) as
    uint64 keys (:func:`tir_desc_key`); K rounds of the ``select_topk`` macro; lanes < K store."""
    import tilelang.language as T

    select_topk = macros()["select_topk"]
    N = T.dynamic("N")
    slots = -(-num_experts // WARP)

    @T.prim_func
    def topk_gate(scores: T.Tensor((N, num_experts), "float32"), topk_idx: T.Tensor((N, num_topk), "int32")):
        with T.Kernel(T.ceildiv(N, TOKENS_PER_CTA), threads=WARP * TOKENS_PER_CTA) as b:
            tid = T.get_thread_binding(0)
            lane = tid % WARP
            token = b * TOKENS_PER_CTA + tid // WARP
            src = T.min(token, N - 1)
            values = T.alloc_local((slots,), "float32")
            keys = T.alloc_local((slots,), "uint64")
            for j in device.static_range(slots):
                e = j * WARP + lane
                if (j + 1) * WARP <= num_experts:
                    values[j] = scores[src, e]
                    keys[j] = tir_desc_key(values[j], e)
                else:
                    values[j] = scores[src, T.min(e, num_experts - 1)]
                    keys[j] = T.if_then_else(e < num_experts, tir_desc_key(values[j], e), T.uint64(0))
            mine = select_topk(keys, slots, num_topk, lane)
            if token < N and lane < num_topk:
                topk_idx[token, lane] = mine

    return topk_gate


def topk_gate_reference(scores: jax.Array, *, num_topk: int) -> jax.Array:
    """int32 ``[T, K]``: TileKernels' ``stable_topk(scores, K)`` (stable descending sort, first K)."""
    return stable_topk(scores, num_topk)


def _check_topk_gate(scores, *, num_topk: int) -> None:
    name = "topk_gate"
    if scores.ndim != 2 or scores.dtype != jnp.float32:
        raise ValueError(f"{name}: scores must be float32 [T, E], got {scores.dtype} {scores.shape}")
    t, e = scores.shape
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"{name}: the number of experts E must be in [1, {MAX_EXPERTS}], got {e}")
    if not 1 <= num_topk <= min(e, MAX_TOPK):
        raise ValueError(f"{name}: num_topk must be in [1, min(E, {MAX_TOPK})] = [1, {min(e, MAX_TOPK)}], got {num_topk}")
    if t > MAX_TOKENS:
        raise ValueError(f"{name}: scores may have at most {MAX_TOKENS} rows, got {t}")


def _launch_topk_gate(scores, *, num_topk: int) -> Launch:
    return Launch(kernel=topk_gate_kernel, params=dict(num_experts=scores.shape[1], num_topk=num_topk))


_topk_gate_op = TileOp(
    name="topk_gate", launch=_launch_topk_gate, operands=("scores",), results=("topk_idx",),
    reference=topk_gate_reference, check=_check_topk_gate, rows=Rows(("scores",), ("topk_idx",)),
)  # fmt: skip


def _scores_case(name: str, tokens: int, experts: int, topk: int, **options) -> ArgSpec:
    return ArgSpec(name, (jax.ShapeDtypeStruct((tokens, experts), jnp.float32), topk), **options)


# Kernel configurations (E, K): (8, 1), (72, 6), (256, 8), (384, 8); 1 token, odd counts, 0 tokens.
TOPK_GATE_SPECS = (
    _scores_case("t1_e8_k1", 1, 8, 1),
    _scores_case("t4001_e72_k6", 4001, 72, 6),
    _scores_case("t136_e256_k8", 136, 256, 8),
    _scores_case("t0_e256_k8", 0, 256, 8),
    _scores_case("t37_e384_k8", 37, 384, 8),
    *(_scores_case(f"bench_t{t}_e256_k8", t, 256, 8, bench=True) for t in (4096, 16384, 65536)),
)


@uses(_topk_gate_op, cases=TOPK_GATE_SPECS)
def topk_gate(scores: jax.Array, num_topk: int, *, impl=None, ops) -> jax.Array:
    """The ``num_topk`` largest scores of each token (TileKernels ``topk_gate``).

    Args:
      scores: float32 ``[T, E]``, E <= 1024, finite (see the module docstring for NaNs).
      num_topk: K, 1 <= K <= min(E, 32).
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      int32 ``[T, K]``: expert indices in descending score order, ties to the smaller index
      (= ``torch.sort(scores, descending=True, stable=True)[1][:, :K]``).
    """
    name = "topk_gate"
    scores = checks.as_array(name, "scores", scores)
    num_topk = checks.static_int(name, "num_topk", num_topk)
    return ops[0](scores, impl=impl, num_topk=num_topk)


# ---------------------------------------------------------------------------------------------
# topk_sum_and_topk_group_idx.


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def topk_group_idx_kernel(num_groups: int, group_size: int, num_topk_groups: int, num_topk_sum: int):
    """One warp per token, four tokens per CTA. Lane g < G scans its group (starting at a lane-rotated
    offset, which cannot change top1/top2) for top1/top2; its score is top1 (+ top2). Its rank is the
    number of groups with a larger score, or an equal score and a smaller index (scores broadcast by
    shuffles); a lane ranked below ``num_topk_groups`` stores its group id at its rank."""
    import tilelang.language as T

    group_score, group_rank = macros()["group_score"], macros()["group_rank"]
    N = T.dynamic("N")
    E = num_groups * group_size
    f32 = "float32"

    @T.prim_func
    def topk_group_idx(scores: T.Tensor((N, E), f32), topk_group_idx: T.Tensor((N, num_topk_groups), "int32")):
        with T.Kernel(T.ceildiv(N, TOKENS_PER_CTA), threads=WARP * TOKENS_PER_CTA) as b:
            tid = T.get_thread_binding(0)
            lane = tid % WARP
            token = b * TOKENS_PER_CTA + tid // WARP
            src = T.min(token, N - 1)
            score = T.alloc_var(f32)
            rank = T.alloc_var("int32")
            score = group_score(scores, src, lane, num_groups, group_size, num_topk_sum)
            rank = group_rank(score, lane, num_groups)
            if token < N and lane < num_groups and rank < num_topk_groups:
                topk_group_idx[token, rank] = lane

    return topk_group_idx


def topk_group_idx_reference(scores: jax.Array, *, num_topk_sum: int, num_topk_groups: int) -> jax.Array:
    """int32 ``[T, num_topk_groups]``: TileKernels' reference, ``stable_topk(topk(scores, S).sum(-1), G')``."""
    return stable_topk(group_scores(scores, num_topk_sum), num_topk_groups)


def _check_group_idx(scores, *, num_topk_sum: int, num_topk_groups: int) -> None:
    name = "topk_sum_and_topk_group_idx"
    if scores.ndim != 3 or scores.dtype != jnp.float32:
        raise ValueError(f"{name}: scores must be float32 [T, G, E/G], got {scores.dtype} {scores.shape}")
    t, g, m = scores.shape
    if not 1 <= g <= MAX_GROUPS:
        raise ValueError(f"{name}: the number of groups G must be in [1, {MAX_GROUPS}] (one lane per group), got {g}")
    if not 1 <= g * m <= MAX_EXPERTS * 4:
        raise ValueError(f"{name}: the number of experts G * E/G must be in [1, {MAX_EXPERTS * 4}], got {g * m}")
    if num_topk_sum not in (1, 2) or num_topk_sum > m:
        raise ValueError(f"{name}: num_topk_sum must be 1 or 2 and at most the group size {m}, got {num_topk_sum}")
    if not 1 <= num_topk_groups <= g:
        raise ValueError(f"{name}: num_topk_groups must be in [1, G] = [1, {g}], got {num_topk_groups}")
    if t > MAX_TOKENS:
        raise ValueError(f"{name}: scores may have at most {MAX_TOKENS} rows, got {t}")


def _launch_group_idx(scores, *, num_topk_sum: int, num_topk_groups: int) -> Launch:
    t, g, m = scores.shape
    return Launch(
        kernel=topk_group_idx_kernel,
        params=dict(num_groups=g, group_size=m, num_topk_groups=num_topk_groups, num_topk_sum=num_topk_sum),
        views={"scores": View((t, g * m))},
    )


_group_idx_op = TileOp(
    name="topk_sum_and_topk_group_idx", launch=_launch_group_idx, operands=("scores",), results=("topk_group_idx",),
    reference=topk_group_idx_reference, check=_check_group_idx, rows=Rows(("scores",), ("topk_group_idx",)),
)  # fmt: skip


def _group_case(name: str, tokens: int, groups: int, size: int, topk_sum: int, topk_groups: int, **options) -> ArgSpec:
    return ArgSpec(name, (jax.ShapeDtypeStruct((tokens, groups, size), jnp.float32), topk_sum, topk_groups), **options)


# Kernel configurations (G, E/G, G', S): (1, 8, 1, 1), (4, 18, 2, 2), (8, 32, 4, 2), (16, 24, 4, 1).
GROUP_SPECS = (
    _group_case("t1_g1x8_s1_top1", 1, 1, 8, 1, 1),
    _group_case("t4001_g4x18_s2_top2", 4001, 4, 18, 2, 2),
    _group_case("t136_g8x32_s2_top4", 136, 8, 32, 2, 4),
    _group_case("t0_g8x32_s2_top4", 0, 8, 32, 2, 4),
    _group_case("t37_g16x24_s1_top4", 37, 16, 24, 1, 4),
    *(_group_case(f"bench_t{t}_g8x32_s2_top4", t, 8, 32, 2, 4, bench=True) for t in (4096, 16384, 65536)),
)


@uses(_group_idx_op, cases=GROUP_SPECS)
def topk_sum_and_topk_group_idx(scores: jax.Array, num_topk_sum: int, num_topk_groups: int, *, impl=None, ops) -> jax.Array:
    """The best expert groups of each token by the sum of their top scores (TileKernels
    ``topk_sum_and_topk_group_idx``).

    Args:
      scores: float32 ``[T, G, E/G]``, G <= 32, finite.
      num_topk_sum: S, 1 or 2 (<= E/G): a group's score is the sum of its S largest scores, in float32.
      num_topk_groups: G', 1 <= G' <= G.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      int32 ``[T, G']``: group ids in descending group-score order, ties to the smaller id.
    """
    name = "topk_sum_and_topk_group_idx"
    scores = checks.as_array(name, "scores", scores)
    num_topk_sum = checks.static_int(name, "num_topk_sum", num_topk_sum)
    num_topk_groups = checks.static_int(name, "num_topk_groups", num_topk_groups)
    return ops[0](scores, impl=impl, num_topk_sum=num_topk_sum, num_topk_groups=num_topk_groups)


__all__: Any = ["topk_gate", "topk_sum_and_topk_group_idx"]
