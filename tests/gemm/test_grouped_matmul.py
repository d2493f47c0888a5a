"""Grouped GEMM (grouped_matmul, grouped_matmul_wgrad): the references against independent float64
numpy math on fresh random inputs (empty groups, sizes not multiples of the tile, M = 0, segments of a
fused mapping with padding rows, transposed weights), the M-tile table, argument errors, gradients of
the custom VJP against jax.grad of the reference, the op contract, and on a GPU the kernels and their
gradients against the references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek import gemm
from jax_tilek.gemm import _segments as S
from jax_tilek.gemm._grouped_wgrad import random_sizes
from jax_tilek.moe import get_fused_mapping
from jax_tilek.moe._fused_mapping import random_topk_idx
from jax_tilek.testing import OpContract, random_array

BF16 = ml_dtypes.bfloat16
ST = jax.ShapeDtypeStruct


# ---------------------------------------------------------------------------------------------
# Independent numpy math (float64).


def np_segments(sizes: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    end = np.minimum(np.cumsum(np.maximum(sizes, 0)), m)
    start = np.minimum(np.cumsum(np.maximum(sizes, 0)) - np.maximum(sizes, 0), m)
    return start, end


def np_grouped(x, w, start, end, transpose_w=False) -> np.ndarray:
    """out[r] = x[r] @ w[g] for r in [start[g], end[g]), zero elsewhere (a loop over the groups)."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n = w64.shape[1] if transpose_w else w64.shape[2]
    out = np.zeros((x64.shape[0], n))
    for g in range(w64.shape[0]):
        s, e = max(int(start[g]), 0), min(int(end[g]), x64.shape[0])
        if s < e:
            out[s:e] = x64[s:e] @ (w64[g].T if transpose_w else w64[g])
    return out


def np_wgrad(a, b, start, end) -> np.ndarray:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.zeros((len(start), a64.shape[1], b64.shape[1]))
    for g in range(len(start)):
        s, e = max(int(start[g]), 0), min(int(end[g]), a64.shape[0])
        if s < e:
            out[g] = a64[s:e].T @ b64[s:e]
    return out


def close(actual, expected, rel: float) -> None:
    """Within ``rel`` of the largest magnitude (bf16/fp32 rounding of sums of many products)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape
    scale = max(float(np.abs(e).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(a, e, rtol=0, atol=rel * scale)


# ---------------------------------------------------------------------------------------------
# References against numpy.

SIZE_CASES = [  # m, k, n, g, skew, empty groups, total rows grouped
    (300, 128, 256, 4, 0.0, 1, 260),
    (77, 256, 128, 3, 2.0, 0, 77),
    (513, 128, 128, 8, 1.0, 3, 500),
    (5, 128, 128, 6, 0.0, 4, 5),
    (0, 128, 128, 2, 0.0, 0, 0),
]


@pytest.mark.parametrize("m,k,n,g,skew,empty,total", SIZE_CASES)
@pytest.mark.parametrize("transpose_w", [False, True])
def test_reference_matches_numpy_group_sizes(rng, m, k, n, g, skew, empty, total, transpose_w):
    x = random_array(rng, (m, k), BF16)
    w = random_array(rng, (g, n, k) if transpose_w else (g, k, n), BF16)
    sizes = random_sizes(rng, m, g, skew, empty, total=total)
    f = jax.jit(lambda x, w, s: gemm.grouped_matmul(x, w, s, transpose_w=transpose_w, preferred_element_type=jnp.float32, impl="xla"))
    got = f(x, w, sizes)
    start, end = np_segments(sizes, m)
    close(got, np_grouped(x, w, start, end, transpose_w), 1e-5)
    # ragged_dot itself, where it applies (the group sizes form is its semantics).
    rhs = jnp.swapaxes(w, 1, 2) if transpose_w else w
    close(got, jax.lax.ragged_dot(jnp.asarray(x), rhs, jnp.asarray(sizes), preferred_element_type=jnp.float32), 1e-5)
    bf = jax.jit(lambda x, w, s: gemm.grouped_matmul(x, w, s, transpose_w=transpose_w, impl="xla"))(x, w, sizes)
    assert bf.dtype == jnp.bfloat16 and bf.shape == (m, n)
    close(bf, np_grouped(x, w, start, end, transpose_w), 1e-2)


def test_reference_clips_sizes_past_m(rng):
    x, w = random_array(rng, (40, 128), BF16), random_array(rng, (3, 128, 128), BF16)
    sizes = np.array([30, 25, 10], np.int32)  # sum 65 > 40: the second group is cut, the third is empty
    got = gemm.grouped_matmul(x, w, sizes, preferred_element_type=jnp.float32, impl="xla")
    close(got, np_grouped(x, w, [0, 30, 40], [30, 40, 40]), 1e-5)


@pytest.mark.parametrize("t,k_top,e,alignment", [(40, 4, 8, 128), (100, 2, 16, 64), (1, 1, 4, 128)])
def test_reference_on_fused_mapping_segments(rng, t, k_top, e, alignment):
    """The padded, aligned segments of get_fused_mapping: padding rows (pos_to_expert -1, here zero
    rows of x as expand_to_fused leaves them, or not) and the tail past the real total."""
    idx = random_topk_idx(rng, t, k_top, e, masked=0.2)
    pte, _, _, _, start, end, _, total = get_fused_mapping(idx, e, 0, alignment, impl="xla")
    p = pte.shape[0]
    x = random_array(rng, (p, 128), BF16)
    w = random_array(rng, (e, 128, 256), BF16)
    got = jax.jit(lambda x, w, s, d: gemm.grouped_matmul(x, w, None, s, d, preferred_element_type=jnp.float32, impl="xla"))(x, w, start, end)
    want = np_grouped(x, w, np.asarray(start), np.asarray(end))
    close(got, want, 1e-5)
    assert not np.asarray(got)[int(total) :].any()  # rows outside every segment are zero
    dw = gemm.grouped_matmul_wgrad(x, jnp.asarray(got, jnp.bfloat16), None, start, end, preferred_element_type=jnp.float32, impl="xla")
    close(dw, np_wgrad(x, np.asarray(jnp.asarray(got, jnp.bfloat16)), np.asarray(start), np.asarray(end)), 1e-5)


def test_reference_unsorted_segments_with_gaps(rng):
    m = 700
    start = np.array([500, 0, 128, 650, 0], np.int32)
    end = np.array([501, 100, 300, 640, 0], np.int32)  # an inverted and an empty segment give nothing
    x, w = random_array(rng, (m, 128), BF16), random_array(rng, (5, 128, 128), BF16)
    got = gemm.grouped_matmul(x, w, None, start, end, preferred_element_type=jnp.float32, impl="xla")
    close(got, np_grouped(x, w, start, end), 1e-5)


@pytest.mark.parametrize("m,k,n,g,skew,empty,total", SIZE_CASES)
def test_wgrad_reference_matches_numpy(rng, m, k, n, g, skew, empty, total):
    x, dy = random_array(rng, (m, k), BF16), random_array(rng, (m, n), BF16)
    sizes = random_sizes(rng, m, g, skew, empty, total=total)
    got = jax.jit(lambda a, b, s: gemm.grouped_matmul_wgrad(a, b, s, preferred_element_type=jnp.float32, impl="xla"))(x, dy, sizes)
    start, end = np_segments(sizes, m)
    want = np_wgrad(x, dy, start, end)
    close(got, want, 1e-5)
    assert got.shape == (g, k, n)
    for j in np.flatnonzero(end <= start):
        assert not np.asarray(got[j]).any()  # empty groups give zeros


# ---------------------------------------------------------------------------------------------
# The M-tile table.


def check_table(table: np.ndarray, start: np.ndarray, end: np.ndarray, m: int) -> None:
    """Every row in exactly one used tile; a tile has at most BLOCK_M rows, all in one segment (its
    group) or in none (group -1); unused entries are (-1, 0, 0)."""
    owner = np.full(m, -1)
    for g, (s, e) in enumerate(zip(start, end)):
        owner[min(max(s, 0), m) : min(max(e, 0), m)] = g
    covered = np.zeros(m, int)
    for g, r0, r1 in table:
        assert 0 <= r0 <= r1 <= m and r1 - r0 <= S.BLOCK_M
        if r0 == r1:
            assert g == -1 and r0 == 0
            continue
        assert (owner[r0:r1] == g).all(), (g, r0, r1)
        covered[r0:r1] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("m,g", [(1000, 7), (128, 1), (1, 3), (4096, 32), (129, 2)])
def test_tile_table_covers_rows_once(rng, m, g):
    for draw in range(4):
        if draw % 2 == 0:
            sizes = random_sizes(rng, m, g, skew=float(draw), empty=min(draw, g - 1), total=int(m * rng.uniform(0.5, 1.0)))
            start, end = np_segments(sizes, m)
        else:  # disjoint segments in random order with gaps
            cuts = np.sort(rng.choice(m + 1, size=2 * g, replace=True))
            start, end = cuts[0::2], cuts[1::2]
            perm = rng.permutation(g)
            start, end = start[perm], end[perm]
        table = np.asarray(jax.jit(S.tile_table, static_argnums=2)(jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32), m))
        assert table.shape == (S.max_tiles(m, g), 3)
        check_table(table, np.asarray(start), np.asarray(end), m)


# ---------------------------------------------------------------------------------------------
# Gradients on CPU (the custom VJP's ops, which lower to their references here) against jax.grad of
# the reference, for the forms the contract's cases do not take.


@pytest.mark.parametrize("transpose_w", [False, True])
def test_grad_of_segments_matches_reference_grad(rng, transpose_w):
    m, k, n, g = 400, 128, 256, 3
    start, end = np.array([0, 128, 384], np.int32), np.array([100, 300, 390], np.int32)
    x = random_array(rng, (m, k), BF16)
    w = random_array(rng, (g, n, k) if transpose_w else (g, k, n), BF16)
    c = jnp.asarray(random_array(rng, (m, n), np.float32))

    def grads(impl):
        def loss(x, w):
            return jnp.sum(gemm.grouped_matmul(x, w, None, start, end, transpose_w=transpose_w, impl=impl).astype(jnp.float32) * c)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    (dx, dw), (dx_ref, dw_ref) = grads(None), grads("xla")
    close(dx, dx_ref, 1e-2)
    close(dw, dw_ref, 1e-2)
    outside = np.ones(m, bool)
    for s, e in zip(start, end):
        outside[s:e] = False
    assert not np.asarray(dx)[outside].any()  # rows outside every segment get zero gradient
    # and the float64 truth: dx[r] = c[r] · w[g]ᵀ, dw[g] = x_gᵀ · c_g
    c_bf = np.asarray(c.astype(jnp.bfloat16))
    close(dx, np_grouped(c_bf, w, start, end, not transpose_w), 1e-2)
    want_dw = np_wgrad(c_bf, x, start, end) if transpose_w else np_wgrad(x, c_bf, start, end)
    close(dw, want_dw, 1e-2)


def test_grad_of_zero_rows():
    x, w = jnp.zeros((0, 128), jnp.bfloat16), jnp.ones((2, 128, 128), jnp.bfloat16)
    dx, dw = jax.grad(lambda x, w: jnp.sum(gemm.grouped_matmul(x, w, jnp.zeros((2,), jnp.int32)).astype(jnp.float32)), argnums=(0, 1))(x, w)
    assert dx.shape == (0, 128) and not np.asarray(dw).any()


# ---------------------------------------------------------------------------------------------
# Argument errors and the contract.

X = ST((64, 128), jnp.bfloat16)
W = ST((2, 128, 256), jnp.bfloat16)
SIZES = ST((2,), jnp.int32)

BAD_INPUTS = [
    ((ST((64,), jnp.bfloat16), W, SIZES), {}, ValueError, "x must be"),
    ((X, ST((2, 256, 256), jnp.bfloat16), SIZES), {}, ValueError, "takes K = 256"),
    ((X, ST((2, 128, 256), jnp.float16), SIZES), {}, ValueError, "one dtype"),
    ((X, W, ST((3,), jnp.int32)), {}, ValueError, "3 groups but w has 2"),
    ((X, W, ST((2,), jnp.float32)), {}, ValueError, "integer"),
    ((X, W), {}, ValueError, "give group_sizes"),
    ((X, W, SIZES, SIZES, SIZES), {}, ValueError, "not both"),
    ((X, W, None, SIZES, ST((3,), jnp.int32)), {}, ValueError, "one shape"),
    ((X, W, None, ST((2,), jnp.int64 if jax.config.jax_enable_x64 else jnp.int16), SIZES), {}, ValueError, "int32"),
    ((X, W, SIZES), dict(impl="tilelang", transpose_w=True), ValueError, "takes K"),
    ((ST((64, 64), jnp.bfloat16), ST((2, 64, 256), jnp.bfloat16), SIZES), dict(impl="tilelang"), ValueError, "multiple of 128"),
    ((ST((64, 128), jnp.float32), ST((2, 128, 256), jnp.float32), SIZES), dict(impl="tilelang"), ValueError, "bfloat16 or float16"),
]


class TestGroupedMatmul(OpContract):
    fn = gemm.grouped_matmul
    differentiable = (0, 1)
    bad_inputs = BAD_INPUTS


class TestGroupedMatmulWgrad(OpContract):
    fn = gemm.grouped_matmul_wgrad
    bad_inputs = [
        ((X, ST((32, 256), jnp.bfloat16), SIZES), {}, ValueError, "same M"),
        ((X, ST((64, 256), jnp.float16), SIZES), {}, ValueError, "one dtype"),
        ((ST((64, 200), jnp.bfloat16), ST((64, 256), jnp.bfloat16), SIZES), dict(impl="tilelang"), ValueError, "multiple of 128"),
    ]


def test_config_heuristics_and_overrides():
    op = gemm.grouped_matmul.ops[0]
    x, tiles = ST((1000, 7168), jnp.bfloat16), ST((S.max_tiles(1000, 8), 3), jnp.int32)
    seg = ST((8,), jnp.int32)
    assert op.config_for(x, ST((8, 7168, 4096), jnp.bfloat16), seg, seg, tiles, transpose_w=False, out_dtype="bfloat16").block_n == 256
    assert op.config_for(x, ST((8, 7168, 384), jnp.bfloat16), seg, seg, tiles, transpose_w=False, out_dtype="bfloat16").block_n == 128
    fn = gemm.grouped_matmul.with_config(stages=3)
    assert fn.ops[0].config_for(x, ST((8, 7168, 4096), jnp.bfloat16), seg, seg, tiles, transpose_w=False, out_dtype="bfloat16").stages == 3
    with pytest.raises(ValueError, match="no config field"):
        gemm.grouped_matmul.with_config(block_q=1)


# ---------------------------------------------------------------------------------------------
# On the GPU.


def _segments_case(rng, m, k, n, g, skew):
    sizes = random_sizes(rng, m // 2, g, skew, empty=1)
    padded = -(-sizes // S.BLOCK_M) * S.BLOCK_M
    end = np.minimum(np.cumsum(padded), m).astype(np.int32)
    return (end - np.minimum(padded, end)).astype(np.int32), end


GRAD_FORMS = ("sizes", "segments", "transposed")
GRAD_SHAPE = (1500, 256, 384, 5)  # m, k, n, groups
DEEPSEEK_SHAPES = [(8192, 7168, 4096, 8, 0.0), (16384, 2048, 7168, 32, 1.5)]  # m, k, n, groups, skew


def grad_program(form: str, impl: str):
    """``(grads, abstract args)``: the gradients in x and w of ``sum(grouped_matmul(...) * c)``, with
    the groups as sizes, as segments, or sizes with transposed weights; grads(x, w, c, groups)."""
    m, k, n, g = GRAD_SHAPE
    transpose_w = form == "transposed"

    def grads(x, w, c, groups):
        def loss(x, w):
            return jnp.sum(gemm.grouped_matmul(x, w, *groups, transpose_w=transpose_w, impl=impl).astype(jnp.float32) * c)

        return jax.grad(loss, argnums=(0, 1))(x, w)

    struct = jax.ShapeDtypeStruct
    groups = (None, struct((g,), jnp.int32), struct((g,), jnp.int32)) if form == "segments" else (struct((g,), jnp.int32),)
    return grads, [struct((m, k), BF16), struct((g, n, k) if transpose_w else (g, k, n), BF16), struct((m, n), jnp.float32), groups]


def deepseek_forward(x, w, sizes):
    return gemm.grouped_matmul(x, w, sizes, impl="tilelang")


def deepseek_wgrad(x, dy, sizes):
    return gemm.grouped_matmul_wgrad(x, dy, sizes, preferred_element_type=jnp.float32, impl="tilelang")


def _deepseek_programs(m: int, k: int, n: int, g: int) -> list:
    struct = jax.ShapeDtypeStruct
    sizes = struct((g,), jnp.int32)
    return [(deepseek_forward, (struct((m, k), BF16), struct((g, k, n), BF16), sizes)), (deepseek_wgrad, (struct((m, k), BF16), struct((m, n), BF16), sizes))]


GPU_PROGRAMS = [grad_program(form, "tilelang") for form in GRAD_FORMS] + [
    p for m, k, n, g, _ in DEEPSEEK_SHAPES for p in _deepseek_programs(m, k, n, g)
]


@pytest.mark.gpu
@pytest.mark.parametrize("form", GRAD_FORMS)
def test_gpu_grad_matches_reference(rng, on_gpu, form):
    m, k, n, g = GRAD_SHAPE
    x = random_array(rng, (m, k), BF16)
    w = random_array(rng, (g, n, k) if form == "transposed" else (g, k, n), BF16)
    c = random_array(rng, (m, n), np.float32)
    if form == "segments":
        start, end = _segments_case(rng, m, k, n, g, 1.0)
        groups = (None, start, end)
    else:
        groups = (random_sizes(rng, m, g, 1.0, 1, total=m - 37),)
    got = on_gpu(grad_program(form, "tilelang")[0], x, w, c, groups)
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.jit(grad_program(form, "xla")[0])(x, w, c, groups)
    for a, b in zip(got, want):
        close(a, b, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,g,skew", DEEPSEEK_SHAPES)
def test_gpu_deepseek_shapes(rng, on_gpu, m, k, n, g, skew):
    """Forward and weight gradient at DeepSeek-V3 expert shapes against the float32 reference on the GPU."""
    x = jnp.asarray(random_array(rng, (m, k), BF16))
    w = jnp.asarray(random_array(rng, (g, k, n), BF16))
    sizes = random_sizes(rng, m, g, skew, 0)
    got = on_gpu(deepseek_forward, x, w, sizes)
    want = jax.jit(lambda x, w, s: gemm.grouped_matmul(x, w, s, preferred_element_type=jnp.float32, impl="xla"))(x, w, sizes)
    close(got, want, 1e-2)
    dy = jnp.asarray(random_array(rng, (m, n), BF16))
    got = on_gpu(deepseek_wgrad, x, dy, sizes)
    # Group by group: the reference's masked [G, M, K] operand would not fit beside the other tests.
    one_group = jax.jit(lambda x, d: jnp.matmul(x.T, d, preferred_element_type=jnp.float32, precision="highest"))
    ends = np.cumsum(sizes)
    for g_, (start, end) in enumerate(zip(ends - sizes, ends)):
        close(got[g_], one_group(x[start:end], dy[start:end]), 1e-3)
