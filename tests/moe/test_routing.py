"""MoE routing ops (get_fused_mapping, expand_to_fused(_with_sf), reduce_fused) and utilities
(normalize_weight, aux_fi, group_count, mask_indices_by_tp, unique_group_indices): references against
independent numpy math on fresh random inputs, edge sizes, the op contract, and the GPU kernels."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.moe._expand import expand_to_fused, expand_to_fused_with_sf
from jax_tilek.moe._fused_mapping import capacity, get_fused_mapping, random_topk_idx
from jax_tilek.moe._reduce import reduce_fused
from jax_tilek.moe._utils import aux_fi, group_count, mask_indices_by_tp, normalize_weight, unique_group_indices
from jax_tilek.quant import formats as F
from jax_tilek.testing import OpContract, assert_bytes_equal, jit_call

S = jax.ShapeDtypeStruct


def traced(fn):
    """``fn(*args, **kwargs)`` traced by ``jax.eval_shape`` with the ``ShapeDtypeStruct`` arguments as arrays."""
    from jax_tilek.testing import over_arrays

    def call(*args, **kwargs):
        inner, structs = over_arrays(lambda *a: fn(*a, **kwargs), args)
        return jax.eval_shape(inner, *structs)

    return call
BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn


# ---------------------------------------------------------------------------------------------
# Independent numpy math.


def np_fused_mapping(idx: np.ndarray, e: int, p: int, alignment: int):
    """Loop form: experts in order, each expert's slots in ascending t·K + k, segments padded."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    pte, ptt, pttk = (np.full(p, -1, np.int32) for _ in range(3))
    ttp = np.full(t * k, -1, np.int32)
    start, end, size = (np.zeros(e, np.int32) for _ in range(3))
    row = 0
    for x in range(e):
        start[x] = row
        slots = [i for i in range(t * k) if flat[i] == x]
        for i in slots:
            if row < p:
                ttp[i], pte[row], ptt[row], pttk[row] = row, x, i // k, i
            row += 1
        row = start[x] + -(-len(slots) // alignment) * alignment
        end[x], size[x] = row, row - start[x]
    return pte, ptt, pttk, ttp.reshape(t, k), start, end, size, np.int32(row)


def np_expand(x: np.ndarray, ttp: np.ndarray, p: int) -> np.ndarray:
    out = np.zeros((p, *x.shape[1:]), x.dtype)
    for (t, k), pos in np.ndenumerate(ttp):
        if 0 <= pos < p:
            out[pos] = x[t]
    return out


def np_reduce(x, w, ttp, x_sf=None, sf=None, out_dtype=None):
    """fp32 accumulation in k order, each step one fused multiply-add (exact product in long double,
    one rounding of the sum to fp32)."""
    t, k = ttp.shape
    acc = np.zeros((t, x.shape[1]), np.float32)
    for j in range(k):
        for r in range(t):
            pos = ttp[r, j]
            if not 0 <= pos < x.shape[0]:
                continue
            s = np.float32(1) if w is None else np.float32(w[r, j])
            if x_sf is not None:
                s = np.float32(s * np.float32(x_sf[pos]))
            exact = x[pos].astype(np.float32).astype(np.longdouble) * np.longdouble(s) + acc[r].astype(np.longdouble)
            acc[r] = exact.astype(np.float32)
    if sf is not None:
        acc = (acc * np.float32(sf[0])).astype(np.float32)
    return acc.astype(out_dtype or x.dtype)


def np_normalize(w: np.ndarray):
    """A 32-lane xor butterfly (offsets 16 ... 1) over zero-padded lanes; lane 0's sum + 1e-20."""
    lanes = np.zeros((w.shape[0], 32), np.float32)
    lanes[:, : w.shape[1]] = w
    for off in (16, 8, 4, 2, 1):
        lanes = (lanes + lanes[:, np.arange(32) ^ off]).astype(np.float32)
    d = (np.float32(1e-20) + lanes[:, 0]).astype(np.float32)
    return d, (w / d[:, None]).astype(np.float32)


def np_mask(v: np.ndarray, n, ep, rank, tp) -> np.ndarray:
    per_gpu = n // ep
    per_dp = per_gpu * tp
    out = np.full_like(v, -1)
    for i, x in np.ndenumerate(v):
        if x >= 0 and (x // per_gpu) % tp == rank:
            y = x - rank * per_gpu
            y -= (y // per_dp) * (per_dp - per_gpu)
            out[i] = y if y >= 0 else -1
    return out


def np_unique(g: np.ndarray) -> np.ndarray:
    out = g.copy()
    for r in range(g.shape[0]):
        seen = set()
        for j in range(g.shape[1]):
            if g[r, j] >= 0:
                if g[r, j] in seen:
                    out[r, j] = -1
                seen.add(g[r, j])
    return out


def mapping(rng, t, k, e, alignment, masked=0.1):
    idx = random_topk_idx(rng, t, k, e, masked)
    pte, _, _, ttp, *_ = np_fused_mapping(idx, e, capacity(t, k, e, alignment), alignment)
    return ttp, pte


# ---------------------------------------------------------------------------------------------
# References against numpy.

MAPPING_SHAPES = [(37, 8, 256, 128), (1, 1, 8, 16), (0, 6, 64, 64), (25, 6, 72, 1), (19, 4, 384, 16), (50, 2, 8, 4)]


@pytest.mark.parametrize("t,k,e,alignment", MAPPING_SHAPES)
@pytest.mark.parametrize("masked", [0.1, 1.0])
def test_fused_mapping_reference(rng, t, k, e, alignment, masked):
    idx = random_topk_idx(rng, t, k, e, masked)
    got = jax.jit(lambda i: get_fused_mapping(i, e, 0, alignment, impl="xla"))(idx)
    p = capacity(t, k, e, alignment)
    want = np_fused_mapping(idx, e, p, alignment)
    assert len(got) == 8
    for g, w in zip(got, want):
        assert_bytes_equal(g, np.asarray(w, np.int32))
    # TileKernels' own consistency checks
    pte, ptt, pttk, ttp, start, end, size, total = (np.asarray(a) for a in got)
    assert total == size.sum() <= p and (end - start == size).all() and (size % alignment == 0).all()
    for x in range(e):
        seg = pte[start[x] : end[x]]
        assert (seg == x).sum() == (idx == x).sum() and ((seg == x) | (seg == -1)).all()
    real = pte >= 0
    assert (ttp.reshape(-1)[pttk[real]] == np.flatnonzero(real)).all() and (ptt[real] == pttk[real] // max(k, 1)).all()
    assert ((ptt < 0) == ~real).all() and ((pttk < 0) == ~real).all()


def test_fused_mapping_capacity_and_overflow(rng):
    idx = random_topk_idx(rng, 64, 8, 8, 0.0)
    full = get_fused_mapping(idx, 8, 0, 64, impl="xla")
    assert full[0].shape == (capacity(64, 8, 8, 64),) == ((64 * 8 + 63 * 8) // 64 * 64,)
    small = get_fused_mapping(idx, 8, 100, 64, impl="xla")  # too small: the rows past 100 are dropped
    want = np_fused_mapping(idx, 8, 100, 64)
    for g, w in zip(small, want):
        assert_bytes_equal(g, np.asarray(w, np.int32))
    assert int(small[7]) > 100 and (np.asarray(small[3]) < 100).all()


@pytest.mark.parametrize("t,h,k,e,alignment,dtype", [(23, 576, 6, 16, 16, BF16), (1, 128, 1, 8, 4, np.float32), (0, 256, 8, 8, 4, BF16), (9, 96, 3, 8, 8, E4M3)])
@pytest.mark.parametrize("masked", [0.1, 1.0])
def test_expand_reference(rng, t, h, k, e, alignment, dtype, masked):
    ttp, pte = mapping(rng, t, k, e, alignment, masked)
    x = (rng.standard_normal((t, h), np.float32) * 4).astype(dtype)
    got = jax.jit(lambda *a: expand_to_fused(*a, impl="xla"))(x, ttp, pte)
    assert_bytes_equal(got, np_expand(x, ttp, pte.shape[0]))


@pytest.mark.parametrize("layout,npc,e4m3_sf", [("row", 128, False), ("col", 32, False), ("col_ue8m0", 32, False), ("row", 32, True), ("col", 128, True)])
@pytest.mark.parametrize("t", [13, 1, 0])
def test_expand_with_sf_reference(rng, layout, npc, e4m3_sf, t):
    from jax_tilek.quant import per_token_cast

    h, k, e = 512, 4, 16
    ttp, pte = mapping(rng, t, k, e, 8)
    x = rng.standard_normal((t, h), np.float32).astype(BF16)
    flags = dict(use_tma_aligned_col_major_sf=layout != "row", round_sf=layout == "col_ue8m0", use_packed_ue8m0=layout == "col_ue8m0")
    if e4m3_sf:
        flags["use_e4m3_sf"] = True
    data, sf = jit_call(per_token_cast, x, "e4m3", num_per_channels=npc, impl="xla", **flags)
    out, out_sf = jax.jit(lambda *a: expand_to_fused_with_sf((a[0], a[1]), npc, a[2], a[3], layout != "row", impl="xla"))(data, sf, ttp, pte)
    p = pte.shape[0]
    assert_bytes_equal(out, np_expand(np.asarray(data), ttp, p))
    sf = np.asarray(sf)
    if layout == "row":
        want = np_expand(sf, ttp, p)
    else:
        a = F.tma_alignment(sf.dtype)
        want = np.zeros((sf.shape[0], -(-p // a) * a), sf.dtype)
        want[:, :p] = np_expand(sf.T[:t], ttp, p).T
    assert_bytes_equal(out_sf, want)
    # the expanded scales dequantize the expanded data as the originals did
    blocks = F.num_blocks((p, h), (1, npc))
    back = jit_call(lambda d, s: F.dequantize_blocks(d, F.load_sf(s, layout, blocks), "e4m3", (1, npc)), out, out_sf)
    orig = jit_call(lambda d, s: F.dequantize_blocks(d, F.load_sf(s, layout, F.num_blocks((t, h), (1, npc))), "e4m3", (1, npc)), data, sf)
    assert_bytes_equal(back, np_expand(np.asarray(orig), ttp, p))


@pytest.mark.parametrize("t,h,k,e,dtype", [(11, 256, 6, 16, BF16), (7, 128, 8, 64, np.float32), (5, 64, 4, 8, E4M3), (1, 32, 1, 8, BF16), (0, 64, 8, 8, np.float32)])
@pytest.mark.parametrize("weights,with_x_sf,fp8_out", [(True, False, False), (False, True, True), (True, True, False), (False, False, True)])
def test_reduce_reference(rng, t, h, k, e, dtype, weights, with_x_sf, fp8_out):
    ttp, pte = mapping(rng, t, k, e, 1)
    p = pte.shape[0]
    x = (rng.standard_normal((p, h), np.float32) * (30 if dtype == E4M3 else 1)).astype(dtype)
    w = rng.random((t, k), np.float32) if weights else None
    x_sf = rng.standard_normal((p,), np.float32) if with_x_sf else None
    sf = (rng.standard_normal((1,), np.float32) * 100).astype(np.float32) if fp8_out else None
    got = jax.jit(lambda x, w, x_sf, sf: reduce_fused((x, x_sf) if x_sf is not None else x, w, ttp, "e4m3" if fp8_out else "", sf, impl="xla"))(x, w, x_sf, sf)
    want = np_reduce(x, w, ttp, x_sf, sf, E4M3 if fp8_out else dtype)
    assert_bytes_equal(got, want)


def test_reduce_fp8_output_overflows_to_nan(rng):
    """A plain cast, as TileKernels' reference ``.to(float8_e4m3fn)``: beyond 448 (after rounding) is NaN."""
    x = np.array([[1000.0, -300.0] * 8], np.float32)
    ttp = np.zeros((1, 1), np.int32)
    out = np.asarray(reduce_fused(x, None, ttp, "e4m3", np.ones((1,), np.float32), impl="xla")).astype(np.float32)
    assert np.isnan(out[0, 0]) and out[0, 1] == -288.0


def test_expand_and_reduce_are_transposes(rng):
    t, h, k, e = 21, 64, 6, 16
    ttp, pte = mapping(rng, t, k, e, 16)
    x = rng.standard_normal((t, h), np.float32)
    g = rng.standard_normal((pte.shape[0], h), np.float32)
    lhs = np.vdot(np.asarray(expand_to_fused(x, ttp, pte, impl="xla")), g)
    rhs = np.vdot(x, np.asarray(reduce_fused(g, None, ttp, impl="xla")))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
    # expand then reduce counts each token's valid slots
    back = np.asarray(reduce_fused(np.asarray(expand_to_fused(x, ttp, pte, impl="xla")), None, ttp, impl="xla"))
    np.testing.assert_allclose(back, x * (ttp >= 0).sum(1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("impl", [None, "xla"])
def test_grads_use_the_other_op(rng, impl):
    t, h, k, e = 9, 128, 4, 8
    ttp, pte = mapping(rng, t, k, e, 4)
    x = rng.standard_normal((t, h), np.float32)
    g = rng.standard_normal((pte.shape[0], h), np.float32)
    dx = jax.jit(jax.grad(lambda x: jnp.vdot(expand_to_fused(x, ttp, pte, impl=impl), g)))(x)
    np.testing.assert_allclose(dx, np_reduce(g, None, ttp), rtol=1e-6, atol=1e-6)
    w = rng.random((t, k), np.float32)
    dy = rng.standard_normal((t, h), np.float32)
    dg = jax.jit(jax.grad(lambda g: jnp.vdot(reduce_fused(g, w, ttp, impl=impl), dy)))(g)
    want = np.zeros_like(g)
    for (r, j), pos in np.ndenumerate(ttp):
        if pos >= 0:
            want[pos] = dy[r] * w[r, j]
    np.testing.assert_allclose(dg, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t,k", [(37, 8), (1, 1), (0, 6), (16, 32), (5, 3)])
def test_normalize_weight_reference(rng, t, k):
    w = rng.random((t, k), np.float32)
    d, n = jax.jit(lambda w: normalize_weight(w, impl="xla"))(w)
    wd, wn = np_normalize(w)
    assert_bytes_equal(d, wd)
    assert_bytes_equal(n, wn)


@pytest.mark.parametrize("t,k,e,masked", [(37, 8, 256, 0.1), (1, 1, 8, 0.0), (0, 8, 64, 0.1), (20, 6, 72, 1.0), (33, 4, 384, 0.3)])
def test_counts_reference(rng, t, k, e, masked):
    idx = random_topk_idx(rng, t, k, e, masked)
    counts = np.bincount(idx[idx >= 0], minlength=e).astype(np.int32)
    assert_bytes_equal(jax.jit(lambda i: group_count(i, e, impl="xla"))(idx), counts)
    for n in (1, k):
        want = (counts.astype(np.float32) * np.float32(e) / np.float32(t * n)).astype(np.float32) if t else np.zeros(e, np.float32)
        assert_bytes_equal(jax.jit(lambda i: aux_fi(i, e, n, impl="xla"))(idx), want)


@pytest.mark.parametrize("n,ep,tp", [(256, 8, 2), (288, 8, 4), (64, 8, 8), (256, 16, 2)])
def test_mask_indices_by_tp_reference(rng, n, ep, tp):
    idx = random_topk_idx(rng, 29, 8, n, 0.2)
    for rank in range(tp):
        got = jax.jit(lambda i: mask_indices_by_tp(i, n, ep, rank, tp, impl="xla"))(idx)
        assert_bytes_equal(got, np_mask(idx, n, ep, rank, tp))


@pytest.mark.parametrize("t,k,groups", [(40, 8, 8), (1, 1, 16), (0, 6, 8), (31, 6, 4)])
def test_unique_group_indices_reference(rng, t, k, groups):
    g = np.where(rng.random((t, k)) < 0.2, -1, rng.integers(0, groups, (t, k))).astype(np.int32)
    assert_bytes_equal(jax.jit(lambda g: unique_group_indices(g, groups, impl="xla"))(g), np_unique(g))


def test_default_path_off_gpu_is_the_reference(rng):
    idx = random_topk_idx(rng, 12, 6, 16)
    for a, b in zip(get_fused_mapping(idx, 16, 0, 8), get_fused_mapping(idx, 16, 0, 8, impl="xla")):
        assert_bytes_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad inputs: a ValueError / TypeError naming the function and the argument at trace time.

I32 = jnp.int32


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: traced(get_fused_mapping)(S((4, 2), jnp.float32), 8), r"^get_fused_mapping: topk_idx must be int32 or int64"),
        (lambda: traced(get_fused_mapping)(S((4, 2), I32), 2000), r"^get_fused_mapping: num_experts must be in \[1, 1024\]"),
        (lambda: traced(get_fused_mapping)(S((4, 2), I32), 8, 0, 0), r"^get_fused_mapping: alignment must be"),
        (lambda: traced(get_fused_mapping)(S((4,), I32), 8), r"^get_fused_mapping: topk_idx must be \[T, K\]"),
        (lambda: traced(expand_to_fused)(S((4, 64), jnp.bfloat16), S((5, 2), I32), S((16,), I32)), r"^expand_to_fused: token_topk_to_pos must be \[T, K\] with T = 4"),
        (lambda: traced(expand_to_fused)(S((4, 64), jnp.bfloat16), S((4, 2), jnp.int64 if jax.config.jax_enable_x64 else jnp.int16), S((16,), I32)),
         r"^expand_to_fused: token_topk_to_pos must be int32"),
        (lambda: traced(expand_to_fused_with_sf)((S((4, 256), jnp.float8_e4m3fn), S((4, 3), jnp.float32)), 128, S((4, 2), I32), S((16,), I32)),
         r"^expand_to_fused_with_sf: the scales hold 3 entries per token, but ceil\(H / num_per_channels\) = 2 blocks need 2"),
        (lambda: traced(expand_to_fused_with_sf)((S((4, 256), jnp.float8_e4m3fn), S((2, 5), jnp.float32)), 128, S((4, 2), I32), S((16,), I32), True),
         r"^expand_to_fused_with_sf: column-major scale storage must have align\(T, 4\) = 4 columns"),
        (lambda: traced(reduce_fused)(S((16, 256), jnp.bfloat16), None, S((4, 2), I32), "", S((1,), jnp.float32)), r"^reduce_fused: sf is only allowed with fp8_format='e4m3'"),
        (lambda: traced(reduce_fused)(S((16, 256), jnp.bfloat16), S((4, 3), jnp.float32), S((4, 2), I32)), r"^reduce_fused: topk_weights must be float32 \[4, 2\]"),
        (lambda: traced(reduce_fused)(S((16, 256), jnp.float16), None, S((4, 2), I32)), r"^reduce_fused: x must be bfloat16, float32 or float8_e4m3fn"),
        (lambda: traced(reduce_fused)(S((16, 256), jnp.bfloat16), None, S((4, 2), I32), "e5m2"), r"^reduce_fused: fp8_format must be '' or 'e4m3'"),
        (lambda: traced(reduce_fused)((S((16, 256), jnp.bfloat16), S((15,), jnp.float32)), None, S((4, 2), I32)), r"^reduce_fused: x_sf must be float32 \[16\]"),
        (lambda: traced(normalize_weight)(S((4, 33), jnp.float32)), r"^normalize_weight: topk_weights may have at most 32 columns"),
        (lambda: traced(normalize_weight)(S((4, 8), jnp.bfloat16)), r"^normalize_weight: topk_weights must be float32"),
        (lambda: traced(aux_fi)(S((4, 8), I32), 0, 1), r"^aux_fi: num_experts and num_aux_topk must be positive"),
        (lambda: traced(group_count)(S((4, 8), jnp.float32), 8), r"^group_count: group_idx must be int32 or int64"),
        (lambda: traced(mask_indices_by_tp)(S((4, 8), I32), 256, 8, 2, 2), r"^mask_indices_by_tp: tp_rank must be in \[0, num_tp_ranks = 2\)"),
        (lambda: traced(unique_group_indices)(S((4, 8), I32), 200), r"^unique_group_indices: num_groups must be in \[1, 128\]"),
    ],
)
def test_bad_inputs_raise_naming_the_function(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: traced(get_fused_mapping)(S((4, 2), I32), 8.0), r"^get_fused_mapping: num_experts must be an integer"),
        (lambda: traced(expand_to_fused)("x", S((4, 2), I32), S((16,), I32)), r"^expand_to_fused: x must be an array"),
        (lambda: traced(expand_to_fused_with_sf)(S((4, 256), jnp.float8_e4m3fn), 128, S((4, 2), I32), S((16,), I32)), r"^expand_to_fused_with_sf: x must be a \(data, sf\) pair"),
        (lambda: traced(mask_indices_by_tp)(S((4, 8), I32), 256, 8, 1.5, 2), r"^mask_indices_by_tp: tp_rank must be an integer"),
    ],
)
def test_wrong_kinds_raise_type_errors(call, message):
    with pytest.raises(TypeError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# The contract (every named call of each function).


class TestGetFusedMapping(OpContract):
    fn = get_fused_mapping
    bad_inputs = [((S((4, 2), jnp.float32),), dict(num_experts=8), ValueError, "int32 or int64")]


class TestExpandToFused(OpContract):
    fn = expand_to_fused
    differentiable = (0,)
    bad_inputs = [((S((4, 64), jnp.bfloat16), S((3, 2), I32), S((16,), I32)), {}, ValueError, "token_topk_to_pos must be")]


class TestExpandToFusedWithSf(OpContract):
    fn = expand_to_fused_with_sf


class TestReduceFused(OpContract):
    fn = reduce_fused
    differentiable = (0, 1, 4)
    bad_inputs = [((S((16, 256), jnp.bfloat16), None, S((4, 2), I32)), dict(fp8_format="e5m2"), ValueError, "fp8_format")]


class TestNormalizeWeight(OpContract):
    fn = normalize_weight
    rows = True
    bad_inputs = [((S((4, 40), jnp.float32),), {}, ValueError, "at most 32 columns")]


class TestGroupCount(OpContract):
    fn = group_count
    bad_inputs = [((S((4, 8), I32),), dict(num_groups=0), ValueError, "num_groups must be positive")]


class TestAuxFi(OpContract):
    fn = aux_fi


class TestMaskIndicesByTp(OpContract):
    fn = mask_indices_by_tp
    rows = True


class TestUniqueGroupIndices(OpContract):
    fn = unique_group_indices
    rows = True


# ---------------------------------------------------------------------------------------------
# GPU: the kernels against numpy on fresh inputs (the contract's GPU test covers every named call).


MAPPING_CASES = [(4001, 8, 256, 128), (1, 1, 8, 16), (0, 6, 64, 64), (8001, 6, 384, 1), (100000, 8, 256, 64)]  # t, k, e, alignment
ROUNDTRIP_CASES = [(7168, BF16), (576, BF16), (2048, np.float32), (96, E4M3)]  # h, dtype
ROUNDTRIP_TOKENS, ROUNDTRIP_TOPK, ROUNDTRIP_EXPERTS, ROUNDTRIP_ALIGNMENT = 3001, 8, 256, 128


def fused_mapping_tilelang(e: int, alignment: int):
    return lambda idx: get_fused_mapping(idx, e, 0, alignment, impl="tilelang")


def expand_tilelang(x, ttp, pte):
    return expand_to_fused(x, ttp, pte, impl="tilelang")


def reduce_tilelang(x, w, ttp):
    return reduce_fused(x, w, ttp, impl="tilelang")


def _roundtrip_programs(h: int, dtype) -> list:
    t, k, e = ROUNDTRIP_TOKENS, ROUNDTRIP_TOPK, ROUNDTRIP_EXPERTS
    p = capacity(t, k, e, ROUNDTRIP_ALIGNMENT)
    struct = jax.ShapeDtypeStruct
    programs = [(expand_tilelang, (struct((t, h), dtype), struct((t, k), jnp.int32), struct((p,), jnp.int32)))]
    if (h * np.dtype(dtype).itemsize) % 16 == 0:
        programs.append((reduce_tilelang, (struct((p, h), dtype), struct((t, k), jnp.float32), struct((t, k), jnp.int32))))
    return programs


GPU_PROGRAMS = [(fused_mapping_tilelang(e, a), (jax.ShapeDtypeStruct((max(t, 1), k), jnp.int32),)) for t, k, e, a in MAPPING_CASES] + [
    p for h, dtype in ROUNDTRIP_CASES for p in _roundtrip_programs(h, dtype)
]


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,e,alignment", MAPPING_CASES)
def test_fused_mapping_kernel(on_gpu, rng, t, k, e, alignment):
    idx = random_topk_idx(rng, t, k, e)
    got = on_gpu(fused_mapping_tilelang(e, alignment), idx)
    for g, w in zip(got, np_fused_mapping(idx, e, capacity(t, k, e, alignment), alignment)):
        assert_bytes_equal(g, np.asarray(w, np.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("h,dtype", ROUNDTRIP_CASES)
def test_expand_and_reduce_kernels(on_gpu, rng, h, dtype):
    t, k, e = ROUNDTRIP_TOKENS, ROUNDTRIP_TOPK, ROUNDTRIP_EXPERTS
    ttp, pte = mapping(rng, t, k, e, ROUNDTRIP_ALIGNMENT)
    x = (rng.standard_normal((t, h), np.float32) * 4).astype(dtype)
    got = on_gpu(expand_tilelang, x, ttp, pte)
    assert_bytes_equal(got, np_expand(x, ttp, pte.shape[0]))
    if (h * np.dtype(dtype).itemsize) % 16 == 0:
        w = rng.random((t, k), np.float32)
        red = on_gpu(reduce_tilelang, np.asarray(got), w, ttp)
        assert_bytes_equal(red, np_reduce(np.asarray(got), w, ttp))
