"""quant.per_token_cast: reference vs independent numpy math, rules, modes, lowering, and the GPU kernel."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.device import HASH_FINAL, HASH_INDEX, HASH_ROUNDS, HASH_SEED
from jax_tilek.quant import per_token_cast, per_token_cast_to_e5m6, per_token_cast_with_precomputed_sf, per_token_cast_with_sf_only
from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal, calc_diff, check_bias, np_load_sf, np_store_sf, rand_float


E4M3, FP4 = ml_dtypes.float8_e4m3fn, ml_dtypes.float4_e2m1fn
MAX = {"e4m3": 448.0, "e2m1": 6.0}
FLOOR = {"e4m3": 1e-4, "e2m1": 6 * 2.0**-126}
PACKED = dict(use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True)
COL = dict(use_tma_aligned_col_major_sf=True)
FLAGS = ("use_tma_aligned_col_major_sf", "round_sf", "use_packed_ue8m0", "use_e4m3_sf")

# ---------------------------------------------------------------------------------------------
# An independent model of the semantics (numpy + ml_dtypes).


def np_scales(amax, fmt, round_sf=False, use_e4m3_sf=False, floor=None):
    """(sf, sf_inv) per block; sf is float32 or float8_e4m3fn."""
    if floor is None:
        floor = MAX[fmt] * 2.0**-9 if use_e4m3_sf else FLOOR[fmt]
    a = np.maximum(amax.astype(np.float32), np.float32(floor))
    sf = a / np.float32(MAX[fmt])
    if round_sf:
        m, e = np.frexp(sf.astype(np.float64))
        e = np.where(m == 0.5, e - 1, e)  # ceil(log2(sf))
        return np.ldexp(1.0, e).astype(np.float32), np.ldexp(1.0, -e).astype(np.float32)
    if use_e4m3_sf:
        with np.errstate(invalid="ignore", over="ignore"):
            sf8 = sf.astype(E4M3)
        return sf8, np.float32(1) / sf8.astype(np.float32)
    return sf, np.float32(MAX[fmt]) / a


def np_quantize(v, fmt):
    if fmt == "e4m3":
        return np.clip(v, -448, 448).astype(E4M3)
    codes = np.clip(v, -6, 6).astype(FP4).view(np.uint8) & 0xF
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def np_decode(data):
    if data.dtype == np.dtype(E4M3):
        return data.astype(np.float32)
    codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(data.shape[0], -1).astype(np.uint8)
    return codes.view(FP4).astype(np.float32)


def layout_of(flags):
    if flags.get("use_packed_ue8m0"):
        return "col_ue8m0"
    return "col" if flags.get("use_tma_aligned_col_major_sf") else "row"


def np_per_token(x, fmt, npc, flags=(), x_sf=None, x_block=None, x_layout=None, amax_clamp=None, columns=None):
    """(data, stored sf, scaled fp32 values) for a plain or quantized input."""
    flags = dict(flags)
    if x_sf is None:
        start, stop = columns or (0, x.shape[1])
        values = x[:, start:stop].astype(np.float32)
        magnitudes, xs = np.abs(values), None
    else:
        values = np_decode(x)
        t, h = values.shape
        bm, bk = x_block
        logical = np_load_sf(x_sf, x_layout, (-(-t // bm), -(-h // bk)))
        xs = np.repeat(np.repeat(logical, bm, 0), bk, 1)[:t, :h]
        magnitudes = np.abs(values) * xs
    t, h = values.shape
    k_b = -(-h // npc)  # a partial last block: its amax over the columns it has (zeros pad it; |x| >= 0)
    padded = np.pad(magnitudes, ((0, 0), (0, k_b * npc - h)))
    amax = padded.reshape(t, k_b, npc).max(-1) if t else np.zeros((0, k_b), np.float32)
    sf, inv = np_scales(amax, fmt, flags.get("round_sf", False), flags.get("use_e4m3_sf", False), amax_clamp)
    multiplier = np.repeat(inv, npc, 1)[:, :h]
    if xs is not None:
        multiplier = xs * multiplier
    scaled = values * multiplier
    return np_quantize(scaled, fmt), np_store_sf(sf, layout_of(flags)), scaled


# ---------------------------------------------------------------------------------------------
# Inputs.


def random_codes(rng, shape, fmt):
    if fmt == "e4m3":
        b = rng.integers(0, 256, size=shape, dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] = 0x3C  # no NaN
        return b.view(E4M3)
    return rng.integers(0, 256, size=(shape[0], shape[1] // 2), dtype=np.uint8)


def random_scales(rng, blocks, layout, dtype="float32"):
    """Positive scales stored in ``layout``: powers of two for UE8M0, else arbitrary fp32 / e4m3 values."""
    if layout == "col_ue8m0":
        return np_store_sf(np.exp2(rng.integers(-10, 11, size=blocks)).astype(np.float32), layout)
    v = np.exp2(rng.uniform(-10, 10, size=blocks)).astype(np.float32)
    if dtype == "float8_e4m3fn":
        v = np.clip(v, 2.0**-6, 448).astype(E4M3)
    return np_store_sf(v, layout)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    hidden: int
    x: str  # bfloat16 | float32 | e4m3 | e2m1 (quantized input)
    fmt: str
    npc: int
    flags: tuple = ()
    x_block: tuple | None = None
    x_layout: str | None = None  # row | col | col_ue8m0
    x_sf_dtype: str = "float32"
    columns: tuple | None = None
    amax_clamp: float | None = None
    stochastic: bool = False

    @property
    def npc_value(self):
        return self.hidden if self.npc == -1 else self.npc


def make_inputs(rng, case: Case):
    t, h = case.tokens, case.hidden
    if case.x in ("bfloat16", "float32"):
        width = h if case.columns is None else case.columns[1] + 64
        x = rand_float(rng, (t, width), (-14, 12)).astype(case.x)
        return (x,)
    data = random_codes(rng, (t, h), case.x)
    blocks = (-(-t // case.x_block[0]), -(-h // case.x_block[1]))
    return data, random_scales(rng, blocks, case.x_layout, case.x_sf_dtype)


def run_op(case: Case, impl=None, seed=None):
    flags = dict(case.flags)

    def fn(*args):
        x = args[0] if len(args) == 1 else (args[0], args[1])
        return per_token_cast(
            x, case.fmt, case.npc_value, x_block_size=case.x_block, columns=case.columns, amax_clamp=case.amax_clamp,
            stochastic_cast=case.stochastic, impl=impl, x_sf_layout=case.x_layout, seed=seed, **flags,
        )  # fmt: skip

    return fn


# ---------------------------------------------------------------------------------------------
# The reference against the numpy model.

REFERENCE_CASES = [
    Case("bf16-e4m3-32", 7, 256, "bfloat16", "e4m3", 32),
    Case("fp32-e4m3-128-round", 5, 512, "float32", "e4m3", 128, (("round_sf", True),)),
    Case("bf16-e4m3-64-packed", 6, 576, "bfloat16", "e4m3", 64, tuple(PACKED.items())),
    Case("fp32-e2m1-16-e4m3sf", 3, 256, "float32", "e2m1", 16, (("use_e4m3_sf", True),)),
    Case("bf16-e2m1-row-col", 9, 320, "bfloat16", "e2m1", -1, tuple(COL.items())),
    Case("bf16-e4m3-col-e4m3sf", 2, 128, "bfloat16", "e4m3", 64, (("use_tma_aligned_col_major_sf", True), ("use_e4m3_sf", True))),
    Case("fp32-e4m3-clamp", 4, 128, "float32", "e4m3", 32, (), amax_clamp=0.25),
    Case("bf16-e4m3-window", 3, 256, "bfloat16", "e4m3", 128, tuple(PACKED.items()), columns=(64, 320)),
    Case("zero-tokens", 0, 256, "bfloat16", "e4m3", 128, tuple(PACKED.items())),
    Case("e4m3[2x64 row]", 5, 256, "e4m3", "e4m3", 32, (), (2, 64), "row"),
    Case("e4m3[4x32 ue8m0]", 9, 192, "e4m3", "e2m1", 64, (("round_sf", True),), (4, 32), "col_ue8m0"),
    Case("fp4[1x32 col]", 3, 128, "e2m1", "e4m3", -1, tuple(PACKED.items()), (1, 32), "col"),
    Case("fp4[1x16 e4m3]", 4, 128, "e2m1", "e2m1", 16, (("use_e4m3_sf", True),), (1, 16), "row", "float8_e4m3fn"),
    # partial last channel block (H % npc != 0): every layout, format and input kind
    Case("bf16-e4m3-128-576", 7, 576, "bfloat16", "e4m3", 128),
    Case("fp32-e4m3-128-576-packed", 9, 576, "float32", "e4m3", 128, tuple(PACKED.items())),
    Case("bf16-e2m1-128-192-col", 5, 192, "bfloat16", "e2m1", 128, tuple(COL.items())),
    Case("bf16-e2m1-128-576-e4m3sf", 3, 576, "bfloat16", "e2m1", 128, (("use_e4m3_sf", True),)),
    Case("bf16-e4m3-128-576-col-e4m3sf", 37, 576, "bfloat16", "e4m3", 128, (("use_tma_aligned_col_major_sf", True), ("use_e4m3_sf", True))),
    Case("bf16-e4m3-128-64", 3, 64, "bfloat16", "e4m3", 128, (("round_sf", True),)),
    Case("bf16-e4m3-128-576-window", 3, 576, "bfloat16", "e4m3", 128, tuple(PACKED.items()), columns=(64, 640)),
    Case("zero-tokens-576", 0, 576, "bfloat16", "e4m3", 128, tuple(PACKED.items())),
    Case("e4m3[128x128 row]-576", 5, 576, "e4m3", "e4m3", 128, tuple(PACKED.items()), (128, 128), "row"),
    Case("e4m3[32x32 ue8m0]-576", 9, 576, "e4m3", "e2m1", 128, (("round_sf", True),), (32, 32), "col_ue8m0"),
    Case("fp4[1x32 col]-192", 3, 192, "e2m1", "e4m3", 128, (("use_e4m3_sf", True),), (1, 32), "col"),
    Case("e4m3[1x128 e4m3 col]-576", 21, 576, "e4m3", "e4m3", 128, tuple(COL.items()), (1, 128), "col", "float8_e4m3fn"),
]


def np_random_bits(v: np.ndarray, seed: int) -> np.ndarray:
    """The 16 random bits of each element of fp32 ``v[T, H]`` (jax_tilek.quant.cast's hash, constants
    ``jax_tilek.device.HASH_*``): quad ``i = t * H/4 + j`` is ``v[t, 4j:4j+4]``."""
    m32 = np.uint64(0xFFFFFFFF)
    mul = lambda a, b: (a * np.uint64(b)) & m32  # noqa: E731
    w = np.ascontiguousarray(v, np.float32).view(np.uint32).reshape(-1, 4).astype(np.uint64)
    h = mul(np.arange(len(w), dtype=np.uint64), HASH_INDEX) ^ mul(np.uint64(seed), HASH_SEED)
    for k, (m, shift) in enumerate(HASH_ROUNDS):
        if shift:
            h ^= h >> np.uint64(shift)
        h = mul(h ^ w[:, k], m)
    h ^= h >> np.uint64(16)
    (m0, s0), (m1, s1) = HASH_FINAL
    r0 = mul(h, m0)
    r0 ^= r0 >> np.uint64(s0)
    r1 = mul(r0, m1)
    r1 ^= r1 >> np.uint64(s1)
    return np.stack([r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16], axis=-1).reshape(v.shape)


def _grid(fmt: str) -> np.ndarray:
    if fmt == "e2m1":
        return np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    values = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    return np.unique(values[np.isfinite(values) & (values >= 0)])


def np_stochastic(v: np.ndarray, r: np.ndarray, fmt: str) -> np.ndarray:
    """Stochastic rounding of fp32 ``v`` to ``fmt`` with 16 random bits ``r`` per element: |v| rounds up
    to the next value of the grid iff its fraction of the gap, truncated to 16 bits, plus r reaches 2^16
    (exact in float64); saturating. Returns e4m3 data or packed FP4 bytes."""
    grid, a = _grid(fmt), np.abs(v.astype(np.float64))
    i = np.clip(np.searchsorted(grid, a, side="right") - 1, 0, len(grid) - 1)
    lo, hi = grid[i], grid[np.minimum(i + 1, len(grid) - 1)]
    gap = np.where(hi > lo, hi - lo, 1.0)
    up = (hi > lo) & (np.floor((a - lo) / gap * 65536) + r >= 65536)
    rounded = np.copysign(np.where(up, hi, lo), v)
    if fmt == "e4m3":
        return rounded.astype(E4M3)
    codes = rounded.astype(FP4).view(np.uint8) & 0xF
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.name)
def test_reference_matches_numpy(rng, case):
    inputs = make_inputs(rng, case)
    data, sf = jax.jit(run_op(case, impl="xla"))(*inputs)
    kwargs = dict(flags=case.flags, amax_clamp=case.amax_clamp, columns=case.columns)
    if case.x_block:
        kwargs.update(x_sf=inputs[1], x_block=case.x_block, x_layout=case.x_layout)
    expected_data, expected_sf, _ = np_per_token(inputs[0], case.fmt, case.npc_value, **kwargs)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)


def test_quantization_error_is_small(rng):
    x = rand_float(rng, (64, 512), (-4, 4))
    for fmt, npc, limit in (("e4m3", 128, 1e-3), ("e2m1", 16, 2e-2)):
        data, sf = per_token_cast(x, fmt, npc, round_sf=True)
        back = np_decode(np.asarray(data)) * np.repeat(np.asarray(sf), npc, 1)
        assert calc_diff(back, x) < limit
        check_bias(back, x)


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1"])
def test_stochastic_cast_rounds_the_scaled_values(rng, fmt):
    x = rand_float(rng, (33, 256), (-6, 6)).astype(ml_dtypes.bfloat16)
    data, sf = per_token_cast(x, fmt, 64, round_sf=True, stochastic_cast=True, seed=5)
    expected_data, expected_sf, scaled = np_per_token(x, fmt, 64, (("round_sf", True),))
    assert_bytes_equal(sf, expected_sf)
    assert_bytes_equal(data, np_stochastic(scaled, np_random_bits(scaled, 5), fmt))
    assert (np.asarray(data).view(np.uint8) != expected_data.view(np.uint8)).any()  # not round-to-nearest
    check_bias(np_decode(np.asarray(data)), scaled)


@pytest.mark.parametrize(
    "flags", [dict(round_sf=True), PACKED, dict(use_e4m3_sf=True), dict(COL, use_e4m3_sf=True)], ids=["round", "packed", "e4m3sf", "col-e4m3sf"]
)
def test_sf_only_and_precomputed_match_the_full_op(rng, flags):
    x = rand_float(rng, (11, 512), (-8, 8)).astype(ml_dtypes.bfloat16)
    data, sf = per_token_cast(x, "e4m3", 128, **flags)
    assert_bytes_equal(per_token_cast_with_sf_only(x, "e4m3", 128, **flags), sf)
    cast_flags = {k: v for k, v in flags.items() if k != "round_sf"}
    assert_bytes_equal(per_token_cast_with_precomputed_sf(x, "e4m3", 128, sf, **cast_flags), data)


def test_precomputed_sf_divides(rng):
    """Given arbitrary fp32 scales, data = cast(x * (1 / sf))."""
    x = rand_float(rng, (5, 256), (-3, 3))
    sf = np.exp2(rng.uniform(-8, -4, (5, 8))).astype(np.float32)
    data = per_token_cast_with_precomputed_sf(x, "e4m3", 32, sf)
    inv = np.float32(1) / sf
    assert_bytes_equal(data, np_quantize(x * np.repeat(inv, 32, 1), "e4m3"))


def test_strided_rows_match_contiguous(rng):
    x = rand_float(rng, (6, 1024), (-5, 5)).astype(ml_dtypes.bfloat16)
    a = per_token_cast(x, "e4m3", 128, columns=(256, 768), **PACKED)
    b = per_token_cast(np.ascontiguousarray(x[:, 256:768]), "e4m3", 128, **PACKED)
    for u, v in zip(a, b):
        assert_bytes_equal(u, v)


def test_e5m6_dispatches_to_the_e5m6_cast(rng):
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    got = per_token_cast(x, "e5m6", 64, round_sf=True)
    expected = per_token_cast_to_e5m6(x, 64, round_sf=True)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
    with pytest.raises(ValueError, match="fmt='e5m6' takes a plain bf16/fp32 x with whole-row scaling"):
        per_token_cast(x, "e5m6", 64, stochastic_cast=True)


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((S((4, 64), jnp.bfloat16), "e3m4", 64), {}, "fmt must be one of"),
        ((S((4, 2, 64), jnp.bfloat16), "e4m3", 64), {}, r"x must be \[T, H\]"),
        ((S((4, 64), jnp.int32), "e4m3", 64), {}, "must be bfloat16 or float32"),
        ((S((4, 96), jnp.bfloat16), "e4m3", 32), {}, "multiple of 64, got 96"),
        ((S((4, 128), jnp.bfloat16), "e4m3", 48), {}, "num_per_channels must be one of"),
        ((S((4, 128), jnp.bfloat16), "e4m3", 32), dict(columns=(0, 200)), "is not a window"),
        ((S((4, 256), jnp.bfloat16), "e4m3", 32), dict(columns=(4, 132)), "16-byte aligned"),
        ((S((4, 40000 * 2), jnp.bfloat16), "e4m3", 40000 * 2), {}, "hidden sizes up to 32768"),
        ((S((4, 128), jnp.bfloat16), "e4m3", 32), dict(round_sf=True, use_e4m3_sf=True), "exclusive"),
        ((S((4, 128), jnp.bfloat16), "e4m3", 32), dict(use_packed_ue8m0=True, round_sf=True), "needs use_tma_aligned_col_major_sf"),
        ((S((4, 128), jnp.bfloat16), "e4m3", 32), dict(use_tma_aligned_col_major_sf=True, use_packed_ue8m0=True), "needs round_sf"),
        ((S((4, 128), jnp.bfloat16), "e4m3", 32), dict(amax_clamp=-1.0), "amax_clamp must be a positive"),
        ((S((4, 128), jnp.bfloat16), "e4m3", 32), dict(x_block_size=(1, 32)), "x_block_size is only for QuantTensor"),
    ],
)
def test_bad_inputs_raise_at_trace_time(args, kwargs, message):
    x, rest = args[0], args[1:]
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: per_token_cast(x, *rest, **kwargs), x)


@pytest.mark.parametrize(
    "data,sf,kwargs,message",
    [
        (S((5, 128), E4M3), S((5, 4), jnp.float32), {}, "needs x_block_size"),
        (S((5, 128), E4M3), S((5, 4), jnp.float32), dict(x_block_size=(1, 48)), "x_block_size must be"),
        (S((5, 128), E4M3), S((5, 3), jnp.float32), dict(x_block_size=(1, 32)), r"x's scale factors must be float32\[5, 4\]"),
        (S((5, 128), E4M3), S((5, 4), jnp.float16), dict(x_block_size=(1, 32)), "must be float32, float8_e4m3fn or packed"),
        (S((4, 64), jnp.uint8), S((4, 4), jnp.float32), dict(x_block_size=(1, 32)), "could be row- or column-major"),
        (S((5, 128), E4M3), S((5, 4), jnp.float32), dict(x_block_size=(1, 32), columns=(0, 64)), "columns is only supported"),
        (S((5, 128), E4M3), S((5, 4), jnp.float32), dict(x_block_size=(1, 32), x_sf_layout="col_ue8m0"), "does not hold float32"),
    ],
)
def test_bad_quant_tensors_raise_at_trace_time(data, sf, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda d, s: per_token_cast((d, s), "e4m3", 32, **kwargs), data, sf)


def test_bad_precomputed_sf_and_seed():
    x = S((4, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"sf must be float32\[4, 4\]"):
        jax.eval_shape(lambda x, s: per_token_cast_with_precomputed_sf(x, "e4m3", 32, s), x, S((4, 5), jnp.float32))
    with pytest.raises(ValueError, match="seed is only used"):
        jax.eval_shape(lambda x: per_token_cast(x, "e4m3", 32, seed=1), x)


def test_abstract_eval_is_exact():
    out = jax.eval_shape(lambda x: per_token_cast(x, "e2m1", 32, **PACKED), S((7, 7168), jnp.bfloat16))
    assert out[0].shape == (7, 3584) and out[0].dtype == jnp.uint8
    assert out[1].shape == (56, 8) and out[1].dtype == jnp.int32


@pytest.mark.parametrize(
    "flags,shape,dtype",
    [
        ({}, (36, 5), jnp.float32),
        (dict(use_e4m3_sf=True), (36, 5), jnp.float8_e4m3fn),
        (COL, (5, 36), jnp.float32),
        (dict(COL, use_e4m3_sf=True), (5, 48), jnp.float8_e4m3fn),  # 16-byte aligned columns: 16 e4m3 scales (TileKernels 2.1)
        (PACKED, (2, 36), jnp.int32),
    ],
    ids=["f32-row", "e4m3-row", "f32-col", "e4m3-col", "ue8m0"],
)
def test_partial_blocks_and_scale_storage_shapes(flags, shape, dtype):
    """H = 576 with 128-column blocks: ceil(576 / 128) = 5 blocks per row (TileKernels), the last of 64."""
    for fn in (per_token_cast, per_token_cast_with_sf_only):
        out = jax.eval_shape(lambda x: fn(x, "e4m3", 128, **flags), S((36, 576), jnp.bfloat16))
        sf = out[1] if isinstance(out, tuple) else out
        assert sf.shape == shape and sf.dtype == dtype
    cast_flags = {k: v for k, v in flags.items() if k != "round_sf"}
    out = jax.eval_shape(lambda x, s: per_token_cast_with_precomputed_sf(x, "e4m3", 128, s, **cast_flags), S((36, 576), jnp.bfloat16), S(shape, dtype))
    assert out.shape == (36, 576)
    quantized = (S((36, 576), E4M3), S((5, 48), jnp.float8_e4m3fn))  # e4m3 column-major input scales, 1 x 128 blocks
    out = jax.eval_shape(lambda d, s: per_token_cast((d, s), "e2m1", 128, x_block_size=(1, 128), **flags), *quantized)
    assert out[0].shape == (36, 288) and out[1].shape == shape


def test_partial_blocks_sf_only_and_precomputed(rng):
    x = rand_float(rng, (13, 576), (-8, 8)).astype(ml_dtypes.bfloat16)
    for flags in (dict(round_sf=True), PACKED, dict(use_e4m3_sf=True), dict(COL, use_e4m3_sf=True)):
        data, sf = per_token_cast(x, "e4m3", 128, **flags)
        expected_data, expected_sf, _ = np_per_token(x, "e4m3", 128, tuple(flags.items()))
        assert_bytes_equal(data, expected_data)
        assert_bytes_equal(sf, expected_sf)
        assert_bytes_equal(per_token_cast_with_sf_only(x, "e4m3", 128, **flags), sf)
        cast_flags = {k: v for k, v in flags.items() if k != "round_sf"}
        assert_bytes_equal(per_token_cast_with_precomputed_sf(x, "e4m3", 128, sf, **cast_flags), data)


def test_partial_blocks_stochastic(rng):
    x = rand_float(rng, (9, 576), (-6, 6)).astype(ml_dtypes.bfloat16)
    data, sf = per_token_cast(x, "e2m1", 128, round_sf=True, stochastic_cast=True, seed=3)
    _, expected_sf, scaled = np_per_token(x, "e2m1", 128, (("round_sf", True),))
    assert_bytes_equal(sf, expected_sf)
    assert_bytes_equal(data, np_stochastic(scaled, np_random_bits(scaled, 3), "e2m1"))


def test_quad_index_wraps_modulo_2_32():
    """The random-bit index of quad x[t, 4j:4j+4] is (t * H/4 + j) mod 2^32 (uint32): the reference
    traces for 2^25 rows of 1024 (2^33 quads); row 2^25 - 1 wraps."""
    big = jax.eval_shape(lambda x: per_token_cast(x, "e4m3", 128, stochastic_cast=True, impl="xla"), S((2**25, 1024), jnp.bfloat16))
    assert big[0].shape == (2**25, 1024)
    rows = jnp.asarray([2**24, 2**25 - 1], jnp.uint32)[:, None] * np.uint32(256) + jnp.arange(2, dtype=jnp.uint32)
    np.testing.assert_array_equal(np.asarray(rows), [[0, 1], [2**32 - 256, 2**32 - 255]])


@pytest.mark.parametrize(
    "fn,args,kwargs,error,message",
    [
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 48), {}, ValueError, r"^per_token_cast: num_per_channels must be one of"),
        (per_token_cast_with_sf_only, (S((4, 576), jnp.bfloat16), "e4m3", 96), {}, ValueError, r"^per_token_cast_with_sf_only: num_per_channels must be"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128.0), {}, TypeError, r"^per_token_cast: num_per_channels must be an int"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 0), {}, ValueError, r"^per_token_cast: num_per_channels must be one of"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", -128), {}, ValueError, r"^per_token_cast: num_per_channels must be one of"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", True), {}, TypeError, r"^per_token_cast: num_per_channels must be an int"),
        (per_token_cast, (S((4, 0), jnp.bfloat16), "e4m3", 128), {}, ValueError, r"^per_token_cast: the hidden size of x must be a positive multiple of 64, got 0"),
        (per_token_cast, (S((4, 576), jnp.float16), "e4m3", 128), {}, ValueError, r"^per_token_cast: x must be bfloat16 or float32"),
        (per_token_cast, (S((576,), jnp.bfloat16), "e4m3", 128), {}, ValueError, r"^per_token_cast: x must be \[T, H\]"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), None, 128), {}, ValueError, r"^per_token_cast: fmt must be one of"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(round_sf="yes"), TypeError, r"^per_token_cast: round_sf must be True or False"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(amax_clamp="1"), TypeError, r"^per_token_cast: amax_clamp must be a number"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(columns=(0.0, 64)), TypeError, r"^per_token_cast: columns must be an int"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(columns=64), TypeError, r"^per_token_cast: columns must be a pair"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(stochastic_cast=True, seed=1.5), ValueError, r"^per_token_cast: seed must be an integer scalar"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(stochastic_cast=True, seed="a"), TypeError, r"^per_token_cast: seed must be an array"),
        (per_token_cast, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(use_packed_ue8m0=True, round_sf=True), ValueError, r"^per_token_cast: use_packed_ue8m0 needs"),
        (per_token_cast_with_sf_only, (S((4, 576), jnp.bfloat16), "e4m3", 128), dict(use_tma_aligned_col_major_sf=True, use_packed_ue8m0=True), ValueError, r"^per_token_cast_with_sf_only: use_packed_ue8m0 needs round_sf"),
        (per_token_cast, (S((2**31 - 2**10 + 1, 64), E4M3), "e4m3", 64), dict(x_block_size=(1, 64)), ValueError, r"^per_token_cast: x's data may have at most 2147482624 rows"),
        (per_token_cast, (S((1, 2**31), jnp.bfloat16), "e4m3", 64), dict(columns=(0, 64)), ValueError, r"^per_token_cast: x's row length must be below 2\^31"),
    ],
)
def test_arguments_raise_naming_the_op(fn, args, kwargs, error, message):
    x, rest = args[0], args[1:]
    if "x_block_size" in kwargs:  # a QuantTensor with row-major 1 x 64 scales
        x = (x, S((x.shape[0], x.shape[1] // 64), jnp.float32))
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda x: fn(x, *rest, **kwargs), x)


def test_impl_and_seed_errors_name_the_function():
    x = np.zeros((4, 128), np.float32)
    with pytest.raises(ValueError, match=r"^per_token_cast_with_sf_only: impl must be one of"):
        per_token_cast_with_sf_only(x, "e4m3", 128, impl="cuda")
    with pytest.raises(ValueError, match=r"^per_token_cast_with_precomputed_sf: impl must be one of"):
        per_token_cast_with_precomputed_sf(x, "e4m3", 128, np.ones((4, 1), np.float32), impl=object())
    with pytest.raises(ValueError, match=r"^per_token_cast: seed must be an integer scalar in \[-2\^31, 2\^32\)"):
        per_token_cast(x, "e4m3", 128, stochastic_cast=True, seed=2**40)
    a = per_token_cast(x + 1, "e4m3", 128, stochastic_cast=True, seed=2**32 - 1, impl="xla")
    b = per_token_cast(x + 1, "e4m3", 128, stochastic_cast=True, seed=-1, impl="xla")  # taken modulo 2^32
    assert_bytes_equal(a[0], b[0])


@pytest.mark.parametrize("x", ["abc", None, {"a": 1}], ids=["str", "none", "dict"])
def test_python_objects_raise_naming_the_op(x):
    with pytest.raises(TypeError, match=r"^per_token_cast: x must be an array"):
        per_token_cast(x, "e4m3", 128)
    with pytest.raises(TypeError, match=r"^per_token_cast_with_precomputed_sf: sf must be an array"):
        per_token_cast_with_precomputed_sf(np.zeros((4, 128), np.float32), "e4m3", 128, x)
    with pytest.raises(TypeError, match=r"^per_token_cast: x's scale factors must be an array"):
        per_token_cast((np.zeros((4, 128), E4M3), x), "e4m3", 128, x_block_size=(1, 128))
    with pytest.raises(TypeError, match=r"^per_token_cast: x_block_size must be an int"):
        per_token_cast((np.zeros((4, 128), E4M3), np.ones((4, 1), np.float32)), "e4m3", 128, x_block_size=(1, 128.0))


def np_mapping(hidden: int, elems: int = 32, threads: int = 256) -> tuple[int, int]:
    """(threads, rows) per CTA: a row over whole warps of H / elems lanes, CTAs of about ``threads``."""
    lanes = -(-(hidden // elems) // 32) * 32
    rows = max(1, threads // lanes)
    return rows * lanes, rows


@pytest.mark.parametrize(
    "tokens,hidden,npc,flags",
    [(2**31 - 2**10, 64, 64, {}), (2**31 - 2**10, 128, 128, dict(COL, use_e4m3_sf=True)), (2**20, 7168, 128, PACKED)],
    ids=["max-tokens", "max-tokens-e4m3-col", "2^32.8-elements"],
)
def test_huge_inputs_lower(tokens, hidden, npc, flags):
    """Every size eval_shape accepts lowers: int32 row indices up to formats.MAX_TOKENS, 64-bit offsets."""
    text = lower_for_cuda(lambda x: per_token_cast(x, "e4m3", npc, impl="tilelang", **flags), S((tokens, hidden), jnp.bfloat16))
    (k,) = decode_record(tilek_calls(text)[0]["launch"])["kernels"]
    _, rows = np_mapping(hidden)
    assert k["grid"] == [-(-tokens // rows), 1, 1] and (2, 4, tokens) in k["args"]  # T is an int32 scalar


# ---------------------------------------------------------------------------------------------
# The op contract over the named calls: row-wise ones (row-major scales, input scales of one-token
# blocks, rounding to nearest) fold vmap into the tokens and shard along them.


def _row_wise(case) -> bool:
    kw, x = case.kwargs, case.args[0]
    one_token_blocks = not isinstance(x, tuple) or (kw["x_block_size"][0] == 1 and kw["x_sf_layout"] == "row")
    return one_token_blocks and not kw.get("stochastic_cast") and not kw.get("use_tma_aligned_col_major_sf")


def _cases(fn, row_wise: bool) -> list:
    return [c for c in fn.cases if _row_wise(c) == row_wise]


class TestPerTokenCast(OpContract):
    fn = per_token_cast
    cases = _cases(per_token_cast, True)
    rows = True
    bad_inputs = [
        ((S((4, 96), jnp.bfloat16),), dict(fmt="e4m3", num_per_channels=32), ValueError, "multiple of 64, got 96"),
        (((S((5, 128), E4M3), S((5, 3), jnp.float32)),), dict(fmt="e4m3", num_per_channels=32, x_block_size=(1, 32)), ValueError,
         r"x's scale factors must be float32\[5, 4\]"),
    ]  # fmt: skip


class TestPerTokenCastNotRowWise(OpContract):
    """Column-major scales, input scale blocks of several tokens, stochastic rounding."""

    fn = per_token_cast
    cases = _cases(per_token_cast, False)


class TestPerTokenCastWithSfOnly(OpContract):
    fn = per_token_cast_with_sf_only
    cases = _cases(per_token_cast_with_sf_only, True)
    rows = True


class TestPerTokenCastWithSfOnlyNotRowWise(OpContract):
    fn = per_token_cast_with_sf_only
    cases = _cases(per_token_cast_with_sf_only, False)


class TestPerTokenCastWithPrecomputedSf(OpContract):
    fn = per_token_cast_with_precomputed_sf
    cases = _cases(per_token_cast_with_precomputed_sf, True)
    rows = True


class TestPerTokenCastWithPrecomputedSfNotRowWise(OpContract):
    fn = per_token_cast_with_precomputed_sf
    cases = _cases(per_token_cast_with_precomputed_sf, False)


# ---------------------------------------------------------------------------------------------
# Lowering and the GPU kernel, over the named calls: "small_" and "gpu_" ones are the GPU tests'
# configurations; "tuned_" ones other thread mappings.

GPU_CASES = [c for c in per_token_cast.cases if c.name.startswith(("small_", "gpu_")) and jax.tree.leaves(c.args)[0].shape[0] < 2**18]
TUNED = [c for c in per_token_cast.cases if c.name.startswith("tuned_")]
PAST_2_31 = [c for c in per_token_cast.cases if c.name.startswith("gpu_") and jax.tree.leaves(c.args)[0].shape[0] == 2**18 + 5]


def _hidden(case) -> int:
    x, kw = case.args[0], case.kwargs
    if isinstance(x, tuple):
        return x[0].shape[1] * (1 if x[0].dtype == E4M3 else 2)
    start, stop = kw.get("columns") or (0, x.shape[1])
    return stop - start


def spec_inputs(rng, case) -> tuple:
    """A named call's arguments as the GPU tests make them: bf16/fp32 rows of wide dynamic range, or a
    QuantTensor of random codes and scales in the call's layout."""
    x = case.args[0]
    if not isinstance(x, tuple):
        return (rand_float(rng, x.shape, (-14, 12)).astype(x.dtype),)
    data, sf = x
    t, h = data.shape[0], _hidden(case)
    bm, bk = case.kwargs["x_block_size"]
    fmt = "e4m3" if data.dtype == E4M3 else "e2m1"
    return ((random_codes(rng, (t, h), fmt), random_scales(rng, (-(-t // bm), -(-h // bk)), case.kwargs["x_sf_layout"], np.dtype(sf.dtype).name)),)


@pytest.mark.parametrize("case", GPU_CASES + TUNED, ids=lambda c: c.name)
def test_launch_geometry(case):
    text = lower_for_cuda(case.call(per_token_cast, "tilelang"), *case.structs())
    (call,) = tilek_calls(text)
    record = decode_record(call["launch"])
    tokens, hidden = jax.tree.leaves(case.args)[0].shape[0], _hidden(case)
    if tokens == 0:
        assert record["kernels"] == [] and record["zero_fill"] == [1, 2]
        return
    (k,) = record["kernels"]
    threads, rows = np_mapping(hidden, **case.config)
    assert call["has_cubin"] and k["block"] == [threads, 1, 1]
    assert threads % 32 == 0 and threads // rows >= hidden // case.config.get("elems", 32)
    assert k["grid"] == [-(-tokens // rows), 1, 1]
    n_in = len(jax.tree.leaves(case.args)) + int(case.kwargs.get("stochastic_cast", False))
    buffers = sorted(a[1] for a in k["args"] if a[0] == 0)
    assert buffers == list(range(n_in + 2))  # every operand and both results are kernel arguments
    if "columns" in case.kwargs:
        x_arg = [a for a in k["args"] if a[0] == 0 and a[1] == 0][0]
        assert x_arg[2] == case.kwargs["columns"][0] * 2  # byte offset of the window


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_kernel_is_bit_exact(on_gpu, rng, case):
    inputs = spec_inputs(rng, case)
    data, sf = on_gpu(case.call(per_token_cast, "tilelang"), *inputs)
    with jax.default_device(jax.devices("cpu")[0]):
        expected_data, expected_sf = case.call(per_token_cast, "xla")(*inputs)
    assert_bytes_equal(sf, expected_sf)
    assert_bytes_equal(data, expected_data)


def _flags(case) -> tuple:
    return tuple((k, v) for k, v in case.kwargs.items() if k in FLAGS)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in per_token_cast_with_sf_only.cases if c.name.startswith("gpu_") and c.kwargs.get("use_packed_ue8m0")], ids=lambda c: c.name)
def test_kernel_sf_only(on_gpu, rng, case):
    x = rand_float(rng, case.args[0].shape, (-14, 12)).astype(ml_dtypes.bfloat16)
    sf = on_gpu(case.call(per_token_cast_with_sf_only, "tilelang"), x)
    assert_bytes_equal(sf, np_per_token(x, "e4m3", 128, _flags(case))[1])


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in per_token_cast_with_precomputed_sf.cases if c.name.startswith("gpu_") and "_round_" in c.name], ids=lambda c: c.name)
def test_kernel_precomputed_sf(on_gpu, rng, case):
    x = rand_float(rng, case.args[0].shape, (-14, 12)).astype(ml_dtypes.bfloat16)
    expected_data, sf, _ = np_per_token(x, "e4m3", 128, (("round_sf", True),))
    data = on_gpu(lambda x, sf: case.call(per_token_cast_with_precomputed_sf, "tilelang")(x, "e4m3", 128, sf), x, sf)
    assert_bytes_equal(data, expected_data)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [dict(COL, use_e4m3_sf=True), PACKED], ids=["e4m3-col", "packed"])
def test_kernel_sf_only_and_precomputed_partial_blocks(on_gpu, rng, flags):
    """H = 576 with 128-column blocks and the column-major layouts, including 16-byte aligned e4m3 scales
    (the gpu_..._4001x576 calls of both functions)."""
    x = rand_float(rng, (4001, 576), (-14, 12)).astype(ml_dtypes.bfloat16)
    expected_data, expected_sf, _ = np_per_token(x, "e4m3", 128, tuple(flags.items()))
    cast_flags = {k: v for k, v in flags.items() if k != "round_sf"}

    def program(x, sf):
        return (per_token_cast_with_sf_only(x, "e4m3", 128, impl="tilelang", **flags),
                per_token_cast_with_precomputed_sf(x, "e4m3", 128, sf, impl="tilelang", **cast_flags))  # fmt: skip

    sf, data = on_gpu(program, x, expected_sf)
    assert_bytes_equal(sf, expected_sf)
    assert_bytes_equal(data, expected_data)


@pytest.mark.gpu
def test_kernel_stochastic_with_traced_seed(on_gpu, rng):
    (case,) = [c for c in per_token_cast.cases if c.name == "gpu_bf16_e4m3_1x128_ue8m0_sr_513x4096"]
    (x,) = spec_inputs(rng, case)
    data, sf = on_gpu(lambda x, s: per_token_cast(x, seed=s, impl="tilelang", **case.kwargs), x, np.uint32(77))
    with jax.default_device(jax.devices("cpu")[0]):
        expected_data, expected_sf = per_token_cast(x, seed=np.uint32(77), impl="xla", **case.kwargs)
    assert_bytes_equal(sf, expected_sf)
    assert_bytes_equal(data, expected_data)
    _, _, scaled = np_per_token(x, "e4m3", 128, tuple(PACKED.items()))
    check_bias(np.asarray(data).astype(np.float64), scaled)


@pytest.mark.gpu
@pytest.mark.parametrize("case", TUNED, ids=lambda c: c.name)
def test_kernel_tunings_are_bit_exact(on_gpu, rng, case):
    """Other thread mappings (elements per thread, threads per CTA), as the benchmarks try them."""
    x = rand_float(rng, (1001, 7168), (-14, 12)).astype(ml_dtypes.bfloat16)
    data, sf = on_gpu(case.call(per_token_cast, "tilelang"), x)
    expected_data, expected_sf, _ = np_per_token(x, case.kwargs["fmt"], case.kwargs["num_per_channels"], tuple(PACKED.items()))
    assert_bytes_equal(sf, expected_sf)
    assert_bytes_equal(data, expected_data)


@pytest.mark.gpu
@pytest.mark.parametrize("case", PAST_2_31, ids=lambda c: c.name)
def test_kernel_past_2_31_elements(on_gpu, rng, case):
    """bf16 [2^18 + 5, 8192] (2^31 + 40960 elements): 64-bit element offsets. Rows are built on the device
    from a small block with a prime period; rows past element 2^31 (row 2^18) and the last are checked."""
    tokens, hidden = case.args[0].shape
    fmt, npc, flags = case.kwargs["fmt"], case.kwargs["num_per_channels"], _flags(case)
    small = rand_float(rng, (1021, hidden), (-14, 12)).astype(ml_dtypes.bfloat16)
    rows = np.array([0, 2**18 - 1, 2**18, 2**18 + 1, tokens - 1])
    col = dict(flags).get("use_tma_aligned_col_major_sf", False)

    def program(small):
        x = small[jnp.arange(tokens) % small.shape[0]]
        data, sf = case.call(per_token_cast, "tilelang")(x)
        return data[rows], (sf[:, rows] if col else sf[rows])

    data, sf = on_gpu(program, small)
    expected_data, expected_sf, _ = np_per_token(small[rows % 1021], fmt, npc, flags)
    assert_bytes_equal(data, expected_data)
    if col:  # the packed UE8M0 words of those rows (columns of the storage)
        expected_sf = expected_sf[:, : len(rows)]
    assert_bytes_equal(sf, expected_sf)
