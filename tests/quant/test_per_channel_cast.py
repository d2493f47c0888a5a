"""Per-channel casts (per_channel_cast, per_channel_cast_fused, per_channel_cast_and_transpose):
the reference against independent numpy math, the rules, the lowering, and the GPU kernel bit for bit."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.quant import formats as F
from jax_tilek.quant import per_channel_cast, per_channel_cast_and_transpose, per_channel_cast_fused, per_channel_cast_kernel
from jax_tilek.testing import OpContract, decode_record, jit_call, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal, calc_diff, check_bias

E4M3 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------
# Inputs and expected values.


def _input(rng, t: int, h: int) -> np.ndarray:
    """bf16 [T, H] with a wide dynamic range across channels and rows, and one tiny channel (below
    the amax floor)."""
    col = np.exp2(rng.integers(-16, 16, size=(1, h))).astype(np.float32)
    row = np.exp2(rng.integers(-3, 4, size=(t, 1))).astype(np.float32)
    x = rng.standard_normal((t, h), np.float32) * col * row
    if h:
        x[:, h // 3] *= np.float32(2.0**-30)
    return x.astype(BF16)


def _quant_tensor(rng, t: int, h: int, npc: int, layout: str):
    """An e4m3 QuantTensor with per-token (1, npc) scales stored in ``layout`` (computed on the host)."""
    x = _input(rng, t, h)
    with jax.default_device(jax.devices("cpu")[0]):
        data, sf = jit_call(lambda x: F.quantize_blocks(x, "e4m3", (1, npc), round_sf=layout == "col_ue8m0"), x)
        return np.asarray(data), np.asarray(jit_call(F.store_sf, sf, layout))


def _expected(x, npt, round_sf=False, packed=False, x_sf=None, npc=None, layout=None, pos=None, transpose=False):
    """formats.quantize_blocks with block (npt, 1) + store_sf, on the host: what every kernel must match."""
    with jax.default_device(jax.devices("cpu")[0]):
        v = jnp.asarray(x)
        t, h = x.shape
        if x_sf is not None:
            v = F.dequantize_blocks(v, F.load_sf(jnp.asarray(x_sf), layout, (t, h // npc)), "e4m3", (1, npc))
        if pos is not None:
            v = jnp.concatenate([v, jnp.zeros((1, h), v.dtype)])[np.where(pos >= 0, pos, t)]
        data, sf = F.quantize_blocks(v, "e4m3", (npt, 1), round_sf=round_sf)
        sf = F.store_sf(sf, "ue8m0_along_m" if packed else "row")
        return np.asarray(data.T if transpose else data), np.asarray(sf)


def _numpy_cast(v: np.ndarray, npt: int, round_sf: bool):
    """Independent math: fp32 values -> (e4m3 data, fp32 sf [ceil(T/npt), H]) with blocks (npt, 1)."""
    t, h = v.shape
    m_b = -(-t // npt)
    padded = np.zeros((m_b * npt, h), np.float32)
    padded[:t] = np.abs(v)
    a = np.maximum(padded.reshape(m_b, npt, h).max(axis=1), np.float32(1e-4))
    if round_sf:
        mantissa, exponent = np.frexp(a.astype(np.float64) / 448.0)  # exact quotient, then its ceil power of 2
        e = np.where(mantissa == 0.5, exponent - 1, exponent)
        sf, inv = np.ldexp(1.0, e).astype(np.float32), np.ldexp(1.0, -e).astype(np.float32)
    else:
        sf, inv = a / np.float32(448), np.float32(448) / a
    scaled = v * np.repeat(inv, npt, axis=0)[:t]
    return np.clip(scaled, -448, 448).astype(E4M3), sf


def _numpy_pack_along_m(sf: np.ndarray) -> np.ndarray:
    """Power-of-two sf [M_b, H] -> int32 [ceil(M_b/4), H], block 4i+j in byte j of word i."""
    m_b, h = sf.shape
    e = np.zeros((-(-m_b // 4) * 4, h), np.uint32)
    e[:m_b] = np.log2(sf.astype(np.float64)).astype(np.int64) + 127
    e = e.reshape(-1, 4, h)
    return (e[:, 0] | e[:, 1] << 8 | e[:, 2] << 16 | e[:, 3] << 24).view(np.int32)


# ---------------------------------------------------------------------------------------------
# The reference (impl="xla") against independent numpy math.


@pytest.mark.parametrize("t,h,npt,round_sf", [(256, 192, 128, False), (384, 128, 32, True), (128, 64, 32, False)])
def test_reference_against_numpy(rng, t, h, npt, round_sf):
    x = _input(rng, t, h)
    data, sf = jit_call(per_channel_cast, x, num_per_tokens=npt, round_sf=round_sf, impl="xla")
    expected_data, expected_sf = _numpy_cast(x.astype(np.float32), npt, round_sf)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)
    back = np.asarray(data, np.float32) * np.repeat(np.asarray(sf), npt, axis=0)
    assert calc_diff(back, x.astype(np.float32)) < 1e-3
    expected = _expected(x, npt, round_sf)
    assert_bytes_equal(data, expected[0])
    assert_bytes_equal(sf, expected[1])


def test_reference_rounding_is_unbiased(rng):
    x = (rng.standard_normal((512, 512), np.float32) * 3).astype(BF16)
    data, sf = jit_call(per_channel_cast, x, impl="xla")
    exact = x.astype(np.float64) / np.repeat(np.asarray(sf, np.float64), 128, axis=0)
    check_bias(np.asarray(data, np.float32), exact)


@pytest.mark.parametrize("npt,t", [(128, 384), (128, 512), (32, 128), (32, 256)])
def test_reference_packed_along_m(rng, npt, t):
    x = _input(rng, t, 128)
    data, sf = jit_call(per_channel_cast, x, num_per_tokens=npt, round_sf=True, use_packed_ue8m0=True, impl="xla")
    expected_data, expected_sf = _numpy_cast(x.astype(np.float32), npt, True)
    assert_bytes_equal(data, expected_data)
    assert sf.shape == (-(-t // npt // 4), 128) and sf.dtype == jnp.int32
    assert_bytes_equal(sf, _numpy_pack_along_m(expected_sf))


@pytest.mark.parametrize("layout,npc", [("row", 128), ("col", 32), ("col_ue8m0", 32), ("col_ue8m0", 128)])
def test_reference_quant_tensor_input(rng, layout, npc):
    t, h = 256, 256
    data_in, sf_in = _quant_tensor(rng, t, h, npc, layout)
    data, sf = jit_call(per_channel_cast, (data_in, sf_in), num_per_tokens=32, num_per_channels=npc, impl="xla")
    logical = np.asarray(F.load_sf(jnp.asarray(sf_in), layout, (t, h // npc)))
    decoded = data_in.astype(np.float32) * np.repeat(logical, npc, axis=1)  # fp32 product, as the kernel
    expected_data, expected_sf = _numpy_cast(decoded, 32, False)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)


def test_reference_quant_tensor_layout_can_be_named(rng):
    # T = 128 tokens of H/npc = 128 groups: row-major [128, 128] and column-major [128, 128] look alike.
    data_in, sf_in = _quant_tensor(rng, 128, 4096, 32, "col")
    by_name = jit_call(per_channel_cast, (data_in, sf_in), num_per_channels=32, x_sf_layout="col", impl="xla")
    as_row = jit_call(per_channel_cast, (data_in, sf_in.T.copy()), num_per_channels=32, impl="xla")  # the same scales, row-major
    for a, b in zip(by_name, as_row):
        assert_bytes_equal(a, b)


def test_reference_fused_gather(rng):
    t, h = 200, 128
    x = _input(rng, t, h)
    pos = rng.integers(-1, t, size=272).astype(np.int32)
    pos[:3] = -1
    data, sf = jit_call(per_channel_cast_fused, x, pos_to_token=pos, impl="xla")
    gathered = np.where(pos[:, None] >= 0, x.astype(np.float32)[np.maximum(pos, 0)], 0).astype(np.float32)
    expected_data, expected_sf = _numpy_cast(gathered, 128, False)
    assert sf.shape == (3, h)  # ceil(272 / 128): the last block has 16 rows
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)
    assert not np.asarray(data, np.float32)[:3].any()


def test_reference_fused_cast_back(rng):
    t, h = 256, 256
    data_in, sf_in = _quant_tensor(rng, t, h, 128, "row")
    pos = rng.integers(-1, t, size=48).astype(np.int32)
    data, sf = jit_call(per_channel_cast_fused, (data_in, sf_in), round_sf=True, pos_to_token=pos, impl="xla")
    decoded = data_in.astype(np.float32) * np.repeat(sf_in, 128, axis=1)
    gathered = np.where(pos[:, None] >= 0, decoded[np.maximum(pos, 0)], 0).astype(np.float32)
    expected_data, expected_sf = _numpy_cast(gathered, 128, True)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)
    plain = jit_call(per_channel_cast_fused, (data_in, sf_in), num_per_channels=128, impl="xla")
    assert_bytes_equal(plain[0], jit_call(per_channel_cast, (data_in, sf_in), num_per_channels=128, impl="xla")[0])


@pytest.mark.parametrize("npt,round_sf", [(32, False), (128, True)])
def test_reference_transposed(rng, npt, round_sf):
    x = _input(rng, 256, 192)
    data_t, sf_t = jit_call(per_channel_cast_and_transpose, x, num_per_tokens=npt, round_sf=round_sf, impl="xla")
    data, sf = jit_call(per_channel_cast, x, num_per_tokens=npt, round_sf=round_sf, impl="xla")
    assert data_t.shape == (192, 256)
    assert_bytes_equal(data_t, np.asarray(data).T)
    assert_bytes_equal(sf_t, sf)


def test_reference_fused_gather_out_of_range_positions_give_zero_rows(rng):
    """Any position outside [0, T) gathers a zero row, like -1 (TileKernels reads nothing there)."""
    t, h = 200, 128
    x = _input(rng, t, h)
    pos = rng.integers(0, t, size=64).astype(np.int32)
    pos[::4] = [t, t + 1, 2**31 - 1, -1, -2, -(2**31), 10**6, t + 127, -100, t, 5 * t, -7, 2**30, t + 2, -3, 300]
    data, sf = jit_call(per_channel_cast_fused, x, pos_to_token=pos, impl="xla")
    inside = (pos >= 0) & (pos < t)
    gathered = np.where(inside[:, None], x.astype(np.float32)[np.clip(pos, 0, t - 1)], 0).astype(np.float32)
    expected_data, expected_sf = _numpy_cast(gathered, 128, False)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)
    assert not np.asarray(data, np.float32)[~inside].any()


def test_zero_tokens():
    x = np.zeros((0, 128), BF16)
    for data, sf in [
        jit_call(per_channel_cast, x, impl="xla"),
        jit_call(per_channel_cast, x, round_sf=True, use_packed_ue8m0=True, impl="xla"),
        jit_call(per_channel_cast_fused, x, pos_to_token=np.zeros(0, np.int32), impl="xla"),
    ]:
        assert data.shape == (0, 128) and sf.shape == (0, 128)
    data, sf = jit_call(per_channel_cast_and_transpose, x, impl="xla")
    assert data.shape == (128, 0) and sf.shape == (0, 128)
    data, sf = jit_call(per_channel_cast_fused, x, pos_to_token=np.full(16, -1, np.int32), impl="xla")  # nothing to gather from
    assert not np.asarray(data, np.float32).any()
    np.testing.assert_array_equal(np.asarray(sf), np.full((1, 128), np.float32(1e-4) / np.float32(448)))


# ---------------------------------------------------------------------------------------------
# Rules.

S = jax.ShapeDtypeStruct
_BF = S((256, 256), jnp.bfloat16)
_Q = S((256, 256), jnp.float8_e4m3fn)


@pytest.mark.parametrize(
    "fn,args,message",
    [
        (lambda x: per_channel_cast(x, fmt="e2m1"), (_BF,), "fmt must be 'e4m3'"),
        (lambda x: per_channel_cast(x, num_per_tokens=64), (_BF,), r"num_per_tokens must be one of \(32, 128\)"),
        (lambda x: per_channel_cast(x), (S((256, 96), jnp.bfloat16),), r"hidden \(96\) must be a positive multiple of 64"),
        (lambda x: per_channel_cast(x), (S((192, 256), jnp.bfloat16),), r"num_tokens \(192\) must be a multiple of 128"),
        (lambda x: per_channel_cast(x), (S((256, 256), jnp.float32),), "x must be bfloat16 or a QuantTensor"),
        (lambda x: per_channel_cast(x), (S((2, 128, 256), jnp.bfloat16),), r"x must be \[num_tokens, hidden\]"),
        (lambda x: per_channel_cast(x, use_packed_ue8m0=True), (_BF,), "use_packed_ue8m0 needs round_sf=True"),
        (lambda x: per_channel_cast(x, num_per_channels=128), (_BF,), "num_per_channels is for a QuantTensor x only"),
        (lambda x, s: per_channel_cast((x, s)), (_Q, S((256, 2), jnp.float32)), "needs num_per_channels in"),
        (lambda x, s: per_channel_cast((x, s), num_per_channels=128), (S((256, 256), jnp.bfloat16), S((256, 2), jnp.float32)), "QuantTensor data must be float8_e4m3fn"),
        (lambda x, s: per_channel_cast((x, s), num_per_channels=128), (S((256, 192), jnp.float8_e4m3fn), S((256, 2), jnp.float32)), r"hidden \(192\) must be a multiple of num_per_channels=128"),
        (lambda x, s: per_channel_cast((x, s), num_per_channels=128), (_Q, S((256, 4), jnp.float32)), r"sf must be per-token scales with blocks of \(1, 128\)"),
        (lambda x, s: per_channel_cast((x, s), num_per_channels=32, x_sf_layout="col"), (_Q, S((256, 8), jnp.float32)), r"col: float32 \(8, 256\)"),
        (lambda x, s: per_channel_cast((x, s), num_per_channels=32, x_sf_layout="tma"), (_Q, S((256, 8), jnp.float32)), "x_sf_layout must be one of"),
        (lambda x: per_channel_cast_fused(x), (S((200, 256), jnp.bfloat16),), r"num_tokens \(200\) must be a multiple of 128"),
        (lambda x, p: per_channel_cast_fused(x, pos_to_token=p), (_BF, S((40,), jnp.int32)), r"length \(40\) must be a multiple of 16"),
        (lambda x, p: per_channel_cast_fused(x, pos_to_token=p), (_BF, S((32,), jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32)), "pos_to_token must be int32"),
        (lambda x, s: per_channel_cast_fused((x, s), num_per_channels=32), (_Q, S((256, 8), jnp.float32)), "needs num_per_channels=128"),
        (lambda x, s: per_channel_cast_fused((x, s)), (_Q, S((2, 256), jnp.float32)), r"row: float32 \(256, 2\)"),
        (lambda x, s: per_channel_cast_fused((x, s)), (S((256, 192), jnp.float8_e4m3fn), S((256, 2), jnp.float32)), r"hidden \(192\) to be a multiple of 128"),
        (lambda x: per_channel_cast_and_transpose(x, num_per_tokens=16), (_BF,), "num_per_tokens must be one of"),
        (lambda x: per_channel_cast_and_transpose(x), (S((64, 256), jnp.bfloat16),), r"num_tokens \(64\) must be a multiple of 128"),
        (lambda x, s: per_channel_cast_and_transpose((x, s)), (_Q, S((256, 2), jnp.float32)), "no QuantTensor input"),
        (lambda x: per_channel_cast(x, impl="cuda"), (_BF,), "impl must be one of"),
    ],
)
def test_bad_inputs_raise_at_trace_time(fn, args, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(fn, *args)


_X = jnp.zeros((128, 128), jnp.bfloat16)
_QT = (jnp.zeros((128, 128), jnp.float8_e4m3fn), jnp.ones((128, 1), jnp.float32))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: per_channel_cast(_X, num_per_tokens=128.0), TypeError, "per_channel_cast: num_per_tokens must be an integer, got 128.0"),
        (lambda: per_channel_cast(_X, num_per_tokens="128"), TypeError, "per_channel_cast: num_per_tokens must be an integer"),
        (lambda: per_channel_cast(_X, fmt=None), ValueError, "per_channel_cast: fmt must be 'e4m3'"),
        (lambda: per_channel_cast(_X, round_sf="yes"), TypeError, "per_channel_cast: round_sf must be True or False"),
        (lambda: per_channel_cast(_X, round_sf=True, use_packed_ue8m0=1), TypeError, "per_channel_cast: use_packed_ue8m0 must be True or False"),
        (lambda: per_channel_cast(None), TypeError, "per_channel_cast: x must be an array, got NoneType"),
        (lambda: per_channel_cast(object()), TypeError, "per_channel_cast: x must be an array, got object"),
        (lambda: per_channel_cast((_QT[0], "sf"), num_per_channels=128), TypeError, "per_channel_cast: x's sf must be an array, got str"),
        (lambda: per_channel_cast(_QT, num_per_channels=128.0), TypeError, "per_channel_cast: num_per_channels must be an integer"),
        (lambda: per_channel_cast(_QT, num_per_channels=128, x_sf_layout=["row"]), ValueError, "per_channel_cast: x_sf_layout must be one of"),
        (lambda: per_channel_cast(_X, impl="cuda"), ValueError, "per_channel_cast: impl must be one of"),
        (lambda: per_channel_cast_fused(_X, pos_to_token=[0] * 16), TypeError, "per_channel_cast_fused: pos_to_token must be an array, got list"),
        (lambda: per_channel_cast_fused(_QT, num_per_channels=128.0), TypeError, "per_channel_cast_fused: num_per_channels must be an integer"),
        (lambda: per_channel_cast_fused(_X, round_sf=None), TypeError, "per_channel_cast_fused: round_sf must be True or False"),
        (lambda: per_channel_cast_fused(_X, impl=0), ValueError, "per_channel_cast_fused: impl must be one of"),
        (lambda: per_channel_cast_and_transpose(_X.tolist()), ValueError, "per_channel_cast_and_transpose: a QuantTensor x must be a pair"),
        (lambda: per_channel_cast_and_transpose(_X, num_per_tokens=(128,)), TypeError, "per_channel_cast_and_transpose: num_per_tokens must be an integer"),
        (lambda: per_channel_cast_and_transpose(_X, round_sf=[]), TypeError, "per_channel_cast_and_transpose: round_sf must be True or False"),
    ],
)  # fmt: skip
def test_misuse_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "fn,args,message",
    [
        (lambda x: per_channel_cast(x), (S((128, 2**31), jnp.bfloat16),), "per_channel_cast: x has 2147483648 elements along axis 1"),
        (lambda x, p: per_channel_cast_fused(x, pos_to_token=p), (_BF, S((2**31,), jnp.int32)), "per_channel_cast_fused: pos_to_token has 2147483648 elements along axis 0"),
        (lambda x: per_channel_cast_and_transpose(x), (S((2**31, 64), jnp.bfloat16),), "per_channel_cast_and_transpose: x has 2147483648 elements along axis 0"),
    ],
)  # fmt: skip
def test_extents_beyond_the_kernel_are_rejected_at_trace_time(fn, args, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(fn, *args)


def test_abstract_eval_is_exact():
    out = jax.eval_shape(lambda x: per_channel_cast(x, num_per_tokens=32, round_sf=True, use_packed_ue8m0=True), S((640, 7168), jnp.bfloat16))
    assert (out[0].shape, out[0].dtype, out[1].shape, out[1].dtype) == ((640, 7168), jnp.float8_e4m3fn, (5, 7168), jnp.int32)
    out = jax.eval_shape(lambda x, p: per_channel_cast_fused(x, pos_to_token=p), S((100, 576), jnp.bfloat16), S((144,), jnp.int32))
    assert (out[0].shape, out[1].shape, out[1].dtype) == ((144, 576), (2, 576), jnp.float32)
    out = jax.eval_shape(lambda x: per_channel_cast_and_transpose(x, num_per_tokens=32), S((256, 576), jnp.bfloat16))
    assert (out[0].shape, out[0].dtype, out[1].shape) == ((576, 256), jnp.float8_e4m3fn, (8, 576))


def test_impl_tilelang_refuses_to_run_off_gpu():
    with pytest.raises(ValueError, match="impl='tilelang' needs an NVIDIA Hopper or Blackwell GPU"):
        jax.jit(lambda x: per_channel_cast(x, impl="tilelang"))(jnp.zeros((128, 128), jnp.bfloat16))


# ---------------------------------------------------------------------------------------------
# The op contract over the named calls (not row-wise: a scale spans npt tokens).


class TestPerChannelCast(OpContract):
    fn = per_channel_cast
    bad_inputs = [((S((192, 256), jnp.bfloat16),), {}, ValueError, r"num_tokens \(192\) must be a multiple of 128")]


class TestPerChannelCastFused(OpContract):
    fn = per_channel_cast_fused


class TestPerChannelCastAndTranspose(OpContract):
    fn = per_channel_cast_and_transpose


# ---------------------------------------------------------------------------------------------
# GPU configurations, the named calls: each is cross-lowered on CPU (compiling its cubin) and run on
# the GPU. per_channel_cast with bf16 input: (T, H, npt, round_sf, use_packed_ue8m0), H picks the tile
# width (256 | H: 256; else 128 | H: 128; else 64), T = 0 and the smallest T = 128 included; with a
# QuantTensor input: (T, H, npt, npc, input sf layout, round_sf, use_packed_ue8m0); fused: (T_in, H,
# T_out (None: no gather), cast-back input, round_sf); transposed: (T, H, npt, round_sf).


def _gpu(fn, quant=None) -> list:
    return [c for c in fn.cases if c.name.startswith(("small_", "gpu_")) and not c.config and quant in (None, isinstance(c.args[0], tuple))]


def _cast_params(case) -> tuple:
    (x,), kw = case.args, case.kwargs
    return (*x.shape, kw["num_per_tokens"], kw["round_sf"], kw["use_packed_ue8m0"])


def _quant_params(case) -> tuple:
    ((data, _),), kw = case.args, case.kwargs
    return (*data.shape, kw["num_per_tokens"], kw["num_per_channels"], kw["x_sf_layout"], kw["round_sf"], kw["use_packed_ue8m0"])


def _fused_params(case) -> tuple:
    x, _, _, round_sf, _, *pos = case.args
    quant = isinstance(x, tuple)
    return (*(x[0] if quant else x).shape, pos[0].shape[0] if pos else None, quant, round_sf)


def _transpose_params(case) -> tuple:
    (x,), kw = case.args, case.kwargs
    return (*x.shape, kw["num_per_tokens"], kw["round_sf"])


CAST, QUANT = _gpu(per_channel_cast, quant=False), _gpu(per_channel_cast, quant=True)
FUSED, TRANSPOSE = _gpu(per_channel_cast_fused), _gpu(per_channel_cast_and_transpose)
ids = lambda c: c.name  # noqa: E731


def _tile_h(h, transpose=False):
    return 64 if transpose else 256 if h % 256 == 0 else 128 if h % 128 == 0 else 64


def _positions(rng, t_in, t_out):
    pos = rng.integers(-1, max(t_in, 1), size=t_out).astype(np.int32) if t_in else np.full(t_out, -1, np.int32)
    pos[: min(t_out, 5)] = -1
    return pos


def _check_launch(fn, args, *, t_out, h, tile_h, num_buffers):
    (call,) = tilek_calls(lower_for_cuda(fn, *args))
    assert call["name"] == "per_channel_cast" and call["has_cubin"]
    record = decode_record(call["launch"])
    assert record["num_buffers"] == num_buffers
    if t_out == 0:  # no work: no launch, every output is zero-filled
        assert record["kernels"] == [] and call["entries"] == ""
        return
    (k,) = record["kernels"]
    assert k["grid"] == [-(-t_out // 128), h // tile_h, 1] and k["block"] == [256, 1, 1]
    return k


@pytest.mark.parametrize("case", CAST, ids=ids)
def test_lowering_cast(case):
    t, h, npt, round_sf, packed = _cast_params(case)
    fn = lambda x: per_channel_cast(x, num_per_tokens=npt, round_sf=round_sf, use_packed_ue8m0=packed, impl="tilelang")
    k = _check_launch(fn, (S((t, h), jnp.bfloat16),), t_out=t, h=h, tile_h=_tile_h(h), num_buffers=3)
    if k:
        assert k["args"][:3] == [(0, 1, 0), (0, 2, 0), (0, 0, 0)]  # out, sf, x
        assert [a[2] for a in k["args"][3:]] == [t, -(-t // npt // 4) if packed else t // npt, t, h // 2]  # P, S0, Tn, XW


@pytest.mark.parametrize("case", QUANT, ids=ids)
def test_lowering_quant_tensor(case):
    t, h, npt, npc, layout, round_sf, packed = _quant_params(case)
    shape, dtype = F.sf_storage_shape(layout, (t, h // npc))
    fn = lambda x, s: per_channel_cast((x, s), num_per_tokens=npt, num_per_channels=npc, round_sf=round_sf, use_packed_ue8m0=packed, impl="tilelang")
    _check_launch(fn, (S((t, h), jnp.float8_e4m3fn), S(shape, dtype)), t_out=t, h=h, tile_h=_tile_h(h), num_buffers=4)


@pytest.mark.parametrize("case", FUSED, ids=ids)
def test_lowering_fused(case):
    t_in, h, t_out, quant, round_sf = _fused_params(case)
    args = [S((t_in, h), jnp.float8_e4m3fn if quant else jnp.bfloat16)] + ([S((t_in, h // 128), jnp.float32)] if quant else [])
    if t_out is not None:
        args.append(S((t_out,), jnp.int32))

    def fn(*a):
        x = (a[0], a[1]) if quant else a[0]
        return per_channel_cast_fused(x, round_sf=round_sf, pos_to_token=a[-1] if t_out is not None else None, impl="tilelang")

    _check_launch(fn, args, t_out=t_in if t_out is None else t_out, h=h, tile_h=_tile_h(h), num_buffers=len(args) + 2)


@pytest.mark.parametrize("case", TRANSPOSE, ids=ids)
def test_lowering_transpose(case):
    t, h, npt, round_sf = _transpose_params(case)
    fn = lambda x: per_channel_cast_and_transpose(x, num_per_tokens=npt, round_sf=round_sf, impl="tilelang")
    tile_h = _tile_h(h, transpose=True)
    k = _check_launch(fn, (S((t, h), jnp.bfloat16),), t_out=t, h=h, tile_h=tile_h, num_buffers=3)
    if k:
        assert k["smem"] >= 128 * tile_h  # the byte tile for the transposed store
        assert [a[2] for a in k["args"][3:]] == [t // npt, t, h // 2]  # S0, Tn, XW


# More channel tiles than grid y's 65,535: one flat grid. (T, H, transposed, channel tiles)
WIDE = [
    (128, 65537 * 64, False, 65537),
    (256, 65536 * 64, True, 65536),
    (0, 65537 * 64, False, 65537),
]


@pytest.mark.parametrize("t,h,transposed,tiles", WIDE)
def test_lowering_wide_rows_take_a_flat_grid(t, h, transposed, tiles):
    fn = per_channel_cast_and_transpose if transposed else per_channel_cast
    (call,) = tilek_calls(lower_for_cuda(lambda x: fn(x, impl="tilelang"), S((t, h), jnp.bfloat16)))
    kernels = decode_record(call["launch"])["kernels"]
    if t == 0:
        assert kernels == []
        return
    (k,) = kernels
    assert k["grid"] == [t // 128 * tiles, 1, 1]
    assert all(a[1] == 8 for a in k["args"] if a[0] == 2)  # every extent is a 64-bit scalar


@pytest.mark.parametrize("t,h,wide", [(16384, 7168, False), (65536, 7168, False), (2**20, 2**11, True)])
def test_extents_are_32_bit_unless_the_shape_needs_64(t, h, wide):
    """Ordinary shapes keep the 32-bit index arithmetic (the fast code); 64-bit extents only for
    shapes where an index could pass 2^31."""
    (call,) = tilek_calls(lower_for_cuda(lambda x: per_channel_cast(x, impl="tilelang"), S((t, h), jnp.bfloat16)))
    (k,) = decode_record(call["launch"])["kernels"]
    assert {a[1] for a in k["args"] if a[0] == 2} == {8 if wide else 4}


def test_gather_bounds_checks_positions_in_the_kernel():
    """The gathering kernel checks each position against T itself: with TileLang's implicit guards on
    loads turned off, every load of x or x_sf still sits behind a ``src < Tn`` check."""
    from jax_tilek import compiler

    for sf_in, wide in ((None, False), ("row", False), ("row", True)):
        func = per_channel_cast_kernel.factory(tile_h=128, npt=128, sf_in=sf_in, npc=128, gather=True, min_blocks=2, wide=wide)
        configs = dict(per_channel_cast_kernel.pass_configs, **{"tl.disable_safe_memory_legalize": True})
        source = compiler.lower_prim_func(func, "sm_90a", pass_configs=configs, name="gather").source
        body = source[source.index('extern "C" __global__ void __launch_bounds__') :]
        guard = re.search(r"\((?:\(\(int64_t\))?src\[(\w+)\]\)? < Tn\)", body)
        assert guard, "no bounds check of the gathered positions against Tn"
        first_load = min(i for i in (body.find("(x + "), body.find("x_sf[")) if i >= 0)
        assert guard.start() < first_load


def test_reference_and_kernel_agree_on_out_of_range_positions_when_lowered():
    pos = S((48,), jnp.int32)
    (call,) = tilek_calls(lower_for_cuda(lambda x, p: per_channel_cast_fused(x, pos_to_token=p, impl="tilelang"), S((7, 256), jnp.bfloat16), pos))
    assert call["has_cubin"]


# Non-default tilings (benchmarked as variants), and the flat grid (``fold``) forced on the usual shapes.
TILINGS = [c for fn in (per_channel_cast, per_channel_cast_and_transpose) for c in fn.cases if c.name.startswith("tuned_")]
FOLDED = [c for fn in (per_channel_cast, per_channel_cast_fused, per_channel_cast_and_transpose) for c in fn.cases
          if c.config.get("fold") and c.name.startswith("gpu_")]  # fmt: skip


def _function(case):
    return next(fn for fn in (per_channel_cast, per_channel_cast_fused, per_channel_cast_and_transpose) if case in fn.cases)


def _kind(case) -> str:
    """What a named call casts: bf16, e4m3 (a QuantTensor), transpose, or gather (the fused call)."""
    fn = _function(case)
    if fn is not per_channel_cast:
        return "gather" if fn is per_channel_cast_fused else "transpose"
    return "e4m3" if isinstance(case.args[0], tuple) else "bf16"


def _tiled_inputs(rng, case):
    """The inputs of a tiled or folded call: its shapes, its kind's values (positions of a gather)."""
    kind = _kind(case)
    if kind == "gather":
        x, pos = case.args[0], case.args[-1]
        return [_input(rng, *x.shape), _positions(rng, x.shape[0], pos.shape[0])]
    t, h = (case.args[0][0] if kind == "e4m3" else case.args[0]).shape
    return list(_quant_tensor(rng, t, h, 128, "row")) if kind == "e4m3" else [_input(rng, t, h)]


def _program(case):
    """The call of a named case with its arrays as arguments (a QuantTensor as two)."""
    call = case.call(_function(case), "tilelang")
    if _kind(case) == "e4m3":
        return lambda d, s: call((d, s))
    if _kind(case) == "gather":
        return lambda x, p: call(x, *case.args[1:-1], p)
    return call


def _structs(case) -> list:
    return jax.tree.leaves([a for a in case.args if not isinstance(a, (str, int, bool, type(None)))])


@pytest.mark.parametrize("case", TILINGS, ids=ids)
def test_lowering_tilings(case):
    args = _structs(case)
    t, h = args[0].shape
    _check_launch(_program(case), args, t_out=t, h=h, tile_h=case.config["tile_h"], num_buffers=len(args) + 2)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case", CAST, ids=ids)
def test_kernel_cast(on_gpu, rng, case):
    t, h, npt, round_sf, packed = _cast_params(case)
    x = _input(rng, t, h)
    data, sf = on_gpu(lambda x: per_channel_cast(x, num_per_tokens=npt, round_sf=round_sf, use_packed_ue8m0=packed, impl="tilelang"), x)
    expected_data, expected_sf = _expected(x, npt, round_sf, packed)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)


@pytest.mark.gpu
@pytest.mark.parametrize("case", QUANT, ids=ids)
def test_kernel_quant_tensor(on_gpu, rng, case):
    t, h, npt, npc, layout, round_sf, packed = _quant_params(case)
    data_in, sf_in = _quant_tensor(rng, t, h, npc, layout)
    fn = lambda x, s: per_channel_cast((x, s), num_per_tokens=npt, num_per_channels=npc, round_sf=round_sf, use_packed_ue8m0=packed, impl="tilelang")
    data, sf = on_gpu(fn, data_in, sf_in)
    expected_data, expected_sf = _expected(data_in, npt, round_sf, packed, x_sf=sf_in, npc=npc, layout=layout)
    assert_bytes_equal(data, expected_data)
    assert_bytes_equal(sf, expected_sf)


@pytest.mark.gpu
@pytest.mark.parametrize("case", FUSED, ids=ids)
def test_kernel_fused(on_gpu, rng, case):
    t_in, h, t_out, quant, round_sf = _fused_params(case)
    if quant:
        data_in, sf_in = _quant_tensor(rng, t_in, h, 128, "row")
        args = [data_in, sf_in]
    else:
        data_in, sf_in = _input(rng, t_in, h), None
        args = [data_in]
    pos = None if t_out is None else _positions(rng, t_in, t_out)
    if pos is not None:
        args.append(pos)

    def fn(*a):
        x = (a[0], a[1]) if quant else a[0]
        return per_channel_cast_fused(x, round_sf=round_sf, pos_to_token=a[-1] if pos is not None else None, impl="tilelang")

    data, sf = on_gpu(fn, *args)
    expected = _expected(data_in, 128, round_sf, x_sf=sf_in, npc=128 if quant else None, layout="row" if quant else None, pos=pos)
    assert_bytes_equal(data, expected[0])
    assert_bytes_equal(sf, expected[1])


@pytest.mark.gpu
@pytest.mark.parametrize("case", TRANSPOSE, ids=ids)
def test_kernel_transpose(on_gpu, rng, case):
    t, h, npt, round_sf = _transpose_params(case)
    x = _input(rng, t, h)
    data, sf = on_gpu(lambda x: per_channel_cast_and_transpose(x, num_per_tokens=npt, round_sf=round_sf, impl="tilelang"), x)
    expected_data, expected_sf = _expected(x, npt, round_sf)  # the non-transposed cast ...
    assert_bytes_equal(data, np.ascontiguousarray(expected_data.T))  # ... transposed
    assert_bytes_equal(sf, expected_sf)


@pytest.mark.gpu
def test_kernel_rounding_is_unbiased(on_gpu, rng):
    x = (rng.standard_normal((4096, 4096), np.float32) * 3).astype(BF16)
    data, sf = on_gpu(lambda x: per_channel_cast(x, impl="tilelang"), x)
    exact = x.astype(np.float64) / np.repeat(np.asarray(sf, np.float64), 128, axis=0)
    check_bias(np.asarray(data, np.float32), exact)


@pytest.mark.gpu
@pytest.mark.parametrize("case", TILINGS, ids=ids)
def test_kernel_tilings(on_gpu, rng, case):
    args = _tiled_inputs(rng, case)
    data, sf = on_gpu(_program(case), *args)
    if _kind(case) == "e4m3":
        expected_data, expected_sf = _expected(args[0], 128, x_sf=args[1], npc=128, layout="row")
    else:
        expected_data, expected_sf = _expected(args[0], 128)
    assert_bytes_equal(data, expected_data.T if _kind(case) == "transpose" else expected_data)
    assert_bytes_equal(sf, expected_sf)


@pytest.mark.gpu
def test_kernel_fused_out_of_range_positions(on_gpu, rng):
    """Positions outside [0, T) (beyond T, below -1, up to +-2^31) give zero rows, bit for bit as the
    reference; both the bf16 and the cast-back input."""
    t, h = 200, 1152
    pos = rng.integers(0, t, size=272).astype(np.int32)
    pos[::3] = rng.choice(np.array([t, t + 1, t + 4096, 2**31 - 1, -2, -(2**31), -1], np.int32), size=pos[::3].size)
    x = _input(rng, t, h)
    data_in, sf_in = _quant_tensor(rng, t, h, 128, "row")

    def program(x, data_in, sf_in, pos):
        return (
            per_channel_cast_fused(x, pos_to_token=pos, impl="tilelang"),
            per_channel_cast_fused((data_in, sf_in), round_sf=True, pos_to_token=pos, impl="tilelang"),
        )

    (data, sf), (qdata, qsf) = on_gpu(program, x, data_in, sf_in, pos)
    expected = _expected(x, 128, pos=np.where((pos >= 0) & (pos < t), pos, -1))
    assert_bytes_equal(data, expected[0])
    assert_bytes_equal(sf, expected[1])
    expected = _expected(data_in, 128, True, x_sf=sf_in, npc=128, layout="row", pos=np.where((pos >= 0) & (pos < t), pos, -1))
    assert_bytes_equal(qdata, expected[0])
    assert_bytes_equal(qsf, expected[1])
    # and as the op's own reference says
    with jax.default_device(jax.devices("cpu")[0]):
        reference = per_channel_cast_fused(jnp.asarray(x), pos_to_token=jnp.asarray(pos), impl="xla")
    assert_bytes_equal(data, reference[0])


@pytest.mark.gpu
@pytest.mark.parametrize("case", FOLDED, ids=ids)
def test_kernel_flat_grid(on_gpu, rng, case):
    kind, args = _kind(case), _tiled_inputs(rng, case)
    data, sf = on_gpu(_program(case), *args)
    if kind == "e4m3":
        expected_data, expected_sf = _expected(args[0], 128, x_sf=args[1], npc=128, layout="row")
    elif kind == "gather":
        expected_data, expected_sf = _expected(args[0], 128, pos=args[1])
    else:
        expected_data, expected_sf = _expected(args[0], 128)
    assert_bytes_equal(data, expected_data.T if kind == "transpose" else expected_data)
    assert_bytes_equal(sf, expected_sf)
