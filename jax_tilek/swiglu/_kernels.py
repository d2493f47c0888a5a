"""The SwiGLU row kernels (TileLang): forward (bf16 / fp32 output, or its per-token e4m3 cast) and
backward (from bf16 / fp32, or e4m3 with per-token scales; optionally with the gradient's cast), and
the macros they share with the per-channel cast. Each follows the reference of
:mod:`jax_tilek.swiglu._reference` operation for operation.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

import functools
from typing import Optional

from jax_tilek import device
from jax_tilek.kernel import kernel
from jax_tilek.quant import formats as F
from jax_tilek.swiglu._reference import EXP_MIN, EXP_POLY2, LN2_HI, LN2_LO, LOG2E, SCALE_BIAS, SHIFTER, SILU_MIN, TOKEN_ALIGNMENT

UNIT = 16  # elements of one half-row a thread handles at a time (forward)
BWD_UNIT = 8  # elements per half-row a lane handles at a time in the backward (register budget)
WARPS = 8  # warps per CTA of the row kernels
BLOCKS_PER_SM = 4  # resident CTAs per SM the row kernels are built for (__launch_bounds__)
WORD_BITS = {"bf16": 16, "fp32": 32, "e4m3": 8}  # bits per element of each kind

MAX_ROWS = 2**31 - 2**17
"""Rows (T) the SwiGLU kernels take: row indices are int32, with headroom for a grid's worth of
warps past the last row (element offsets are 64-bit, so T · H is not limited)."""
MAX_HIDDEN = 2**28  # H: a row of 2H fp32 values stays below 2^31 words (int32 column indices)

# PTX helpers: packed conversions (element 0 in the low bits), exact division and unsplittable stores.
PRELUDE = device.prelude(
    device.E4M3X4, device.BF16X2, device.E4M3_AT, device.RCP, device.DIV, device.store16(pointer="void"), device.store8(pointer="void")
)

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
                    values[4 * v + j] = T.call_extern("float32", "tilek_e4m3_at", w[v], j)

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
                T.evaluate(T.call_extern("handle", "tilek_store16", T.address_of(y[row, word + q]), *packed[q : q + 4]))
            else:
                T.evaluate(T.call_extern("handle", "tilek_store8", T.address_of(y[row, word + q]), *packed[q : q + 2]))

    @T.macro
    def store_zeros(y, row, word, words: int):
        for q in list(range(0, words, 4)):
            if words - q >= 4:
                T.evaluate(T.call_extern("handle", "tilek_store16", T.address_of(y[row, word + q]), *[T.uint32(0)] * 4))
            else:
                T.evaluate(T.call_extern("handle", "tilek_store8", T.address_of(y[row, word + q]), *[T.uint32(0)] * 2))

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
