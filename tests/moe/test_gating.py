"""MoE gating: topk_gate, topk_sum_and_topk_group_idx, top2_sum_gate (TileKernels v1) and the v2.1 gate
(moe_topk_gate, its backward, topk_gate_weights): references against independent numpy math on fresh
random inputs and on ties, argument rules, and the op contract (lowering, vmap, sharding, export, GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tilek.moe._moe_topk_gate import moe_topk_gate, moe_topk_gate_backward, topk_gate_weights
from jax_tilek.moe._top2_sum_gate import separated_gate_logits, top2_sum_gate
from jax_tilek.moe._topk_gate import topk_gate, topk_sum_and_topk_group_idx
from jax_tilek.testing import OpContract, assert_bytes_equal, jit_call

F32 = jnp.float32


def _mapped(case) -> bool:
    return "to_physical_map" in getattr(case, "names", ())


# ---------------------------------------------------------------------------------------------
# The contract.


class TestTopkGate(OpContract):
    fn = topk_gate
    rows = True
    bad_inputs = [
        ((jax.ShapeDtypeStruct((4, 8), F32),), dict(num_topk=9), ValueError, r"^topk_gate: num_topk must be in \[1, min\(E, 32\)\]"),
        ((jax.ShapeDtypeStruct((4, 64), F32),), dict(num_topk=33), ValueError, r"^topk_gate: num_topk"),
        ((jax.ShapeDtypeStruct((4, 8), jnp.bfloat16),), dict(num_topk=2), ValueError, r"^topk_gate: scores must be float32 \[T, E\]"),
        ((jax.ShapeDtypeStruct((4, 2048), F32),), dict(num_topk=2), ValueError, r"^topk_gate: the number of experts E must be in \[1, 1024\]"),
        ((jax.ShapeDtypeStruct((4, 8), F32),), dict(num_topk=2.0), TypeError, r"^topk_gate: num_topk must be an integer"),
    ]


class TestTopkSumAndTopkGroupIdx(OpContract):
    fn = topk_sum_and_topk_group_idx
    rows = True
    bad_inputs = [
        ((jax.ShapeDtypeStruct((4, 8, 4), F32),), dict(num_topk_sum=3, num_topk_groups=2), ValueError, r"^topk_sum_and_topk_group_idx: num_topk_sum must be 1 or 2"),
        ((jax.ShapeDtypeStruct((4, 8, 1), F32),), dict(num_topk_sum=2, num_topk_groups=2), ValueError, r"num_topk_sum must be 1 or 2 and at most the group size 1"),
        ((jax.ShapeDtypeStruct((4, 8, 4), F32),), dict(num_topk_sum=2, num_topk_groups=9), ValueError, r"num_topk_groups must be in \[1, G\]"),
        ((jax.ShapeDtypeStruct((4, 33, 4), F32),), dict(num_topk_sum=2, num_topk_groups=2), ValueError, r"number of groups G must be in \[1, 32\]"),
        ((jax.ShapeDtypeStruct((4, 32), F32),), dict(num_topk_sum=2, num_topk_groups=2), ValueError, r"scores must be float32 \[T, G, E/G\]"),
    ]


_V1 = dict(num_topk=8, num_topk_groups=4, num_groups=8, use_shared_as_routed=False, num_shared_experts=0, routed_scaling_factor=1.0,
           ep_rank=0, num_ep_ranks=1, tp_rank=0, num_tp_ranks=1, scoring_func="sigmoid")  # fmt: skip
_LOGITS = jax.ShapeDtypeStruct((4, 256), F32)
_BIAS = jax.ShapeDtypeStruct((256,), F32)


class TestTop2SumGate(OpContract):
    fn = top2_sum_gate
    cases = [c for c in top2_sum_gate.cases if not _mapped(c)]
    rows = True
    bad_inputs = [
        ((jax.ShapeDtypeStruct((4, 30), F32), jax.ShapeDtypeStruct((30,), F32)), dict(_V1, num_topk=2, num_groups=0, num_topk_groups=0),
         ValueError, r"^top2_sum_gate: the number of experts E must be a positive multiple of 4"),
        ((_LOGITS, _BIAS), dict(_V1, num_topk=33), ValueError, r"^top2_sum_gate: num_topk must be in \[1, min\(E, 32\)\]"),
        ((_LOGITS, _BIAS), dict(_V1, num_groups=6), ValueError, r"^top2_sum_gate: num_groups \(6\) must divide the number of experts 256"),
        ((_LOGITS, _BIAS), dict(_V1, num_groups=0), ValueError, r"num_groups and num_topk_groups must be both 0"),
        ((_LOGITS, _BIAS), dict(_V1, num_groups=64, num_topk_groups=4), ValueError, r"num_groups must be at most 32"),
        ((_LOGITS, _BIAS), dict(_V1, num_topk=20, num_groups=16, num_topk_groups=1), ValueError, r"num_topk \(20\) must be at most num_topk_groups"),
        ((_LOGITS, _BIAS), dict(_V1, scoring_func="identity"), ValueError, r"scoring_func must be one of"),
        ((_LOGITS, _BIAS), dict(_V1, use_shared_as_routed=True, num_shared_experts=1), ValueError, r"use_shared_as_routed needs"),
        ((_LOGITS, jax.ShapeDtypeStruct((255,), F32)), _V1, ValueError, r"^top2_sum_gate: bias must be float32 \[256\]"),
        ((_LOGITS, _BIAS), dict(_V1, tp_rank=1), ValueError, r"0 <= tp_rank < num_tp_ranks"),
    ]


class TestTop2SumGateMapped(OpContract):
    """With a physical map the duplicate pick depends on the token's row: not row-wise."""

    fn = top2_sum_gate
    cases = [c for c in top2_sum_gate.cases if _mapped(c)]


class TestMoeTopkGate(OpContract):
    fn = moe_topk_gate
    cases = [c for c in moe_topk_gate.cases if not _mapped(c)]
    rows = True
    bad_inputs = [
        ((jax.ShapeDtypeStruct((4, 30), F32),), dict(num_topk=2, use_shared_as_routed=False, num_shared_experts=0, routed_scaling_factor=1.0, ep_rank=0), ValueError, r"^moe_topk_gate: the number of experts E must be a positive multiple of 4"),
        ((_LOGITS,), dict(num_topk=33, use_shared_as_routed=False, num_shared_experts=0, routed_scaling_factor=1.0, ep_rank=0), ValueError, r"^moe_topk_gate: num_topk must be in \[1, min\(E, 32\)\]"),
        ((_LOGITS,), dict(num_topk=31, use_shared_as_routed=True, num_shared_experts=2, routed_scaling_factor=1.0, ep_rank=0), ValueError, r"num_topk \+ num_shared_experts must be at most 32"),
        ((_LOGITS,), dict(num_topk=8, use_shared_as_routed=True, num_shared_experts=3, routed_scaling_factor=1.0, ep_rank=0), ValueError, r"num_shared_experts must be 1 or 2"),
        ((_LOGITS,), dict(num_topk=8, use_shared_as_routed=False, num_shared_experts=0, routed_scaling_factor=1.0, ep_rank=0, scoring_func="sigmoid"), ValueError, r"scoring_func must be 'sqrtsoftplus'"),
        ((_LOGITS,), dict(num_topk=8, use_shared_as_routed=False, num_shared_experts=0, routed_scaling_factor=1.0, ep_rank=0, force_random=jax.ShapeDtypeStruct((4,), jnp.bool_)), ValueError, r"force_random and force_random_key must be given together"),
        ((_LOGITS,), dict(num_topk=8, use_shared_as_routed=False, num_shared_experts=0, routed_scaling_factor=1.0, ep_rank=0, force_random=jax.ShapeDtypeStruct((4,), jnp.int32), force_random_key=jax.ShapeDtypeStruct((2,), jnp.uint32)), ValueError, r"force_random must be bool \[T=4\]"),
        ((_LOGITS,), dict(num_topk=8, use_shared_as_routed=False, num_shared_experts=0, routed_scaling_factor=1.0, ep_rank=-1), ValueError, r"ep_rank must be >= 0"),
    ]


class TestMoeTopkGateMapped(OpContract):
    fn = moe_topk_gate
    cases = [c for c in moe_topk_gate.cases if _mapped(c)]


def _aux(case) -> bool:
    return "grad_scores_sum" in case.names


_IDX = jax.ShapeDtypeStruct((4, 8), jnp.int32)
_W = jax.ShapeDtypeStruct((4, 8), F32)


class TestMoeTopkGateBackward(OpContract):
    fn = moe_topk_gate_backward
    cases = [c for c in moe_topk_gate_backward.cases if not _aux(c)]
    rows = True
    bad_inputs = [
        ((_LOGITS, jax.ShapeDtypeStruct((4, 8), jnp.float32), _W, _W), dict(routed_scaling_factor=1.0), ValueError, r"topk_idx must be int32 \[T, K\]"),
        ((_LOGITS, _IDX, jax.ShapeDtypeStruct((4, 7), F32), _W), dict(routed_scaling_factor=1.0), ValueError, r"topk_weights must be float32 \[4, 8\]"),
    ]


class TestMoeTopkGateBackwardAux(OpContract):
    """The aux term's sequence of a token depends on its row: not row-wise."""

    fn = moe_topk_gate_backward
    cases = [c for c in moe_topk_gate_backward.cases if _aux(c)]


class TestTopkGateWeights(OpContract):
    fn = topk_gate_weights
    rows = True
    differentiable = (0,)
    bad_inputs = [((jax.ShapeDtypeStruct((4, 30), F32),), dict(num_topk=2), ValueError, r"^topk_gate_weights: the number of experts E must be a positive multiple of 4")]


# ---------------------------------------------------------------------------------------------
# References against numpy.


def np_stable_topk(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, axis=-1, kind="stable")[..., :k].astype(np.int32)


def _ties(rng, shape):
    """Few distinct values (many ties), with -0.0 and +0.0 both present."""
    x = rng.integers(-3, 4, shape).astype(np.float32)
    x[x == 0] = np.where(rng.random(int((x == 0).sum())) < 0.5, np.float32(-0.0), np.float32(0.0))
    return x


@pytest.mark.parametrize("experts,topk", [(8, 1), (72, 6), (256, 8), (384, 32), (32, 32)])
def test_topk_gate_reference_matches_numpy(rng, experts, topk):
    for x in (rng.standard_normal((57, experts)).astype(np.float32), _ties(rng, (57, experts))):
        assert_bytes_equal(topk_gate(x, topk, impl="xla"), np_stable_topk(x, topk))
        assert_bytes_equal(jax.jit(lambda s: topk_gate(s, topk))(x), np_stable_topk(x, topk))


def np_group_idx(x: np.ndarray, num_topk_sum: int, num_topk_groups: int) -> np.ndarray:
    top = np.sort(x, axis=-1)
    score = top[..., -1] if num_topk_sum == 1 else top[..., -1] + top[..., -2]  # float32 adds, as TileKernels
    return np_stable_topk(score, num_topk_groups)


@pytest.mark.parametrize("groups,size,topk_sum,topk_groups", [(1, 8, 1, 1), (4, 18, 2, 2), (8, 32, 2, 4), (12, 6, 2, 4), (16, 24, 1, 16)])
def test_group_idx_reference_matches_numpy(rng, groups, size, topk_sum, topk_groups):
    for x in (rng.standard_normal((57, groups, size)).astype(np.float32), _ties(rng, (57, groups, size))):
        got = topk_sum_and_topk_group_idx(x, topk_sum, topk_groups, impl="xla")
        assert_bytes_equal(got, np_group_idx(x, topk_sum, topk_groups))


def np_scores(x: np.ndarray, scoring: str) -> np.ndarray:
    x = x.astype(np.float64)
    if scoring == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if scoring == "sqrtsoftplus":
        return np.sqrt(np.logaddexp(0, x))
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_gate(logits, bias, topk, scoring="sigmoid", groups=0, topk_groups=0, shared=0, scale=1.0, mask=None, fix=None, unmapped=None,
            pmap=None, count=None, ep=(0, 1, 0, 1), version=1):  # fmt: skip
    """TileKernels' torch reference of top2_sum_gate (v1) / moe_topk_gate_forward (v2), in numpy (float64 scores)."""
    t, e = logits.shape
    u = np_scores(logits, scoring)
    bias = np.zeros((t, e)) if bias is None else np.broadcast_to(bias, (t, e))
    ranking = (logits.astype(np.float64) if scoring == "softmax" else u) + bias
    if groups != topk_groups:
        top = np.sort(ranking.reshape(t, groups, -1), axis=-1)
        best = np_stable_topk(top[..., -1] + top[..., -2], topk_groups)
        chosen = np.zeros((t, groups), bool)
        np.put_along_axis(chosen, best, True, axis=1)
        ranking = np.where(np.repeat(chosen, e // groups, axis=1), ranking, -np.inf)
    idx = np_stable_topk(ranking, topk)
    if fix is not None:
        idx = np.where(fix[:, None], unmapped, idx)
    picked = np.take_along_axis(u, idx, axis=1)
    weights = picked / (picked.sum(-1, keepdims=True) + 1e-20) * scale
    routed = idx.copy()
    idx = np.concatenate([idx, np.broadcast_to(np.arange(e, e + shared), (t, shared))], axis=1).astype(np.int64)
    weights = np.concatenate([weights, np.ones((t, shared))], axis=1)
    ep_rank, num_ep, tp_rank, num_tp = ep
    if pmap is not None:
        dup = (ep_rank + np.arange(t, dtype=np.int64)[:, None] * 23333) % count[idx]
        idx = pmap[idx, dup].astype(np.int64)
    if version == 1:
        per_rank = (e + (pmap.shape[1] - 1 if pmap is not None else 0)) // num_ep
        per_dp = per_rank * num_tp
        out = np.full_like(idx, -1)
        ok = (idx >= 0) & ((idx // per_rank) % num_tp == tp_rank)
        local = idx - tp_rank * per_rank
        dp = local // per_dp
        remapped = local - dp * (per_dp - per_rank)
        idx = np.where(idx < 0, idx, np.where(ok & (remapped >= 0), remapped, out))
    if mask is not None:
        idx[~mask], weights[~mask], routed[~mask] = -1, 0, -1
    return idx.astype(np.int32), weights, routed.astype(np.int32), np.where(mask[:, None], u, 0) if mask is not None else u


def _check_gate(got, want, with_unmapped=False, with_scores=False):
    assert_bytes_equal(got[0], want[0], "topk_idx")
    np.testing.assert_allclose(np.asarray(got[1], np.float64), want[1], rtol=2e-6, atol=1e-7)
    if with_unmapped:
        assert_bytes_equal(got[2], want[2], "unmapped_topk_idx")
    if with_scores:
        np.testing.assert_allclose(np.asarray(got[-1], np.float64), want[3], rtol=2e-6, atol=1e-7)


V1_CONFIGS = [
    # (tokens, experts, topk, scoring, groups, topk_groups, shared, duplicates, ep)
    (57, 72, 6, "sigmoid", 0, 0, 0, 0, (0, 1, 0, 1)),
    (57, 64, 6, "sqrtsoftplus", 0, 0, 0, 0, (0, 4, 1, 2)),
    (57, 256, 8, "softmax", 8, 4, 0, 0, (0, 1, 0, 1)),
    (57, 256, 8, "sigmoid", 8, 4, 2, 33, (0, 4, 1, 2)),
    (57, 256, 8, "sqrtsoftplus", 8, 8, 1, 3, (2, 4, 0, 2)),
    (57, 384, 8, "softmax", 16, 4, 0, 0, (0, 1, 0, 1)),
    (40, 16, 6, "sigmoid", 4, 2, 0, 0, (0, 1, 0, 1)),
]


@pytest.mark.parametrize("tokens,experts,topk,scoring,groups,topk_groups,shared,duplicates,ep", V1_CONFIGS)
@pytest.mark.parametrize("masks", [False, True])
def test_top2_sum_gate_reference_matches_numpy(rng, tokens, experts, topk, scoring, groups, topk_groups, shared, duplicates, ep, masks):
    bias = (rng.standard_normal(experts) * 0.1).astype(np.float32)
    logits = separated_gate_logits(rng, tokens, experts, topk, scoring, bias, groups, topk_groups)
    extra = {}
    if duplicates:
        extra["to_physical_map"] = rng.integers(0, experts + 32, (experts + shared, duplicates), dtype=np.int32)
        extra["logical_count"] = rng.integers(1, duplicates + 1, experts + shared, dtype=np.int32)
    if masks:
        extra["mask"] = rng.random(tokens) < 0.7
        extra["fix_routing_mask"] = rng.random(tokens) < 0.3
        extra["unmapped_topk_idx"] = rng.integers(0, experts, (tokens, topk), dtype=np.int32)
    def call(impl):
        return jax.jit(lambda *a: top2_sum_gate(*a, topk, topk_groups, groups, bool(shared), shared, 1.5, *ep, scoring, **extra, impl=impl))

    got = call("xla")(logits, bias)
    want = np_gate(logits, bias, topk, scoring, groups, topk_groups, shared, 1.5, extra.get("mask"), extra.get("fix_routing_mask"),
                   extra.get("unmapped_topk_idx"), extra.get("to_physical_map"), extra.get("logical_count"), ep, version=1)  # fmt: skip
    _check_gate(got, want, with_unmapped=masks)
    for d, r in zip(call(None)(logits, bias), got):  # the default path off the GPU is the reference
        assert_bytes_equal(d, r)


def test_top2_sum_gate_zero_logits_are_stable():
    """TileKernels' stability check: all-zero logits (all scores tie) pick the experts in index order."""
    for experts, topk in ((16, 6), (72, 6), (256, 8)):
        idx, weights = top2_sum_gate(np.zeros((3, experts), np.float32), np.zeros(experts, np.float32), topk, 0, 0, False, 0, 1.0, 0, 1, 0, 1, "sigmoid")
        np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(np.arange(topk), (3, topk)))
        np.testing.assert_allclose(np.asarray(weights), 1 / topk, rtol=1e-6)


V2_CONFIGS = [(57, 72, 6, 0, 0, False), (57, 256, 8, 2, 5, True), (57, 384, 32, 0, 0, True), (57, 8, 1, 1, 2, False)]


@pytest.mark.parametrize("tokens,experts,topk,shared,duplicates,image", V2_CONFIGS)
def test_moe_topk_gate_reference_matches_numpy(rng, tokens, experts, topk, shared, duplicates, image):
    bias = (rng.standard_normal(experts) * 0.1).astype(np.float32)
    extra = dict(bias=bias, mask=rng.random(tokens) < 0.8)
    ranking_bias = bias
    if image:
        extra["image_bias"] = (rng.standard_normal(experts) * 0.1).astype(np.float32)
        extra["image_token_mask"] = rng.random(tokens) < 0.5
        ranking_bias = np.where(extra["image_token_mask"][:, None], extra["image_bias"], bias)
    if duplicates:
        extra["to_physical_map"] = rng.integers(0, 10000, (experts + shared, duplicates), dtype=np.int32)
        extra["logical_count"] = rng.integers(1, duplicates + 1, experts + shared, dtype=np.int32)
    extra["fix_routing_mask"] = rng.random(tokens) < 0.3
    extra["unmapped_topk_idx"] = rng.integers(0, experts, (tokens, topk), dtype=np.int32)
    logits = separated_gate_logits(rng, tokens, experts, topk, "sqrtsoftplus", ranking_bias)
    got = moe_topk_gate(logits, topk, bool(shared), shared, 2.5, 7, **extra, with_scores=True, impl="xla")
    want = np_gate(logits, ranking_bias, topk, "sqrtsoftplus", shared=shared, scale=2.5, mask=extra["mask"], fix=extra["fix_routing_mask"],
                   unmapped=extra["unmapped_topk_idx"], pmap=extra.get("to_physical_map"), count=extra.get("logical_count"),
                   ep=(7, 1, 0, 1), version=2)  # fmt: skip
    _check_gate(got, want, with_unmapped=True, with_scores=True)


@pytest.mark.parametrize("experts,topk,shared,duplicates", [(8, 6, 2, 0), (256, 8, 0, 0), (72, 6, 1, 3)])
def test_force_random(rng, experts, topk, shared, duplicates):
    """Forced tokens (where the mask allows): K + S distinct experts drawn uniformly among the physical
    experts, uniform [0, 1) weights, unmapped -1, scores 0; every other token as without force_random."""
    tokens, slots = 4096, topk + shared
    extra = dict(mask=rng.random(tokens) < 0.9, unmapped_topk_idx=rng.integers(0, experts, (tokens, topk), dtype=np.int32),
                 fix_routing_mask=rng.random(tokens) < 0.3)  # fmt: skip
    physical = experts + shared
    if duplicates:
        extra["to_physical_map"] = rng.integers(0, 10000, (experts + shared, duplicates), dtype=np.int32)
        extra["logical_count"] = rng.integers(1, duplicates + 1, experts + shared, dtype=np.int32)
        physical = int(extra["logical_count"].sum())
    logits = separated_gate_logits(rng, tokens, experts, topk, "sqrtsoftplus", np.zeros(experts, np.float32))
    force = rng.random(tokens) < 0.5
    args = (logits, topk, bool(shared), shared, 1.5, 0)
    plain = jit_call(moe_topk_gate, *args, **extra, with_scores=True, impl="xla")
    key = jax.random.key(int(rng.integers(1 << 30)))
    got = jit_call(moe_topk_gate, *args, **extra, force_random=force, force_random_key=key, with_scores=True, impl="xla")
    again = jit_call(moe_topk_gate, *args, **extra, force_random=force, force_random_key=key, with_scores=True, impl="xla")
    other = jit_call(moe_topk_gate, *args, **extra, force_random=force, force_random_key=jax.random.fold_in(key, 1), impl="xla")
    idx, weights, unmapped, scores = map(np.asarray, got)
    forced = force & extra["mask"]
    for want, have in zip(plain, got):
        np.testing.assert_array_equal(np.asarray(have)[~forced], np.asarray(want)[~forced])
    for a, b in zip(got, again):
        assert_bytes_equal(a, b)
    assert not np.array_equal(np.asarray(other[0])[forced], idx[forced])
    chosen = idx[forced]
    assert chosen.min() >= 0 and chosen.max() < physical
    assert all(len(set(row)) == slots for row in chosen.tolist())
    assert (unmapped[forced] == -1).all() and (scores[forced] == 0).all()
    w = weights[forced]
    assert (w >= 0).all() and (w < 1).all() and abs(w.mean() - 0.5) < 0.02
    # Uniform over the physical experts: every expert's count within 6 standard deviations.
    counts = np.bincount(chosen.ravel(), minlength=physical)
    p = slots / physical
    expected, sd = len(chosen) * p, np.sqrt(len(chosen) * p * (1 - p))
    assert np.abs(counts - expected).max() < 6 * sd + 1, (counts, expected)


def test_duplicate_pick_is_exact_past_int32():
    """(ep_rank + token * 23333) % count for token counts where token * 23333 overflows int32."""
    from jax_tilek.moe._top2_sum_gate import duplicate_pick

    tokens = np.array([0, 1, 92038, 92039, 2**31 - 2, 123456789], np.int32)
    counts = np.array([1, 3, 7, 33, 2**31 - 1, 1000003], np.int32)
    want = (5 + tokens.astype(np.int64) * 23333) % counts
    np.testing.assert_array_equal(np.asarray(duplicate_pick(jnp.asarray(tokens), 5, jnp.asarray(counts))), want)


def np_gate_backward(u, idx, w, g, scale, mask=None, h=None):
    """TileKernels' float64 torch reference of moe_topk_gate_backward, in numpy."""
    u, w, g = u.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    t, e = u.shape
    valid = idx >= 0
    uj = np.take_along_axis(u, np.clip(idx, 0, None), axis=1) * valid
    g = g * valid
    route = (scale * g - (g * w).sum(-1, keepdims=True)) / (uj.sum(-1, keepdims=True) + 1e-20) * valid
    grad_u = np.zeros_like(u)
    for k in range(idx.shape[1]):
        np.add.at(grad_u, (np.arange(t), np.clip(idx[:, k], 0, None)), route[:, k])
    if h is not None:
        hh = np.repeat(h.astype(np.float64), t // h.shape[0], axis=0)
        s = u.sum(-1, keepdims=True)
        inv = np.where(mask[:, None], 1 / s, 0)
        grad_u += (hh - (hh * u).sum(-1, keepdims=True) * inv) * inv
    dydx = np.where(u > 0, -np.expm1(-u * u) / (2 * np.where(u > 0, u, 1)), 0)
    return dydx * grad_u


@pytest.mark.parametrize("experts,topk,seqs", [(8, 1, 0), (72, 6, 0), (256, 8, 3), (384, 32, 1)])
def test_gate_backward_reference_matches_numpy(rng, experts, topk, seqs):
    tokens = 57 if seqs != 3 else 60
    u = np.sqrt(np.logaddexp(0, rng.standard_normal((tokens, experts)) * 3)).astype(np.float32)
    idx = np.argsort(rng.random((tokens, experts)), axis=1)[:, :topk].astype(np.int32)
    idx[rng.random((tokens, topk)) < 0.1] = -1
    idx[:5, -1] = idx[:5, 0]  # duplicates (fixed routing) accumulate
    w = rng.random((tokens, topk)).astype(np.float32)
    g = rng.standard_normal((tokens, topk)).astype(np.float32)
    aux = {}
    if seqs:
        aux = dict(mask=rng.random(tokens) < 0.8, grad_scores_sum=rng.standard_normal((seqs, experts)).astype(np.float32))
    got = np.asarray(moe_topk_gate_backward(u, idx, w, g, 2.5, **aux, impl="xla"), np.float64)
    want = np_gate_backward(u, idx, w, g, 2.5, aux.get("mask"), aux.get("grad_scores_sum"))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * np.abs(want).max())


def test_topk_gate_weights_gradient_is_the_backward(rng):
    """jax.grad through the kernel path's VJP (moe_topk_gate_backward) equals autodiff of the reference
    and the numpy formula."""
    bias = (rng.standard_normal(72) * 0.1).astype(np.float32)
    logits = separated_gate_logits(rng, 33, 72, 6, "sqrtsoftplus", bias)
    cot = rng.standard_normal((33, 6)).astype(np.float32)

    def loss(impl):
        return jax.grad(lambda x: jnp.sum(topk_gate_weights(x, 6, 2.5, bias, impl=impl)[1] * cot))(logits)

    kernel_path, autodiff = np.asarray(loss(None), np.float64), np.asarray(loss("xla"), np.float64)
    idx, w = topk_gate_weights(logits, 6, 2.5, bias, impl="xla")
    u = np.sqrt(np.logaddexp(0, logits.astype(np.float64))).astype(np.float32)
    want = np_gate_backward(u, np.asarray(idx), np.asarray(w), cot, 2.5)
    np.testing.assert_allclose(kernel_path, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(autodiff, want, rtol=2e-5, atol=1e-6)


def test_zero_tokens():
    assert topk_gate(np.zeros((0, 64), np.float32), 4).shape == (0, 4)
    idx, w = moe_topk_gate(np.zeros((0, 64), np.float32), 4, True, 2, 1.0, 0)
    assert idx.shape == (0, 6) and idx.dtype == jnp.int32 and w.shape == (0, 6) and w.dtype == jnp.float32


_BOOL4 = jax.ShapeDtypeStruct((4,), jnp.bool_)


@pytest.mark.parametrize(
    "fn,arrays,kwargs,message",
    [
        (lambda l, b, m: top2_sum_gate(l, b, **_V1, mask=m), (_LOGITS, _BIAS, jax.ShapeDtypeStruct((4,), jnp.int32)), {}, r"^top2_sum_gate: mask must be bool \[4\]"),
        (lambda l, b, m: top2_sum_gate(l, b, **_V1, fix_routing_mask=m), (_LOGITS, _BIAS, _BOOL4), {}, r"^top2_sum_gate: fix_routing_mask needs unmapped_topk_idx"),
        (lambda l, b, m: top2_sum_gate(l, b, **_V1, to_physical_map=m), (_LOGITS, _BIAS, jax.ShapeDtypeStruct((256, 2), jnp.int32)), {},
         r"^top2_sum_gate: to_physical_map and logical_count must be given together"),
        (lambda l, b: moe_topk_gate(l, 8, False, 0, 1.0, 0, image_bias=b), (_LOGITS, _BIAS), {}, r"^moe_topk_gate: image_bias and image_token_mask must be given together"),
        (lambda l, i, w, m: moe_topk_gate_backward(l, i, w, w, 1.0, mask=m), (_LOGITS, _IDX, _W, _BOOL4), {},
         r"^moe_topk_gate_backward: grad_scores_sum and mask must be given together"),
        (lambda l, i, w, m, h: moe_topk_gate_backward(l, i, w, w, 1.0, mask=m, grad_scores_sum=h), (_LOGITS, _IDX, _W, _BOOL4, jax.ShapeDtypeStruct((3, 256), F32)),
         {}, r"^moe_topk_gate_backward: grad_scores_sum must be float32 \[num_seqs, 256\] with num_seqs >= 1 dividing T = 4"),
    ],
)
def test_optional_operands_are_checked(fn, arrays, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(fn, *arrays)
