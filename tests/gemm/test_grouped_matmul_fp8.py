"""FP8 grouped GEMM (grouped_matmul_fp8, grouped_matmul_wgrad_fp8, grouped_matmul_quantized): the
references against independent float64 numpy dequantization on fresh random codes (the three
x-scale layouts, both weight layouts, group sizes and segments, segments across the 128-row scale
blocks, empty groups, M = 0), their agreement with the bf16 products of the values jax_tilek.quant's
casts quantized, the straight-through gradients (FP8 and bf16 backward), argument errors, the op
contract (kernels compiled for sm_90a; the generated CUDA runs e4m3 wgmma; the overlapped promotion
releases a stage only after its wgmma; the persistent kernel's roles loop over tiles on their own), and
on a GPU the kernels at DeepSeek-V3 shapes, the overlapped promotion and the persistent grid against the
default schedule, and the gradients of the quantized matmul."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_tilek
from jax_tilek import gemm, quant
from jax_tilek.gemm._grouped_matmul_fp8 import (SMEM_LIMIT, grouped_matmul_fp8_kernel, grouped_matmul_fp8_one_tile_kernel, quantized_operands, random_blocks, resolve, shared_bytes,
                                               x_sf_storage)  # fmt: skip
from jax_tilek.gemm._grouped_wgrad import random_sizes
from jax_tilek.gemm._grouped_wgrad_fp8 import grouped_wgrad_fp8_kernel
from jax_tilek.quant import formats
from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, over_arrays, random_array, tilek_calls

BF16, E4M3 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
ST = jax.ShapeDtypeStruct


# ---------------------------------------------------------------------------------------------
# Independent numpy math (float64).


def np_x_scales(x_sf, layout: str, m: int, kb: int) -> np.ndarray:
    """x's scales ``[M, K/128]`` from their storage (float64)."""
    s = np.asarray(x_sf)
    if layout == "row":
        return s.astype(np.float64)
    if layout == "col":
        return s[:, :m].T.astype(np.float64)
    exponents = np.ascontiguousarray(s[:, :m].T).astype("<i4").view(np.uint8).reshape(m, s.shape[0] * 4)[:, :kb]  # byte j of word i: block 4i + j
    return np.exp2(exponents.astype(np.float64) - 127)


def np_dequantized(x, x_sf, w, w_sf, layout: str, transpose_w: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``x[M, K]`` and ``w[G, K, N]``: the codes times their block scales."""
    m, k = x.shape
    x64 = np.asarray(x).astype(np.float64) * np.repeat(np_x_scales(x_sf, layout, m, k // 128), 128, axis=1)
    w64 = np.asarray(w).astype(np.float64) * np.repeat(np.repeat(np.asarray(w_sf, np.float64), 128, axis=1), 128, axis=2)
    return x64, (np.swapaxes(w64, 1, 2) if transpose_w else w64)


def np_grouped(x64, w64, start, end) -> np.ndarray:
    out = np.zeros((x64.shape[0], w64.shape[2]))
    for g in range(w64.shape[0]):
        s, e = max(int(start[g]), 0), min(int(end[g]), x64.shape[0])
        if s < e:
            out[s:e] = x64[s:e] @ w64[g]
    return out


def np_segments(sizes, m: int) -> tuple[np.ndarray, np.ndarray]:
    end = np.minimum(np.cumsum(np.maximum(sizes, 0)), m)
    return np.minimum(end - np.maximum(sizes, 0), m), end


def close(actual, expected, rel: float) -> None:
    """Within ``rel`` of the largest magnitude."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape
    np.testing.assert_allclose(a, e, rtol=0, atol=rel * max(float(np.abs(e).max(initial=0.0)), 1.0))


# ---------------------------------------------------------------------------------------------
# The reference against numpy.


@pytest.mark.parametrize("layout", ["row", "col", "col_ue8m0"])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("m,k,n,g,skew,empty,total", [(300, 640, 256, 4, 0.0, 1, 260), (77, 256, 384, 3, 2.0, 0, 77), (0, 128, 128, 2, 0.0, 0, 0)])
def test_reference_matches_numpy(rng, layout, transpose_w, m, k, n, g, skew, empty, total):
    x, x_sf, w, w_sf = quantized_operands(rng, m, k, n, g, transpose_w=transpose_w, layout=layout)
    sizes = random_sizes(rng, m, g, skew, empty, total=total)
    f = jax.jit(lambda *a: gemm.grouped_matmul_fp8(*a, transpose_w=transpose_w, preferred_element_type=jnp.float32, impl="xla"))
    got = f(x, x_sf, w, w_sf, sizes)
    want = np_grouped(*np_dequantized(x, x_sf, w, w_sf, layout, transpose_w), *np_segments(sizes, m))
    close(got, want, 1e-5)  # fp32 sums of K products in XLA's order vs float64: ~sqrt(K) ulps
    bf = jax.jit(lambda *a: gemm.grouped_matmul_fp8(*a, transpose_w=transpose_w, impl="xla"))(x, x_sf, w, w_sf, sizes)
    assert bf.dtype == jnp.bfloat16 and bf.shape == (m, n)
    close(bf, want, 1e-2)


def test_reference_on_unsorted_segments_with_gaps(rng):
    m, k, n = 700, 256, 128
    start = np.array([500, 0, 128, 650, 0], np.int32)
    end = np.array([501, 100, 300, 640, 0], np.int32)  # an inverted and an empty segment give nothing
    x, x_sf, w, w_sf = quantized_operands(rng, m, k, n, 5, transpose_w=True, layout="col")
    got = gemm.grouped_matmul_fp8(x, x_sf, w, w_sf, None, start, end, transpose_w=True, preferred_element_type=jnp.float32, impl="xla")
    close(got, np_grouped(*np_dequantized(x, x_sf, w, w_sf, "col", True), start, end), 1e-5)


@pytest.mark.parametrize("flags,layout", [(dict(), "row"), (dict(use_tma_aligned_col_major_sf=True), "col"),
                                          (dict(use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True), "col_ue8m0")])  # fmt: skip
@pytest.mark.parametrize("transpose_w", [False, True])
def test_casts_of_jax_tilek_quant_feed_it(rng, flags, layout, transpose_w):
    """The scales exactly as quant.per_token_cast and quant.per_block_cast store them (the layout told
    from their shape): the FP8 product is the product of the dequantized values, and the bf16 product
    of the unquantized ones within FP8's rounding."""
    m, k, n, g = 333, 640, 384, 3
    x = random_blocks(rng, (m, k), (1, 128))
    w = random_blocks(rng, (g * (n if transpose_w else k), k if transpose_w else n), (128, 128))
    x8, x_sf = quant.per_token_cast(x, "e4m3", 128, impl="xla", **flags)
    w8, w_sf = quant.per_block_cast(w, "e4m3", (128, 128), impl="xla")
    w, w8 = (a.reshape(g, -1, a.shape[1]) for a in (w, w8))
    w_sf = w_sf.reshape(g, w.shape[1] // 128, w.shape[2] // 128)
    sizes = random_sizes(rng, m, g, 1.0, 0)
    got = gemm.grouped_matmul_fp8(x8, x_sf, w8, w_sf, sizes, transpose_w=transpose_w, preferred_element_type=jnp.float32, impl="xla")
    exact = gemm.grouped_matmul(x, w, sizes, transpose_w=transpose_w, preferred_element_type=jnp.float32, impl="xla")
    close(got, exact, 0.05)  # e4m3 keeps 3 mantissa bits: a few percent per product, averaging out over K
    close(got, np_grouped(*np_dequantized(x8, x_sf, w8, w_sf, layout, transpose_w), *np_segments(sizes, m)), 1e-5)


# ---------------------------------------------------------------------------------------------
# grouped_matmul_wgrad_fp8: per-channel FP8 operands, transposed.


def channel_quantized(rng, m: int, cols: int) -> tuple[jax.Array, jax.Array]:
    """e4m3 codes ``[cols, m]`` and fp32 scales ``[m/128, cols]`` of random per-(128 rows, channel) data."""
    codes, sf = formats.quantize_blocks(random_blocks(rng, (m, cols), (128, 1)), "e4m3", (128, 1))
    return codes.T, sf


def np_channel_dequantized(codes_t, sf) -> np.ndarray:
    """float64 ``[M, C]`` from transposed codes ``[C, M]`` and per-channel scales ``[M/128, C]``."""
    return np.asarray(codes_t).astype(np.float64).T * np.repeat(np.asarray(sf, np.float64), 128, axis=0)


def np_wgrad(a64, b64, start, end) -> np.ndarray:
    out = np.zeros((len(start), a64.shape[1], b64.shape[1]))
    for g, (s, e) in enumerate(zip(start, end)):
        out[g] = a64[max(s, 0) : max(e, s)].T @ b64[max(s, 0) : max(e, s)]
    return out


@pytest.mark.parametrize("m,k,n,groups", [
    (384, 256, 128, ("sizes", [100, 0, 200, 50])),  # segments start and end inside 128-row blocks
    (256, 128, 256, ("sizes", [30, 40])),  # two segments inside one block
    (512, 128, 128, ("segments", [0, 128, 384], [128, 384, 512])),  # aligned (a fused mapping's)
    (640, 256, 128, ("segments", [300, 5, 640], [600, 290, 640])),  # unsorted, gaps, one empty
    (0, 128, 128, ("sizes", [0, 0])),
])  # fmt: skip
def test_wgrad_fp8_reference_matches_numpy(rng, m, k, n, groups):
    x_t, x_sf = channel_quantized(rng, m, k)
    dy_t, dy_sf = channel_quantized(rng, m, n)
    form, *values = groups
    groups = (np.array(values[0], np.int32),) if form == "sizes" else (None, *(np.array(v, np.int32) for v in values))
    start, end = np_segments(groups[0], m) if form == "sizes" else groups[1:]
    got = gemm.grouped_matmul_wgrad_fp8(x_t, x_sf, dy_t, dy_sf, *groups, preferred_element_type=jnp.float32, impl="xla")
    want = np_wgrad(np_channel_dequantized(x_t, x_sf), np_channel_dequantized(dy_t, dy_sf), start, end)
    close(got, want, 1e-5)


def test_wgrad_fp8_of_quant_casts_is_the_bf16_wgrad(rng):
    """quant.per_channel_cast_and_transpose of bf16 x and dy feeds it; the result is the bf16 weight
    gradient within FP8's rounding (each product term off by at most 2 x 2^-4 relative)."""
    m, k, n = 512, 256, 384
    x, dy = random_array(rng, (m, k), BF16), random_array(rng, (m, n), BF16)
    sizes = np.array([130, 0, 250, 100], np.int32)
    x_t, x_sf = quant.per_channel_cast_and_transpose(x, "e4m3", impl="xla")
    dy_t, dy_sf = quant.per_channel_cast_and_transpose(dy, "e4m3", impl="xla")
    got = gemm.grouped_matmul_wgrad_fp8(x_t, x_sf, dy_t, dy_sf, sizes, preferred_element_type=jnp.float32, impl="xla")
    start, end = np_segments(sizes, m)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    bound = np_wgrad(np.abs(x64), np.abs(dy64), start, end) * 2 * 2.0**-4 + 1e-6
    assert np.all(np.abs(np.asarray(got, np.float64) - np_wgrad(x64, dy64, start, end)) <= bound)


# grouped_matmul_quantized: quant's casts, then the FP8 product; gradients straight through.


@pytest.mark.parametrize("transpose_w", [False, True])
def test_quantized_is_the_fp8_product_of_the_casts(rng, transpose_w):
    m, k, n, g = 260, 384, 256, 3
    x = random_blocks(rng, (m, k), (1, 128))
    w = random_blocks(rng, (g * (n if transpose_w else k), k if transpose_w else n), (128, 128)).reshape(g, -1, k if transpose_w else n)
    sizes = random_sizes(rng, m, g, 0.5, 0, total=250)
    got = jax.jit(lambda x, w, s: gemm.grouped_matmul_quantized(x, w, s, transpose_w=transpose_w))(x, w, sizes)
    x8, x_sf = quant.per_token_cast(x, "e4m3", 128, impl="xla")
    w8, w_sf = quant.per_block_cast(w.reshape(-1, w.shape[2]), "e4m3", (128, 128), impl="xla")
    w8, w_sf = w8.reshape(w.shape), w_sf.reshape(g, w.shape[1] // 128, w.shape[2] // 128)
    want = gemm.grouped_matmul_fp8(x8, x_sf, w8, w_sf, sizes, transpose_w=transpose_w, impl="xla")
    jax_tilek.testing.assert_bytes_equal(got, want, "quantized")


def quantized_grad_case(rng, form: str):
    """``(x, w, groups, c, transpose_w)`` for the gradient tests: bf16 operands, groups as sizes,
    segments or sizes with transposed weights, a float32 cotangent."""
    m, k, n, g = 400, 256, 384, 3
    transpose_w = form == "transposed"
    x = random_blocks(rng, (m, k), (1, 128))
    w = random_blocks(rng, (g * (n if transpose_w else k), k if transpose_w else n), (128, 128)).reshape(g, -1, k if transpose_w else n)
    groups = (None, np.array([0, 128, 384], np.int32), np.array([100, 300, 390], np.int32)) if form == "segments" else (np.array([150, 0, 200], np.int32),)
    return x, w, groups, jnp.asarray(random_array(rng, (m, n), np.float32)), transpose_w


def quantized_grads(fn, x, w, groups, c, transpose_w, **options):
    loss = lambda x, w: jnp.sum(fn(x, w, *groups, transpose_w=transpose_w, **options).astype(jnp.float32) * c)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("form", ["sizes", "segments", "transposed"])
def test_quantized_bf16_backward_is_grouped_matmuls(rng, impl, form):
    """fp8_backward=False, straight through the casts: d/dx and d/dw of sum(out · c) are
    grouped_matmul's: bit for bit by its custom VJP's ops (impl=None), within bf16 rounding of JAX's
    own derivative of its reference (impl="xla", which grouped_matmul differentiates directly)."""
    *case, transpose_w = quantized_grad_case(rng, form)
    got = quantized_grads(gemm.grouped_matmul_quantized, *case, transpose_w, impl=impl, fp8_backward=False)
    for got, want in zip(got, quantized_grads(gemm.grouped_matmul, *case, transpose_w, impl=impl)):
        if impl is None:
            jax_tilek.testing.assert_bytes_equal(got, want, form)
        else:
            close(got, want, 1e-2)


@pytest.mark.parametrize("form", ["sizes", "segments", "transposed"])
def test_quantized_fp8_backward(rng, form):
    """The FP8 backward is, bit for bit, dx = grouped_matmul_fp8 of dy cast per token and the forward's
    block-cast w, and dw = grouped_matmul_wgrad_fp8 of x and dy cast per channel (rows padded to
    128); and within FP8's rounding of the bf16 gradients."""
    x, w, groups, c, transpose_w = quantized_grad_case(rng, form)
    dx, dw = quantized_grads(gemm.grouped_matmul_quantized, x, w, groups, c, transpose_w)
    m, pad = x.shape[0], -x.shape[0] % 128
    dy = c.astype(jnp.bfloat16)
    dy8, dy_sf = quant.per_token_cast(dy, "e4m3", 128, impl="xla")
    w_kn = jnp.swapaxes(w, 1, 2) if transpose_w else w
    w8, w_sf = quant.per_block_cast(w_kn.reshape(-1, w_kn.shape[2]), "e4m3", (128, 128), impl="xla")
    g, kk, nn = w_kn.shape
    want_dx = gemm.grouped_matmul_fp8(dy8, dy_sf, w8.reshape(g, kk, nn), w_sf.reshape(g, kk // 128, nn // 128), *groups, transpose_w=True, impl="xla")
    x_t, x_sf = quant.per_channel_cast_and_transpose(jnp.pad(x, ((0, pad), (0, 0))), "e4m3", impl="xla")
    dy_t, dy_t_sf = quant.per_channel_cast_and_transpose(jnp.pad(dy, ((0, pad), (0, 0))), "e4m3", impl="xla")
    pairs = ((dy_t, dy_t_sf, x_t, x_sf) if transpose_w else (x_t, x_sf, dy_t, dy_t_sf))
    want_dw = gemm.grouped_matmul_wgrad_fp8(*pairs, *groups, impl="xla")
    # x's row count (400) is not a multiple of 128: the padded rows belong to no group.
    assert m % 128 and want_dx.shape == dx.shape and want_dw.shape == dw.shape
    jax_tilek.testing.assert_bytes_equal(dx, want_dx, "dx")
    jax_tilek.testing.assert_bytes_equal(dw, want_dw, "dw")
    for got, want in zip((dx, dw), quantized_grads(gemm.grouped_matmul, x, w, groups, c, transpose_w, impl="xla")):
        close(got, want, 0.1)


# ---------------------------------------------------------------------------------------------
# Argument errors, configuration, the contract.

X, W, W_SF = ST((64, 256), E4M3), ST((2, 256, 384), E4M3), ST((2, 2, 3), jnp.float32)
X_SF = ST((64, 2), jnp.float32)
SIZES = ST((2,), jnp.int32)

BAD_FP8 = [
    ((ST((64, 256), BF16), X_SF, W, W_SF, SIZES), {}, ValueError, "must be float8_e4m3fn"),
    ((X, X_SF, ST((2, 384, 256), E4M3), W_SF, SIZES), {}, ValueError, "takes K = 384"),
    ((ST((64, 192), E4M3), ST((64, 2), jnp.float32), ST((2, 192, 384), E4M3), W_SF, SIZES), {}, ValueError, "K must be a positive multiple of 128"),
    ((X, X_SF, ST((2, 256, 200), E4M3), W_SF, SIZES), {}, ValueError, "N must be a positive multiple of 128"),
    ((X, X_SF, W, ST((2, 3, 2), jnp.float32), SIZES), {}, ValueError, r"w_sf must be float32 \[2, 2, 3\]"),
    ((X, X_SF, W, W_SF, SIZES), dict(transpose_w=True), ValueError, "takes K = 384"),
    ((X, ST((64, 2), jnp.int32), W, W_SF, SIZES), {}, ValueError, "x_sf must be x's 1 x 128 scales"),
    ((X, ST((2, 63), jnp.float32), W, W_SF, SIZES), {}, ValueError, "x_sf must be x's 1 x 128 scales"),
    ((X, X_SF, W, W_SF, SIZES), dict(x_sf_layout="col"), ValueError, r"col: float32\[2, 64\]"),
    ((X, X_SF, W, W_SF, SIZES), dict(x_sf_layout="blocks"), ValueError, "x_sf_layout must be one of"),
    ((ST((4, 512), E4M3), ST((4, 4), jnp.float32), ST((2, 512, 384), E4M3), ST((2, 4, 3), jnp.float32), SIZES), {}, ValueError,
     "could be 'row' or 'col'"),
    ((X, X_SF, W, W_SF, SIZES), dict(preferred_element_type=jnp.float16), ValueError, "bfloat16 or float32"),
    ((X, X_SF, W, W_SF, ST((3,), jnp.int32)), {}, ValueError, "3 groups but w has 2"),
    ((X, X_SF, W, W_SF), {}, ValueError, "give group_sizes"),
]


class TestGroupedMatmulFp8(OpContract):
    fn = gemm.grouped_matmul_fp8
    bad_inputs = BAD_FP8


class TestGroupedMatmulQuantized(OpContract):
    fn = gemm.grouped_matmul_quantized
    differentiable = (0, 1)
    bad_inputs = [
        ((X, W, SIZES), {}, ValueError, "must be bfloat16"),
        ((ST((64, 256), BF16), ST((2, 384, 256), BF16), SIZES), {}, ValueError, "takes K = 384"),
        ((ST((64, 64), BF16), ST((2, 64, 256), BF16), SIZES), {}, ValueError, "K must be a positive multiple of 128"),
        ((ST((64, 256), BF16), ST((3, 256, 256), BF16), SIZES), {}, ValueError, "2 groups but w has 3"),
    ]


XT, XT_SF, DYT, DYT_SF = ST((256, 128), E4M3), ST((1, 256), jnp.float32), ST((384, 128), E4M3), ST((1, 384), jnp.float32)


class TestGroupedMatmulWgradFp8(OpContract):
    fn = gemm.grouped_matmul_wgrad_fp8
    bad_inputs = [
        ((ST((256, 128), BF16), XT_SF, DYT, DYT_SF, SIZES), {}, ValueError, "must be float8_e4m3fn"),
        ((XT, XT_SF, ST((384, 256), E4M3), DYT_SF, SIZES), {}, ValueError, "with the same M"),
        ((ST((256, 100), E4M3), XT_SF, ST((384, 100), E4M3), DYT_SF, SIZES), {}, ValueError, "M must be a multiple of 128"),
        ((ST((200, 128), E4M3), ST((1, 200), jnp.float32), DYT, DYT_SF, SIZES), {}, ValueError, "K must be a positive multiple of 128"),
        ((XT, ST((256, 1), jnp.float32), DYT, DYT_SF, SIZES), {}, ValueError, r"x_sf must be float32 \[1, 256\]"),
        ((XT, XT_SF, DYT, ST((1, 384), jnp.int32), SIZES), {}, ValueError, r"dy_sf must be float32 \[1, 384\]"),
        ((XT, XT_SF, DYT, DYT_SF, SIZES), dict(preferred_element_type=jnp.float16), ValueError, "bfloat16 or float32"),
        ((XT, XT_SF, DYT, DYT_SF), {}, ValueError, "give group_sizes"),
    ]


def test_ambiguous_scales_are_taken_as_told(rng):
    """x_sf of 4 rows and K = 512: [4, 4] is row-major or column-major storage; x_sf_layout says which."""
    x, x_sf, w, w_sf = quantized_operands(rng, 4, 512, 128, 1, transpose_w=True, layout="row")
    sizes = np.array([4], np.int32)
    row = gemm.grouped_matmul_fp8(x, x_sf, w, w_sf, sizes, transpose_w=True, x_sf_layout="row", impl="xla")
    col = gemm.grouped_matmul_fp8(x, x_sf.T, w, w_sf, sizes, transpose_w=True, x_sf_layout="col", impl="xla")
    jax_tilek.testing.assert_bytes_equal(row, col, "layouts")


def test_config_and_overrides():
    op = gemm.grouped_matmul_fp8.ops[0]
    structs = (ST((64, 256), E4M3), ST((2, 64), jnp.float32), ST((2, 384, 256), E4M3), ST((2, 3, 2), jnp.float32), SIZES, SIZES, ST((5, 3), jnp.int32))
    assert op.config_for(*structs, x_sf_layout="col", out_dtype="bfloat16") == gemm.GroupedMatmulFp8Config()
    assert gemm.grouped_matmul_fp8.with_config(stages=4).ops[0].config_for(*structs, x_sf_layout="col", out_dtype="bfloat16").stages == 4
    assert gemm.grouped_matmul_quantized.with_config(stages=3).ops[0].config_for(*structs, x_sf_layout="col", out_dtype="bfloat16").stages == 3
    with pytest.raises(ValueError, match="no config field"):
        gemm.grouped_matmul_fp8.with_config(block_n=256)


WGMMA_E4M3 = "wgmma_ss<tl::DataType::kFloat8_e4m3, tl::DataType::kFloat8_e4m3, tl::DataType::kFloat32, 64, 128, 32,"


@pytest.mark.parametrize("case", [c for c in gemm.grouped_matmul_fp8.cases if not c.bench], ids=lambda c: c.name)
def test_kernels_run_e4m3_wgmma_warp_specialized(case):
    """What the contract's cases compile for sm_90a: e4m3 x e4m3 -> fp32 wgmma (m64n128k32, the two
    consumer warpgroups 64 rows each) fed by TMA (x, w; x's scales too with sf_load="tma") from a producer warpgroup,
    within the shared memory a CTA may have."""
    call, structs = over_arrays(case.call(gemm.grouped_matmul_fp8), case.structs())
    with jax_tilek.record_kernels() as log:
        (lowered,) = tilek_calls(lower_for_cuda(call, *structs))
    (params,) = [p for name, p, _, _ in log if name.endswith("grouped_matmul_fp8_kernel")]
    artifact = grouped_matmul_fp8_kernel.artifact(params, "sm_90a", record=False)
    assert artifact.spec.kernels[0].block == (384, 1, 1) and artifact.spec.kernels[0].smem <= 227 * 1024
    assert sorted(t.tensor for t in artifact.spec.tma) == ["w", "x"] + (["x_sf"] if params["sf_load"] == "tma" else [])
    assert WGMMA_E4M3 in artifact.source and "warpgroup_reg_alloc" in artifact.source
    assert not re.search(r"wgmma_ss<tl::DataType::kBFloat16", artifact.source)
    assert lowered["has_cubin"]
    stores = [line for line in artifact.source.splitlines() if "stmatrix" in line]
    assert bool(stores) == (params["out_dtype"] != "float32")  # bf16 tiles leave through shared memory
    # Swizzled: an unswizzled [128, 128] bf16 tile puts stmatrix's 8 rows 128 elements (256 bytes) apart,
    # in the same banks.
    assert not any("& 15) * 128)" in line for line in stores)


@pytest.mark.parametrize("case", [c for c in gemm.grouped_matmul_wgrad_fp8.cases if not c.bench], ids=lambda c: c.name)
def test_wgrad_kernel_runs_e4m3_wgmma_warp_specialized(case):
    """The weight-gradient kernel: e4m3 wgmma (m64n128k32) on TMA-loaded transposed codes and both
    operands' per-channel scales, warp-specialized, within a CTA's shared memory."""
    call, structs = over_arrays(case.call(gemm.grouped_matmul_wgrad_fp8), case.structs())
    with jax_tilek.record_kernels() as log:
        (lowered,) = tilek_calls(lower_for_cuda(call, *structs))
    (params,) = [p for name, p, _, _ in log if name.endswith("grouped_wgrad_fp8_kernel")]
    artifact = grouped_wgrad_fp8_kernel.artifact(params, "sm_90a", record=False)
    assert artifact.spec.kernels[0].block == (384, 1, 1) and artifact.spec.kernels[0].smem <= 227 * 1024
    assert {"a_t", "b_t", "a_sf", "b_sf"} <= {t.tensor for t in artifact.spec.tma}
    assert WGMMA_E4M3 in artifact.source and "warpgroup_reg_alloc" in artifact.source
    assert lowered["has_cubin"]


# ---------------------------------------------------------------------------------------------
# On the GPU.

DEEPSEEK_SHAPES = [(8192, 7168, 4096, 8, 0.0, "col"), (16384, 2048, 7168, 32, 1.5, "col_ue8m0")]  # m, k, n, groups, skew, x_sf layout
GRAD_FORMS = ("sizes", "segments", "transposed")
GRAD_SHAPE = (1500, 256, 384, 5)  # m, k, n, groups


def deepseek_fp8(x, x_sf, w, w_sf, sizes):
    return gemm.grouped_matmul_fp8(x, x_sf, w, w_sf, sizes, transpose_w=True, impl="tilelang")


def quantized_program(form: str, impl: str):
    """``(fn, abstract args)``: the value and the gradients in x and w of ``sum(out · c)`` for
    grouped_matmul_quantized, with the groups as sizes, segments, or sizes with transposed weights."""
    m, k, n, g = GRAD_SHAPE
    transpose_w = form == "transposed"

    def value_and_grads(x, w, c, groups):
        def loss(x, w):
            return jnp.sum(gemm.grouped_matmul_quantized(x, w, *groups, transpose_w=transpose_w, impl=impl).astype(jnp.float32) * c)

        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    groups = (None, ST((g,), jnp.int32), ST((g,), jnp.int32)) if form == "segments" else (ST((g,), jnp.int32),)
    return value_and_grads, [ST((m, k), BF16), ST((g, n, k) if transpose_w else (g, k, n), BF16), ST((m, n), jnp.float32), groups]


def _deepseek_args(m, k, n, g, layout):
    sf_shape, sf_dtype = x_sf_storage(m, k)[layout]
    return (ST((m, k), E4M3), ST(sf_shape, sf_dtype), ST((g, n, k), E4M3), ST((g, n // 128, k // 128), jnp.float32), ST((g,), jnp.int32))


# GroupedMatmulFp8Config.overlap on small cases: groups of any size (one empty), rows past the last
# group, an odd, an even and a single K block, both x-scale layouts, both output dtypes, both sf_loads.
OVERLAP_CASES = [  # m, k, n, group sizes, x_sf layout, out dtype, sf_load
    (700, 640, 256, (130, 0, 301, 200), "col", "bfloat16", "ldg"),
    (700, 512, 384, (0, 257, 128, 250), "col_ue8m0", "float32", "ldg"),
    (333, 128, 256, (100, 0, 200), "col", "float32", "tma"),
    (520, 896, 128, (1, 0, 300, 190), "col_ue8m0", "bfloat16", "tma"),
]


def two_configs_program(out: str, first: dict, second: dict):
    """``(x, x_sf, w, w_sf, sizes) -> (product, product)``: the FP8 product (w as ``[G, N, K]``, an
    ``out`` result) with config ``first`` and with ``second``."""

    def both(x, x_sf, w, w_sf, sizes):
        def product(config: dict):
            fp8 = gemm.grouped_matmul_fp8.with_config(**config)
            return fp8(x, x_sf, w, w_sf, sizes, transpose_w=True, preferred_element_type=out, impl="tilelang")

        return product(first), product(second)

    return both


def overlap_program(out: str, sf_load: str, **options):
    """The product with ``overlap`` (and the config's ``options``) and without it (the promotion after
    each block's wgmma), both with ``sf_load``."""
    return two_configs_program(out, dict(sf_load=sf_load, overlap=True, **options), dict(sf_load=sf_load, overlap=False))


# GroupedMatmulFp8Config.blocks_per_stage=2: 2, 4, 8 and 16 K blocks (one to eight stages a tile, the
# ring's phases wrapping), UE8M0 words that span two stages, both output dtypes, empty groups and rows
# past the last group.
PAIR_CASES = [  # m, k, n, group sizes, x_sf layout, out dtype, stages
    (700, 512, 256, (130, 0, 301, 200), "col", "bfloat16", 3),
    (520, 256, 384, (1, 0, 300, 190), "col_ue8m0", "float32", 3),
    (333, 1024, 256, (100, 0, 200), "col_ue8m0", "bfloat16", 2),
    (3000, 2048, 1024, (700, 0, 523, 1000, 401, 300), "col", "bfloat16", 3),
]


@pytest.mark.parametrize("k,n,layout,out,stages", [c[1:3] + c[4:] for c in PAIR_CASES])
def test_pair_stages_wait_and_release_once(k, n, layout, out, stages):
    """blocks_per_stage=2 for sm_90a: the consumers wait once per stage (one full barrier for its six
    TMA loads), run K block 2p's wgmma then 2p + 1's, each waited for (wait_wgmma<0>), with no branch
    on their parity, and release the stage once, after both."""
    params = dict(k=k, n=n, sf_layout=layout, out_dtype=out, stages=stages, sf_load="tma", overlap=True, blocks_per_stage=2)
    artifact = grouped_matmul_fp8_kernel.artifact(params, "sm_90a", record=False)
    assert artifact.spec.kernels[0].smem == shared_bytes(gemm.GroupedMatmulFp8Config(stages=stages, blocks_per_stage=2), out)
    source = artifact.source
    producer = source[source.index("for (int kp = 0") : source.index("warpgroup_reg_alloc")]
    assert producer.count("tl::tma_load(") == 6 and producer.count("arrive_and_expect_tx") == 1
    loop = source[source.index("for (int kp_1 = 0") :]
    loop = loop[: loop.index("int condval_", loop.index("wait_wgmma"))]
    events = re.findall(r"\]\.wait\(|warpgroup_commit_batch|wait_wgmma<\d+>|warpgroup_wait<\d+>|\]\.arrive\(\)", loop)
    assert events == ["].wait("] + ["warpgroup_commit_batch", "wait_wgmma<0>"] * 2 + ["].arrive()"]
    assert "% 2" not in loop and WGMMA_E4M3 in source


@pytest.mark.parametrize("config, k", [(dict(blocks_per_stage=2), 640), (dict(blocks_per_stage=3, stages=2), 768),
                                       (dict(blocks_per_stage=2, stages=3, sf_load="ldg"), 768),
                                       (dict(blocks_per_stage=2, stages=3, overlap=False), 768),
                                       (dict(blocks_per_stage=2, stages=2, persistent=True), 640)])  # fmt: skip
def test_pair_stages_need_tma_overlap_and_even_blocks(config, k):
    fp8 = gemm.grouped_matmul_fp8.with_config(**config)
    with pytest.raises(ValueError, match='blocks_per_stage must be 1, or 2 with sf_load="tma", overlap=True and an even number'):
        lower_for_cuda(lambda *a: fp8(*a, transpose_w=True, impl="tilelang"), *_deepseek_args(300, k, 256, 2, "col"))


@pytest.mark.parametrize("k,n,layout,out,sf_load", [(k, n, lay, out, sfl) for _, k, n, _, lay, out, sfl in OVERLAP_CASES])
def test_overlap_releases_a_stage_after_its_wgmma(k, n, layout, out, sf_load):
    """overlap=True for sm_90a: asynchronous wgmma (none of TileLang's own waits) in two branches, each
    waiting for its wgmma (wait_wgmma<0>) before the consumers release the stage to the producer."""
    params = dict(k=k, n=n, sf_layout=layout, out_dtype=out, stages=6, sf_load=sf_load, overlap=True)
    source = grouped_matmul_fp8_kernel.artifact(params, "sm_90a", record=False).source
    consumer = source[source.index("warpgroup_reg_alloc") :]
    events = re.findall(r"warpgroup_commit_batch|wait_wgmma<\d+>|warpgroup_wait<\d+>|\]\.arrive\(\)", consumer)
    assert events[:4] == ["warpgroup_commit_batch", "wait_wgmma<0>"] * 2
    assert events[4:] and set(events[4:]) == {"].arrive()"}
    assert WGMMA_E4M3 in source


def split_pair_program(out: str, config: dict):
    """The product with two K blocks a stage in the hand-split kernel ``config`` names (persistent, or
    multicast on a CTA a tile) and with one K block a stage and a CTA a tile (TileLang's roles)."""
    return two_configs_program(out, dict(blocks_per_stage=2, **config), dict(blocks_per_stage=1))


# GroupedMatmulFp8Config.persistent on small cases, with few CTAs assumed (JAX_TILEK_NUM_SMS) so that
# each runs many tiles, the ring's clock running on across them: empty groups, rows past the last group,
# M not a multiple of 128, odd, even and single K blocks, both layouts, dtypes, sf_loads and schedules;
# and the GPU's own CTA count at a DeepSeek-like down projection (K = 2048).
PERSISTENT_CASES = [  # m, k, n, group sizes, x_sf layout, out dtype, sf_load, overlap, stages, SMs assumed (None: the GPU's)
    (700, 640, 256, (130, 0, 301, 200), "col", "bfloat16", "tma", True, 5, 3),
    (700, 512, 384, (0, 257, 128, 250), "col_ue8m0", "float32", "ldg", True, 6, 7),
    (333, 128, 256, (100, 0, 200), "col", "float32", "tma", False, 3, 2),
    (520, 896, 128, (1, 0, 300, 190), "col_ue8m0", "bfloat16", "ldg", False, 4, 5),
    (3000, 2048, 1024, (700, 0, 523, 1000, 401, 300), "col", "bfloat16", "tma", True, 5, None),
]


def persistent_program(out: str, sf_load: str, overlap: bool, stages: int, **options):
    """The product with ``persistent`` (a ``stages``-deep ring, and the persistent grid's ``options``:
    ``multicast``, ``pingpong``) and with one CTA per tile (the default depth), both with ``sf_load``
    and ``overlap``."""
    schedule = dict(sf_load=sf_load, overlap=overlap)
    return two_configs_program(out, dict(schedule, persistent=True, stages=stages, **options), schedule)


@pytest.mark.parametrize("k,n,layout,out,sf_load,overlap,stages", [c[1:3] + c[4:9] for c in PERSISTENT_CASES])
def test_persistent_kernel_loops_over_tiles(k, n, layout, out, sf_load, overlap, stages):
    """persistent=True for sm_90a: a grid of ``ctas`` CTAs whose producer and consumer warpgroups each
    set their registers once, then loop over the CTA's tiles; the ring's clock (its K-block count) starts
    before the tile loop and runs on across tiles; the producer blocks only on the ring's empty barriers
    (no CTA-wide barrier after the mbarriers' init: it loads the next tile's K blocks during the
    consumers' epilogue); the consumers clear the accumulator per tile and release a stage after its
    last wgmma; only the consumers' named barriers guard the bf16 output tile."""
    params = dict(k=k, n=n, sf_layout=layout, out_dtype=out, stages=stages, sf_load=sf_load, overlap=overlap)
    artifact = grouped_matmul_fp8_kernel.artifact(dict(params, persistent=True), "sm_90a", record=False)
    (kern,) = artifact.spec.kernels
    config = gemm.GroupedMatmulFp8Config(stages=stages, sf_load=sf_load, overlap=overlap, persistent=True)
    assert kern.grid == ("ctas", 1, 1) and kern.block == (384, 1, 1) and kern.smem == shared_bytes(config, out) <= SMEM_LIMIT
    assert sorted(t.tensor for t in artifact.spec.tma) == ["w", "x"] + (["x_sf"] if sf_load == "tma" else [])
    source = artifact.source
    assert WGMMA_E4M3 in source and artifact.cubin
    assert source.count("warpgroup_reg_dealloc<24>") == 1 and source.count("warpgroup_reg_alloc<240>") == 1
    start = source.index("warpgroup_reg_dealloc<24>")
    producer, consumer = source[start : source.index("warpgroup_reg_alloc<240>")], source[source.index("warpgroup_reg_alloc<240>") :]
    for role in (producer, consumer):
        assert len(re.findall(r"for \(int it(_\d+)? = 0", role)) == 1  # the role's own tile loop
        assert role.index("blocks = 0;") < role.index("for (int it") < role.index("blocks = (blocks + 1);")
    assert re.findall(r"\.wait\(", producer) == [".wait("] and re.search(r"empty\[[^\]]*\]\.wait\(", producer)
    assert source.count("__syncthreads()") == 1 and source.index("__syncthreads()") < start
    assert re.findall(r"__sync_thread_partial\(\d+, (\d+)\)", consumer) == ["256"] * (2 if out == "bfloat16" else 0)
    assert source.count("__sync_thread_partial") == consumer.count("__sync_thread_partial")
    tile = consumer[consumer.index("for (int it") :]
    assert tile.index("*(float4*)(acc + ") < tile.index("full[")  # the accumulator cleared per tile, before its K blocks
    events = re.findall(r"full\[[^\]]*\]\.wait|warpgroup_commit_batch|wait_wgmma<\d+>|warpgroup_wait<\d+>|empty\[[^\]]*\]\.arrive\(\)", tile)
    events = [e.split("[")[0] for e in events]
    block = ["full"] + (["warpgroup_commit_batch", "wait_wgmma<0>"] * 2 if overlap else ["warpgroup_commit_batch", "warpgroup_wait<0>"])
    assert events[: len(block)] == block and events[len(block)] == "empty" and events.count("empty") == 1
    default = grouped_matmul_fp8_kernel.artifact(params, "sm_90a", record=False)
    assert default.spec.kernels[0].grid == (n // 128, "NT", 1)


def test_persistent_grid_is_a_launch_time_value(monkeypatch):
    """persistent=True launches min(SMs, tiles) CTAs, the SMs the lowering assumes: one cubin for any."""
    m, k, n, g = 700, 640, 256, 4
    fp8 = gemm.grouped_matmul_fp8.with_config(persistent=True, stages=5)
    tiles = n // 128 * (-(-m // 128) + 2 * g + 1)  # (N-tiles) x (the tile table's M-tiles)
    keys, grids = set(), []
    for sms in (7, 132):
        monkeypatch.setenv("JAX_TILEK_NUM_SMS", str(sms))
        (call,) = tilek_calls(lower_for_cuda(lambda *a: fp8(*a, transpose_w=True, impl="tilelang"), *_deepseek_args(m, k, n, g, "col")))
        keys.add(call["cubin_key"])
        grids += [kern["grid"] for kern in decode_record(call["launch"])["kernels"]]
    assert grids == [[7, 1, 1], [tiles, 1, 1]] and len(keys) == 1


@pytest.mark.parametrize("k, config, out, resolved", [
    (7168, dict(), "bfloat16", dict(stages=3, blocks_per_stage=2)),  # DeepSeek-V3's up projection: pairs
    (640, dict(), "bfloat16", dict(stages=6, blocks_per_stage=1)),  # 5 K blocks: one a stage
    (2048, dict(sf_load="ldg"), "float32", dict(stages=6, blocks_per_stage=1)),
    (2048, dict(overlap=False), "bfloat16", dict(stages=6, blocks_per_stage=1)),
    (2048, dict(stages=6), "bfloat16", dict(stages=6, blocks_per_stage=1)),  # six pairs would not fit
    (2048, dict(stages=2), "bfloat16", dict(stages=2, blocks_per_stage=2)),
    (2048, dict(blocks_per_stage=1), "bfloat16", dict(stages=6, blocks_per_stage=1)),
    (2048, dict(persistent=True), "bfloat16", dict(stages=5, blocks_per_stage=1)),  # beside its own output tile
    (2048, dict(persistent=True), "float32", dict(stages=6, blocks_per_stage=1)),
    (2048, dict(persistent=True, blocks_per_stage=2), "bfloat16", dict(stages=2)),  # pairs when asked, beside the output tile
    (7168, dict(multicast=2), "bfloat16", dict(stages=3, blocks_per_stage=2)),  # a CTA a tile: the output tile over the ring
])  # fmt: skip
def test_open_fields_resolve_to_what_fits(k, config, out, resolved):
    """An open ring depth is as many stages as fit, at most 6 K blocks; open K blocks a stage are two
    where the schedule and K allow it and the ring fits."""
    got = resolve(gemm.GroupedMatmulFp8Config(**config), k, out)
    assert got == gemm.GroupedMatmulFp8Config(**{**config, **resolved}) and shared_bytes(got, out) <= SMEM_LIMIT


def test_persistent_needs_room_for_its_output_tile():
    """6 stages (x's scales in the ring) and a bf16 output tile of their own do not fit a CTA's shared
    memory: the lowering says so."""
    config = gemm.GroupedMatmulFp8Config(persistent=True, stages=6)
    assert shared_bytes(config, "bfloat16") > SMEM_LIMIT >= shared_bytes(gemm.GroupedMatmulFp8Config(persistent=True, stages=5), "bfloat16")
    assert shared_bytes(config, "float32") <= SMEM_LIMIT
    assert shared_bytes(gemm.GroupedMatmulFp8Config(persistent=True, sf_load="ldg", stages=6), "bfloat16") <= SMEM_LIMIT
    fp8 = gemm.grouped_matmul_fp8.with_config(persistent=True, stages=6)
    with pytest.raises(ValueError, match="give it fewer stages"):
        lower_for_cuda(lambda *a: fp8(*a, transpose_w=True, impl="tilelang"), *_deepseek_args(300, 256, 256, 2, "col"))


# GroupedMatmulFp8Config.multicast=2 (persistent, clusters of two CTAs sharing the x tile): as
# PERSISTENT_CASES, with an even number of N-tiles, an even CTA count from an odd number of SMs assumed,
# one cluster running every tile (2 SMs), and a DeepSeek-V3 down projection on the GPU's own SMs.
MULTICAST_CASES = [  # m, k, n, group sizes, x_sf layout, out dtype, sf_load, overlap, stages, SMs assumed (None: the GPU's)
    (700, 640, 256, (130, 0, 301, 200), "col", "bfloat16", "tma", True, 5, 4),
    (700, 512, 512, (0, 257, 128, 250), "col_ue8m0", "float32", "ldg", True, 6, 7),
    (333, 128, 256, (100, 0, 200), "col", "float32", "tma", False, 3, 2),
    (520, 896, 256, (1, 0, 300, 190), "col_ue8m0", "bfloat16", "ldg", False, 4, 5),
    (8192, 2048, 7168, (1100, 0, 1337, 900, 1500, 1024, 700, 1200), "col", "bfloat16", "tma", True, 5, None),
]


@pytest.mark.parametrize("k,n,layout,out,sf_load,overlap,stages", [c[1:3] + c[4:9] for c in MULTICAST_CASES])
def test_multicast_kernel_shares_x_across_a_cluster(k, n, layout, out, sf_load, overlap, stages):
    """multicast=2 for sm_90a: clusters of two CTAs; the x tile's one TMA load a multicast to both CTAs
    (mask 0b11) issued by rank 0 alone after each CTA's own expect_tx of its 16 KB, w and x's scales
    unicast; the empty barriers count one arrive per consumer warp and CTA (2 x 8), each warp's lanes 0
    and 1 arriving, after a __syncwarp, on CTA 0's and CTA 1's barrier of the stage; the full barriers
    still one local arrive; a cluster sync after the barriers' init and one at the end, after both roles'
    loops; no CTA-wide __syncthreads."""
    params = dict(k=k, n=n, sf_layout=layout, out_dtype=out, stages=stages, sf_load=sf_load, overlap=overlap, persistent=True)
    artifact = grouped_matmul_fp8_kernel.artifact(dict(params, multicast=2), "sm_90a", record=False)
    (kern,) = artifact.spec.kernels
    config = gemm.GroupedMatmulFp8Config(stages=stages, sf_load=sf_load, overlap=overlap, persistent=True, multicast=2)
    assert kern.grid == ("ctas", 1, 1) and kern.block == (384, 1, 1) and kern.cluster == (2, 1, 1)
    assert kern.smem == shared_bytes(config, out) <= SMEM_LIMIT and artifact.cubin
    assert grouped_matmul_fp8_kernel.artifact(params, "sm_90a", record=False).spec.kernels[0].cluster == (1, 1, 1)
    source = artifact.source
    assert WGMMA_E4M3 in source
    inits = re.findall(r"(full|empty)\[(\d+)\]\.init\((\d+)\);", source)
    assert sorted(inits) == sorted([("full", str(i), "1") for i in range(stages)] + [("empty", str(i), "16") for i in range(stages)])
    start, consumer_start = source.index("warpgroup_reg_dealloc<24>"), source.index("warpgroup_reg_alloc<240>")
    producer, consumer = source[start:consumer_start], source[consumer_start:]
    assert re.findall(r"tl::cluster_sync\(\);", source) == ["tl::cluster_sync();"] * 2 and "__syncthreads()" not in source
    assert source.index("tl::fence_barrier_init();") < source.index("tl::cluster_sync();") < start
    assert consumer.rstrip().endswith("tl::cluster_sync();\n}") and consumer.index("ptx_stmatrix" if out == "bfloat16" else "*(float2*)(out + ") < consumer.index("tl::cluster_sync")
    (multicast,) = re.findall(r"tl::tma_load_multicast\((\w+), full\[\(\(int64_t\)s\)\], .*, \(uint16_t\)\((\d+)\), ", producer)
    assert multicast == ("x_desc", "3") and source.count("tma_load_multicast") == 1
    shared = producer[producer.index("expect_transaction(16384);") :]
    assert shared.index("if (tl::block_rank_in_cluster() == 0) {") < shared.index("tl::tma_load_multicast(x_desc")
    assert sorted(re.findall(r"tl::tma_load\((\w+),", producer)) == sorted(["x_desc", "w_desc"] + (["x_sf_desc"] if sf_load == "tma" else []))
    arrives = re.findall(r"empty\[[^\]]*\]\.arrive\(([^;]*)\);", consumer)
    assert arrives == ["(((int)threadIdx.x) & 31)"] and not re.search(r"empty\[[^\]]*\]\.arrive\(\);", source)
    release = consumer[consumer.index("__syncwarp();") :]
    assert release.index("if ((((int)threadIdx.x) & 31) < 2) {") < release.index("].arrive((((int)threadIdx.x) & 31));") < release.index("blocks = (blocks + 1);")
    tile = consumer[consumer.index("for (int it") :]
    events = re.findall(r"full\[[^\]]*\]\.wait|wait_wgmma<\d+>|warpgroup_wait<\d+>|__syncwarp|empty\[[^\]]*\]\.arrive", tile)
    events = [e.split("[")[0] for e in events]
    block = ["full"] + (["wait_wgmma<0>"] * 2 if overlap else ["warpgroup_wait<0>"]) + ["__syncwarp", "empty"]
    assert events[: len(block)] == block and events.count("empty") == 1


def test_multicast_grid_is_whole_clusters(monkeypatch):
    """multicast=2 launches clusters of two: min(SMs rounded down to even (at least 2), tiles) CTAs."""
    m, k, n, g = 700, 640, 256, 4
    fp8 = gemm.grouped_matmul_fp8.with_config(persistent=True, multicast=2, stages=5)
    tiles = n // 128 * (-(-m // 128) + 2 * g + 1)  # (N-tiles) x (the tile table's M-tiles), even
    keys, launches = set(), []
    for sms in (7, 1, 132):
        monkeypatch.setenv("JAX_TILEK_NUM_SMS", str(sms))
        (call,) = tilek_calls(lower_for_cuda(lambda *a: fp8(*a, transpose_w=True, impl="tilelang"), *_deepseek_args(m, k, n, g, "col")))
        keys.add(call["cubin_key"])
        launches += [(kern["grid"], kern["cluster"]) for kern in decode_record(call["launch"])["kernels"]]
    assert launches == [([6, 1, 1], [2, 1, 1]), ([2, 1, 1], [2, 1, 1]), ([tiles, 1, 1], [2, 1, 1])] and len(keys) == 1


@pytest.mark.parametrize("config,n", [(dict(multicast=2), 384), (dict(multicast=2, persistent=True, stages=5), 384),
                                      (dict(multicast=3, persistent=True, stages=5), 768), (dict(multicast=0), 256)])  # fmt: skip
def test_multicast_needs_pairs_of_n_tiles(config, n):
    """multicast=2 only with an even number of N-tiles (a cluster's two CTAs on N-tiles bn, bn + 1); no
    other cluster size: the lowering says so."""
    fp8 = gemm.grouped_matmul_fp8.with_config(**config)
    with pytest.raises(ValueError, match="multicast must be 1, or 2 with an even number of 128-wide N-tiles"):
        lower_for_cuda(lambda *a: fp8(*a, transpose_w=True, impl="tilelang"), *_deepseek_args(300, 256, n, 2, "col"))


# GroupedMatmulFp8Config.blocks_per_stage=2 in the hand-split kernels: persistent over few CTAs, and
# multicast=2 on a CTA a tile (the bf16 output tile over the idle ring); 4 to 16 K blocks, both layouts
# and output dtypes, empty groups, rows past the last group, the default depth and shallower rings.
SPLIT_PAIR_CASES = [  # m, k, n, group sizes, x_sf layout, out dtype, config, SMs assumed (None: the GPU's)
    (700, 512, 256, (130, 0, 301, 200), "col", "bfloat16", dict(multicast=2), None),
    (520, 1024, 512, (1, 0, 300, 190), "col_ue8m0", "float32", dict(multicast=2, stages=2), None),
    (3000, 2048, 1024, (700, 0, 523, 1000, 401, 300), "col", "bfloat16", dict(multicast=2), None),
    (700, 1024, 256, (130, 0, 301, 200), "col_ue8m0", "bfloat16", dict(persistent=True), 3),
    (3000, 2048, 1024, (700, 0, 523, 1000, 401, 300), "col", "float32", dict(persistent=True, multicast=2), 5),
]


def split_pair_artifact(k, n, layout, out, config):
    """The hand-split kernel that ``config`` with two K blocks a stage launches, and its resolved config."""
    resolved = resolve(gemm.GroupedMatmulFp8Config(blocks_per_stage=2, **config), k, out)
    params = dict(k=k, n=n, sf_layout=layout, out_dtype=out, stages=resolved.stages, sf_load="tma", overlap=True, blocks_per_stage=2,
                  **{key: v for key, v in config.items() if key in ("persistent", "multicast")})  # fmt: skip
    one_tile = not resolved.persistent
    return (grouped_matmul_fp8_one_tile_kernel if one_tile else grouped_matmul_fp8_kernel).artifact(params, "sm_90a", record=False), resolved


@pytest.mark.parametrize("k,n,layout,out,config", [c[1:3] + c[4:7] for c in SPLIT_PAIR_CASES])
def test_split_kernels_take_two_blocks_a_stage(k, n, layout, out, config):
    """blocks_per_stage=2 in the hand-split kernels for sm_90a: per stage the producer waits once for
    its empty barrier and loads both K blocks (x, or x multicast, w and x's scales each) with one arrive;
    the consumers wait once for its full barrier, run K block 2p's wgmma then 2p + 1's, each waited for,
    with no branch on their parity, then release the stage once. On a CTA a tile the bf16 output tile
    lies over the ring (the kernel's shared memory is the ring's), written after a named barrier of
    the consumers."""
    artifact, resolved = split_pair_artifact(k, n, layout, out, config)
    (kern,) = artifact.spec.kernels
    assert kern.grid == ("ctas", 1, 1) and kern.cluster == (resolved.multicast, 1, 1)
    assert kern.smem == shared_bytes(resolved, out) <= SMEM_LIMIT and artifact.cubin
    source = artifact.source
    producer = source[source.index("warpgroup_reg_dealloc<24>") : source.index("warpgroup_reg_alloc<240>")]
    producer = producer[producer.index("for (int kp") :]
    assert producer.count(".wait(") == 1 and producer.count("arrive_and_expect_tx") == 1
    x_load = "tl::tma_load_multicast(x_desc" if resolved.multicast > 1 else "tl::tma_load(x_desc"
    assert producer.count(x_load) == producer.count("tl::tma_load(w_desc") == producer.count("tl::tma_load(x_sf_desc") == 2
    consumer = source[source.index("warpgroup_reg_alloc<240>") :]
    loop = consumer[consumer.index("for (int kp") :]
    loop = loop[: loop.index("blocks = (blocks + 1);")]
    events = re.findall(r"full\[[^\]]*\]\.wait|warpgroup_commit_batch|wait_wgmma<\d+>|warpgroup_wait<\d+>|empty\[[^\]]*\]\.arrive", loop)
    assert [e.split("[")[0] for e in events] == ["full"] + ["warpgroup_commit_batch", "wait_wgmma<0>"] * 2 + ["empty"]
    assert not re.search(r"if \(.*kp\w* (% 2|& 1)", loop) and WGMMA_E4M3 in source
    if out == "bfloat16" and not resolved.persistent:
        assert kern.smem == resolved.stages * 2 * shared_bytes(gemm.GroupedMatmulFp8Config(stages=1), "float32")
        epilogue = consumer[consumer.index("blocks = (blocks + 1);") :]
        assert epilogue.index("tl::__sync_thread_partial(") < epilogue.index("ptx_stmatrix")


def test_multicast_on_a_cta_a_tile_launches_every_tile(monkeypatch):
    """multicast=2 without persistent: the hand-split kernel on a grid of every tile, in clusters of two,
    whatever the SMs; three stages of two K blocks by default (beside nothing: the output tile over the ring)."""
    m, k, n, g = 700, 640 + 128, 256, 4
    fp8 = gemm.grouped_matmul_fp8.with_config(multicast=2)
    tiles = n // 128 * (-(-m // 128) + 2 * g + 1)  # (N-tiles) x (the tile table's M-tiles)
    launches = []
    for sms in (7, 132):
        monkeypatch.setenv("JAX_TILEK_NUM_SMS", str(sms))
        (call,) = tilek_calls(lower_for_cuda(lambda *a: fp8(*a, transpose_w=True, impl="tilelang"), *_deepseek_args(m, k, n, g, "col")))
        launches += [(kern["grid"], kern["cluster"], kern["smem"]) for kern in decode_record(call["launch"])["kernels"]]
    assert resolve(gemm.GroupedMatmulFp8Config(multicast=2), k, "bfloat16") == gemm.GroupedMatmulFp8Config(multicast=2, stages=3, blocks_per_stage=2)
    smem = shared_bytes(gemm.GroupedMatmulFp8Config(multicast=2, stages=3, blocks_per_stage=2), "bfloat16")
    assert launches == [([tiles, 1, 1], [2, 1, 1], smem)] * 2


# GroupedMatmulFp8Config.pingpong (persistent, no overlap: the consumer warpgroups' wgmmas in turn): tiles
# of 0 to 7 K blocks over few CTAs (one CTA running every tile), K = 128 (one block a tile), and a
# DeepSeek-V3 down projection on the GPU's own SMs.
PINGPONG_CASES = [  # m, k, n, group sizes, x_sf layout, out dtype, sf_load, stages, SMs assumed (None: the GPU's)
    (700, 640, 256, (130, 0, 301, 200), "col", "bfloat16", "tma", 5, 4),
    (520, 896, 256, (1, 0, 300, 190), "col_ue8m0", "float32", "ldg", 4, 1),
    (333, 128, 256, (100, 0, 200), "col", "float32", "tma", 3, 3),
    (8192, 2048, 7168, (1100, 0, 1337, 900, 1500, 1024, 700, 1200), "col", "bfloat16", "tma", 5, None),
]


@pytest.mark.parametrize("k,n,layout,out,sf_load,stages", [c[1:3] + c[4:8] for c in PINGPONG_CASES])
def test_pingpong_kernel_takes_turns(k, n, layout, out, sf_load, stages):
    """pingpong for sm_90a: consumer warpgroup 0 waits for its turn on named barrier 10 (but before the
    CTA's first block), warpgroup 1 on barrier 11, each signals the other's turn right after issuing its
    wgmmas and before waiting for them, and warpgroup 0 takes warpgroup 1's last signal at the end, so
    every barrier's arrivals and waits pair up; one partial sum (no overlap)."""
    params = dict(k=k, n=n, sf_layout=layout, out_dtype=out, stages=stages, sf_load=sf_load, overlap=False, persistent=True)
    source = grouped_matmul_fp8_kernel.artifact(dict(params, pingpong=True), "sm_90a", record=False).source
    consumer = source[source.index("tl::warpgroup_reg_alloc<240>()"):]
    issue = consumer.index("tl::warpgroup_commit_batch();")
    turns = [consumer.index(f"tl::__named_barrier_arrive({b}, 256);") for b in (11, 10)]
    waits = [m.start() for m in re.finditer(r"tl::__sync_thread_partial\((1[01]), 256\);", consumer)]
    assert len(waits) == 3 and max(waits[:2]) < consumer.index("tl::wgmma_ss") < issue < min(turns)
    assert max(turns) < consumer.index("tl::wait_wgmma<0>();") and waits[2] > consumer.index("tl::wait_wgmma<0>();")
    assert re.findall(r"tl::__sync_thread_partial\((1[01]), 256\);", consumer) == ["10", "11", "10"]
    assert "part_odd" not in source


@pytest.mark.parametrize("config", [dict(pingpong=True, overlap=False), dict(pingpong=True, persistent=True, stages=5)])
def test_pingpong_needs_persistent_without_overlap(config):
    fp8 = gemm.grouped_matmul_fp8.with_config(**config)
    with pytest.raises(ValueError, match="pingpong needs persistent=True and overlap=False"):
        lower_for_cuda(lambda *a: fp8(*a, transpose_w=True, impl="tilelang"), *_deepseek_args(300, 256, 256, 2, "col"))


WGRAD_SHAPES = [(8192, 7168, 2048, 8, 0.0), (16384, 2048, 7168, 32, 1.5)]  # m, k, n, groups, skew


def deepseek_wgrad_fp8(x_t, x_sf, dy_t, dy_sf, sizes):
    return gemm.grouped_matmul_wgrad_fp8(x_t, x_sf, dy_t, dy_sf, sizes, preferred_element_type=jnp.float32, impl="tilelang")


def _wgrad_args(m, k, n, g):
    return (ST((k, m), E4M3), ST((m // 128, k), jnp.float32), ST((n, m), E4M3), ST((m // 128, n), jnp.float32), ST((g,), jnp.int32))


GPU_PROGRAMS = [quantized_program(form, "tilelang") for form in GRAD_FORMS] + [
    (deepseek_fp8, _deepseek_args(m, k, n, g, layout)) for m, k, n, g, _, layout in DEEPSEEK_SHAPES
] + [(deepseek_wgrad_fp8, _wgrad_args(m, k, n, g)) for m, k, n, g, _ in WGRAD_SHAPES] + [
    (overlap_program(out, sf_load), _deepseek_args(m, k, n, len(sizes), layout)) for m, k, n, sizes, layout, out, sf_load in OVERLAP_CASES
] + [
    (overlap_program(out, "tma", blocks_per_stage=2, stages=stages), _deepseek_args(m, k, n, len(sizes), layout))
    for m, k, n, sizes, layout, out, stages in PAIR_CASES
] + [
    (persistent_program(out, sf_load, overlap, stages), _deepseek_args(m, k, n, len(sizes), layout))
    for m, k, n, sizes, layout, out, sf_load, overlap, stages, _ in PERSISTENT_CASES
] + [
    (persistent_program(out, sf_load, overlap, stages, multicast=2), _deepseek_args(m, k, n, len(sizes), layout))
    for m, k, n, sizes, layout, out, sf_load, overlap, stages, _ in MULTICAST_CASES
] + [
    (persistent_program(out, sf_load, False, stages, pingpong=True), _deepseek_args(m, k, n, len(sizes), layout))
    for m, k, n, sizes, layout, out, sf_load, stages, _ in PINGPONG_CASES
] + [
    (split_pair_program(out, config), _deepseek_args(m, k, n, len(sizes), layout)) for m, k, n, sizes, layout, out, config, _ in SPLIT_PAIR_CASES
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,g,skew,layout", DEEPSEEK_SHAPES)
def test_gpu_deepseek_shapes(rng, on_gpu, m, k, n, g, skew, layout):
    """The kernel at DeepSeek-V3 expert shapes against the dequantized float32 reference (on the GPU)."""
    operands = quantized_operands(rng, m, k, n, g, transpose_w=True, layout=layout)
    sizes = random_sizes(rng, m, g, skew, 0)
    got = on_gpu(deepseek_fp8, *operands, sizes)
    want = jax.jit(lambda *a: gemm.grouped_matmul_fp8(*a, transpose_w=True, preferred_element_type=jnp.float32, impl="xla"))(*operands, sizes)
    close(got, want, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,sizes,layout,out,sf_load", OVERLAP_CASES)
def test_gpu_overlapped_promotion(rng, on_gpu, m, k, n, sizes, layout, out, sf_load):
    """overlap=True does the plain schedule's (overlap=False) float32 arithmetic (the same wgmma, the same fused
    promotions in K order), only issued in another order: the same bytes; and the dequantized
    reference (on the CPU) within the FP8 product's tolerance."""
    check_same_bytes(rng, on_gpu, overlap_program(out, sf_load), m, k, n, sizes, layout, out, "overlap against the plain schedule")


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,sizes,layout,out,stages", PAIR_CASES)
def test_gpu_pair_stages(rng, on_gpu, m, k, n, sizes, layout, out, stages):
    """blocks_per_stage=2 does the plain schedule's float32 arithmetic (the same wgmma, the same fused
    promotions in K order) from a ring of two K blocks a stage: the same bytes; and the dequantized
    reference (on the CPU) within the FP8 product's tolerance."""
    check_same_bytes(rng, on_gpu, overlap_program(out, "tma", blocks_per_stage=2, stages=stages), m, k, n, sizes, layout, out,
                     "two K blocks a stage against the plain schedule")  # fmt: skip


def check_same_bytes(rng, on_gpu, program, m, k, n, sizes, layout, out, what: str) -> None:
    """``program`` (a pair of products) on quantized random operands: its two results have the same
    bytes (``what`` names the pair), and the first meets the dequantized reference (on the CPU) within
    the FP8 product's tolerance."""
    operands = quantized_operands(rng, m, k, n, len(sizes), transpose_w=True, layout=layout)
    sizes = np.array(sizes, np.int32)
    got, other = on_gpu(program, *operands, sizes)
    assert got.dtype == out
    jax_tilek.testing.assert_bytes_equal(got, other, what)
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.jit(lambda *a: gemm.grouped_matmul_fp8(*a, transpose_w=True, preferred_element_type=jnp.float32, impl="xla"))(*operands, sizes)
    close(got, want, 1e-2)


def check_against_one_cta_per_tile(rng, on_gpu, monkeypatch, program, m, k, n, sizes, layout, out, sms, what: str) -> None:
    """:func:`check_same_bytes` of ``program`` (:func:`persistent_program`: the persistent grid and one
    CTA per tile), ``sms`` SMs assumed (None: the GPU's)."""
    if sms is not None:
        monkeypatch.setenv("JAX_TILEK_NUM_SMS", str(sms))
    check_same_bytes(rng, on_gpu, program, m, k, n, sizes, layout, out, f"{what} against one CTA per tile")


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,sizes,layout,out,sf_load,overlap,stages,sms", PERSISTENT_CASES)
def test_gpu_persistent_tiles(rng, on_gpu, monkeypatch, m, k, n, sizes, layout, out, sf_load, overlap, stages, sms):
    """persistent=True runs each tile's arithmetic as one CTA per tile does: the same bytes, with
    ``sms`` CTAs each running several tiles (the ring's phases carried across tiles of 0 to 16 K
    blocks); and the dequantized reference (on the CPU) within the FP8 product's tolerance."""
    check_against_one_cta_per_tile(rng, on_gpu, monkeypatch, persistent_program(out, sf_load, overlap, stages), m, k, n, sizes, layout,
                                   out, sms, "persistent")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,sizes,layout,out,sf_load,stages,sms", PINGPONG_CASES)
def test_gpu_pingpong_tiles(rng, on_gpu, monkeypatch, m, k, n, sizes, layout, out, sf_load, stages, sms):
    """pingpong runs each tile's arithmetic as one CTA per tile does: the same bytes, with the consumer
    warpgroups' turns carried across tiles of 0 to 16 K blocks on ``sms`` CTAs; and the dequantized
    reference (on the CPU) within the FP8 product's tolerance."""
    check_against_one_cta_per_tile(rng, on_gpu, monkeypatch, persistent_program(out, sf_load, False, stages, pingpong=True), m, k, n,
                                   sizes, layout, out, sms, "pingpong")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,sizes,layout,out,sf_load,overlap,stages,sms", MULTICAST_CASES)
def test_gpu_multicast_tiles(rng, on_gpu, monkeypatch, m, k, n, sizes, layout, out, sf_load, overlap, stages, sms):
    """multicast=2 runs each tile's arithmetic as one CTA per tile does: the same bytes, with ``sms``
    rounded down to even CTAs in clusters of two sharing each K block's x tile (the ring's stages
    released to both producers across tiles of 0 to 16 K blocks); and the dequantized reference (on the
    CPU) within the FP8 product's tolerance."""
    check_against_one_cta_per_tile(rng, on_gpu, monkeypatch, persistent_program(out, sf_load, overlap, stages, multicast=2), m, k, n,
                                   sizes, layout, out, sms, "multicast")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,sizes,layout,out,config,sms", SPLIT_PAIR_CASES)
def test_gpu_split_pair_stages(rng, on_gpu, monkeypatch, m, k, n, sizes, layout, out, config, sms):
    """Two K blocks a stage in the hand-split kernels (persistent on ``sms`` CTAs, or multicast=2 on a
    CTA a tile, the output tile over the ring) run each tile's arithmetic as one K block a stage on a CTA
    a tile does: the same bytes; and the dequantized reference (on the CPU) within the FP8 product's
    tolerance."""
    check_against_one_cta_per_tile(rng, on_gpu, monkeypatch, split_pair_program(out, config), m, k, n, sizes, layout, out, sms,
                                   f"two K blocks a stage, {config}")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,g,skew", WGRAD_SHAPES)
def test_gpu_wgrad_deepseek_shapes(rng, on_gpu, m, k, n, g, skew):
    """The weight-gradient kernel at DeepSeek-V3 shapes (groups of any size, so segments start and
    end inside the scales' 128-row blocks) against the dequantized float32 reference on the CPU."""
    operands = (*channel_quantized(rng, m, k), *channel_quantized(rng, m, n))
    sizes = random_sizes(rng, m, g, skew, 0, total=m - 100)
    got = on_gpu(deepseek_wgrad_fp8, *operands, sizes)
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.jit(lambda *a: gemm.grouped_matmul_wgrad_fp8(*a, preferred_element_type=jnp.float32, impl="xla"))(*operands, sizes)
    close(got, want, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("form", GRAD_FORMS)
def test_gpu_quantized_value_and_grads(rng, on_gpu, form):
    m, k, n, g = GRAD_SHAPE
    transpose_w = form == "transposed"
    x = random_blocks(rng, (m, k), (1, 128))
    w = random_blocks(rng, (g * (n if transpose_w else k), k if transpose_w else n), (128, 128)).reshape(g, -1, k if transpose_w else n)
    c = random_array(rng, (m, n), np.float32)
    if form == "segments":
        sizes = random_sizes(rng, m // 2, g, 1.0, empty=1)
        padded = -(-sizes // 128) * 128
        end = np.minimum(np.cumsum(padded), m).astype(np.int32)
        groups = (None, (end - np.minimum(padded, end)).astype(np.int32), end)
    else:
        groups = (random_sizes(rng, m, g, 1.0, 1, total=m - 37),)
    value, grads = on_gpu(quantized_program(form, "tilelang")[0], x, w, c, groups)
    with jax.default_device(jax.devices("cpu")[0]):
        want_value, want_grads = jax.jit(quantized_program(form, "xla")[0])(x, w, c, groups)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-2, atol=1.0)
    for a, b in zip(grads, want_grads):
        close(a, b, 1e-2)
