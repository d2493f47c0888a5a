"""quant.cast: the random-bit hash, stochastic rounding, the cast op (reference, rules, lowering, GPU).

The random bits and the rounding rules are checked against their definitions (the module docstring of
``jax_tilek.quant.cast``, written out here in numpy and exact rationals) on the public paths: the JAX
reference (``cast(..., impl="xla")``) and the CUDA helpers of ``jax_tilek.device`` (compiled for the host)."""

import re
import shutil
import subprocess
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek import device
from jax_tilek.quant import cast, cast_kernel
from jax_tilek.quant import formats as F
from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal, check_bias


BF16, E4M3 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
BF16_MAX = float(ml_dtypes.finfo(BF16).max)
M32 = (1 << 32) - 1
STOCHASTIC = [("float32", "bfloat16"), ("float32", "float8_e4m3fn"), ("bfloat16", "float8_e4m3fn")]
S = jax.ShapeDtypeStruct

# ---------------------------------------------------------------------------------------------
# The contract, over cast's named cases.


class TestCast(OpContract):
    """Rounding to nearest: elementwise, so row-wise (vmap folds into x's first axis, which shards)."""

    fn = cast
    cases = [c for c in cast.cases if not c.kwargs["stochastic_rounding"]]
    rows = True
    bad_inputs = [
        ((S((8,), jnp.int32),), dict(dtype="float32"), ValueError, "x's dtype must be one of"),
        ((S((8,), jnp.float32),), dict(dtype="int8"), ValueError, "dtype must be one of"),
    ]


class TestCastStochastic(OpContract):
    """Stochastic rounding hashes each quad's flat index: not row-wise (vmap maps a loop)."""

    fn = cast
    cases = [c for c in cast.cases if c.kwargs["stochastic_rounding"]]
    bad_inputs = [((S((6,), jnp.float32),), dict(dtype="bfloat16", stochastic_rounding=True), ValueError, r"x.size % 4 == 0")]


# ---------------------------------------------------------------------------------------------
# The hash and the rounding rules, from their definitions.


def _hash_py(w, index, seed):
    """The hash of the cast module's docstring, in Python integers."""
    h = ((index * 0x9E3779B1) ^ (seed * 0x2C1B3C6D)) & M32
    for k, (mul, shift) in enumerate(((0x85EBCA6B, 0), (0xC2B2AE35, 13), (0x27D4EB2F, 16), (0x165667B1, 15))):
        if shift:
            h ^= h >> shift
        h = ((h ^ w[k]) * mul) & M32
    h ^= h >> 16
    r0 = (h * 0x7FEB352D) & M32
    r0 ^= r0 >> 15
    r1 = (r0 * 0x846CA68B) & M32
    r1 ^= r1 >> 16
    return r0, r1


def _hash_np(w: np.ndarray, index: np.ndarray, seed) -> tuple[np.ndarray, np.ndarray]:
    """The same hash over arrays: ``w`` uint32 ``[n, 4]``, ``index`` and ``seed`` uint32 (broadcast)."""
    u = lambda a: np.asarray(a, np.uint64)  # noqa: E731
    mul = lambda a, b: (a * np.uint64(b)) & np.uint64(M32)  # noqa: E731
    h = mul(u(index), 0x9E3779B1) ^ mul(u(seed), 0x2C1B3C6D)
    for k, (m, shift) in enumerate(((0x85EBCA6B, 0), (0xC2B2AE35, 13), (0x27D4EB2F, 16), (0x165667B1, 15))):
        if shift:
            h ^= h >> np.uint64(shift)
        h = mul(h ^ u(w[:, k]), m)
    h ^= h >> np.uint64(16)
    r0 = mul(h, 0x7FEB352D)
    r0 ^= r0 >> np.uint64(15)
    r1 = mul(r0, 0x846CA68B)
    r1 ^= r1 >> np.uint64(16)
    return r0.astype(np.uint32), r1.astype(np.uint32)


def _random_bits(v: np.ndarray, seed: int = 0) -> np.ndarray:
    """The 16 random bits of each element of a flat fp32 array (quad i: elements 4i..4i+3, index i)."""
    quads = np.ascontiguousarray(v, np.float32).view(np.uint32).reshape(-1, 4)
    r0, r1 = _hash_np(quads, np.arange(len(quads), dtype=np.uint32), seed)
    return np.stack([r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16], axis=-1).reshape(-1)


def test_hash_matches_its_definition(rng):
    w = rng.integers(0, 2**32, size=(500, 4), dtype=np.uint64).astype(np.uint32)
    index = rng.integers(0, 2**32, size=500, dtype=np.uint64).astype(np.uint32)
    seed = rng.integers(0, 2**32, size=500, dtype=np.uint64).astype(np.uint32)
    r0, r1 = _hash_np(w, index, seed)
    expected = [_hash_py([int(v) for v in w[i]], int(index[i]), int(seed[i])) for i in range(500)]
    np.testing.assert_array_equal(np.stack([r0, r1], 1), np.array(expected, np.uint32))


def test_random_bits_are_uniform_and_seeded():
    v = np.zeros((1 << 18,), np.float32)  # identical values: only the quad index varies
    r = _random_bits(v)
    assert r.max() < 1 << 16
    counts = np.bincount(r >> 12, minlength=16)  # 16 bins of 2^18 / 16 samples
    expected = r.size / 16
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected)), counts
    for bit in range(16):
        assert abs(((r >> bit) & 1).mean() - 0.5) < 0.01
    r7 = _random_bits(v, 7)
    assert (r7 == r).mean() < 0.01


def _neighbours(v: float, grid) -> tuple[float, float]:
    """The representable values just below and above |v| on a sorted grid of magnitudes."""
    a = abs(v)
    i = np.searchsorted(grid, a, side="right") - 1
    return float(grid[i]), float(grid[min(i + 1, len(grid) - 1)])


def _grid(dtype) -> np.ndarray:
    bits = np.arange(1 << (8 * np.dtype(dtype).itemsize), dtype=np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint8)
    with np.errstate(invalid="ignore"):
        values = bits.view(dtype).astype(np.float64)
    values = values[np.isfinite(values)]
    return np.unique(values[values >= 0])


GRIDS = {"bfloat16": _grid(BF16), "e4m3": _grid(E4M3), "e2m1": F.E2M1_VALUES.astype(np.float64)}


def _stochastically_rounded(v: np.ndarray, r: np.ndarray, target: str) -> np.ndarray:
    """The rule: round |x| up iff frac(|x| / spacing) truncated to 16 bits + r >= 2^16 (exact rationals)."""
    grid, out = GRIDS[target], []
    for x, ri in zip(v.tolist(), r.tolist()):
        lo, hi = _neighbours(x, grid)
        if lo == hi or Fraction(abs(x)) == Fraction(lo):
            expected = lo
        else:
            frac = (Fraction(abs(x)) - Fraction(lo)) / (Fraction(hi) - Fraction(lo))
            expected = hi if int(frac * 65536) + ri >= 65536 else lo
        out.append(np.copysign(expected, x))
    return np.array(out)


def _rounding_inputs(rng, target: str) -> np.ndarray:
    top = {"bfloat16": 1e30, "e4m3": 440.0, "e2m1": 5.9}[target]
    return np.concatenate([
        rng.standard_normal(600).astype(np.float32) * np.exp2(rng.integers(-12, 6, 600)).astype(np.float32),
        rng.uniform(-top, top, 600).astype(np.float32),
        (rng.standard_normal(300) * 2.0**-8).astype(np.float32),  # e4m3 subnormals
    ])  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_stochastic_rounding_rule(rng, dtype):
    """The reference's stochastic cast rounds by the rule, with the hash's bits (and the seed's)."""
    v = _rounding_inputs(rng, "bfloat16" if dtype == "bfloat16" else "e4m3")
    seed = int(rng.integers(0, 2**32))
    got = np.asarray(cast(v, dtype, True, seed=seed, impl="xla")).astype(np.float64)
    expected = _stochastically_rounded(v, _random_bits(v, seed), "bfloat16" if dtype == "bfloat16" else "e4m3")
    np.testing.assert_array_equal(got, expected)


def test_stochastic_rounding_saturates_and_keeps_nan():
    v = np.array([np.inf, -np.inf, 3.4e38, 500.0, -1e6, np.nan, 1.0, 1.0], np.float32)
    for seed in (0, 1, 2**32 - 1):
        e4m3 = np.asarray(cast(v, jnp.float8_e4m3fn, True, seed=seed, impl="xla"), np.float32)
        np.testing.assert_array_equal(e4m3[:5], [448, -448, 448, 448, -448])
        bf = np.asarray(cast(v, jnp.bfloat16, True, seed=seed, impl="xla"), np.float32)
        np.testing.assert_array_equal(bf[:3], [BF16_MAX, -BF16_MAX, BF16_MAX])
        assert np.isnan(bf[5]) and np.isnan(e4m3[5])


@pytest.mark.parametrize("src,dst", STOCHASTIC)
def test_stochastic_cast_is_unbiased(rng, src, dst):
    x = (rng.standard_normal((256, 1024), np.float32) * 50).astype(src)
    y = np.asarray(cast(x, dst, True)).astype(np.float64)
    exact = x.astype(np.float64)
    check_bias(y, exact)
    # A stronger test: a quarter of the way between two grid points rounds up a quarter of the time.
    lo = np.float32(1.0) if dst == "bfloat16" else np.float32(1.0)
    step = 2.0**-7 if dst == "bfloat16" else 2.0**-3
    x = np.full((1 << 18,), lo + step / 4, np.float32).astype(src)
    if np.float32(x[0]) != lo + step / 4:
        pytest.skip("the input dtype cannot hold the test value")
    up = (np.asarray(cast(x, dst, True)).astype(np.float32) > lo).mean()
    assert abs(up - 0.25) < 5 / np.sqrt(x.size), up


def test_stochastic_cast_seeds():
    x = jnp.full((4096,), 1.0 + 2.0**-9, jnp.float32)
    a, b, c = (np.asarray(cast(x, jnp.bfloat16, True, seed=s)).view(np.uint16) for s in (None, 0, 12345))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    traced = jax.jit(lambda x, s: cast(x, jnp.bfloat16, True, seed=s))(x, jnp.uint32(12345))
    np.testing.assert_array_equal(np.asarray(traced).view(np.uint16), c)


CAST_PAIRS = [
    ("float32", "bfloat16"), ("float32", "float8_e4m3fn"), ("bfloat16", "float8_e4m3fn"), ("float32", "float16"),
    ("float16", "float8_e4m3fn"), ("float8_e4m3fn", "bfloat16"), ("float8_e4m3fn", "float32"), ("bfloat16", "float32"),
]  # fmt: skip


def _inputs(rng, shape, dtype) -> np.ndarray:
    v = rng.standard_normal(shape, np.float32) * np.exp2(rng.integers(-10, 10, shape)).astype(np.float32)
    flat = v.reshape(-1)
    flat[: min(6, flat.size)] = np.array([500.0, -1e5, np.inf, -np.inf, 2.0**-8, 0.0], np.float32)[: min(6, flat.size)]
    if np.dtype(dtype) in (np.dtype(np.float16),):
        v = np.clip(v, -6e4, 6e4)
    if np.dtype(dtype) == np.dtype(E4M3):
        return np.clip(v, -448, 448).astype(E4M3)
    return v.astype(dtype)


def _expected(x: np.ndarray, dst: str) -> np.ndarray:
    """Round to nearest even through fp32 (numpy / ml_dtypes); float8 saturates at ±448."""
    v = x.astype(np.float32)
    if dst == "float8_e4m3fn":
        v = np.clip(v, -448, 448)
    with np.errstate(over="ignore"):
        return v.astype(np.dtype(jnp.dtype(dst)))


@pytest.mark.parametrize("src,dst", CAST_PAIRS)
def test_reference_matches_numpy(rng, src, dst):
    x = _inputs(rng, (5, 77), src)
    assert_bytes_equal(cast(x, dst, impl="xla"), _expected(x, dst))


def test_same_dtype_is_identity(rng):
    x = jnp.asarray(_inputs(rng, (3, 8), np.float32))
    assert cast(x, jnp.float32) is x


@pytest.mark.parametrize(
    "shape,src,dst,sr,message",
    [
        ((8,), np.int32, "float32", False, "x's dtype must be one of"),
        ((8,), np.float32, "int8", False, "dtype must be one of"),
        ((8,), np.float32, "float16", True, "stochastic_rounding supports"),
        ((8,), BF16, "bfloat16", True, "stochastic_rounding supports"),
        ((6,), np.float32, "bfloat16", True, r"x.size % 4 == 0"),
    ],
)
def test_bad_inputs_raise_at_trace_time(shape, src, dst, sr, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: cast(x, dst, sr), jax.ShapeDtypeStruct(shape, src))


def test_seed_needs_stochastic_rounding():
    with pytest.raises(ValueError, match="seed is only used"):
        cast(jnp.zeros(4), jnp.bfloat16, seed=3)


@pytest.mark.parametrize(
    "seed,error,message",
    [
        (2**40, ValueError, r"cast: seed must be a uint32 value, in \[0, 2\^32\), got 1099511627776"),
        (2**32, ValueError, "cast: seed must be a uint32 value"),
        (-1, ValueError, "cast: seed must be a uint32 value"),
        (1.5, ValueError, r"cast: seed must be an integer scalar, got float32\[\]"),
        (np.zeros(2, np.uint32), ValueError, r"cast: seed must be an integer scalar, got uint32\[2\]"),
        ("7", TypeError, "cast: seed must be an array, got str"),
        ([7], TypeError, "cast: seed must be an array, got list"),
    ],
)
def test_bad_seeds(seed, error, message):
    with pytest.raises(error, match=message):
        cast(jnp.ones(8), jnp.bfloat16, True, seed=seed)


def test_every_uint32_seed_is_accepted():
    x = jnp.full((64,), 1.0 + 2.0**-9, jnp.float32)
    top = cast(x, jnp.bfloat16, True, seed=2**32 - 1)
    assert_bytes_equal(top, cast(x, jnp.bfloat16, True, seed=np.uint32(2**32 - 1)))
    assert_bytes_equal(top, cast(x, jnp.bfloat16, True, seed=jnp.int32(-1)))  # an integer array: modulo 2^32


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: cast([1.0, 2.0], jnp.bfloat16), TypeError, "cast: x must be an array, got list"),
        (lambda: cast(None, jnp.bfloat16), TypeError, "cast: x must be an array, got NoneType"),
        (lambda: cast(jnp.ones(4), None), ValueError, "cast: dtype must be one of"),
        (lambda: cast(jnp.ones(4), object()), ValueError, "cast: dtype must be one of"),
        (lambda: cast(jnp.ones(4), jnp.bfloat16, "yes"), TypeError, "cast: stochastic_rounding must be True or False"),
        (lambda: cast(jnp.ones(4), jnp.bfloat16, impl="cuda"), ValueError, "cast: impl must be one of"),
    ],
)
def test_misuse_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# The CUDA helpers compute what the JAX reference computes (compiled for the host).


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_helpers_match_the_reference_on_the_host(rng, tmp_path):
    body = device.prelude(device.QUAD_HASH, device.RBITS, device.SR_BF16, device.SR_E4M3, device.E2M1_RN, device.E2M1_SR, device.E2M1_TO_FLOAT)
    source = (
        "#include <cstdio>\n#include <cstring>\n#include <cmath>\n#include <cfenv>\n#include <algorithm>\n"
        "#define __device__\n#define __forceinline__ inline\nusing std::min; using std::isnan;\n"
        "static unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }\n"
        "static float __uint_as_float(unsigned u) { float x; memcpy(&x, &u, 4); return x; }\n"
        "static unsigned __float2uint_rz(float x) { return (unsigned)x; }\n"
        "static float __uint2float_rn(unsigned u) { return (float)u; }\n"
        "static float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }\n"
        "static float __fadd_rn(float a, float b) { return a + b; }\n"
        "static float __fmaf_rd(float a, float b, float c) {\n"
        "  fesetround(FE_DOWNWARD); volatile float r = fmaf(a, b, c); fesetround(FE_TONEAREST); return r; }\n"
        + body
        + r"""
int main() {
  unsigned w[4], i, s, xb, r;
  while (scanf("%u %u %u %u %u %u %u %u", w, w + 1, w + 2, w + 3, &i, &s, &xb, &r) == 8) {
    float x = __uint_as_float(xb);
    unsigned long long h = tilek_quad_hash(w[0], w[1], w[2], w[3], i, s);
    printf("%u %u %u %u %u %u %u\n", (unsigned)h, (unsigned)(h >> 32), __float_as_uint(tilek_sr_bf16(x, r)),
           __float_as_uint(tilek_sr_e4m3(x, r)), tilek_e2m1_sr(x, r), tilek_e2m1_rn(x),
           __float_as_uint(tilek_e2m1_to_float(r & 15)));
  }
}
"""
    )
    (tmp_path / "h.cc").write_text(source)
    exe = str(tmp_path / "h")
    subprocess.run(["g++", "-O2", "-ffp-contract=off", "-frounding-math", "-o", exe, str(tmp_path / "h.cc")], check=True)
    n = 4000
    v = np.concatenate([
        rng.standard_normal(n).astype(np.float32) * np.exp2(rng.integers(-30, 20, n)).astype(np.float32),
        rng.uniform(-7, 7, n).astype(np.float32),
        (rng.standard_normal(n) * 2.0**-8).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, 448.0, 500.0, 3.4e38, 2**-6, 2**-9, 1e-45, 0.25, 0.75, 1.25,
                  1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.25], np.float32),
    ])  # fmt: skip
    m = v.size
    w = rng.integers(0, 2**32, size=(m, 4), dtype=np.uint64).astype(np.uint32)
    index, seed = (rng.integers(0, 2**32, size=m, dtype=np.uint64).astype(np.uint32) for _ in range(2))
    r = _random_bits(v, 12345)  # the bits cast(v, ..., seed=12345) rounds v with
    lines = "\n".join(
        " ".join(map(str, (*w[k].tolist(), int(index[k]), int(seed[k]), int(v.view(np.uint32)[k]), int(r[k])))) for k in range(m)
    )
    out = subprocess.run([exe], input=lines, capture_output=True, text=True, check=True).stdout
    got = np.array([[int(t) for t in line.split()] for line in out.splitlines()], np.uint64).astype(np.uint32)
    r0, r1 = _hash_np(w, index, seed)
    vj = jnp.asarray(v)
    np.testing.assert_array_equal(got[:, 0], r0)
    np.testing.assert_array_equal(got[:, 1], r1)
    bf = np.asarray(cast(v, jnp.bfloat16, True, seed=12345, impl="xla")).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(got[:, 2], bf)
    e4 = np.asarray(cast(v, jnp.float8_e4m3fn, True, seed=12345, impl="xla")).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(np.clip(got[:, 3].view(np.float32), -448, 448).view(np.uint32), e4)  # the GPU saturates when casting
    np.testing.assert_array_equal(np.asarray(F.decode_e2m1(jnp.asarray(got[:, 4], jnp.uint8))), _stochastically_rounded(v, r, "e2m1"))
    np.testing.assert_array_equal(got[:, 5], np.asarray(F.encode_e2m1(vj)))
    np.testing.assert_array_equal(got[:, 6].view(np.float32), np.asarray(F.decode_e2m1(jnp.asarray(r & 15, jnp.uint8))))


# ---------------------------------------------------------------------------------------------
# Lowering and the GPU kernel.

# The cases the GPU runs with its own inputs: every dtype pair at small and large sizes (not the
# thread mappings, "tuned_", nor the benchmarks' sizes, "bench_").
GPU_CASES = [c for c in cast.cases if not c.config and not c.name.startswith("bench_")]
TUNED_CASES = [c for c in cast.cases if c.name.startswith("tuned_")]


def _signature(case) -> tuple[tuple[int, ...], str, str, bool]:
    """(shape, source dtype, target dtype, stochastic) of a case."""
    (x,) = case.args
    return x.shape, np.dtype(x.dtype).name, case.kwargs["dtype"], case.kwargs["stochastic_rounding"]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_lowers_to_one_launch(case):
    shape, src, dst, sr = _signature(case)
    text = lower_for_cuda(lambda x: cast(x, dst, sr, impl="tilelang"), jax.ShapeDtypeStruct(shape, src))
    (call,) = tilek_calls(text)
    record = decode_record(call["launch"])
    n = int(np.prod(shape))
    if n == 0:
        assert record["kernels"] == [] and call["entries"] == ""
        return
    (k,) = record["kernels"]
    assert call["has_cubin"] and k["block"] == [256, 1, 1] and k["grid"] == [-(-n // 4096), 1, 1]
    assert k["args"][-1] == (2, 8, n)  # N, a 64-bit scalar


@pytest.mark.parametrize("case", TUNED_CASES, ids=lambda c: c.name)
def test_thread_mappings_lower(case):
    shape, src, _, _ = _signature(case)
    config = {"elems": 16, "threads": 256, **case.config}
    (call,) = tilek_calls(lower_for_cuda(case.call(cast, "tilelang"), jax.ShapeDtypeStruct(shape, src)))
    (k,) = decode_record(call["launch"])["kernels"]
    assert k["block"] == [config["threads"], 1, 1] and k["grid"] == [-(-int(np.prod(shape)) // (config["elems"] * config["threads"])), 1, 1]


# Near and beyond 2^31 elements (lowered only: no memory needed). Before the fix the last CTA's guard
# (bx + 1) * 4096 <= N was evaluated in 32 bits: for 2^31 - 4096 < N < 2^31 it wrapped negative and the
# unguarded path wrote up to 4,095 elements past the output (the stochastic path's up to 15).
NEAR = 2**31 - 1000


@pytest.mark.parametrize("src,dst,sr", [("float32", "bfloat16", False), ("bfloat16", "float8_e4m3fn", False), ("bfloat16", "float8_e4m3fn", True)])
def test_guards_are_64_bit_near_2_31(src, dst, sr):
    text = lower_for_cuda(lambda x: cast(x, dst, sr, impl="tilelang"), jax.ShapeDtypeStruct((NEAR,), src))
    (k,) = decode_record(tilek_calls(text)[0]["launch"])["kernels"]
    assert k["grid"] == [2**19, 1, 1] and k["args"][-1] == (2, 8, NEAR)  # N: 8 bytes
    source = cast_kernel.artifact(dict(in_dtype=src, out_dtype=dst, stochastic=sr), "sm_90a").source
    signature = re.search(r'extern "C" __global__ void __launch_bounds__[^{]*', source).group(0)
    assert "int64_t N)" in signature, signature
    # No guard computes a CTA's first or last element in 32 bits.
    assert not re.search(r"\(\(int\)blockIdx\.x\) \* 4096\)", source)
    chunk_end = r"\(\(int64_t\)blockIdx\.x\) \* \(int64_t\)4096\)"
    assert re.search(chunk_end + (r" \+ \(\(\(int64_t\)\(\(int\)threadIdx\.x\)\) \* \(int64_t\)16\)\) \+ \(int64_t\)16\) <= N" if sr else r" \+ \(int64_t\)4096\) <= N"), source)


@pytest.mark.parametrize("shape", [(2**31 + 16,), (2**16, 2**16), (4, 2**31 - 1)])
def test_more_than_2_31_elements_lower(shape):
    n = int(np.prod(shape))
    for sr in (False, True):
        text = lower_for_cuda(lambda x: cast(x, "float8_e4m3fn", sr, impl="tilelang"), jax.ShapeDtypeStruct(shape, jnp.bfloat16))
        (k,) = decode_record(tilek_calls(text)[0]["launch"])["kernels"]
        assert k["grid"] == [-(-n // 4096), 1, 1] and k["args"][-1] == (2, 8, n)


def test_sizes_beyond_the_grid_are_rejected_at_trace_time():
    x = jax.ShapeDtypeStruct((2**31 - 1, 2**14), jnp.bfloat16)  # 2^45 elements: 2^33 CTAs of 4096
    with pytest.raises(ValueError, match="cast: x has 35184372072448 elements, more than the kernel's grid covers"):
        jax.eval_shape(lambda x: cast(x, jnp.float32, impl="tilelang"), x)
    assert jax.eval_shape(lambda x: cast(x, jnp.float32), x).shape == x.shape  # impl=None: the reference
    assert jax.eval_shape(lambda x: cast(x, jnp.float32, impl="xla"), x).shape == x.shape


def _host_expected(x, dst, sr, seed=None):
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(cast(jnp.asarray(x), dst, sr, seed=seed, impl="xla"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_kernel_is_bit_exact(on_gpu, rng, case):
    shape, src, dst, sr = _signature(case)
    x = _inputs(rng, shape, src)
    y = on_gpu(lambda x: cast(x, dst, sr, impl="tilelang"), x)
    assert_bytes_equal(y, _host_expected(x, dst, sr))
    if sr and x.size >= 1 << 20:
        finite = np.isfinite(x.astype(np.float32)) & (np.abs(x.astype(np.float32)) < 400)
        check_bias(np.asarray(y).astype(np.float64)[finite], x.astype(np.float64)[finite])


@pytest.mark.gpu
def test_kernel_with_traced_seed(on_gpu, rng):
    x = _inputs(rng, (64, 1024), np.float32)
    y = on_gpu(lambda x, s: cast(x, jnp.float8_e4m3fn, True, seed=s, impl="tilelang"), x, np.uint32(2024))
    assert_bytes_equal(y, _host_expected(x, "float8_e4m3fn", True, seed=np.uint32(2024)))


@pytest.mark.gpu
@pytest.mark.parametrize("case", TUNED_CASES, ids=lambda c: c.name)
def test_kernel_tunings_are_bit_exact(on_gpu, rng, case):
    """The thread mappings the benchmarks try, on a partial last CTA."""
    shape, src, dst, sr = _signature(case)
    x = _inputs(rng, shape, src)
    y = on_gpu(case.call(cast, "tilelang"), x)
    assert_bytes_equal(y, _host_expected(x, dst, sr))


@pytest.mark.gpu
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
def test_kernel_near_2_31_writes_nothing_past_the_end(on_gpu, sr):
    """N = 2^31 - 1000 elements viewed at the start of buffers 4,096 elements longer (the output's tail
    zero-filled, the input's tail random): the output is the reference's, and its tail stays zero."""
    import jax_tilek

    n, pad = NEAR, 4096
    rows = (n + pad) // 8
    params = dict(in_dtype="bfloat16", out_dtype="float8_e4m3fn", stochastic=sr)
    seed = (jnp.full((1,), 7, jnp.uint32),) if sr else ()

    def program(key):
        x = (jax.random.normal(key, (rows, 8), jnp.float32) * 100).astype(jnp.bfloat16)  # 4 GB
        y = jax_tilek.tilelang_call(
            cast_kernel, x, *seed, out_shape=jax.ShapeDtypeStruct((rows, 8), jnp.float8_e4m3fn), params=params,
            views={"x": jax_tilek.View((n,)), "y": jax_tilek.View((n,)), **({"seed": jax_tilek.View((1,))} if sr else {})},
            zero_fill=(0,), impl="tilelang",
        )  # fmt: skip
        y = jax.lax.bitcast_convert_type(y.reshape(-1), jnp.uint8)
        expected = cast(x.reshape(-1)[:n], jnp.float8_e4m3fn, sr, seed=seed[0][0] if sr else None, impl="xla")
        differ = jnp.sum(y[:n] != jax.lax.bitcast_convert_type(expected, jnp.uint8), dtype=jnp.int32)
        return differ, y[n:]

    differ, tail = on_gpu(program, jax.random.key(2024))
    assert int(differ) == 0, f"{int(differ)} of {n} elements differ from the reference"
    assert not np.asarray(tail).any(), f"the kernel wrote {np.count_nonzero(np.asarray(tail))} bytes past its {n} elements"
