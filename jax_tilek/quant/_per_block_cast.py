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

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, View, check_impl, config_class, uses
from jax_tilek.quant import formats as F
from jax_tilek.spec import GRID_LIMITS
from jax_tilek.testing import ArgSpec, random_array

BLOCK_SIZES = (32, 128)
FORMATS = ("e4m3", "e2m1")
IN_DTYPES = (jnp.bfloat16, jnp.float32)
HIDDEN_ALIGN = 64
THREADS = 256
TILE_ELEMENTS = 8192  # a CTA tile is bm x max(bk, 8192 / bm)
PAD = [1, 2, 3]  # offsets of the padding entries that a scale's writer also zeroes

# Element codecs and stores, written out so that every rounding and every access width is explicit.
PRELUDE = device.prelude(device.E4M3X4_SCALED, device.E2M1X4_SCALED, device.E2M1X8_SCALED, device.STORE8)


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
                            o[h] = T.call_extern("uint32", "tilek_e4m3x4_scaled", *quad(w, i), s_inv)
                        elif vec == 8:
                            o[h] = T.call_extern("uint32", "tilek_e2m1x8_scaled", *quad(w, i), *quad(w, i + 2), s_inv)
                        else:
                            o[h] = T.Cast("uint16", T.call_extern("uint32", "tilek_e2m1x4_scaled", *quad(w, i), s_inv))
                    if k_ok and row0 + r * rows_per_rep < num_tokens:
                        column = (bx * tk + col) // out_div
                        if out_words == 2:
                            T.evaluate(T.call_extern("handle", "tilek_store8", T.address_of(out[row0 + r * rows_per_rep, column]), o[0], o[1]))
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
# Reference, rules, launch. One op for the three functions: operands ``x`` and the given scales
# ``sf_in`` (mode "cast_only"); results by mode. Not row-wise: a block spans bm tokens (vmap maps a
# loop, a token-sharded program gathers).

NAMES = {"cast": "per_block_cast", "sf_only": "per_block_cast_with_sf_only", "cast_only": "per_block_cast_with_precomputed_sf"}
RESULTS = {"cast": ("out", "sf"), "sf_only": ("sf",), "cast_only": ("out",)}


def _layout_of(name: str, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf) -> str:
    col = checks.static_bool(name, "use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf)
    packed = checks.static_bool(name, "use_packed_ue8m0", use_packed_ue8m0)
    return F.sf_layout(col, packed, checks.static_bool(name, "round_sf", round_sf), op=name)


def _block_size(block_size, name: str) -> tuple[int, int]:
    """``block_size`` as a pair of Python ints, each in BLOCK_SIZES (TypeError / ValueError naming the op)."""
    if isinstance(block_size, (str, bytes)) or not hasattr(block_size, "__len__"):
        raise TypeError(f"{name}: block_size must be a pair (bm, bk) with bm, bk in {BLOCK_SIZES}, got {block_size!r}")
    if len(block_size) != 2:
        raise ValueError(f"{name}: block_size must be (bm, bk) with bm, bk in {BLOCK_SIZES}, got {block_size!r}")
    block = tuple(checks.static_int(name, "block_size", b) for b in block_size)
    if any(b not in BLOCK_SIZES for b in block):
        raise ValueError(f"{name}: block_size must be (bm, bk) with bm, bk in {BLOCK_SIZES}, got {block}")
    return block


def _fmt(fmt, name: str) -> str:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"{name}: fmt must be one of {FORMATS}, got {fmt!r}")
    return fmt


def _reference(x, sf_in, *, fmt, block_size, layout, round_sf, mode):
    if mode == "cast_only":
        inv = F.exact_div(np.float32(1.0), sf_in.astype(jnp.float32))
        scaled = x.astype(jnp.float32) * F.expand_blocks(inv, block_size, x.shape)
        return F.quantize_values(scaled, fmt)
    data, sf = F.quantize_blocks(x, fmt, block_size, round_sf=round_sf)
    return (data, F.store_sf(sf, layout)) if mode == "cast" else F.store_sf(sf, layout)


def _check(x, sf_in, *, fmt, block_size, layout, round_sf, mode):
    name = NAMES[mode]
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [num_tokens, hidden], got shape {x.shape}")
    if x.dtype not in IN_DTYPES:
        raise ValueError(f"{name}: x must be bfloat16 or float32, got {x.dtype}")
    if x.shape[1] % HIDDEN_ALIGN:
        raise ValueError(f"{name}: hidden size (x.shape[1] = {x.shape[1]}) must be a multiple of {HIDDEN_ALIGN}")
    expected = F.num_blocks(x.shape, block_size)
    if mode == "cast_only" and (sf_in.dtype != jnp.float32 or tuple(sf_in.shape) != expected):
        raise ValueError(
            f"{name}: sf must be row-major float32 {list(expected)} (one scale per block of x {list(x.shape)}), got "
            f"{sf_in.dtype} {list(sf_in.shape)}"
        )


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


def _kernel_check(x, sf_in, *, block_size, mode, **_):
    ctas, _ = _grid(x, block_size)
    if ctas > GRID_LIMITS[0]:
        raise ValueError(f"{NAMES[mode]}: x {list(x.shape)} needs {ctas} tiles, more than the kernel's grid takes ({GRID_LIMITS[0]})")


@dataclasses.dataclass(frozen=True)
class PerBlockCastConfig:
    """``fold``: one flat grid of every tile instead of the 2-D grid (hidden tiles, token tiles)."""

    fold: bool


@config_class(PerBlockCastConfig)
def _config(x, sf_in, *, block_size, **_) -> PerBlockCastConfig:
    """The 2-D grid while the token tiles fit grid y's 65,535, else the flat grid."""
    return PerBlockCastConfig(fold=_grid(x, block_size)[1])


def _launch(x, sf_in, *, config: PerBlockCastConfig, fmt, block_size, layout, round_sf, mode) -> Launch:
    """64-bit extents (``wide``) only when the shapes need them (ordinary shapes keep the 32-bit code)."""
    t, h = x.shape
    in_size = np.dtype(x.dtype).itemsize
    bm, bk = block_size
    params = dict(in_dtype=np.dtype(x.dtype).name, fmt=fmt, bm=bm, bk=bk, layout=layout, round_sf=round_sf, mode=mode)
    params.update({"fold": True} if config.fold else {}, **({"wide": True} if _wide(x, block_size) else {}))
    views = {"x": View((t, h * in_size // 4), dtype=np.uint32)}
    if mode != "sf_only":  # the data as 32-bit words (16-bit ones for e2m1 from fp32: 4 codes per 4 elements)
        views["out"] = View((t, h // 4), dtype=np.uint32) if fmt == "e4m3" else View((t, h // 8), dtype=np.uint32) if in_size == 2 else View((t, h // 4), dtype=np.uint16)
    # Explicit strides: spec.compact_strides makes the row stride of a [K, 0] array 1, not 0.
    (rows, row), _ = F.sf_storage_shape(layout, F.num_blocks(x.shape, block_size))
    sf = "sf_in" if mode == "cast_only" else "sf"
    views[sf] = View((rows, 4 * row), (4 * row, 1), dtype=np.uint8) if layout == "col_ue8m0" else View((rows, row), (row, 1))
    return Launch(per_block_cast_kernel, params, views=views)


_per_block_cast_op = TileOp(
    name="per_block_cast", launch=_launch, operands=("x", "sf_in?"), results=lambda *_, mode, **__: RESULTS[mode],
    reference=_reference, check=_check, config=_config, kernel_check=_kernel_check,
)  # fmt: skip
_sf_only_op = dataclasses.replace(_per_block_cast_op, name=NAMES["sf_only"])
_with_sf_op = dataclasses.replace(_per_block_cast_op, name=NAMES["cast_only"])


# ---------------------------------------------------------------------------------------------
# Named calls: every configuration the GPU tests run (dtype, format, block, scale layout; on
# [131, 576] here), the flat grid forced ("_flat") and chosen beyond grid y, the benchmarks'. "small_"
# calls take the whole contract; "gpu_" and "bench_" ones are only traced and lowered off the GPU.

SF_FLAGS = {"row": (False, False, False), "row_round": (False, True, False), "col": (True, False, False), "col_ue8m0": (True, True, True)}


def _case(prefix: str, shape, dtype, fmt: str, block, sf: str = "row", flat: bool = False, with_sf: bool = False) -> ArgSpec:
    """A per_block_cast call with the scale layout ``sf`` (SF_FLAGS), or (``with_sf``) a call with given
    row-major scales."""
    name = f"{prefix}_{np.dtype(dtype).name}_{fmt}_{block[0]}x{block[1]}_{sf}{'_flat' if flat else ''}_{shape[0]}x{shape[1]}"
    x, config, bench = jax.ShapeDtypeStruct(shape, dtype), dict(fold=True) if flat else {}, prefix != "small"
    if with_sf:
        sf_in = jax.ShapeDtypeStruct(F.num_blocks(shape, block), jnp.float32)
        return ArgSpec(name, (x, fmt, block, sf_in), make=_positive_scales, config=config, bench=bench)
    flags = dict(zip(("use_tma_aligned_col_major_sf", "round_sf", "use_packed_ue8m0"), SF_FLAGS[sf]))
    return ArgSpec(name, (x,), dict(fmt=fmt, block_size=block, **flags), config=config, bench=bench)


def _positive_scales(rng: np.random.Generator, x, fmt, block, sf):
    """Random x and positive power-of-two scales."""
    return random_array(rng, x.shape, x.dtype), fmt, block, np.exp2(rng.integers(-30, 10, size=sf.shape)).astype(np.float32)


BF16, FP32 = jnp.bfloat16, jnp.float32
GPU_SHAPE = (131, 576)
GPU_CAST = (
    *((dtype, fmt, block, sf) for dtype in (BF16, FP32) for fmt in FORMATS for block in ((32, 32), (128, 128)) for sf in ("row_round", "col_ue8m0")),
    (BF16, "e4m3", (32, 128), "row"), (BF16, "e2m1", (128, 32), "col"), (FP32, "e2m1", (32, 128), "col"), (FP32, "e4m3", (128, 32), "row"),
)  # fmt: skip
# The configurations that take the whole contract ("small_"; the others "gpu_"): both dtypes, formats,
# square blocks of both sizes, every scale layout, both oblong blocks.
CONTRACT = ((BF16, "e4m3", (32, 32), "row_round"), (FP32, "e2m1", (128, 128), "col_ue8m0"), (BF16, "e2m1", (32, 32), "col_ue8m0"),
            (FP32, "e4m3", (128, 128), "row_round"), (BF16, "e4m3", (32, 128), "row"), (FP32, "e2m1", (32, 128), "col"))  # fmt: skip
FOLDED = ((BF16, "e4m3", (32, 32), "col_ue8m0"), (FP32, "e2m1", (128, 128), "col"), (BF16, "e2m1", (32, 128), "row"))

ARG_SPECS = (
    *(_case("small" if cfg in CONTRACT else "gpu", GPU_SHAPE, *cfg) for cfg in GPU_CAST),
    *(_case("small" if cfg == FOLDED[0] else "gpu", GPU_SHAPE, *cfg, flat=True) for cfg in FOLDED),
    _case("gpu", (65535 * 32 + 33, 64), BF16, "e4m3", (32, 32), "col_ue8m0"),
    _case("bench", (16384, 7168), BF16, "e4m3", (128, 128), "col_ue8m0"),
    _case("bench", (65536, 4096), BF16, "e4m3", (32, 32), "row_round"),
    _case("bench", (8192, 7168), FP32, "e4m3", (128, 128), "row_round"),
    _case("bench", (32768, 7168), BF16, "e2m1", (32, 32), "col_ue8m0"),
    _case("bench", (2_162_688, 512), BF16, "e4m3", (32, 32), "col_ue8m0"),
)
SF_ONLY_SPECS = (
    _case("small", GPU_SHAPE, BF16, "e4m3", (128, 128), "col_ue8m0"),
    _case("small", GPU_SHAPE, FP32, "e2m1", (32, 32), "col"),
    *(_case("gpu", GPU_SHAPE, *cfg, flat=True) for cfg in FOLDED),
    _case("bench", (16384, 7168), BF16, "e4m3", (128, 128), "row"),
)
PRECOMPUTED_SPECS = (
    _case("small", GPU_SHAPE, BF16, "e4m3", (128, 128), with_sf=True),
    _case("small", GPU_SHAPE, FP32, "e2m1", (32, 32), with_sf=True),
    *(_case("gpu", GPU_SHAPE, dtype, fmt, block, flat=True, with_sf=True) for dtype, fmt, block, _ in FOLDED),
    _case("bench", (16384, 7168), BF16, "e4m3", (128, 128), with_sf=True),
)


@uses(_per_block_cast_op, cases=ARG_SPECS)
def per_block_cast(
    x: jax.Array,
    fmt: str,
    block_size: tuple[int, int],
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    *,
    impl=None,
    ops,
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
    name = NAMES["cast"]
    check_impl(impl, name)
    x, fmt, block_size = checks.as_array(name, "x", x), _fmt(fmt, name), _block_size(block_size, name)
    layout = _layout_of(name, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    return ops[0](x, impl=impl, fmt=fmt, block_size=block_size, layout=layout, round_sf=bool(round_sf), mode="cast")


@uses(_sf_only_op, cases=SF_ONLY_SPECS)
def per_block_cast_with_sf_only(
    x: jax.Array,
    fmt: str,
    block_size: tuple[int, int],
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    *,
    impl=None,
    ops,
) -> jax.Array:
    """Only the scales of :func:`per_block_cast` (same arguments, same sf)."""
    name = NAMES["sf_only"]
    check_impl(impl, name)
    x, fmt, block_size = checks.as_array(name, "x", x), _fmt(fmt, name), _block_size(block_size, name)
    layout = _layout_of(name, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    return ops[0](x, impl=impl, fmt=fmt, block_size=block_size, layout=layout, round_sf=bool(round_sf), mode="sf_only")


@uses(_with_sf_op, cases=PRECOMPUTED_SPECS)
def per_block_cast_with_precomputed_sf(
    x: jax.Array,
    fmt: str,
    block_size: tuple[int, int],
    sf: jax.Array,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    *,
    impl=None,
    ops,
) -> jax.Array:
    """Quantizes ``x`` with given scales: ``data = cast(x · (1 / sf))`` per block.

    ``sf`` must be row-major float32 ``[ceil(T/bm), ceil(H/bk)]`` (TileKernels asserts the same: the
    column-major and packed flags are rejected; ``round_sf`` has no effect). Returns the data only.
    """
    name = NAMES["cast_only"]
    check_impl(impl, name)
    x, sf = checks.as_array(name, "x", x), checks.as_array(name, "sf", sf)
    fmt, block_size = _fmt(fmt, name), _block_size(block_size, name)
    checks.static_bool(name, "round_sf", round_sf)
    col = checks.static_bool(name, "use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf)
    if col or checks.static_bool(name, "use_packed_ue8m0", use_packed_ue8m0):
        raise ValueError(
            f"{name}: sf must be row-major float32; use_tma_aligned_col_major_sf and use_packed_ue8m0 must be False"
        )
    return ops[0](x, sf, impl=impl, fmt=fmt, block_size=block_size, layout="row", round_sf=False, mode="cast_only")
