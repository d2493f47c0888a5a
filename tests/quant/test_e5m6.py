"""per_token_cast_to_e5m6 and the E5M6 cast back: reference against independent numpy math, rules,
lowering, and the GPU kernels (bit-exact), on normal inputs and TileKernels' special values."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.quant import cast_back, per_token_cast_to_e5m6
from jax_tilek.quant import formats as F
from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal, calc_diff

# min subnormal, max subnormal, min normal (TileKernels' generate_e5m6_inputs), each row ending in 65024
SPECIAL_VALUES = (2.0**-20, 2.0**-14 * 63 / 64, 2.0**-14)
LAYOUTS = {"row": (False, False, False), "col": (True, False, False), "col_round": (True, False, True), "col_ue8m0": (True, True, True), "row_round": (False, False, True)}


def _row_wise(case) -> bool:
    return not case.kwargs["use_tma_aligned_col_major_sf"]


class TestPerTokenCastToE5M6(OpContract):
    """Row-major scales: row-wise (vmap folds into the tokens, which shard)."""

    fn = per_token_cast_to_e5m6
    cases = [c for c in per_token_cast_to_e5m6.cases if _row_wise(c)]
    rows = True
    bad_inputs = [((jax.ShapeDtypeStruct((4, 96), jnp.float32),), dict(num_per_channels=96), ValueError, "positive multiple of 64")]


class TestPerTokenCastToE5M6ColumnMajor(OpContract):
    """Column-major scales are one row for all tokens: not row-wise (vmap maps a loop)."""

    fn = per_token_cast_to_e5m6
    cases = [c for c in per_token_cast_to_e5m6.cases if not _row_wise(c)]


def inputs(rng, tokens, hidden, dtype, special=None):
    if special is None:
        return rng.standard_normal((tokens, hidden), dtype=np.float32).astype(dtype)
    x = np.full((tokens, hidden), special, np.float32)
    x[:, -1] = 65024.0
    return x.astype(dtype)


def np_f16_rz_bits(v: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 bits, rounding toward zero (finite inputs below 65520)."""
    h = v.astype(np.float16)
    outward = np.abs(h.astype(np.float32)) > np.abs(v)
    h = np.where(outward, np.nextafter(h, np.float16(0)), h)
    return h.view(np.uint16)


def np_cast_to_e5m6(x: np.ndarray, round_sf: bool):
    """TileKernels' rule in numpy: per-row scale, fp16 round-toward-zero, then the 17-bit carry; eight
    codes per three little-endian uint32 words (a big-endian bit stream; test_formats checks the layout)."""
    v = x.astype(np.float32)
    a = np.maximum(np.abs(v).max(-1), np.float32(1e-4))
    sf = a / np.float32(65024)
    if round_sf:
        mant, exp = np.frexp(sf)
        exp = np.where(mant == 0.5, exp - 1, exp)
        sf, inv = np.ldexp(np.float32(1), exp).astype(np.float32), np.ldexp(np.float32(1), -exp).astype(np.float32)
    else:
        inv = np.float32(65024) / a
    scaled = v * inv[:, None]
    code = (np_f16_rz_bits(scaled) >> 4).astype(np.uint32)
    code += ((code & 1) + (scaled.view(np.uint32) & 0x1FFFF)) > 0x10000
    t, h = x.shape
    v = [c[..., 0] for c in np.split(code.reshape(t, h // 8, 8), 8, axis=-1)]
    words = np.stack([
        (v[0] << 20) | (v[1] << 8) | (v[2] >> 4),
        (v[2] << 28) | (v[3] << 16) | (v[4] << 4) | (v[5] >> 8),
        (v[5] << 24) | (v[6] << 12) | v[7],
    ], axis=-1).astype("<u4")  # fmt: skip
    return words.view(np.uint8).reshape(t, h * 3 // 2), sf


def stored_sf(sf: np.ndarray, layout: str) -> np.ndarray:
    return np.asarray(F.store_sf(jnp.asarray(sf[:, None]), F.sf_layout(*LAYOUTS[layout])))


def cast(x, layout, impl=None):
    col, packed, round_sf = LAYOUTS[layout]
    return per_token_cast_to_e5m6(x, x.shape[1], col, round_sf, packed, impl=impl)


# ---------------------------------------------------------------------------------------------
# Reference.


@pytest.mark.parametrize("dtype,layout", [(ml_dtypes.bfloat16, "row"), (np.float32, "col"), (ml_dtypes.bfloat16, "col_round"), (np.float32, "col_ue8m0"), (np.float32, "row_round")])
@pytest.mark.parametrize("special", (None,) + SPECIAL_VALUES)
def test_reference_matches_numpy(rng, dtype, layout, special):
    x = inputs(rng, 7, 192, dtype, special)
    data, sf = np_cast_to_e5m6(x, LAYOUTS[layout][2])
    got = jax.jit(lambda x: cast(x, layout, "xla"))(x)
    assert_bytes_equal(got[0], data)
    assert_bytes_equal(got[1], stored_sf(sf, layout))
    back = np.asarray(cast_back(got, "fp32", (1, 192), "e5m6"))
    assert calc_diff(back, x.astype(np.float32)) < (5e-6 if special else 1e-4)


def test_special_values_are_exact():
    """With amax = 65024 the scale is 1 and the special values are E5M6 numbers: they come back exactly."""
    for value in SPECIAL_VALUES:
        x = inputs(None, 2, 64, np.float32, value)
        data, sf = per_token_cast_to_e5m6(x, 64)
        np.testing.assert_array_equal(np.asarray(sf), 1.0)
        np.testing.assert_array_equal(np.asarray(cast_back((data, sf), "fp32", (1, 64), "e5m6")), x)


def test_zero_tokens_and_default_impl(rng):
    x = inputs(rng, 3, 128, np.float32)
    data, sf = jax.jit(lambda x: cast(x, "col_ue8m0"))(x)  # impl=None off the GPU: the reference
    expected_data, expected_sf = np_cast_to_e5m6(x, True)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, stored_sf(expected_sf, "col_ue8m0"))
    data, sf = cast(np.zeros((0, 128), np.float32), "col_ue8m0")
    assert data.shape == (0, 192) and data.dtype == jnp.uint8 and sf.shape == (1, 0) and sf.dtype == jnp.int32


@pytest.mark.parametrize(
    "shape,dtype,kwargs,message",
    [
        ((128,), jnp.float32, {}, r"x must be \[T, H\]"),
        ((4, 128), jnp.float16, {}, "must be bfloat16 or float32"),
        ((4, 128), jnp.float32, dict(num_per_channels=64), "must equal the hidden size 128"),
        ((4, 96), jnp.float32, dict(num_per_channels=96), "positive multiple of 64"),
        ((4, 32832), jnp.float32, dict(num_per_channels=32832), "at most 32768"),
        ((4, 128), jnp.float32, dict(use_packed_ue8m0=True, round_sf=True), "needs use_tma_aligned_col_major_sf"),
        ((4, 128), jnp.float32, dict(use_packed_ue8m0=True, use_tma_aligned_col_major_sf=True), "needs round_sf"),
    ],
)
def test_bad_inputs_raise_at_trace_time(shape, dtype, kwargs, message):
    kwargs = {"num_per_channels": shape[-1], **kwargs}
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: per_token_cast_to_e5m6(x, **kwargs), jax.ShapeDtypeStruct(shape, dtype))


def _describe(case) -> tuple:
    """(dtype, hidden, layout) of a case, the layout as a key of LAYOUTS."""
    (x,) = case.args
    flags = (case.kwargs["use_tma_aligned_col_major_sf"], case.kwargs["use_packed_ue8m0"], case.kwargs["round_sf"])
    return np.dtype(x.dtype).type, x.shape[1], next(name for name, f in LAYOUTS.items() if f == flags)


# Every configuration the GPU tests run (not the benchmark's size).
CONFIGS = [c for c in per_token_cast_to_e5m6.cases if not c.bench]
IDS = [c.name for c in CONFIGS]
# cast_back configurations: cast_back's own tests compile and run these (E5M6 data, per-row blocks)
BACK = {"row": ("row", "bf16"), "col": ("col", "fp32"), "col_ue8m0": ("col_ue8m0", "fp32"), "row_round": ("row", "bf16")}


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("tokens", [5, 0])
def test_lowers_to_one_launch(config, tokens):
    dtype, hidden, layout = _describe(config)
    text = lower_for_cuda(lambda x: cast(x, layout), jax.ShapeDtypeStruct((tokens, hidden), dtype))
    (call,) = tilek_calls(text)
    assert call["name"] == "per_token_cast_to_e5m6" and call["has_cubin"]
    record = decode_record(call["launch"])
    if tokens == 0:
        assert record["kernels"] == [] and sorted(record["zero_fill"]) == [1, 2]
        return
    (k,) = record["kernels"]
    assert k["grid"] == [tokens, 1, 1] and k["block"] == [hidden // 32, 1, 1]  # a row per CTA, 4 x 8 values per thread
    assert k["smem"] >= hidden * 3 // 2  # the packed row is staged in shared memory
    assert record["zero_fill"] == ([] if layout.startswith("row") else [2])  # column-major padding
    assert sorted(a[1] for a in k["args"] if a[0] == 0) == [0, 1, 2] and [a[2] for a in k["args"] if a[0] != 0] == [tokens]


# ---------------------------------------------------------------------------------------------
# GPU


SPECIAL_IDS = ["min_subnormal", "max_subnormal", "min_normal"]
GPU_CASES = [(1, None), (5, None), (4001, None), (0, None)] + [(5, v) for v in SPECIAL_VALUES]
GPU_IDS = ["1", "5", "4001", "0"] + [f"5-{i}" for i in SPECIAL_IDS]


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("tokens,special", GPU_CASES, ids=GPU_IDS)
def test_kernel_is_bit_exact(on_gpu, rng, config, tokens, special):
    dtype, hidden, layout = _describe(config)
    x = inputs(rng, tokens, hidden, dtype, special)
    data, sf = on_gpu(lambda x: cast(x, layout, impl="tilelang"), x)
    expected_data, expected_sf = np_cast_to_e5m6(x, LAYOUTS[layout][2])
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, stored_sf(expected_sf, layout))


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("tokens,special", [(4001, None)] + [(129, v) for v in SPECIAL_VALUES], ids=["4001"] + [f"129-{i}" for i in SPECIAL_IDS])
def test_kernel_round_trip(on_gpu, rng, config, tokens, special):
    """Cast and cast back, both on the GPU: the error bounds TileKernels tests, and bit-exactness."""
    dtype, hidden, layout = _describe(config)
    sf_layout, out = BACK[layout]
    x = inputs(rng, tokens, hidden, dtype, special)

    def program(x):
        data, sf = cast(x, layout, impl="tilelang")
        return cast_back((data, sf), out, (1, hidden), "e5m6", sf_layout=sf_layout, impl="tilelang")

    back = on_gpu(program, x)
    data, sf = np_cast_to_e5m6(x, LAYOUTS[layout][2])
    with jax.default_device(jax.devices("cpu")[0]):
        expected = np.asarray(cast_back((data, sf[:, None]), "fp32", (1, hidden), "e5m6", impl="xla")).astype(back.dtype)
    assert_bytes_equal(back, expected)
    assert calc_diff(np.asarray(back[:512], np.float32), x[:512].astype(np.float32)) < (5e-6 if special else 1e-4)


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        ((jax.ShapeDtypeStruct((2**31 - 2**10 + 1, 64), jnp.bfloat16), 64), {}, ValueError, r"^per_token_cast_to_e5m6: x may have at most 2147482624 rows"),
        ((jax.ShapeDtypeStruct((4, 128), jnp.float32), 128.0), {}, TypeError, r"^per_token_cast_to_e5m6: num_per_channels must be an int"),
        ((jax.ShapeDtypeStruct((4, 128), jnp.float32), 128), dict(round_sf="yes"), TypeError, r"^per_token_cast_to_e5m6: round_sf must be True or False"),
        ((jax.ShapeDtypeStruct((4, 0), jnp.float32), 0), {}, ValueError, r"^per_token_cast_to_e5m6: the hidden size of x must be a positive multiple of 64"),
        ((jax.ShapeDtypeStruct((4, 128), jnp.float32), 128), dict(use_packed_ue8m0=True), ValueError, r"^per_token_cast_to_e5m6: use_packed_ue8m0 needs"),
    ],
)
def test_arguments_raise_naming_the_op(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda x: per_token_cast_to_e5m6(x, *args[1:], **kwargs), args[0])


@pytest.mark.parametrize("x", ["abc", None, {"a": 1}], ids=["str", "none", "dict"])
def test_python_objects_raise_naming_the_op(x):
    with pytest.raises(TypeError, match=r"^per_token_cast_to_e5m6: x must be an array"):
        per_token_cast_to_e5m6(x, 128)


def test_huge_inputs_lower():
    """One CTA per row up to formats.MAX_TOKENS rows (gridDim.x <= 2^31 - 1), 64-bit element offsets."""
    tokens = F.MAX_TOKENS
    text = lower_for_cuda(lambda x: cast(x, "col", impl="tilelang"), jax.ShapeDtypeStruct((tokens, 64), jnp.bfloat16))
    record = decode_record(tilek_calls(text)[0]["launch"])
    (k,) = record["kernels"]
    assert k["grid"] == [tokens, 1, 1] and [a[2] for a in k["args"] if a[0] != 0] == [tokens]
