"""cast_back / per_token_cast_back / per_token_cast_and_cast_back / unpack_from_e2m1fn_x2: reference
against independent numpy math, rules, lowering, and the GPU kernels (bit-exact)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.quant import cast_back, per_token_cast_and_cast_back, per_token_cast_back, unpack_from_e2m1fn_x2
from jax_tilek.quant import formats as F
from jax_tilek.testing import OpContract, decode_record, jit_call, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal, calc_diff

TOLERANCE = {"e4m3": 1e-3, "e2m1": 2e-2, "e5m6": 1e-4}
OUT = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32}


# ---------------------------------------------------------------------------------------------
# Independent math (numpy + ml_dtypes).


def np_values(data: np.ndarray, fmt: str) -> np.ndarray:
    """Stored data -> exact fp32 values."""
    data = np.asarray(data)
    if fmt == "e4m3":
        return data.astype(np.float32)
    raw = data.view(np.uint8)
    t, width = raw.shape
    if fmt == "e2m1":
        codes = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(t, width * 2)
        return codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    # e5m6: eight 12-bit codes per 3 little-endian words, a big-endian bit stream (test_formats checks it)
    w0, w1, w2 = (w[..., 0] for w in np.split(np.ascontiguousarray(raw).reshape(t, width // 12, 12).view("<u4"), 3, axis=-1))
    m = 0xFFF
    codes = np.stack([
        w0 >> 20, (w0 >> 8) & m, ((w0 & 0xFF) << 4) | (w1 >> 28), (w1 >> 16) & m,
        (w1 >> 4) & m, ((w1 & 0xF) << 8) | (w2 >> 24), (w2 >> 12) & m, w2 & m,
    ], axis=-1).reshape(t, width * 2 // 3)  # fmt: skip
    return (codes << 4).astype(np.uint16).view(np.float16).astype(np.float32)


def np_dequantize(data, sf_logical, fmt, block, out) -> np.ndarray:
    values = np_values(data, fmt)
    t, h = values.shape
    sf = np.asarray(sf_logical).astype(np.float32)
    sf = np.repeat(np.repeat(sf, block[0], axis=0), block[1], axis=1)[:t, :h]
    return (values * sf).astype(OUT[out])


def quantized(rng, t, h, fmt, block, layout, e4m3_sf=False):
    """(original x fp32, data, stored sf, logical sf) from formats.quantize_blocks + store_sf."""
    x = rng.standard_normal((t, h), dtype=np.float32) * (64 if e4m3_sf and fmt == "e4m3" else 1)  # e4m3 scales stay normal
    data, sf = jit_call(F.quantize_blocks, x, fmt, block, round_sf=layout in ("col_ue8m0", "ue8m0_along_m"), use_e4m3_sf=e4m3_sf)
    return x, np.asarray(data), np.asarray(jit_call(F.store_sf, sf, layout)), np.asarray(sf)


# ---------------------------------------------------------------------------------------------
# cast_back: reference.

E4M3 = jnp.float8_e4m3fn


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _describe(case) -> tuple:
    """(fmt, block, layout, e4m3 scales, hidden, out dtype) of a cast_back case."""
    data, sf = case.args[0]
    fmt = "e5m6" if case.kwargs["x_special_fmt"] else "e4m3" if data.dtype == E4M3 else "e2m1"
    hidden = {"e4m3": data.shape[1], "e2m1": data.shape[1] * 2, "e5m6": data.shape[1] * 2 // 3}[fmt]
    return fmt, case.kwargs["x_block_size"], case.kwargs["sf_layout"], sf.dtype == E4M3, hidden, case.kwargs["fmt"]


def _row_wise(case) -> bool:
    return case.kwargs["x_block_size"][0] == 1 and case.kwargs["sf_layout"] == "row"


# Every configuration the GPU tests run (not the int64-index ones, "wide_", nor the benchmarks' sizes).
CONFIG_CASES = [c for c in cast_back.cases if not c.bench]
CASE_IDS = [c.name for c in CONFIG_CASES]
# The contract runs on every format, scale layout and block shape, a partial last block, and the
# traced-only cases; the other configurations are lowered by test_cast_back_lowers_to_one_launch and
# run by the GPU tests (the CPU time of the contract is mostly XLA compiling the reference).
CONTRACT_CASES = [CONFIG_CASES[i] for i in (0, 2, 5, 8, 12, 13, 15, 16, 18, 19, 22)] + [c for c in cast_back.cases if c.bench]


class TestCastBack(OpContract):
    """Per-token blocks with row-major scales: row-wise (vmap folds into the tokens, which shard)."""

    fn = cast_back
    cases = [c for c in CONTRACT_CASES if _row_wise(c)]
    rows = True
    bad_inputs = [
        (((_sds((5, 96), E4M3), _sds((5, 1), jnp.float32)),), dict(fmt="bf16", x_block_size=(1, 128)), ValueError, "positive multiple of 64, got 96"),
        (((_sds((5, 128), E4M3), _sds((5, 2), jnp.float32)),), dict(fmt="bf16", x_block_size=(1, 128)), ValueError, r"expected \(5, 1\) \(row\)"),
    ]


class TestCastBackColumnsAndTiles(OpContract):
    """Column-major scales and blocks of several tokens: not row-wise (vmap maps a loop)."""

    fn = cast_back
    cases = [c for c in CONTRACT_CASES if not _row_wise(c)]


class TestPerTokenCastBack(OpContract):
    fn = per_token_cast_back


class TestPerTokenCastAndCastBack(OpContract):
    """Over both formats and dtypes, a column window, partial last groups, and the traced-only cases
    (the other configurations: test_round_trip_lowers_to_one_launch and the GPU tests)."""

    fn = per_token_cast_and_cast_back
    cases = [c for i, c in enumerate(per_token_cast_and_cast_back.cases) if i in (0, 3, 5, 8, 9) or c.bench]
    rows = True
    bad_inputs = [((_sds((5, 128), jnp.float16),), dict(fmt="e4m3", num_per_channels=32), ValueError, "must be bfloat16 or float32")]


def _special(fmt):
    return "e5m6" if fmt == "e5m6" else None


@pytest.mark.parametrize("fmt,block,layout,e4m3_sf,out", [
    ("e4m3", (1, 128), "row", False, "bf16"),
    ("e4m3", (1, 64), "col", False, "fp32"),
    ("e4m3", (1, 32), "col_ue8m0", False, "bf16"),
    ("e4m3", (1, 32), "row", True, "fp32"),
    ("e4m3", (1, 32), "col", True, "bf16"),
    ("e4m3", (128, 1), "ue8m0_along_m", False, "bf16"),
    ("e4m3", (32, 32), "col", False, "fp32"),
    ("e2m1", (1, 16), "row", True, "fp32"),
    ("e2m1", (1, 32), "col_ue8m0", False, "bf16"),
    ("e2m1", (32, 128), "row", False, "bf16"),
    ("e5m6", (1, 192), "row", False, "bf16"),
    ("e5m6", (1, 192), "col_ue8m0", False, "fp32"),
    ("e5m6", (32, 64), "col", False, "bf16"),
    ("e4m3", (1, 128), "col", True, "fp32"),  # partial last block, e4m3 scales in 16-byte aligned columns
    ("e5m6", (1, 128), "col_ue8m0", False, "bf16"),
])  # fmt: skip
def test_reference_matches_numpy(rng, fmt, block, layout, e4m3_sf, out):
    x, data, sf, logical = quantized(rng, 37, 192, fmt, block, layout, e4m3_sf)
    assert logical.shape[1] == -(-192 // block[1])  # 192 % 128 != 0: a partial last block
    expected = np_dequantize(data, logical, fmt, block, out)
    y = jax.jit(lambda d, s: cast_back((d, s), out, block, _special(fmt), impl="xla"))(data, sf)
    assert_bytes_equal(y, expected)
    assert calc_diff(expected, x) < TOLERANCE[fmt]


def test_default_impl_off_gpu_is_the_reference(rng):
    _, data, sf, logical = quantized(rng, 1, 128, "e2m1", (1, 32), "col_ue8m0")
    assert_bytes_equal(jax.jit(lambda d, s: cast_back((d, s), "bf16", (1, 32)))(data, sf), np_dequantize(data, logical, "e2m1", (1, 32), "bf16"))
    x = _rt_input(rng, 3, np.float32, 128, None, "e4m3", False)
    assert_bytes_equal(jax.jit(lambda x: per_token_cast_and_cast_back(x, "e4m3", 32))(x), np_round_trip(x, "e4m3", 32))
    with pytest.raises(ValueError, match="impl='tilelang' needs an NVIDIA Hopper or Blackwell GPU"):
        jax.jit(lambda d, s: cast_back((d, s), "bf16", (1, 32), impl="tilelang"))(data, sf)


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1", "e5m6"])
def test_per_token_cast_back_and_zero_tokens(rng, fmt):
    _, data, sf, logical = quantized(rng, 3, 128, fmt, (1, 64), "col")
    assert_bytes_equal(per_token_cast_back((data, sf), "fp32", 64, _special(fmt)), np_dequantize(data, logical, fmt, (1, 64), "fp32"))
    empty = np.zeros((0, data.shape[1]), data.dtype)
    y = cast_back((empty, np.zeros((2, 0), np.float32)), "bf16", (1, 64), _special(fmt))
    assert y.shape == (0, 128) and y.dtype == jnp.bfloat16


def test_square_block_grids_need_sf_layout(rng):
    x, data, sf, logical = quantized(rng, 512, 512, "e4m3", (128, 128), "col")  # 4 x 4 blocks: row and col fit
    with pytest.raises(ValueError, match="fit both layouts"):
        cast_back((data, sf), "fp32", (128, 128))
    assert_bytes_equal(cast_back((data, sf), "fp32", (128, 128), sf_layout="col"), np_dequantize(data, logical, "e4m3", (128, 128), "fp32"))
    row = np.ascontiguousarray(logical)
    assert_bytes_equal(cast_back((data, row), "fp32", (128, 128), sf_layout="row"), np_dequantize(data, logical, "e4m3", (128, 128), "fp32"))


@pytest.mark.parametrize(
    "data,sf,kwargs,message",
    [
        (_sds((5, 128), E4M3), _sds((5, 1), jnp.float32), dict(fmt="fp16"), "fmt .* must be 'bf16' or 'fp32'"),
        (_sds((5, 128), E4M3), _sds((5, 1), jnp.float32), dict(x_special_fmt="e4m3"), "x_special_fmt must be None or 'e5m6'"),
        (_sds((128,), E4M3), _sds((5, 1), jnp.float32), {}, "must be 2-D"),
        (_sds((5, 128), jnp.bfloat16), _sds((5, 1), jnp.float32), {}, "must be float8_e4m3fn, or uint8"),
        (_sds((5, 192), E4M3), _sds((5, 1), jnp.float32), dict(x_special_fmt="e5m6"), "E5M6 data .* must be uint8"),
        (_sds((5, 100), jnp.uint8), _sds((5, 1), jnp.float32), dict(x_special_fmt="e5m6"), "not a multiple of 3"),
        (_sds((5, 96), E4M3), _sds((5, 1), jnp.float32), {}, "positive multiple of 64, got 96"),
        (_sds((5, 48), jnp.uint8), _sds((5, 1), jnp.float32), {}, "positive multiple of 64, got 96"),
        (_sds((5, 128), E4M3), _sds((5, 1), jnp.float32), dict(x_block_size=(1,)), "two positive ints"),
        (_sds((5, 128), E4M3), _sds((5, 1), jnp.float32), dict(x_block_size=(0, 128)), "two positive ints"),
        (_sds((5, 192), E4M3), _sds((5, 4), jnp.float32), dict(x_block_size=(1, 48)), "divide 64 or be a multiple of 64"),
        (_sds((5, 128), E4M3), _sds((5,), jnp.float32), {}, "scales of x must be 2-D"),
        (_sds((5, 128), E4M3), _sds((5, 1), jnp.bfloat16), {}, "must be float32, float8_e4m3fn or int32"),
        (_sds((5, 128), E4M3), _sds((5, 2), jnp.float32), {}, r"expected \(5, 1\) \(row\), \(1, 8\) \(col\)"),
        (_sds((5, 128), E4M3), _sds((1, 4), jnp.int32), {}, r"expected \(1, 8\) \(col_ue8m0\)"),
        (_sds((5, 128), E4M3), _sds((1, 4), jnp.int32), dict(x_block_size=(1, 1)), r"expected \(2, 128\) \(ue8m0_along_m\)"),
        (_sds((5, 128), E4M3), _sds((1, 8), jnp.int32), dict(sf_layout="row"), "sf_layout='row' does not hold int32"),
        # (T * H >= 2^31 used to be refused here; the kernel now switches to 64-bit unit indices: test_huge_inputs_lower)
        (_sds((2**31 - 2**10 + 1, 64), E4M3), _sds((2**31 - 2**10 + 1, 1), jnp.float32), {}, r"^cast_back: the data of x may have at most 2147482624 rows"),
        (_sds((5, 192), E4M3), _sds((5, 2), jnp.float32), dict(x_block_size=(1, 128.0)), r"^cast_back: x_block_size must be two positive ints"),
        (_sds((5, 192), E4M3), _sds((5, 2), jnp.float32), dict(x_block_size=(True, 128)), r"^cast_back: x_block_size must be two positive ints"),
        (_sds((5, 192), E4M3), _sds((5, 2), jnp.float32), dict(x_block_size=(1, -128)), r"^cast_back: x_block_size must be two positive ints"),
        (_sds((5, 576), E4M3), _sds((5, 48), jnp.float8_e4m3fn), {}, r"^cast_back: the scales of x, of shape \(5, 48\), do not fit .* expected \(5, 5\) \(row\), \(5, 16\) \(col\)"),
        (_sds((5, 576), E4M3), _sds((5, 8), jnp.float8_e4m3fn), {}, r"expected \(5, 5\) \(row\), \(5, 16\) \(col\)"),  # e4m3 columns pad to 16, not 8
    ],
)
def test_cast_back_bad_inputs_raise_at_trace_time(data, sf, kwargs, message):
    kwargs = {"fmt": "bf16", "x_block_size": (1, 128), **kwargs}
    fmt, block = kwargs.pop("fmt"), kwargs.pop("x_block_size")
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda d, s: cast_back((d, s), fmt, block, **kwargs), data, sf)


def test_abstract_eval_is_exact():
    out = jax.eval_shape(lambda d, s: cast_back((d, s), "bf16", (1, 7168), "e5m6"), _sds((9, 10752), jnp.uint8), _sds((1, 12), jnp.int32))
    assert out.shape == (9, 7168) and out.dtype == jnp.bfloat16
    out = jax.eval_shape(lambda d, s: cast_back((d, s), "fp32", (1, 32)), _sds((9, 2048), jnp.uint8), _sds((9, 128), E4M3))
    assert out.shape == (9, 4096) and out.dtype == jnp.float32


def test_e4m3_column_major_scales_pad_tokens_to_16(rng):
    """TileKernels 2.1 stores column-major e4m3 scales as [K_b, align(M_b, 16)] (16-byte aligned columns)."""
    x, data, sf, logical = quantized(rng, 36, 3072, "e4m3", (1, 128), "col", e4m3_sf=True)
    assert sf.shape == (24, 48) and sf.dtype == E4M3
    assert_bytes_equal(cast_back((data, sf), "fp32", (1, 128)), np_dequantize(data, logical, "e4m3", (1, 128), "fp32"))
    out = jax.eval_shape(lambda d, s: per_token_cast_back((d, s), "bf16", 128), _sds((36, 576), E4M3), _sds((5, 48), E4M3))
    assert out.shape == (36, 576)


@pytest.mark.parametrize(
    "fn,args,error,message",
    [
        (cast_back, ("not a pair", "bf16", (1, 128)), TypeError, r"^cast_back: x must be a QuantTensor"),
        (cast_back, ((np.zeros((2, 128), E4M3),), "bf16", (1, 128)), ValueError, r"^cast_back: x must be a QuantTensor \(data, sf\), got 1 items"),
        (cast_back, ((np.zeros((2, 128), E4M3), "abc"), "bf16", (1, 128)), TypeError, r"^cast_back: the scales of x must be an array"),
        (cast_back, ((None, np.ones((2, 1), np.float32)), "bf16", (1, 128)), TypeError, r"^cast_back: the data of x must be an array"),
        (cast_back, ((np.zeros((2, 128), E4M3), np.ones((2, 1), np.float32)), "bf16", 128), TypeError, r"^cast_back: x_block_size must be two positive ints"),
        (cast_back, ((np.zeros((2, 128), E4M3), np.ones((2, 1), np.float32)), None, (1, 128)), TypeError, r"^cast_back: fmt \(the output type\)"),
        (per_token_cast_back, ((np.zeros((2, 128), E4M3), np.ones((2, 1), np.float32)), "bf16", 128.0), TypeError, r"^per_token_cast_back: num_per_channels must be an int"),
        (per_token_cast_back, ((np.zeros((2, 128), E4M3), np.ones((2, 1), np.float32)), "bf16", 0), ValueError, r"^per_token_cast_back: num_per_channels must be positive"),
        (per_token_cast_back, ((np.zeros((2, 128), E4M3), np.ones((2, 3), np.float32)), "bf16", 128), ValueError, r"^per_token_cast_back: the scales of x, of shape \(2, 3\), do not fit"),
        (per_token_cast_and_cast_back, ("abc", "e4m3", 128), TypeError, r"^per_token_cast_and_cast_back: x must be an array"),
        (per_token_cast_and_cast_back, (np.ones((5, 192), np.float32), "e4m3", 128.0), TypeError, r"^per_token_cast_and_cast_back: num_per_channels must be an int"),
        (per_token_cast_and_cast_back, (np.ones((5, 192), np.float32), "e4m3", 128, "no"), TypeError, r"^per_token_cast_and_cast_back: round_sf must be True or False"),
        (per_token_cast_and_cast_back, (np.ones((5, 192), np.float32), "e4m3", 128, False, False, (0, 64.0)), TypeError, r"^per_token_cast_and_cast_back: columns must be an int"),
        (unpack_from_e2m1fn_x2, ({1: 2},), TypeError, r"^unpack_from_e2m1fn_x2: x must be an array"),
        (unpack_from_e2m1fn_x2, (np.zeros(4, np.uint8), "nope"), TypeError, r"^unpack_from_e2m1fn_x2: out_dtype must be a floating dtype"),
        (unpack_from_e2m1fn_x2, (np.zeros(4, np.uint8), np.int32), ValueError, r"^unpack_from_e2m1fn_x2: out_dtype must be a floating dtype"),
    ],
)
def test_arguments_raise_naming_the_op(fn, args, error, message):
    with pytest.raises(error, match=message):
        fn(*args)


@pytest.mark.parametrize(
    "data,sf,block,grid",
    [
        (_sds((2**20, 4096), E4M3), _sds((2**20, 32), jnp.float32), (1, 128), 2**32 // 8 // 2048),  # 2^29 units: int32
        (_sds((2**22, 4096), E4M3), _sds((2**22, 32), jnp.float32), (1, 128), 2**34 // 8 // 2048),  # 2^31 units: int64
        (_sds((2**31 - 2**10, 64), E4M3), _sds((1, 2**31 - 2**10), jnp.int32), (1, 64), -(-(2**31 - 2**10) * 8 // 2048)),
    ],
    ids=["2^32-elements", "2^34-elements-wide", "max-tokens-wide"],
)
def test_huge_inputs_lower(data, sf, block, grid):
    """Every size eval_shape accepts lowers: T * H past 2^31 (the kernel's unit index turns int64 past 2^31 units)."""
    text = lower_for_cuda(lambda d, s: cast_back((d, s), "bf16", block, impl="tilelang"), data, sf)
    (k,) = decode_record(tilek_calls(text)[0]["launch"])["kernels"]
    assert k["grid"] == [grid, 1, 1] and [a[2] for a in k["args"] if a[0] != 0] == [data.shape[0]]


@pytest.mark.parametrize(
    "shape,columns",
    [((2**18, 2**13), None), ((2**24, 2**13), None), ((2**31 - 2**10, 64), None), ((3, 2**30), (64, 2**30))],
    ids=["2^31-elements", "2^37-elements-wide", "max-tokens", "long-rows"],
)
def test_round_trip_huge_inputs_lower(shape, columns):
    text = lower_for_cuda(lambda x: per_token_cast_and_cast_back(x, "e4m3", 128, columns=columns, impl="tilelang"), _sds(shape, jnp.bfloat16))
    (k,) = decode_record(tilek_calls(text)[0]["launch"])["kernels"]
    hidden = shape[1] if columns is None else columns[1] - columns[0]
    slots = -(-hidden // 128) * 8  # 16 bf16 values per thread, 8 threads per 128-value group
    assert k["grid"] == [-(-shape[0] * slots // 512), 1, 1]
    assert [a[2] for a in k["args"] if a[0] != 0] == [shape[0], shape[1] // 2]


def _sf_struct(fmt, block, layout, e4m3_sf, tokens, hidden):
    m_b, k_b = F.num_blocks((tokens, hidden), block)
    shape, dtype = F.sf_storage_shape(layout, (m_b, k_b), E4M3 if e4m3_sf else np.float32)
    return _sds(shape, dtype)


def _data_struct(fmt, tokens, hidden):
    return _sds((tokens, {"e4m3": hidden, "e2m1": hidden // 2, "e5m6": hidden * 3 // 2}[fmt]), E4M3 if fmt == "e4m3" else jnp.uint8)


# Values per thread unit and units in flight per thread: one 16-byte store per unit (two for fp32 from
# FP4 / E5M6), fewer units in flight when a unit needs several scales (bk < values per unit).
UNITS = {("e4m3", "bf16"): (8, 8), ("e4m3", "fp32"): (4, 16), ("e2m1", "bf16"): (8, 16), ("e2m1", "fp32"): (8, 16), ("e5m6", "bf16"): (8, 6), ("e5m6", "fp32"): (8, 6)}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tokens", [5, 0])
def test_cast_back_lowers_to_one_launch(case, tokens):
    """Cross-lowers every GPU test configuration for "cuda" (compiling its cubin) and reads it back."""
    fmt, block, layout, e4m3_sf, hidden, out = _describe(case)
    data, sf = _data_struct(fmt, tokens, hidden), _sf_struct(fmt, block, layout, e4m3_sf, tokens, hidden)
    text = lower_for_cuda(lambda d, s: cast_back((d, s), out, block, _special(fmt), sf_layout=layout), data, sf)
    (call,) = tilek_calls(text)
    assert call["name"] == "cast_back" and call["has_cubin"]
    record = decode_record(call["launch"])
    if tokens == 0:
        assert record["kernels"] == [] and record["zero_fill"] == [2]
        return
    (k,) = record["kernels"]
    per_unit, unroll = UNITS[(fmt, out)]  # values a thread stores at once, units in flight
    unroll = max(2, unroll // (per_unit // block[1])) if block[1] < per_unit else unroll
    assert k["grid"] == [-(-tokens * hidden // per_unit // (256 * unroll)), 1, 1] and k["block"] == [256, 1, 1]
    assert sorted(a[1] for a in k["args"] if a[0] == 0) == [0, 1, 2] and all(a[2] == 0 for a in k["args"] if a[0] == 0)
    assert [a[2] for a in k["args"] if a[0] != 0] == [tokens]


# ---------------------------------------------------------------------------------------------
# per_token_cast_and_cast_back: reference.


def np_round_trip(x, fmt, npc, round_sf=False, use_e4m3_sf=False, columns=None):
    start, stop = columns or (0, x.shape[1])
    xs = np.asarray(x)[:, start:stop].astype(np.float32)
    t, h = xs.shape
    k_b = -(-h // npc)  # a partial last group: zeros pad it (they do not change its amax, and are cut off below)
    g = np.pad(xs, ((0, 0), (0, k_b * npc - h))).reshape(t, k_b, npc)
    fmax = np.float32(448 if fmt == "e4m3" else 6)
    a = np.maximum(np.abs(g).max(-1), np.float32(1e-4 if fmt == "e4m3" else 6 * 2.0**-126))
    sf = a / fmax
    if round_sf:
        mant, exp = np.frexp(sf)
        exp = np.where(mant == 0.5, exp - 1, exp)  # ceil(log2(sf))
        sf, inv = np.ldexp(np.float32(1), exp).astype(np.float32), np.ldexp(np.float32(1), -exp).astype(np.float32)
    elif use_e4m3_sf:
        sf = sf.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        inv = np.float32(1) / sf
    else:
        inv = fmax / a
    v = g * inv[..., None]
    q = np.clip(v, -fmax, fmax).astype(ml_dtypes.float8_e4m3fn if fmt == "e4m3" else ml_dtypes.float4_e2m1fn).astype(np.float32)
    return (q * sf[..., None]).reshape(t, k_b * npc)[:, :h].astype(x.dtype)


def _rt_describe(case) -> tuple:
    """(dtype, fmt, npc, round_sf, use_e4m3_sf, hidden, columns) of a per_token_cast_and_cast_back case."""
    (x,) = case.args
    k = case.kwargs
    columns = k["columns"]
    hidden = x.shape[1] if columns is None else columns[1] - columns[0]
    return np.dtype(x.dtype).type, k["fmt"], k["num_per_channels"], k["round_sf"], k["use_e4m3_sf"], hidden, columns


# Every configuration the GPU tests run (not the int64-index ones, "wide_", nor the benchmarks' sizes).
RT_CASES = [c for c in per_token_cast_and_cast_back.cases if not c.bench]
RT_IDS = [c.name for c in RT_CASES]


def _rt_input(rng, tokens, dtype, hidden, columns, fmt, use_e4m3_sf):
    """Rows scaled by 2^[-4, 4]; e4m3 scales of e4m3 data need larger values to stay normal."""
    width = hidden if columns is None else columns[1] + 512
    scale = np.exp2(rng.integers(-4, 5, size=(tokens, 1))).astype(np.float32) * (64 if use_e4m3_sf and fmt == "e4m3" else 1)
    return (rng.standard_normal((tokens, width), dtype=np.float32) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("hidden", [256, 192], ids=["256", "192-partial"])
@pytest.mark.parametrize("fmt,npc,round_sf,use_e4m3_sf", [
    ("e4m3", 128, False, False), ("e4m3", 16, True, False), ("e4m3", 32, False, True),
    ("e2m1", 16, False, True), ("e2m1", 32, True, False), ("e2m1", 64, False, False), ("e2m1", 128, True, False),
])  # fmt: skip
def test_round_trip_reference_matches_numpy(rng, dtype, hidden, fmt, npc, round_sf, use_e4m3_sf):
    columns = (64, 64 + hidden)
    x = _rt_input(rng, 9, dtype, hidden, columns, fmt, use_e4m3_sf)
    expected = np_round_trip(x, fmt, npc, round_sf, use_e4m3_sf, columns)
    y = jax.jit(lambda x: per_token_cast_and_cast_back(x, fmt, npc, round_sf, use_e4m3_sf, columns=columns, impl="xla"))(x)
    assert_bytes_equal(y, expected)
    assert calc_diff(expected, x[:, columns[0] : columns[1]]) < TOLERANCE[fmt]


@pytest.mark.parametrize(
    "shape,dtype,kwargs,message",
    [
        ((2, 5, 128), jnp.bfloat16, {}, r"x must be \[T, S\]"),
        ((5, 128), jnp.float16, {}, "must be bfloat16 or float32"),
        ((5, 128), jnp.bfloat16, dict(fmt="e5m6"), "fmt must be 'e4m3' or 'e2m1'"),
        ((5, 256), jnp.bfloat16, dict(num_per_channels=256), r"num_per_channels must be one of \(16, 32, 64, 128\)"),
        ((5, 128), jnp.bfloat16, dict(round_sf=True, use_e4m3_sf=True), "exclusive"),
        ((5, 128), jnp.bfloat16, dict(columns=(64, 256)), "is not a window"),
        ((5, 160), jnp.bfloat16, dict(num_per_channels=32), "must be a multiple of 64"),
        # ((5, 192), npc=128) used to be refused ("and of num_per_channels=128"): a partial last group is now supported
        ((5, 192), jnp.bfloat16, dict(num_per_channels=0), r"^per_token_cast_and_cast_back: num_per_channels must be one of"),
        ((5, 0), jnp.bfloat16, {}, r"^per_token_cast_and_cast_back: the hidden size \(window width\) 0 of x must be a multiple of 64 and positive"),
        ((5, 264), jnp.bfloat16, dict(columns=(4, 132)), r"columns start \(4\) and the row length \(264\) must be multiples of 8"),
        ((5, 130), jnp.float32, dict(columns=(0, 128)), r"the row length \(130\) must be multiples of 4"),
        # ((2**18, 2**13)) used to be refused ("fewer than 2^31 elements"); it lowers now (test_huge_inputs_lower)
        ((2**31 - 2**10 + 1, 64), jnp.bfloat16, {}, r"^per_token_cast_and_cast_back: x may have at most 2147482624 rows"),
    ],
)
def test_round_trip_bad_inputs_raise_at_trace_time(shape, dtype, kwargs, message):
    kwargs = {"fmt": "e4m3", "num_per_channels": 32, **kwargs}
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: per_token_cast_and_cast_back(x, **kwargs), _sds(shape, dtype))


@pytest.mark.parametrize("case", RT_CASES, ids=RT_IDS)
@pytest.mark.parametrize("tokens", [5, 0])
def test_round_trip_lowers_to_one_launch(case, tokens):
    dtype, fmt, npc, round_sf, use_e4m3_sf, hidden, columns = _rt_describe(case)
    width = hidden if columns is None else columns[1] + 512
    text = lower_for_cuda(lambda x: per_token_cast_and_cast_back(x, fmt, npc, round_sf, use_e4m3_sf, columns), _sds((tokens, width), dtype))
    (call,) = tilek_calls(text)
    assert call["name"] == "per_token_cast_and_cast_back" and call["has_cubin"]
    record = decode_record(call["launch"])
    if tokens == 0:
        assert record["kernels"] == [] and record["zero_fill"] == [1]
        return
    (k,) = record["kernels"]
    itemsize = np.dtype(dtype).itemsize
    slots = -(-(hidden * itemsize // 32) // (npc * itemsize // 32)) * (npc * itemsize // 32)  # chunk slots per row (groups never straddle rows)
    assert k["grid"] == [-(-tokens * slots // 512), 1, 1] and k["block"] == [256, 1, 1]
    start = 0 if columns is None else columns[0]
    assert (0, 0, start * itemsize) in k["args"] and (0, 1, 0) in k["args"]
    assert [a[2] for a in k["args"] if a[0] != 0] == [tokens, width * itemsize // 4]  # N and the row stride in words


# ---------------------------------------------------------------------------------------------
# The kernels' element arithmetic, emulated in numpy on every code (the GPU tests check the rest).


def _f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def test_kernel_decoders_are_exact_on_every_code():
    """cast_back decodes by moving a code's bits into an fp32 and rescaling by an exact power of two."""
    e4m3 = np.arange(256, dtype=np.uint32)
    bits = ((e4m3 << 24).view(np.int32) >> 4).view(np.uint32) & 0x87F00000
    bits = np.where((bits & 0x07F00000) == 0x07F00000, bits | 0x78000000, bits)  # NaN codes stay NaN
    got, want = _f32(bits) * np.float32(2.0**120), e4m3.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    e2m1 = np.arange(16, dtype=np.uint32)
    got = _f32(((e2m1 << 28).view(np.int32) >> 6).view(np.uint32) & 0x81C00000) * np.float32(2.0**126)
    assert_bytes_equal(got, e2m1.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    e5m6 = np.arange(4096, dtype=np.uint32)
    bits = ((e5m6 << 20).view(np.int32) >> 3).view(np.uint32) & 0x8FFE0000
    bits = np.where((bits & 0x0F800000) == 0x0F800000, bits | 0x70000000, bits)  # inf / NaN
    with np.errstate(invalid="ignore"):
        got = _f32(bits) * np.float32(2.0**112)
    np.testing.assert_array_equal(got, (e5m6 << 4).astype(np.uint16).view(np.float16).astype(np.float32))


def test_kernel_fp4_rounding_is_round_to_nearest_even(rng):
    """The round trip rounds to the e2m1 grid with (|v| + M) - M, M = 1.5 * 2^23 * step."""
    v = np.concatenate([rng.uniform(-8, 8, 100000), [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, 7, -0.25, -5, -0.0, 1e-30]]).astype(np.float32)
    a = np.minimum(np.abs(v), np.float32(6))
    magic = np.where(a < 2, 1.5 * 2**22, np.where(a < 4, 1.5 * 2**23, 1.5 * 2**24)).astype(np.float32)
    got = _f32(((a + magic) - magic).view(np.uint32) | (v.view(np.uint32) & 0x80000000))
    assert_bytes_equal(got, np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# unpack_from_e2m1fn_x2.


def test_unpack_from_e2m1fn_x2(rng):
    x = rng.integers(0, 256, size=(3, 2, 8), dtype=np.uint8)
    expected = np.stack([x & 0xF, x >> 4], axis=-1).reshape(3, 2, 16).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert_bytes_equal(unpack_from_e2m1fn_x2(x), expected)
    assert_bytes_equal(unpack_from_e2m1fn_x2(x.view(np.int8), jnp.bfloat16), expected.astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        unpack_from_e2m1fn_x2(np.uint8(3))
    with pytest.raises(ValueError, match="must be uint8 or int8"):
        unpack_from_e2m1fn_x2(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"^unpack_from_e2m1fn_x2: impl must be one of"):
        unpack_from_e2m1fn_x2(x, impl="cuda")


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONFIG_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tokens", [5, 4001])  # 4001: not a multiple of any block
def test_cast_back_kernel_is_bit_exact(on_gpu, rng, case, tokens):
    fmt, block, layout, e4m3_sf, hidden, out = _describe(case)
    x, data, sf, logical = quantized(rng, tokens, hidden, fmt, block, layout, e4m3_sf)
    y = on_gpu(lambda d, s: cast_back((d, s), out, block, _special(fmt), sf_layout=layout, impl="tilelang"), data, sf)
    assert_bytes_equal(y, np_dequantize(data, logical, fmt, block, out))
    assert calc_diff(np.asarray(y[:512], np.float32), x[:512]) < TOLERANCE[fmt]


ONE_AND_ZERO = [c for c in CONFIG_CASES if c.name.split("_8x")[0] in ("e4m3_1x128_row", "e2m1_1x16_row_e4m3sf", "e5m6_1x7168_row")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ONE_AND_ZERO, ids=lambda c: c.name)
@pytest.mark.parametrize("tokens", [1, 0])
def test_cast_back_kernel_one_and_zero_tokens(on_gpu, rng, case, tokens):
    fmt, block, layout, e4m3_sf, hidden, out = _describe(case)
    _, data, sf, logical = quantized(rng, tokens, hidden, fmt, block, layout, e4m3_sf)
    y = on_gpu(lambda d, s: cast_back((d, s), out, block, _special(fmt), sf_layout=layout, impl="tilelang"), data, sf)
    assert_bytes_equal(y, np_dequantize(data, logical, fmt, block, out))


@pytest.mark.gpu
@pytest.mark.parametrize("case", RT_CASES, ids=RT_IDS)
@pytest.mark.parametrize("tokens", [1, 4001])
def test_round_trip_kernel_is_bit_exact(on_gpu, rng, case, tokens):
    dtype, fmt, npc, round_sf, use_e4m3_sf, hidden, columns = _rt_describe(case)
    x = _rt_input(rng, tokens, dtype, hidden, columns, fmt, use_e4m3_sf)
    y = on_gpu(lambda x: per_token_cast_and_cast_back(x, fmt, npc, round_sf, use_e4m3_sf, columns, impl="tilelang"), x)
    assert_bytes_equal(y, np_round_trip(x, fmt, npc, round_sf, use_e4m3_sf, columns))
    start, stop = columns or (0, hidden)
    assert calc_diff(np.asarray(y[:512], np.float32), x[:512, start:stop].astype(np.float32)) < TOLERANCE[fmt]


@pytest.mark.gpu
def test_round_trip_kernel_zero_tokens(on_gpu):
    dtype, fmt, npc, round_sf, use_e4m3_sf, hidden, columns = _rt_describe(RT_CASES[0])
    y = on_gpu(lambda x: per_token_cast_and_cast_back(x, fmt, npc, round_sf, use_e4m3_sf, columns, impl="tilelang"), np.zeros((0, hidden), dtype))
    assert y.shape == (0, hidden) and y.dtype == dtype


# ---------------------------------------------------------------------------------------------
# GPU: sizes past int32 indices (rows built on the device from a small random block with a prime period,
# so that a row index off by 2^k would read different data).

WIDE_CASES = [c for c in cast_back.cases if c.config.get("wide")]
RT_WIDE_CASES = [c for c in per_token_cast_and_cast_back.cases if c.config.get("wide")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: c.name)
def test_cast_back_kernel_with_64_bit_indices(on_gpu, rng, case):
    """The int64-index kernel (chosen past 2^31 units) on ordinary inputs: bit-exact too."""
    fmt, block, layout, e4m3_sf, hidden, out = _describe(case)
    _, data, sf, logical = quantized(rng, 4001, hidden, fmt, block, layout, e4m3_sf)
    y = on_gpu(lambda d, s: case.call(cast_back, "tilelang")((d, s)), data, sf)
    assert_bytes_equal(y, np_dequantize(data, logical, fmt, block, out))


@pytest.mark.gpu
@pytest.mark.parametrize("case", RT_WIDE_CASES, ids=lambda c: c.name)
def test_round_trip_kernel_with_64_bit_indices(on_gpu, rng, case):
    dtype, fmt, npc, round_sf, use_e4m3_sf, hidden, columns = _rt_describe(case)
    x = _rt_input(rng, 4001, dtype, hidden, columns, fmt, use_e4m3_sf)
    y = on_gpu(case.call(per_token_cast_and_cast_back, "tilelang"), x)
    assert_bytes_equal(y, np_round_trip(x, fmt, npc, round_sf, use_e4m3_sf, columns))


def _tiled_rows(small, tokens):
    """``[tokens, ...]`` whose row r is ``small[r % len(small)]``, built on the device."""
    return small[jnp.arange(tokens) % small.shape[0]]


@pytest.mark.gpu
def test_cast_back_kernel_past_2_31_units(on_gpu, rng):
    """e4m3 [2^22 + 3, 4096] -> bf16 (16 GiB in, 32 GiB out): 2^31 + 1536 units of 8 values, the int64 kernel.
    Rows around unit 2^31 (row 2^22) and the last rows are checked."""
    tokens, hidden, block = 2**22 + 3, 4096, (1, 128)
    _, data, _, logical = quantized(rng, 1021, hidden, "e4m3", block, "row")  # 1021 rows: a prime period
    sf = np.exp2(rng.integers(-8, 9, size=(1019, hidden // 128))).astype(np.float32)  # another prime period
    rows = np.array([0, 1, 2**22 - 2, 2**22 - 1, 2**22, 2**22 + 1, tokens - 1])

    def program(small_data, small_sf):
        y = cast_back((_tiled_rows(small_data, tokens), _tiled_rows(small_sf, tokens)), "bf16", block, impl="tilelang")
        return y[rows]

    try:
        y = on_gpu(program, data, sf)
    except jax.errors.JaxRuntimeError as e:  # 48 GiB at once: an 80 GB card shared with other test workers may not have it
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        pytest.skip(f"needs about 49 GiB of free device memory: {str(e)[:120]}")
    assert_bytes_equal(y, np_dequantize(data[rows % 1021], sf[rows % 1019], "e4m3", block, "bf16"))


@pytest.mark.gpu
def test_round_trip_kernel_past_2_31_elements(on_gpu, rng):
    """bf16 [2^18 + 5, 8192] (2^31 + 40960 elements, refused before): rows past element 2^31 checked."""
    tokens, hidden = 2**18 + 5, 8192
    small = _rt_input(rng, 1021, ml_dtypes.bfloat16, hidden, None, "e4m3", False)
    rows = np.array([0, 2**18 - 1, 2**18, 2**18 + 1, tokens - 1])

    def program(small):
        return per_token_cast_and_cast_back(_tiled_rows(small, tokens), "e4m3", 128, impl="tilelang")[rows]

    y = on_gpu(program, small)
    assert_bytes_equal(y, np_round_trip(small[rows % 1021], "e4m3", 128))
