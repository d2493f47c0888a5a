"""The quantization reference (jax_tilek.quant.formats) against independent math."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from quant_testing import calc_diff

from jax_tilek import checks
from jax_tilek.quant import formats as F
from jax_tilek.testing import jit_call


def test_e2m1_matches_ml_dtypes(rng):
    v = np.concatenate([
        rng.uniform(-7, 7, 20000).astype(np.float32),
        np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 6.0, 100.0, -1e9, 0.0, 1e-30], np.float32),
    ])  # fmt: skip
    codes = np.asarray(F.encode_e2m1(jnp.asarray(v)))
    expected = np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF  # RNE, saturating
    # ml_dtypes keeps the sign of values that round to zero as well; both follow the sign bit.
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(np.asarray(F.decode_e2m1(jnp.asarray(codes))), expected.view(ml_dtypes.float4_e2m1fn).astype(np.float32))


def test_e2m1_packing(rng):
    codes = rng.integers(0, 16, size=(3, 64)).astype(np.uint8)
    packed = np.asarray(F.pack_e2m1(jnp.asarray(codes)))
    assert packed.shape == (3, 32)
    np.testing.assert_array_equal(packed & 0xF, codes[:, 0::2])
    np.testing.assert_array_equal(packed >> 4, codes[:, 1::2])
    np.testing.assert_array_equal(np.asarray(F.unpack_e2m1(jnp.asarray(packed))), codes)


def _f16_rz(v: np.float32) -> int:
    with np.errstate(over="ignore"):
        h = np.float16(v)  # round to nearest even, then step toward zero when it went outward
    if np.isfinite(h) and abs(float(h)) > abs(float(v)):
        h = np.nextafter(h, np.float16(0))
    if not np.isfinite(h):
        h = np.float16(np.copysign(65504, v))
    return int(np.array(h, np.float16).view(np.uint16))


def test_f16_round_toward_zero(rng):
    v = np.concatenate([
        rng.standard_normal(3000).astype(np.float32) * np.exp2(rng.integers(-30, 17, 3000)).astype(np.float32),
        np.array([0.0, -0.0, 65504.0, 70000.0, 2**-24, 2**-25, 2**-14, 3 * 2**-16], np.float32),
    ])  # fmt: skip
    got = np.asarray(F.f32_to_f16_bits_rz(jnp.asarray(v)))
    np.testing.assert_array_equal(got, [_f16_rz(x) for x in v])


def _e5m6_rne(v: float) -> int:
    """Exact round-to-nearest-even onto the normal e5m6 grid, by rational arithmetic."""
    sign = 0x800 if v < 0 else 0
    x = Fraction(abs(v))
    e = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    scaled = x / Fraction(2) ** e * 64  # 64 <= scaled < 128: 6 mantissa bits
    q, r = divmod(scaled, 1)
    q = int(q) + (1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and int(q) % 2) else 0)
    if q == 128:
        q, e = 64, e + 1
    return sign | ((e + 15) << 6) | (q - 64)


def test_e5m6_rounds_to_nearest_even_in_the_normal_range(rng):
    v = rng.standard_normal(5000).astype(np.float32) * np.exp2(rng.integers(-12, 14, 5000)).astype(np.float32)
    v = v[(np.abs(v) >= 2**-14) & (np.abs(v) <= 65024)]
    got = np.asarray(F.encode_e5m6(jnp.asarray(v)))
    np.testing.assert_array_equal(got, [_e5m6_rne(float(x)) for x in v])
    back = np.asarray(F.decode_e5m6(jnp.asarray(got)))
    assert np.all(np.abs(back - v) <= np.abs(v) * 2**-7)


def test_e5m6_packing_bit_layout(rng):
    codes = rng.integers(0, 4096, size=(2, 16)).astype(np.uint16)
    packed = np.asarray(F.pack_e5m6(jnp.asarray(codes)))
    assert packed.shape == (2, 24) and packed.dtype == np.uint8
    bits = "".join(format(int(c), "012b") for c in codes[0, :8])  # a big-endian bit stream ...
    words = [int(bits[32 * i : 32 * i + 32], 2) for i in range(3)]
    expected = np.array(words, np.uint32).astype("<u4").view(np.uint8)  # ... in little-endian words
    np.testing.assert_array_equal(packed[0, :12], expected)
    np.testing.assert_array_equal(np.asarray(F.unpack_e5m6(jnp.asarray(packed))), codes)


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1", "e5m6"])
def test_scale_factors(rng, fmt):
    f = F.get_format(fmt)
    amax = np.concatenate([np.exp2(rng.uniform(-40, 40, 2000)), [0.0, f.amax_floor, f.max_value, 448.0]]).astype(np.float32)
    sf, inv = (np.asarray(a) for a in F.scale_factors(jnp.asarray(amax), fmt))
    a = np.maximum(amax, np.float32(f.amax_floor))
    np.testing.assert_array_equal(sf, a / np.float32(f.max_value))
    np.testing.assert_array_equal(inv, np.float32(f.max_value) / a)
    sf, inv = (np.asarray(a, np.float64) for a in F.scale_factors(jnp.asarray(amax), fmt, round_sf=True))
    exact = a.astype(np.float64) / np.float32(f.max_value)
    assert np.all(np.log2(sf) == np.round(np.log2(sf)))  # powers of two ...
    assert np.all(sf * inv == 1.0)
    assert np.all(sf >= np.float32(a / np.float32(f.max_value))) and np.all(sf / 2 < exact)  # ... the ceiling


def test_e4m3_scales():
    sf, inv = F.scale_factors(jnp.asarray([448.0, 10.0], jnp.float32), "e2m1", use_e4m3_sf=True)
    assert sf.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(sf, np.float32), np.array([448 / 6, 10 / 6], np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(inv), 1 / np.asarray(sf, np.float32))


@pytest.mark.parametrize("layout", F.SF_LAYOUTS)
def test_sf_layouts_round_trip(rng, layout):
    m_b, k_b = 6, 7
    sf = np.exp2(rng.integers(-20, 20, size=(m_b, k_b))).astype(np.float32)
    stored = F.store_sf(jnp.asarray(sf), layout)
    shape, dtype = F.sf_storage_shape(layout, (m_b, k_b))
    assert stored.shape == shape and stored.dtype == dtype
    np.testing.assert_array_equal(np.asarray(F.load_sf(stored, layout, (m_b, k_b))), sf)


@pytest.mark.parametrize("layout", F.SF_LAYOUTS)
def test_sf_layouts_of_zero_tokens(layout):
    sf = jnp.zeros((0, 3), jnp.float32)
    stored = F.store_sf(sf, layout)
    assert stored.shape == F.sf_storage_shape(layout, (0, 3))[0]
    assert F.load_sf(stored, layout, (0, 3)).shape == (0, 3)


def test_packed_ue8m0_byte_positions(rng):
    m_b, k_b = 5, 6
    sf = np.exp2(rng.integers(-20, 20, size=(m_b, k_b))).astype(np.float32)
    raw = np.asarray(F.store_sf(jnp.asarray(sf), "col_ue8m0")).view(np.uint8)  # [ceil(K_b/4), 4 * align(M_b, 4)]
    for m in range(m_b):
        for k in range(k_b):
            assert raw[k // 4, 4 * m + k % 4] == int(np.log2(sf[m, k])) + 127
    assert (raw[1, 2::4] == 0).all() and (raw[:, 4 * m_b :] == 0).all()  # unused bytes are zero


def test_quantize_blocks_against_numpy(rng):
    x = (rng.standard_normal((37, 256)) * 3).astype(np.float32)
    data, sf = F.quantize_blocks(jnp.asarray(x), "e4m3", (1, 128))
    amax = np.abs(x).reshape(37, 2, 128).max(-1)
    a = np.maximum(amax, np.float32(1e-4))
    inv = np.repeat(np.float32(448) / a, 128, axis=1)
    expected = np.clip(x * inv, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(data).view(np.uint8), expected.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(sf), a / np.float32(448))
    back = F.dequantize_blocks(data, sf, "e4m3", (1, 128))
    assert calc_diff(back, x) < 1e-3


@pytest.mark.parametrize("fmt,tolerance", [("e4m3", 1e-3), ("e2m1", 2e-2), ("e5m6", 1e-4)])
def test_block_round_trip_error(rng, fmt, tolerance):
    x = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-8, 8, (64, 1)))).astype(np.float32)
    block = (1, 32) if fmt != "e5m6" else (1, 256)
    data, sf = jit_call(F.quantize_blocks, x, fmt, block, round_sf=True)
    assert calc_diff(jit_call(F.dequantize_blocks, data, sf, fmt, block), x) < tolerance


def test_the_reference_is_jittable(rng):
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.bfloat16)
    out = jax.jit(lambda x: F.quantize_blocks(x, "e2m1", (1, 32), round_sf=True))(x)
    assert out[0].shape == (8, 64) and out[0].dtype == jnp.uint8 and out[1].shape == (8, 4)


# ---------------------------------------------------------------------------------------------
# Column-major padding by scale width, partial blocks, and the shared argument rules.


@pytest.mark.parametrize("dtype,padded", [(np.float32, 36), (ml_dtypes.float8_e4m3fn, 48)], ids=["fp32", "e4m3"])
def test_col_major_storage_pads_tokens_to_16_bytes(rng, dtype, padded):
    """TileKernels 2.1: the token axis of TMA-aligned column-major scales is align(M_b, 16 / sf_bytes), so
    every column starts 16-byte aligned: [24, 36] for fp32 scales, [24, 48] for e4m3 scales."""
    m_b, k_b = 36, 24
    sf = np.exp2(rng.uniform(-6, 6, (m_b, k_b))).astype(np.float32).astype(dtype)
    stored = np.asarray(F.store_sf(jnp.asarray(sf), "col"))
    assert stored.shape == (k_b, padded) and stored.dtype == np.dtype(dtype)
    assert F.sf_storage_shape("col", (m_b, k_b), dtype) == ((k_b, padded), np.dtype(dtype))
    assert F.tma_aligned(m_b, dtype) == padded and F.tma_alignment(dtype) == 16 // np.dtype(dtype).itemsize
    assert_equal_bytes(stored[:, :m_b], np.ascontiguousarray(sf.T))
    assert (stored[:, m_b:].view(np.uint8) == 0).all()
    np.testing.assert_array_equal(np.asarray(F.load_sf(jnp.asarray(stored), "col", (m_b, k_b))), sf.astype(np.float32))
    # 4-byte layouts keep the multiple of 4
    assert F.sf_storage_shape("col_ue8m0", (m_b, k_b), dtype)[0] == (6, 36)
    assert F.sf_storage_shape("col", (37, 3), np.float32)[0] == (3, 40) and F.sf_storage_shape("col", (37, 3), ml_dtypes.float8_e4m3fn)[0] == (3, 48)


def assert_equal_bytes(a, b):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1", "e5m6"])
@pytest.mark.parametrize("hidden,bk", [(576, 128), (192, 128), (64, 128)])
def test_partial_last_block_uses_the_columns_it_has(rng, fmt, hidden, bk):
    """K_b = ceil(H / bk); the last block's amax (and so its scale) comes from its own columns only, as in
    TileKernels' torch.cast (which pads and masks the padding out of the maximum)."""
    x = (rng.standard_normal((5, hidden)) * np.exp2(rng.integers(-6, 6, (5, 1)))).astype(np.float32)
    x[:, (hidden // bk) * bk :] *= 0.01  # the partial block's values are much smaller than the others'
    data, sf = jit_call(F.quantize_blocks, x, fmt, (1, bk))
    k_b = -(-hidden // bk)
    assert sf.shape == (5, k_b)
    f = F.get_format(fmt)
    amax = np.stack([np.abs(x[:, k * bk : (k + 1) * bk]).max(-1) for k in range(k_b)], axis=-1)  # slices clip at H
    np.testing.assert_array_equal(np.asarray(sf), np.maximum(amax, np.float32(f.amax_floor)) / np.float32(f.max_value))
    back = jit_call(F.dequantize_blocks, data, sf, fmt, (1, bk))
    assert back.shape == x.shape
    assert calc_diff(back[:, (hidden // bk) * bk :], x[:, (hidden // bk) * bk :]) < {"e4m3": 1e-3, "e2m1": 2e-2, "e5m6": 1e-4}[fmt]


def test_argument_rules_name_the_op():
    with pytest.raises(ValueError, match=r"^my_op: num_per_channels must be one of \(16, 32, 64, 128\) or the hidden size 576, got 48$"):
        F.check_num_per_channels("my_op", 48, 576)
    assert F.check_num_per_channels("my_op", np.int64(128), 576) == 128  # need not divide H
    assert F.check_num_per_channels("my_op", 576, 576) == 576
    for bad in (128.0, True, "128", None, np.array([128])):
        with pytest.raises(TypeError, match=r"^my_op: num_per_channels must be an int"):
            F.check_num_per_channels("my_op", bad, 576)
    for bad in ("yes", 2, 0, None, 1.0):  # one rule for every family: booleans only, not 0 / 1
        with pytest.raises(TypeError, match=r"^my_op: round_sf must be True or False"):
            checks.static_bool("my_op", "round_sf", bad)
    assert checks.static_bool("my_op", "round_sf", np.True_) is True and checks.static_bool("my_op", "round_sf", False) is False
    with pytest.raises(ValueError, match=r"^my_op: use_packed_ue8m0 needs use_tma_aligned_col_major_sf"):
        F.sf_layout(False, True, True, op="my_op")
    with pytest.raises(ValueError, match=r"^use_packed_ue8m0 needs round_sf"):  # unprefixed for callers that add their own
        F.sf_layout(True, True, False)


def test_e2m1_nan_saturates_like_the_kernels():
    """NaN (from an overflowing e4m3 scale) encodes as 6 with its sign bit, as tilek_e2m1_rn does."""
    v = jnp.asarray(np.array([np.nan, -np.nan, np.inf, -np.inf], np.float32))
    assert np.asarray(F.encode_e2m1(v)).tolist() == [7, 15, 7, 15]
