"""Per-token casts to FP8 (e4m3) / FP4 (e2m1) with 1 x npc scale blocks (TileKernels v1 §2.1, v2.1 §2.3).

``per_token_cast(x, fmt, num_per_channels) -> (data, sf)``: every row of ``x[T, H]`` is cut into
blocks of ``num_per_channels`` (npc) columns (or one block, npc == H); each block gets a scale from
its absolute maximum (``formats.scale_factors``) and its values are quantized with it. Plus the
variants that only compute scales (``per_token_cast_with_sf_only``) and that cast with given scales
(``per_token_cast_with_precomputed_sf``).

Partial blocks: as in TileKernels, H need only be a multiple of 64, so npc = 128 need not divide it.
There are ``K_b = ceil(H / npc)`` blocks per row; the last one (e.g. columns 512..575 of H = 576) is
partial, and its amax, scale and quantized values come from the columns it has (TileKernels' kernel
loads the missing columns as zeros, its reference masks them out of the maximum: the same amax).

Inputs: bf16/fp32 ``[T, H]`` (rows may be a column window of a wider array, read in place), or a
QuantTensor ``(data, sf)`` of e4m3 data ``[T, H]`` or packed FP4 data ``[T, H/2]`` with its scales
in blocks ``x_block_size`` (re-quantization). As in TileKernels' kernel, a re-quantized block's
amax is ``max |code| * x_sf`` (fp32) and its outputs are ``code * (x_sf * sf_inv)``, the scale
product rounded to fp32 first.

Scale-factor layouts follow ``formats`` (``sf_layout``, ``store_sf``, ``sf_storage_shape``): fp32
row-major ``[T, K_b]``, fp32 TMA-aligned column-major storage ``[K_b, align(T, 4)]``, packed UE8M0 int32
``[ceil(K_b/4), align(T, 4)]``, or float8_e4m3fn scales (``use_e4m3_sf``) row-major or column-major
``[K_b, align(T, 16)]`` (16-byte aligned columns, TileKernels 2.1). Padding is zero.

Stochastic rounding (``stochastic_cast``) uses :mod:`jax_tilek.quant._cast`'s random bits: the
values rounded are the scaled fp32 values, quad ``i`` is ``x[t, 4j:4j+4]`` with
``i = (t * H/4 + j) mod 2^32`` (uint32 arithmetic, in the kernel and the reference).

Row-wise (vmap folds into the tokens, which shard) unless the scales are column-major, the input's
scale blocks span several tokens, or the rounding is stochastic (its random bits hash the token index).

Sizes: T < ``formats.MAX_TOKENS`` (int32 row indices); element offsets are 64-bit, so T * H is not
limited; one CTA-wide 1-D grid of ``ceil(T / rows_per_cta)`` CTAs.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, View, check_impl, config_class, uses
from jax_tilek.quant import formats as F
from jax_tilek.quant._cast import PRELUDE, random_bits, sr_e2m1_codes, sr_e4m3, tir_quad_hash
from jax_tilek.testing import ArgSpec, random_array

FMTS = ("e4m3", "e2m1")
# Scale-factor storage kinds: dtype + layout (see the module docstring).
SF_KINDS = {
    "f32_row": ("row", "float32"),
    "e4m3_row": ("row", "float8_e4m3fn"),
    "f32_col": ("col", "float32"),
    "e4m3_col": ("col", "float8_e4m3fn"),
    "ue8m0_col": ("col_ue8m0", "int32"),
}
ELEMS = 32  # elements per thread
CTA_THREADS = 256  # about this many threads per CTA


def amax_floor(fmt: str, use_e4m3_sf: bool, amax_clamp: float | None) -> float:
    """The lower clamp of a block's amax: ``amax_clamp``, else TileKernels v2.1's default
    (the format's floor; with E4M3 scales ``max * 2^-9``, so that the smallest scale is 2^-9)."""
    if amax_clamp is not None:
        return float(amax_clamp)
    f = F.get_format(fmt)
    return f.max_value * 2.0**-9 if use_e4m3_sf else f.amax_floor


# ---------------------------------------------------------------------------------------------
# The kernel.


def plan(hidden: int, num_per_channels: int, elems: int = ELEMS, cta_threads: int = CTA_THREADS) -> dict:
    """Thread mapping: each row is spread over ``align(H / elems, 32)`` lanes (whole warps), a CTA
    takes ``rows_per_cta`` rows (about ``cta_threads`` threads). A block of npc columns lies within
    one thread or an aligned power-of-two group of at most 32 lanes (``shfl_xor``; the lanes of a
    partial last block past the row's end hold zeros), except for npc == H rows that need a CTA-wide
    reduction (``row_reduce``)."""
    if hidden <= 0 or hidden % elems:
        raise ValueError(f"per_token_cast: the hidden size must be a positive multiple of {elems} (elements per thread), got {hidden}")
    lanes = num_per_channels // elems
    lanes_per_row = -(-(hidden // elems) // 32) * 32
    if lanes_per_row > 1024:
        raise ValueError(f"per_token_cast: hidden sizes up to {1024 * elems} are supported, got {hidden}")
    rows = max(1, cta_threads // lanes_per_row)
    row_reduce = num_per_channels > elems and (lanes > 32 or lanes & (lanes - 1) != 0)
    return dict(elems=elems, threads=rows * lanes_per_row, rows_per_cta=rows, row_reduce=row_reduce)


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def per_token_cast_kernel(
    hidden: int,
    npc: int,
    fmt: str,
    x_kind: str,
    x_sf: tuple | None,
    sf_in: str | None,
    sf_out: str | None,
    write_data: bool,
    round_sf: bool,
    e4m3_sf: bool,
    stochastic: bool,
    elems: int = ELEMS,
    threads: int = 256,
    rows_per_cta: int = 1,
    row_reduce: bool = False,
):
    """Quantizes ``elems`` consecutive elements of a row per thread.

    A CTA takes ``rows_per_cta`` rows, each spread over ``threads / rows_per_cta`` lanes (whole
    warps; lanes past the row's end idle). A scale block of npc > elems columns spans an aligned
    group of npc / elems lanes, reduced with ``shfl_xor``, or, with ``row_reduce`` (npc == H), the
    row's warps, through shared memory. A partial last block (npc not dividing H) spans lanes past
    the row's end, which hold zeros: its amax is that of the columns it has. Loads and stores are
    16-byte vectors; scale factors are written by the block's first lane, with the zero padding of
    column-major layouts (up to 16 bytes per column) written by the threads of the last row.

    Args (static): ``x_kind`` bfloat16 | float32 | e4m3 | e2m1; ``x_sf`` (kind, bm, bk) of the input's
    scales (re-quantization) or None; ``sf_in`` the kind of given scales (cast-only mode) or None;
    ``sf_out`` the kind of scales to write or None; ``write_data`` False for the sf-only mode.
    Tensor parameters a call does not use (``x_sf_buf``, ``seed``, ``y``) are unused bindings.
    """
    import tilelang.language as T

    quad_hash = tir_quad_hash()
    max_value = F.get_format(fmt).max_value
    chunks = hidden // elems  # chunks per row
    groups = max(elems // npc, 1)  # scale blocks per thread
    lanes = max(npc // elems, 1)  # lanes per scale block (flat mapping)
    width = min(npc, elems)  # columns of a block inside one thread
    num_blocks = F.ceil_div(hidden, npc)  # K_b (the last block may be partial)
    lanes_per_row = threads // rows_per_cta
    warps_per_row = lanes_per_row // 32

    Tn, S = T.dynamic("T, S")  # tokens; row stride of x (in its elements)
    XA, XB = T.dynamic("XA, XB")  # x_sf storage
    SA, SB = T.dynamic("SA, SB")  # sf storage
    NS = T.dynamic("NS")  # seed (1 or 0 elements)
    x_dtype, x_width, x_vec = {
        "bfloat16": ("bfloat16", hidden, 8),
        "float32": ("float32", hidden, 4),
        "e4m3": ("float8_e4m3fn", hidden, 16),
        "e2m1": ("uint32", hidden // 8, 4),
    }[x_kind]
    y_dtype, y_width = ("float8_e4m3fn", hidden) if fmt == "e4m3" else ("uint32", hidden // 8)
    sf_kind = sf_in or sf_out
    sf_shape = (SA, SB, 4) if sf_kind == "ue8m0_col" else (SA, SB)
    sf_dtype = "uint8" if sf_kind == "ue8m0_col" else SF_KINDS[sf_kind][1]
    xsf_kind = x_sf[0] if x_sf else "f32_row"
    xsf_shape = (XA, XB, 4) if xsf_kind == "ue8m0_col" else (XA, XB)
    xsf_dtype = "uint8" if xsf_kind == "ue8m0_col" else SF_KINDS[xsf_kind][1]
    bm, bk = (x_sf[1], x_sf[2]) if x_sf else (1, hidden)
    n_xs = max(elems // bk, 1)  # input scales per thread
    YT = Tn if write_data else T.dynamic("YT")
    sf_col = sf_out in ("f32_col", "e4m3_col")
    col_pad = F.tma_alignment(sf_dtype) - 1 if sf_col else 0  # most padding columns of column-major storage

    def load_sf(buf, kind, r, k):
        """fp32 value of the scale of (row block r, column block k) in a storage of ``kind``."""
        if kind == "f32_row":
            return buf[r, k]
        if kind == "e4m3_row":
            return T.cast(buf[r, k], "float32")
        if kind == "f32_col":
            return buf[k, r]
        if kind == "e4m3_col":
            return T.cast(buf[k, r], "float32")
        return T.reinterpret(T.shift_left(T.cast(buf[k // 4, r, k % 4], "uint32"), T.uint32(23)), "float32")

    @T.prim_func
    def per_token_cast(
        x: T.StridedTensor((Tn, x_width), (S, 1), x_dtype),
        x_sf_buf: T.Tensor(xsf_shape, xsf_dtype),
        seed: T.Tensor((NS,), "uint32"),
        y: T.Tensor((YT, y_width), y_dtype),
        sf: T.Tensor(sf_shape, sf_dtype),
        amax_floor: T.float32,
    ):
        grid = T.ceildiv(Tn, rows_per_cta)
        with T.Kernel(grid, threads=threads, prelude=PRELUDE) as bx:
            T.assume(S % x_vec == 0)
            T.annotate_min_blocks_per_sm(max(1, (512 if stochastic else 1024) // threads))  # registers: occupancy
            t = T.get_thread_binding(0)
            row = bx * rows_per_cta + t // lanes_per_row
            c = t % lanes_per_row
            valid = (row < Tn) & (c < chunks)
            col0 = c * elems
            v = T.alloc_local((elems,), "float32")
            xs = T.alloc_local((n_xs,), "float32")
            am = T.alloc_local((groups,), "float32")
            scale = T.alloc_local((groups,), "float32")  # sf (fp32 value)
            inv = T.alloc_local((groups,), "float32")  # sf_inv
            code = T.alloc_local((groups,), "uint32")  # UE8M0 byte or E4M3 bits of the scale
            q = T.alloc_local((elems,), "float32")

            # ---- load (fp32 values; codes for quantized inputs) ----
            if valid:
                if x_kind == "e2m1":
                    xw = T.alloc_local((elems // 8,), "uint32")
                    for j in T.vectorized(elems // 8):
                        xw[j] = x[row, c * (elems // 8) + j]
                    for j in T.unroll(elems):
                        v[j] = T.call_extern("float32", "tilek_e2m1_to_float", (xw[j // 8] >> (4 * (j % 8))) & T.uint32(15))
                else:
                    xl = T.alloc_local((elems,), x_dtype)
                    for j in T.vectorized(elems):
                        xl[j] = x[row, col0 + j]
                    for j in T.vectorized(elems):
                        v[j] = T.cast(xl[j], "float32")
            else:
                for j in T.unroll(elems):
                    v[j] = T.float32(0)
            for i in T.unroll(n_xs):
                xs[i] = T.float32(1)
            if x_sf:
                if valid:
                    for i in T.unroll(n_xs):
                        xs[i] = load_sf(x_sf_buf, xsf_kind, row // bm, (col0 + i * bk) // bk)

            # ---- scales ----
            if sf_in:
                if valid:
                    for i in T.unroll(groups):
                        scale[i] = load_sf(sf, sf_in, row, (col0 + i * width) // npc)
                        inv[i] = T.float32(1) / scale[i]
            else:
                for i in T.unroll(groups):
                    am[i] = T.float32(0)
                if x_sf:  # max |code| per input-scale span, times its scale (= max |code * x_sf|)
                    span = min(bk, width)
                    for i in T.unroll(elems // span):
                        m = T.alloc_var("float32")
                        m = T.float32(0)
                        for j in T.unroll(span):
                            m = T.max(m, T.abs(v[i * span + j]))
                        am[i * span // width] = T.max(am[i * span // width], m * xs[i * span // bk if bk < elems else 0])
                else:
                    for j in T.unroll(elems):
                        am[j // width] = T.max(am[j // width], T.abs(v[j]))
                if row_reduce:
                    red = T.alloc_shared((threads // 32,), "float32")
                    for s in T.unroll(5):
                        am[0] = T.max(am[0], T.shfl_xor(am[0], 1 << s))
                    if t % 32 == 0:
                        red[t // 32] = am[0]
                    T.sync_threads()
                    for w in T.unroll(warps_per_row):
                        am[0] = T.max(am[0], red[t // lanes_per_row * warps_per_row + w])
                else:
                    for s in T.unroll(lanes.bit_length() - 1):
                        am[0] = T.max(am[0], T.shfl_xor(am[0], 1 << s))
                for i in T.unroll(groups):
                    a = T.max(am[i], amax_floor)
                    if round_sf:
                        e = ((T.reinterpret(a / T.float32(max_value), "uint32") - T.uint32(1)) >> 23) + T.uint32(1)
                        code[i] = e
                        scale[i] = T.reinterpret(T.shift_left(e, T.uint32(23)), "float32")
                        inv[i] = T.reinterpret(T.shift_left(T.uint32(254) - e, T.uint32(23)), "float32")
                    elif e4m3_sf:
                        code[i] = T.cast(T.call_extern("uint8", "tilek_e4m3_nosat", a / T.float32(max_value)), "uint32")
                        scale[i] = T.call_extern("float32", "tilek_e4m3_to_float", T.cast(code[i], "uint8"))
                        inv[i] = T.float32(1) / scale[i]
                    else:
                        scale[i] = a / T.float32(max_value)
                        inv[i] = T.float32(max_value) / a

            # ---- data ----
            if write_data:
                for j in T.unroll(elems):
                    if x_sf:
                        q[j] = v[j] * (xs[j // bk if bk < elems else 0] * inv[j // width])
                    else:
                        q[j] = v[j] * inv[j // width]
                quad0 = T.cast(row, "uint32") * T.uint32(hidden // 4) + T.cast(col0 // 4, "uint32")
                if fmt == "e4m3":
                    yl = T.alloc_local((elems,), "float8_e4m3fn")
                    if stochastic:  # fast path for all, the exact one where some value needs it (rare)
                        rounded = T.alloc_local((elems,), "float32")
                        slow = T.alloc_var("uint32")
                        slow = 0
                        for k in T.unroll(elems // 4):
                            h = quad_hash(q, k, quad0, seed[0])
                            for j in T.unroll(4):
                                r = T.call_extern("uint32", "tilek_rbits", h, j)
                                rounded[4 * k + j] = T.call_extern("float32", "tilek_sr_e4m3_fast", q[4 * k + j], r)
                                slow = slow | T.call_extern("uint32", "tilek_sr_e4m3_slow", q[4 * k + j])
                        if slow != 0:
                            for k in T.unroll(elems // 4):
                                h = quad_hash(q, k, quad0, seed[0])
                                for j in T.unroll(4):
                                    r = T.call_extern("uint32", "tilek_rbits", h, j)
                                    rounded[4 * k + j] = T.call_extern("float32", "tilek_sr_e4m3", q[4 * k + j], r)
                        for j in T.vectorized(elems):
                            yl[j] = T.cast(rounded[j], "float8_e4m3fn")
                    else:
                        for j in T.vectorized(elems):
                            yl[j] = T.cast(q[j], "float8_e4m3fn")
                    if valid:
                        for j in T.vectorized(elems):
                            y[row, col0 + j] = yl[j]
                else:
                    yw = T.alloc_local((elems // 8,), "uint32")
                    for w in T.unroll(elems // 8):
                        yw[w] = T.uint32(0)
                        for half in T.unroll(2):
                            if stochastic:
                                h = quad_hash(q, 2 * w + half, quad0, seed[0])
                            for j in T.unroll(4):
                                i = 8 * w + 4 * half + j
                                if stochastic:
                                    nib = T.call_extern("uint32", "tilek_e2m1_sr", q[i], T.call_extern("uint32", "tilek_rbits", h, j))
                                else:
                                    nib = T.call_extern("uint32", "tilek_e2m1_rn", q[i])
                                yw[w] = yw[w] | T.shift_left(nib, T.uint32(16 * half + 4 * j))
                    if valid:
                        for j in T.vectorized(elems // 8):
                            y[row, c * (elems // 8) + j] = yw[j]

            # ---- scale factors ----
            if sf_out:
                leader = (c == 0) if row_reduce else (c % lanes == 0)
                if valid & leader:
                    for i in T.unroll(groups):
                        k = (col0 + i * width) // npc
                        if sf_out == "f32_row":
                            sf[row, k] = scale[i]
                        elif sf_out == "e4m3_row":
                            sf[row, k] = T.reinterpret(T.cast(code[i], "uint8"), "float8_e4m3fn")
                        elif sf_col:
                            if sf_out == "f32_col":
                                sf[k, row] = scale[i]
                            else:
                                sf[k, row] = T.reinterpret(T.cast(code[i], "uint8"), "float8_e4m3fn")
                            if row == Tn - 1:
                                for p in T.unroll(col_pad):
                                    if Tn + p < SB:
                                        sf[k, Tn + p] = T.cast(0, sf_dtype)
                        else:
                            sf[k // 4, row, k % 4] = T.cast(code[i], "uint8")
                            if row == Tn - 1:
                                for p in T.unroll(3):
                                    if Tn + p < SB:
                                        sf[k // 4, Tn + p, k % 4] = T.uint8(0)
                            if num_blocks % 4 != 0:
                                if k == num_blocks - 1:  # the unused bytes of the last word
                                    for p in T.unroll(4):
                                        for b in T.unroll(4 - num_blocks % 4):
                                            if (p == 0) | ((row == Tn - 1) & (Tn + p - 1 < SB)):
                                                sf[k // 4, row + p, num_blocks % 4 + b] = T.uint8(0)

    return per_token_cast


# ---------------------------------------------------------------------------------------------
# Reference, rules, launch. Operands: ``x`` (or a QuantTensor's data), its scales ``x_sf``, given
# scales ``sf_in`` (the precomputed-sf mode), the stochastic rounding's ``seed``; results by mode.

NAMES = {"full": "per_token_cast", "sf_only": "per_token_cast_with_sf_only", "data_only": "per_token_cast_with_precomputed_sf"}
RESULTS = {"full": ("y", "sf"), "sf_only": ("sf",), "data_only": ("y",)}


def _window(x, columns) -> tuple[int, int]:
    return (0, x.shape[-1]) if columns is None else (int(columns[0]), int(columns[1]))


def _in_fmt(x) -> str | None:
    """The format of quantized input data: e4m3, packed FP4 (uint8/int8), or None for bf16/fp32."""
    name = np.dtype(x.dtype).name
    return {"float8_e4m3fn": "e4m3", "uint8": "e2m1", "int8": "e2m1"}.get(name)


def _hidden(x, columns) -> int:
    start, stop = _window(x, columns)
    return {"e2m1": 2 * x.shape[-1], "e4m3": x.shape[-1]}.get(_in_fmt(x), stop - start)


def _load_kind(stored, kind: str, num_blocks) -> jax.Array:
    return F.load_sf(stored, SF_KINDS[kind][0], num_blocks)


def _store_kind(sf, kind: str) -> jax.Array:
    return F.store_sf(sf, SF_KINDS[kind][0])


def quad_index(tokens: int, hidden: int) -> jax.Array:
    """uint32 ``[T, H/4]``: the random-bit index of quad ``x[t, 4j:4j+4]``, ``(t * H/4 + j) mod 2^32``."""
    rows = jnp.arange(tokens, dtype=jnp.uint32)[:, None] * np.uint32(hidden // 4)
    return rows + jnp.arange(hidden // 4, dtype=jnp.uint32)[None, :]


def _reference(x, x_sf, sf_in, seed, *, fmt, num_per_channels, x_block_size, x_sf_kind, sf_kind, round_sf, use_e4m3_sf,
               stochastic_cast, amax_clamp, columns, mode):  # fmt: skip
    in_fmt = _in_fmt(x)
    if in_fmt is None:
        start, stop = _window(x, columns)
        values = x[:, start:stop].astype(jnp.float32)
        magnitudes = jnp.abs(values)
    else:
        data = x.astype(jnp.uint8) if in_fmt == "e2m1" else x
        values = F.dequantize_values(data, in_fmt)  # the codes' values
        shape = values.shape
        x_scale = F.expand_blocks(_load_kind(x_sf, x_sf_kind, F.num_blocks(shape, x_block_size)), x_block_size, shape)
        magnitudes = jnp.abs(values) * x_scale  # = |dequantized value| (fp32 product)
    tokens, hidden = values.shape
    block = (1, num_per_channels)
    if mode == "data_only":
        sf = _load_kind(sf_in, sf_kind, F.num_blocks((tokens, hidden), block))
        sf_inv = F.exact_div(np.float32(1.0), sf)
    else:  # a partial last block's amax is over the columns it has (block_amax pads with zeros)
        floor = amax_floor(fmt, use_e4m3_sf, amax_clamp)
        amax = F.block_amax(magnitudes, block)
        sf, sf_inv = F.scale_factors(amax, fmt, round_sf=round_sf, use_e4m3_sf=use_e4m3_sf, amax_floor=floor)
    stored_sf = _store_kind(sf, sf_kind)
    if mode == "sf_only":
        return stored_sf
    multiplier = F.expand_blocks(sf_inv, block, values.shape)
    if in_fmt is not None:
        multiplier = x_scale * multiplier  # x_sf * sf_inv first, as the kernel does
    scaled = values * multiplier
    if stochastic_cast:
        r = random_bits(scaled, quad_index(tokens, hidden), seed.reshape(()))
        data = sr_e4m3(scaled, r) if fmt == "e4m3" else F.pack_e2m1(sr_e2m1_codes(scaled, r))
    else:
        data = F.quantize_values(scaled, fmt)
    return data if mode == "data_only" else (data, stored_sf)


def _sf_storage(kind: str, num_blocks) -> tuple[tuple[int, ...], np.dtype]:
    layout, dtype = SF_KINDS[kind]
    return F.sf_storage_shape(layout, num_blocks, np.dtype(jnp.dtype(dtype)))


def _check_sf(op: str, name: str, stored, kind: str, num_blocks) -> None:
    shape, dtype = _sf_storage(kind, num_blocks)
    if tuple(stored.shape) != shape or np.dtype(stored.dtype) != dtype:
        raise ValueError(
            f"{op}: {name} must be {dtype.name}{list(shape)} ({SF_KINDS[kind][0]} layout for "
            f"{num_blocks[0]} x {num_blocks[1]} blocks), got {np.dtype(stored.dtype).name}{list(stored.shape)}"
        )


def _check(x, x_sf, sf_in, seed, *, fmt, num_per_channels, x_block_size, x_sf_kind, sf_kind, round_sf, use_e4m3_sf,
           stochastic_cast, amax_clamp, columns, mode):  # fmt: skip
    op = NAMES[mode]
    if fmt not in FMTS:
        raise ValueError(f"{op}: fmt must be one of {FMTS}, got {fmt!r}")
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be [T, H], got shape {x.shape}")
    in_fmt = _in_fmt(x)
    name = np.dtype(x.dtype).name
    xname = "x" if x_block_size is None else "x's data"  # how errors name the array
    if in_fmt is None and name not in ("bfloat16", "float32"):
        raise ValueError(f"{op}: {xname} must be bfloat16 or float32 (or quantized e4m3 / packed FP4 data), got {name}")
    if in_fmt is not None and columns is not None:
        raise ValueError(f"{op}: columns is only supported for bfloat16/float32 inputs")
    if (in_fmt is None) != (x_block_size is None):
        raise ValueError(f"{op}: x of dtype {name} is quantized data: a QuantTensor input (data, sf) needs x_block_size, and only it takes one")
    start, stop = _window(x, columns)
    if columns is not None and not 0 <= start < stop <= x.shape[-1]:
        raise ValueError(f"{op}: columns={columns} is not a window of x's last axis ({x.shape[-1]})")
    vec = 16 // np.dtype(x.dtype).itemsize
    if in_fmt is None and (start % vec or x.shape[-1] % vec):
        raise ValueError(
            f"{op}: rows must stay 16-byte aligned: columns start ({start}) and the row length "
            f"({x.shape[-1]}) must be multiples of {vec} for {name}"
        )
    if x.shape[-1] >= 2**31:
        raise ValueError(f"{op}: {xname}'s row length must be below 2^31 (an int32 row stride), got {x.shape[-1]}")
    if x.shape[0] > F.MAX_TOKENS:
        raise ValueError(f"{op}: {xname} may have at most {F.MAX_TOKENS} rows (int32 row indices), got {x.shape[0]}")
    hidden = _hidden(x, columns)
    if hidden <= 0 or hidden % 64:
        raise ValueError(f"{op}: the hidden size of {xname} must be a positive multiple of 64, got {hidden}")
    if hidden > 1024 * ELEMS:
        raise ValueError(f"{op}: hidden sizes up to {1024 * ELEMS} are supported ({xname}), got {hidden}")
    F.check_num_per_channels(op, num_per_channels, hidden)
    k_b = F.ceil_div(hidden, num_per_channels)  # the last block may be partial
    if x_block_size is not None:
        bm, bk = x_block_size
        if bm < 1 or not (bk == 16 or (bk >= ELEMS and bk % ELEMS == 0)):
            raise ValueError(f"{op}: x_block_size must be (bm >= 1, 16 or a multiple of {ELEMS}), got {x_block_size}")
        _check_sf(op, "x's scale factors", x_sf, x_sf_kind, F.num_blocks((x.shape[0], hidden), x_block_size))
    if mode == "data_only":
        _check_sf(op, "sf", sf_in, sf_kind, (x.shape[0], k_b))
    if round_sf and use_e4m3_sf:
        raise ValueError(f"{op}: round_sf and use_e4m3_sf are exclusive")
    if use_e4m3_sf and sf_kind == "ue8m0_col":
        raise ValueError(f"{op}: use_e4m3_sf and use_packed_ue8m0 are exclusive")
    if amax_clamp is not None and not (np.isfinite(amax_clamp) and amax_clamp > 0):
        raise ValueError(f"{op}: amax_clamp must be a positive finite number, got {amax_clamp}")
    if stochastic_cast and (seed.size != 1 or not jnp.issubdtype(seed.dtype, jnp.integer)):
        raise ValueError(f"{op}: seed must be an integer scalar, got {seed.dtype}{list(seed.shape)}")


@dataclasses.dataclass(frozen=True)
class PerTokenCastConfig:
    """The kernel's thread mapping (:func:`plan`): ``elems`` consecutive elements per thread (a
    multiple of 8 dividing H) and CTAs of about ``threads`` threads (whole rows of lanes)."""

    elems: int = ELEMS
    threads: int = CTA_THREADS


@config_class(PerTokenCastConfig)
def _config(x, x_sf, sf_in, seed, **static) -> PerTokenCastConfig:
    """32 elements per thread, CTAs of about 256 threads, for every shape."""
    return PerTokenCastConfig()


def _ue8m0_bytes(shape: tuple[int, int]) -> View:
    """Packed UE8M0 words are read and written byte by byte: int32 [A, B] as uint8 [A, B, 4]."""
    a, b = shape
    return View((a, b, 4), (4 * b, 4, 1), dtype=np.uint8)


def _launch(x, x_sf, sf_in, seed, *, config: PerTokenCastConfig, fmt, num_per_channels, x_block_size, x_sf_kind, sf_kind,
            round_sf, use_e4m3_sf, stochastic_cast, amax_clamp, columns, mode) -> Launch:  # fmt: skip
    in_fmt = _in_fmt(x)
    hidden = _hidden(x, columns)
    tokens, width = x.shape
    start, _ = _window(x, columns)
    if in_fmt == "e2m1":  # packed FP4 and e2m1 output as 32-bit words of 8 codes
        views = {"x": View((tokens, hidden // 8), (hidden // 8, 1), 0, np.uint32)}
    else:
        views = {"x": View((tokens, hidden), (width, 1), start)}
    if fmt == "e2m1" and mode != "sf_only":
        views["y"] = View((tokens, hidden // 8), dtype=np.uint32)
    if x_sf is not None and x_sf_kind == "ue8m0_col":
        views["x_sf_buf"] = _ue8m0_bytes(x_sf.shape)
    if sf_kind == "ue8m0_col":  # (given scales were checked to have this shape)
        views["sf"] = _ue8m0_bytes(_sf_storage(sf_kind, (tokens, F.ceil_div(hidden, num_per_channels)))[0])
    return Launch(
        kernel=per_token_cast_kernel,
        params=dict(
            hidden=hidden, npc=num_per_channels, fmt=fmt, x_kind=in_fmt or np.dtype(x.dtype).name,
            x_sf=None if x_sf is None else (x_sf_kind, int(x_block_size[0]), int(x_block_size[1])),
            sf_in=sf_kind if mode == "data_only" else None, sf_out=None if mode == "data_only" else sf_kind,
            write_data=mode != "sf_only", round_sf=bool(round_sf), e4m3_sf=bool(use_e4m3_sf),
            stochastic=bool(stochastic_cast), **plan(hidden, num_per_channels, config.elems, config.threads),
        ),  # fmt: skip
        scalars=dict(amax_floor=float(np.float32(amax_floor(fmt, use_e4m3_sf, amax_clamp)))),
        buffers={"x_sf_buf": "x_sf", "sf": "sf_in" if mode == "data_only" else "sf", "y": None if mode == "sf_only" else "y"},
        views=views,
    )


def _rows(x, x_sf, sf_in, seed, *, x_block_size, x_sf_kind, sf_kind, stochastic_cast, mode, **_) -> Rows | None:
    """Row-wise with row-major scales (and row-major input scales of one-token blocks); column-major
    scales and input blocks span tokens, and stochastic rounding hashes each token's index."""
    if stochastic_cast or SF_KINDS[sf_kind][0] != "row":
        return None
    if x_sf is not None and (x_block_size[0] != 1 or SF_KINDS[x_sf_kind][0] != "row"):
        return None
    return Rows(("x", "x_sf", "sf_in"), RESULTS[mode])


_op = TileOp(
    name="per_token_cast", launch=_launch, operands=("x", "x_sf?", "sf_in?", "seed?"), results=lambda *_, mode, **__: RESULTS[mode],
    reference=_reference, check=_check, config=_config, rows=_rows,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Argument checks of the public functions (types; shapes and rules are ``_check``'s).


def _sf_kind(use_tma_aligned_col_major_sf: bool, use_packed_ue8m0: bool, round_sf: bool, use_e4m3_sf: bool, op: str) -> str:
    layout = F.sf_layout(use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf, op=op)
    if layout == "col_ue8m0":
        if use_e4m3_sf:
            raise ValueError(f"{op}: use_e4m3_sf and use_packed_ue8m0 are exclusive")
        return "ue8m0_col"
    return f"{'e4m3' if use_e4m3_sf else 'f32'}_{layout}"


X_SF_KINDS = {("row", "float32"): "f32_row", ("row", "float8_e4m3fn"): "e4m3_row", ("col", "float32"): "f32_col",
              ("col", "float8_e4m3fn"): "e4m3_col", ("col_ue8m0", "int32"): "ue8m0_col"}  # fmt: skip


def _x_sf_kind(op: str, data, x_sf, x_block_size, x_sf_layout: str | None) -> str:
    """The storage kind of a QuantTensor's scales: from ``x_sf_layout`` or from their dtype and shape."""
    name = np.dtype(x_sf.dtype).name
    if x_sf_layout is not None:
        if not isinstance(x_sf_layout, str):
            raise TypeError(f"{op}: x_sf_layout must be None, 'row', 'col' or 'col_ue8m0', got {x_sf_layout!r}")
        if (x_sf_layout, name) not in X_SF_KINDS:
            raise ValueError(f"{op}: x_sf_layout={x_sf_layout!r} does not hold {name} scales")
        return X_SF_KINDS[(x_sf_layout, name)]
    if name == "int32":
        return "ue8m0_col"
    if name not in ("float32", "float8_e4m3fn"):
        raise ValueError(f"{op}: x's scale factors must be float32, float8_e4m3fn or packed UE8M0 int32, got {name}")
    hidden = data.shape[-1] * (2 if _in_fmt(data) == "e2m1" else 1)
    blocks = F.num_blocks((data.shape[0], hidden), tuple(x_block_size))
    dtype = "e4m3" if name == "float8_e4m3fn" else "f32"
    row, col = F.sf_storage_shape("row", blocks, x_sf.dtype)[0], F.sf_storage_shape("col", blocks, x_sf.dtype)[0]
    if tuple(x_sf.shape) == row and row == col:
        raise ValueError(f"{op}: x's scale factors {list(x_sf.shape)} could be row- or column-major; pass x_sf_layout")
    return f"{dtype}_col" if tuple(x_sf.shape) == col else f"{dtype}_row"


def _pair(op: str, name: str, value) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be a pair of ints, got {value!r}")
    return checks.static_int(op, name, value[0]), checks.static_int(op, name, value[1])


def _seed(op: str, seed) -> jax.Array:
    """A uint32 [1] seed: an integer scalar (Python ints in [-2^31, 2^32), taken modulo 2^32) or array."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if not -(2**31) <= int(seed) < 2**32:
            raise ValueError(f"{op}: seed must be an integer scalar in [-2^31, 2^32), got {seed}")
        return jnp.asarray(np.uint32(int(seed) % 2**32)).reshape(-1)
    s = checks.as_array(op, "seed", seed)
    if s.size != 1 or not jnp.issubdtype(s.dtype, jnp.integer):
        raise ValueError(f"{op}: seed must be an integer scalar, got {s.dtype}{list(s.shape)}")
    return s.astype(jnp.uint32).reshape(-1)


def _input(op: str, x, x_block_size, x_sf_layout):
    """(x or a QuantTensor's data, its scales or None, their storage kind, x_block_size as ints)."""
    if not isinstance(x, (tuple, list)):
        if x_block_size is not None:
            raise ValueError(f"{op}: x_block_size is only for QuantTensor inputs (data, sf)")
        return checks.as_array(op, "x", x), None, None, None
    if len(x) != 2:
        raise ValueError(f"{op}: a QuantTensor x is a pair (data, sf), got {len(x)} items")
    data, x_sf = checks.as_array(op, "x's data", x[0]), checks.as_array(op, "x's scale factors", x[1])
    if x_block_size is None:
        raise ValueError(f"{op}: a QuantTensor input (data, sf) needs x_block_size")
    x_block_size = _pair(op, "x_block_size", x_block_size)
    if min(x_block_size) < 1:
        raise ValueError(f"{op}: x_block_size must be positive, got {x_block_size}")
    if data.ndim != 2 or _in_fmt(data) is None:
        raise ValueError(f"{op}: x's data must be e4m3 [T, H] or packed FP4 uint8 [T, H/2] (a QuantTensor), got {data.dtype}{list(data.shape)}")
    if x_sf.ndim != 2:
        raise ValueError(f"{op}: x's scale factors must be 2-D, got shape {x_sf.shape}")
    return data, x_sf, _x_sf_kind(op, data, x_sf, x_block_size, x_sf_layout), x_block_size


def _require_fmt(op: str, fmt) -> None:
    if not isinstance(fmt, str) or fmt not in FMTS:
        raise ValueError(f"{op}: fmt must be one of {FMTS}, got {fmt!r}")


def _static(mode: str, fmt, num_per_channels, x_block_size, x_sf_kind, use_tma_aligned_col_major_sf, round_sf,
            use_packed_ue8m0, use_e4m3_sf, stochastic_cast=False, amax_clamp=None, columns=None) -> dict:  # fmt: skip
    """The op's static options, checked for type (TypeError / ValueError naming the public function)."""
    op = NAMES[mode]
    flags = {
        name: checks.static_bool(op, name, value)
        for name, value in dict(
            use_tma_aligned_col_major_sf=use_tma_aligned_col_major_sf, round_sf=round_sf, use_packed_ue8m0=use_packed_ue8m0,
            use_e4m3_sf=use_e4m3_sf, stochastic_cast=stochastic_cast,
        ).items()
    }  # fmt: skip
    if amax_clamp is not None:
        if isinstance(amax_clamp, (bool, np.bool_)) or not isinstance(amax_clamp, (int, float, np.integer, np.floating)):
            raise TypeError(f"{op}: amax_clamp must be a number or None, got {amax_clamp!r} ({type(amax_clamp).__name__})")
        amax_clamp = float(amax_clamp)
    return dict(
        fmt=fmt, num_per_channels=checks.static_int(op, "num_per_channels", num_per_channels), x_block_size=x_block_size,
        x_sf_kind=x_sf_kind,
        sf_kind=_sf_kind(flags["use_tma_aligned_col_major_sf"], flags["use_packed_ue8m0"], flags["round_sf"], flags["use_e4m3_sf"], op),
        round_sf=flags["round_sf"], use_e4m3_sf=flags["use_e4m3_sf"], stochastic_cast=flags["stochastic_cast"],
        amax_clamp=amax_clamp, columns=None if columns is None else _pair(op, "columns", columns), mode=mode,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Named calls (ARG_SPECS): every kernel configuration the GPU tests and the benchmarks use. "small_"
# calls take the whole contract; the GPU tests' other configurations and sizes ("gpu_"), thread
# mappings ("tuned_") and the benchmarks' calls ("bench_") are only traced and lowered off the GPU.

S = jax.ShapeDtypeStruct
PACKED = dict(use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True)
COL = dict(use_tma_aligned_col_major_sf=True)
ROUND = dict(round_sf=True)
E4M3_SF = dict(use_e4m3_sf=True)
COL_E4M3_SF = dict(use_tma_aligned_col_major_sf=True, use_e4m3_sf=True)


def _flags_name(flags: dict) -> str:
    layout = F.sf_layout(flags.get("use_tma_aligned_col_major_sf", False), flags.get("use_packed_ue8m0", False), flags.get("round_sf", False))
    return {"col_ue8m0": "ue8m0"}.get(layout, layout) + ("_round" if flags.get("round_sf") and layout != "col_ue8m0" else "") + (
        "_e4m3sf" if flags.get("use_e4m3_sf") else "")  # fmt: skip


def _x(tokens: int, hidden: int, x: str, x_block=None, x_layout=None, x_sf_dtype=jnp.float32, columns=None):
    """The x argument: bf16/fp32 ``[T, H]`` (a window of rows 64 wider with ``columns``), or a
    QuantTensor of e4m3 or packed FP4 ("e2m1") data with its scales stored in ``x_layout``."""
    if x_block is None:
        return S((tokens, hidden if columns is None else columns[1] + 64), x)
    data = S((tokens, hidden), jnp.float8_e4m3fn) if x == "e4m3" else S((tokens, hidden // 2), jnp.uint8)
    return data, S(*F.sf_storage_shape(x_layout, F.num_blocks((tokens, hidden), x_block), x_sf_dtype))


def _name(prefix: str, tokens: int, hidden: int, x: str, fmt: str, npc: int, flags: dict, x_block, x_layout, x_sf_dtype, extra) -> str:
    src = {"bfloat16": "bf16", "float32": "fp32"}.get(x, x if x == "e4m3" else "fp4")
    if x_block is not None:
        src += f"_{x_block[0]}x{x_block[1]}_{x_layout}" + ("_e4m3" if np.dtype(x_sf_dtype) != np.float32 and x_layout != "col_ue8m0" else "")
    npc_name = "1xH" if npc == hidden else f"1x{npc}"
    return "_".join([prefix, src, fmt, npc_name, _flags_name(flags), *extra, f"{tokens}x{hidden}"])


def _codes_and_scales(rng: np.random.Generator, x, *rest) -> tuple:
    """``make`` of the calls with scales: random x (e4m3 codes without NaN for quantized data) and
    positive power-of-two scales (fp32, float8_e4m3fn, or packed UE8M0 bytes in [117, 137])."""

    def scales(s):
        if np.dtype(s.dtype) == np.int32:
            return rng.integers(117, 138, size=(*s.shape, 4), dtype=np.uint8).view(np.int32).reshape(s.shape)
        return np.exp2(rng.integers(-6, 8, size=s.shape)).astype(s.dtype)

    if isinstance(x, tuple):
        data, x_sf = x
        codes = rng.integers(0, 256, size=data.shape, dtype=np.uint8)
        if np.dtype(data.dtype) != np.uint8:
            codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN
        x = (codes.view(data.dtype), scales(x_sf))
    else:
        x = random_array(rng, x.shape, x.dtype)
    return (x, *(scales(r) if isinstance(r, S) else r for r in rest))


def _case(prefix: str, tokens: int, hidden: int, x: str = "bfloat16", fmt: str = "e4m3", npc: int = 128, flags=None, *,
          x_block=None, x_layout=None, x_sf_dtype=jnp.float32, columns=None, amax_clamp=None, stochastic=False,
          config=None, bench=None) -> ArgSpec:  # fmt: skip
    """A per_token_cast call (npc -1: whole rows)."""
    flags, npc = dict(flags or {}), hidden if npc == -1 else npc
    kwargs = dict(fmt=fmt, num_per_channels=npc, **flags)
    if x_block is not None:
        kwargs.update(x_block_size=x_block, x_sf_layout=x_layout)
    kwargs.update({k: v for k, v in dict(columns=columns, amax_clamp=amax_clamp).items() if v is not None})
    kwargs.update(dict(stochastic_cast=True) if stochastic else {})
    extra = [e for e, on in (("window", columns), ("clamp", amax_clamp), ("sr", stochastic)) if on]
    extra += [f"e{config['elems']}t{config['threads']}"] if config else []
    name = _name(prefix, tokens, hidden, x, fmt, npc, flags, x_block, x_layout, x_sf_dtype, extra)
    make = _codes_and_scales if x_block is not None else None
    return ArgSpec(name, (_x(tokens, hidden, x, x_block, x_layout, x_sf_dtype, columns),), kwargs, make=make,
                   config=config or {}, bench=prefix != "small" if bench is None else bench)  # fmt: skip


def _sf_only_case(prefix: str, tokens: int, hidden: int, flags: dict) -> ArgSpec:
    name = _name(prefix, tokens, hidden, "bfloat16", "e4m3", 128, flags, None, None, None, ["sf_only"])
    return ArgSpec(name, (S((tokens, hidden), jnp.bfloat16),), dict(fmt="e4m3", num_per_channels=128, **flags), bench=prefix != "small")


def _precomputed_case(prefix: str, tokens: int, hidden: int, flags: dict) -> ArgSpec:
    """A per_token_cast_with_precomputed_sf call with the scales of ``flags`` (their round_sf dropped)."""
    cast_flags = {k: v for k, v in flags.items() if k != "round_sf"}
    sf_dtype = jnp.float8_e4m3fn if flags.get("use_e4m3_sf") else jnp.float32
    layout = F.sf_layout(flags.get("use_tma_aligned_col_major_sf", False), flags.get("use_packed_ue8m0", False), flags.get("round_sf", False))
    sf = S(*F.sf_storage_shape(layout, (tokens, F.ceil_div(hidden, 128)), sf_dtype))
    name = _name(prefix, tokens, hidden, "bfloat16", "e4m3", 128, flags, None, None, None, ["precomputed"])
    return ArgSpec(name, (S((tokens, hidden), jnp.bfloat16), "e4m3", 128, sf), cast_flags, make=_codes_and_scales, bench=prefix != "small")


ARG_SPECS = (
    # The GPU tests' configurations: formats, block sizes, every scale layout, column windows, amax
    # clamps, zero tokens, QuantTensor inputs of both formats, stochastic rounding.
    _case("gpu", 4001, 7168),
    _case("gpu", 4001, 7168, flags=PACKED),
    _case("small", 7, 4096, "float32", "e4m3", 32, ROUND),
    _case("gpu", 4001, 7168, "bfloat16", "e2m1", 32, PACKED),
    _case("small", 7, 4096, "bfloat16", "e2m1", 16, E4M3_SF),
    _case("gpu", 1, 576, "float32", "e2m1", 64, COL),
    _case("small", 7, 576, "bfloat16", "e4m3", 64, PACKED),
    _case("small", 7, 2560, "bfloat16", "e4m3", 64, COL_E4M3_SF),
    _case("gpu", 4001, 7168, "bfloat16", "e4m3", -1, PACKED),
    _case("small", 7, 576, "bfloat16", "e4m3", -1),
    _case("gpu", 7, 512, "float32", "e2m1", -1, ROUND),
    _case("gpu", 4001, 7168, flags=PACKED, columns=(128, 128 + 7168)),
    _case("small", 7, 4096, "bfloat16", "e4m3", 32, amax_clamp=0.5),
    _case("small", 0, 4096, flags=PACKED),
    _case("gpu", 4001, 7168, "e4m3", "e4m3", 128, PACKED, x_block=(128, 128), x_layout="row"),
    _case("small", 7, 4096, "e4m3", "e2m1", 32, ROUND, x_block=(32, 32), x_layout="col_ue8m0"),
    _case("gpu", 4001, 7168, "e2m1", "e4m3", 128, COL, x_block=(1, 32), x_layout="col_ue8m0"),
    _case("small", 7, 4096, "e2m1", "e2m1", 16, E4M3_SF, x_block=(1, 16), x_layout="row", x_sf_dtype=jnp.float8_e4m3fn),
    _case("small", 129, 576, "e4m3", "e4m3", -1, ROUND, x_block=(128, 128), x_layout="col"),
    _case("gpu", 4001, 7168, flags=PACKED, stochastic=True),
    _case("small", 7, 4096, "float32", "e2m1", 32, ROUND, stochastic=True),
    _case("small", 7, 4096, "e2m1", "e4m3", 32, x_block=(1, 32), x_layout="row", stochastic=True),
    _case("gpu", 4001, 2560, "bfloat16", "e4m3", 64, COL_E4M3_SF),
    # Partial last blocks (H % npc != 0; TileKernels tests H = 576): every layout, format and input kind.
    _case("gpu", 4001, 576),
    _case("gpu", 4001, 576, flags=PACKED),
    _case("gpu", 7, 192, "float32", "e4m3", 128, ROUND),
    _case("gpu", 37, 576, "float32", "e4m3", 128, COL),
    _case("gpu", 4001, 576, flags=COL_E4M3_SF),
    _case("gpu", 4001, 576, "bfloat16", "e2m1", 128, PACKED),
    _case("gpu", 7, 192, "bfloat16", "e2m1", 128, E4M3_SF),
    _case("gpu", 5, 576, "float32", "e2m1", 128, COL),
    _case("gpu", 7, 64, flags=ROUND),
    _case("gpu", 4001, 576, flags=PACKED, columns=(64, 640)),
    _case("gpu", 4001, 576, "e4m3", "e4m3", 128, PACKED, x_block=(128, 128), x_layout="row"),
    _case("gpu", 4001, 576, "e4m3", "e2m1", 128, ROUND, x_block=(32, 32), x_layout="col_ue8m0"),
    _case("gpu", 37, 576, "e4m3", "e4m3", 128, COL, x_block=(1, 128), x_layout="col", x_sf_dtype=jnp.float8_e4m3fn),
    _case("gpu", 4001, 192, "e2m1", "e4m3", 128, COL, x_block=(1, 32), x_layout="col_ue8m0"),
    _case("gpu", 7, 576, "e2m1", "e2m1", 128, E4M3_SF, x_block=(1, 16), x_layout="row", x_sf_dtype=jnp.float8_e4m3fn),
    _case("gpu", 4001, 576, flags=PACKED, stochastic=True),
    _case("gpu", 7, 192, "float32", "e2m1", 128, ROUND, stochastic=True),
    # Row-wise calls whose tokens split over 8 devices; a traced seed; 2^31 elements and more; thread mappings.
    _case("small", 16, 576, "bfloat16", "e4m3", 128, E4M3_SF),
    _case("small", 24, 512, "e4m3", "e2m1", 32, ROUND, x_block=(1, 128), x_layout="row"),
    _case("gpu", 513, 4096, flags=PACKED, stochastic=True),
    _case("gpu", 2**18 + 5, 8192, "bfloat16", "e2m1", 128, ROUND),
    _case("gpu", 2**18 + 5, 8192, flags=PACKED),
    *(_case("tuned", 1001, 7168, "bfloat16", fmt, npc, PACKED, config=dict(elems=e, threads=t))
      for fmt, npc, e, t in (("e4m3", 128, 16, 256), ("e2m1", 32, 16, 256), ("e2m1", 32, 32, 512))),  # fmt: skip
    # The benchmarks' calls.
    _case("bench", 4096, 7168, flags=PACKED),
    _case("bench", 65536, 7168, flags=PACKED),
    _case("bench", 16384, 4096),
    _case("bench", 16384, 7168, "bfloat16", "e2m1", 32, PACKED),
    _case("bench", 16384, 7168, "bfloat16", "e4m3", -1, ROUND),
    _case("bench", 65536, 576, flags=PACKED),
    _case("bench", 16384, 7168, flags=COL_E4M3_SF),
    _case("bench", 16384, 7168, flags=PACKED, stochastic=True),
    _case("bench", 16384, 7168, "e2m1", "e4m3", 128, PACKED, x_block=(1, 32), x_layout="col_ue8m0"),
    _case("bench", 65536, 7168, flags=PACKED, config=dict(elems=16, threads=256)),
    *(_case("bench", 16384, 7168, "bfloat16", "e2m1", 32, PACKED, config=dict(elems=e, threads=t)) for e, t in ((16, 256), (32, 512))),
)

SF_ONLY_SPECS = (
    _sf_only_case("small", 16, 576, ROUND),
    _sf_only_case("small", 13, 512, PACKED),
    _sf_only_case("gpu", 4001, 7168, PACKED),
    _sf_only_case("gpu", 4001, 576, PACKED),
    _sf_only_case("gpu", 4001, 576, COL_E4M3_SF),
    _sf_only_case("bench", 16384, 7168, PACKED),
)

PRECOMPUTED_SPECS = (
    _precomputed_case("small", 16, 256, {}),
    _precomputed_case("small", 13, 576, COL_E4M3_SF),
    *(_precomputed_case("gpu", 4001, hidden, ROUND) for hidden in (4096, 576, 192)),
    _precomputed_case("gpu", 4001, 576, COL_E4M3_SF),
    _precomputed_case("gpu", 4001, 576, PACKED),
    _precomputed_case("bench", 16384, 7168, PACKED),
)


# ---------------------------------------------------------------------------------------------
# Public functions: their arguments are checked here (types) and in ``_check`` (shapes, rules).


@uses(_op, cases=ARG_SPECS)
def per_token_cast(
    x,
    fmt: str,
    num_per_channels: int,
    x_block_size: tuple[int, int] | None = None,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    use_e4m3_sf: bool = False,
    stochastic_cast: bool = False,
    amax_clamp: float | None = None,
    columns: tuple[int, int] | None = None,
    *,
    x_sf_layout: str | None = None,
    seed=None,
    impl=None,
    ops,
) -> tuple[jax.Array, jax.Array]:
    """Quantizes each row of ``x`` in blocks of ``num_per_channels`` columns.

    Args:
      x: bf16/fp32 ``[T, S]`` (with ``columns``, the window ``x[:, start:stop]``; else all of it), or a
        QuantTensor ``(data, sf)``: e4m3 ``[T, H]`` or packed FP4 uint8 ``[T, H/2]`` data with scales
        in blocks ``x_block_size`` (fp32 / e4m3, row- or column-major, or packed UE8M0).
      fmt: ``"e4m3"``, ``"e2m1"``, or ``"e5m6"`` (bf16/fp32 input, whole-row scaling only; it is
        :func:`jax_tilek.quant.per_token_cast_to_e5m6`).
      num_per_channels: 16, 32, 64, 128, or H (one block per row). H % 64 == 0; npc need not divide
        H: there are ``K_b = ceil(H / npc)`` blocks, the last one partial (its scale from the columns it
        has, as in TileKernels).
      x_block_size: ``(bm, bk)`` of a QuantTensor input (bk 16 or a multiple of 32; partial edge
        blocks allowed).
      use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0, use_e4m3_sf: the scale layout and
        rounding (``formats.sf_layout``, ``formats.scale_factors``).
      stochastic_cast: round the scaled values stochastically (``jax_tilek.quant.cast``'s random
        bits); ``seed`` (an integer, may be traced) varies them.
      amax_clamp: lower clamp of each block's amax (default: 1e-4 for e4m3, 6·2^-126 for e2m1;
        with ``use_e4m3_sf`` max·2^-9).
      columns: ``(start, stop)`` window of x's rows, read in place (16-byte aligned).
      x_sf_layout: "row", "col" or "col_ue8m0" for a QuantTensor's scales, when their shape alone
        does not say.
      impl: None, ``"tilelang"`` or ``"xla"``.

    Returns:
      ``(data, sf)``: e4m3 ``[T, H]`` or packed FP4 uint8 ``[T, H/2]``; scales in the chosen layout
      (fp32 or float8_e4m3fn ``[T, K_b]`` row-major; column-major storage ``[K_b, align(T, 4)]`` for
      fp32 and ``[K_b, align(T, 16)]`` for float8_e4m3fn scales; or int32 ``[ceil(K_b/4), align(T, 4)]``
      packed UE8M0), ``K_b = ceil(H / npc)``.
    """
    op = NAMES["full"]
    check_impl(impl, op)
    if fmt == "e5m6":
        if isinstance(x, (tuple, list)) or x_block_size or use_e4m3_sf or stochastic_cast or amax_clamp is not None or columns or seed is not None:
            raise ValueError(
                "per_token_cast: fmt='e5m6' takes a plain bf16/fp32 x with whole-row scaling; x_block_size, "
                "use_e4m3_sf, stochastic_cast, amax_clamp, columns and seed do not apply"
            )
        from jax_tilek.quant._e5m6 import per_token_cast_to_e5m6

        return per_token_cast_to_e5m6(x, num_per_channels, use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0, impl=impl)
    _require_fmt(op, fmt)
    stochastic = checks.static_bool(op, "stochastic_cast", stochastic_cast)
    if seed is not None and not stochastic:
        raise ValueError(f"{op}: seed is only used with stochastic_cast=True")
    data, x_sf, kind, x_block_size = _input(op, x, x_block_size, x_sf_layout)
    static = _static("full", fmt, num_per_channels, x_block_size, kind, use_tma_aligned_col_major_sf, round_sf,
                     use_packed_ue8m0, use_e4m3_sf, stochastic, amax_clamp, columns)  # fmt: skip
    return ops[0](data, x_sf, None, _seed(op, 0 if seed is None else seed) if stochastic else None, impl=impl, **static)


@uses(_op, cases=SF_ONLY_SPECS)
def per_token_cast_with_sf_only(
    x,
    fmt: str,
    num_per_channels: int,
    x_block_size: tuple[int, int] | None = None,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    use_e4m3_sf: bool = False,
    amax_clamp: float | None = None,
    columns: tuple[int, int] | None = None,
    *,
    x_sf_layout: str | None = None,
    impl=None,
    ops,
) -> jax.Array:
    """Only the scale factors of :func:`per_token_cast` (same arguments, same ``sf``); no data is written."""
    op = NAMES["sf_only"]
    check_impl(impl, op)
    _require_fmt(op, fmt)
    data, x_sf, kind, x_block_size = _input(op, x, x_block_size, x_sf_layout)
    static = _static("sf_only", fmt, num_per_channels, x_block_size, kind, use_tma_aligned_col_major_sf, round_sf,
                     use_packed_ue8m0, use_e4m3_sf, amax_clamp=amax_clamp, columns=columns)  # fmt: skip
    return ops[0](data, x_sf, impl=impl, **static)


@uses(_op, cases=PRECOMPUTED_SPECS)
def per_token_cast_with_precomputed_sf(
    x,
    fmt: str,
    num_per_channels: int,
    sf,
    x_block_size: tuple[int, int] | None = None,
    use_tma_aligned_col_major_sf: bool = False,
    use_packed_ue8m0: bool = False,
    use_e4m3_sf: bool = False,
    columns: tuple[int, int] | None = None,
    *,
    x_sf_layout: str | None = None,
    impl=None,
    ops,
) -> jax.Array:
    """Casts with given scales ``sf`` (the layout named by the flags, ``K_b = ceil(H / npc)`` blocks per
    row): ``data = cast(x * (1 / sf))`` per block. Equals :func:`per_token_cast`'s data when its
    ``sf_inv`` is ``1 / sf`` (``round_sf`` or ``use_e4m3_sf``)."""
    op = NAMES["data_only"]
    check_impl(impl, op)
    _require_fmt(op, fmt)
    sf = checks.as_array(op, "sf", sf)
    data, x_sf, kind, x_block_size = _input(op, x, x_block_size, x_sf_layout)
    # Packed UE8M0 scales are powers of two: the layout rule's round_sf is use_packed_ue8m0.
    static = _static("data_only", fmt, num_per_channels, x_block_size, kind, use_tma_aligned_col_major_sf,
                     use_packed_ue8m0, use_packed_ue8m0, use_e4m3_sf, columns=columns)  # fmt: skip
    return ops[0](data, x_sf, sf, impl=impl, **static)
