"""per_block_cast (+ sf-only, + precomputed sf): numpy reference, rules, lowering, the GPU kernel."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.quant import formats as F
from jax_tilek.quant import per_block_cast, per_block_cast_kernel, per_block_cast_with_precomputed_sf, per_block_cast_with_sf_only
from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal, calc_diff, check_bias, np_load_sf, np_store_sf, rand_float

BF16, FP32 = ml_dtypes.bfloat16, np.float32
# Scale-factor configurations: TileKernels' flags (use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0).
SF_FLAGS = {
    "row": (False, False, False),
    "row_round": (False, True, False),
    "col": (True, False, False),
    "col_ue8m0": (True, True, True),
}
MAX = {"e4m3": np.float32(448), "e2m1": np.float32(6)}
FLOOR = {"e4m3": np.float32(1e-4), "e2m1": np.float32(6 * 2.0**-126)}


def tile_shape(block) -> tuple[int, int]:
    """A CTA's tile: bm x max(bk, 8192 / bm) elements (TileKernels' tiling)."""
    return block[0], max(block[1], 8192 // block[0])

def _flags(sf: str) -> dict:
    col, round_sf, packed = SF_FLAGS[sf]
    return dict(use_tma_aligned_col_major_sf=col, round_sf=round_sf, use_packed_ue8m0=packed)


# ---------------------------------------------------------------------------------------------
# An independent numpy reference (ml_dtypes casts, explicit layouts).


def _expand(v, block, shape):
    return np.repeat(np.repeat(v, block[0], 0), block[1], 1)[: shape[0], : shape[1]]


def np_scales(x, fmt, block, round_sf):
    """(sf, sf_inv) per block, fp32."""
    t, h = x.shape
    mb, kb = -(-t // block[0]), -(-h // block[1])
    padded = np.zeros((mb * block[0], kb * block[1]), np.float32)
    padded[:t, :h] = np.abs(x.astype(np.float32))
    amax = padded.reshape(mb, block[0], kb, block[1]).max(axis=(1, 3))
    a = np.maximum(amax, FLOOR[fmt])
    sf = a / MAX[fmt]
    if not round_sf:
        return sf, MAX[fmt] / a
    mantissa, exponent = np.frexp(sf)  # sf = mantissa * 2^exponent, mantissa in [0.5, 1)
    sf = np.ldexp(np.float32(1), exponent - (mantissa == 0.5)).astype(np.float32)  # 2^ceil(log2 sf)
    return sf, (np.float32(1) / sf).astype(np.float32)


def np_encode(v, fmt):
    """fp32 scaled values -> stored data bytes (e4m3 as float8_e4m3fn, e2m1 packed uint8)."""
    if fmt == "e4m3":
        return np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    codes = np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def np_per_block_cast(x, fmt, block, sf_layout):
    sf, inv = np_scales(x, fmt, block, SF_FLAGS[sf_layout][1])
    data = np_encode(x.astype(np.float32) * _expand(inv, block, x.shape), fmt)
    return data, np_store_sf(sf, sf_layout)


def np_dequantize(data, sf, fmt, block):
    if fmt == "e4m3":
        values = data.astype(np.float32)
    else:
        codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(data.shape[0], 2 * data.shape[1])
        values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return values * _expand(sf, block, values.shape)


def _input(rng, shape, dtype):
    """Normal values with per-row magnitudes 2^[-20, 20]: many scales inside a 32- or 128-row block."""
    return rand_float(rng, shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# CPU: the reference path against numpy.

CPU_SHAPES = [(1, 64), (37, 192), (160, 256), (0, 128)]


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fmt", ["e4m3", "e2m1"])
@pytest.mark.parametrize("block", [(32, 32), (128, 128), (32, 128), (128, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("sf_layout", list(SF_FLAGS))
def test_reference_matches_numpy(rng, dtype, fmt, block, sf_layout):
    for shape in CPU_SHAPES:
        x = _input(rng, shape, dtype)
        data, sf = per_block_cast(jnp.asarray(x), fmt, block, **_flags(sf_layout), impl="xla")
        expected_data, expected_sf = np_per_block_cast(x, fmt, block, sf_layout)
        assert_bytes_equal(data, expected_data)
        assert_bytes_equal(sf, expected_sf)
        assert_bytes_equal(per_block_cast_with_sf_only(jnp.asarray(x), fmt, block, **_flags(sf_layout), impl="xla"), expected_sf)
        logical = np_scales(x, fmt, block, SF_FLAGS[sf_layout][1])[0]
        assert_bytes_equal(np_load_sf(expected_sf, sf_layout, logical.shape), logical)


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1"])
def test_precomputed_sf_reference(rng, fmt):
    x = _input(rng, (70, 320), FP32)
    sf = np.exp2(rng.uniform(-10, 4, size=(3, 3))).astype(np.float32)  # arbitrary positive scales
    data = per_block_cast_with_precomputed_sf(jnp.asarray(x), fmt, (32, 128), jnp.asarray(sf), impl="xla")
    inv = np.float32(1) / sf
    assert_bytes_equal(data, np_encode(x * _expand(inv, (32, 128), x.shape), fmt))
    # With the scales per_block_cast computed, the data is per_block_cast's (when sf_inv == 1 / sf).
    _, own_sf = per_block_cast(jnp.asarray(x), fmt, (32, 128), round_sf=True, impl="xla")
    data = per_block_cast_with_precomputed_sf(jnp.asarray(x), fmt, (32, 128), own_sf, impl="xla")
    assert_bytes_equal(data, per_block_cast(jnp.asarray(x), fmt, (32, 128), round_sf=True, impl="xla")[0])


@pytest.mark.parametrize("fmt,tolerance", [("e4m3", 1e-3), ("e2m1", 2e-2)])
def test_round_trip_error_and_bias(rng, fmt, tolerance):
    x = rng.standard_normal((256, 512)).astype(np.float32)
    data, sf = per_block_cast(jnp.asarray(x), fmt, (32, 32), round_sf=True, impl="xla")
    back = np_dequantize(np.asarray(data), np.asarray(sf), fmt, (32, 32))
    assert calc_diff(back, x) < tolerance
    check_bias(back, x)


def test_partial_blocks_use_only_the_elements_present(rng):
    x = _input(rng, (130, 192), FP32)  # a 2-row last row block; a 64-column last column block of 128
    _, sf = per_block_cast(jnp.asarray(x), "e4m3", (128, 128), impl="xla")
    np.testing.assert_array_equal(np.asarray(sf)[1, 1], np.maximum(np.abs(x[128:, 128:]).max(), FLOOR["e4m3"]) / MAX["e4m3"])


def test_abstract_eval_shapes():
    x = jax.ShapeDtypeStruct((300, 576), jnp.bfloat16)
    d, s = jax.eval_shape(lambda x: per_block_cast(x, "e2m1", (128, 128), True, True, True), x)
    assert (d.shape, d.dtype) == ((300, 288), jnp.uint8) and (s.shape, s.dtype) == ((2, 4), jnp.int32)
    d, s = jax.eval_shape(lambda x: per_block_cast(x, "e4m3", (32, 32), True), x)
    assert (d.shape, d.dtype) == ((300, 576), jnp.float8_e4m3fn) and (s.shape, s.dtype) == ((18, 12), jnp.float32)
    s = jax.eval_shape(lambda x: per_block_cast_with_sf_only(x, "e4m3", (32, 128)), jax.ShapeDtypeStruct((0, 256), jnp.float32))
    assert s.shape == (0, 2)


@pytest.mark.parametrize(
    "fn,shape,dtype,message",
    [
        (lambda x: per_block_cast(x, "e4m3", (32, 32)), (4, 4, 64), jnp.float32, r"x must be \[num_tokens, hidden\]"),
        (lambda x: per_block_cast(x, "e4m3", (32, 32)), (4, 64), jnp.float16, "x must be bfloat16 or float32"),
        (lambda x: per_block_cast(x, "e5m6", (32, 32)), (4, 64), jnp.float32, "fmt must be one of"),
        (lambda x: per_block_cast(x, "e4m3", (64, 32)), (4, 64), jnp.float32, r"block_size must be \(bm, bk\) with bm, bk in \(32, 128\)"),
        (lambda x: per_block_cast(x, "e4m3", (32,)), (4, 64), jnp.float32, "block_size must be"),
        (lambda x: per_block_cast(x, "e4m3", (32, 32)), (4, 96), jnp.float32, r"hidden size \(x.shape\[1\] = 96\) must be a multiple of 64"),
        (lambda x: per_block_cast(x, "e4m3", (32, 32), False, True, True), (4, 64), jnp.float32, "use_packed_ue8m0 needs use_tma_aligned_col_major_sf"),
        (lambda x: per_block_cast(x, "e4m3", (32, 32), True, False, True), (4, 64), jnp.float32, "use_packed_ue8m0 needs round_sf"),
        (lambda x: per_block_cast_with_sf_only(x, "e2m1", (32, 32)), (4, 32), jnp.float32, "multiple of 64"),
        (lambda x: per_block_cast_with_precomputed_sf(x, "e4m3", (32, 32), jnp.ones((1, 2), jnp.float32), True), (4, 64), jnp.float32, "sf must be row-major"),
        (lambda x: per_block_cast_with_precomputed_sf(x, "e4m3", (32, 32), jnp.ones((2, 2), jnp.float32)), (4, 64), jnp.float32, r"sf must be row-major float32 \[1, 2\]"),
        (lambda x: per_block_cast_with_precomputed_sf(x, "e4m3", (32, 32), jnp.ones((1, 2), jnp.int32)), (4, 64), jnp.float32, "sf must be row-major float32"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_at_trace_time(fn, shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype))


_X = jnp.zeros((4, 64), jnp.float32)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: per_block_cast(_X, "e4m3", (32.0, 128.0)), TypeError, "per_block_cast: block_size must be an integer, got 32.0"),
        (lambda: per_block_cast(_X, "e4m3", 32), TypeError, r"per_block_cast: block_size must be a pair \(bm, bk\)"),
        (lambda: per_block_cast(_X, "e4m3", "32x32"), TypeError, r"per_block_cast: block_size must be a pair \(bm, bk\)"),
        (lambda: per_block_cast(_X, "e4m3", (0, 128)), ValueError, r"per_block_cast: block_size must be \(bm, bk\) with bm, bk in \(32, 128\)"),
        (lambda: per_block_cast(_X, "e4m3", (True, 128)), TypeError, "per_block_cast: block_size must be an integer, got True"),
        (lambda: per_block_cast(_X, ["e4m3"], (32, 32)), ValueError, "per_block_cast: fmt must be one of"),
        (lambda: per_block_cast(_X, "e4m3", (32, 32), "yes"), TypeError, "per_block_cast: use_tma_aligned_col_major_sf must be True or False"),
        (lambda: per_block_cast(_X, "e4m3", (32, 32), round_sf=None), TypeError, "per_block_cast: round_sf must be True or False"),
        (lambda: per_block_cast(_X.tolist(), "e4m3", (32, 32)), TypeError, "per_block_cast: x must be an array, got list"),
        (lambda: per_block_cast(_X, "e4m3", (32, 32), impl="cuda"), ValueError, "per_block_cast: impl must be one of"),
        (lambda: per_block_cast_with_sf_only(None, "e4m3", (32, 32)), TypeError, "per_block_cast_with_sf_only: x must be an array"),
        (lambda: per_block_cast_with_sf_only(_X, "e4m3", (32, 32.5)), TypeError, "per_block_cast_with_sf_only: block_size must be an integer"),
        (lambda: per_block_cast_with_precomputed_sf(_X, "e4m3", (32, 32), [[1.0, 1.0]]), TypeError, "per_block_cast_with_precomputed_sf: sf must be an array, got list"),
        (lambda: per_block_cast_with_precomputed_sf(_X, "e4m3", (32, 32), jnp.ones((1, 2)), use_packed_ue8m0=1), TypeError, "per_block_cast_with_precomputed_sf: use_packed_ue8m0 must be True or False"),
    ],
)  # fmt: skip
def test_misuse_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "fn,shape,message",
    [
        (lambda x: per_block_cast(x, "e4m3", (32, 32)), (1, 2**31), "per_block_cast: x has 2147483648 elements along axis 1"),
        (lambda x: per_block_cast_with_sf_only(x, "e2m1", (128, 128)), (2**31, 64), "per_block_cast_with_sf_only: x has 2147483648 elements along axis 0"),
    ],
)
def test_extents_beyond_the_kernel_are_rejected_at_trace_time(fn, shape, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.bfloat16))


# Token counts whose token tiles exceed grid y's 65,535 take one flat grid; extents near 2^31 lower
# (the kernel's extents are 64-bit where an index could pass 2^31). (shape, dtype, fmt, block, sf layout)
LARGE = [
    ((65535 * 32 + 1, 64), BF16, "e4m3", (32, 32), "col_ue8m0"),
    ((3_000_000, 128), FP32, "e2m1", (32, 128), "row"),
    ((65536 * 128, 64), BF16, "e4m3", (128, 128), "col"),
    ((2**31 - 64, 64), BF16, "e2m1", (128, 32), "row_round"),
    ((2, 2**31 - 64), FP32, "e4m3", (32, 128), "col_ue8m0"),
]


@pytest.mark.parametrize("shape,dtype,fmt,block,sf", LARGE, ids=lambda v: str(v))
def test_large_shapes_lower(shape, dtype, fmt, block, sf):
    tm, tk = tile_shape(block)
    m_tiles, k_tiles = -(-shape[0] // tm), -(-shape[1] // tk)
    flat = m_tiles > 65535
    for fn, nbuffers in [
        (lambda x: per_block_cast(x, fmt, block, **_flags(sf)), 3),
        (lambda x: per_block_cast_with_sf_only(x, fmt, block, **_flags(sf)), 2),
    ]:
        (call,) = tilek_calls(lower_for_cuda(fn, jax.ShapeDtypeStruct(shape, dtype)))
        (k,) = decode_record(call["launch"])["kernels"]
        assert k["grid"] == ([m_tiles * k_tiles, 1, 1] if flat else [k_tiles, m_tiles, 1])
        assert sorted(a[1] for a in k["args"] if a[0] == 0) == list(range(nbuffers))
        wide = (m_tiles + 1) * tm * (k_tiles + 1) * tk * 4 >= 2**31  # the launch's rule
        assert all(a[1] == (8 if wide else 4) for a in k["args"] if a[0] == 2)  # 64-bit extents only when needed


def test_kernel_extents_are_64_bit_when_wide():
    for fold in (False, True):
        for wide in (False, True):
            params = dict(in_dtype="float32", fmt="e4m3", bm=32, bk=128, layout="col_ue8m0", round_sf=True, mode="cast")
            params.update({"fold": True} if fold else {}, **({"wide": True} if wide else {}))
            source = per_block_cast_kernel.artifact(params, "sm_90a").source
            signature = re.search(r'extern "C" __global__ void __launch_bounds__[^{]*', source).group(0)
            i = "int64_t" if wide else "int"
            assert signature.endswith(f"{i} m_bytes, {i} num_tokens, {i} x_words) "), signature


@pytest.mark.parametrize(
    "shape,dtype,block,wide",
    [
        ((16384, 7168), BF16, (128, 128), False),
        ((65536, 4096), BF16, (32, 32), False),
        ((8192, 7168), FP32, (128, 128), False),
        ((65536, 8192), FP32, (32, 32), True),
        ((2**31 // 64, 64), BF16, (32, 32), True),
    ],
    ids=str,
)
def test_extents_are_32_bit_unless_the_shape_needs_64(shape, dtype, block, wide):
    """Ordinary shapes keep the 32-bit index arithmetic (the fast code); 64-bit extents only for
    shapes where an index could pass 2^31 (whatever the scale layout)."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    for sf in ("col_ue8m0", "row_round"):
        (call,) = tilek_calls(lower_for_cuda(lambda x: per_block_cast(x, "e4m3", block, **_flags(sf)), x))
        (k,) = decode_record(call["launch"])["kernels"]
        assert {a[1] for a in k["args"] if a[0] == 2} == {8 if wide else 4}


# ---------------------------------------------------------------------------------------------
# The op contract over the named calls. Not row-wise: a block spans bm tokens.


def _sf_name(case) -> str:
    if case.args[1:]:
        return "row"
    flags = tuple(case.kwargs.get(k, False) for k in ("use_tma_aligned_col_major_sf", "round_sf", "use_packed_ue8m0"))
    return next(name for name, f in SF_FLAGS.items() if f == flags)


def _config(case) -> tuple:
    """(dtype, fmt, block, sf layout) of a named call."""
    x, fmt, block = case.args[:3] if case.args[1:] else (case.args[0], case.kwargs["fmt"], case.kwargs["block_size"])
    return np.dtype(x.dtype), fmt, tuple(block), _sf_name(case)


class TestPerBlockCast(OpContract):
    fn = per_block_cast
    bad_inputs = [((jax.ShapeDtypeStruct((4, 96), jnp.float32),), dict(fmt="e4m3", block_size=(32, 32)), ValueError, "must be a multiple of 64")]


class TestPerBlockCastWithSfOnly(OpContract):
    fn = per_block_cast_with_sf_only


class TestPerBlockCastWithPrecomputedSf(OpContract):
    fn = per_block_cast_with_precomputed_sf


# ---------------------------------------------------------------------------------------------
# The configurations the GPU runs: (dtype, fmt, block, sf layout) of the named calls, each one
# cubin (token count and hidden size are runtime values); the flat grid forced ("_flat").

def _named(fn, flat: bool = False) -> list:
    return [c for c in fn.cases if c.name.startswith(("small_", "gpu_")) and c.args[0].shape == (131, 576) and bool(c.config) == flat]


GPU_CAST, GPU_SF_ONLY, GPU_WITH_SF = _named(per_block_cast), _named(per_block_cast_with_sf_only), _named(per_block_cast_with_precomputed_sf)
GPU_FOLD = _named(per_block_cast, flat=True)
# Token counts: 0, 1, not a multiple of the block, many; hidden sizes: 576 (a partial 128-column
# block) and DeepSeek's 4096 / 7168.
GPU_SHAPES = [(0, 7168), (1, 576), (131, 7168), (300, 576), (4001, 4096)]


def _check_launch(text, shape, block, nbuffers):
    """One tilek_launch with its cubin; one kernel on a (hidden tiles, token tiles) grid of 256 threads
    that receives every buffer."""
    (call,) = tilek_calls(text)
    assert call["has_cubin"]
    record = decode_record(call["launch"])
    assert record["num_buffers"] == nbuffers
    if shape[0] == 0:
        return record
    (k,) = record["kernels"]
    tm, tk = tile_shape(block)
    assert k["grid"] == [-(-shape[1] // tk), -(-shape[0] // tm), 1] and k["block"] == [256, 1, 1]
    assert sorted(a[1] for a in k["args"] if a[0] == 0) == list(range(nbuffers))
    return record


@pytest.mark.parametrize("case", GPU_CAST, ids=lambda c: c.name)
def test_cast_lowers_to_one_launch(case):
    dtype, fmt, block, sf = _config(case)
    for shape in [(131, 576), (0, 4096)]:
        text = lower_for_cuda(lambda x: per_block_cast(x, fmt, block, **_flags(sf)), jax.ShapeDtypeStruct(shape, dtype))
        record = _check_launch(text, shape, block, 3)
        if shape[0] == 0:
            assert record["kernels"] == [] and record["zero_fill"] == [1, 2]


@pytest.mark.parametrize("case", GPU_SF_ONLY, ids=lambda c: c.name)
def test_sf_only_lowers_to_one_launch(case):
    dtype, fmt, block, sf = _config(case)
    text = lower_for_cuda(lambda x: per_block_cast_with_sf_only(x, fmt, block, **_flags(sf)), jax.ShapeDtypeStruct((131, 576), dtype))
    _check_launch(text, (131, 576), block, 2)


@pytest.mark.parametrize("case", GPU_WITH_SF, ids=lambda c: c.name)
def test_with_sf_lowers_to_one_launch(case):
    dtype, fmt, block, _ = _config(case)
    shape = (131, 576)
    sf = jax.ShapeDtypeStruct(F.num_blocks(shape, block), jnp.float32)
    text = lower_for_cuda(lambda x, s: per_block_cast_with_precomputed_sf(x, fmt, block, s), jax.ShapeDtypeStruct(shape, dtype), sf)
    _check_launch(text, shape, block, 3)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CAST, ids=lambda c: c.name)
def test_kernel_is_bit_exact(on_gpu, rng, case):
    dtype, fmt, block, sf = _config(case)
    inputs = [_input(rng, shape, dtype) for shape in GPU_SHAPES]
    outs = on_gpu(lambda *xs: [per_block_cast(x, fmt, block, **_flags(sf), impl="tilelang") for x in xs], *inputs)
    for x, (data, scales) in zip(inputs, outs):
        expected_data, expected_sf = np_per_block_cast(x, fmt, block, sf)
        assert_bytes_equal(scales, expected_sf)
        assert_bytes_equal(data, expected_data)
    x, (data, scales) = inputs[-1], outs[-1]
    logical = np_load_sf(np.asarray(scales), sf, F.num_blocks(x.shape, block))
    check_bias(np_dequantize(np.asarray(data), logical, fmt, block), x)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_SF_ONLY, ids=lambda c: c.name)
def test_sf_only_kernel(on_gpu, rng, case):
    dtype, fmt, block, sf = _config(case)
    inputs = [_input(rng, shape, dtype) for shape in GPU_SHAPES]
    outs = on_gpu(lambda *xs: [per_block_cast_with_sf_only(x, fmt, block, **_flags(sf), impl="tilelang") for x in xs], *inputs)
    for x, scales in zip(inputs, outs):
        assert_bytes_equal(scales, np_per_block_cast(x, fmt, block, sf)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_WITH_SF, ids=lambda c: c.name)
def test_precomputed_sf_kernel(on_gpu, rng, case):
    dtype, fmt, block, _ = _config(case)
    inputs = []
    for shape in GPU_SHAPES:
        x = _input(rng, shape, dtype)
        sf = np.exp2(rng.uniform(-30, 10, size=F.num_blocks(shape, block))).astype(np.float32)  # not powers of two
        inputs += [x, sf]
    outs = on_gpu(
        lambda *a: [per_block_cast_with_precomputed_sf(x, fmt, block, s, impl="tilelang") for x, s in zip(a[::2], a[1::2])], *inputs
    )
    for x, sf, data in zip(inputs[::2], inputs[1::2], outs):
        inv = (np.float32(1) / sf).astype(np.float32)
        assert_bytes_equal(data, np_encode(x.astype(np.float32) * _expand(inv, block, x.shape), fmt))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_FOLD, ids=lambda c: c.name)
def test_flat_grid_kernel_is_bit_exact(on_gpu, rng, case):
    """The flat grid (``fold``) forced on the usual shapes, for the three functions."""
    dtype, fmt, block, sf = _config(case)
    inputs = [_input(rng, shape, dtype) for shape in GPU_SHAPES]
    given = [np.exp2(rng.uniform(-30, 10, size=F.num_blocks(x.shape, block))).astype(np.float32) for x in inputs]
    cast, sf_only, with_sf = (fn.with_config(fold=True) for fn in (per_block_cast, per_block_cast_with_sf_only, per_block_cast_with_precomputed_sf))

    def program(xs, given):
        return [
            (cast(x, fmt, block, **_flags(sf), impl="tilelang"), sf_only(x, fmt, block, **_flags(sf), impl="tilelang"),
             with_sf(x, fmt, block, s, impl="tilelang"))
            for x, s in zip(xs, given)
        ]  # fmt: skip

    for x, s, ((data, scales), sf_only_scales, with_sf_data) in zip(inputs, given, on_gpu(program, inputs, given)):
        expected_data, expected_sf = np_per_block_cast(x, fmt, block, sf)
        assert_bytes_equal(data, expected_data)
        assert_bytes_equal(scales, expected_sf)
        assert_bytes_equal(sf_only_scales, expected_sf)
        inv = (np.float32(1) / s).astype(np.float32)
        assert_bytes_equal(with_sf_data, np_encode(x.astype(np.float32) * _expand(inv, block, x.shape), fmt))


@pytest.mark.gpu
def test_kernel_beyond_grid_y_is_bit_exact(on_gpu, rng):
    (case,) = [c for c in per_block_cast.cases if c.args[0].shape == (65535 * 32 + 33, 64)]  # 65,537 token tiles of 32
    x = _input(rng, case.args[0].shape, BF16)
    data, scales = on_gpu(case.call(per_block_cast, "tilelang"), x)
    expected_data, expected_sf = np_per_block_cast(x, "e4m3", (32, 32), "col_ue8m0")
    assert_bytes_equal(scales, expected_sf)
    assert_bytes_equal(data, expected_data)
