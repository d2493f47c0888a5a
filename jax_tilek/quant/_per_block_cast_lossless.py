"""Exact FP4 (e2m1) -> FP8 (e4m3) re-blocking: ``per_block_cast_lossless`` (TileKernels v1 §2.6, v2.1 §1.4).

The input is FP4 data with power-of-two scales in ``x_block_size`` blocks (any layout); the output is
e4m3 data with power-of-two scales in ``out_block_size`` blocks. With ``E`` a scale's exponent (the
fp32 exponent field ``(bits >> 23) & 0xFF``, or the UE8M0 byte; sign and mantissa are ignored):

  ``E_out = max(E_in over the out block) - 6``, saturating at 0 (then the fp32 output scale is 0.0),
  ``q8 = e4m3(fp4 · 2^(E_in - E_out))`` (round to nearest even, saturating).

While ``E_in + 5 >= E_out`` (the scales in an out block span at most 2^11) every product is exactly
representable (6·2^6 = 384 <= 448, 0.5·2^-5 = 2^-6 is e4m3's smallest normal), so the dequantized
FP8 equals the dequantized FP4 bit for bit. TileKernels device-asserts that condition; a JAX op cannot
trap, so here a violating element is rounded: ``q8`` is the e4m3 value nearest to
``fp4 · 2^(E_in - E_out)``, which is still exact down to ``E_in = E_out - 8`` (e4m3 subnormals) and
flushes to ±0 below ``E_in = E_out - 12``; nothing wraps around (the kernel clamps the shift at -24,
where every product already rounds to zero). ``round_sf`` has no effect (the output scales are powers
of two by construction); packed UE8M0 output needs ``use_tma_aligned_col_major_sf``.

Rules (the union of v1, ``H % 32`` and any T, and v2.1, ``T % 128`` and ``H % 128``): ``H % 32 == 0``,
any ``T >= 0``; ``x_block_size = (bm, bk)`` with ``bm in {1, 32, 128}``, ``bk in {32, 64, 128}``;
``out_block_size`` likewise, each side a multiple of the input block's.

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
from jax_tilek.testing import ArgSpec

BLOCK_ROWS = (1, 32, 128)
BLOCK_COLS = (32, 64, 128)
HIDDEN_ALIGN = 32
THREADS = 256
CHUNK = 32  # FP4 elements per thread and step: 16 bytes in, 32 bytes out
TILE_ELEMENTS = 16384
PAD = [1, 2, 3]
MIN_SHIFT = -24  # 2^-24: the smallest fp16 (subnormal); every product below it rounds to zero in e4m3

PRELUDE = device.prelude(device.FP4_E4M3, device.EXP2_F16X2, device.STORE16)


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _pair(block, name: str) -> tuple[int, int]:
    """A block size as a pair of Python ints (TypeError / ValueError naming the argument)."""
    if isinstance(block, (str, bytes)) or not hasattr(block, "__len__"):
        raise TypeError(f"{name} must be a pair (bm, bk) of integers, got {block!r}")
    if len(block) != 2:
        raise ValueError(f"{name} must be a pair (bm, bk), got {block!r}")
    if not all(isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)) for b in block):
        raise TypeError(f"{name} must be a pair (bm, bk) of integers, got {block!r}")
    return int(block[0]), int(block[1])


def tile_plan(x_block_size: tuple[int, int], out_block_size: tuple[int, int]) -> dict:
    """The CTA tile ``max(bm_out, 32) x max(bk_out, 16384 / tm)`` (TileKernels' tiling with twice its
    8192 elements: two 16-byte chunks in flight per thread) and how the tile's input scales map onto
    threads; raises ValueError (TypeError for non-integers) for block sizes it does not serve."""
    (bmi, bki), (bmo, bko) = _pair(x_block_size, "x_block_size"), _pair(out_block_size, "out_block_size")
    if bmi not in BLOCK_ROWS or bki not in BLOCK_COLS:
        raise ValueError(f"x_block_size must be (bm, bk) with bm in {BLOCK_ROWS}, bk in {BLOCK_COLS}, got {x_block_size}")
    if bmo not in BLOCK_ROWS or bko not in BLOCK_COLS:
        raise ValueError(f"out_block_size must be (bm, bk) with bm in {BLOCK_ROWS}, bk in {BLOCK_COLS}, got {out_block_size}")
    if bmo % bmi or bko % bki:
        raise ValueError(f"out_block_size {out_block_size} must be a multiple of x_block_size {x_block_size} on both axes")
    tm = max(bmo, 32)
    tk = max(bko, TILE_ELEMENTS // tm)
    nki = tk // bki  # input scales per tile row of scales
    rm, rk = bmo // bmi, bko // bki  # input scales per output block, along M and K

    def free(bit: int) -> bool:  # flipping this bit of an entry index keeps its output block
        return bit < min(_log2(nki), _log2(rk)) or _log2(nki) <= bit < _log2(nki) + _log2(rm)

    entries = tm // bmi * nki  # input scales per tile
    return dict(
        tm=tm, tk=tk, nki=nki, entries=entries, per_thread=-(-entries // THREADS), rm=rm, rk=rk,
        free_bits=[b for b in range(5) if free(b)], out_blocks=(tm // bmo) * (tk // bko), chunks=tm * tk // CHUNK // THREADS,
    )  # fmt: skip


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def per_block_cast_lossless_kernel(
    x_block: tuple, out_block: tuple, in_layout: str, layout: str, fold: bool = False, wide: bool = False
):
    """One CTA of 256 threads re-blocks a ``tm x tk`` tile.

    1. Each thread loads its two 16-byte FP4 chunks (32 codes each; a warp reads whole row segments
       of 128 bytes or more), then one or two input scales of the tile, whose exponents go to shared
       memory.
    2. Output-block maxima of the exponents: a butterfly over the lanes holding scales of the same
       output block, then ``atomicMax`` in shared memory across warps.
    3. Threads 0 .. out_blocks - 1 store the output scales (and zero the storage padding next to
       them); every thread converts its chunks: codes become fp16 pairs (exact), are multiplied by
       2^14 and by 2^(E_in - E_out) in fp16 (exact, or rounding only what e4m3 flushes to zero), and
       are converted with ``cvt.rn.satfinite.e4m3x2.f16x2``; each chunk is two 16-byte stores.

    The grid is (hidden tiles, token tiles), or with ``fold`` one flat grid of both (for more token
    tiles than grid y's 65,535). Extents are 32-bit symbols (the fast index arithmetic), or with
    ``wide`` 64-bit ones, so that no guard or index wraps around: the launch asks for ``wide`` when
    an index of the shapes could pass 2^31 (see :func:`_wide`).
    """
    import tilelang.language as T

    bmi, bki = x_block
    bmo, bko = out_block
    plan = tile_plan(x_block, out_block)
    tm, tk, nki = plan["tm"], plan["tk"], plan["nki"]
    entries, per_thread, free_bits = plan["entries"], plan["per_thread"], plan["free_bits"]
    out_blocks, chunks = plan["out_blocks"], plan["chunks"]
    free_mask = sum(1 << b for b in free_bits)
    nko = tk // bko  # output blocks per tile row of blocks
    cpr = tk // CHUNK  # chunks per tile row

    idx = "int64" if wide else "int32"
    num_tokens, d_words = T.dynamic("num_tokens, d_words", idx)  # d_words: a row of FP4 data in 32-bit words
    hidden = d_words * 8
    k_in, k_out = T.ceildiv(hidden, bki), T.ceildiv(hidden, bko)

    def sf_param(which, lay, k_blocks):
        if lay == "row":
            rows = T.dynamic(f"{which}_m_blocks", idx)
            return (rows, k_blocks), "float32"
        if lay == "col":
            stride = T.dynamic(f"{which}_m_stride", idx)  # align(M_b, 4)
            return (k_blocks, stride), "float32"
        nbytes = T.dynamic(f"{which}_m_bytes", idx)  # packed UE8M0 seen as bytes: 4 * align(M_b, 4)
        return (T.ceildiv(k_blocks, 4), nbytes), "uint8"

    in_sf_shape, in_sf_dtype = sf_param("in", in_layout, k_in)
    out_sf_shape, out_sf_dtype = sf_param("out", layout, k_out)
    m_in, m_out = T.ceildiv(num_tokens, bmi), T.ceildiv(num_tokens, bmo)

    @T.prim_func
    def per_block_cast_lossless(
        x: T.Tensor((num_tokens, d_words), "uint32"),
        x_sf: T.Tensor(in_sf_shape, in_sf_dtype),
        out: T.Tensor((num_tokens, hidden // 4), "uint32"),
        out_sf: T.Tensor(out_sf_shape, out_sf_dtype),
    ):
        k_tiles, m_tiles = T.ceildiv(hidden, tk), T.ceildiv(num_tokens, tm)
        grid = (k_tiles * m_tiles,) if fold else (k_tiles, m_tiles)
        with T.Kernel(*grid, threads=THREADS, prelude=PRELUDE) as blocks:
            bx, by = (blocks % k_tiles, blocks // k_tiles) if fold else blocks
            T.assume(d_words % 4 == 0)
            ein = T.alloc_shared((per_thread * THREADS,), "int32")
            omax = T.alloc_shared((out_blocks,), "uint32")
            w = T.alloc_local((chunks * 4,), "uint32")
            o = T.alloc_local((8,), "uint32")
            ev = T.alloc_local((per_thread,), "int32")
            t = T.get_thread_binding(0)
            if t < out_blocks:
                omax[t] = T.uint32(0)
            # 1. The FP4 chunks, then the tile's input exponents (0 outside the tensor); the loads of
            # both are in flight together.
            for j in T.unroll(chunks):
                c = t + j * THREADS
                row = by * tm + c // cpr
                col = bx * tk + c % cpr * CHUNK
                for v in T.vectorized(4):
                    w[j * 4 + v] = T.uint32(0)
                if row < num_tokens and col < hidden:
                    for v in T.vectorized(4):
                        w[j * 4 + v] = x[row, col // 8 + v]
            for i in T.unroll(per_thread):
                e = t + i * THREADS
                mi = by * (tm // bmi) + e // nki
                ki = bx * nki + e % nki
                ev[i] = 0
                if e < entries and mi < m_in and ki < k_in:
                    if in_layout == "row":
                        ev[i] = (T.reinterpret(x_sf[mi, ki], "int32") >> 23) & 0xFF
                    elif in_layout == "col":
                        ev[i] = (T.reinterpret(x_sf[ki, mi], "int32") >> 23) & 0xFF
                    else:
                        ev[i] = T.Cast("int32", x_sf[ki // 4, mi * 4 + ki % 4])
                ein[e] = ev[i]
            T.sync_threads()
            # 2. Output-block maxima: a butterfly over the lanes of one output block, then atomicMax.
            for i in T.unroll(per_thread):
                e = t + i * THREADS
                for b in free_bits:
                    ev[i] = T.max(ev[i], T.call_extern("int32", "__shfl_xor_sync", T.uint32(0xFFFFFFFF), ev[i], 1 << b))
                if (t & free_mask) == 0 and e < entries:
                    ob = e // nki // (bmo // bmi) * nko + e % nki // (bko // bki)
                    T.evaluate(T.call_extern("uint32", "atomicMax", T.address_of(omax[ob]), T.Cast("uint32", ev[i])))
            T.sync_threads()
            # 3. Output scales, then the data.
            if t < out_blocks:
                mo = by * (tm // bmo) + t // nko
                ko = bx * nko + t % nko
                e_out = T.max(T.Cast("int32", omax[t]) - 6, 0)
                if mo < m_out and ko < k_out:
                    last_m = mo == m_out - 1
                    if layout == "row":
                        out_sf[mo, ko] = T.reinterpret(e_out << 23, "float32")
                    elif layout == "col":
                        out_sf[ko, mo] = T.reinterpret(e_out << 23, "float32")
                        for p in PAD:  # the padding columns after the last row block
                            if last_m and mo + p < out_sf_shape[1]:
                                out_sf[ko, mo + p] = T.float32(0)
                    else:
                        last_k = ko == k_out - 1
                        out_sf[ko // 4, mo * 4 + ko % 4] = T.Cast("uint8", e_out)
                        for q in PAD:  # the unused bytes of the last word
                            if last_k and ko % 4 + q < 4:
                                out_sf[ko // 4, mo * 4 + ko % 4 + q] = T.uint8(0)
                        for p in PAD:  # the padding columns after the last row block
                            if last_m and mo + p < out_sf_shape[1] // 4:
                                out_sf[ko // 4, (mo + p) * 4 + ko % 4] = T.uint8(0)
                                for q in PAD:
                                    if last_k and ko % 4 + q < 4:
                                        out_sf[ko // 4, (mo + p) * 4 + ko % 4 + q] = T.uint8(0)
            for j in T.unroll(chunks):
                c = t + j * THREADS
                r, cc = c // cpr, c % cpr * CHUNK  # inside the tile
                e_in = ein[r // bmi * nki + cc // bki]
                e_out = T.max(T.Cast("int32", omax[r // bmo * nko + cc // bko]) - 6, 0)
                scale = T.call_extern("uint32", "tilek_exp2_f16x2", T.max(e_in - e_out, MIN_SHIFT))
                for q in T.unroll(8):
                    o[q] = T.call_extern("uint32", "tilek_fp4x4_e4m3x4", w[j * 4 + q // 2], (q % 2) * 2, scale)
                if by * tm + r < num_tokens and bx * tk + cc < hidden:
                    for h in T.unroll(2):
                        T.evaluate(
                            T.call_extern(
                                "handle", "tilek_store16", T.address_of(out[by * tm + r, (bx * tk + cc) // 4 + h * 4]),
                                o[h * 4], o[h * 4 + 1], o[h * 4 + 2], o[h * 4 + 3],
                            )
                        )  # fmt: skip

    return per_block_cast_lossless


# ---------------------------------------------------------------------------------------------
# Reference, rules, launch.


def _exponents(stored: jax.Array, layout: str, num_blocks: tuple[int, int]) -> jax.Array:
    """The exponents ``E`` of stored scales, logical ``[M_b, K_b]`` int32. (formats.load_sf would do
    for non-empty arrays; its UE8M0 unpacking cannot reshape zero tokens.)"""
    m_b, k_b = num_blocks
    if layout == "col_ue8m0":
        raw = jax.lax.bitcast_convert_type(stored, jnp.uint8)  # [ceil(K_b/4), align(M_b, 4), 4]
        raw = jnp.swapaxes(raw, 0, 1).reshape(raw.shape[1], raw.shape[0] * 4)
        return raw[:m_b, :k_b].astype(jnp.int32)
    logical = stored if layout == "row" else stored[:, :m_b].T
    return (jax.lax.bitcast_convert_type(logical.astype(jnp.float32), jnp.int32) >> 23) & 0xFF


def _reference(data, x_sf, *, x_block, out_block, in_layout, layout):
    t, h = data.shape[0], data.shape[1] * 2
    e_in = _exponents(x_sf, in_layout, F.num_blocks((t, h), x_block))
    e_elem = F.expand_blocks(e_in, x_block, (t, h))
    bmo, bko = out_block
    mo, ko = F.num_blocks((t, h), out_block)
    padded = jnp.pad(e_elem, ((0, mo * bmo - t), (0, ko * bko - h)))
    e_out = jnp.maximum(padded.reshape(mo, bmo, ko, bko).max(axis=(1, 3)) - 6, 0)
    shift = jnp.maximum(e_elem - F.expand_blocks(e_out, out_block, (t, h)), MIN_SHIFT)
    values = F.dequantize_values(data, "e2m1") * F.exp2_exact(shift)  # exact: 2 significant bits, >= 2^-25
    sf = jax.lax.bitcast_convert_type((e_out << 23).astype(jnp.int32), jnp.float32)
    return F.quantize_values(values, "e4m3"), F.store_sf(sf, layout)


def infer_sf_layout(data_shape: tuple[int, int], x_sf: jax.Array, x_block: tuple[int, int]) -> str:
    """The layout of an input scale array from its dtype and shape; ValueError when ambiguous."""
    t, h = data_shape[0], data_shape[1] * 2
    blocks = F.num_blocks((t, h), x_block)
    matches = [
        lay for lay in ("row", "col", "col_ue8m0")
        if (tuple(x_sf.shape), np.dtype(x_sf.dtype)) == F.sf_storage_shape(lay, blocks)
    ]  # fmt: skip
    if len(matches) == 1:
        return matches[0]
    if not matches:
        shapes = {lay: list(F.sf_storage_shape(lay, blocks)[0]) for lay in ("row", "col", "col_ue8m0")}
        raise ValueError(
            f"per_block_cast_lossless: x's scales ({x_sf.dtype} {list(x_sf.shape)}) match no layout for x_block_size "
            f"{x_block}: row float32 {shapes['row']}, col float32 {shapes['col']} or packed UE8M0 int32 {shapes['col_ue8m0']}"
        )
    raise ValueError(
        f"per_block_cast_lossless: x's scales {list(x_sf.shape)} could be row-major or column-major; say which with "
        "x_sf_layout='row' or 'col'"
    )


def _check(data, x_sf, *, x_block, out_block, in_layout, layout):
    name = "per_block_cast_lossless"
    if data.ndim != 2 or data.dtype != jnp.uint8:
        raise ValueError(f"{name}: x's data must be packed e2m1 uint8 [num_tokens, hidden / 2], got {data.dtype} {list(data.shape)}")
    if (data.shape[1] * 2) % HIDDEN_ALIGN:
        raise ValueError(f"{name}: hidden size ({data.shape[1] * 2}) must be a multiple of {HIDDEN_ALIGN}")
    try:
        tile_plan(x_block, out_block)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    expected = F.sf_storage_shape(in_layout, F.num_blocks((data.shape[0], data.shape[1] * 2), x_block))
    if (tuple(x_sf.shape), np.dtype(x_sf.dtype)) != expected:
        raise ValueError(
            f"{name}: x's scales in layout {in_layout!r} must be {expected[1]} {list(expected[0])} for x's data "
            f"{list(data.shape)}, got {x_sf.dtype} {list(x_sf.shape)}"
        )


def _sf_view(layout, num_blocks):
    (rows, row), _ = F.sf_storage_shape(layout, num_blocks)
    if layout == "col_ue8m0":
        return View((rows, 4 * row), (4 * row, 1), dtype=np.uint8)
    return View((rows, row), (row, 1))  # explicit: spec.compact_strides gives a [K, 0] array row stride 1


def _grid(data, x_block, out_block) -> tuple[int, bool]:
    """(CTAs, whether they form one flat grid): (hidden tiles, token tiles) while the token tiles fit
    grid y, else one flat grid."""
    plan = tile_plan(x_block, out_block)
    m_tiles, k_tiles = F.ceil_div(data.shape[0], plan["tm"]), F.ceil_div(data.shape[1] * 2, plan["tk"])
    return m_tiles * k_tiles, m_tiles > GRID_LIMITS[1]


def _wide(data, x_block, out_block) -> bool:
    """Whether the kernel needs 64-bit extents: an index (of the FP4 elements, rows padded to whole
    tiles, with a margin of 4) could reach 2^31."""
    plan = tile_plan(x_block, out_block)
    rows = (F.ceil_div(data.shape[0], plan["tm"]) + 1) * plan["tm"]
    cols = (F.ceil_div(data.shape[1] * 2, plan["tk"]) + 1) * plan["tk"]
    return rows * cols * 4 >= 2**31


def _kernel_check(data, x_sf, *, x_block, out_block, **_):
    ctas, _ = _grid(data, x_block, out_block)
    if ctas > GRID_LIMITS[0]:
        raise ValueError(
            f"per_block_cast_lossless: x's data {list(data.shape)} needs {ctas} tiles, more than the kernel's grid takes "
            f"({GRID_LIMITS[0]})"
        )


@dataclasses.dataclass(frozen=True)
class LosslessConfig:
    """``fold``: one flat grid of every tile instead of the 2-D grid (hidden tiles, token tiles)."""

    fold: bool


@config_class(LosslessConfig)
def _config(data, x_sf, *, x_block, out_block, **_) -> LosslessConfig:
    """The 2-D grid while the token tiles fit grid y's 65,535, else the flat grid."""
    return LosslessConfig(fold=_grid(data, x_block, out_block)[1])


def _launch(data, x_sf, *, config: LosslessConfig, x_block, out_block, in_layout, layout) -> Launch:
    """64-bit extents (``wide``) only when the shapes need them (ordinary shapes keep the 32-bit code)."""
    t, h = data.shape[0], data.shape[1] * 2
    params = dict(x_block=tuple(x_block), out_block=tuple(out_block), in_layout=in_layout, layout=layout)
    params.update({"fold": True} if config.fold else {}, **({"wide": True} if _wide(data, x_block, out_block) else {}))
    return Launch(
        per_block_cast_lossless_kernel,
        params,
        buffers={"x": "x's data", "x_sf": "x's scales", "out": "the output data", "out_sf": "the output scales"},
        views={
            "x": View((t, h // 8), dtype=np.uint32),
            "x_sf": _sf_view(in_layout, F.num_blocks((t, h), x_block)),
            "out": View((t, h // 4), dtype=np.uint32),
            "out_sf": _sf_view(layout, F.num_blocks((t, h), out_block)),
        },
    )


# Not row-wise: input and output blocks may span tokens.
_lossless_op = TileOp(
    name="per_block_cast_lossless", launch=_launch, reference=_reference, check=_check, kernel_check=_kernel_check,
    config=_config, operands=("x's data", "x's scales"), results=("the output data", "the output scales"),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Named calls: every configuration the GPU tests run (on [131, 2080] here), the flat grid forced
# ("_flat") and chosen beyond grid y, the benchmarks'. "small_" calls take the whole contract; "gpu_"
# and "bench_" ones are only traced and lowered off the GPU.

LAYOUT_FLAGS = {"row": (False, False), "col": (True, False), "col_ue8m0": (True, True)}  # (col-major, packed)


def _power_of_two_scales(rng: np.random.Generator, x):
    """Random FP4 codes and power-of-two scales 2^-7 .. 2^3 (exponent bytes 120 .. 130) in any layout."""
    data, sf = x
    if sf.dtype == jnp.int32:  # packed UE8M0: four exponent bytes a word
        stored = rng.integers(120, 131, size=(*sf.shape, 4), dtype=np.uint8).view(np.int32).reshape(sf.shape)
    else:
        stored = (rng.integers(120, 131, size=sf.shape).astype(np.uint32) << 23).view(np.float32)
    return ((rng.integers(0, 256, size=data.shape, dtype=np.uint8), stored),)


def _case(prefix: str, shape, x_block, out_block, in_layout: str, out_layout: str, flat: bool = False) -> ArgSpec:
    t, h = shape
    data = jax.ShapeDtypeStruct((t, h // 2), jnp.uint8)
    sf = jax.ShapeDtypeStruct(*F.sf_storage_shape(in_layout, F.num_blocks(shape, x_block)))
    col, packed = LAYOUT_FLAGS[out_layout]
    kwargs = dict(fmt="e4m3", x_block_size=x_block, out_block_size=out_block, use_tma_aligned_col_major_sf=col, round_sf=True,
                  use_packed_ue8m0=packed, x_sf_layout=in_layout)  # fmt: skip
    name = f"{prefix}_{x_block[0]}x{x_block[1]}_{in_layout}_to_{out_block[0]}x{out_block[1]}_{out_layout}{'_flat' if flat else ''}_{t}x{h}"
    return ArgSpec(name, ((data, sf),), kwargs, make=_power_of_two_scales, config=dict(fold=True) if flat else {}, bench=prefix != "small")


GPU_SHAPE = (131, 2080)
GPU_CONFIGS = (
    *(((1, 32), out_block, in_layout, out_layout) for out_block in ((1, 128), (32, 32), (128, 128)) for in_layout in ("row", "col_ue8m0")
      for out_layout in ("row", "col_ue8m0")),
    ((32, 32), (128, 128), "col", "col"), ((1, 32), (1, 128), "col", "col"),
)  # fmt: skip
# The configurations that take the whole contract ("small_"; the others "gpu_"): every block pair and layout.
CONTRACT = (((1, 32), (1, 128), "row", "row"), ((1, 32), (32, 32), "col_ue8m0", "col_ue8m0"), ((1, 32), (128, 128), "row", "col_ue8m0"),
            ((32, 32), (128, 128), "col", "col"))  # fmt: skip
ARG_SPECS = (
    *(_case("small" if cfg in CONTRACT else "gpu", GPU_SHAPE, *cfg) for cfg in GPU_CONFIGS),
    _case("gpu", GPU_SHAPE, (1, 32), (1, 128), "col_ue8m0", "row", flat=True),
    _case("gpu", GPU_SHAPE, (32, 32), (128, 128), "col", "col", flat=True),
    _case("gpu", (65535 * 32 + 32, 32), (1, 32), (1, 128), "row", "col_ue8m0"),
    _case("bench", (16384, 7168), (1, 32), (128, 128), "col_ue8m0", "col_ue8m0"),
    _case("bench", (65536, 4096), (1, 32), (1, 128), "row", "row"),
    _case("bench", (2_162_688, 512), (1, 32), (32, 32), "col_ue8m0", "row"),
)


@uses(_lossless_op, cases=ARG_SPECS)
def per_block_cast_lossless(
    x: tuple[jax.Array, jax.Array],
    fmt: str,
    x_block_size: tuple[int, int],
    out_block_size: tuple[int, int],
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    *,
    x_sf_layout: str | None = None,
    impl=None,
    ops,
) -> tuple[jax.Array, jax.Array]:
    """Re-blocks FP4 data with power-of-two scales into e4m3 data, exactly (see the module docstring).

    Args:
      x: ``(data, sf)``: packed e2m1 ``uint8 [T, H/2]`` and its scales in ``x_block_size`` blocks, in any
        layout (row float32, column-major float32 storage, or packed UE8M0 int32 storage).
      fmt: must be ``"e4m3"``.
      x_block_size, out_block_size: ``(bm, bk)`` of the input and output scales.
      use_tma_aligned_col_major_sf, use_packed_ue8m0: the output scale layout; ``round_sf`` is accepted
        and has no effect.
      x_sf_layout: ``"row"``, ``"col"`` or ``"col_ue8m0"``; by default inferred from the scales' dtype and
        shape (a square float32 array can be either: then it must be given).
      impl: None, ``"tilelang"`` or ``"xla"``.

    Returns:
      ``(data, sf)``: ``float8_e4m3fn [T, H]`` and the power-of-two scales ``[ceil(T/bm), ceil(H/bk)]``
      in the output layout.
    """
    name = "per_block_cast_lossless"
    check_impl(impl, name)
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"{name}: x must be a QuantTensor, a pair (data, sf), got {type(x).__name__}")
    data, x_sf = checks.as_array(name, "x's data", x[0]), checks.as_array(name, "x's scales", x[1])
    if not isinstance(fmt, str) or fmt != "e4m3":
        raise ValueError(f"{name}: only e2m1 -> e4m3 is lossless; fmt must be 'e4m3', got {fmt!r}")
    col = checks.static_bool(name, "use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf)
    packed = checks.static_bool(name, "use_packed_ue8m0", use_packed_ue8m0)
    checks.static_bool(name, "round_sf", round_sf)
    layout = F.sf_layout(col, packed, round_sf=True, op=name)
    try:
        x_block, out_block = _pair(x_block_size, "x_block_size"), _pair(out_block_size, "out_block_size")
        tile_plan(x_block, out_block)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None
    if data.ndim != 2:
        raise ValueError(f"per_block_cast_lossless: x's data must be [num_tokens, hidden / 2], got shape {list(data.shape)}")
    if x_sf_layout is None:
        x_sf_layout = infer_sf_layout(data.shape, x_sf, x_block)
    elif not isinstance(x_sf_layout, str) or x_sf_layout not in ("row", "col", "col_ue8m0"):
        raise ValueError(f"per_block_cast_lossless: x_sf_layout must be 'row', 'col' or 'col_ue8m0', got {x_sf_layout!r}")
    return ops[0](data, x_sf, impl=impl, x_block=x_block, out_block=out_block, in_layout=x_sf_layout, layout=layout)
