"""Fused RMSNorm (TileKernels v2.1 ``norm_forward``, ``norm_forward_and_per_token_cast``,
``norm_backward``) and the differentiable :func:`rms_norm` built on them.

Math, per token (one row of ``x[T, H]``; fp32 arithmetic, each step rounded as written):

    s     = round_x(x + residual)                   # norm_input, the residual stream output
    rstd  = 1 / sqrt(sum(s * s) / H + eps)          # fp32
    y     = round_x((s * rstd) * (w * out_scale))   # out; w = 1 without a weight

``round_x`` rounds to x's dtype (bf16 or fp32). The fused cast quantizes y per token in 1 x 32
groups to e4m3 (amax of y, floor 1e-4, TileKernels' scale rules from :mod:`formats`). The backward,
with ``xh = x * rstd``, ``g = dy * out_scale``, ``gw = g * w``:

    dx = round_x((gw - xh * (sum(xh * gw) / H)) * rstd + residual_out_grad)
    dw = sum over tokens of xh * g                  # fp32

Every product, sum, quotient and square root is rounded once (no FMA contraction), and sums run in
an order fixed by the kernel's thread layout (:func:`row_layout`); ``dw`` is reduced over tokens in a
fixed order too, a partition of the tokens chosen from the shapes alone (:func:`reduce_dw`), so
every GPU computes the same bits. The kernels are bit-exact with that arithmetic (the tests mirror
it in numpy). The JAX references are written in the same order, but XLA, on CPU and GPU alike,
contracts a product feeding a sum into one FMA inside a fusion: where such a product is inexact
(fp32 squares, the products inside the backward's row sums) the references can differ from the
kernels in the last place. bf16 forward outputs (exact squares), the e4m3 cast of a given y and
``dw`` (its products are rounded before the sums) are bit-exact with the references as well.

Sizes: H <= 8192; B·T < 2^31 - 2^17 tokens (int32 row indices; element offsets are 64-bit).

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Static, TileOp, View, map_batch, with_vjp
from jax_tilek.quant import formats

MAX_HIDDEN = 8192
FORWARD_ALIGN = 16  # H % 16 == 0 (forward), as TileKernels' CUDA kernels
BACKWARD_ALIGN = 32  # H % 32 == 0 (backward)
QUANT_GROUP = 32  # the fused cast's 1 x 32 groups
E4M3_MAX = 448.0
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
RING_BYTES_PER_SM = 132 * 1024  # the backward's cp.async rings per SM (227 KB of shared memory on sm_90)
PARTIAL_SMS = 132  # the backward's partial dw rows fill an H200 (132 SMs): fixed, not the GPU's SM count
MAX_ROWS = 2**31 - 2**17
"""Tokens (all of B·T) the kernels take: row indices are int32, with headroom for the rows a grid
steps past the last one (element offsets are 64-bit)."""
REDUCE_COLUMNS = 32  # dw reduce: columns per CTA
REDUCE_LANES = 32  # dw reduce: partial rows summed in parallel per column


# ---------------------------------------------------------------------------------------------
# Thread layout (shared by the kernels and the references, which mirror its summation order).


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How a CTA covers rows of ``hidden`` elements.

    A row is cut into 16-byte vectors (``vec`` elements); thread ``t`` of the row's ``group`` threads
    owns vectors ``j * group + t`` for ``j < vpt`` (vectors past the row's end, when ``group`` does not
    divide them, read as zeros). A CTA handles ``rows`` rows, ``rows * group`` threads.
    """

    hidden: int
    vec: int
    group: int
    vpt: int
    rows: int

    @property
    def nvec(self) -> int:
        return self.hidden // self.vec

    @property
    def warps(self) -> int:
        """Warps per row (1 when a row fits in part of a warp)."""
        return max(1, self.group // 32)

    @property
    def threads(self) -> int:
        return self.rows * self.group


def row_layout(hidden: int, dtype) -> RowLayout:
    """The layout for rows of ``hidden`` elements of ``dtype`` (bf16 or fp32): whole warps per row,
    up to 8, each thread holding as few vectors as that allows; rows of 32 vectors or fewer go to a
    power-of-two part of a warp, several rows per 128-thread CTA."""
    vec = 16 // jnp.dtype(dtype).itemsize
    nvec = hidden // vec
    if nvec <= 32:
        group = 1 << max(0, (nvec - 1).bit_length())
    else:
        group = next((32 * w for w in range(8, 0, -1) if nvec % (32 * w) == 0), None)
        if group is None:
            group = 32 * min(8, -(-nvec // 32))
    vpt = -(-nvec // group)
    rows = max(1, 128 // group)
    return RowLayout(hidden, vec, group, vpt, rows)


def forward_blocks_per_sm(lay: RowLayout) -> int:
    """CTAs per SM the forward kernel is sized for (``__launch_bounds__``): about 88 KB of x and
    residual loads in flight per SM (measured best on an H200), within the registers (about 24 of
    bookkeeping plus 12 per vector of x, residual and weight per thread)."""
    in_flight = round(88 * 1024 / (lay.threads * 2 * 16 * lay.vpt))
    registers = 65536 // (lay.threads * (24 + 12 * lay.vpt))
    return int(min(8, max(1, min(in_flight, registers))))


# ---------------------------------------------------------------------------------------------
# Kernels.

_KERNEL_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}


@kernel(pass_configs=_KERNEL_CONFIGS)
def norm_forward_kernel(
    hidden: int,
    dtype: str,
    has_residual: bool,
    has_weight: bool,
    with_out: bool,
    with_rstd: bool,
    sf_layout: str,  # "" (no cast), "row", "col" or "col_ue8m0"
    round_sf: bool,
    blocks_per_sm: int,
):
    """RMSNorm forward (+ residual add, + e4m3 1 x 32 cast) of rows of ``hidden`` elements.

    Tensors a configuration does not use are bound to stride-0 dummies and never touched. With a
    column-major sf the grid also covers the padding tokens ``[T, align(T, 4))``, whose sf entries it
    zeroes.
    """
    import tilelang.language as T

    lay = row_layout(hidden, dtype)
    VEC, G, VPT, ROWS, W = lay.vec, lay.group, lay.vpt, lay.rows, lay.warps
    E = VPT * VEC
    quant = sf_layout != ""
    col_sf = sf_layout in ("col", "col_ue8m0")
    GV = QUANT_GROUP // VEC  # vectors per quantization group (on GV neighbouring lanes)
    KB = hidden // QUANT_GROUP
    KW = -(-KB // 4)
    TT, TP, RS, OS, NS, QS, DS, FS = T.dynamic("T, TP, RS, OS, NS, QS, DS, FS")
    f32 = "float32"
    if sf_layout == "col":
        sf_shape, sf_dtype = (KB, TP), f32
    elif sf_layout == "col_ue8m0":
        sf_shape, sf_dtype = (KW, TP, 4), "uint8"
    else:
        sf_shape, sf_dtype = (TT, KB), f32
    sf_strides = (FS, 1) if len(sf_shape) == 2 and not col_sf else None

    @T.prim_func
    def norm_forward(
        x: T.Tensor((TT, hidden), dtype),
        residual: T.StridedTensor((TT, hidden), (RS, 1), dtype),
        weight: T.Tensor((hidden,), dtype),
        out: T.StridedTensor((TT, hidden), (OS, 1), dtype),
        norm_input: T.StridedTensor((TT, hidden), (NS, 1), dtype),
        rstd: T.StridedTensor((TT,), (QS,), f32),
        data: T.StridedTensor((TT, hidden), (DS, 1), "float8_e4m3fn"),
        sf: T.StridedTensor(sf_shape, sf_strides, sf_dtype) if sf_strides else T.Tensor(sf_shape, sf_dtype),
        eps: T.float32,
        out_scale: T.float32,
    ):
        num_rows = TP if col_sf else TT
        with T.Kernel(T.ceildiv(num_rows, ROWS), threads=ROWS * G) as b:
            T.annotate_min_blocks_per_sm(blocks_per_sm)
            T.assume(RS % VEC == 0)
            T.assume(OS % VEC == 0)
            T.assume(NS % VEC == 0)
            T.assume(DS % 16 == 0)
            tid = T.get_thread_binding(0)
            lane = tid % G
            r = tid // G
            row = b * ROWS + r
            src = T.min(row, TT - 1)
            xv = T.alloc_local((E,), dtype)
            rv = T.alloc_local((E,), dtype)
            wv = T.alloc_local((E,), dtype)
            yv = T.alloc_local((E,), dtype)
            qv = T.alloc_local((E,), "float8_e4m3fn")
            acc = T.alloc_var(f32)
            amax = T.alloc_var(f32)
            red = T.alloc_shared((ROWS, W), f32)
            for j in T.unroll(VPT):
                for v in T.vectorized(VEC):
                    xv[j * VEC + v] = T.if_then_else(
                        (j * G + lane) < lay.nvec, x[src, (j * G + lane) * VEC + v], T.Cast(dtype, 0)
                    )
            if has_residual:
                for j in T.unroll(VPT):
                    for v in T.vectorized(VEC):
                        rv[j * VEC + v] = T.if_then_else(
                            (j * G + lane) < lay.nvec, residual[src, (j * G + lane) * VEC + v], T.Cast(dtype, 0)
                        )
                for i in T.unroll(E):
                    xv[i] = T.Cast(dtype, T.ieee_add(T.Cast(f32, xv[i]), T.Cast(f32, rv[i])))
            # sum of squares: per thread in element order, then a butterfly over the row's lanes,
            # then the row's warps in order
            acc = T.float32(0)
            for i in T.unroll(E):
                acc = T.ieee_add(acc, T.ieee_mul(T.Cast(f32, xv[i]), T.Cast(f32, xv[i])))
            for k in T.unroll(min(G, 32).bit_length() - 1):
                acc = T.ieee_add(acc, T.shfl_xor(acc, (min(G, 32) // 2) >> k))
            if W > 1:
                if tid % 32 == 0:
                    red[r, lane // 32] = acc
                T.sync_threads()
                acc = T.float32(0)
                for k in T.unroll(W):
                    acc = T.ieee_add(acc, red[r, k])
            rs = T.ieee_fdiv(T.float32(1), T.ieee_fsqrt(T.ieee_add(T.ieee_fdiv(acc, T.float32(hidden)), eps)))
            if has_weight:
                for j in T.unroll(VPT):
                    for v in T.vectorized(VEC):
                        wv[j * VEC + v] = T.if_then_else(
                            (j * G + lane) < lay.nvec, weight[(j * G + lane) * VEC + v], T.Cast(dtype, 0)
                        )
                for i in T.unroll(E):
                    yv[i] = T.Cast(dtype, T.ieee_mul(T.ieee_mul(T.Cast(f32, xv[i]), rs), T.ieee_mul(T.Cast(f32, wv[i]), out_scale)))
            else:
                for i in T.unroll(E):
                    yv[i] = T.Cast(dtype, T.ieee_mul(T.ieee_mul(T.Cast(f32, xv[i]), rs), out_scale))
            if row < TT:
                for j in T.unroll(VPT):
                    if (j * G + lane) < lay.nvec:
                        if has_residual:
                            for v in T.vectorized(VEC):
                                norm_input[row, (j * G + lane) * VEC + v] = xv[j * VEC + v]
                        if with_out:
                            for v in T.vectorized(VEC):
                                out[row, (j * G + lane) * VEC + v] = yv[j * VEC + v]
                if with_rstd:
                    if lane == 0:
                        rstd[row] = rs
            if quant:
                for j in T.unroll(VPT):
                    amax = T.float32(0)
                    for v in T.unroll(VEC):
                        amax = T.max(amax, T.abs(T.Cast(f32, yv[j * VEC + v])))
                    for k in T.unroll(GV.bit_length() - 1):
                        amax = T.max(amax, T.shfl_xor(amax, 1 << k))
                    a = T.max(amax, T.float32(formats.E4M3.amax_floor))
                    scale = T.ieee_fdiv(a, T.float32(E4M3_MAX))
                    if round_sf:
                        bits = T.reinterpret(scale, "int32")
                        e = ((bits - 1) >> 23) + 1 - 127
                        inv = T.reinterpret(T.Cast("int32", 127 - e) << 23, f32)
                        scale_out = T.reinterpret(T.Cast("int32", 127 + e) << 23, f32)
                    else:
                        inv = T.ieee_fdiv(T.float32(E4M3_MAX), a)
                        scale_out = scale
                    for i in T.unroll(VEC):
                        qv[j * VEC + i] = T.Cast("float8_e4m3fn", T.ieee_mul(T.Cast(f32, yv[j * VEC + i]), inv))
                    chunk = j * G + lane
                    if row < TT and chunk < lay.nvec:
                        for v in T.vectorized(VEC):
                            data[row, chunk * VEC + v] = qv[j * VEC + v]
                    if row < num_rows and chunk < lay.nvec and lane % GV == 0:
                        k = chunk // GV
                        if sf_layout == "row":
                            sf[row, k] = scale_out
                        elif sf_layout == "col":
                            sf[k, row] = T.if_then_else(row < TT, scale_out, T.float32(0))
                        else:
                            sf[k // 4, row, k % 4] = T.if_then_else(row < TT, T.Cast("uint8", 127 + e), T.uint8(0))
                            if KB % 4 != 0:
                                if k == KB - 1:
                                    for z in T.unroll(4 - KB % 4):
                                        sf[k // 4, row, KB % 4 + z] = T.uint8(0)

    return norm_forward


# cp.async (16- and 4-byte, zero-filling when ``pred`` is false), one commit group per row.
_CP_ASYNC = """
__device__ __forceinline__ void tilek_cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(s), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void tilek_cp_async4(void* smem, const void* gmem, bool pred) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(s), "l"(gmem), "r"(pred ? 4 : 0) : "memory");
}
__device__ __forceinline__ void tilek_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void tilek_cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
"""


def backward_config(hidden: int, dtype, has_residual_grad: bool) -> tuple[int, int]:
    """``(stages, ctas_per_sm)`` of the backward kernel: about ``RING_BYTES_PER_SM`` of cp.async rings
    per SM (measured best on an H200), as two CTAs when two 2-row rings fit, else one; 2 to 4 rows
    per ring."""
    lay = row_layout(hidden, dtype)
    per_stage = (3 if has_residual_grad else 2) * lay.rows * lay.vpt * lay.group * 16 + lay.threads * 4
    ctas = 2 if 4 * per_stage <= RING_BYTES_PER_SM else 1
    return int(max(2, min(4, RING_BYTES_PER_SM // (ctas * per_stage)))), ctas


@kernel(pass_configs={**_KERNEL_CONFIGS, "tl.disable_thread_storage_sync": True})
def norm_backward_kernel(hidden: int, dtype: str, has_weight: bool, has_residual_grad: bool, stages: int, ctas_per_sm: int):
    """RMSNorm backward: ``dx`` per row and (with a weight) ``dw``.

    Kernel 1 is persistent: CTA ``b`` of ``NC`` takes row blocks ``b, b + NC, ...`` (``rows`` rows
    each, one per thread group) through a ``stages``-deep cp.async ring in shared memory; each
    thread group accumulates ``x̂ · g`` for its columns over its rows and writes them as partial row
    ``b * rows + r``. Kernel 2 sums the ``NC * rows`` partial rows per column in a fixed order: lane
    ``l`` of 32 sums rows ``l, l + 32, ...`` in turn, then the 32 lane sums are added in lane order.
    """
    import tilelang.language as T

    lay = row_layout(hidden, dtype)
    VEC, G, VPT, ROWS, W = lay.vec, lay.group, lay.vpt, lay.rows, lay.warps
    E = VPT * VEC
    NTH = ROWS * G
    S = stages
    NTEN = 3 if has_residual_grad else 2  # tensors staged per row: dy, x (, residual grad)
    SPAN = VPT * G * VEC  # staged elements per row (>= hidden)
    f32 = "float32"
    TT, NC, GS, PS, PR = T.dynamic("T, NC, GS, PS, PR")
    RC, RL = REDUCE_COLUMNS, REDUCE_LANES
    RV = RC // 4  # 16-byte vectors per reduce tile row

    @T.macro
    def issue(k, b, r, tid, lane, iters, ring, ring_rstd, dy, x, residual_grad, rstd):
        """Starts loading this CTA's row block ``k`` into ring stage ``k % S``."""
        row = (b + k * NC) * ROWS + r
        ok = T.And(k < iters, row < TT)
        src = T.min(row, TT - 1)
        for j in T.unroll(VPT):
            chunk = j * G + lane
            valid = T.And(ok, chunk < lay.nvec)
            col = T.min(chunk, lay.nvec - 1) * VEC
            T.evaluate(T.call_extern(
                "handle", "tilek_cp_async16", T.address_of(ring[k % S, 0, r, chunk * VEC]), T.address_of(dy[src, col]), valid
            ))
            T.evaluate(T.call_extern(
                "handle", "tilek_cp_async16", T.address_of(ring[k % S, 1, r, chunk * VEC]), T.address_of(x[src, col]), valid
            ))
            if has_residual_grad:
                T.evaluate(T.call_extern(
                    "handle", "tilek_cp_async16", T.address_of(ring[k % S, 2, r, chunk * VEC]),
                    T.address_of(residual_grad[src, col]), valid,
                ))
        T.evaluate(T.call_extern("handle", "tilek_cp_async4", T.address_of(ring_rstd[k % S, tid]), T.address_of(rstd[src]), ok))
        T.evaluate(T.call_extern("handle", "tilek_cp_async_commit"))

    @T.prim_func
    def norm_backward(
        dy: T.Tensor((TT, hidden), dtype),
        x: T.Tensor((TT, hidden), dtype),
        rstd: T.Tensor((TT,), f32),
        weight: T.Tensor((hidden,), dtype),
        residual_grad: T.StridedTensor((TT, hidden), (GS, 1), dtype),
        dx: T.Tensor((TT, hidden), dtype),
        partial: T.StridedTensor((NC, ROWS, hidden), (PS, PR, 1), f32),
        dw: T.Tensor((hidden,), f32),
        out_scale: T.float32,
    ):
        with T.Kernel(NC, threads=NTH, prelude=_CP_ASYNC) as b:
            T.annotate_min_blocks_per_sm(ctas_per_sm)
            T.assume(GS % VEC == 0)
            T.assume(PS % 4 == 0)
            T.assume(PR % 4 == 0)
            ring = T.alloc_shared((S, NTEN, ROWS, SPAN), dtype)
            ring_rstd = T.alloc_shared((S, NTH), f32)
            red = T.alloc_shared((2, ROWS, W), f32)
            wv = T.alloc_local((E,), dtype)
            accw = T.alloc_local((E,), f32)
            dxv = T.alloc_local((E,), dtype)
            dyv = T.alloc_local((VEC,), dtype)
            xv = T.alloc_local((VEC,), dtype)
            gv = T.alloc_local((VEC,), dtype)
            acc = T.alloc_var(f32)
            tid = T.get_thread_binding(0)
            lane = tid % G
            r = tid // G
            num_blocks = T.ceildiv(TT, ROWS)
            iters = T.ceildiv(num_blocks - b, NC)
            if has_weight:
                for j in T.unroll(VPT):
                    for v in T.vectorized(VEC):
                        wv[j * VEC + v] = T.if_then_else(
                            (j * G + lane) < lay.nvec, weight[(j * G + lane) * VEC + v], T.Cast(dtype, 0)
                        )
                for i in T.unroll(E):
                    accw[i] = T.float32(0)

            for p in T.unroll(S - 1):
                issue(p, b, r, tid, lane, iters, ring, ring_rstd, dy, x, residual_grad, rstd)
            for k in T.serial(iters):
                issue(k + S - 1, b, r, tid, lane, iters, ring, ring_rstd, dy, x, residual_grad, rstd)
                T.evaluate(T.call_extern("handle", f"tilek_cp_async_wait<{S - 1}>"))
                st = k % S
                row = (b + k * NC) * ROWS + r
                rs = ring_rstd[st, tid]
                # sum(x̂ · g · w): per thread in element order, butterfly, then warps in order
                acc = T.float32(0)
                for j in T.unroll(VPT):
                    for v in T.vectorized(VEC):
                        dyv[v] = ring[st, 0, r, (j * G + lane) * VEC + v]
                    for v in T.vectorized(VEC):
                        xv[v] = ring[st, 1, r, (j * G + lane) * VEC + v]
                    for v in T.unroll(VEC):
                        gw = T.ieee_mul(T.Cast(f32, dyv[v]), out_scale)
                        if has_weight:
                            gw = T.ieee_mul(gw, T.Cast(f32, wv[j * VEC + v]))
                        acc = T.ieee_add(acc, T.ieee_mul(T.ieee_mul(T.Cast(f32, xv[v]), rs), gw))
                for kk in T.unroll(min(G, 32).bit_length() - 1):
                    acc = T.ieee_add(acc, T.shfl_xor(acc, (min(G, 32) // 2) >> kk))
                if W > 1:
                    if tid % 32 == 0:
                        red[k % 2, r, lane // 32] = acc
                    T.sync_threads()
                    acc = T.float32(0)
                    for kk in T.unroll(W):
                        acc = T.ieee_add(acc, red[k % 2, r, kk])
                mean = T.ieee_fdiv(acc, T.float32(hidden))
                for j in T.unroll(VPT):
                    for v in T.vectorized(VEC):
                        dyv[v] = ring[st, 0, r, (j * G + lane) * VEC + v]
                    for v in T.vectorized(VEC):
                        xv[v] = ring[st, 1, r, (j * G + lane) * VEC + v]
                    if has_residual_grad:
                        for v in T.vectorized(VEC):
                            gv[v] = ring[st, 2, r, (j * G + lane) * VEC + v]
                    for v in T.unroll(VEC):
                        g = T.ieee_mul(T.Cast(f32, dyv[v]), out_scale)
                        gw = g
                        if has_weight:
                            gw = T.ieee_mul(g, T.Cast(f32, wv[j * VEC + v]))
                        xh = T.ieee_mul(T.Cast(f32, xv[v]), rs)
                        d = T.ieee_mul(T.ieee_sub(gw, T.ieee_mul(xh, mean)), rs)
                        if has_residual_grad:
                            d = T.ieee_add(d, T.Cast(f32, gv[v]))
                        dxv[j * VEC + v] = T.Cast(dtype, d)
                        if has_weight:
                            accw[j * VEC + v] = T.if_then_else(row < TT, T.ieee_add(accw[j * VEC + v], T.ieee_mul(xh, g)), accw[j * VEC + v])
                if row < TT:
                    for j in T.unroll(VPT):
                        if (j * G + lane) < lay.nvec:
                            for v in T.vectorized(VEC):
                                dx[row, (j * G + lane) * VEC + v] = dxv[j * VEC + v]
            if has_weight:
                for j in T.unroll(VPT):
                    if (j * G + lane) < lay.nvec:
                        for v in T.vectorized(VEC):
                            partial[b, r, (j * G + lane) * VEC + v] = accw[j * VEC + v]

        if has_weight:
            with T.Kernel(hidden // RC, threads=RL * RV) as c:
                T.assume(PS % 4 == 0)
                T.assume(PR % 4 == 0)
                lanes = T.alloc_shared((RL, RC), f32)
                sums = T.alloc_local((4,), f32)
                part = T.alloc_local((4,), f32)
                total = T.alloc_var(f32)
                t = T.get_thread_binding(0)
                cv = t % RV
                rl = t // RV
                for q in T.unroll(4):
                    sums[q] = T.float32(0)
                for k in T.serial(T.ceildiv(NC * ROWS - rl, RL)):
                    p = rl + k * RL
                    for q in T.vectorized(4):
                        part[q] = partial[p // ROWS, p % ROWS, c * RC + cv * 4 + q]
                    for q in T.unroll(4):
                        sums[q] = T.ieee_add(sums[q], part[q])
                for q in T.vectorized(4):
                    lanes[rl, cv * 4 + q] = sums[q]
                T.sync_threads()
                if t < RC:
                    total = T.float32(0)
                    for q in T.unroll(RL):
                        total = T.ieee_add(total, lanes[q, t])
                    dw[c * RC + t] = total

    return norm_backward


# ---------------------------------------------------------------------------------------------
# References (pure JAX, in the kernels' operation order).


def row_sum(v: jax.Array, lay: RowLayout) -> jax.Array:
    """``sum(v, axis=-1)`` of fp32 ``v[T, H]`` in the kernels' order: each thread adds its elements
    in turn (its vectors, then their elements), a butterfly adds the row's lanes within each warp,
    then the warps are added in order."""
    t = v.shape[0]
    span = lay.vpt * lay.group * lay.vec
    v = jnp.pad(v, ((0, 0), (0, span - lay.hidden))).reshape(t, lay.vpt, lay.group, lay.vec)
    acc = jnp.zeros((t, lay.group), jnp.float32)
    for j in range(lay.vpt):
        for e in range(lay.vec):
            acc = acc + v[:, j, :, e]
    width = min(lay.group, 32)
    lanes = acc.reshape(t, lay.group // width, width)
    while width > 1:  # lane i and lane i ^ (width / 2) hold the same sum afterwards
        width //= 2
        lanes = lanes[..., :width] + lanes[..., width : 2 * width]
    warps = lanes[..., 0]
    if lay.warps == 1:
        return warps[:, 0]
    total = jnp.zeros((t,), jnp.float32)
    for w in range(lay.warps):
        total = total + warps[:, w]
    return total


def _split(rest, *flags):
    """The optional operands, in order, as a list with None where a flag is off."""
    rest = list(rest)
    return [rest.pop(0) if flag else None for flag in flags]


def normalize(x: jax.Array, residual, weight, eps: float, out_scale: float):
    """``(y, rstd, s)`` for 2-D ``x``: the RMSNorm forward in the kernel's operation order."""
    f32 = jnp.float32
    lay = row_layout(x.shape[-1], x.dtype)
    s = x if residual is None else (x.astype(f32) + residual.astype(f32)).astype(x.dtype)
    sv = s.astype(f32)
    mean = formats.exact_div(row_sum(sv * sv, lay), np.float32(x.shape[-1]))
    rstd = formats.exact_div(np.float32(1), jnp.sqrt(mean + np.float32(eps)))
    scale = np.float32(out_scale) if weight is None else weight.astype(f32) * np.float32(out_scale)
    y = ((sv * rstd[:, None]) * scale).astype(x.dtype)
    return y, rstd, s


def _forward_reference(x, *rest, eps, out_scale, has_residual, has_weight, with_out, with_rstd, sf_layout, round_sf, tuning=()):
    residual, weight = _split(rest, has_residual, has_weight)
    y, rstd, s = normalize(x, residual, weight, eps, out_scale)
    outs = [y] if with_out else []
    outs += [s] if has_residual else []
    outs += [rstd] if with_rstd else []
    if sf_layout:
        data, sf = formats.quantize_blocks(y, "e4m3", (1, QUANT_GROUP), round_sf=round_sf)
        outs += [data, formats.store_sf(sf, sf_layout)]
    return tuple(outs)


@jax.custom_jvp
def _rounded(p: jax.Array) -> jax.Array:
    """fp32 ``p`` unchanged, but rounded on its own: XLA cannot contract the product that makes it into
    a later sum (an FMA; an optimization barrier does not stop that). Its bits are or-ed with
    ``isnan(p)``, a no-op the compiler cannot see through."""
    bits = jax.lax.bitcast_convert_type(p, jnp.uint32)
    return jax.lax.bitcast_convert_type(bits | (p != p).astype(jnp.uint32), jnp.float32)


_rounded.defjvp(lambda primals, tangents: (_rounded(primals[0]), tangents[0]))


def _sequential_sum(chunks: jax.Array) -> jax.Array:
    """``chunks[0] + chunks[1] + ...`` in that order (fp32, from zero), over the leading axis."""
    return jax.lax.scan(lambda acc, c: (acc + c, None), jnp.zeros(chunks.shape[1:], jnp.float32), chunks)[0]


def reduce_dw(contrib: jax.Array, lay: RowLayout, ctas: int) -> jax.Array:
    """``sum(contrib, axis=0)`` of fp32 ``contrib[T, H]`` in the backward kernels' order.

    Kernel 1: CTA ``b`` of ``ctas`` takes row blocks ``b, b + ctas, ...`` (``lay.rows`` rows each) and
    thread group ``r`` adds its rows in turn into partial row ``b * rows + r``; kernel 2: lane ``l`` of
    32 adds partial rows ``l, l + 32, ...`` in turn, then the 32 lane sums are added in lane order.
    Rows past the last token count as zeros (adding zero to a sum leaves it unchanged).
    """
    t, h = contrib.shape
    if t == 0:
        return jnp.zeros((h,), jnp.float32)
    width = ctas * lay.rows  # partial rows
    steps = -(-t // width)
    chunks = jnp.pad(contrib, ((0, steps * width - t), (0, 0))).reshape(steps, width, h)
    partial = _sequential_sum(chunks)  # row b * rows + r of chunk k is token (b + k * ctas) * rows + r
    lanes = _sequential_sum(jnp.pad(partial, ((0, -width % 32), (0, 0))).reshape(-1, 32, h))
    total = jnp.zeros((h,), jnp.float32)
    for lane in range(32):
        total = total + lanes[lane]
    return total


def _backward_reference(dy, x, rstd, *rest, out_scale, has_weight, has_residual_grad, tuning=()):
    """``(dx, dw)`` in the kernels' operation order: dx per row, dw summed over the tokens in the
    fixed partition of :func:`reduce_dw`."""
    weight, residual_grad = _split(rest, has_weight, has_residual_grad)
    f32 = jnp.float32
    t, h = x.shape
    lay = row_layout(h, x.dtype)
    rs = rstd[:, None]
    g = dy.astype(f32) * np.float32(out_scale)
    gw = g if weight is None else g * weight.astype(f32)
    xh = x.astype(f32) * rs
    mean = formats.exact_div(row_sum(xh * gw, lay), np.float32(h))[:, None]
    d = (gw - xh * mean) * rs
    if residual_grad is not None:
        d = d + residual_grad.astype(f32)
    dx = d.astype(x.dtype)
    if not has_weight:
        return (dx,)
    ctas = backward_plan(t, h, x.dtype, has_residual_grad, tuning)[2]
    return dx, reduce_dw(_rounded(xh * g), lay, ctas)


# ---------------------------------------------------------------------------------------------
# Launches.


def _dummy_rows(t: int, width: int) -> View:
    """A ``[t, width]`` view of a ``[width]`` workspace, every row the same (never touched)."""
    return View((t, width), (0, 1))


def _forward_launch(x, *rest, eps, out_scale, has_residual, has_weight, with_out, with_rstd, sf_layout, round_sf, tuning=()) -> Launch:
    t, h = x.shape
    dtype = jnp.dtype(x.dtype)
    kb = h // QUANT_GROUP
    operands = ["x"] + (["residual"] if has_residual else []) + (["weight"] if has_weight else [])
    results = (["out"] if with_out else []) + (["norm_input"] if has_residual else [])
    results += (["rstd"] if with_rstd else []) + (["data", "sf"] if sf_layout else [])
    buffers = {name: i for i, name in enumerate(operands + results)}
    workspace, views = [], {}

    def dummy(name, shape, dt, view=None):
        buffers[name] = len(operands) + len(results) + len(workspace)
        workspace.append(jax.ShapeDtypeStruct(shape, dt))
        if view is not None:
            views[name] = view

    if not has_residual:
        dummy("residual", (h,), dtype, _dummy_rows(t, h))
        dummy("norm_input", (h,), dtype, _dummy_rows(t, h))
    if not has_weight:
        dummy("weight", (h,), dtype)
    if not with_out:
        dummy("out", (h,), dtype, _dummy_rows(t, h))
    if not with_rstd:
        dummy("rstd", (1,), jnp.float32, View((t,), (0,)))
    if not sf_layout:
        dummy("data", (h,), jnp.float8_e4m3fn, _dummy_rows(t, h))
        dummy("sf", (kb,), jnp.float32, _dummy_rows(t, kb))
    elif sf_layout == "col_ue8m0":  # int32 words seen as their 4 bytes
        kw, tp = formats.sf_storage_shape(sf_layout, (t, kb))[0]
        views["sf"] = View((kw, tp, 4), (4 * tp, 4, 1), dtype=np.uint8)
    elif sf_layout == "col":
        kb, tp = formats.sf_storage_shape(sf_layout, (t, kb))[0]
        views["sf"] = View((kb, tp), (tp, 1))
    return Launch(
        kernel=norm_forward_kernel,
        params=dict(
            hidden=h, dtype=dtype.name, has_residual=has_residual, has_weight=has_weight, with_out=with_out,
            with_rstd=with_rstd, sf_layout=sf_layout, round_sf=round_sf,
            blocks_per_sm=dict(tuning).get("blocks_per_sm", forward_blocks_per_sm(row_layout(h, dtype))),
        ),
        scalars=dict(eps=float(eps), out_scale=float(out_scale)),
        buffers=buffers,
        views=views,
        workspace=tuple(workspace),
    )  # fmt: skip


def backward_ctas(tokens: int, lay: RowLayout, ctas_per_sm: int) -> int:
    """CTAs of the backward kernel, each summing its own partial dw rows: ``ctas_per_sm`` per SM of
    an H200 (``PARTIAL_SMS``), fewer for few tokens. A function of the shapes only, so that every GPU
    sums dw in the same order (on GPUs with fewer SMs the CTAs beyond one wave run in a second)."""
    return min(ctas_per_sm * PARTIAL_SMS, -(-tokens // lay.rows))


def backward_plan(tokens: int, hidden: int, dtype, has_residual_grad: bool, tuning=()) -> tuple[int, int, int]:
    """``(stages, ctas_per_sm, ctas)`` of the backward kernel (``tuning`` overrides the first two)."""
    stages, ctas_per_sm = backward_config(hidden, dtype, has_residual_grad)
    tune = dict(tuning)
    stages, ctas_per_sm = tune.get("stages", stages), tune.get("ctas_per_sm", ctas_per_sm)
    return stages, ctas_per_sm, backward_ctas(tokens, row_layout(hidden, dtype), ctas_per_sm)


def _backward_launch(dy, x, rstd, *rest, out_scale, has_weight, has_residual_grad, tuning=()) -> Launch:
    t, h = x.shape
    dtype = jnp.dtype(x.dtype)
    lay = row_layout(h, dtype)
    stages, ctas_per_sm, nc = backward_plan(t, h, dtype, has_residual_grad, tuning)
    names = ["dy", "x", "rstd"] + (["weight"] if has_weight else []) + (["residual_grad"] if has_residual_grad else [])
    names += ["dx"] + (["dw"] if has_weight else [])
    buffers = {name: i for i, name in enumerate(names)}
    workspace, views = [], {}

    def scratch(name, shape, dt, view):
        buffers[name] = len(names) + len(workspace)
        workspace.append(jax.ShapeDtypeStruct(shape, dt))
        if view is not None:
            views[name] = view

    if has_weight:
        scratch("partial", (nc * lay.rows * h,), jnp.float32, View((nc, lay.rows, h)))
    else:
        scratch("weight", (h,), dtype, None)
        scratch("partial", (h,), jnp.float32, View((nc, lay.rows, h), (0, 0, 1)))
        scratch("dw", (h,), jnp.float32, None)
    if not has_residual_grad:
        scratch("residual_grad", (h,), dtype, _dummy_rows(t, h))
    return Launch(
        kernel=norm_backward_kernel,
        params=dict(
            hidden=h, dtype=dtype.name, has_weight=has_weight, has_residual_grad=has_residual_grad,
            stages=stages, ctas_per_sm=ctas_per_sm,
        ),
        scalars=dict(out_scale=float(out_scale)),
        buffers=buffers,
        views=views,
        workspace=tuple(workspace),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# vmap: fold the mapped axis into the tokens.


def _fold(args, dims, num_token_args: int, op, impl, static):
    """Runs ``op`` once on the token-indexed operands (the first ``num_token_args``) with the mapped
    axis folded into their tokens; the outputs are per token."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    t = args[0].shape[0] if dims[0] is None else jnp.moveaxis(args[0], dims[0], 0).shape[1]
    folded = []
    for a, d in zip(args[:num_token_args], dims[:num_token_args]):
        a = jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
        folded.append(a.reshape(size * t, *a.shape[2:]))
    outs = op(*folded, *args[num_token_args:], impl=impl, **static)
    return [o.reshape(size, t, *o.shape[1:]) for o in outs], [0] * len(outs)


def _folded_tokens(args, dims) -> int:
    """Tokens of the mapped op with the batch folded in (they must stay within ``MAX_ROWS``)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    return size * (args[0].shape[0] if dims[0] is None else args[0].shape[1 if dims[0] == 0 else 0])


def _forward_batch(args, dims, *, impl, **static):
    n = 2 if static["has_residual"] else 1
    if any(d is not None for d in dims[n:]) or static["sf_layout"] in ("col", "col_ue8m0") or _folded_tokens(args, dims) > MAX_ROWS:
        return map_batch(args, dims, lambda *xs: list(_forward_op(*xs, impl=impl, **static)))
    return _fold(args, dims, n, _forward_op, impl, static)


def _backward_batch(args, dims, *, impl, **static):
    if static["has_weight"] or _folded_tokens(args, dims) > MAX_ROWS:  # dw sums over each batch element's tokens
        return map_batch(args, dims, lambda *xs: list(_backward_op(*xs, impl=impl, **static)))
    return _fold(args, dims, len(args), _backward_op, impl, static)


_forward_op = TileOp(name="norm_forward", launch=_forward_launch, reference=_forward_reference, batch=_forward_batch)
_backward_op = TileOp(name="norm_backward", launch=_backward_launch, reference=_backward_reference, batch=_backward_batch)


# ---------------------------------------------------------------------------------------------
# Public API.


def _check(op: str, x, weight, residual, align: int, min_hidden: int = 1) -> None:
    if x.ndim not in (2, 3):
        raise ValueError(f"{op}: x must be [T, H] or [B, T, H], got shape {x.shape}")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise ValueError(f"{op}: x must be bfloat16 or float32, got {x.dtype}")
    h = x.shape[-1]
    if h % align or not max(min_hidden, 1) <= h <= MAX_HIDDEN:
        raise ValueError(f"{op}: the hidden size H must be a multiple of {align} in [{max(min_hidden, align)}, {MAX_HIDDEN}], got {h}")
    if math.prod(x.shape[:-1]) > MAX_ROWS:
        raise ValueError(f"{op}: x may have at most {MAX_ROWS} tokens (B·T; the kernels index rows with int32), got {math.prod(x.shape[:-1])}")
    if weight is not None and (tuple(weight.shape) != (h,) or weight.dtype != x.dtype):
        raise ValueError(f"{op}: weight must be [H] = [{h}] in x's dtype {x.dtype}, got {weight.shape} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual must match x ({x.shape} {x.dtype}), got {residual.shape} {residual.dtype}")


def _arrays(op: str, **values):
    """The array arguments as JAX arrays (None stays None); TypeError naming the op and the argument
    for anything that is not an array of numbers."""
    return [formats.as_array(op, name, value, optional=True) for name, value in values.items()]


def _impl(op: str, impl) -> None:
    if not (impl is None or (isinstance(impl, str) and impl in ("tilelang", "xla"))):
        raise ValueError(f"{op}: impl must be None, 'tilelang' or 'xla', got {impl!r:.60}")


def _statics(op: str, eps, out_scale, impl) -> tuple[float, float]:
    """eps (finite, >= 0) and out_scale (finite) as floats; impl checked."""
    _impl(op, impl)
    return formats.static_number(op, "eps", eps, minimum=0.0, optional=False), formats.static_number(op, "out_scale", out_scale, optional=False)


def _forward_inputs(op: str, x, weight, residual, eps, out_scale, impl, align: int, min_hidden: int = 1):
    """The forward ops' arguments checked: (x, weight, residual) as arrays, eps and out_scale as floats."""
    eps, out_scale = _statics(op, eps, out_scale, impl)
    x, weight, residual = _arrays(op, x=x, weight=weight, residual=residual)
    if x is None:
        raise TypeError(f"{op}: x must be an array, got None")
    _check(op, x, weight, residual, align, min_hidden=min_hidden)
    return x, weight, residual, eps, out_scale


def _run_forward(x, weight, eps, residual, out_scale, impl, **flags):
    """The forward op on 2-D tokens: the outputs in op order, and the leading shape of x."""
    lead, h = x.shape[:-1], x.shape[-1]
    args = [x.reshape(-1, h)] + ([residual.reshape(-1, h)] if residual is not None else []) + ([weight] if weight is not None else [])
    outs = _forward_op(
        *args, impl=impl, eps=float(eps), out_scale=float(out_scale),
        has_residual=residual is not None, has_weight=weight is not None, **flags,
    )  # fmt: skip
    return list(outs), lead


def norm_forward(
    x: jax.Array,
    weight: jax.Array | None,
    eps: float,
    residual: jax.Array | None = None,
    out_scale: float = 1.0,
    with_rstd: bool = False,
    impl=None,
):
    """RMSNorm with an optional residual add: ``(out, rstd | None, norm_input)``.

    Args:
      x: ``[T, H]`` or ``[B, T, H]``, bf16 or fp32; H % 16 == 0, H <= 8192.
      weight: ``[H]`` in x's dtype, or None (unit weight).
      eps: added to the mean square (a finite number >= 0).
      residual: like x, added to x first (in fp32, rounded to x's dtype).
      out_scale: multiplies the weight (in fp32).
      with_rstd: also return ``rstd`` (fp32, x's shape without H), as the backward needs.

    Returns:
      ``out`` (like x), ``rstd`` or None, and ``norm_input = round(x + residual)`` (x itself without a
      residual). See the module docstring for the exact operation order.
    """
    op = "norm_forward"
    x, weight, residual, eps, out_scale = _forward_inputs(op, x, weight, residual, eps, out_scale, impl, FORWARD_ALIGN)
    with_rstd = formats.static_bool(op, "with_rstd", with_rstd)
    outs, lead = _run_forward(x, weight, eps, residual, out_scale, impl, with_out=True, with_rstd=with_rstd, sf_layout="", round_sf=False)
    out = outs.pop(0).reshape(x.shape)
    norm_input = outs.pop(0).reshape(x.shape) if residual is not None else x
    rstd = outs.pop(0).reshape(lead) if with_rstd else None
    return out, rstd, norm_input


def norm_forward_and_per_token_cast(
    x: jax.Array,
    weight: jax.Array | None,
    eps: float,
    fmt: str = "e4m3",
    num_per_channels: int = QUANT_GROUP,
    residual: jax.Array | None = None,
    out_scale: float = 1.0,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    with_out_bf16: bool = False,
    with_rstd: bool = False,
    impl=None,
):
    """RMSNorm (as :func:`norm_forward`) fused with a per-token e4m3 cast of its output:
    ``((data, sf), out_bf16 | None, rstd | None, norm_input)``.

    Only ``fmt="e4m3"`` with ``num_per_channels=32`` (TileKernels' rule); H % 32 == 0. ``data`` is
    float8_e4m3fn like x; ``sf`` follows the layout flags (:func:`formats.sf_layout`): row-major fp32
    ``[..., T, H/32]``, or the column-major storage of all ``B*T`` tokens (``[H/32, align(B*T, 4)]``
    fp32, or packed UE8M0 int32 ``[ceil(H/128), align(B*T, 4)]``), padding zero. The result equals
    ``per_token_cast`` of ``norm_forward``'s output bit for bit. ``out_bf16`` (``with_out_bf16``) is
    that output, in x's dtype. TileKernels' ``mega_moe_sf`` output is not provided.
    """
    op = "norm_forward_and_per_token_cast"
    x, weight, residual, eps, out_scale = _forward_inputs(op, x, weight, residual, eps, out_scale, impl, QUANT_GROUP)
    if not (isinstance(fmt, str) and fmt == "e4m3"):
        raise ValueError(f"{op}: fmt must be 'e4m3' (use norm_forward unquantized), got {fmt!r:.60}")
    if isinstance(num_per_channels, (bool, np.bool_)) or not isinstance(num_per_channels, (int, np.integer)):
        raise TypeError(f"{op}: num_per_channels must be an int, got {type(num_per_channels).__name__} {num_per_channels!r:.60}")
    if num_per_channels != QUANT_GROUP:
        raise ValueError(f"{op}: num_per_channels must be {QUANT_GROUP}, got {num_per_channels}")
    col, packed, round_sf = (formats.static_bool(op, n, v) for n, v in (
        ("use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf), ("use_packed_ue8m0", use_packed_ue8m0), ("round_sf", round_sf),
    ))  # fmt: skip
    try:
        layout = formats.sf_layout(col, packed, round_sf)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(op) else f"{op}: {message}") from None
    with_out_bf16, with_rstd = formats.static_bool(op, "with_out_bf16", with_out_bf16), formats.static_bool(op, "with_rstd", with_rstd)
    outs, lead = _run_forward(
        x, weight, eps, residual, out_scale, impl, with_out=with_out_bf16, with_rstd=with_rstd, sf_layout=layout, round_sf=round_sf,
    )  # fmt: skip
    out = outs.pop(0).reshape(x.shape) if with_out_bf16 else None
    norm_input = outs.pop(0).reshape(x.shape) if residual is not None else x
    rstd = outs.pop(0).reshape(lead) if with_rstd else None
    data, sf = outs
    if layout == "row":
        sf = sf.reshape(*lead, sf.shape[-1])
    return (data.reshape(x.shape), sf), out, rstd, norm_input


def norm_backward(
    out_grad: jax.Array,
    x: jax.Array,
    weight: jax.Array | None,
    rstd: jax.Array,
    residual_out_grad: jax.Array | None = None,
    out_scale: float = 1.0,
    impl=None,
):
    """The RMSNorm backward: ``(x_grad, weight_grad | None)``.

    Args:
      out_grad: the gradient of ``out``, like x.
      x: the forward's ``norm_input``, ``[T, H]`` or ``[B, T, H]``, bf16 or fp32; H % 32 == 0, H <= 8192.
      weight: ``[H]`` in x's dtype, or None.
      rstd: fp32, x's shape without H (the forward's ``rstd``).
      residual_out_grad: the gradient of ``norm_input`` (like x), added to ``x_grad``.
      out_scale: as in the forward.

    Returns:
      ``x_grad`` like x, and ``weight_grad`` fp32 ``[H]`` (None without a weight), reduced over tokens
      in a fixed order that depends on the shapes only (the same bits on every GPU).
    """
    op = "norm_backward"
    _impl(op, impl)
    out_scale = formats.static_number(op, "out_scale", out_scale, optional=False)
    out_grad, x, weight, rstd, residual_out_grad = _arrays(
        op, out_grad=out_grad, x=x, weight=weight, rstd=rstd, residual_out_grad=residual_out_grad
    )  # fmt: skip
    for name, value in (("out_grad", out_grad), ("x", x), ("rstd", rstd)):
        if value is None:
            raise TypeError(f"{op}: {name} must be an array, got None")
    _check(op, x, weight, residual_out_grad, BACKWARD_ALIGN, min_hidden=BACKWARD_ALIGN)
    if out_grad.shape != x.shape or out_grad.dtype != x.dtype:
        raise ValueError(f"{op}: out_grad must match x ({x.shape} {x.dtype}), got {out_grad.shape} {out_grad.dtype}")
    if rstd.shape != x.shape[:-1] or rstd.dtype != jnp.float32:
        raise ValueError(f"{op}: rstd must be float32 {x.shape[:-1]}, got {rstd.shape} {rstd.dtype}")
    h = x.shape[-1]
    args = [out_grad.reshape(-1, h), x.reshape(-1, h), rstd.reshape(-1)]
    args += ([weight] if weight is not None else []) + ([residual_out_grad.reshape(-1, h)] if residual_out_grad is not None else [])
    outs = _backward_op(
        *args, impl=impl, out_scale=out_scale, has_weight=weight is not None, has_residual_grad=residual_out_grad is not None,
    )  # fmt: skip
    return outs[0].reshape(x.shape), (outs[1] if weight is not None else None)


def _rms_norm_primal(x, weight, residual, *, impl=None, eps, out_scale):
    out, _, norm_input = norm_forward(x, weight, eps, residual=residual, out_scale=out_scale, impl=impl)
    return out if residual is None else (out, norm_input)


def _rms_norm_fwd(x, weight, residual, *, impl=None, eps, out_scale):
    out, rstd, norm_input = norm_forward(x, weight, eps, residual=residual, out_scale=out_scale, with_rstd=True, impl=impl)
    output = out if residual is None else (out, norm_input)
    return output, (norm_input, weight, rstd, Static(residual is not None))


def _rms_norm_bwd(residuals, g, *, impl=None, eps, out_scale):
    norm_input, weight, rstd, has_residual = residuals
    d_out, d_norm_input = g if has_residual.value else (g, None)
    dx, dw = norm_backward(d_out, norm_input, weight, rstd, residual_out_grad=d_norm_input, out_scale=out_scale, impl=impl)
    return dx, (None if weight is None else dw.astype(weight.dtype)), (dx if has_residual.value else None)


_rms_norm = with_vjp(_rms_norm_primal, _rms_norm_fwd, _rms_norm_bwd)


def rms_norm(
    x: jax.Array,
    weight: jax.Array | None,
    eps: float,
    residual: jax.Array | None = None,
    out_scale: float = 1.0,
    impl=None,
):
    """Differentiable RMSNorm: ``out``, or ``(out, norm_input)`` with a residual.

    The forward is :func:`norm_forward`, the backward :func:`norm_backward` (straight through the
    rounding of ``norm_input``); gradients flow to x, weight and residual. H % 32 == 0 (the backward's
    rule). ``impl="xla"`` differentiates the JAX reference instead.
    """
    op = "rms_norm"
    x, weight, residual, eps, out_scale = _forward_inputs(op, x, weight, residual, eps, out_scale, impl, BACKWARD_ALIGN, min_hidden=BACKWARD_ALIGN)
    return _rms_norm(x, weight, residual, impl=impl, eps=eps, out_scale=out_scale)
