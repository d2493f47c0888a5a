"""SwiGLU for MoE experts: forward, backward and one differentiable op (TileKernels v1 §2.10, v2.1 §1.4/§2.3).

For ``x[T, 2H]`` (bf16 or fp32), ``l = x[:, :H]`` and ``r = x[:, H:]`` in fp32. With a clamp ``c``:
``l = min(l, c)``, ``r = clamp(r, -c, c)``. Then ``act = silu(l) · r · w`` with
``silu(l) = l / (1 + exp(-l))`` (TileKernels' formula, an IEEE division) and the per-row weight
``w = topk_weights[t] · routed_scaling_factor`` (either factor optional).

Row layout ("psum", TileKernels v2.1): rows are grouped per expert; ``psum_num_tokens_per_expert``
int32 ``[E]`` (nondecreasing) holds each expert's inclusive end, and expert ``e`` owns rows
``[align(psum[e-1], token_alignment), psum[e])``. Rows owned by no expert are padding: TileKernels
skips them, here every output of a padding row is zero (data, scale factors, gradients) so that
each output element is defined.

Exactness. ``exp`` is jax_tilek's own fp32 exponential (Cody-Waite reduction and a degree-6
polynomial, < 1.5 ulp on [-32, 87]), written from IEEE additions, multiplications and a
round-to-integer shifter, so that the GPU kernels and this module's JAX reference produce the same
bits on every machine (CUDA's ``expf`` and XLA's ``exp`` differ in their last bits). silu's argument
is raised to -87 (below it silu is -87 / (1 + e^87) ≈ -1.4e-36 instead of an even tinier value),
which keeps ``d = 1 + exp(-l)`` in [1, 2^126]: there the kernels' branch-free division (the fast
path of CUDA's ``div.rn.f32``) equals IEEE division, which the reference uses. The kernels are built
with ``-fmad=false`` and use FMAs only where the product is exact, and in the one place TileKernels
relies on one: the backward's ``fma(l, 1 - s, 1)`` (:func:`backward_math`), which the reference
computes with one rounding too (:func:`fma_f32`). The reference shields every other product from
XLA's FMA contraction and reassociation. Everything except the backward's weight gradient (a sum,
whose order differs) is therefore bit-exact between kernel and reference, for finite inputs (NaN
and inf inputs are outside the contract: min/max and the division treat them differently).

Sizes: T <= ``MAX_ROWS`` (2^31 - 2^17; int32 row indices, 64-bit element offsets, so T · H is not
limited), H <= 2^28. The persistent kernels' grid is a launch-time value: one cubin per static
configuration serves every GPU, with the same results.

This module: ``swiglu_forward``, ``swiglu_backward`` (un-quantized, v2.1) and ``swiglu`` (one
differentiable function). The FP8-fused variants are in :mod:`jax_tilek.quant.swiglu_quant`.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""


import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import platform
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, View, with_vjp
from jax_tilek.quant import formats as F
from jax_tilek.quant.formats import as_array, static_bool, static_int, static_number

TOKEN_ALIGNMENT = 128  # TileKernels v2.1's default per-expert alignment of the psum layout
HIDDEN_ALIGN = 64  # H must be a multiple of this (TileKernels v2.1)
UNIT = 16  # elements of one half-row a thread handles at a time
WARPS = 8  # warps per CTA of the row kernels
BLOCKS_PER_SM = 4  # resident CTAs per SM the row kernels are built for (__launch_bounds__)

OUT_DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
WORD_BITS = {"bf16": 16, "fp32": 32, "e4m3": 8}  # bits per element of each kind
IN_DTYPES = (jnp.bfloat16, jnp.float32)

# fp32 constants of the exponential: Cody-Waite ln2 split, the rint shifter, and a degree-6
# polynomial for exp on [-ln2/2, ln2/2] (a near-minimax fit, relative error 2e-9), doubled.
_F32 = np.float32
LOG2E = _F32(1.4426950408889634)
LN2_HI = _F32(0.693145751953125)  # 15 significant bits: k·LN2_HI is exact for |k| < 512
LN2_LO = _F32(1.428606765330187e-06)
SHIFTER = _F32(12582912.0)  # 1.5·2^23: (y + SHIFTER) - SHIFTER == rint(y) for |y| < 2^22
EXP_POLY = (1.0, 1.0, 0.4999999, 0.1666642, 0.04166823, 0.0083749, 0.00138367)  # c0..c6
EXP_POLY2 = tuple(_F32(2 * _F32(c)) for c in reversed(EXP_POLY))  # 2·c6 .. 2·c0 (Horner order)
EXP_MIN, EXP_MAX = _F32(-32.0), _F32(87.0)  # exp(-32) + 1 == 1 in fp32; exp(87) < 2^126
SILU_MIN = _F32(-87.0)  # silu's argument saturates here: 1 + exp(87) keeps 1/d a normal number
SCALE_BIAS = (126 - 0x4B400000) & 0xFFFFFFFF  # bits(k + SHIFTER) + SCALE_BIAS == k + 126 (mod 2^32)


# ---------------------------------------------------------------------------------------------
# The reference arithmetic (pure JAX, differentiable).


@jax.custom_jvp
def _rn(p: jax.Array) -> jax.Array:
    """``p`` unchanged, but opaque to XLA's rewrites: FMA contraction of ``a*b+c`` (XLA:CPU) and
    reassociation such as ``(a + c) - c -> a``.

    The bits of ``p`` are or-ed with ``isnan(p)``: a no-op on every value (NaN stays NaN) that the
    compiler cannot see through, so ``p`` is rounded on its own, as in the kernels.
    """
    bits = jax.lax.bitcast_convert_type(p, jnp.uint32)
    return jax.lax.bitcast_convert_type(bits | (p != p).astype(jnp.uint32), jnp.float32)


_rn.defjvp(lambda primals, tangents: (_rn(primals[0]), tangents[0]))


def _mul(a, b) -> jax.Array:
    """IEEE fp32 ``a * b``, rounded on its own."""
    return _rn(jnp.asarray(a, jnp.float32) * jnp.asarray(b, jnp.float32))


def _add(a, b) -> jax.Array:
    """IEEE fp32 ``a + b``, rounded on its own (never folded with a neighbouring operation)."""
    return _rn(jnp.asarray(a, jnp.float32) + jnp.asarray(b, jnp.float32))


def _sub(a, b) -> jax.Array:
    """IEEE fp32 ``a - b``, rounded on its own."""
    return _rn(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))


def _two_sum(a, b) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: ``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly."""
    s = _add(a, b)
    v = _sub(s, a)
    return s, _add(_sub(a, _sub(s, v)), _sub(b, v))


def _two_product(a, b) -> tuple[jax.Array, jax.Array]:
    """Dekker's product: ``(p, e)`` with ``p = fl(a · b)`` and ``p + e == a · b`` exactly (Veltkamp's
    split into 12-bit halves; exact while ``4097·a``, ``4097·b`` stay finite and ``e`` normal)."""

    def split(v):
        big = _mul(v, _F32(4097.0))
        hi = _sub(big, _sub(big, v))
        return hi, _sub(v, hi)

    (ah, al), (bh, bl) = split(a), split(b)
    p = _mul(a, b)
    e = _add(_add(_add(_sub(_mul(ah, bh), p), _mul(ah, bl)), _mul(al, bh)), _mul(al, bl))
    return p, e


def _add_round_to_odd(a, b) -> jax.Array:
    """``a + b`` rounded to odd: exact sums unchanged, otherwise the neighbour of the sum whose last
    significand bit is 1 (from the nearest rounding and TwoSum's error term)."""
    s, e = _two_sum(a, b)
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    fix = (e != 0) & (s != 0) & ((bits & np.uint32(1)) == 0)
    step = jnp.where((e < 0) == (s < 0), np.uint32(1), np.uint32(0xFFFFFFFF))  # away from or towards zero
    return jax.lax.bitcast_convert_type(jnp.where(fix, bits + step, bits), jnp.float32)


@jax.custom_jvp
def fma_f32(a, b, c) -> jax.Array:
    """fp32 ``a · b + c`` with one rounding (CUDA's ``__fmaf_rn``), from fp32 operations only.

    Boldo and Melquiond's emulation: ``a · b = p + e`` exactly (:func:`_two_product`), ``c + p = h + t``
    exactly (TwoSum), ``v = t + e`` rounded to odd, and the result ``fl(h + v)`` is the correctly rounded
    ``a · b + c`` (rounding to odd first keeps the final rounding from rounding twice). Valid while no
    intermediate value overflows (``|a|, |b| < 2^115``, ``|a · b| < 2^127``) and the product's error
    term ``e`` is exact, i.e. ``|a · b| >= 2^-102`` or ``a · b`` far below ``c``'s last place (as in the
    backward, where ``c = 1``). XLA has no fused multiply-add it promises to keep, hence this.
    """
    a, b, c = (jnp.asarray(v, jnp.float32) for v in (a, b, c))
    p, e = _two_product(a, b)
    h, t = _two_sum(c, p)
    return _add(h, _add_round_to_odd(t, e))


fma_f32.defjvp(lambda primals, tangents: (fma_f32(*primals), tangents[0] * primals[1] + primals[0] * tangents[1] + tangents[2]))


@jax.custom_jvp
def exp_f32(t: jax.Array) -> jax.Array:
    """jax_tilek's fp32 ``exp(t)`` for ``t`` clamped to [-32, 87] (the kernels' exponential).

    ``y = t·log2e + 1.5·2^23`` and ``k = y - 1.5·2^23`` (= rint(t·log2e)), ``r = (t - k·ln2_hi) -
    k·ln2_lo``; ``2·exp(r)`` by Horner's rule on the doubled coefficients (every operation rounded
    on its own; doubling is exact), times ``2^(k-1)`` built from the bits of ``y``. Within 1.4 ulp
    of exp on [-32, 87]. (The kernels fuse ``t - k·ln2_hi`` and ``1 + exp`` into FMAs: both
    products are exact, so the results are the same.)
    """
    t = jnp.clip(jnp.asarray(t, jnp.float32), EXP_MIN, EXP_MAX)
    y = _rn(_mul(t, LOG2E) + SHIFTER)  # opaque: XLA would fold (a + c) - c into a
    k = y - SHIFTER
    r = (t - _mul(k, LN2_HI)) - _mul(k, LN2_LO)
    p = jnp.full_like(r, EXP_POLY2[0])
    for c in EXP_POLY2[1:]:
        p = _mul(p, r) + c
    bits = (jax.lax.bitcast_convert_type(y, jnp.uint32) + np.uint32(SCALE_BIAS)) << 23
    return _mul(p, jax.lax.bitcast_convert_type(bits, jnp.float32))


exp_f32.defjvp(lambda primals, tangents: (lambda y: (y, y * tangents[0]))(exp_f32(primals[0])))


def _clamp(l, r, clamp_value):
    if clamp_value is None:
        return l, r
    c = _F32(clamp_value)
    return jnp.minimum(l, c), jnp.clip(r, -c, c)


def silu_parts(l: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(l', d, silu)``: ``l' = max(l, -87)``, ``d = 1 + exp(-l')``, ``silu = l' / d`` (IEEE
    division). Below -87, silu is the constant -87 / (1 + e^87) ≈ -1.4e-36 (true silu is smaller
    still); this keeps ``1 / d`` normal, which the kernels' branch-free division needs."""
    l = jnp.maximum(l, SILU_MIN)
    d = _F32(1.0) + exp_f32(-l)
    return l, d, l / d


def row_weights(num_rows: int, topk_weights, routed_scaling_factor) -> Optional[jax.Array]:
    """fp32 ``[T]`` per-row factor ``topk_weights · rsf``, or None when neither is given."""
    if topk_weights is None and routed_scaling_factor is None:
        return None
    if topk_weights is None:
        return jnp.full((num_rows,), _F32(routed_scaling_factor))
    w = topk_weights.astype(jnp.float32)
    return w if routed_scaling_factor is None else _mul(w, _F32(routed_scaling_factor))


def valid_rows(num_rows: int, psum, token_alignment: int) -> Optional[jax.Array]:
    """bool ``[T]``: rows owned by an expert in the psum layout (None: every row)."""
    if psum is None:
        return None
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    psum = psum.astype(jnp.int32)
    e = jnp.searchsorted(psum, rows, side="right").astype(jnp.int32)  # entries <= row
    prev = jnp.where(e > 0, psum[jnp.maximum(e - 1, 0)], 0)
    start = (prev + token_alignment - 1) // token_alignment * token_alignment
    return (e < psum.shape[0]) & (rows >= start)


def forward_act(x, *, psum=None, topk_weights=None, routed_scaling_factor=None, clamp_value=None, token_alignment=TOKEN_ALIGNMENT):
    """The fp32 activation ``act[T, H]`` (zero on padding rows) and the valid-row mask (or None)."""
    h = x.shape[1] // 2
    x = x.astype(jnp.float32)
    l, r = _clamp(x[:, :h], x[:, h:], clamp_value)
    _, _, silu = silu_parts(l)
    act = _mul(silu, r)
    w = row_weights(x.shape[0], topk_weights, routed_scaling_factor)
    if w is not None:
        act = _mul(act, w[:, None])
    valid = valid_rows(x.shape[0], psum, token_alignment)
    if valid is not None:
        act = jnp.where(valid[:, None], act, _F32(0.0))
    return act, valid


def clamped_count(x, valid, clamp_value) -> jax.Array:
    """int32 ``[4]``: #(l > c), #(r > c), #(r < -c) over valid rows, and the number of valid
    activations (valid rows × H). int32 because JAX disables int64 by default (wraps past 2^31)."""
    h = x.shape[1] // 2
    x = x.astype(jnp.float32)
    keep = jnp.ones((x.shape[0], 1), bool) if valid is None else valid[:, None]
    if clamp_value is None:
        zero = jnp.zeros((), jnp.int32)
        counts = [zero, zero, zero]
    else:
        c = _F32(clamp_value)
        l, r = x[:, :h], x[:, h:]
        counts = [jnp.sum((cond & keep).astype(jnp.int32)) for cond in (l > c, r > c, r < -c)]
    rows = jnp.sum(keep.astype(jnp.int32))
    return jnp.stack([*counts, rows * h]).astype(jnp.int32)


def backward_math(l0, r0, g, w, clamp_value):
    """Per element: ``(dl, dr, act)`` in fp32 from the unclamped halves, the output gradient and
    the per-row weight ``w`` (``[T, 1]`` or None).

    TileKernels' operation order (v1 and v2.1, kernel and torch reference alike): ``s = 1 / d``,
    ``gs = (g·w)·s``, ``dl = (gs·r)·fma(l', 1 - s, 1)``, ``dr = gs·l'`` (one fused multiply-add, see
    :func:`fma_f32`), zero where the clamp cut the input (``l > c``; ``|r| > c``); ``act = silu · r``
    (unweighted). ``l'`` is the clamped l raised to -87 (:func:`silu_parts`).
    """
    l, r = _clamp(l0, r0, clamp_value)
    l, d, silu = silu_parts(l)
    s = _F32(1.0) / d
    gs = _mul(g if w is None else _mul(g, w), s)
    one_minus_s = _sub(_F32(1.0), s)
    # Where 1 - s == 0 the product is 0 whatever l' is: l' = 0 there keeps Dekker's split finite.
    slope = fma_f32(jnp.where(one_minus_s == 0, _F32(0.0), l), one_minus_s, _F32(1.0))
    dl = _mul(_mul(gs, r), slope)
    dr = _mul(gs, l)
    if clamp_value is not None:
        c = _F32(clamp_value)
        dl = jnp.where(l0 > c, _F32(0.0), dl)
        dr = jnp.where((r0 > c) | (r0 < -c), _F32(0.0), dr)
    return dl, dr, _mul(silu, r)


def backward_reference(x_f32, g, *, psum=None, topk_weights=None, routed_scaling_factor=None, clamp_value=None, token_alignment=TOKEN_ALIGNMENT):
    """fp32 ``(x_grad[T, 2H], weight_grad[T] or None, act_out[T, H])``, zero on padding rows."""
    t, h = x_f32.shape[0], x_f32.shape[1] // 2
    w = row_weights(t, topk_weights, routed_scaling_factor)
    dl, dr, act = backward_math(x_f32[:, :h], x_f32[:, h:], g.astype(jnp.float32), None if w is None else w[:, None], clamp_value)
    act_out = act if w is None else _mul(act, w[:, None])
    weight_grad = None
    if topk_weights is not None:
        weight_grad = jnp.sum(_mul(g.astype(jnp.float32), act), axis=1)
        if routed_scaling_factor is not None:
            weight_grad = _mul(weight_grad, _F32(routed_scaling_factor))
    valid = valid_rows(t, psum, token_alignment)
    x_grad = jnp.concatenate([dl, dr], axis=1)
    if valid is not None:
        x_grad = jnp.where(valid[:, None], x_grad, _F32(0.0))
        act_out = jnp.where(valid[:, None], act_out, _F32(0.0))
        if weight_grad is not None:
            weight_grad = jnp.where(valid, weight_grad, _F32(0.0))
    return x_grad, weight_grad, act_out


# ---------------------------------------------------------------------------------------------
# Kernel building blocks (TileLang).

# PTX helpers: packed conversions (element 0 in the low bits) and an unsplittable 16-byte store.
PRELUDE = r"""
__device__ __forceinline__ unsigned tilek_e4m3x4(float a, float b, float c, float d) {
  unsigned short lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
  return (unsigned)lo | ((unsigned)hi << 16);
}
__device__ __forceinline__ unsigned tilek_bf16x2(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float tilek_e4m3_to_f32(unsigned w, int j) {  // byte j of w, exactly
  unsigned short pair = (unsigned short)(w >> (16 * (j >> 1)));
  unsigned h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(pair));
  unsigned short h = (unsigned short)(h2 >> (16 * (j & 1)));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
// IEEE division a / d without the slow path: the fast path of CUDA's div.rn.f32 (MUFU.RCP, one
// Newton step, one Markstein correction), exact when 1 <= d < 2^126 and a / d is normal or d is a
// power of two (SwiGLU's d = 1 + exp(-l) with l >= -87); the sign of a fixes zero quotients.
__device__ __forceinline__ float tilek_rcp(float d) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return __fmaf_rn(r, __fmaf_rn(-d, r, 1.0f), r);
}
__device__ __forceinline__ float tilek_div(float a, float d, float r) {
  float q = __fmul_rn(a, r);
  q = __fmaf_rn(r, __fmaf_rn(-d, q, a), q);
  return __int_as_float(__float_as_int(q) | (__float_as_int(a) & 0x80000000));
}
__device__ __forceinline__ void tilek_st16(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ void tilek_st8(void* p, unsigned a, unsigned b) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(a), "r"(b) : "memory");
}
"""

# Every kernel here computes in IEEE fp32 with each operation rounded on its own, like the reference.
PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.device_compile_flags": ["-fmad=false"]}


@functools.cache
def macros():
    """TileLang macros shared by the SwiGLU kernels (built on first use: TileLang is optional)."""
    import tilelang.language as T

    f32 = T.float32
    poly = [f32(float(c)) for c in EXP_POLY2]

    def fma(a, b, c):
        return T.call_extern("float32", "__fmaf_rn", a, b, c)

    @T.macro
    def silu(l, d):
        """``silu_parts(l)`` operation for operation: returns silu; ``d[0] = 1 + exp(-l')``,
        ``d[1] = l'`` and ``d[2]`` = the refined reciprocal of ``d[0]`` (for ``tilek_div``)."""
        t = T.alloc_var("float32")
        y = T.alloc_var("float32")
        k = T.alloc_var("float32")
        r = T.alloc_var("float32")
        p = T.alloc_var("float32")
        d[1] = T.max(l, f32(float(SILU_MIN)))
        t = T.max(d[1] * f32(-1.0), f32(float(EXP_MIN)))  # <= 87: l' >= -87
        y = t * f32(float(LOG2E)) + f32(float(SHIFTER))
        k = y - f32(float(SHIFTER))
        r = fma(k * f32(-1.0), f32(float(LN2_HI)), t) - k * f32(float(LN2_LO))  # k·ln2_hi is exact
        p = poly[0]
        for c in poly[1:]:
            p = p * r + c
        scale = T.reinterpret(T.shift_left(T.reinterpret(y, "uint32") + T.uint32(SCALE_BIAS), T.uint32(23)), "float32")
        d[0] = fma(p, scale, f32(1.0))  # p·2^(k-1) is exact
        d[2] = T.call_extern("float32", "tilek_rcp", d[0])
        return T.call_extern("float32", "tilek_div", d[1], d[0], d[2])

    @T.macro
    def e4m3_scales(amax, sc, round_sf: bool):
        """``sc[0], sc[1] = sf, sf_inv`` of a block maximum, as ``formats.scale_factors``."""
        a = T.max(amax, f32(float(F.E4M3.amax_floor)))
        sc[0] = a / f32(F.E4M3.max_value)
        if round_sf:
            e = ((T.reinterpret(sc[0], "int32") - 1) >> 23) + 1 - 127
            sc[0] = T.reinterpret(T.shift_left(e + 127, 23), "float32")
            sc[1] = T.reinterpret(T.shift_left(127 - e, 23), "float32")
        else:
            sc[1] = f32(F.E4M3.max_value) / a

    @T.macro
    def load_unit(x, row, word, values, n: int, kind: str):
        """``n`` elements of ``x[row]`` (a uint32 view; from word ``word``) -> fp32 ``values``.

        ``kind`` is the element type: "bf16", "fp32" or "e4m3" (decoded exactly, unscaled).
        """
        words = n * WORD_BITS[kind] // 32
        w = T.alloc_local((words,), "uint32")
        for q in T.unroll(max(words // 4, 1)):
            for v in T.vectorized(min(words, 4)):
                w[q * 4 + v] = x[row, word + q * 4 + v]
        if kind == "bf16":
            for v in T.unroll(words):
                values[2 * v] = T.reinterpret(T.shift_left(w[v], T.uint32(16)), "float32")
                values[2 * v + 1] = T.reinterpret(T.bitwise_and(w[v], T.uint32(0xFFFF0000)), "float32")
        elif kind == "fp32":
            for v in T.unroll(words):
                values[v] = T.reinterpret(w[v], "float32")
        else:
            for v in T.unroll(words):
                for j in T.unroll(4):
                    values[4 * v + j] = T.call_extern("float32", "tilek_e4m3_to_f32", w[v], j)

    @T.macro
    def store_values(y, row, word, values, n: int, kind: str):
        """Stores ``n`` fp32 values as bf16, fp32 or (already scaled) e4m3 at word ``word`` of ``y[row]``."""
        if kind == "e4m3":
            packed = [T.call_extern("uint32", "tilek_e4m3x4", *[values[4 * q + v] for v in range(4)]) for q in range(n // 4)]
        elif kind == "bf16":
            packed = [T.call_extern("uint32", "tilek_bf16x2", values[2 * q], values[2 * q + 1]) for q in range(n // 2)]
        else:
            packed = [T.reinterpret(values[q], "uint32") for q in range(n)]
        for q in list(range(0, len(packed), 4)):
            if len(packed) - q >= 4:
                T.evaluate(T.call_extern("handle", "tilek_st16", T.address_of(y[row, word + q]), *packed[q : q + 4]))
            else:
                T.evaluate(T.call_extern("handle", "tilek_st8", T.address_of(y[row, word + q]), *packed[q : q + 2]))

    @T.macro
    def store_zeros(y, row, word, words: int):
        for q in list(range(0, words, 4)):
            if words - q >= 4:
                T.evaluate(T.call_extern("handle", "tilek_st16", T.address_of(y[row, word + q]), *[T.uint32(0)] * 4))
            else:
                T.evaluate(T.call_extern("handle", "tilek_st8", T.address_of(y[row, word + q]), *[T.uint32(0)] * 2))

    @T.macro
    def find_row(ps, row, num_experts, alignment: int):
        """1 if ``row`` belongs to an expert of the psum layout, else 0 (binary search; ``ps`` sorted)."""
        pos = T.alloc_var("int32")
        pos = 0
        for b in T.serial(16):  # a loop, not unrolled here: TileLang lowers 16 nested copies slowly
            step = T.shift_left(1, 15 - b)
            if pos + step <= num_experts:
                if ps[pos + step - 1] <= row:
                    pos = pos + step
        prev = T.if_then_else(pos > 0, ps[T.max(pos - 1, 0)], 0)
        start = (prev + (alignment - 1)) // alignment * alignment
        return T.Cast("int32", pos < num_experts) * T.Cast("int32", row >= start)

    @T.macro
    def group_max(v, lanes: int):
        """Max over aligned groups of ``lanes`` lanes (all lanes of the warp must take part)."""
        m = T.alloc_var("float32")
        m = v
        for delta in [1 << b for b in range((lanes - 1).bit_length())]:
            m = T.max(m, T.shfl_xor(m, delta))
        return m

    @T.macro
    def group_sum(v, lanes: int):
        m = T.alloc_var(v.dtype)
        m = v
        for delta in [1 << b for b in range((lanes - 1).bit_length())]:
            m = m + T.shfl_xor(m, delta)
        return m

    return dict(
        fma=fma, silu=silu, e4m3_scales=e4m3_scales, load_unit=load_unit, store_values=store_values,
        store_zeros=store_zeros, find_row=find_row, group_max=group_max, group_sum=group_sum,
    )


def sf_param(layout: Optional[str], k_blocks: int, rows, padded):
    """(shape, dtype) of a row kernel's sf tensor parameter; ``rows`` and ``padded`` (align(T, 4))
    are the kernel's dynamic row counts."""
    if layout is None:
        return (1,), "float32"
    return {
        "row": ((rows, k_blocks), "float32"),
        "col": ((k_blocks, padded), "float32"),
        "col_ue8m0": ((F.ceil_div(k_blocks, 4), padded), "int32"),
    }[layout]


@kernel(pass_configs=PASS_CONFIGS)
def swiglu_forward_kernel(
    hidden: int,
    in_dtype: str,
    out_kind: str,
    npc: int = 0,
    layout: Optional[str] = None,
    round_sf: bool = False,
    psum: bool = False,
    alignment: int = TOKEN_ALIGNMENT,
    weights: bool = False,
    rsf: bool = False,
    clamp: bool = False,
    count: bool = False,
):
    """SwiGLU forward, one warp per row, persistent over rows (``num_ctas`` CTAs, a launch-time
    scalar: :func:`persistent_ctas`); output bf16, fp32 or e4m3 + sf.

    A lane handles 16 consecutive activations at a time (``unit``): 16-byte loads of both halves,
    the fp32 math of :func:`forward_act`, and for e4m3 the block max over the ``npc / 16`` lanes of
    its block by shuffles, then one 16-byte store. ``npc == hidden`` (whole-row scales) takes two
    passes over the row (the second recomputes). Padding rows get zeros; with column-major scale
    layouts the rows ``T <= row < align(T, 4)`` get zero scales. Clamp counters are summed per warp
    and added to ``cnt`` (zero-filled by the launcher) with one atomic per warp and counter.
    """
    import tilelang.language as T

    M = macros()
    bf16 = in_dtype == "bfloat16"
    in_kind = "bf16" if bf16 else "fp32"
    units = hidden // UNIT  # 16-element units per half-row
    iters = F.ceil_div(units, 32)
    x_words = hidden if bf16 else 2 * hidden  # uint32 words per row of x
    in_w = UNIT // 2 if bf16 else UNIT  # words per unit of input
    out_w = {"bf16": UNIT // 2, "fp32": UNIT, "e4m3": UNIT // 4}[out_kind]
    cast = out_kind == "e4m3"
    whole = cast and npc == hidden and npc not in (32, 128)
    lanes = npc // UNIT if cast and not whole else 1  # lanes per scale block
    k_blocks = hidden // npc if cast else 1
    col = layout in ("col", "col_ue8m0")
    threads = WARPS * 32

    rows, padded, num_experts = T.dynamic("T"), T.dynamic("TP"), T.dynamic("E")
    all_rows = padded if col else rows
    sf_shape, sf_dtype = sf_param(layout if cast else None, k_blocks, rows, padded)

    @T.prim_func
    def swiglu_forward(
        x: T.Tensor((rows, x_words), "uint32"),
        ps: T.Tensor((num_experts,) if psum else (1,), "int32"),
        tw: T.Tensor((rows,) if weights else (1,), "float32"),
        y: T.Tensor((rows, units * out_w), "uint32"),
        sf: T.Tensor(sf_shape, sf_dtype),
        cnt: T.Tensor((4,) if count else (1,), "int32"),
        clamp_value: T.float32,
        scaling: T.float32,
        num_ctas: T.int32,
    ):
        with T.Kernel(num_ctas, threads=threads, prelude=PRELUDE) as cta:
            T.annotate_min_blocks_per_sm(BLOCKS_PER_SM)
            tid = T.get_thread_binding(0)
            lane = tid % 32
            num_warps = num_ctas * WARPS
            warp = cta * WARPS + tid // 32
            lf = T.alloc_local((UNIT,), "float32")
            rf = T.alloc_local((UNIT,), "float32")
            sc = T.alloc_local((2,), "float32")
            d = T.alloc_local((3,), "float32")
            counters = T.alloc_local((4,), "int32")
            sc[0] = T.float32(0.0)
            sc[1] = T.float32(0.0)
            valid = T.alloc_var("int32")
            w = T.alloc_var("float32")
            amax = T.alloc_var("float32")
            for i in T.unroll(4):
                counters[i] = 0

            row = T.alloc_var("int32")  # a variable keeps the index expressions (and TileLang's lowering) small
            for it in T.serial(T.ceildiv(all_rows, num_warps)):
                row = it * num_warps + warp
                if row < all_rows:
                    valid = T.Cast("int32", row < rows)
                    if psum:
                        if row < rows:
                            valid = M["find_row"](ps, row, num_experts, alignment)
                    if valid > 0:
                        if weights and rsf:
                            w = tw[row] * scaling
                        elif weights:
                            w = tw[row]
                        elif rsf:
                            w = scaling
                        counters[3] = counters[3] + T.Cast("int32", lane == 0)  # valid rows, once per warp
                        amax = T.float32(0.0)
                        for p in T.serial(2 if whole else 1):  # whole-row scales: pass 0 finds the max
                            for j in T.serial(iters):
                                u = j * 32 + lane
                                active = u < units
                                for v in T.unroll(UNIT):
                                    lf[v] = T.float32(0.0)
                                    rf[v] = T.float32(0.0)
                                if active:
                                    M["load_unit"](x, row, u * in_w, lf, UNIT, in_kind)
                                    M["load_unit"](x, row, x_words // 2 + u * in_w, rf, UNIT, in_kind)
                                    for v in T.unroll(UNIT):
                                        if clamp:
                                            if count and p == 0:
                                                counters[0] = counters[0] + T.Cast("int32", lf[v] > clamp_value)
                                                counters[1] = counters[1] + T.Cast("int32", rf[v] > clamp_value)
                                                counters[2] = counters[2] + T.Cast("int32", rf[v] < clamp_value * T.float32(-1.0))
                                            lf[v] = T.min(lf[v], clamp_value)
                                            rf[v] = T.min(T.max(rf[v], clamp_value * T.float32(-1.0)), clamp_value)
                                        lf[v] = M["silu"](lf[v], d) * rf[v]
                                        if weights or rsf:
                                            lf[v] = lf[v] * w
                                if cast:
                                    if not whole:
                                        amax = T.float32(0.0)
                                    for v in T.unroll(UNIT):
                                        amax = T.max(amax, T.abs(lf[v]))
                                    if not whole:
                                        amax = M["group_max"](amax, lanes)
                                        M["e4m3_scales"](amax, sc, round_sf)
                                    if not whole or p == 1:
                                        for v in T.unroll(UNIT):
                                            lf[v] = lf[v] * sc[1]
                                        if active:
                                            M["store_values"](y, row, u * out_w, lf, UNIT, "e4m3")
                                    if not whole:
                                        block = u * UNIT // npc
                                        if layout == "row":
                                            if active and lane % lanes == 0:
                                                sf[row, block] = sc[0]
                                        elif layout == "col":
                                            if active and lane % lanes == 0:
                                                sf[block, row] = sc[0]
                                        else:
                                            byte = T.alloc_var("int32")
                                            byte = T.if_then_else(active, (T.reinterpret(sc[0], "int32") >> 23) & 0xFF, 0)
                                            word = T.alloc_var("int32")
                                            word = byte
                                            for q in [1, 2, 3]:
                                                word = word | T.shift_left(T.shfl_down(byte, q * lanes), 8 * q)
                                            if active and lane % (4 * lanes) == 0:
                                                sf[block // 4, row] = word
                                else:
                                    if active:
                                        M["store_values"](y, row, u * out_w, lf, UNIT, out_kind)
                            if whole and p == 0:
                                amax = M["group_max"](amax, 32)
                                M["e4m3_scales"](amax, sc, round_sf)
                                if lane == 0:
                                    sf[row, 0] = sc[0]
                    else:
                        if row < rows:
                            for j in T.serial(iters):
                                u = j * 32 + lane
                                if u < units:
                                    M["store_zeros"](y, row, u * out_w, out_w)
                        if cast:
                            for j in T.serial(F.ceil_div(sf_shape[0] if col else k_blocks, 32)):
                                b = j * 32 + lane
                                if layout == "row":
                                    if b < k_blocks:
                                        sf[row, b] = T.float32(0.0)
                                elif layout == "col":
                                    if b < k_blocks:
                                        sf[b, row] = T.float32(0.0)
                                else:
                                    if b < sf_shape[0]:
                                        sf[b, row] = 0
            if count:
                for i in T.unroll(4):
                    counters[i] = M["group_sum"](counters[i], 32)
                if lane == 0:
                    counters[3] = counters[3] * hidden
                    for i in T.unroll(4):
                        T.atomic_add(cnt[i], counters[i])

    return swiglu_forward


BWD_UNIT = 8  # elements per half-row a lane handles at a time in the backward (register budget)


def scale_param(layout: Optional[str], k_blocks: int, rows, padded, as_bytes: bool = False):
    """Like :func:`sf_param`; ``as_bytes`` views packed UE8M0 words as bytes ``[W, TP, 4]``."""
    if layout == "col_ue8m0" and as_bytes:
        return (F.ceil_div(k_blocks, 4), padded, 4), "uint8"
    return sf_param(layout, k_blocks, rows, padded)


@kernel(pass_configs=PASS_CONFIGS)
def swiglu_backward_kernel(
    hidden: int,
    x_kind: str,
    g_kind: str,
    grad_kind: str,
    npc: int = 0,
    x_layout: Optional[str] = None,
    cast: bool = False,
    layout: Optional[str] = None,
    round_sf: bool = False,
    psum: bool = False,
    alignment: int = TOKEN_ALIGNMENT,
    weights: bool = False,
    rsf: bool = False,
    clamp: bool = False,
    recompute: bool = False,
    act_kind: str = "bf16",
):
    """SwiGLU backward, one warp per row, persistent over rows (``num_ctas`` CTAs, a launch-time
    scalar), with the math of :func:`backward_math`: TileKernels' operation order, one FMA.

    A lane handles 8 columns of both halves at a time: x (bf16/fp32, or e4m3 times its per-token
    scale), the output gradient g, then writes dl and dr (bf16/fp32), optionally their per-token
    e4m3 cast (block max by shuffles over the ``npc / 8`` lanes of a block; packed UE8M0 scales are
    written byte by byte), the recomputed weighted activation, and the weight gradient (a warp sum of
    per-lane sequential sums). Padding rows get zeros everywhere; with column-major scale layouts
    the rows ``T <= row < align(T, 4)`` get zero scales.
    """
    import tilelang.language as T

    M = macros()
    n = BWD_UNIT
    units = hidden // n
    iters = F.ceil_div(units, 32)
    bits = WORD_BITS
    x_half = hidden * bits[x_kind] // 32  # words per half-row of x
    x_w, g_w, d_w, a_w = (n * bits[k] // 32 for k in (x_kind, g_kind, grad_kind, act_kind))
    lanes = max(npc // n, 1)  # lanes per scale block
    k2 = 2 * hidden // npc if npc else 1  # scale blocks per row of x / of the gradient
    col = (cast and layout in ("col", "col_ue8m0")) or x_kind == "e4m3" and x_layout in ("col", "col_ue8m0")
    scaled = weights or rsf
    threads = WARPS * 32

    rows, padded, num_experts = T.dynamic("T"), T.dynamic("TP"), T.dynamic("E")
    all_rows = padded if cast and layout in ("col", "col_ue8m0") else rows
    xsf_shape, xsf_dtype = sf_param(x_layout if x_kind == "e4m3" else None, k2, rows, padded)
    dsf_shape, dsf_dtype = scale_param(layout if cast else None, k2, rows, padded, as_bytes=True)
    assert col or all_rows is rows

    @T.macro
    def dequantize(xsf, row, u, lf, rf, sc):
        """Multiplies the decoded e4m3 halves by their per-token block scales."""
        for half, vals in [(0, lf), (1, rf)]:
            kb = u * n // npc + half * (hidden // npc)
            if x_layout == "row":
                sc[0] = xsf[row, kb]
            elif x_layout == "col":
                sc[0] = xsf[kb, row]
            else:
                sc[0] = T.reinterpret(T.shift_left((xsf[kb // 4, row] >> ((kb % 4) * 8)) & 0xFF, 23), "float32")
            for v in T.unroll(n):
                vals[v] = vals[v] * sc[0]

    @T.macro
    def elementwise(lf, rf, gf, qf, d, w, acc, clamp_value):
        """lf, rf <- dl, dr; qf <- the weighted activation; acc += g · act (unweighted)."""
        l = T.alloc_var("float32")
        r = T.alloc_var("float32")
        silu = T.alloc_var("float32")
        s = T.alloc_var("float32")
        gs = T.alloc_var("float32")
        dl = T.alloc_var("float32")
        for v in T.unroll(n):
            l = lf[v]
            r = rf[v]
            if clamp:
                l = T.min(l, clamp_value)
                r = T.min(T.max(r, clamp_value * T.float32(-1.0)), clamp_value)
            silu = M["silu"](l, d)
            l = d[1]  # raised to -87, as in the reference
            s = T.call_extern("float32", "tilek_div", T.float32(1.0), d[0], d[2])
            gs = (gf[v] * w if scaled else gf[v]) * s
            if weights:
                acc[0] = acc[0] + gf[v] * (silu * r)
            if recompute:
                qf[v] = (silu * r) * w if scaled else silu * r
            dl = (gs * r) * M["fma"](l, T.float32(1.0) - s, T.float32(1.0))
            if clamp:
                lf[v] = T.if_then_else(lf[v] > clamp_value, T.float32(0.0), dl)
                rf[v] = T.if_then_else((rf[v] > clamp_value) | (rf[v] < clamp_value * T.float32(-1.0)), T.float32(0.0), gs * l)
            else:
                lf[v] = dl
                rf[v] = gs * l

    @T.macro
    def cast_store(dq, dsf, row, u, lane, active, lf, rf, qf, sc):
        """Per-token e4m3 cast of both gradient halves: data and scales."""
        amax = T.alloc_var("float32")
        for half, vals in [(0, lf), (1, rf)]:
            amax = T.float32(0.0)
            for v in T.unroll(n):
                amax = T.max(amax, T.abs(vals[v]))
            amax = M["group_max"](amax, lanes)
            M["e4m3_scales"](amax, sc, round_sf)
            for v in T.unroll(n):
                qf[v] = vals[v] * sc[1]
            if active:
                M["store_values"](dq, row, half * (hidden // 4) + u * (n // 4), qf, n, "e4m3")
            kb = u * n // npc + half * (hidden // npc)
            if active and lane % lanes == 0:
                if layout == "row":
                    dsf[row, kb] = sc[0]
                elif layout == "col":
                    dsf[kb, row] = sc[0]
                else:
                    dsf[kb // 4, row, kb % 4] = T.Cast("uint8", (T.reinterpret(sc[0], "int32") >> 23) & 0xFF)
                    if half == 1 and k2 % 4:
                        if kb == k2 - 1:
                            for tail in list(range(k2 % 4, 4)):
                                dsf[kb // 4, row, tail] = T.uint8(0)

    @T.macro
    def valid_row(x, xsf, tw, g, dx, dq, dsf, wg, act, row, lane, clamp_value, scaling):
        lf = T.alloc_local((n,), "float32")
        rf = T.alloc_local((n,), "float32")
        gf = T.alloc_local((n,), "float32")
        qf = T.alloc_local((n,), "float32")
        sc = T.alloc_local((2,), "float32")
        d = T.alloc_local((3,), "float32")
        acc = T.alloc_local((1,), "float32")
        w = T.alloc_var("float32")
        if weights and rsf:
            w = tw[row] * scaling
        elif weights:
            w = tw[row]
        elif rsf:
            w = scaling
        acc[0] = T.float32(0.0)
        for j in T.serial(iters):
            u = j * 32 + lane
            active = u < units
            for v in T.unroll(n):
                lf[v] = T.float32(0.0)
                rf[v] = T.float32(0.0)
                gf[v] = T.float32(0.0)
            if active:
                M["load_unit"](x, row, u * x_w, lf, n, x_kind)
                M["load_unit"](x, row, x_half + u * x_w, rf, n, x_kind)
                M["load_unit"](g, row, u * g_w, gf, n, g_kind)
                if x_kind == "e4m3":
                    dequantize(xsf, row, u, lf, rf, sc)
                elementwise(lf, rf, gf, qf, d, w, acc, clamp_value)
                M["store_values"](dx, row, u * d_w, lf, n, grad_kind)
                M["store_values"](dx, row, hidden * bits[grad_kind] // 32 + u * d_w, rf, n, grad_kind)
                if recompute:
                    M["store_values"](act, row, u * a_w, qf, n, act_kind)
            if cast:
                cast_store(dq, dsf, row, u, lane, active, lf, rf, qf, sc)
        if weights:
            acc[0] = M["group_sum"](acc[0], 32)
            if lane == 0:
                wg[row] = acc[0] * scaling if rsf else acc[0]

    @T.macro
    def padding_row(dx, dq, dsf, wg, act, row, lane, rows):
        if row < rows:
            for j in T.serial(iters):
                u = j * 32 + lane
                if u < units:
                    M["store_zeros"](dx, row, u * d_w, d_w)
                    M["store_zeros"](dx, row, hidden * bits[grad_kind] // 32 + u * d_w, d_w)
                    if cast:
                        M["store_zeros"](dq, row, u * (n // 4), n // 4)
                        M["store_zeros"](dq, row, hidden // 4 + u * (n // 4), n // 4)
                    if recompute:
                        M["store_zeros"](act, row, u * a_w, a_w)
            if weights and lane == 0:
                wg[row] = T.float32(0.0)
        if cast:
            for j in T.serial(F.ceil_div(dsf_shape[0] * 4 if layout == "col_ue8m0" else k2, 32)):
                b = j * 32 + lane
                if layout == "col_ue8m0":
                    if b < dsf_shape[0] * 4:
                        dsf[b // 4, row, b % 4] = T.uint8(0)
                elif b < k2:
                    if layout == "row":
                        dsf[row, b] = T.float32(0.0)
                    else:
                        dsf[b, row] = T.float32(0.0)

    @T.prim_func
    def swiglu_backward(
        x: T.Tensor((rows, 2 * x_half), "uint32"),
        xsf: T.Tensor(xsf_shape, xsf_dtype),
        ps: T.Tensor((num_experts,) if psum else (1,), "int32"),
        tw: T.Tensor((rows,) if weights else (1,), "float32"),
        g: T.Tensor((rows, hidden * bits[g_kind] // 32), "uint32"),
        dx: T.Tensor((rows, 2 * hidden * bits[grad_kind] // 32), "uint32"),
        dq: T.Tensor((rows, 2 * hidden // 4) if cast else (1,), "uint32"),
        dsf: T.Tensor(dsf_shape, dsf_dtype),
        wg: T.Tensor((rows,) if weights else (1,), "float32"),
        act: T.Tensor((rows, hidden * bits[act_kind] // 32) if recompute else (1,), "uint32"),
        clamp_value: T.float32,
        scaling: T.float32,
        num_ctas: T.int32,
    ):
        with T.Kernel(num_ctas, threads=threads, prelude=PRELUDE) as cta:
            T.annotate_min_blocks_per_sm(BLOCKS_PER_SM)
            tid = T.get_thread_binding(0)
            lane = tid % 32
            num_warps = num_ctas * WARPS
            warp = cta * WARPS + tid // 32
            valid = T.alloc_var("int32")
            row = T.alloc_var("int32")  # a variable keeps the index expressions (and TileLang's lowering) small
            for it in T.serial(T.ceildiv(all_rows, num_warps)):
                row = it * num_warps + warp
                if row < all_rows:
                    valid = T.Cast("int32", row < rows)
                    if psum:
                        if row < rows:
                            valid = M["find_row"](ps, row, num_experts, alignment)
                    if valid > 0:
                        valid_row(x, xsf, tw, g, dx, dq, dsf, wg, act, row, lane, clamp_value, scaling)
                    else:
                        padding_row(dx, dq, dsf, wg, act, row, lane, rows)

    return swiglu_backward


# ---------------------------------------------------------------------------------------------
# Shared op plumbing: argument rules, optional array operands, launches.

MAX_ROWS = 2**31 - 2**17
"""Rows (T) the SwiGLU kernels take: row indices are int32, with headroom for a grid's worth of
warps past the last row (element offsets are 64-bit, so T · H is not limited)."""
MAX_HIDDEN = 2**28  # H: a row of 2H fp32 values stays below 2^31 words (int32 column indices)
MAX_ALIGNMENT = 2**16  # token_alignment: psum ends + alignment stay within int32
MAX_CTAS = 2**13  # CTAs of a persistent launch (JAX_TILEK_NUM_SMS may ask for more): 2^16 warps


def check_impl(op: str, impl) -> None:
    if not (impl is None or (isinstance(impl, str) and impl in ("tilelang", "xla"))):
        raise ValueError(f"{op}: impl must be None, 'tilelang' or 'xla', got {impl!r}")










def operands(op: str, x, psum, topk_weights) -> tuple:
    """The array arguments every SwiGLU op takes (TypeError naming the op for non-arrays)."""
    return (
        as_array(op, "x", x), as_array(op, "psum_num_tokens_per_expert", psum, optional=True),
        as_array(op, "topk_weights", topk_weights, optional=True),
    )  # fmt: skip


def pack_operands(*named: tuple[str, Optional[jax.Array]]) -> tuple[tuple[jax.Array, ...], tuple[str, ...]]:
    """The present arrays (TileOp takes arrays positionally) and their names, in order."""
    present = [(n, a) for n, a in named if a is not None]
    return tuple(a for _, a in present), tuple(n for n, _ in present)


def unpack_operands(args, names) -> dict:
    return dict(zip(names, args))


def check_common(name: str, x, ops: dict, *, routed_scaling_factor, clamp_value, token_alignment, x_dtypes=IN_DTYPES) -> int:
    """Rules shared by the SwiGLU ops; returns H."""
    if x.ndim != 2 or x.shape[1] % 2:
        raise ValueError(f"{name}: x must be [T, 2H], got shape {x.shape}")
    h = x.shape[1] // 2
    if h % HIDDEN_ALIGN or not 0 < h <= MAX_HIDDEN:
        raise ValueError(f"{name}: H (half of x's last dimension, {h}) must be a positive multiple of {HIDDEN_ALIGN}, at most {MAX_HIDDEN}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name}: x may have at most {MAX_ROWS} rows (T; the kernels index rows with int32), got {x.shape[0]}")
    if not any(x.dtype == d for d in x_dtypes):
        raise ValueError(f"{name}: x must be {' or '.join(np.dtype(d).name for d in x_dtypes)}, got {x.dtype}")
    psum = ops.get("psum")
    if psum is not None and (psum.ndim != 1 or psum.dtype != jnp.int32 or not 1 <= psum.shape[0] < 1 << 16):
        raise ValueError(f"{name}: psum_num_tokens_per_expert must be int32 [E] with 1 <= E < 65536, got {psum.dtype} {psum.shape}")
    weights = ops.get("weights")
    if weights is not None and (weights.shape != (x.shape[0],) or weights.dtype != jnp.float32):
        raise ValueError(f"{name}: topk_weights must be float32 [T] = [{x.shape[0]}], got {weights.dtype} {weights.shape}")
    static_number(name, "routed_scaling_factor", routed_scaling_factor)
    static_number(name, "clamp_value", clamp_value, positive=True)
    alignment = static_int(name, "token_alignment", token_alignment)
    if not 1 <= alignment <= MAX_ALIGNMENT:
        raise ValueError(f"{name}: token_alignment must be a positive integer, at most {MAX_ALIGNMENT}, got {alignment}")
    return h


def check_fmt(name: str, fmt, choices=tuple(OUT_DTYPES)) -> str:
    """``fmt`` is one of the strings ``choices`` (ValueError naming the op otherwise)."""
    if not (isinstance(fmt, str) and fmt in choices):
        raise ValueError(f"{name}: fmt must be {' or '.join(repr(c) for c in choices)}, got {fmt!r:.60}")
    return fmt


def check_cast(name: str, h: int, fmt: str, num_per_channels: int, layout: str, allowed=(32, 128), whole_row: bool = True) -> None:
    check_fmt(name, fmt, ("e4m3",))
    num_per_channels = static_int(name, "num_per_channels", num_per_channels)
    ok = num_per_channels in allowed or (whole_row and num_per_channels == h)
    if not ok:
        rule = f"one of {allowed}" + (f" or H ({h})" if whole_row else "")
        raise ValueError(f"{name}: num_per_channels must be {rule}, got {num_per_channels}")
    if h % num_per_channels:
        raise ValueError(f"{name}: H ({h}) must be a multiple of num_per_channels ({num_per_channels})")
    if num_per_channels not in allowed and layout != "row":
        raise ValueError(f"{name}: whole-row scales (num_per_channels == H) need row-major scale factors")


def dummy(dtype) -> jax.ShapeDtypeStruct:
    """A 1-element workspace bound to a kernel tensor parameter the call does not use."""
    return jax.ShapeDtypeStruct((1,), dtype)


def words(shape, dtype) -> View:
    """A ``[rows, n]`` array seen as uint32 words ``[rows, n·bits/32]``."""
    return View((shape[0], shape[1] * np.dtype(dtype).itemsize // 4), dtype=np.uint32)


def bind(kernel_params: list[tuple[str, str, Optional[int]]], num_operands: int, results: list, workspace: list):
    """Launch.buffers for kernel parameters given as (name, source, index): source "op" (operand
    index), "out" (result index) or "none" (a dummy workspace of the given dtype)."""
    buffers, ws = {}, list(workspace)
    num_results = len(results)
    for name, source, value in kernel_params:
        if source == "op":
            buffers[name] = value
        elif source == "out":
            buffers[name] = num_operands + value
        else:
            buffers[name] = num_operands + num_results + len(ws)
            ws.append(dummy(value))
    return buffers, tuple(ws)


def scalar(value) -> float:
    return float(_F32(0.0 if value is None else value))


def persistent_ctas(rows: int) -> int:
    """CTAs of a persistent row kernel (a launch-time value, not part of the compiled kernel):
    ``BLOCKS_PER_SM`` per multiprocessor of the GPU being compiled for, fewer for few rows. Every
    row's result is independent of it, so every GPU computes the same bits with the same cubin."""
    return min(F.ceil_div(rows, WARPS), platform.target_num_sms() * BLOCKS_PER_SM, MAX_CTAS)


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_check(x, *extra, names, fmt, npc=0, layout=None, round_sf=False, rsf=None, clamp=None, count=False, alignment=TOKEN_ALIGNMENT):
    ops = unpack_operands(extra, names)
    name = "swiglu_forward_and_per_token_cast" if fmt == "e4m3" else "swiglu_forward"
    h = check_common(name, x, ops, routed_scaling_factor=rsf, clamp_value=clamp, token_alignment=alignment)
    if fmt == "e4m3":
        check_cast(name, h, fmt, npc, layout)
    else:
        check_fmt(name, fmt)


def _fwd_reference(x, *extra, names, fmt, npc=0, layout=None, round_sf=False, rsf=None, clamp=None, count=False, alignment=TOKEN_ALIGNMENT):
    ops = unpack_operands(extra, names)
    act, valid = forward_act(x, psum=ops.get("psum"), topk_weights=ops.get("weights"), routed_scaling_factor=rsf, clamp_value=clamp, token_alignment=alignment)
    if fmt == "e4m3":
        data, sf = F.quantize_blocks(act, "e4m3", (1, npc), round_sf=round_sf)
        if valid is not None:
            data = jnp.where(valid[:, None], data, jnp.zeros((), data.dtype))
            sf = jnp.where(valid[:, None], sf, _F32(0.0))
        out = (data, F.store_sf(sf, layout))
    else:
        out = (act.astype(OUT_DTYPES[fmt]),)
    if count:
        out = out + (clamped_count(x, valid, clamp),)
    return out if len(out) > 1 else out[0]


def _fwd_launch(x, *extra, names, fmt, npc=0, layout=None, round_sf=False, rsf=None, clamp=None, count=False, alignment=TOKEN_ALIGNMENT):
    t, h = x.shape[0], x.shape[1] // 2
    cast = fmt == "e4m3"
    index = {n: i + 1 for i, n in enumerate(names)}
    params = [("x", "op", 0)]
    params.append(("ps", "op", index["psum"]) if "psum" in names else ("ps", "none", np.int32))
    params.append(("tw", "op", index["weights"]) if "weights" in names else ("tw", "none", np.float32))
    params.append(("y", "out", 0))
    params.append(("sf", "out", 1) if cast else ("sf", "none", np.float32))
    n_results = 2 if cast else 1
    params.append(("cnt", "out", n_results) if count else ("cnt", "none", np.int32))
    results = [None] * (n_results + int(count))
    buffers, workspace = bind(params, 1 + len(names), results, [])
    out_dtype = jnp.float8_e4m3fn if cast else OUT_DTYPES[fmt]
    return Launch(
        kernel=swiglu_forward_kernel,
        params=dict(
            hidden=h, in_dtype=np.dtype(x.dtype).name, out_kind=fmt, npc=npc if cast else 0,
            layout=layout if cast else None, round_sf=bool(round_sf), psum="psum" in names, alignment=int(alignment),
            weights="weights" in names, rsf=rsf is not None, clamp=clamp is not None, count=bool(count),
        ),  # fmt: skip
        scalars=dict(clamp_value=scalar(clamp), scaling=scalar(rsf), num_ctas=persistent_ctas(F.align(t, 4) if cast and layout != "row" else t)),
        buffers=buffers,
        views={"x": words(x.shape, x.dtype), "y": words((t, h), out_dtype)},
        workspace=workspace,
        zero_fill=(n_results,) if count else (),
    )


swiglu_forward_op = TileOp(name="swiglu_forward", launch=_fwd_launch, reference=_fwd_reference, check=_fwd_check)


def swiglu_forward(
    x: jax.Array,
    fmt: str = "bf16",
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    topk_weights: Optional[jax.Array] = None,
    routed_scaling_factor: Optional[float] = None,
    clamp_value: Optional[float] = None,
    with_clamped_count: bool = False,
    token_alignment: int = TOKEN_ALIGNMENT,
    *,
    impl=None,
):
    """SwiGLU forward (TileKernels v2.1 ``swiglu_forward``): ``silu(l) · r · w``.

    Args:
      x: ``[T, 2H]`` bf16 or fp32, H a multiple of 64.
      fmt: output dtype, ``"bf16"`` or ``"fp32"``.
      psum_num_tokens_per_expert: int32 ``[E]``, nondecreasing inclusive ends of the experts' row
        segments (the psum layout; see the module docstring). Padding rows give zeros.
      topk_weights: float32 ``[T]``, one weight per row. routed_scaling_factor: a float factor.
      clamp_value: a positive float: ``l = min(l, c)``, ``r = clamp(r, -c, c)`` before the product.
      with_clamped_count: also return int32 ``[4]``: #(l > c), #(r > c), #(r < -c) over valid rows,
        and the number of valid activations (valid rows × H). (TileKernels accumulates int64 into a
        caller's buffer; here a fresh int32 array is returned: JAX disables int64 by default.)
      token_alignment: alignment of the experts' first rows (TileKernels' global, default 128).
      impl: None, ``"tilelang"`` or ``"xla"``.

    Returns:
      ``[T, H]`` in ``fmt`` (or ``(out, clamped_count)``), bit-exact with the reference.
    """
    op = "swiglu_forward"
    check_impl(op, impl)
    check_fmt(op, fmt)
    x, psum, weights = operands(op, x, psum_num_tokens_per_expert, topk_weights)
    extra, names = pack_operands(("psum", psum), ("weights", weights))
    return swiglu_forward_op(
        x, *extra, impl=impl, names=names, fmt=fmt, rsf=static_number(op, "routed_scaling_factor", routed_scaling_factor),
        clamp=static_number(op, "clamp_value", clamp_value, positive=True), count=static_bool(op, "with_clamped_count", with_clamped_count),
        alignment=static_int(op, "token_alignment", token_alignment),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Backward.

_KIND = {np.dtype(jnp.bfloat16): "bf16", np.dtype(jnp.float32): "fp32", np.dtype(jnp.float8_e4m3fn): "e4m3"}


def dequantize_input(x, x_sf, num_per_channels: int, x_layout: str) -> jax.Array:
    """e4m3 ``[T, 2H]`` times its per-token (1, npc) scales stored in ``x_layout`` -> fp32."""
    t, w = x.shape
    sf = F.load_sf(x_sf, x_layout, (t, w // num_per_channels))
    return _mul(x.astype(jnp.float32), F.expand_blocks(sf, (1, num_per_channels), x.shape))


def _bwd_check(x, g, *extra, names, grad_fmt, npc=0, x_layout=None, cast=False, layout=None, round_sf=False, rsf=None, clamp=None, recompute=False, act_fmt="bf16", alignment=TOKEN_ALIGNMENT):
    ops = unpack_operands(extra, names)
    quantized = "x_sf" in names
    name = "swiglu_backward_and_per_token_cast" if quantized else "swiglu_backward"
    x_dtypes = (jnp.float8_e4m3fn,) if quantized else IN_DTYPES
    h = check_common(name, x, ops, routed_scaling_factor=rsf, clamp_value=clamp, token_alignment=alignment, x_dtypes=x_dtypes)
    if g.shape != (x.shape[0], h) or not any(g.dtype == d for d in IN_DTYPES):
        raise ValueError(f"{name}: act_x_grad must be bf16 or fp32 [T, H] = [{x.shape[0]}, {h}], got {g.dtype} {g.shape}")
    check_fmt(name, grad_fmt)
    check_fmt(name, act_fmt)
    if quantized or cast:
        check_cast(name, h, "e4m3", npc, layout or "row", whole_row=False)
    if quantized:
        shape, dtype = F.sf_storage_shape(x_layout, (x.shape[0], 2 * h // npc))
        x_sf = ops["x_sf"]
        if x_sf.shape != shape or x_sf.dtype != dtype:
            raise ValueError(f"{name}: x's scale factors in layout {x_layout!r} must be {np.dtype(dtype).name} {shape}, got {x_sf.dtype} {x_sf.shape}")


def _bwd_reference(x, g, *extra, names, grad_fmt, npc=0, x_layout=None, cast=False, layout=None, round_sf=False, rsf=None, clamp=None, recompute=False, act_fmt="bf16", alignment=TOKEN_ALIGNMENT):
    ops = unpack_operands(extra, names)
    xf = dequantize_input(x, ops["x_sf"], npc, x_layout) if "x_sf" in names else x.astype(jnp.float32)
    psum, weights = ops.get("psum"), ops.get("weights")
    grad, weight_grad, act = backward_reference(xf, g, psum=psum, topk_weights=weights, routed_scaling_factor=rsf, clamp_value=clamp, token_alignment=alignment)
    out = [grad.astype(OUT_DTYPES[grad_fmt])]
    if cast:
        data, sf = F.quantize_blocks(grad, "e4m3", (1, npc), round_sf=round_sf)
        valid = valid_rows(x.shape[0], psum, alignment)
        if valid is not None:
            data = jnp.where(valid[:, None], data, jnp.zeros((), data.dtype))
            sf = jnp.where(valid[:, None], sf, _F32(0.0))
        out.append((data, F.store_sf(sf, layout)))
    if weight_grad is not None:
        out.append(weight_grad)
    if recompute:
        out.append(act.astype(OUT_DTYPES[act_fmt]))
    return tuple(out)


def _bwd_launch(x, g, *extra, names, grad_fmt, npc=0, x_layout=None, cast=False, layout=None, round_sf=False, rsf=None, clamp=None, recompute=False, act_fmt="bf16", alignment=TOKEN_ALIGNMENT):
    t, h = x.shape[0], x.shape[1] // 2
    index = {n: i + 2 for i, n in enumerate(names)}
    weights = "weights" in names

    def operand(param, name, dtype):
        return (param, "op", index[name]) if name in names else (param, "none", dtype)

    params = [("x", "op", 0), operand("xsf", "x_sf", np.float32), operand("ps", "psum", np.int32), operand("tw", "weights", np.float32), ("g", "op", 1)]
    results = [("dx", (t, 2 * h), OUT_DTYPES[grad_fmt])]
    if cast:
        results += [("dq", (t, 2 * h), jnp.float8_e4m3fn), ("dsf", None, None)]
    if weights:
        results.append(("wg", None, None))
    if recompute:
        results.append(("act", (t, h), OUT_DTYPES[act_fmt]))
    position = {name: i for i, (name, _, _) in enumerate(results)}
    for param, dtype in (("dx", None), ("dq", np.uint32), ("dsf", np.float32), ("wg", np.float32), ("act", np.uint32)):
        params.append((param, "out", position[param]) if param in position else (param, "none", dtype))
    buffers, workspace = bind(params, 2 + len(names), results, [])
    views = {"x": words(x.shape, x.dtype), "g": words(g.shape, g.dtype)}
    views.update({name: words(shape, dtype) for name, shape, dtype in results if shape is not None})
    if cast and layout == "col_ue8m0":
        (kw, tp), _ = F.sf_storage_shape(layout, (t, 2 * h // npc))
        views["dsf"] = View((kw, tp, 4), dtype=np.uint8)
    return Launch(
        kernel=swiglu_backward_kernel,
        params=dict(
            hidden=h, x_kind=_KIND[np.dtype(x.dtype)], g_kind=_KIND[np.dtype(g.dtype)], grad_kind=grad_fmt,
            npc=npc if ("x_sf" in names or cast) else 0, x_layout=x_layout if "x_sf" in names else None, cast=bool(cast),
            layout=layout if cast else None, round_sf=bool(round_sf), psum="psum" in names, alignment=int(alignment),
            weights=weights, rsf=rsf is not None, clamp=clamp is not None, recompute=bool(recompute), act_kind=act_fmt,
        ),  # fmt: skip
        scalars=dict(clamp_value=scalar(clamp), scaling=scalar(rsf), num_ctas=persistent_ctas(F.align(t, 4) if cast and layout != "row" else t)),
        buffers=buffers,
        views=views,
        workspace=workspace,
    )


swiglu_backward_op = TileOp(name="swiglu_backward", launch=_bwd_launch, reference=_bwd_reference, check=_bwd_check)


def swiglu_backward(
    x: jax.Array,
    act_x_grad: jax.Array,
    fmt: str = "bf16",
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    topk_weights: Optional[jax.Array] = None,
    routed_scaling_factor: Optional[float] = None,
    clamp_value: Optional[float] = None,
    token_alignment: int = TOKEN_ALIGNMENT,
    do_recompute: bool = False,
    *,
    impl=None,
):
    """SwiGLU backward (TileKernels v2.1 ``swiglu_backward``).

    With ``s = 1 / (1 + exp(-l'))`` of the clamped ``l'``, ``r'`` and ``w = topk_weights ·
    routed_scaling_factor``, in TileKernels' operation order: ``gs = (g·w)·s``, ``dl = (gs·r')·fma(l',
    1 - s, 1)`` (one rounding; 0 where ``l > c``), ``dr = gs·l'`` (0 where ``|r| > c``), ``weight_grad
    = rsf · Σ_h g · silu(l')·r'``.

    Args:
      x: ``[T, 2H]`` bf16 or fp32 (the forward's input). act_x_grad: ``[T, H]`` bf16 or fp32.
      fmt: dtype of the gradient (and of the recomputed activation), ``"bf16"`` or ``"fp32"``.
      psum_num_tokens_per_expert, topk_weights, routed_scaling_factor, clamp_value,
        token_alignment: as in :func:`swiglu_forward`.
      do_recompute: also return the forward's output (weighted activation).

    Returns:
      ``x_grad [T, 2H]``, or a tuple ``(x_grad, weight_grad fp32 [T] if topk_weights, act_out
      [T, H] if do_recompute)``. Zeros on padding rows. All but ``weight_grad`` are bit-exact with
      the reference; ``weight_grad`` sums in another order (relative differences ~1e-6).
    """
    op = "swiglu_backward"
    check_impl(op, impl)
    check_fmt(op, fmt)
    x, psum, weights = operands(op, x, psum_num_tokens_per_expert, topk_weights)
    extra, names = pack_operands(("psum", psum), ("weights", weights))
    out = swiglu_backward_op(
        x, as_array(op, "act_x_grad", act_x_grad), *extra, impl=impl, names=names, grad_fmt=fmt,
        rsf=static_number(op, "routed_scaling_factor", routed_scaling_factor), clamp=static_number(op, "clamp_value", clamp_value, positive=True),
        recompute=static_bool(op, "do_recompute", do_recompute), act_fmt=fmt, alignment=static_int(op, "token_alignment", token_alignment),
    )  # fmt: skip
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------
# One differentiable SwiGLU.


def _swiglu_primal(x, topk_weights, psum, *, impl=None, fmt=None, rsf=None, clamp=None, alignment=TOKEN_ALIGNMENT):
    fmt = fmt or _KIND[np.dtype(x.dtype)]
    return swiglu_forward(x, fmt, psum, topk_weights, rsf, clamp, token_alignment=alignment, impl=impl)


def _swiglu_fwd(x, topk_weights, psum, *, impl=None, fmt=None, rsf=None, clamp=None, alignment=TOKEN_ALIGNMENT):
    out = _swiglu_primal(x, topk_weights, psum, impl=impl, fmt=fmt, rsf=rsf, clamp=clamp, alignment=alignment)
    return out, (x, topk_weights, psum)


def _swiglu_bwd(residuals, g, *, impl=None, fmt=None, rsf=None, clamp=None, alignment=TOKEN_ALIGNMENT):
    x, topk_weights, psum = residuals
    out = swiglu_backward(x, g, _KIND[np.dtype(x.dtype)], psum, topk_weights, rsf, clamp, alignment, impl=impl)
    if topk_weights is None:
        return out, None, None
    x_grad, weight_grad = out
    return x_grad, weight_grad, None


_swiglu = with_vjp(_swiglu_primal, _swiglu_fwd, _swiglu_bwd)


def swiglu(
    x: jax.Array,
    topk_weights: Optional[jax.Array] = None,
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    *,
    routed_scaling_factor: Optional[float] = None,
    clamp_value: Optional[float] = None,
    token_alignment: int = TOKEN_ALIGNMENT,
    fmt: Optional[str] = None,
    impl=None,
) -> jax.Array:
    """Differentiable SwiGLU: :func:`swiglu_forward` forward, :func:`swiglu_backward` backward.

    Gradients flow to ``x`` and ``topk_weights`` (not to the psum layout). ``fmt`` is the output
    dtype (default: x's). With ``impl="xla"`` JAX differentiates the reference instead; there the
    clamp's gradient at ``l == c`` is JAX's (half) rather than the kernel's (full).
    """
    op = "swiglu"
    check_impl(op, impl)
    x, psum, weights = operands(op, x, psum_num_tokens_per_expert, topk_weights)
    rsf, clamp = static_number(op, "routed_scaling_factor", routed_scaling_factor), static_number(op, "clamp_value", clamp_value, positive=True)
    check_common(op, x, {"psum": psum, "weights": weights}, routed_scaling_factor=rsf, clamp_value=clamp, token_alignment=token_alignment)
    if fmt is not None:
        check_fmt(op, fmt)
    return _swiglu(x, weights, psum, impl=impl, fmt=fmt, rsf=rsf, clamp=clamp, alignment=int(token_alignment))
