"""SwiGLU family (jax_tilek.swiglu): the op contract over every function's named cases; references
against independent numpy arithmetic and float64 math, rules, gradients, cross-lowering, and the GPU
kernels bit for bit."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_tilek
from jax_tilek.quant import formats as F
from jax_tilek.swiglu import (
    exp_f32,
    fma_f32,
    silu_parts,
    swiglu,
    swiglu_backward,
    swiglu_backward_and_per_token_cast,
    swiglu_backward_kernel,
    swiglu_forward,
    swiglu_forward_and_per_channel_cast_and_transpose,
    swiglu_forward_and_per_token_cast,
    swiglu_forward_kernel,
    swiglu_per_channel_cast_kernel,
    valid_rows,
)
from jax_tilek.testing import OpContract, assert_bytes_equal, decode_record, lower_for_cuda, tilek_calls
from quant.quant_testing import calc_diff, np_load_sf, np_store_sf  # tests/quant's numpy helpers (tests/ is on the path)

f32 = np.float32
BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
OUT_DTYPE = {"bf16": BF16, "fp32": f32}
LAYOUT_FLAGS = {  # layout -> (use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    "row": (False, False, False),
    "row_round": (False, False, True),
    "col": (True, False, False),
    "col_ue8m0": (True, True, True),
}

# jax_tilek's fp32 exp (jax_tilek.swiglu.exp_f32): the Cody-Waite ln2 split, the rint shifter, a
# degree-6 polynomial (doubled, in Horner order), the clamp to [-32, 87]; silu's argument floor.
LOG2E, LN2_HI, LN2_LO, SHIFTER = f32(1.4426950408889634), f32(0.693145751953125), f32(1.428606765330187e-06), f32(12582912.0)
EXP_POLY2 = tuple(f32(2 * f32(c)) for c in reversed((1.0, 1.0, 0.4999999, 0.1666642, 0.04166823, 0.0083749, 0.00138367)))
EXP_MIN, EXP_MAX, SILU_MIN = f32(-32.0), f32(87.0), f32(-87.0)
SCALE_BIAS = (126 - 0x4B400000) & 0xFFFFFFFF  # bits(k + SHIFTER) + SCALE_BIAS == k + 126 (mod 2^32)
WARPS, BLOCKS_PER_SM = 8, 4  # the row kernels' CTA: 8 warps (a row each), 4 resident per SM


def _layout(name):
    return "row" if name == "row_round" else name


def _sf_layout(options) -> str:
    """The scale layout a case's flags name."""
    return F.sf_layout(options["use_tma_aligned_col_major_sf"], options["use_packed_ue8m0"], options["round_sf"])


# ---------------------------------------------------------------------------------------------
# The op contract, per public function: row-wise calls (vmap folds into the tokens, which shard)
# and the others (the psum layout, clamp counts, column-major scales; per-channel scales).


def _row_wise(case) -> bool:
    k = case.kwargs
    psum = any(a.dtype == jnp.int32 and a.ndim == 1 for a in case.args)
    return not (psum or k.get("with_clamped_count") or k.get("use_tma_aligned_col_major_sf") or k.get("x_sf_layout", "row") != "row")


def _cases(fn, row_wise: bool) -> list:
    return [c for c in fn.cases if _row_wise(c) == row_wise]


X = jax.ShapeDtypeStruct((64, 2048), jnp.bfloat16)
G = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16)
XQ = jax.ShapeDtypeStruct((64, 2048), jnp.float8_e4m3fn)
XSF = jax.ShapeDtypeStruct((64, 16), jnp.float32)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


class TestSwigluForward(OpContract):
    fn = swiglu_forward
    cases = _cases(swiglu_forward, True)
    rows = True


class TestSwigluForwardRouted(OpContract):
    fn = swiglu_forward
    cases = _cases(swiglu_forward, False)
    bad_inputs = [
        ((_sds((64, 1000), jnp.bfloat16),), {}, ValueError, r"H \(half of x's last dimension, 500\) must be a positive multiple of 64"),
        ((_sds((64, 2049), jnp.bfloat16),), {}, ValueError, r"x must be \[T, 2H\]"),
        ((_sds((64, 256), jnp.float16),), {}, ValueError, "x must be bfloat16 or float32"),
        ((X,), dict(fmt="e4m3"), ValueError, "fmt must be 'bf16' or 'fp32'"),
        ((X,), dict(clamp_value=-1.0), ValueError, "clamp_value must be a positive finite number"),
        ((X,), dict(routed_scaling_factor=float("inf")), ValueError, "routed_scaling_factor must be a finite number"),
        ((X,), dict(token_alignment=0), ValueError, "token_alignment must be a positive integer"),
    ]


class TestSwigluBackward(OpContract):
    fn = swiglu_backward
    cases = _cases(swiglu_backward, True)
    rows = True


class TestSwigluBackwardRouted(OpContract):
    fn = swiglu_backward
    cases = _cases(swiglu_backward, False)
    bad_inputs = [
        ((X, _sds((64, 512), jnp.bfloat16)), {}, ValueError, r"act_x_grad must be bf16 or fp32 \[T, H\]"),
        ((X, G), dict(fmt="e4m3"), ValueError, "fmt must be 'bf16' or 'fp32'"),
    ]


class TestSwigluForwardAndPerTokenCast(OpContract):
    fn = swiglu_forward_and_per_token_cast
    cases = _cases(swiglu_forward_and_per_token_cast, True)
    rows = True


class TestSwigluForwardAndPerTokenCastRouted(OpContract):
    fn = swiglu_forward_and_per_token_cast
    cases = _cases(swiglu_forward_and_per_token_cast, False)
    bad_inputs = [
        ((X,), dict(fmt="e2m1"), ValueError, "fmt must be 'e4m3'"),
        ((X,), dict(num_per_channels=64), ValueError, r"num_per_channels must be one of \(32, 128\) or H \(1024\)"),
        ((X,), dict(num_per_channels=1024, use_tma_aligned_col_major_sf=True), ValueError, "whole-row scales"),
        ((_sds((64, 2 * 576), jnp.bfloat16),), dict(num_per_channels=128), ValueError, r"H \(576\) must be a multiple of num_per_channels \(128\)"),
        ((X,), dict(use_tma_aligned_col_major_sf=True, use_packed_ue8m0=True), ValueError, "use_packed_ue8m0 needs round_sf=True"),
    ]


class TestSwigluBackwardAndPerTokenCast(OpContract):
    fn = swiglu_backward_and_per_token_cast
    cases = _cases(swiglu_backward_and_per_token_cast, True)
    rows = True


class TestSwigluBackwardAndPerTokenCastRouted(OpContract):
    fn = swiglu_backward_and_per_token_cast
    cases = _cases(swiglu_backward_and_per_token_cast, False)
    bad_inputs = [
        (((X, XSF), G), {}, ValueError, "x must be float8_e4m3fn"),
        (((XQ, _sds((64, 15), jnp.float32)), G), {}, ValueError, r"scale factors in layout 'row' must be float32 \(64, 16\)"),
        (((XQ, XSF), G), dict(num_per_channels=1024), ValueError, r"num_per_channels must be one of \(32, 128\), got 1024"),
        (((XQ, XSF), G), dict(x_sf_layout="ue8m0_along_m"), ValueError, "x_sf_layout must be"),
    ]


class TestSwigluForwardAndPerChannelCast(OpContract):
    """Per-channel scales over blocks of tokens: not row-wise (vmap maps a loop)."""

    fn = swiglu_forward_and_per_channel_cast_and_transpose
    bad_inputs = [
        ((_sds((100, 2048), jnp.bfloat16),), {}, ValueError, r"T \(100\) must be a multiple of 128"),
        ((_sds((128, 2048), jnp.float32),), {}, ValueError, "x must be bfloat16"),
        ((_sds((128, 64), jnp.bfloat16),), {}, ValueError, "2H a multiple of 128"),
        ((_sds((128, 2048), jnp.bfloat16),), dict(num_per_tokens=64), ValueError, "num_per_tokens must be 32 or 128"),
    ]


class TestSwiglu(OpContract):
    fn = swiglu
    cases = _cases(swiglu, True)
    rows = True
    differentiable = (0, 1)  # x and topk_weights


class TestSwigluRouted(OpContract):
    fn = swiglu
    cases = _cases(swiglu, False)
    differentiable = (0, 1)


# ---------------------------------------------------------------------------------------------
# Independent numpy arithmetic (float32 numpy never fuses or reassociates).


@np.errstate(over="ignore")
def np_exp(t):
    t = np.clip(np.asarray(t, f32), EXP_MIN, EXP_MAX)
    y = t * LOG2E + SHIFTER
    k = y - SHIFTER
    r = (t - k * LN2_HI) - k * LN2_LO
    p = np.full_like(r, EXP_POLY2[0])
    for c in EXP_POLY2[1:]:
        p = p * r + c
    scale = ((y.view(np.uint32) + np.uint32(SCALE_BIAS)) << np.uint32(23)).view(f32)
    return p * scale


def np_valid(t, psum, align):
    if psum is None:
        return np.ones(t, bool)
    valid, prev = np.zeros(t, bool), 0
    for end in np.asarray(psum):
        start = -(-prev // align) * align
        valid[start:max(int(end), start)] = True
        prev = int(end)
    return valid


def np_weights(t, weights, rsf):
    if weights is None and rsf is None:
        return None
    w = np.ones(t, f32) if weights is None else np.asarray(weights, f32)
    return w if rsf is None else w * f32(rsf)


def np_clamp(l, r, clamp):
    if clamp is None:
        return l, r
    c = f32(clamp)
    return np.minimum(l, c), np.minimum(np.maximum(r, -c), c)


def np_forward(x, psum=None, weights=None, rsf=None, clamp=None, align=128):
    """fp32 act [T, H] (zero on padding rows), valid [T]."""
    x = np.asarray(x).astype(f32)
    h = x.shape[1] // 2
    l, r = np_clamp(x[:, :h], x[:, h:], clamp)
    l = np.maximum(l, SILU_MIN)
    act = (l / (f32(1) + np_exp(-l))) * r
    w = np_weights(x.shape[0], weights, rsf)
    if w is not None:
        act = act * w[:, None]
    valid = np_valid(x.shape[0], psum, align)
    return np.where(valid[:, None], act, f32(0)), valid


def np_counts(x, valid, clamp):
    x = np.asarray(x).astype(f32)
    h = x.shape[1] // 2
    l, r = x[valid, :h], x[valid, h:]
    c = f32(clamp) if clamp is not None else None
    counts = [0, 0, 0] if c is None else [(l > c).sum(), (r > c).sum(), (r < -c).sum()]
    return np.array([*counts, valid.sum() * h], np.int32)


def np_pow2_ceil(sf):
    m, e = np.frexp(sf.astype(np.float64))
    e = np.where(m == 0.5, e - 1, e)  # exact powers of two keep their exponent
    return e.astype(np.int32)


def np_quantize(v, block, round_sf):
    """(e4m3 data, fp32 logical sf) of ``v`` in ``block`` tiles (tiles divide the shape)."""
    t, h = v.shape
    bm, bk = block
    amax = np.abs(v).reshape(t // bm, bm, h // bk, bk).max(axis=(1, 3)).astype(f32)
    a = np.maximum(amax, f32(1e-4))
    sf = a / f32(448)
    if round_sf:
        e = np_pow2_ceil(sf)
        sf, inv = np.ldexp(f32(1), e).astype(f32), np.ldexp(f32(1), -e).astype(f32)
    else:
        inv = f32(448) / a
    scaled = v * np.repeat(np.repeat(inv, bm, 0), bk, 1)
    return np.clip(scaled, -448, 448).astype(E4M3), sf


def np_cast(act, valid, npc, layout, round_sf):
    data, sf = np_quantize(act, (1, npc), round_sf)
    data[~valid] = 0
    sf[~valid] = 0
    return data, np_store_sf(sf, layout)


def np_fma(a, b, c):
    """float32 ``a * b + c`` rounded once: the exact product in float64 (24 + 24 bits fit in 53), the
    sum rounded to odd in float64 (nearest, then to the odd neighbour when inexact), then rounded to
    float32 (rounding to odd with 29 extra bits first makes the double rounding exact)."""
    a, b, c = (np.asarray(v, f32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    v = s - p
    err = (p - (s - v)) + (c - v)  # TwoSum: s + err == p + c exactly
    bits = s.view(np.int64)
    odd = np.where((err != 0) & (s != 0) & (bits % 2 == 0), bits + np.where((err < 0) == (s < 0), 1, -1), bits)
    return odd.view(np.float64).astype(f32)


def np_backward(xf, g, psum=None, weights=None, rsf=None, clamp=None, align=128):
    """fp32 (x_grad [T, 2H], weight_grad [T] or None (float64 sum), act_out [T, H]).

    TileKernels' operation order (torch/swiglu.py and the kernels, v1 and v2.1): ``gs = (g·w)·s``,
    ``dl = (gs·r)·fma(l, 1 - s, 1)``, ``dr = gs·l``."""
    t, h = xf.shape[0], xf.shape[1] // 2
    l0, r0 = xf[:, :h], xf[:, h:]
    g = np.asarray(g).astype(f32)
    l, r = np_clamp(l0, r0, clamp)
    l = np.maximum(l, SILU_MIN)
    d = f32(1) + np_exp(-l)
    silu, s = l / d, f32(1) / d
    w = np_weights(t, weights, rsf)
    gs = (g if w is None else g * w[:, None]) * s
    dl = (gs * r) * np_fma(l, f32(1) - s, f32(1))
    dr = gs * l
    if clamp is not None:
        c = f32(clamp)
        dl = np.where(l0 > c, f32(0), dl)
        dr = np.where((r0 > c) | (r0 < -c), f32(0), dr)
    act = silu * r
    act_out = act if w is None else act * w[:, None]
    valid = np_valid(t, psum, align)
    grad = np.where(valid[:, None], np.concatenate([dl, dr], 1), f32(0))
    wg = None
    if weights is not None:
        wg = (g.astype(np.float64) * act.astype(np.float64)).sum(1) * (1.0 if rsf is None else float(f32(rsf)))
        wg = np.where(valid, wg, 0.0)
    return grad, wg, np.where(valid[:, None], act_out, f32(0)), valid


# ---------------------------------------------------------------------------------------------
# Inputs.


def make_psum(rng, t, num_experts, align):
    """int32 [E]: random segment lengths (one expert empty), padded to ``align``, ending <= t."""
    counts = rng.integers(0, max(t // num_experts, 1) + 1, num_experts)
    counts[rng.integers(num_experts)] = 0
    psum, prev = [], 0
    for n in counts:
        start = -(-prev // align) * align
        end = min(start + int(n), t)
        end = max(end, prev)
        psum.append(end)
        prev = end
    return np.array(psum, np.int32)


def make_x(rng, t, h, dtype=BF16, scale=2.0):
    x = rng.standard_normal((t, 2 * h), dtype=np.float32) * scale
    x[rng.random((t, 2 * h)) < 0.02] *= 8  # some large values: clamps, saturated silu
    return x.astype(dtype)


def make_inputs(rng, t, h, *, dtype=BF16, psum=False, weights=False, align=16):
    x = make_x(rng, t, h, dtype)
    ps = make_psum(rng, t, 5, align) if psum else None
    w = rng.uniform(0.05, 1.0, t).astype(f32) if weights else None
    return x, ps, w


SLOPE_ROOT = f32(-1.278464542761074)  # silu'(l) = s·(1 + l·(1 - s)) vanishes: 1 + l·(1 - s) cancels


def make_cancelling_x(rng, t, h, share=0.5):
    """fp32 x [T, 2H] whose left half is, in ``share`` of the places, within 4096 ulps of the root of
    ``1 + l·(1 - s)`` (where the rounding order of the backward matters most), else random."""
    x = make_x(rng, t, h, np.float32)
    near = rng.random((t, h)) < share
    bits = SLOPE_ROOT.view(np.int32) + rng.integers(-4096, 4097, (t, h)).astype(np.int32)
    x[:, :h] = np.where(near, bits.view(f32), x[:, :h])
    return x


def np_backward_previous_order(xf, g, w):
    """x_grad in the operation order jax_tilek used before matching TileKernels (for a sensitivity
    check): ``dl = (((g·w)·r)·s)·(1 + l·(1 - s))``, ``dr = (g·w)·(l / d)``; no clamp, no psum."""
    h = xf.shape[1] // 2
    l, r = np.maximum(xf[:, :h], SILU_MIN), xf[:, h:]
    d = f32(1) + np_exp(-l)
    s = f32(1) / d
    gw = g if w is None else g * w[:, None]
    return np.concatenate([((gw * r) * s) * (f32(1) + l * (f32(1) - s)), gw * (l / d)], 1)


def host(fn, *args):
    """Runs ``fn`` under jit on the host CPU (expected values in GPU tests)."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return jax.tree.map(np.asarray, jax.jit(fn)(*[jax.device_put(a, cpu) for a in args]))


# ---------------------------------------------------------------------------------------------
# The shared arithmetic.


def test_exp_is_exact_against_numpy_and_accurate(rng):
    t = np.concatenate([
        np.linspace(-40, 95, 200001, dtype=f32),
        rng.standard_normal(100000).astype(f32) * 30,
        np.array([0, -0.0, 88.72, 88.73, 89, 1e30, -1e30, 2**-30], f32),
    ])  # fmt: skip
    got = np.asarray(jax.jit(exp_f32)(t))
    assert_bytes_equal(got, np_exp(t))
    inside = (t >= -32) & (t <= 87)
    ref = np.exp(t[inside].astype(np.float64))
    ulp = np.abs(got[inside] - ref) / np.spacing(ref.astype(f32)).astype(np.float64)
    assert ulp.max() <= 1.5
    assert np.all(got[t >= 87] == np.asarray(exp_f32(f32(87)))) and np.all(got[t <= -32] == np.asarray(exp_f32(f32(-32))))


def test_silu_matches_float64():
    l = np.linspace(-100, 100, 100001, dtype=f32)
    _, _, silu = jax.jit(silu_parts)(l)
    ref = l.astype(np.float64) / (1 + np.exp(-l.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(silu), ref, rtol=4e-7, atol=2e-36)  # l saturates at -87: silu = -1.4e-36 below


def test_valid_rows_of_the_psum_layout():
    psum = np.array([3, 3, 20, 40, 41], np.int32)  # expert 1 empty; rows 3..15, 20..31, 40 padding
    got = np.asarray(valid_rows(50, jnp.asarray(psum), 16))
    expected = np.zeros(50, bool)
    expected[0:3] = expected[16:20] = expected[32:40] = True
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, np_valid(50, psum, 16))


# ---------------------------------------------------------------------------------------------
# References against numpy and float64.

FWD_CASES = [
    # (t, h, dtype, psum, weights, rsf, clamp)
    (67, 1024, BF16, False, False, None, None),
    (200, 576, BF16, True, True, 2.5, 10.0),
    (130, 1024, np.float32, True, False, None, 0.5),
    (64, 2048, BF16, False, True, None, 0.5),
    (33, 64, np.float32, False, False, 1.5, None),
]


@pytest.mark.parametrize("t,h,dtype,psum,weights,rsf,clamp", FWD_CASES)
def test_forward_reference(rng, t, h, dtype, psum, weights, rsf, clamp):
    x, ps, w = make_inputs(rng, t, h, dtype=dtype, psum=psum, weights=weights)
    for fmt, out_dtype in (("bf16", BF16), ("fp32", f32)):
        fn = functools.partial(swiglu_forward, fmt=fmt, routed_scaling_factor=rsf, clamp_value=clamp, with_clamped_count=True, token_alignment=16, impl="xla")
        out, counts = jax.jit(fn)(x, psum_num_tokens_per_expert=ps, topk_weights=w)
        act, valid = np_forward(x, ps, w, rsf, clamp, 16)
        assert_bytes_equal(np.asarray(out), act.astype(out_dtype))
        np.testing.assert_array_equal(np.asarray(counts), np_counts(x, valid, clamp))
    # and the math, in float64
    xd = np.asarray(x).astype(np.float64)
    l, r = xd[:, :h], xd[:, h:]
    if clamp is not None:
        l, r = np.minimum(l, clamp), np.clip(r, -clamp, clamp)
    exact = l / (1 + np.exp(-l)) * r * (np.ones(t) if w is None else w)[:, None] * (1 if rsf is None else rsf)
    exact[~valid] = 0
    np.testing.assert_allclose(act, exact, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("layout", list(LAYOUT_FLAGS))
@pytest.mark.parametrize("npc", [32, 128, "H"])
def test_forward_and_per_token_cast_reference(rng, layout, npc):
    t, h = 70, 1024
    npc = h if npc == "H" else npc
    if npc == h and _layout(layout) != "row":
        pytest.skip("whole-row scales are row-major only")
    x, ps, w = make_inputs(rng, t, h, psum=True, weights=True)
    col_major, packed, round_sf = LAYOUT_FLAGS[layout]
    fn = functools.partial(
        swiglu_forward_and_per_token_cast, num_per_channels=npc, routed_scaling_factor=0.7, use_tma_aligned_col_major_sf=col_major,
        round_sf=round_sf, use_packed_ue8m0=packed, clamp_value=10.0, with_clamped_count=True, token_alignment=16, impl="xla",
    )  # fmt: skip
    data, sf, counts = jax.jit(fn)(x, psum_num_tokens_per_expert=ps, topk_weights=w)
    act, valid = np_forward(x, ps, w, 0.7, 10.0, 16)
    exp_data, exp_sf = np_cast(act, valid, npc, _layout(layout), round_sf)
    assert_bytes_equal(np.asarray(data), exp_data)
    assert_bytes_equal(np.asarray(sf), exp_sf)
    np.testing.assert_array_equal(np.asarray(counts), np_counts(x, valid, 10.0))
    # dequantized, the cast is close to the activation
    back = np.asarray(data).astype(f32) * np.repeat(np_load_sf(np.asarray(sf), _layout(layout), (t, h // npc)), npc, 1)
    assert calc_diff(back[valid], act[valid]) < 1e-3


@pytest.mark.parametrize("dtype,fmt,psum,weights,rsf,clamp", [
    (BF16, "bf16", True, True, 2.5, 0.5),
    (np.float32, "fp32", False, True, None, 10.0),
    (BF16, "fp32", True, False, 1.5, None),
    (np.float32, "bf16", False, False, None, None),
])  # fmt: skip
def test_backward_reference(rng, dtype, fmt, psum, weights, rsf, clamp):
    t, h = 90, 576
    x, ps, w = make_inputs(rng, t, h, dtype=dtype, psum=psum, weights=weights)
    g = (rng.standard_normal((t, h)) * 0.5).astype(dtype)
    fn = functools.partial(swiglu_backward, fmt=fmt, routed_scaling_factor=rsf, clamp_value=clamp, token_alignment=16, do_recompute=True, impl="xla")
    out = jax.jit(fn)(x, g, psum_num_tokens_per_expert=ps, topk_weights=w)
    grad, wg, act, valid = np_backward(np.asarray(x).astype(f32), g, ps, w, rsf, clamp, 16)
    out_dtype = BF16 if fmt == "bf16" else f32
    assert_bytes_equal(np.asarray(out[0]), grad.astype(out_dtype))
    assert_bytes_equal(np.asarray(out[-1]), act.astype(out_dtype))
    if weights:
        np.testing.assert_allclose(np.asarray(out[1]), wg, rtol=1e-5, atol=1e-5 * np.abs(wg).max())
    else:
        assert len(out) == 2


def test_backward_matches_autodiff_of_the_forward(rng):
    """The closed-form backward against jax.grad of the forward reference (float64 numerics aside)."""
    t, h = 48, 256
    x, ps, w = make_inputs(rng, t, h, dtype=np.float32, psum=True, weights=True)
    g = rng.standard_normal((t, h)).astype(f32)
    kw = dict(routed_scaling_factor=1.7, clamp_value=3.0, token_alignment=16)

    def loss(x, w):
        return jnp.sum(swiglu_forward(x, "fp32", ps, w, impl="xla", **kw) * g)

    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    x_grad, weight_grad = swiglu_backward(x, g, "fp32", ps, w, impl="xla", **kw)
    np.testing.assert_allclose(np.asarray(x_grad), np.asarray(gx), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weight_grad), np.asarray(gw), rtol=1e-5, atol=1e-5)


def test_np_fma_is_one_rounding(rng):
    """The tests' float32 fma against exact rational arithmetic (independent of float64 tricks)."""
    from fractions import Fraction

    a = (rng.standard_normal(3000) * np.exp2(rng.integers(-30, 30, 3000))).astype(f32)
    b = (rng.standard_normal(3000) * np.exp2(rng.integers(-30, 30, 3000))).astype(f32)
    c = np.concatenate([-(a * b)[:1000], np.ones(1000, f32), (rng.standard_normal(1000) * 1e3).astype(f32)])  # cancellation, 1, random
    got = np_fma(a, b, c)
    for i in range(len(a)):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        near = f32(float(exact))
        candidates = [np.nextafter(near, f32(-np.inf)), near, np.nextafter(near, f32(np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.asarray(v).view(np.int32)) & 1))
        assert got[i].view(np.int32) == best.view(np.int32), (a[i], b[i], c[i])


def test_fma_f32_is_one_rounding(rng):
    """The reference's fused multiply-add (fp32 operations only) against the exact one: random
    operands, cancellation, results at rounding ties around 1, and SwiGLU's ``fma(l, 1 - s, 1)``."""
    n = 200000
    a = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(f32)
    b = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(f32)
    tie = 1 + (2 * rng.integers(-2**12, 2**12, n) + 1) * 2.0**-25  # midpoints between floats near 1
    a_tie = rng.uniform(-87, 20, n).astype(f32)
    b_tie = ((tie - 1) / a_tie.astype(np.float64)).astype(f32)
    l = np.concatenate([rng.uniform(-87, 30, n), (SLOPE_ROOT.view(np.int32) + np.arange(-n // 2, n // 2, dtype=np.int32)).view(f32)]).astype(f32)
    _, d, _ = jax.jit(silu_parts)(l)
    one_minus_s = f32(1) - f32(1) / np.asarray(d)
    cases = [
        (a, b, (rng.standard_normal(n) * np.exp2(rng.integers(-40, 40, n))).astype(f32)),
        (a, b, -(a * b)),
        (a_tie, b_tie, np.ones(n, f32)),
        (np.maximum(l, SILU_MIN), one_minus_s, np.ones(2 * n, f32)),
    ]
    fma = jax.jit(fma_f32)
    for x, y, z in cases:
        assert_bytes_equal(np.asarray(fma(x, y, z)), np_fma(x, y, z))
    assert np.count_nonzero(np_fma(a_tie, b_tie, f32(1)) != a_tie * b_tie + f32(1)) > n // 10  # the cases need one rounding


@pytest.mark.parametrize("weights,rsf,clamp,fmt", [(True, 2.5, None, "fp32"), (False, None, 10.0, "fp32"), (False, 1.5, None, "bf16")])
def test_backward_follows_tilekernels_operation_order(rng, weights, rsf, clamp, fmt):
    """x_grad bit for bit against TileKernels' order, ``dl = (((g·w)·s)·r)·fma(l, 1 - s, 1)`` and
    ``dr = ((g·w)·s)·l``, on inputs where ``1 + l·(1 - s)`` nearly cancels."""
    t, h = 64, 512
    x = make_cancelling_x(rng, t, h)
    w = rng.uniform(0.05, 1.0, t).astype(f32) if weights else None
    g = rng.standard_normal((t, h)).astype(f32)
    fn = functools.partial(swiglu_backward, fmt=fmt, routed_scaling_factor=rsf, clamp_value=clamp, impl="xla")
    out = jax.jit(fn)(x, g, topk_weights=w)
    grad = out[0] if weights else out
    expected = np_backward(x, g, None, w, rsf, clamp)[0]
    assert_bytes_equal(np.asarray(grad), expected.astype(OUT_DTYPE[fmt]))
    if clamp is None and fmt == "fp32":  # these inputs tell the orders apart
        previous = np_backward_previous_order(x, g, np_weights(t, w, rsf))
        assert np.count_nonzero(previous != expected) > 100


def _cancelling_cast_input(rng, t, h, npc):
    """e4m3 x with per-token (1, npc) scales whose first left block dequantizes to values next to the
    root of ``1 + l·(1 - s)`` (every element -1.25 times a scale near root / -1.25): the block maximum
    of that gradient block is a nearly cancelling value."""
    x = make_x(rng, t, h, f32)
    xq, xsf = np_quantize(x, (1, npc), False)
    xq[:, :npc] = E4M3(-1.25)
    xsf[:, 0] = (SLOPE_ROOT / f32(-1.25)) * (f32(1) + rng.integers(-64, 65, t).astype(f32) * f32(2.0**-20))
    return xq, xsf


@pytest.mark.parametrize("layout,npc", [("row", 128), ("col", 32)])
def test_backward_cast_of_cancelling_gradients(rng, layout, npc):
    """The fused backward + cast picks the scales of TileKernels' gradient (round_sf=False: the scale
    is the block maximum / 448, so the maximum's last bits matter)."""
    t, h = 48, 512
    xq, xsf = _cancelling_cast_input(rng, t, h, npc)
    g = (rng.standard_normal((t, h)) * 0.5).astype(BF16)
    w = rng.uniform(0.05, 1.0, t).astype(f32)
    fn = functools.partial(swiglu_backward_and_per_token_cast, num_per_channels=npc, routed_scaling_factor=2.0, use_tma_aligned_col_major_sf=layout != "row", impl="xla")
    x_grad, (q, sf), _ = jax.jit(lambda xq, xsf, g, w: fn((xq, xsf), g, topk_weights=w))(xq, np_store_sf(xsf, layout), g, w)
    xf = xq.astype(f32) * np.repeat(xsf, npc, 1)
    grad, _, _, valid = np_backward(xf, g, None, w, 2.0)
    exp_q, exp_sf = np_cast(grad, valid, npc, layout, False)
    assert_bytes_equal(np.asarray(x_grad), grad.astype(BF16))
    assert_bytes_equal(np.asarray(q), exp_q)
    assert_bytes_equal(np.asarray(sf), exp_sf)
    previous = np_backward_previous_order(xf, g.astype(f32), w * f32(2.0))
    assert not np.array_equal(np_cast(previous, valid, npc, layout, False)[1], exp_sf)  # the order shows in the scales


@pytest.mark.parametrize("layout", ["row", "col", "col_ue8m0"])
@pytest.mark.parametrize("npc", [32, 128])
def test_backward_and_per_token_cast_reference(rng, layout, npc):
    t, h = 50, 512
    x, ps, w = make_inputs(rng, t, h, psum=True, weights=True)
    round_sf = layout == "col_ue8m0"
    xq, xsf = np_quantize(np.asarray(x).astype(f32), (1, npc), True)
    xsf_stored = np_store_sf(xsf, layout)
    g = (rng.standard_normal((t, h)) * 0.5).astype(BF16)
    col_major, packed = layout != "row", layout == "col_ue8m0"
    fn = functools.partial(
        swiglu_backward_and_per_token_cast, num_per_channels=npc, routed_scaling_factor=2.0, use_tma_aligned_col_major_sf=col_major,
        round_sf=round_sf, use_packed_ue8m0=packed, clamp_value=10.0, do_recompute=True, token_alignment=16, impl="xla",
    )  # fmt: skip
    x_grad, (q, sf), weight_grad, act = jax.jit(lambda xq, xsf, g, ps, w: fn((xq, xsf), g, psum_num_tokens_per_expert=ps, topk_weights=w))(xq, xsf_stored, g, ps, w)
    xf = xq.astype(f32) * np.repeat(xsf, npc, 1)
    grad, wg, act_out, valid = np_backward(xf, g, ps, w, 2.0, 10.0, 16)
    assert_bytes_equal(np.asarray(x_grad), grad.astype(BF16))
    assert_bytes_equal(np.asarray(act), act_out.astype(BF16))
    exp_q, exp_sf = np_cast(grad, valid, npc, layout, round_sf)
    assert_bytes_equal(np.asarray(q), exp_q)
    assert_bytes_equal(np.asarray(sf), exp_sf)
    np.testing.assert_allclose(np.asarray(weight_grad), wg, rtol=1e-5, atol=1e-5 * np.abs(wg).max())


@pytest.mark.parametrize("npt", [32, 128])
@pytest.mark.parametrize("transpose,round_sf,clamp", [(True, False, None), (False, True, 0.5), (True, True, 10.0)])
def test_per_channel_cast_reference(rng, npt, transpose, round_sf, clamp):
    t, h = 256, 192
    x = make_x(rng, t, h)
    out, sf = jax.jit(functools.partial(
        swiglu_forward_and_per_channel_cast_and_transpose, num_per_tokens=npt, round_sf=round_sf, without_transpose=not transpose,
        swiglu_clamp_value=clamp, impl="xla"))(x)  # fmt: skip
    act, _ = np_forward(x, clamp=clamp)
    data, exp_sf = np_quantize(act.astype(BF16).astype(f32), (npt, 1), round_sf)
    assert_bytes_equal(np.asarray(out), data.T if transpose else data)
    assert_bytes_equal(np.asarray(sf), exp_sf)


def test_zero_tokens():
    x = jnp.zeros((0, 256), jnp.bfloat16)
    assert swiglu_forward(x, impl="xla").shape == (0, 128)
    data, sf, counts = swiglu_forward_and_per_token_cast(x, num_per_channels=32, use_tma_aligned_col_major_sf=True, with_clamped_count=True, impl="xla")
    assert data.shape == (0, 128) and sf.shape == (4, 0) and counts.tolist() == [0, 0, 0, 0]
    assert swiglu_backward(x, jnp.zeros((0, 128), jnp.bfloat16), impl="xla").shape == (0, 256)


# ---------------------------------------------------------------------------------------------
# The differentiable op.


@pytest.mark.parametrize("weights,psum,clamp", [(True, True, 0.5), (False, False, None), (True, False, 10.0)])
def test_swiglu_gradients(rng, weights, psum, clamp):
    """Custom VJP (forward and backward ops) against jax.grad of the reference."""
    t, h = 40, 128
    x, ps, w = make_inputs(rng, t, h, dtype=np.float32, psum=psum, weights=weights)
    g = rng.standard_normal((t, h)).astype(f32)
    kw = dict(routed_scaling_factor=1.25 if weights else None, clamp_value=clamp, token_alignment=16)

    def loss(x, w, impl):
        return jnp.sum(swiglu(x, w, ps, impl=impl, **kw) * g)

    argnums = (0, 1) if weights else (0,)
    custom = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=2)(x, w, None)
    auto = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=2)(x, w, "xla")
    for a, b in zip(custom, auto):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # the custom VJP's pieces are the backward op's outputs
    expected = swiglu_backward(x, g, "fp32", ps, w, impl="xla", **kw)
    assert_bytes_equal(np.asarray(custom[0]), np.asarray(expected[0] if weights else expected))
    value = jax.jit(lambda x: swiglu(x, w, ps, **kw))(x)
    assert_bytes_equal(np.asarray(value), np.asarray(swiglu_forward(x, "fp32", ps, w, impl="xla", **kw)))


def test_swiglu_bf16_output_dtype_and_grad_dtype(rng):
    x, _, w = make_inputs(rng, 16, 64, weights=True)
    y, vjp = jax.vjp(lambda x, w: swiglu(x, w), jnp.asarray(x), jnp.asarray(w))
    gx, gw = vjp(jnp.ones_like(y))
    assert y.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Rules.

@pytest.mark.parametrize("call,args,message", [
    (lambda x, p: swiglu_forward(x, psum_num_tokens_per_expert=p), [X, _sds((4,), jnp.float32)], "psum_num_tokens_per_expert must be int32"),
    (lambda x, p: swiglu_forward(x, psum_num_tokens_per_expert=p), [X, _sds((0,), jnp.int32)], "1 <= E < 65536"),
    (lambda x, p: swiglu_forward(x, psum_num_tokens_per_expert=p), [X, _sds((1 << 16,), jnp.int32)], "1 <= E < 65536"),
    (lambda x, w: swiglu_forward(x, topk_weights=w), [X, _sds((63,), jnp.float32)], r"topk_weights must be float32 \[T\]"),
    (lambda x, w: swiglu_forward(x, topk_weights=w), [X, _sds((64,), jnp.bfloat16)], r"topk_weights must be float32 \[T\]"),
])  # fmt: skip
def test_bad_routing_arrays_raise_at_trace_time(call, args, message):
    """(The other bad inputs are the contract classes' ``bad_inputs``.)"""
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(call, *args)


@pytest.mark.parametrize("call,error,message", [
    (lambda: swiglu(jnp.zeros((8, 256), jnp.float16)), ValueError, "swiglu: x must be bfloat16 or float32, got float16"),
    (lambda: swiglu(jnp.zeros((8, 256), jnp.int32)), ValueError, "swiglu: x must be bfloat16 or float32"),
    (lambda: swiglu(jnp.zeros((8, 256), jnp.bfloat16), fmt="fp16"), ValueError, "swiglu: fmt must be 'bf16' or 'fp32'"),
    (lambda: swiglu(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((8,), jnp.float16)), ValueError, r"swiglu: topk_weights must be float32 \[T\]"),
    (lambda: swiglu(jnp.zeros((8, 256), jnp.bfloat16), impl="cuda"), ValueError, "swiglu: impl must be one of"),
    (lambda: swiglu(jnp.zeros((8, 256), jnp.bfloat16), clamp_value=float("nan")), ValueError, "swiglu: clamp_value must be a positive finite number"),
    (lambda: swiglu("x"), TypeError, "swiglu: x must be an array, got str"),
    (lambda: swiglu_forward(None), TypeError, "swiglu_forward: x must be an array, got NoneType"),
    (lambda: swiglu_forward(object()), TypeError, "swiglu_forward: x must be an array"),
    (lambda: swiglu_forward(jnp.zeros((8, 0), jnp.bfloat16)), ValueError, r"swiglu_forward: H \(half of x's last dimension, 0\) must be a positive multiple of 64"),
    (lambda: swiglu_forward(jnp.zeros((2, 8, 256), jnp.bfloat16)), ValueError, r"swiglu_forward: x must be \[T, 2H\]"),
    (lambda: swiglu_forward(jnp.zeros((256,), jnp.bfloat16)), ValueError, r"swiglu_forward: x must be \[T, 2H\]"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), fmt=["bf16"]), ValueError, "swiglu_forward: fmt must be 'bf16' or 'fp32'"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), routed_scaling_factor="2"), TypeError, "swiglu_forward: routed_scaling_factor must be a number, got str"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), routed_scaling_factor=True), TypeError, "swiglu_forward: routed_scaling_factor must be a number, got bool"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), clamp_value=[1.0]), TypeError, "swiglu_forward: clamp_value must be a number, got list"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), clamp_value=0.0), ValueError, "swiglu_forward: clamp_value must be a positive finite number"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), with_clamped_count="yes"), TypeError, "swiglu_forward: with_clamped_count must be True or False"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), token_alignment=16.0), TypeError, "swiglu_forward: token_alignment must be an int"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), token_alignment=True), TypeError, "swiglu_forward: token_alignment must be an int"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), token_alignment=2**20), ValueError, "swiglu_forward: token_alignment must be a positive integer, at most 65536"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), psum_num_tokens_per_expert="3"), TypeError, "swiglu_forward: psum_num_tokens_per_expert must be an array"),
    (lambda: swiglu_forward(jnp.zeros((8, 256), jnp.bfloat16), impl="gpu"), ValueError, "swiglu_forward: impl must be"),
    (lambda: jax.jit(lambda x, c: swiglu_forward(x, clamp_value=c))(jnp.zeros((8, 256), jnp.bfloat16), 1.0), TypeError, "swiglu_forward: clamp_value must be a static number"),
    (lambda: swiglu_forward_and_per_token_cast(jnp.zeros((8, 256), jnp.bfloat16), num_per_channels=32.0), TypeError, "swiglu_forward_and_per_token_cast: num_per_channels must be an int"),
    (lambda: swiglu_forward_and_per_token_cast(jnp.zeros((8, 256), jnp.bfloat16), num_per_channels="32"), TypeError, "swiglu_forward_and_per_token_cast: num_per_channels must be an int"),
    (lambda: swiglu_forward_and_per_token_cast(jnp.zeros((8, 256), jnp.bfloat16), round_sf=None), TypeError, "swiglu_forward_and_per_token_cast: round_sf must be True or False"),
    (lambda: swiglu_forward_and_per_token_cast(jnp.zeros((8, 256), jnp.bfloat16), use_packed_ue8m0=True, round_sf=True), ValueError, "swiglu_forward_and_per_token_cast: use_packed_ue8m0 needs use_tma_aligned_col_major_sf"),
    (lambda: swiglu_forward_and_per_token_cast(jnp.zeros((8, 256), jnp.bfloat16), fmt=None), ValueError, "swiglu_forward_and_per_token_cast: fmt must be 'e4m3'"),
    (lambda: swiglu_forward_and_per_token_cast(jnp.zeros((8, 256), jnp.float16)), ValueError, "swiglu_forward_and_per_token_cast: x must be bfloat16 or float32"),
    (lambda: swiglu_backward(jnp.zeros((8, 256), jnp.bfloat16), "g"), TypeError, "swiglu_backward: act_x_grad must be an array"),
    (lambda: swiglu_backward(jnp.zeros((8, 256), jnp.float16), jnp.zeros((8, 128), jnp.bfloat16)), ValueError, "swiglu_backward: x must be bfloat16 or float32"),
    (lambda: swiglu_backward(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((8, 128), jnp.float16)), ValueError, "swiglu_backward: act_x_grad must be bf16 or fp32"),
    (lambda: swiglu_backward(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((8, 128), jnp.bfloat16), do_recompute="no"), TypeError, "swiglu_backward: do_recompute must be True or False"),
    (lambda: swiglu_backward(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((8, 128), jnp.bfloat16), fmt=3), ValueError, "swiglu_backward: fmt must be"),
    (lambda: swiglu_backward_and_per_token_cast(jnp.zeros((8, 256), jnp.float8_e4m3fn), jnp.zeros((8, 128), jnp.bfloat16)), TypeError, r"swiglu_backward_and_per_token_cast: x must be a QuantTensor \(data, sf\)"),
    (lambda: swiglu_backward_and_per_token_cast((jnp.zeros((8, 256), jnp.float8_e4m3fn), "sf"), jnp.zeros((8, 128), jnp.bfloat16)), TypeError, "swiglu_backward_and_per_token_cast: x's scale factors"),
    (lambda: swiglu_backward_and_per_token_cast((jnp.zeros((8, 256), jnp.float8_e4m3fn), jnp.ones((8, 2))), jnp.zeros((8, 128), jnp.bfloat16), x_sf_layout=3), ValueError, "swiglu_backward_and_per_token_cast: x_sf_layout must be"),
    (lambda: swiglu_backward_and_per_token_cast((jnp.zeros((8, 256), jnp.float8_e4m3fn), jnp.ones((8, 2))), jnp.zeros((8, 128), jnp.bfloat16), num_per_channels=None), TypeError, "swiglu_backward_and_per_token_cast: num_per_channels must be an int"),
    (lambda: swiglu_backward_and_per_token_cast((jnp.zeros((8, 256), jnp.float8_e4m3fn), jnp.ones((8, 2))), jnp.zeros((8, 128), jnp.bfloat16), clamp_value=-1), ValueError, "swiglu_backward_and_per_token_cast: clamp_value must be a positive finite number"),
    (lambda: swiglu_forward_and_per_channel_cast_and_transpose(jnp.zeros((128, 256), jnp.bfloat16), num_per_tokens="128"), TypeError, "swiglu_forward_and_per_channel_cast_and_transpose: num_per_tokens must be an int"),
    (lambda: swiglu_forward_and_per_channel_cast_and_transpose(jnp.zeros((128, 256), jnp.bfloat16), without_transpose="no"), TypeError, "swiglu_forward_and_per_channel_cast_and_transpose: without_transpose must be True or False"),
    (lambda: swiglu_forward_and_per_channel_cast_and_transpose(jnp.zeros((128, 256), jnp.bfloat16), swiglu_clamp_value=0), ValueError, "swiglu_forward_and_per_channel_cast_and_transpose: swiglu_clamp_value must be a positive finite number"),
    (lambda: swiglu_forward_and_per_channel_cast_and_transpose(jnp.zeros((128, 0), jnp.bfloat16)), ValueError, "swiglu_forward_and_per_channel_cast_and_transpose: x must be"),
    (lambda: swiglu_forward_and_per_channel_cast_and_transpose([[1.0]]), TypeError, "swiglu_forward_and_per_channel_cast_and_transpose: x must be an array, got list"),
    (lambda: swiglu_forward_and_per_channel_cast_and_transpose(jnp.zeros((128, 256), jnp.bfloat16), impl=1), ValueError, "swiglu_forward_and_per_channel_cast_and_transpose: impl must be"),
])  # fmt: skip
def test_bad_arguments_name_the_op_and_the_argument(call, error, message):
    """Wrong dtypes, ranks, zero extents, bad statics and Python objects: a ValueError or TypeError
    naming the op and the argument, at trace time (never a KeyError or a NaN)."""
    with pytest.raises(error, match=message):
        call()


def test_zero_extents_that_are_allowed():
    assert swiglu_forward_and_per_channel_cast_and_transpose(jnp.zeros((0, 256), jnp.bfloat16), impl="xla")[0].shape == (128, 0)
    assert swiglu(jnp.zeros((0, 256), jnp.bfloat16)).shape == (0, 128)
    program = _pc_program(128, True, False, None)
    (call,) = tilek_calls(lower_for_cuda(program, jax.ShapeDtypeStruct((0, 2048), jnp.bfloat16)))
    assert decode_record(call["launch"])["kernels"] == []  # nothing to launch; the outputs are zero-filled


def test_abstract_eval_is_exact():
    out = jax.eval_shape(lambda x: swiglu_forward_and_per_token_cast(x, num_per_channels=32, use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True, with_clamped_count=True), jax.ShapeDtypeStruct((6, 4096), jnp.bfloat16))
    assert [(o.shape, o.dtype) for o in out] == [((6, 2048), jnp.float8_e4m3fn), ((16, 8), jnp.int32), ((4,), jnp.int32)]
    out = jax.eval_shape(lambda x, g: swiglu_backward_and_per_token_cast((x, jnp.zeros((6, 32), jnp.float32)), g, num_per_channels=128), jax.ShapeDtypeStruct((6, 4096), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((6, 2048), jnp.float32))
    assert [(o.shape, o.dtype) for o in jax.tree.leaves(out)] == [((6, 4096), jnp.bfloat16), ((6, 4096), jnp.float8_e4m3fn), ((6, 32), jnp.float32)]




# ---------------------------------------------------------------------------------------------
# Lowering for "cuda" (kernels compiled for sm_90a): every case's launch, the row kernels' limits.


def _fwd_program(h, fmt, psum, weights, rsf, clamp, count, impl="tilelang"):
    def program(x, ps, w):
        return swiglu_forward(x, fmt, ps if psum else None, w if weights else None, rsf, clamp, count, 16, impl=impl)

    return program


def _cast_program(npc, layout, psum, weights, clamp, count, impl="tilelang"):
    col_major, packed, round_sf = LAYOUT_FLAGS[layout]

    def program(x, ps, w):
        return swiglu_forward_and_per_token_cast(
            x, "e4m3", npc, ps if psum else None, w if weights else None, 0.75 if weights else None, col_major, round_sf, packed,
            clamp, count, 16, impl=impl,
        )  # fmt: skip

    return program


def _bwd_program(fmt, psum, weights, rsf, clamp, recompute, impl="tilelang"):
    def program(x, g, ps, w):
        return swiglu_backward(x, g, fmt, ps if psum else None, w if weights else None, rsf, clamp, 16, recompute, impl=impl)

    return program


def _bwd_cast_program(npc, layout, x_layout, psum, weights, clamp, recompute, impl="tilelang"):
    col_major, packed, round_sf = LAYOUT_FLAGS[layout]

    def program(xq, xsf, g, ps, w):
        return swiglu_backward_and_per_token_cast(
            (xq, xsf), g, "e4m3", npc, ps if psum else None, w if weights else None, 1.5 if weights else None, col_major, round_sf,
            packed, clamp, recompute, 16, x_sf_layout=x_layout, impl=impl,
        )  # fmt: skip

    return program


def _pc_program(npt, transpose, round_sf, clamp, impl="tilelang"):
    def program(x):
        return swiglu_forward_and_per_channel_cast_and_transpose(x, "e4m3", npt, round_sf, not transpose, clamp, impl=impl)

    return program



def _kernel_of(call):
    record = decode_record(call["launch"])
    assert call["has_cubin"] and len(record["kernels"]) <= 1
    return record


def _calls(fn) -> list:
    """A function's cases that the GPU tests run (not the benchmark sizes)."""
    return [c for c in fn.cases if not c.bench]


def _named(fn, name: str):
    return next(c for c in fn.cases if c.name == name)


def _params(*fns):
    return [pytest.param(fn, c, id=f"{fn.__name__}-{c.name}") for fn in fns for c in _calls(fn)]


@pytest.mark.parametrize("fn,case", _params(swiglu_forward, swiglu_forward_and_per_token_cast))
def test_forward_lowers_to_one_persistent_launch(fn, case):
    cast = fn is swiglu_forward_and_per_token_cast
    (call,) = tilek_calls(lower_for_cuda(case.call(fn, "tilelang"), *case.structs()))
    record = _kernel_of(call)
    assert call["name"] == "swiglu_forward"
    t = case.args[0].shape[0]
    rows = -(-t // 4) * 4 if cast and _sf_layout(case.kwargs) != "row" else t
    if rows == 0:
        assert record["kernels"] == [] and call["entries"] == ""
        return
    (k,) = record["kernels"]
    assert k["grid"] == [min(-(-rows // WARPS), 132 * BLOCKS_PER_SM), 1, 1] and k["block"] == [256, 1, 1] and k["smem"] == 0
    operands = len(case.args)  # x, psum and topk_weights where given
    assert record["zero_fill"] == ([operands + 1 + int(cast)] if case.kwargs.get("with_clamped_count") else [])  # the counters, after the data (and sf)


@pytest.mark.parametrize("fn,case", _params(swiglu_backward, swiglu_backward_and_per_token_cast))
def test_backward_lowers_to_one_persistent_launch(fn, case):
    cast = fn is swiglu_backward_and_per_token_cast
    (call,) = tilek_calls(lower_for_cuda(case.call(fn, "tilelang"), *case.structs()))
    (k,) = _kernel_of(call)["kernels"]
    assert call["name"] == "swiglu_backward"
    t = case.args[0].shape[0]
    rows = -(-t // 4) * 4 if cast and _sf_layout(case.kwargs) != "row" else t
    assert k["grid"] == [min(-(-rows // WARPS), 132 * BLOCKS_PER_SM), 1, 1] and k["block"] == [256, 1, 1]


def _fresh(program):
    """A new function object per lowering (JAX caches lowerings per function: the launch records of
    a second lowering would otherwise be the first one's)."""
    return lambda *args: program(*args)


def _row_kernel_program(kind, t, h=1024):
    """(program, abstract args, rows the grid covers) of one op of each row kernel."""
    ps, w = jax.ShapeDtypeStruct((5,), jnp.int32), jax.ShapeDtypeStruct((t,), jnp.float32)
    x, g = jax.ShapeDtypeStruct((t, 2 * h), jnp.bfloat16), jax.ShapeDtypeStruct((t, h), jnp.bfloat16)
    padded = -(-t // 4) * 4
    if kind == "forward":
        return _fwd_program(h, "bf16", True, True, 2.5, 0.5, True), (x, ps, w), t
    if kind == "cast":
        return _cast_program(128, "col_ue8m0", True, True, 10.0, True), (x, ps, w), padded
    if kind == "backward":
        return _bwd_program("bf16", True, True, 2.5, 0.5, True), (x, g, ps, w), t
    xq, (shape, dtype) = jax.ShapeDtypeStruct((t, 2 * h), jnp.float8_e4m3fn), F.sf_storage_shape("col_ue8m0", (t, 2 * h // 128))
    return _bwd_cast_program(128, "col_ue8m0", "col_ue8m0", True, True, 10.0, True), (xq, jax.ShapeDtypeStruct(shape, dtype), g, ps, w), padded


ROW_KERNELS = ["forward", "cast", "backward", "backward_cast"]
MAX_ROWS = 2**31 - 2**17  # the documented row limit (int32 row indices with a grid's headroom)


@pytest.mark.parametrize("kind", ROW_KERNELS)
def test_row_kernels_do_not_depend_on_the_sm_count(monkeypatch, kind):
    """The persistent grid is a launch-time value: one cubin (cache key) for every GPU, whatever the
    SM count the lowering assumes; only the launch record's grid follows it."""
    program, args, rows = _row_kernel_program(kind, 100_000)
    keys, calls = {}, {}
    for sms in (114, 132):
        monkeypatch.setenv("JAX_TILEK_NUM_SMS", str(sms))
        with jax_tilek.record_kernels() as log:
            (calls[sms],) = tilek_calls(lower_for_cuda(_fresh(program), *args))
        keys[sms] = [(name, key) for name, _, _, key in log]
        (k,) = _kernel_of(calls[sms])["kernels"]
        ctas = min(-(-rows // WARPS), sms * BLOCKS_PER_SM)
        assert k["grid"] == [ctas, 1, 1] and (2, 4, ctas) in k["args"]  # the grid, and the kernel's num_ctas scalar
    assert keys[114] == keys[132] and len(keys[132]) == 1
    assert calls[114]["cubin_key"] == calls[132]["cubin_key"]


@pytest.mark.parametrize("kind", ROW_KERNELS)
def test_row_kernels_take_up_to_max_rows(kind):
    """Any row count up to ``MAX_ROWS`` lowers (int32 rows, 64-bit element offsets); beyond it the op
    says so at trace time."""
    program, args, _ = _row_kernel_program(kind, MAX_ROWS)
    (call,) = tilek_calls(lower_for_cuda(program, *args))
    (k,) = _kernel_of(call)["kernels"]
    assert k["grid"] == [132 * BLOCKS_PER_SM, 1, 1]
    program, args, _ = _row_kernel_program(kind, MAX_ROWS + 1)
    op = {"forward": "swiglu_forward", "cast": "swiglu_forward_and_per_token_cast", "backward": "swiglu_backward"}.get(kind, "swiglu_backward_and_per_token_cast")
    with pytest.raises(ValueError, match=rf"{op}: x may have at most {MAX_ROWS} rows"):
        jax.eval_shape(program, *args)


def test_row_kernels_use_64_bit_element_offsets():
    """T · 2H may pass 2^31 elements: every row offset in the generated code is computed in int64."""
    configs = [
        (swiglu_forward_kernel, dict(hidden=1024, in_dtype="bfloat16", out_kind="bf16", psum=True, weights=True, rsf=True, clamp=True, count=True, alignment=16)),
        (swiglu_backward_kernel, dict(hidden=1024, x_kind="bf16", g_kind="bf16", grad_kind="bf16", psum=True, alignment=16, weights=True, rsf=True, clamp=True, recompute=True)),
    ]
    for factory, params in configs:
        source = factory.artifact(params, "sm_90a").source
        assert re.search(r"\(\(int64_t\)row(_\d+)?\) \* \(int64_t\)", source)
        assert not re.search(r"\brow(_\d+)?\)? \* (?!\(int64_t\))", source), "an int32 row offset"


def test_per_channel_cast_loops_over_token_tiles_beyond_grid_y():
    """gridDim.y is at most 65535: beyond 65535 x 128 tokens each CTA takes several token tiles (a
    separate kernel, ``loop=True``); up to 65535 tiles the kernel has no loop (the fast hot path)."""
    program = _pc_program(128, True, False, None)
    for t, tiles, loop in ((128 * 1000, 1000, False), (128 * 65535, 65535, False), (128 * 65536, 65535, True), (2**24, 65535, True), (MAX_ROWS, 65535, True)):
        with jax_tilek.record_kernels() as log:
            (call,) = tilek_calls(lower_for_cuda(_fresh(program), jax.ShapeDtypeStruct((t, 2048), jnp.bfloat16)))
        (k,) = _kernel_of(call)["kernels"]
        assert k["grid"] == [1024 // 64, tiles, 1]
        assert [dict(params)["loop"] for name, params, _, _ in log if name.endswith("swiglu_per_channel_cast_kernel")] == [loop]
    with pytest.raises(ValueError, match=rf"swiglu_forward_and_per_channel_cast_and_transpose: x may have at most {MAX_ROWS} rows"):
        jax.eval_shape(program, jax.ShapeDtypeStruct((MAX_ROWS + 128, 2048), jnp.bfloat16))


@pytest.mark.parametrize("transpose", [True, False])
def test_per_channel_cast_hot_path_has_no_token_loop(transpose):
    """The ordinary kernel (``loop=False``) takes one token tile per CTA, its tile index the block
    index itself; only ``loop=True`` has the loop over token tiles (and its extra barrier)."""
    params = dict(hidden=1024, npt=128, round_sf=False, transpose=transpose, clamp=False)
    plain = swiglu_per_channel_cast_kernel.artifact({**params, "loop": False}, "sm_90a").source
    looped = swiglu_per_channel_cast_kernel.artifact({**params, "loop": True}, "sm_90a").source
    assert "for (int it" not in plain and "for (int it" in looped
    assert looped.count("__syncthreads()") == plain.count("__syncthreads()") + 1


@pytest.mark.parametrize("case", _calls(swiglu_forward_and_per_channel_cast_and_transpose), ids=lambda c: c.name)
def test_per_channel_lowers_to_one_tiled_launch(case):
    (call,) = tilek_calls(lower_for_cuda(case.call(swiglu_forward_and_per_channel_cast_and_transpose, "tilelang"), *case.structs()))
    (k,) = _kernel_of(call)["kernels"]
    t, h = case.args[0].shape[0], case.args[0].shape[1] // 2
    assert k["grid"] == [h // 64, t // 128, 1] and k["block"] == [256, 1, 1] and k["smem"] >= 128 * 64 * 2


def test_gradient_program_lowers_to_the_backward_kernel():
    x, w = jax.ShapeDtypeStruct((64, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((64,), jnp.float32)

    def program(x, w):
        y, vjp = jax.vjp(lambda x, w: swiglu(x, w, clamp_value=0.5, impl="tilelang"), x, w)
        return y, vjp(jnp.ones_like(y))

    assert [c["name"] for c in tilek_calls(lower_for_cuda(program, x, w))] == ["swiglu_forward", "swiglu_backward"]



# ---------------------------------------------------------------------------------------------
# GPU: the kernels, bit for bit against the host. (Every case's kernel against its reference is the
# contract's test_gpu_matches_reference; these add numpy's results, the weight gradient's tolerance
# and inputs chosen to tell operation orders apart.)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _calls(swiglu_forward_and_per_token_cast), ids=lambda c: c.name)
def test_forward_and_per_token_cast_kernel(on_gpu, rng, case):
    arrays, k = case.arrays(rng), case.kwargs
    x, _, npc, ps, w = case.place(arrays)
    got = on_gpu(case.call(swiglu_forward_and_per_token_cast, "tilelang"), *arrays)
    act, valid = np_forward(x, ps, w, k["routed_scaling_factor"], k.get("clamp_value"), k["token_alignment"])
    expected = np_cast(act, valid, npc, _sf_layout(k), k["round_sf"])
    if k.get("with_clamped_count"):
        expected += (np_counts(x, valid, k.get("clamp_value")),)
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        assert_bytes_equal(np.asarray(a), e)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _calls(swiglu_backward), ids=lambda c: c.name)
def test_backward_kernel(on_gpu, rng, case):
    arrays = case.arrays(rng)
    weights = case.place(arrays)[4] is not None
    got = jax.tree.leaves(on_gpu(case.call(swiglu_backward, "tilelang"), *arrays))
    expected = jax.tree.leaves(host(case.call(swiglu_backward, "xla"), *arrays))
    assert_bytes_equal(np.asarray(got[0]), expected[0])
    if case.kwargs.get("do_recompute"):
        assert_bytes_equal(np.asarray(got[-1]), expected[-1])
    if weights:
        np.testing.assert_allclose(np.asarray(got[1]), expected[1], rtol=1e-5, atol=1e-5 * np.abs(expected[1]).max())


@pytest.mark.gpu
@pytest.mark.parametrize("case", _calls(swiglu_backward_and_per_token_cast), ids=lambda c: c.name)
def test_backward_and_per_token_cast_kernel(on_gpu, rng, case):
    arrays = case.arrays(rng)
    weights = case.place(arrays)[5] is not None
    got = jax.tree.leaves(on_gpu(case.call(swiglu_backward_and_per_token_cast, "tilelang"), *arrays))
    expected = jax.tree.leaves(host(case.call(swiglu_backward_and_per_token_cast, "xla"), *arrays))
    for i in (0, 1, 2) + ((len(got) - 1,) if case.kwargs.get("do_recompute") else ()):
        assert_bytes_equal(np.asarray(got[i]), expected[i])
    if weights:
        np.testing.assert_allclose(np.asarray(got[3]), expected[3], rtol=1e-5, atol=1e-5 * np.abs(expected[3]).max())


@pytest.mark.gpu
@pytest.mark.parametrize("case", _calls(swiglu_forward_and_per_channel_cast_and_transpose), ids=lambda c: c.name)
def test_per_channel_cast_kernel(on_gpu, rng, case):
    (x,), k = case.arrays(rng), case.kwargs
    got = on_gpu(case.call(swiglu_forward_and_per_channel_cast_and_transpose, "tilelang"), x)
    act, _ = np_forward(x, clamp=k["swiglu_clamp_value"])
    data, sf = np_quantize(act.astype(BF16).astype(f32), (k["num_per_tokens"], 1), k["round_sf"])
    assert_bytes_equal(np.asarray(got[0]), data if k["without_transpose"] else data.T)
    assert_bytes_equal(np.asarray(got[1]), sf)


@pytest.mark.gpu
def test_swiglu_value_and_grad_kernel(on_gpu, rng):
    case = _named(swiglu, "routed_bf16_120x4096")
    x, w, ps = case.arrays(rng)
    t, h = x.shape[0], x.shape[1] // 2
    g = (rng.standard_normal((t, h)) * 0.5).astype(BF16)
    kw = case.kwargs

    def program(x, w, ps, g, impl="tilelang"):
        y, vjp = jax.vjp(lambda x, w: swiglu(x, w, ps, impl=impl, **kw), x, w)
        return y, vjp(g)

    y, (gx, gw) = on_gpu(program, x, w, ps, g)
    ey, (egx, egw) = host(functools.partial(program, impl="xla"), x, w, ps, g)
    assert_bytes_equal(np.asarray(y), ey)
    exp_grad, exp_wg, _ = host(lambda x, g, ps, w: swiglu_backward(x, g, "bf16", ps, w, impl="xla", do_recompute=True, **kw), x, g, ps, w)
    assert_bytes_equal(np.asarray(gx), exp_grad)
    np.testing.assert_allclose(np.asarray(gw), exp_wg, rtol=1e-5, atol=1e-5 * np.abs(exp_wg).max())
    # and close to JAX's own derivative of the reference
    assert calc_diff(np.asarray(gx, f32), np.asarray(egx, f32)) < 1e-5
    np.testing.assert_allclose(np.asarray(gw), egw, rtol=1e-4, atol=1e-4 * np.abs(egw).max())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["order_fp32_104x2048", "order_bf16_104x2048"])
def test_backward_kernel_follows_tilekernels_order(on_gpu, rng, name):
    """Where ``1 + l·(1 - s)`` nearly cancels, the kernel's one fused multiply-add and operation order
    give TileKernels' gradient, bit for bit with the reference and the numpy mirror."""
    case = _named(swiglu_backward, name)
    t, h = case.args[0].shape[0], case.args[0].shape[1] // 2
    fmt, rsf = case.template[2], case.kwargs["routed_scaling_factor"]
    x = make_cancelling_x(rng, t, h)
    g = rng.standard_normal((t, h)).astype(f32)
    w = rng.uniform(0.05, 1.0, t).astype(f32)
    got = on_gpu(case.call(swiglu_backward, "tilelang"), x, g, w)
    expected = host(case.call(swiglu_backward, "xla"), x, g, w)
    assert_bytes_equal(np.asarray(got[0]), expected[0])
    assert_bytes_equal(np.asarray(got[0]), np_backward(x, g, None, w, rsf)[0].astype(OUT_DTYPE[fmt]))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["weighted_128_row_from_row_65x2048", "weighted_32_col_from_row_65x2048"])
def test_backward_cast_kernel_of_cancelling_gradients(on_gpu, rng, name):
    """The fused cast's scales (round_sf=False) of nearly cancelling gradients, as TileKernels'."""
    case = _named(swiglu_backward_and_per_token_cast, name)
    t, h = case.args[0].shape[0], case.args[0].shape[1] // 2
    npc, layout, rsf = case.template[3], _sf_layout(case.kwargs), case.kwargs["routed_scaling_factor"]
    xq, xsf = _cancelling_cast_input(rng, t, h, npc)
    g = (rng.standard_normal((t, h)) * 0.5).astype(BF16)
    w = rng.uniform(0.05, 1.0, t).astype(f32)
    args = (xq, np_store_sf(xsf, "row"), g, w)
    got = jax.tree.leaves(on_gpu(case.call(swiglu_backward_and_per_token_cast, "tilelang"), *args))
    expected = jax.tree.leaves(host(case.call(swiglu_backward_and_per_token_cast, "xla"), *args))
    for i in (0, 1, 2):
        assert_bytes_equal(np.asarray(got[i]), expected[i])
    grad, _, _, valid = np_backward(xq.astype(f32) * np.repeat(xsf, npc, 1), g, None, w, rsf)
    exp_q, exp_sf = np_cast(grad, valid, npc, layout, False)
    assert_bytes_equal(np.asarray(got[1]), exp_q)
    assert_bytes_equal(np.asarray(got[2]), exp_sf)
