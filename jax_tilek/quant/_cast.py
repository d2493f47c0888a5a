"""Elementwise dtype cast with optional stochastic rounding (TileKernels v2.1 ``quant.cast``).

Also home of the stochastic-rounding definition shared with :mod:`jax_tilek.quant._per_token_cast`:
the random-bit hash, the rounding rules (JAX reference), and the prelude of CUDA helpers (from
:mod:`jax_tilek.device`) the kernels call.

Random bits (seedless, deterministic). Elements are taken in groups of four consecutive values (a
*quad*); quad ``i`` of a flat array (elements ``4i..4i+3``) gets two 32-bit words
``r0, r1 = quad_hash(w0, w1, w2, w3, i, seed)`` where ``w`` are the fp32 bit patterns of the four
values being rounded. ``quad_hash`` is a multiply-xorshift hash (our own constants, ``HASH``):

    h = (i * 0x9E3779B1) ^ (seed * 0x2C1B3C6D)
    h = (h ^ w0) * M0;  h = (h ^ (h >> s) ^ wk) * Mk   for k = 1, 2, 3
    h ^= h >> 16;  r0 = h * F0;  r0 ^= r0 >> 15;  r1 = r0 * F1;  r1 ^= r1 >> 16

Element ``j`` of the quad uses the 16 bits ``(r0, r0 >> 16, r1, r1 >> 16)[j] & 0xFFFF``. ``seed`` is an
optional uint32 (default 0: the same bits on every call); pass a fresh one (e.g. the step number, a
traced value is fine) for fresh randomness.

Stochastic rounding with 16 random bits ``r``: ``|x|`` in units of the target's spacing at ``x``
(``x_u``) is rounded down or up, up iff ``frac(x_u)`` truncated to 16 bits plus ``r`` reaches ``2^16``;
so ``P(up) = frac(x_u)`` to within ``2^-16``. Results saturate at the largest finite value (also
for infinities); NaN stays NaN. Targets: bfloat16, float8_e4m3fn (subnormals included), FP4 e2m1.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_tilek import checks, device
from jax_tilek.device import HASH_FINAL, HASH_INDEX, HASH_ROUNDS, HASH_SEED
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, View, check_impl, config_class, uses
from jax_tilek.spec import GRID_LIMITS
from jax_tilek.testing import ArgSpec

# ---------------------------------------------------------------------------------------------
# The hash: one table of constants (``device.HASH_*``), written out for JAX (``quad_hash``) and CUDA
# (``device.QUAD_HASH``).

_U32 = np.uint32


def quad_hash(w0, w1, w2, w3, index, seed) -> tuple[jax.Array, jax.Array]:
    """``(r0, r1)``: the two random words of each quad (uint32 arrays, broadcast together)."""
    u = lambda a: jnp.asarray(a).astype(jnp.uint32)  # noqa: E731
    h = (u(index) * _U32(HASH_INDEX)) ^ (u(seed) * _U32(HASH_SEED))
    for w, (mul, shift) in zip((w0, w1, w2, w3), HASH_ROUNDS):
        if shift:
            h = h ^ (h >> shift)
        h = (h ^ u(w)) * _U32(mul)
    h = h ^ (h >> 16)
    (m0, s0), (m1, s1) = HASH_FINAL
    r0 = h * _U32(m0)
    r0 = r0 ^ (r0 >> s0)
    r1 = r0 * _U32(m1)
    r1 = r1 ^ (r1 >> s1)
    return r0, r1


def random_bits(values: jax.Array, index, seed) -> jax.Array:
    """16 random bits (uint32) per element of ``values[..., 4n]`` (fp32).

    ``index`` gives the quad index of each quad (``[..., n]``, broadcast); ``seed`` a uint32 scalar.
    """
    words = _bits(values).reshape(*values.shape[:-1], values.shape[-1] // 4, 4)
    r0, r1 = quad_hash(words[..., 0], words[..., 1], words[..., 2], words[..., 3], index, seed)
    r = jnp.stack([r0 & _U32(0xFFFF), r0 >> 16, r1 & _U32(0xFFFF), r1 >> 16], axis=-1)
    return r.reshape(values.shape)


def flat_quad_index(shape: tuple[int, ...]) -> jax.Array:
    """Quad indices of a contiguous array of ``shape`` (last axis a multiple of 4): ``[..., n/4]``."""
    n = int(np.prod(shape))
    return jnp.arange(n // 4, dtype=jnp.uint32).reshape(*shape[:-1], shape[-1] // 4)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _from_bits(b: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(b.astype(jnp.uint32), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Stochastic rounding (the reference; the CUDA helpers below compute the same bits).

BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
E4M3_MIN_NORMAL = 2.0**-6


def sr_bfloat16(v: jax.Array, r: jax.Array) -> jax.Array:
    """fp32 -> bfloat16: ``(bits + r) & 0xFFFF0000``, saturated; NaN stays NaN."""
    v = v.astype(jnp.float32)
    y = _from_bits((_bits(v) + r) & _U32(0xFFFF0000))
    y = jnp.where(jnp.isnan(v), v, jnp.clip(y, -BF16_MAX, BF16_MAX))
    return y.astype(jnp.bfloat16)


def sr_e4m3_values(v: jax.Array, r: jax.Array) -> jax.Array:
    """fp32 -> fp32 values on the e4m3 grid (not yet saturated).

    Normal range: ``(bits + (r << 4)) & 0xFFF00000``. Below 2^-6 (spacing 2^-9):
    ``q = (floor(|x| 2^25) + r) >> 16`` and the value ``±q 2^-9``.
    """
    v = v.astype(jnp.float32)
    a = jnp.abs(v)
    normal = _from_bits((_bits(v) + (r << 4)) & _U32(0xFFF00000))
    q = (jnp.floor(a * np.float32(2.0**25)).astype(jnp.uint32) + r) >> 16
    small = jnp.copysign(q.astype(jnp.float32) * np.float32(2.0**-9), v)
    y = jnp.where(a < E4M3_MIN_NORMAL, small, normal)
    return jnp.where(jnp.isnan(v), v, y)


def sr_e4m3(v: jax.Array, r: jax.Array) -> jax.Array:
    """fp32 -> float8_e4m3fn with stochastic rounding, saturating at ±448."""
    return jnp.clip(sr_e4m3_values(v, r), -448.0, 448.0).astype(jnp.float8_e4m3fn)


def sr_e2m1_codes(v: jax.Array, r: jax.Array) -> jax.Array:
    """fp32 -> FP4 e2m1 codes (uint8): spacing 0.5 below 2, 1 in [2, 4), 2 above; saturates at 6
    (NaN too, as ``fmin``)."""
    v = v.astype(jnp.float32)
    a = jnp.fmin(jnp.abs(v), np.float32(6.0))
    scale = jnp.where(a < 2, np.float32(2.0), jnp.where(a < 4, np.float32(1.0), np.float32(0.5)))
    offset = jnp.where(a < 2, 0, jnp.where(a < 4, 2, 4)).astype(jnp.uint32)
    f = jnp.floor(a * scale * np.float32(65536.0)).astype(jnp.uint32)
    code = jnp.minimum(((f + r) >> 16) + offset, 7)
    return (code | (jnp.signbit(v).astype(jnp.uint32) << 3)).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------
# CUDA helpers shared by the cast kernels (injected with T.Kernel(..., prelude=PRELUDE)).

PRELUDE = device.prelude(
    device.QUAD_HASH, device.RBITS, device.SR_BF16, device.SR_E4M3, device.E2M1_RN, device.E2M1_SR,
    device.E2M1_TO_FLOAT, device.E4M3_NOSAT, device.E4M3_TO_FLOAT,
)

@functools.cache
def tir_quad_hash():
    """A TileLang macro ``(values, k, quad0, seed) -> uint64``: the random words of quad ``k`` of a
    local fp32 array (``values[4k:4k+4]``), whose first quad has index ``quad0``."""
    import tilelang.language as T

    @T.macro
    def quad_hash(values, k, quad0, seed):
        return T.call_extern(
            "uint64", "tilek_quad_hash",
            T.reinterpret(values[4 * k], "uint32"), T.reinterpret(values[4 * k + 1], "uint32"),
            T.reinterpret(values[4 * k + 2], "uint32"), T.reinterpret(values[4 * k + 3], "uint32"),
            quad0 + T.cast(k, "uint32"), seed,
        )  # fmt: skip

    return quad_hash


# ---------------------------------------------------------------------------------------------
# The cast op.

DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
STOCHASTIC = (("float32", "bfloat16"), ("float32", "float8_e4m3fn"), ("bfloat16", "float8_e4m3fn"))


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def cast_kernel(in_dtype: str, out_dtype: str, stochastic: bool, elems: int = 16, threads: int = 256):
    """``y = cast(x)`` over a flat array; each thread converts ``elems`` elements.

    Every value goes through fp32 (exact for all input dtypes), then is rounded once: to nearest
    even (float8 saturating at ±448) or stochastically (``tilek_sr_*`` with ``tilek_quad_hash`` bits).

    Round to nearest: a CTA covers ``elems * threads`` consecutive elements as ``elems / vec``
    rounds of 16-byte input vectors (``vec`` elements), round ``i`` of thread ``t`` at vector
    ``i * threads + t``, so that every load and store instruction of a warp touches one contiguous
    span. Stochastic rounding: each thread converts ``elems`` consecutive elements (its quads).
    CTAs (threads) that reach past the end go element by element.

    Element indices and the guards against ``N`` are 64-bit (``N`` is an int64 symbol), so any array
    JAX can hold is covered and the last CTA's guard cannot wrap around.
    """
    import tilelang.language as T

    N = T.dynamic("N", "int64")
    vec = 16 // np.dtype(jnp.dtype(in_dtype)).itemsize  # elements per 16-byte input vector
    rounds = elems // vec
    chunk = elems * threads
    quad_hash = tir_quad_hash()
    assert rounds >= 1 and elems % vec == 0, (in_dtype, elems)

    @T.macro
    def convert(x, y, guarded):
        """Round to nearest, in rounds of 16-byte vectors."""
        bx = T.cast(T.get_block_binding(0), "int64")
        t = T.cast(T.get_thread_binding(0), "int64")
        xl = T.alloc_local((elems,), in_dtype)
        f = T.alloc_local((elems,), "float32")
        yl = T.alloc_local((elems,), out_dtype)
        for i in T.unroll(rounds):
            base = bx * chunk + (i * threads + t) * vec
            if guarded:
                for j in T.unroll(vec):
                    f[i * vec + j] = T.if_then_else(base + j < N, T.cast(x[T.min(base + j, N - 1)], "float32"), T.float32(0))
            else:
                for j in T.vectorized(vec):
                    xl[i * vec + j] = x[base + j]
        if not guarded:
            for j in T.vectorized(elems):
                f[j] = T.cast(xl[j], "float32")
        for j in T.vectorized(elems):
            yl[j] = T.cast(f[j], out_dtype)
        for i in T.unroll(rounds):
            base = bx * chunk + (i * threads + t) * vec
            if guarded:
                for j in T.unroll(vec):
                    if base + j < N:
                        y[base + j] = yl[i * vec + j]
            else:
                for j in T.vectorized(vec):
                    y[base + j] = yl[i * vec + j]

    @T.macro
    def convert_stochastic(x, y, seed_value):
        """Stochastic rounding, ``elems`` consecutive elements per thread."""
        bx = T.cast(T.get_block_binding(0), "int64")
        t = T.cast(T.get_thread_binding(0), "int64")
        base = bx * chunk + t * elems
        xl = T.alloc_local((elems,), in_dtype)
        f = T.alloc_local((elems,), "float32")
        yl = T.alloc_local((elems,), out_dtype)
        full = base + elems <= N
        if full:
            for j in T.vectorized(elems):
                xl[j] = x[base + j]
        else:
            for j in T.unroll(elems):
                xl[j] = T.if_then_else(base + j < N, x[T.min(base + j, N - 1)], T.cast(0, in_dtype))
        for j in T.vectorized(elems):
            f[j] = T.cast(xl[j], "float32")
        v = T.alloc_local((elems,), "float32")
        quad0 = T.cast(base // 4, "uint32")
        slow = T.alloc_var("uint32")
        slow = 0
        for k in T.unroll(elems // 4):
            h = quad_hash(f, k, quad0, seed_value)
            for j in T.unroll(4):
                r = T.call_extern("uint32", "tilek_rbits", h, j)
                if out_dtype == "bfloat16":
                    v[4 * k + j] = T.call_extern("float32", "tilek_sr_bf16", f[4 * k + j], r)
                else:
                    v[4 * k + j] = T.call_extern("float32", "tilek_sr_e4m3_fast", f[4 * k + j], r)
                    slow = slow | T.call_extern("uint32", "tilek_sr_e4m3_slow", f[4 * k + j])
        if slow != 0:  # e4m3 subnormals or NaN somewhere in this thread's chunk (rare)
            for k in T.unroll(elems // 4):
                h = quad_hash(f, k, quad0, seed_value)
                for j in T.unroll(4):
                    r = T.call_extern("uint32", "tilek_rbits", h, j)
                    v[4 * k + j] = T.call_extern("float32", "tilek_sr_e4m3", f[4 * k + j], r)
        for j in T.vectorized(elems):
            yl[j] = T.cast(v[j], out_dtype)
        if full:
            for j in T.vectorized(elems):
                y[base + j] = yl[j]
        else:
            for j in T.unroll(elems):
                if base + j < N:
                    y[base + j] = yl[j]

    if stochastic:

        @T.prim_func
        def cast_sr(x: T.Tensor((N,), in_dtype), seed: T.Tensor((1,), "uint32"), y: T.Tensor((N,), out_dtype)):
            with T.Kernel(T.ceildiv(N, chunk), threads=threads, prelude=PRELUDE):
                convert_stochastic(x, y, seed[0])

        return cast_sr

    @T.prim_func
    def cast(x: T.Tensor((N,), in_dtype), y: T.Tensor((N,), out_dtype)):
        with T.Kernel(T.ceildiv(N, chunk), threads=threads, prelude=PRELUDE):
            if (T.cast(T.get_block_binding(0), "int64") + 1) * chunk <= N:
                convert(x, y, False)
            else:
                convert(x, y, True)

    return cast


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise ValueError(f"cast: dtype must be one of {DTYPES}, got {dtype!r}") from None


def cast_reference(x: jax.Array, seed: jax.Array | None, *, dtype: str, stochastic_rounding: bool = False) -> jax.Array:
    """The cast in plain JAX: round to nearest even (float8 saturating at ±448), or stochastically
    (``seed``: uint32 ``[1]``)."""
    if stochastic_rounding:
        v = x.reshape(-1, 4).astype(jnp.float32)
        r = random_bits(v, flat_quad_index(v.shape), seed.reshape(()))
        y = sr_bfloat16(v, r) if dtype == "bfloat16" else sr_e4m3(v, r)
        return y.reshape(x.shape)
    if dtype == "float8_e4m3fn":
        return jnp.clip(x.astype(jnp.float32), -448.0, 448.0).astype(dtype)
    return x.astype(jnp.float32).astype(dtype)


def _check(x, seed, *, dtype: str, stochastic_rounding: bool = False) -> None:
    src = np.dtype(x.dtype).name
    if src not in DTYPES:
        raise ValueError(f"cast: x's dtype must be one of {DTYPES}, got {src}")
    if dtype not in DTYPES:
        raise ValueError(f"cast: dtype must be one of {DTYPES}, got {dtype}")
    if stochastic_rounding:
        if (src, dtype) not in STOCHASTIC:
            raise ValueError(f"cast: stochastic_rounding supports {STOCHASTIC} (x's dtype, dtype), got ({src}, {dtype})")
        if x.size % 4:
            raise ValueError(f"cast: stochastic_rounding needs x.size % 4 == 0 (groups of four), got {x.size}")


@dataclasses.dataclass(frozen=True)
class CastConfig:
    """The kernel's thread mapping: ``elems`` elements per thread (a multiple of four and of a
    16-byte input vector) and ``threads`` per CTA."""

    elems: int = 16
    threads: int = 256


@config_class(CastConfig)
def _config(x, seed, **static) -> CastConfig:
    """16 elements per thread, 256 threads: 4096 elements per CTA, for every size and dtype."""
    return CastConfig()


def _kernel_check(x, seed, **static) -> None:
    """One CTA per 4096 elements on grid x (the default configuration): up to 2^31 - 1 CTAs."""
    config = _config(x, seed, **static)
    chunk = config.elems * config.threads
    if -(-x.size // chunk) > GRID_LIMITS[0]:
        raise ValueError(f"cast: x has {x.size} elements, more than the kernel's grid covers ({GRID_LIMITS[0] * chunk})")


def _launch(x, seed, *, config: CastConfig, dtype: str, stochastic_rounding: bool = False) -> Launch:
    n = math.prod(x.shape)
    tuned = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if getattr(config, f.name) != f.default}
    return Launch(
        kernel=cast_kernel,
        params=dict(in_dtype=np.dtype(x.dtype).name, out_dtype=dtype, stochastic=stochastic_rounding, **tuned),
        views={"x": View((n,)), "y": View((n,))},
    )


def _rows(x, seed, *, dtype: str, stochastic_rounding: bool = False) -> Rows | None:
    """Rounding to nearest is elementwise, so row-wise along x's first axis; stochastic rounding hashes
    each quad's flat index, so a row's random bits depend on where it lies: not row-wise."""
    return None if stochastic_rounding else Rows(("x",), ("y",))


# The kernel takes the element count as a 64-bit value: no limit on x's extents but its grid's.
_cast_op = TileOp(
    name="cast", launch=_launch, operands=("x", "seed?"), results=("y",), reference=cast_reference, check=_check,
    config=_config, rows=_rows, kernel_check=_kernel_check, max_extent=None,
)  # fmt: skip


def _case(prefix: str, shape: tuple[int, ...], src, dst, stochastic: bool = False, **options) -> ArgSpec:
    name = f"{prefix}_{np.dtype(src).name}_{np.dtype(dst).name}{'_sr' if stochastic else ''}_{'x'.join(map(str, shape))}"
    return ArgSpec(name, (jax.ShapeDtypeStruct(shape, src),), dict(dtype=np.dtype(dst).name, stochastic_rounding=stochastic), **options)


F32, BF16, F16, E4M3 = jnp.float32, jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn

# Named calls: every dtype pair, rounding to nearest and stochastically, partial CTAs and zero tokens;
# the GPU tests' large sizes ("large_", traced only here); thread mappings ("tuned_"); the benchmarks'
# sizes and mappings ("bench_").
ARG_SPECS = (
    _case("small", (7, 13), F32, E4M3),
    _case("small", (1, 5), E4M3, BF16),
    _case("small", (333, 129), E4M3, F32),
    _case("small", (1000, 100), F32, F16),
    _case("small", (64, 96), F16, E4M3),
    _case("small", (3, 1000), BF16, F32),
    _case("small", (3, 4), F32, E4M3, True),
    _case("small", (0, 16), F32, BF16, True),
    _case("large", (4001, 7168), F32, BF16, bench=True),
    _case("large", (4096, 4096), BF16, E4M3, bench=True),
    _case("large", (4001, 7168), F32, BF16, True, bench=True),
    _case("large", (4001, 7168), F32, E4M3, True, bench=True),
    _case("large", (4096, 4096), BF16, E4M3, True, bench=True),
    *(_case(f"tuned_e{e}t{t}", (1001, 76), F32, BF16, config=dict(elems=e, threads=t)) for e, t in ((8, 256), (32, 256), (16, 512), (16, 128))),
    _case("tuned_e32t256", (1001, 76), BF16, E4M3, True, config=dict(elems=32)),
    _case("bench", (16384, 7168), F32, BF16, bench=True),
    _case("bench", (16384, 7168), F32, BF16, True, bench=True),
    _case("bench", (16384, 7168), BF16, E4M3, True, bench=True),
    *(_case(f"bench_e{e}t{t}", (16384, 7168), F32, BF16, config=dict(elems=e, threads=t), bench=True) for e, t in ((8, 256), (32, 256), (16, 512), (16, 128))),
)


def _seed(seed) -> jax.Array:
    """The seed as a uint32 ``[1]`` array: None is 0; a Python int must lie in [0, 2^32); an integer
    array (a traced one too) of one element is taken modulo 2^32."""
    if seed is None:
        return jnp.zeros((1,), jnp.uint32)
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not 0 <= seed < 2**32:
            raise ValueError(f"cast: seed must be a uint32 value, in [0, 2^32), got {seed}")
        return jnp.asarray(np.uint32(seed)).reshape(1)
    seed = checks.as_array("cast", "seed", seed)
    if seed.size != 1 or not jnp.issubdtype(seed.dtype, jnp.integer):
        raise ValueError(f"cast: seed must be an integer scalar, got {seed.dtype}{list(seed.shape)}")
    return seed.astype(jnp.uint32).reshape(1)


@uses(_cast_op, cases=ARG_SPECS)
def cast(x: jax.Array, dtype, stochastic_rounding: bool = False, *, seed=None, impl=None, ops) -> jax.Array:
    """Elementwise cast of ``x`` to ``dtype``, optionally with stochastic rounding.

    Args:
      x: any shape; float32, bfloat16, float16 or float8_e4m3fn.
      dtype: one of the same four.
      stochastic_rounding: round stochastically (fp32 -> bf16, fp32 -> e4m3, bf16 -> e4m3; x.size % 4
        == 0) with seedless hashed random bits (see the module docstring); results saturate at the
        largest finite value. Otherwise round to nearest even; float8_e4m3fn saturates at ±448.
      seed: optional uint32 mixed into the random bits: a Python int in [0, 2^32), or an integer
        scalar array (a traced value is fine; taken modulo 2^32); None is 0.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``x`` converted to ``dtype`` (same shape); ``x`` itself when the dtype does not change.
    """
    check_impl(impl, "cast")
    x = checks.as_array("cast", "x", x)
    dtype = _dtype_name(dtype)
    stochastic_rounding = checks.static_bool("cast", "stochastic_rounding", stochastic_rounding)
    if dtype == np.dtype(x.dtype).name and not stochastic_rounding:
        _check(x, None, dtype=dtype)
        return x
    if seed is not None and not stochastic_rounding:
        raise ValueError("cast: seed is only used with stochastic_rounding=True")
    (op,) = ops
    return op(x, _seed(seed) if stochastic_rounding else None, dtype=dtype, stochastic_rounding=stochastic_rounding, impl=impl)
