"""The SwiGLU references: pure JAX, differentiable, bit-exact with the kernels (TileKernels v1 §2.10,
v2.1 §1.4/§2.3; the semantics are in :mod:`jax_tilek.swiglu`).

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
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats as F

TOKEN_ALIGNMENT = 128  # TileKernels v2.1's default per-expert alignment of the psum layout
OUT_DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}  # the un-quantized outputs' fmt
KINDS = {np.dtype(jnp.bfloat16): "bf16", np.dtype(jnp.float32): "fp32", np.dtype(jnp.float8_e4m3fn): "e4m3"}

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


def backward_f32(x_f32, g, *, psum=None, topk_weights=None, routed_scaling_factor=None, clamp_value=None, token_alignment=TOKEN_ALIGNMENT):
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


def dequantize_input(x, x_sf, num_per_channels: int, x_sf_layout: str) -> jax.Array:
    """e4m3 ``[T, 2H]`` times its per-token (1, npc) scales stored in ``x_sf_layout`` -> fp32."""
    t, w = x.shape
    sf = F.load_sf(x_sf, x_sf_layout, (t, w // num_per_channels))
    return _mul(x.astype(jnp.float32), F.expand_blocks(sf, (1, num_per_channels), x.shape))


def per_token_cast(v, valid, num_per_channels: int, sf_layout: str, round_sf: bool) -> tuple[jax.Array, jax.Array]:
    """fp32 ``v[T, W]`` cast to e4m3 in (1, npc) blocks: ``(data, sf stored in sf_layout)``, zero data
    and zero scales on padding rows (``valid`` False; None: every row is valid)."""
    data, sf = F.quantize_blocks(v, "e4m3", (1, num_per_channels), round_sf=round_sf)
    if valid is not None:
        data = jnp.where(valid[:, None], data, jnp.zeros((), data.dtype))
        sf = jnp.where(valid[:, None], sf, _F32(0.0))
    return data, F.store_sf(sf, sf_layout)


def forward_reference(x, psum, topk_weights, *, fmt: str, num_per_channels: int = 0, sf_layout: Optional[str] = None,
                      round_sf: bool = False, routed_scaling_factor=None, clamp_value=None, with_clamped_count: bool = False,
                      token_alignment: int = TOKEN_ALIGNMENT):  # fmt: skip
    """The forward op: ``act`` in ``fmt`` ("bf16", "fp32"), or for "e4m3" ``(data, sf)`` of its per-token
    cast, plus the clamp counts if asked; a single result unwrapped."""
    act, valid = forward_act(x, psum=psum, topk_weights=topk_weights, routed_scaling_factor=routed_scaling_factor,
                             clamp_value=clamp_value, token_alignment=token_alignment)  # fmt: skip
    out = per_token_cast(act, valid, num_per_channels, sf_layout, round_sf) if fmt == "e4m3" else (act.astype(OUT_DTYPES[fmt]),)
    if with_clamped_count:
        out = out + (clamped_count(x, valid, clamp_value),)
    return out if len(out) > 1 else out[0]


def backward_reference(x, act_x_grad, x_sf, psum, topk_weights, *, fmt: str, num_per_channels: int = 0,
                       x_sf_layout: Optional[str] = None, sf_layout: Optional[str] = None, round_sf: bool = False,
                       routed_scaling_factor=None, clamp_value=None, do_recompute: bool = False, with_weight_grad: bool = False,
                       token_alignment: int = TOKEN_ALIGNMENT) -> tuple:  # fmt: skip
    """The backward op: ``(x_grad, (data, sf) of its per-token cast if sf_layout, weight_grad if
    topk_weights, act_out if do_recompute)``; x_grad and act_out in ``fmt``. ``x`` is e4m3 with scales
    ``x_sf`` (in ``x_sf_layout``) or bf16 / fp32 (``x_sf`` None). ``with_weight_grad`` states that
    topk_weights is given (the op names its results from the statics)."""
    xf = x.astype(jnp.float32) if x_sf is None else dequantize_input(x, x_sf, num_per_channels, x_sf_layout)
    grad, weight_grad, act = backward_f32(xf, act_x_grad, psum=psum, topk_weights=topk_weights, routed_scaling_factor=routed_scaling_factor,
                                          clamp_value=clamp_value, token_alignment=token_alignment)  # fmt: skip
    out = [grad.astype(OUT_DTYPES[fmt])]
    if sf_layout is not None:
        valid = valid_rows(x.shape[0], psum, token_alignment)
        out.append(per_token_cast(grad, valid, num_per_channels, sf_layout, round_sf))
    if weight_grad is not None:
        out.append(weight_grad)
    if do_recompute:
        out.append(act.astype(OUT_DTYPES[fmt]))
    return tuple(out)
