"""2-D block quantization: ``x[T, H] -> (data, sf)`` with one scale per ``bm x bk`` block.

TileKernels' ``per_block_cast`` (v1 §2.5, v2.1 §1.4) and its helpers ``per_block_cast_with_sf_only``
and ``per_block_cast_with_precomputed_sf``. The semantics are :func:`formats.quantize_blocks`:
``amax = max |x|`` over a block, ``sf = max(amax, floor) / max_q`` (its power-of-two ceiling with
``round_sf``), ``data = cast(x · sf_inv)`` with ``sf_inv = max_q / max(amax, floor)`` (``2^-e`` with
``round_sf``) and the product in fp32; e4m3 rounds to nearest even and saturates at ±448, e2m1 rounds
to nearest even, saturates at ±6 and packs two codes per byte (even column in the low nibble).

Rules enforced (the union of v1, ``H % 64 == 0`` and any T, and v2.1, ``T % 128 == 0`` and
``H % 128 == 0``): ``bm, bk in {32, 128}``, ``H % 64 == 0``, any ``T >= 0``. A last row block with
fewer than ``bm`` tokens, or a last column block with fewer than ``bk`` channels (``bk = 128`` and
``H % 128 == 64``), is a partial block whose amax is taken over the elements present.

NaN inputs are not supported: the kernel's maxima skip NaNs where the reference propagates them.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.kernel import kernel
from jax_tilek.op import Impl, Launch, TileOp, View, as_array, check_impl, static_flag, static_int
from jax_tilek.quant import formats as F
from jax_tilek.spec import GRID_LIMITS

BLOCK_SIZES = (32, 128)
FORMATS = ("e4m3", "e2m1")
IN_DTYPES = (jnp.bfloat16, jnp.float32)
HIDDEN_ALIGN = 64
THREADS = 256
TILE_ELEMENTS = 8192  # a CTA tile is bm x max(bk, 8192 / bm)
PAD = [1, 2, 3]  # offsets of the padding entries that a scale's writer also zeroes

# Element codecs and stores, written out so that every rounding and every access width is explicit.
PRELUDE = r"""
__device__ __forceinline__ unsigned tk_e4m3x4(float a, float b, float c, float d, float s) {
  // Four products x * s -> four float8_e4m3fn bytes (nearest even, saturating), a in the low byte.
  unsigned short lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(__fmul_rn(b, s)), "f"(__fmul_rn(a, s)));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(__fmul_rn(d, s)), "f"(__fmul_rn(c, s)));
  return (unsigned)lo | ((unsigned)hi << 16);
}
__device__ __forceinline__ unsigned tk_e2m1_t(float p) {
  // 1.5 * 2^23 + the FP4 e2m1 magnitude code of p (formats.encode_e2m1: nearest even, saturating at
  // 6; NaN -> 6). With a = min(|p|, 6) the code is min(rint(2a), rint(a + 2), rint(a / 2 + 4)), and
  // each rint is one exact FMA onto 1.5 * 2^23 (whose ulp is 1): mostly full-rate FP32 work.
  const float M = 12582912.0f;
  float a = fminf(fabsf(p), 6.0f);
  return __float_as_uint(fminf(fminf(__fmaf_rn(a, 2.0f, M), __fmaf_rn(a, 1.0f, M + 2.0f)), __fmaf_rn(a, 0.5f, M + 4.0f)));
}
__device__ __forceinline__ unsigned tk_e2m1_add(unsigned r, float p, int k) {
  // Adds nibble k: (0x4B400000 + code) << 4k (the caller subtracts the constants) and the sign bit.
  return r + tk_e2m1_t(p) * (1u << (4 * k)) + (__float_as_uint(p) >> 31) * (8u << (4 * k));
}
__device__ __forceinline__ unsigned tk_e2m1x4(float a, float b, float c, float d, float s) {
  // Four products x * s -> four e2m1 codes in 16 bits, a in the lowest nibble.
  unsigned r = tk_e2m1_add(0u, __fmul_rn(a, s), 0);
  r = tk_e2m1_add(r, __fmul_rn(b, s), 1);
  r = tk_e2m1_add(r, __fmul_rn(c, s), 2);
  r = tk_e2m1_add(r, __fmul_rn(d, s), 3);
  return r - 0x4B400000u * 0x1111u;
}
__device__ __forceinline__ unsigned tk_e2m1x8(float a, float b, float c, float d, float e, float f, float g, float h, float s) {
  // Eight products x * s -> eight e2m1 codes in 32 bits, a in the lowest nibble.
  unsigned r = tk_e2m1_add(0u, __fmul_rn(a, s), 0);
  r = tk_e2m1_add(r, __fmul_rn(b, s), 1);
  r = tk_e2m1_add(r, __fmul_rn(c, s), 2);
  r = tk_e2m1_add(r, __fmul_rn(d, s), 3);
  r = tk_e2m1_add(r, __fmul_rn(e, s), 4);
  r = tk_e2m1_add(r, __fmul_rn(f, s), 5);
  r = tk_e2m1_add(r, __fmul_rn(g, s), 6);
  r = tk_e2m1_add(r, __fmul_rn(h, s), 7);
  return r - 0x4B400000u * 0x11111111u;
}
__device__ __forceinline__ void tk_store8(unsigned* p, unsigned a, unsigned b) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(a), "r"(b) : "memory");
}
"""


def tile_shape(block_size: tuple[int, int]) -> tuple[int, int]:
    """The CTA tile ``(bm, max(bk, 8192 / bm))``, as TileKernels tiles."""
    bm, bk = block_size
    return bm, max(bk, TILE_ELEMENTS // bm)


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def per_block_cast_kernel(
    in_dtype: str, fmt: str, bm: int, bk: int, layout: str, round_sf: bool, mode: str, fold: bool = False,
    wide: bool = False,
):
    """One CTA of 256 threads quantizes a ``bm x tk`` tile: one row block, ``tk / bk`` column blocks.

    Thread t loads the 16-byte vectors t, t + 256, ... of the tile (each warp reads 512 contiguous
    bytes per load), so all its vectors lie in one column block. Block maxima: per thread, then a
    butterfly over the lanes of the same block (``__shfl_xor_sync``), then over the warps through
    shared memory. Every thread then derives its block's scale, converts its values and stores them
    (e4m3: 8 or 4 bytes per vector, e2m1: 4 or 2). The first thread of each block stores its scale,
    and zeroes the padding of the storage next to it. ``mode``: "cast" writes data and sf, "sf_only"
    only sf, "cast_only" reads row-major fp32 sf (``sf_inv = 1 / sf``, correctly rounded).

    The grid is (hidden tiles, token tiles), or with ``fold`` one flat grid of both (for more token
    tiles than grid y's 65,535). Extents are 32-bit symbols (the fast index arithmetic), or with
    ``wide`` 64-bit ones, so that no guard or index wraps around: the launch asks for ``wide`` when
    an index of the shapes could pass 2^31 (see :func:`_wide`).
    """
    import tilelang.language as T

    f = F.get_format(fmt)
    in_size = {"bfloat16": 2, "float32": 4}[in_dtype]
    vec = 16 // in_size  # elements per 16-byte vector
    tm, tk = tile_shape((bm, bk))
    vpr = tk // vec  # vectors per tile row
    reps = tm * tk // vec // THREADS  # vectors per thread
    rows_per_rep = THREADS // vpr
    nblk = tk // bk  # column blocks per tile
    per_blk = bk // vec  # consecutive threads of one block within a row
    warps = THREADS // 32
    warp_period = max(1, vpr // 32)  # warps w and w + warp_period hold the same column blocks
    # Lane bits that do not change a thread's column block: those inside a block, or of another row.
    free_bits = [b for b in range(5) if (1 << b) < per_blk or (1 << b) >= vpr]
    free_mask = sum(1 << b for b in free_bits)
    floor_bits = int(np.float32(f.amax_floor).view(np.uint32))
    max_q = float(f.max_value)
    # CTAs per SM to ask the register allocator for: a thread holds 16, 32 or 64 data words.
    min_blocks = {16: 4, 32: 3, 64: 2}[reps * 4]
    assert rows_per_rep * reps == tm and per_blk >= 1 and mode in ("cast", "sf_only", "cast_only")
    if fmt == "e4m3":
        out_dtype, out_words, out_div = "uint32", vec // 4, 4  # out_div: elements per output word
    else:
        out_dtype, out_words, out_div = ("uint32", 1, 8) if vec == 8 else ("uint16", 1, 4)

    idx = "int64" if wide else "int32"
    num_tokens, x_words = T.dynamic("num_tokens, x_words", idx)  # x_words: a row of x in 32-bit words
    hidden = x_words * 4 // in_size
    k_blocks = T.ceildiv(hidden, bk)
    k_tiles, m_tiles = T.ceildiv(hidden, tk), T.ceildiv(num_tokens, tm)
    x_shape = (num_tokens, x_words)
    out_shape = (num_tokens, hidden // out_div)
    if mode == "cast_only" or layout == "row":
        m_blocks = T.dynamic("m_blocks", idx)
        sf_shape, sf_dtype = (m_blocks, k_blocks), "float32"
    elif layout == "col":
        m_stride = T.dynamic("m_stride", idx)  # align(M_b, 4)
        sf_shape, sf_dtype = (k_blocks, m_stride), "float32"
    else:  # col_ue8m0 storage seen as bytes: [ceil(K_b / 4), 4 * align(M_b, 4)]
        m_bytes = T.dynamic("m_bytes", idx)
        sf_shape, sf_dtype = (T.ceildiv(k_blocks, 4), m_bytes), "uint8"

    def bf16_lo(word):
        return T.reinterpret(word << T.uint32(16), "float32")

    def bf16_hi(word):
        return T.reinterpret(word & T.uint32(0xFFFF0000), "float32")

    def quad(w, i):
        """Four consecutive elements as fp32, starting at word i."""
        if in_size == 2:
            return bf16_lo(w[i]), bf16_hi(w[i]), bf16_lo(w[i + 1]), bf16_hi(w[i + 1])
        return tuple(T.reinterpret(w[i + j], "float32") for j in range(4))

    @T.macro
    def body(x, sf_in, out, sf):
        grid = (k_tiles * m_tiles,) if fold else (k_tiles, m_tiles)
        with T.Kernel(*grid, threads=THREADS, prelude=PRELUDE) as blocks:
            bx, by = (blocks % k_tiles, blocks // k_tiles) if fold else blocks
            T.assume(x_words % (HIDDEN_ALIGN * in_size // 4) == 0)
            T.annotate_min_blocks_per_sm(min_blocks)
            w = T.alloc_local((reps * 4,), "uint32")
            s_inv = T.alloc_var("float32")
            t = T.get_thread_binding(0)
            col = (t % vpr) * vec  # the thread's column inside the tile
            blk = col // bk
            kb = bx * nblk + blk
            k_ok = bx * tk + col < hidden
            row0 = by * tm + t // vpr
            for r in T.unroll(reps):
                for v in T.vectorized(4):
                    w[r * 4 + v] = T.uint32(0)
                if k_ok and row0 + r * rows_per_rep < num_tokens:
                    for v in T.vectorized(4):
                        w[r * 4 + v] = x[row0 + r * rows_per_rep, (bx * tk + col) * in_size // 4 + v]
            if mode == "cast_only":
                s_inv = T.call_extern("float32", "__frcp_rn", sf_in[by, T.min(kb, k_blocks - 1)])
            else:
                part = T.alloc_shared((warps, nblk), "float32")
                m = T.alloc_var("float32")
                m = T.float32(0)
                for i in T.unroll(reps * 4):
                    if in_size == 2:
                        m = T.max(m, T.max(T.abs(bf16_lo(w[i])), T.abs(bf16_hi(w[i]))))
                    else:
                        m = T.max(m, T.abs(T.reinterpret(w[i], "float32")))
                for b in free_bits:
                    m = T.max(m, T.call_extern("float32", "__shfl_xor_sync", T.uint32(0xFFFFFFFF), m, 1 << b))
                if (t & free_mask) == 0:
                    part[t // 32, blk] = m
                T.sync_threads()
                amax = T.alloc_var("float32")
                amax = T.float32(0)
                for i in T.unroll(warps // warp_period):
                    amax = T.max(amax, part[t // 32 % warp_period + i * warp_period, blk])
                # The scale as formats.scale_factors computes it.
                a = T.reinterpret(T.max(T.reinterpret(amax, "uint32"), T.uint32(floor_bits)), "float32")
                s = T.alloc_var("float32")
                s = T.call_extern("float32", "__fdiv_rn", a, T.float32(max_q))
                e = T.alloc_var("int32")
                e = 0
                if round_sf:
                    e = ((T.reinterpret(s, "int32") - 1) >> 23) + 1 - 127
                    s = T.reinterpret((e + 127) << 23, "float32")
                    s_inv = T.reinterpret((127 - e) << 23, "float32")
                else:
                    s_inv = T.call_extern("float32", "__fdiv_rn", T.float32(max_q), a)
                if t < vpr and t % per_blk == 0 and kb < k_blocks:
                    mb = by
                    last_m = mb == T.ceildiv(num_tokens, bm) - 1
                    if layout == "row":
                        sf[mb, kb] = s
                    elif layout == "col":
                        sf[kb, mb] = s
                        for p in PAD:  # the padding columns after the last row block
                            if last_m and mb + p < m_stride:
                                sf[kb, mb + p] = T.float32(0)
                    else:
                        byte = T.Cast("uint8", e + 127)
                        last_k = kb == k_blocks - 1
                        sf[kb // 4, mb * 4 + kb % 4] = byte
                        for q in PAD:  # the unused bytes of the last word
                            if last_k and kb % 4 + q < 4:
                                sf[kb // 4, mb * 4 + kb % 4 + q] = T.uint8(0)
                        for p in PAD:  # the padding columns after the last row block
                            if last_m and mb + p < m_bytes // 4:
                                sf[kb // 4, (mb + p) * 4 + kb % 4] = T.uint8(0)
                                for q in PAD:
                                    if last_k and kb % 4 + q < 4:
                                        sf[kb // 4, (mb + p) * 4 + kb % 4 + q] = T.uint8(0)
            if mode != "sf_only":
                o = T.alloc_local((out_words,), out_dtype)
                for r in T.unroll(reps):
                    for h in T.unroll(out_words):
                        i = r * 4 + h * (4 * in_size // 4)  # the first word of the next 4 elements
                        if fmt == "e4m3":
                            o[h] = T.call_extern("uint32", "tk_e4m3x4", *quad(w, i), s_inv)
                        elif vec == 8:
                            o[h] = T.call_extern("uint32", "tk_e2m1x8", *quad(w, i), *quad(w, i + 2), s_inv)
                        else:
                            o[h] = T.Cast("uint16", T.call_extern("uint32", "tk_e2m1x4", *quad(w, i), s_inv))
                    if k_ok and row0 + r * rows_per_rep < num_tokens:
                        column = (bx * tk + col) // out_div
                        if out_words == 2:
                            T.evaluate(T.call_extern("handle", "tk_store8", T.address_of(out[row0 + r * rows_per_rep, column]), o[0], o[1]))
                        else:
                            out[row0 + r * rows_per_rep, column] = o[0]

    if mode == "cast":

        @T.prim_func
        def per_block_cast(x: T.Tensor(x_shape, "uint32"), out: T.Tensor(out_shape, out_dtype), sf: T.Tensor(sf_shape, sf_dtype)):
            body(x, None, out, sf)

        return per_block_cast
    if mode == "sf_only":

        @T.prim_func
        def per_block_cast_sf_only(x: T.Tensor(x_shape, "uint32"), sf: T.Tensor(sf_shape, sf_dtype)):
            body(x, None, None, sf)

        return per_block_cast_sf_only

    @T.prim_func
    def per_block_cast_with_sf(x: T.Tensor(x_shape, "uint32"), sf_in: T.Tensor(sf_shape, sf_dtype), out: T.Tensor(out_shape, out_dtype)):
        body(x, sf_in, out, None)

    return per_block_cast_with_sf


# ---------------------------------------------------------------------------------------------
# Reference, rules, launch.


def _layout_of(name: str, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf) -> str:
    col = static_flag(use_tma_aligned_col_major_sf, name, "use_tma_aligned_col_major_sf")
    packed = static_flag(use_packed_ue8m0, name, "use_packed_ue8m0")
    return F.sf_layout(col, packed, static_flag(round_sf, name, "round_sf"), op=name)


def _block_size(block_size, name: str) -> tuple[int, int]:
    """``block_size`` as a pair of Python ints, each in BLOCK_SIZES (TypeError / ValueError naming the op)."""
    if isinstance(block_size, (str, bytes)) or not hasattr(block_size, "__len__"):
        raise TypeError(f"{name}: block_size must be a pair (bm, bk) with bm, bk in {BLOCK_SIZES}, got {block_size!r}")
    if len(block_size) != 2:
        raise ValueError(f"{name}: block_size must be (bm, bk) with bm, bk in {BLOCK_SIZES}, got {block_size!r}")
    block = tuple(static_int(b, name, "block_size") for b in block_size)
    if any(b not in BLOCK_SIZES for b in block):
        raise ValueError(f"{name}: block_size must be (bm, bk) with bm, bk in {BLOCK_SIZES}, got {block}")
    return block


def _fmt(fmt, name: str) -> str:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"{name}: fmt must be one of {FORMATS}, got {fmt!r}")
    return fmt


def _reference(x, *, fmt, block_size, layout, round_sf, fold=None):
    data, sf = F.quantize_blocks(x, fmt, tuple(block_size), round_sf=round_sf)
    return data, F.store_sf(sf, layout)


def _reference_sf_only(x, *, fmt, block_size, layout, round_sf, fold=None):
    return _reference(x, fmt=fmt, block_size=block_size, layout=layout, round_sf=round_sf)[1]


def _reference_with_sf(x, sf, *, fmt, block_size, fold=None):
    inv = F.exact_div(np.float32(1.0), sf.astype(jnp.float32))
    scaled = x.astype(jnp.float32) * F.expand_blocks(inv, tuple(block_size), x.shape)
    return F.quantize_values(scaled, fmt)


def _check(x, *rest, fmt, block_size, name="per_block_cast", **_):
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [num_tokens, hidden], got shape {x.shape}")
    if x.dtype not in IN_DTYPES:
        raise ValueError(f"{name}: x must be bfloat16 or float32, got {x.dtype}")
    _fmt(fmt, name)
    _block_size(block_size, name)
    if x.shape[1] % HIDDEN_ALIGN:
        raise ValueError(f"{name}: hidden size (x.shape[1] = {x.shape[1]}) must be a multiple of {HIDDEN_ALIGN}")


def _grid(x, block_size) -> tuple[int, bool]:
    """(CTAs, whether they form one flat grid): (hidden tiles, token tiles) while the token tiles fit
    grid y, else one flat grid."""
    tm, tk = tile_shape(block_size)
    m_tiles, k_tiles = F.ceil_div(x.shape[0], tm), F.ceil_div(x.shape[1], tk)
    return m_tiles * k_tiles, m_tiles > GRID_LIMITS[1]


def _wide(x, block_size) -> bool:
    """Whether the kernel needs 64-bit extents: an index (of x's elements, rows padded to whole tiles,
    with a margin of 4 for byte-sized or finer arithmetic) could reach 2^31."""
    tm, tk = tile_shape(block_size)
    rows, cols = (F.ceil_div(x.shape[0], tm) + 1) * tm, (F.ceil_div(x.shape[1], tk) + 1) * tk
    return rows * cols * 4 >= 2**31


def _kernel_check(x, *rest, block_size, name="per_block_cast", **_):
    ctas, _ = _grid(x, block_size)
    if ctas > GRID_LIMITS[0]:
        raise ValueError(f"{name}: x {list(x.shape)} needs {ctas} tiles, more than the kernel's grid takes ({GRID_LIMITS[0]})")


def _check_with_sf(x, sf, *, fmt, block_size, fold=None):
    name = "per_block_cast_with_precomputed_sf"
    _check(x, fmt=fmt, block_size=block_size, name=name)
    expected = F.num_blocks(x.shape, tuple(block_size))
    if sf.dtype != jnp.float32 or tuple(sf.shape) != expected:
        raise ValueError(
            f"{name}: sf must be row-major float32 {list(expected)} (one scale per block of x {list(x.shape)}), got "
            f"{sf.dtype} {list(sf.shape)}"
        )


def _views(x, fmt, block_size, layout, sf_name="sf"):
    t, h = x.shape
    in_size = np.dtype(x.dtype).itemsize
    if fmt == "e4m3":
        out = View((t, h // 4), dtype=np.uint32)
    else:
        out = View((t, h // 8), dtype=np.uint32) if in_size == 2 else View((t, h // 4), dtype=np.uint16)
    views = {"x": View((t, h * in_size // 4), dtype=np.uint32), "out": out}
    # Explicit strides: spec.compact_strides makes the row stride of a [K, 0] array 1, not 0.
    (rows, row), _ = F.sf_storage_shape(layout, F.num_blocks(x.shape, tuple(block_size)))
    if layout == "col_ue8m0":
        views[sf_name] = View((rows, 4 * row), (4 * row, 1), dtype=np.uint8)
    else:
        views[sf_name] = View((rows, row), (row, 1))
    return views


def _params(x, fmt, block_size, layout, round_sf, mode, fold):
    """The kernel's static parameters; ``fold`` None: a flat grid only when the 2-D one does not fit;
    64-bit extents (``wide``) only when the shapes need them (ordinary shapes keep the 32-bit code)."""
    bm, bk = block_size
    fold = _grid(x, block_size)[1] if fold is None else fold
    return dict(
        in_dtype=np.dtype(x.dtype).name, fmt=fmt, bm=bm, bk=bk, layout=layout, round_sf=bool(round_sf), mode=mode,
        **({"fold": True} if fold else {}), **({"wide": True} if _wide(x, block_size) else {}),
    )  # fmt: skip


def _launch(x, *, fmt, block_size, layout, round_sf, fold=None):
    params = _params(x, fmt, block_size, layout, round_sf, "cast", fold)
    return Launch(per_block_cast_kernel, params, views=_views(x, fmt, block_size, layout))


def _launch_sf_only(x, *, fmt, block_size, layout, round_sf, fold=None):
    views = _views(x, fmt, block_size, layout)
    del views["out"]
    return Launch(per_block_cast_kernel, _params(x, fmt, block_size, layout, round_sf, "sf_only", fold), views=views)


def _launch_with_sf(x, sf, *, fmt, block_size, fold=None):
    views = _views(x, fmt, block_size, "row", sf_name="sf_in")
    return Launch(per_block_cast_kernel, _params(x, fmt, block_size, "row", False, "cast_only", fold), views=views)


# Internal static option of the three ops: ``fold`` (None: automatic; True / False forces the flat or
# the 2-D grid, for tests).
_per_block_cast_op = TileOp(
    name="per_block_cast", launch=_launch, reference=_reference, check=_check, kernel_check=_kernel_check, operands=("x",)
)
_sf_only_op = TileOp(
    name="per_block_cast_with_sf_only",
    launch=_launch_sf_only,
    reference=_reference_sf_only,
    check=lambda x, **kw: _check(x, name="per_block_cast_with_sf_only", **kw),
    kernel_check=lambda x, **kw: _kernel_check(x, name="per_block_cast_with_sf_only", **kw),
    operands=("x",),
)
_with_sf_op = TileOp(
    name="per_block_cast_with_precomputed_sf",
    launch=_launch_with_sf,
    reference=_reference_with_sf,
    check=_check_with_sf,
    kernel_check=lambda x, sf, **kw: _kernel_check(x, name="per_block_cast_with_precomputed_sf", **kw),
    operands=("x", "sf"),
)


def per_block_cast(
    x: jax.Array,
    fmt: str,
    block_size: tuple[int, int],
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    impl: Impl = None,
) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x`` with one scale per ``block_size = (bm, bk)`` block.

    Args:
      x: bfloat16 or float32 ``[T, H]``; ``H % 64 == 0``, any T (partial edge blocks allowed).
      fmt: ``"e4m3"`` or ``"e2m1"``.
      block_size: ``(bm, bk)``, each 32 or 128.
      use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0: the scale layout and rounding
        (:func:`formats.sf_layout`); packed UE8M0 needs the other two.
      impl: None, ``"tilelang"`` or ``"xla"``.

    Returns:
      ``(data, sf)``: data ``float8_e4m3fn [T, H]`` or packed e2m1 ``uint8 [T, H/2]``; sf the storage of
      the logical ``[ceil(T/bm), ceil(H/bk)]`` scales in the chosen layout (row fp32, column-major fp32
      ``[K_b, align(M_b, 4)]`` or packed UE8M0 int32 ``[ceil(K_b/4), align(M_b, 4)]``, padding zero).
      Bit-exact with ``formats.quantize_blocks`` + ``formats.store_sf``.
    """
    name = "per_block_cast"
    check_impl(impl, name)
    x, fmt, block_size = as_array(x, name, "x"), _fmt(fmt, name), _block_size(block_size, name)
    layout = _layout_of(name, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    return _per_block_cast_op(x, impl=impl, fmt=fmt, block_size=block_size, layout=layout, round_sf=bool(round_sf))


def per_block_cast_with_sf_only(
    x: jax.Array,
    fmt: str,
    block_size: tuple[int, int],
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    impl: Impl = None,
) -> jax.Array:
    """Only the scales of :func:`per_block_cast` (same arguments, same sf)."""
    name = "per_block_cast_with_sf_only"
    check_impl(impl, name)
    x, fmt, block_size = as_array(x, name, "x"), _fmt(fmt, name), _block_size(block_size, name)
    layout = _layout_of(name, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    return _sf_only_op(x, impl=impl, fmt=fmt, block_size=block_size, layout=layout, round_sf=bool(round_sf))


def per_block_cast_with_precomputed_sf(
    x: jax.Array,
    fmt: str,
    block_size: tuple[int, int],
    sf: jax.Array,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    impl: Impl = None,
) -> jax.Array:
    """Quantizes ``x`` with given scales: ``data = cast(x · (1 / sf))`` per block.

    ``sf`` must be row-major float32 ``[ceil(T/bm), ceil(H/bk)]`` (TileKernels asserts the same: the
    column-major and packed flags are rejected; ``round_sf`` has no effect). Returns the data only.
    """
    name = "per_block_cast_with_precomputed_sf"
    check_impl(impl, name)
    x, sf = as_array(x, name, "x"), as_array(sf, name, "sf")
    fmt, block_size = _fmt(fmt, name), _block_size(block_size, name)
    static_flag(round_sf, name, "round_sf")
    col = static_flag(use_tma_aligned_col_major_sf, name, "use_tma_aligned_col_major_sf")
    if col or static_flag(use_packed_ue8m0, name, "use_packed_ue8m0"):
        raise ValueError(
            f"{name}: sf must be row-major float32; use_tma_aligned_col_major_sf and use_packed_ue8m0 must be False"
        )
    return _with_sf_op(x, sf, impl=impl, fmt=fmt, block_size=block_size)
