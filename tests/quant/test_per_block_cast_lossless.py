"""per_block_cast_lossless: exact FP4 -> FP8 re-blocking against numpy, its rules, lowering, the GPU kernel."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.quant import formats as F
from jax_tilek.quant import per_block_cast_lossless
from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal, np_store_sf

LAYOUT_FLAGS = {"row": (False, False), "col": (True, False), "col_ue8m0": (True, True)}  # (col-major, packed)


def tile_shape(x_block, out_block) -> tuple[int, int]:
    """A CTA's tile: max(bm_out, 32) x max(bk_out, 16384 / tm) elements."""
    tm = max(out_block[0], 32)
    return tm, max(out_block[1], 16384 // tm)


def _flags(layout):
    col, packed = LAYOUT_FLAGS[layout]
    return dict(use_tma_aligned_col_major_sf=col, round_sf=True, use_packed_ue8m0=packed)


def _expand(v, block, shape):
    return np.repeat(np.repeat(v, block[0], 0), block[1], 1)[: shape[0], : shape[1]]


def fp4_input(rng, shape, x_block, layout, exponent=None):
    """FP4 data and power-of-two scales as TileKernels' test makes them: normal values times one
    random power of two (here also a per-row factor up to 2^6), magnitudes clamped to >= max / 2^9,
    quantized in x_block blocks with round_sf. Returns (data, stored sf, logical sf)."""
    base = int(rng.integers(-100, 100)) if exponent is None else exponent
    rows = rng.integers(0, 7, size=(shape[0], 1))
    x = (rng.standard_normal(shape) * np.exp2(base + rows)).astype(np.float32)
    if x.size:
        floor = np.abs(x).max() / 2**9
        x = (np.sign(x) * np.maximum(np.abs(x), floor)).astype(np.float32)
    data, sf = F.quantize_blocks(jnp.asarray(x), "e2m1", x_block, round_sf=True)
    return np.asarray(data), np.asarray(F.store_sf(sf, layout)), np.asarray(sf)


def np_decode_fp4(data):
    codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(data.shape[0], 2 * data.shape[1])
    return codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def np_exponents(sf):
    return ((sf.astype(np.float32).view(np.uint32) >> 23) & 0xFF).astype(np.int64)


def np_lossless(data, sf_logical, x_block, out_block):
    """The op's definition in numpy: (e4m3 data, logical fp32 output scales)."""
    values = np_decode_fp4(data).astype(np.float64)
    t, h = values.shape
    e_elem = _expand(np_exponents(sf_logical), x_block, (t, h))
    mo, ko = F.num_blocks((t, h), out_block)
    padded = np.zeros((mo * out_block[0], ko * out_block[1]), np.int64)
    padded[:t, :h] = e_elem
    e_out = np.maximum(padded.reshape(mo, out_block[0], ko, out_block[1]).max(axis=(1, 3)) - 6, 0)
    v = values * np.exp2((e_elem - _expand(e_out, out_block, (t, h))).astype(np.float64))
    v = np.where(np.abs(v) <= 2.0**-11, np.copysign(0.0, v), v)  # e4m3 rounds these to zero
    q = v.astype(np.float32).astype(ml_dtypes.float8_e4m3fn)  # float32 is exact here: 2 significant bits
    return q, (e_out.astype(np.uint32) << 23).view(np.float32)


def _check_result(data, sf_logical, x_block, out_block, layout, result, lossless=True):
    q, sf_out = np_lossless(data, sf_logical, x_block, out_block)
    out_data, out_sf = (np.asarray(r) for r in result)
    assert_bytes_equal(out_sf, np_store_sf(sf_out, layout))
    assert_bytes_equal(out_data, q)
    if lossless and data.size:  # the dequantized FP8 equals the dequantized FP4, bit for bit
        back8 = out_data.astype(np.float32) * _expand(sf_out, out_block, out_data.shape)
        back4 = np_decode_fp4(data) * _expand(sf_logical, x_block, out_data.shape)
        assert_bytes_equal(back8, back4)


# ---------------------------------------------------------------------------------------------
# CPU: the reference path.

BLOCK_PAIRS = [((1, 32), (1, 128)), ((1, 32), (32, 32)), ((1, 32), (128, 128)), ((32, 32), (128, 128)), ((1, 128), (1, 128))]


def _pair_id(pair):
    return f"{pair[0][0]}x{pair[0][1]}-{pair[1][0]}x{pair[1][1]}"


@pytest.mark.parametrize("pair", BLOCK_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("in_layout", list(LAYOUT_FLAGS))
@pytest.mark.parametrize("out_layout", list(LAYOUT_FLAGS))
def test_reference_matches_numpy(rng, pair, in_layout, out_layout):
    x_block, out_block = pair
    for shape in [(1, 128), (37, 160), (130, 256), (0, 128)]:
        data, sf, logical = fp4_input(rng, shape, x_block, in_layout)
        result = per_block_cast_lossless(
            (jnp.asarray(data), jnp.asarray(sf)), "e4m3", x_block, out_block, **_flags(out_layout), x_sf_layout=in_layout, impl="xla"
        )
        _check_result(data, logical, x_block, out_block, out_layout, result)


def test_exponent_range_edges(rng):
    """Scales near both ends of the exponent range: E_out saturates at 0 (the fp32 output scale is 0.0)."""
    for exponent in (-128, -124, 110):
        data, sf, logical = fp4_input(rng, (64, 256), (1, 32), "row", exponent=exponent)
        result = per_block_cast_lossless((data, sf), "e4m3", (1, 32), (32, 32), x_sf_layout="row", impl="xla")
        _check_result(data, logical, (1, 32), (32, 32), "row", result, lossless=exponent > -124)


def violating_input(rng, shape=(4, 256)):
    """FP4 data whose (1, 32) scales span up to 2^40 inside a (1, 128) block (and one 0.0 scale):
    E_in + 5 < E_out for many blocks."""
    data = rng.integers(0, 256, size=(shape[0], shape[1] // 2), dtype=np.uint8)
    exponents = 100 - rng.integers(0, 40, size=(shape[0], shape[1] // 32))
    exponents[0, 1] = 0
    sf = (exponents.astype(np.uint32) << 23).view(np.float32)
    return data, sf


def test_violating_scales_round_to_nearest(rng):
    data, sf = violating_input(rng)
    result = per_block_cast_lossless((data, sf), "e4m3", (1, 32), (1, 128), x_sf_layout="row", impl="xla")
    _check_result(data, sf, (1, 32), (1, 128), "row", result, lossless=False)
    q = np.asarray(result[0]).astype(np.float32)
    e_in = _expand(np_exponents(sf), (1, 32), q.shape)
    e_out = _expand(np_exponents(np.asarray(result[1])), (1, 128), q.shape)
    exact = np_decode_fp4(data) * np.exp2((e_in - e_out).astype(np.float64))
    ok = e_in - e_out >= -8
    np.testing.assert_array_equal(q[ok], exact[ok])  # still exact down to E_out - 8 (e4m3 subnormals)
    assert np.all(q[e_in - e_out < -12] == 0)  # flushed to zero below E_out - 12


def test_layout_inference(rng):
    data, sf, logical = fp4_input(rng, (8, 512), (1, 32), "col_ue8m0")
    a = per_block_cast_lossless((data, sf), "e4m3", (1, 32), (1, 128), impl="xla")
    b = per_block_cast_lossless((data, logical), "e4m3", (1, 32), (1, 128), impl="xla")
    assert_bytes_equal(a[0], b[0])
    square = jax.ShapeDtypeStruct((8, 8), jnp.float32)  # 8 tokens x 256 channels: row [8, 8] or col [8, 8]
    with pytest.raises(ValueError, match="could be row-major or column-major; say which with x_sf_layout"):
        jax.eval_shape(lambda d, s: per_block_cast_lossless((d, s), "e4m3", (1, 32), (1, 128)), jax.ShapeDtypeStruct((8, 128), jnp.uint8), square)


def test_abstract_eval_shapes():
    d, s = jax.eval_shape(
        lambda d, s: per_block_cast_lossless((d, s), "e4m3", (1, 32), (128, 128), True, True, True),
        jax.ShapeDtypeStruct((300, 288), jnp.uint8), jax.ShapeDtypeStruct((300, 18), jnp.float32),
    )  # fmt: skip
    assert (d.shape, d.dtype) == ((300, 576), jnp.float8_e4m3fn) and (s.shape, s.dtype) == ((2, 4), jnp.int32)


def _call(fmt="e4m3", xb=(1, 32), ob=(1, 128), data=(4, 64), sf=(4, 4), sf_dtype=jnp.float32, **kw):
    return lambda: jax.eval_shape(
        lambda d, s: per_block_cast_lossless((d, s), fmt, xb, ob, **kw),
        jax.ShapeDtypeStruct(data, jnp.uint8 if len(data) == 2 else jnp.uint8), jax.ShapeDtypeStruct(sf, sf_dtype),
    )  # fmt: skip


@pytest.mark.parametrize(
    "call,message",
    [
        (_call(fmt="e2m1"), "fmt must be 'e4m3'"),
        (_call(xb=(1, 16), ob=(1, 128)), r"x_block_size must be \(bm, bk\) with bm in \(1, 32, 128\), bk in \(32, 64, 128\)"),
        (_call(ob=(64, 128)), r"out_block_size must be \(bm, bk\)"),
        (_call(xb=(32, 32), ob=(1, 128), sf=(1, 4)), "must be a multiple of x_block_size"),
        (_call(xb=(1, 128), ob=(1, 64), sf=(4, 1)), "must be a multiple of x_block_size"),
        (_call(data=(4, 40), sf=(4, 3)), r"hidden size \(80\) must be a multiple of 32"),
        (_call(data=(4, 4, 64)), r"x's data must be \[num_tokens, hidden / 2\]"),
        (_call(sf=(4, 5)), "match no layout"),
        (_call(sf=(4, 8), x_sf_layout="col"), r"x's scales in layout 'col' must be float32 \[4, 4\]"),
        (_call(sf=(1, 4), sf_dtype=jnp.int32, x_sf_layout="row"), "x's scales in layout 'row' must be float32"),
        (_call(x_sf_layout="tiled"), "x_sf_layout must be"),
        (_call(use_packed_ue8m0=True), "use_packed_ue8m0 needs use_tma_aligned_col_major_sf"),
    ],
)
def test_bad_inputs_raise_at_trace_time(call, message):
    with pytest.raises(ValueError, match=message):
        call()


_D, _S = jnp.zeros((4, 64), jnp.uint8), jnp.ones((4, 4), jnp.float32)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (1.0, 32.0), (1, 128)), TypeError, r"per_block_cast_lossless: x_block_size must be a pair \(bm, bk\) of integers, got \(1.0, 32.0\)"),
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (1, 32), 128), TypeError, "per_block_cast_lossless: out_block_size must be a pair"),
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (1, 32), (1, 128, 1)), ValueError, r"per_block_cast_lossless: out_block_size must be a pair \(bm, bk\), got \(1, 128, 1\)"),
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (0, 128), (1, 128)), ValueError, r"per_block_cast_lossless: x_block_size must be \(bm, bk\) with bm in"),
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (1, 0), (1, 128)), ValueError, r"per_block_cast_lossless: x_block_size must be \(bm, bk\) with bm in"),
        (lambda: per_block_cast_lossless(_D, "e4m3", (1, 32), (1, 128)), TypeError, r"per_block_cast_lossless: x must be a QuantTensor, a pair \(data, sf\), got ArrayImpl"),
        (lambda: per_block_cast_lossless((_D,), "e4m3", (1, 32), (1, 128)), TypeError, "per_block_cast_lossless: x must be a QuantTensor"),
        (lambda: per_block_cast_lossless((_D.tolist(), _S), "e4m3", (1, 32), (1, 128)), TypeError, "per_block_cast_lossless: x's data must be an array, got list"),
        (lambda: per_block_cast_lossless((_D, None), "e4m3", (1, 32), (1, 128)), TypeError, "per_block_cast_lossless: x's scales must be an array, got NoneType"),
        (lambda: per_block_cast_lossless((_D, _S), None, (1, 32), (1, 128)), ValueError, "per_block_cast_lossless: only e2m1 -> e4m3 is lossless"),
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (1, 32), (1, 128), "no"), TypeError, "per_block_cast_lossless: use_tma_aligned_col_major_sf must be True or False"),
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (1, 32), (1, 128), x_sf_layout=["row"]), ValueError, "per_block_cast_lossless: x_sf_layout must be"),
        (lambda: per_block_cast_lossless((_D, _S), "e4m3", (1, 32), (1, 128), impl="cuda"), ValueError, "per_block_cast_lossless: impl must be one of"),
    ],
)  # fmt: skip
def test_misuse_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_extents_beyond_the_kernel_are_rejected_at_trace_time():
    data, sf = jax.ShapeDtypeStruct((1, 2**30), jnp.uint8), jax.ShapeDtypeStruct((1, 2**26), jnp.float32)  # H = 2^31
    fn = lambda d, s: per_block_cast_lossless((d, s), "e4m3", (1, 32), (1, 128), x_sf_layout="row")  # noqa: E731
    with pytest.raises(ValueError, match="per_block_cast_lossless: the output data has 2147483648 elements along axis 1"):
        jax.eval_shape(fn, data, sf)


# Token counts whose token tiles exceed grid y's 65,535 take one flat grid (the kernel's extents are
# 64-bit where an index could pass 2^31). (T, H, x_block, out_block, input sf layout, output sf layout)
LARGE = [
    (65535 * 32 + 1, 32, (1, 32), (1, 128), "row", "col_ue8m0"),
    (3_000_000, 256, (1, 32), (32, 32), "col_ue8m0", "row"),
    (65536 * 128 + 1, 64, (32, 32), (128, 128), "col", "col"),
]


@pytest.mark.parametrize("t,h,x_block,out_block,in_layout,out_layout", LARGE, ids=lambda v: str(v))
def test_large_token_counts_take_a_flat_grid(t, h, x_block, out_block, in_layout, out_layout):
    tm, tk = tile_shape(x_block, out_block)
    m_tiles, k_tiles = -(-t // tm), -(-h // tk)
    in_sf = F.sf_storage_shape(in_layout, F.num_blocks((t, h), x_block))
    text = lower_for_cuda(
        lambda d, s: per_block_cast_lossless((d, s), "e4m3", x_block, out_block, **_flags(out_layout), x_sf_layout=in_layout),
        jax.ShapeDtypeStruct((t, h // 2), jnp.uint8), jax.ShapeDtypeStruct(*in_sf),
    )  # fmt: skip
    (k,) = decode_record(tilek_calls(text)[0]["launch"])["kernels"]
    assert m_tiles > 65535 and k["grid"] == [m_tiles * k_tiles, 1, 1]
    assert sorted(a[1] for a in k["args"] if a[0] == 0) == [0, 1, 2, 3]
    wide = (m_tiles + 1) * tm * (k_tiles + 1) * tk * 4 >= 2**31  # the launch's rule
    assert all(a[1] == (8 if wide else 4) for a in k["args"] if a[0] == 2)  # 64-bit extents only when needed


@pytest.mark.parametrize("t,h,wide", [(16384, 7168, False), (65536, 7168, False), (2**31 // 32, 32, True), (2**17, 2**14, True)])
def test_extents_are_32_bit_unless_the_shape_needs_64(t, h, wide):
    """Ordinary shapes keep the 32-bit index arithmetic (the fast code); 64-bit extents only for
    shapes where an index could pass 2^31."""
    x_block, out_block = (1, 32), (128, 128)
    in_sf = F.sf_storage_shape("row", F.num_blocks((t, h), x_block))
    text = lower_for_cuda(
        lambda d, s: per_block_cast_lossless((d, s), "e4m3", x_block, out_block, **_flags("row"), x_sf_layout="row"),
        jax.ShapeDtypeStruct((t, h // 2), jnp.uint8), jax.ShapeDtypeStruct(*in_sf),
    )  # fmt: skip
    (k,) = decode_record(tilek_calls(text)[0]["launch"])["kernels"]
    assert {a[1] for a in k["args"] if a[0] == 2} == {8 if wide else 4}


def test_uint8_data_is_required():
    with pytest.raises(ValueError, match="packed e2m1 uint8"):
        jax.eval_shape(
            lambda d, s: per_block_cast_lossless((d, s), "e4m3", (1, 32), (1, 128), x_sf_layout="row"),
            jax.ShapeDtypeStruct((4, 64), jnp.int8), jax.ShapeDtypeStruct((4, 4), jnp.float32),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The op contract over the named calls (not row-wise: blocks span tokens); the GPU configurations
# (each one cubin) are its calls on [131, 2080].


class TestPerBlockCastLossless(OpContract):
    fn = per_block_cast_lossless
    bad_inputs = [
        (((jax.ShapeDtypeStruct((4, 40), jnp.uint8), jax.ShapeDtypeStruct((4, 3), jnp.float32)),),
         dict(fmt="e4m3", x_block_size=(1, 32), out_block_size=(1, 128)), ValueError, r"hidden size \(80\) must be a multiple of 32"),
    ]  # fmt: skip


def _cfg(case) -> tuple:
    """(x_block, out_block, input sf layout, output sf layout) of a named call."""
    kw = case.kwargs
    out_layout = next(k for k, v in LAYOUT_FLAGS.items() if v == (kw["use_tma_aligned_col_major_sf"], kw["use_packed_ue8m0"]))
    return tuple(kw["x_block_size"]), tuple(kw["out_block_size"]), kw["x_sf_layout"], out_layout


GPU_CONFIGS = [c for c in per_block_cast_lossless.cases if c.name.endswith("_131x2080") and not c.config]
GPU_FOLD = [c for c in per_block_cast_lossless.cases if c.name.endswith("_131x2080") and c.config]
GPU_SHAPES = [(0, 7168), (1, 576), (131, 7168), (300, 2080), (4001, 4096)]


@pytest.mark.parametrize("case", GPU_CONFIGS, ids=lambda c: c.name)
def test_lowers_to_one_launch(case):
    x_block, out_block, in_layout, out_layout = _cfg(case)
    for t, h in [(131, 2080), (0, 256)]:
        in_sf = F.sf_storage_shape(in_layout, F.num_blocks((t, h), x_block))
        text = lower_for_cuda(
            lambda d, s: per_block_cast_lossless((d, s), "e4m3", x_block, out_block, **_flags(out_layout), x_sf_layout=in_layout),
            jax.ShapeDtypeStruct((t, h // 2), jnp.uint8), jax.ShapeDtypeStruct(*in_sf),
        )  # fmt: skip
        (call,) = tilek_calls(text)
        assert call["has_cubin"]
        record = decode_record(call["launch"])
        assert record["num_buffers"] == 4
        if t == 0:
            assert record["kernels"] == [] and record["zero_fill"] == [2, 3]
            continue
        (k,) = record["kernels"]
        tm, tk = tile_shape(x_block, out_block)
        assert k["grid"] == [-(-h // tk), -(-t // tm), 1] and k["block"] == [256, 1, 1]
        assert sorted(a[1] for a in k["args"] if a[0] == 0) == [0, 1, 2, 3]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CONFIGS, ids=lambda c: c.name)
def test_kernel_is_exact(on_gpu, rng, case):
    x_block, out_block, in_layout, out_layout = _cfg(case)
    cases = [fp4_input(rng, shape, x_block, in_layout) for shape in GPU_SHAPES]
    if x_block == (1, 32) and in_layout == "row":
        bad_data, bad_sf = violating_input(rng, (33, 1024))
        cases.append((bad_data, bad_sf, bad_sf))
    args = [a for data, sf, _ in cases for a in (data, sf)]

    def program(*a):
        return [
            per_block_cast_lossless((d, s), "e4m3", x_block, out_block, **_flags(out_layout), x_sf_layout=in_layout, impl="tilelang")
            for d, s in zip(a[::2], a[1::2])
        ]

    outs = on_gpu(program, *args)
    for i, ((data, _, logical), result) in enumerate(zip(cases, outs)):
        _check_result(data, logical, x_block, out_block, out_layout, result, lossless=i < len(GPU_SHAPES))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_FOLD, ids=lambda c: c.name)
def test_flat_grid_kernel_is_exact(on_gpu, rng, case):
    """The flat grid (``fold``) forced on the usual shapes."""
    x_block, out_block, in_layout, out_layout = _cfg(case)
    cases = [fp4_input(rng, shape, x_block, in_layout) for shape in GPU_SHAPES]
    args = [a for data, sf, _ in cases for a in (data, sf)]
    call = case.call(per_block_cast_lossless, "tilelang")
    outs = on_gpu(lambda *a: [call((d, s)) for d, s in zip(a[::2], a[1::2])], *args)
    for (data, _, logical), result in zip(cases, outs):
        _check_result(data, logical, x_block, out_block, out_layout, result)


@pytest.mark.gpu
def test_kernel_beyond_grid_y_is_exact(on_gpu, rng):
    (case,) = [c for c in per_block_cast_lossless.cases if c.name.endswith("_2097152x32")]  # 65,537 token tiles of 32
    x_block, out_block, in_layout, out_layout = _cfg(case)
    t, h = case.args[0][0].shape[0], case.args[0][0].shape[1] * 2
    data, sf, logical = fp4_input(rng, (t, h), x_block, in_layout)
    result = on_gpu(lambda d, s: case.call(per_block_cast_lossless, "tilelang")((d, s)), data, sf)
    _check_result(data, logical, x_block, out_block, out_layout, result)
