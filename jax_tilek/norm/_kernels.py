"""The RMSNorm kernels (TileKernels v2.1 ``norm_forward``, ``norm_forward_and_per_token_cast``,
``norm_backward``), their thread layout and the heuristics that size them.

The thread layout (:func:`row_layout`) fixes the order of every sum; the references
(:mod:`jax_tilek.norm._reference`) mirror it. See :mod:`jax_tilek.norm` for the arithmetic.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

import dataclasses

import jax.numpy as jnp

from jax_tilek import device
from jax_tilek.kernel import kernel
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

    Tensors a configuration does not use are left unbound and never touched. With a column-major sf
    the grid also covers the padding tokens ``[T, align(T, 4))``, whose sf entries it zeroes.
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
_CP_ASYNC = device.prelude(device.CP_ASYNC)


def backward_config(hidden: int, dtype, has_residual_grad: bool) -> tuple[int, int]:
    """``(stages, ctas_per_sm)`` of the backward kernel: about ``RING_BYTES_PER_SM`` of cp.async rings
    per SM (measured best on an H200), as two CTAs when two 2-row rings fit, else one; 2 to 4 rows
    per ring."""
    lay = row_layout(hidden, dtype)
    per_stage = (3 if has_residual_grad else 2) * lay.rows * lay.vpt * lay.group * 16 + lay.threads * 4
    ctas = 2 if 4 * per_stage <= RING_BYTES_PER_SM else 1
    return int(max(2, min(4, RING_BYTES_PER_SM // (ctas * per_stage)))), ctas


def backward_ctas(tokens: int, lay: RowLayout, ctas_per_sm: int) -> int:
    """CTAs of the backward kernel, each summing its own partial dw rows: ``ctas_per_sm`` per SM of
    an H200 (``PARTIAL_SMS``), fewer for few tokens. A function of the shapes only, so that every GPU
    sums dw in the same order (on GPUs with fewer SMs the CTAs beyond one wave run in a second)."""
    return min(ctas_per_sm * PARTIAL_SMS, -(-tokens // lay.rows))


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
