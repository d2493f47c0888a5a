"""Per-channel FP8 casts: one scale per ``npt`` tokens x 1 channel (TileKernels v1 §2.7-2.9, v2.1).

``x[T, H] -> (data e4m3, sf)`` with ``sf[b, h] = max(|x[b*npt:(b+1)*npt, h]|, 1e-4) / 448`` (or its
power-of-two ceiling with ``round_sf``) and ``data = e4m3(x · sf_inv)``; see
:mod:`jax_tilek.quant.formats` for the rules. Three ops share one kernel:

- :func:`per_channel_cast` (v2.1): bf16 input, or a QuantTensor re-scaled from per-token scales;
  sf row-major fp32, or packed UE8M0 along M.
- :func:`per_channel_cast_fused` (v1): optional fused cast-back input and row gather.
- :func:`per_channel_cast_and_transpose` (v1): the data comes out transposed, ``[H, T]``.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.device import static_range as _static
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, View, check_impl, config_class, uses
from jax_tilek.quant import formats as F
from jax_tilek.spec import GRID_LIMITS
from jax_tilek.testing import ArgSpec, random_array

TILE_T = 128  # tokens per CTA
THREADS = 256

# Device helpers: bf16 / e4m3 unpacking, exact e4m3 packing, stores the compiler cannot split.
_PRELUDE = device.prelude(device.BF16_UNPACK, device.E4M3_AT, device.E4M3X4, device.UE8M0, device.STORE8, device.STORE16)

SF_INPUTS = (None, "row", "col", "col_ue8m0")


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def per_channel_cast_kernel(
    tile_h: int,
    npt: int,
    round_sf: bool = False,
    sf_in: str | None = None,
    npc: int = 128,
    packed_sf: bool = False,
    gather: bool = False,
    transpose: bool = False,
    min_blocks: int = 2,
    fold: bool = False,
    wide: bool = False,
):
    """One CTA per 128 tokens x ``tile_h`` channels, 256 threads.

    Thread (tr, tc) holds ``R = tile_h / 16`` consecutive token rows of 8 channels in registers
    (16-byte loads of bf16, 8-byte loads of e4m3). Per-thread column maxima go to shared memory;
    then thread h < tile_h reduces channel h for every ``npt`` block of the tile, computes the scale
    (stored to global memory) and its inverse (shared memory). Every thread then scales and packs its
    values into e4m3 words and either stores 8 bytes per row, or (``transpose``) writes them into an
    XOR-swizzled byte tile that is read back column-wise and regrouped with ``__byte_perm`` into
    16-byte rows of the transposed output.

    Static options: ``sf_in`` (None: bf16 input; else the layout of the per-token fp32 / packed
    UE8M0 scales of an e4m3 input with blocks of ``npc`` channels), ``packed_sf`` (UE8M0 output
    packed along M), ``gather`` (input row of output row p is ``pos[p]``, zeros where ``pos[p]`` is
    outside ``[0, T)``), ``fold`` (one flat grid instead of (token tiles, channel tiles), for more
    channel tiles than grid y's 65,535), ``wide`` (64-bit extents, asked for by the launch when an
    index of the shapes could pass 2^31, see :func:`_wide`; else 32-bit ones, the fast index
    arithmetic): no guard or index wraps around.
    """
    import tilelang.language as T

    assert tile_h in (64, 128, 256) and npt in (32, 128) and sf_in in SF_INPUTS
    assert not (transpose and (gather or sf_in or packed_sf))
    quant_in = sf_in is not None
    groups = tile_h // 8  # threads across a tile row
    rows = THREADS // groups  # thread rows
    R = TILE_T // rows  # token rows per thread
    blocks = TILE_T // npt  # npt blocks per tile
    words = 2 if quant_in else 4  # input words per thread row (8 channels)
    assert R % 4 == 0 and 16 % R == 0 and npt % R == 0
    per_block = npt // R  # thread rows per npt block

    Tn, P, XW, S0, TA, GW = T.dynamic("Tn, P, XW, S0, TA, GW", "int64" if wide else "int32")  # XW: 32-bit words per input row
    if transpose:
        P = Tn  # output tokens = input tokens
    H = XW * (4 if quant_in else 2)  # channels
    x_shape = (Tn, XW)
    if sf_in == "row":
        sf_in_shape, sf_in_dtype = (Tn, H // npc), "float32"
    elif sf_in == "col":
        sf_in_shape, sf_in_dtype = (H // npc, TA), "float32"
    else:  # col_ue8m0 as bytes [word row, token, byte]; unused shapes for bf16 input
        sf_in_shape, sf_in_dtype = (GW, TA, 4), "uint8"
    out_shape = (H, Tn // 4) if transpose else (P, H // 4)
    if not packed_sf:
        sf_shape, sf_dtype = (S0, H), "float32"
    elif npt == 32:  # a tile fills whole int32 words [ceil(M_b/4), H]
        sf_shape, sf_dtype = (S0, H), "uint32"
    else:  # a tile writes one byte of each word: the words as bytes
        sf_shape, sf_dtype = (S0, H, 4), "uint8"

    # Transposed store phase (batched_transpose's scheme for 1-byte elements).
    tile_w = tile_h // 4  # words per tile row
    chunks = tile_h // 16  # 16-byte chunks per tile row
    store_warps = min(THREADS // 32, tile_h // 16)

    def value(xw, xs, r, c):
        """Channel c of row r as fp32 (decoded and scaled for a QuantTensor input)."""
        if quant_in:
            e = T.call_extern("float32", "tilek_e4m3_at", xw[r * 2 + c // 4], c % 4)
            return T.call_extern("float32", "__fmul_rn", e, xs[r])
        return T.call_extern("float32", "tilek_bf16_hi" if c % 2 else "tilek_bf16_lo", xw[r * 4 + c // 2])

    def quad(xw, xs, inv, r, q):
        """Channels 4q..4q+3 of row r, scaled, as four e4m3 codes in a word."""
        return T.call_extern(
            "uint32", "tilek_e4m3x4",
            *(T.call_extern("float32", "__fmul_rn", value(xw, xs, r, 4 * q + i), inv[4 * q + i]) for i in range(4)),
        )  # fmt: skip

    @T.macro
    def body(x, x_sf, pos, out, sf):
        m_tiles, h_tiles = T.ceildiv(P, TILE_T), H // tile_h
        grid = (m_tiles * h_tiles,) if fold else (m_tiles, h_tiles)
        with T.Kernel(*grid, threads=THREADS, prelude=_PRELUDE) as cta:
            bm, bh = (cta % m_tiles, cta // m_tiles) if fold else cta
            T.annotate_min_blocks_per_sm(min_blocks)
            T.assume(XW % (tile_h // (4 if quant_in else 2)) == 0)
            if not gather:
                T.assume(P % TILE_T == 0)
            else:
                T.assume(P % 16 == 0)
            xw = T.alloc_local((R * words,), "uint32")
            xs = T.alloc_local((R,), "float32")
            src = T.alloc_local((R,), "int32")
            amax = T.alloc_local((8,), "float32")
            inv = T.alloc_local((8,), "float32")
            o = T.alloc_local((4,), "uint32")
            w = T.alloc_local((16,), "uint32")
            a = T.alloc_local((1,), "float32")
            packed = T.alloc_local((1,), "uint32")
            part = T.alloc_shared((rows, tile_h), "float32")
            sf_inv = T.alloc_shared((blocks, tile_h), "float32")
            t = T.get_thread_binding(0)
            tc = t % groups
            tr = t // groups
            row0 = bm * TILE_T + tr * R
            col = bh * tile_h + tc * 8  # first channel of this thread
            valid = row0 < P

            # 1. Load R rows x 8 channels (gathered rows; rows past P, and positions outside [0, Tn),
            # read as zeros, as the reference's gather).
            if gather:
                for r in T.vectorized(R):
                    src[r] = T.if_then_else(valid, pos[row0 + r], -1)
                for r in T.unroll(R):
                    src[r] = T.if_then_else(src[r] < Tn, src[r], -1)
            else:
                for r in T.unroll(R):
                    src[r] = row0 + r
            for r in T.unroll(R):
                for v in T.vectorized(words):
                    xw[r * words + v] = 0
                if src[r] >= 0:
                    for v in T.vectorized(words):
                        xw[r * words + v] = x[src[r], col // (8 // words) + v]
                if quant_in:
                    xs[r] = 0.0
                    if src[r] >= 0:
                        g = col // npc
                        if sf_in == "row":
                            xs[r] = x_sf[src[r], g]
                        elif sf_in == "col":
                            xs[r] = x_sf[g, src[r]]
                        else:
                            xs[r] = T.call_extern("float32", "tilek_ue8m0", x_sf[g // 4, src[r], g % 4])

            # 2. Column maxima of this thread's rows, then of each npt block.
            for c in T.unroll(8):
                amax[c] = 0.0
            for r in T.unroll(R):
                for c in _static(8):  # unrolled while building: value() branches on c
                    amax[c] = T.max(amax[c], T.abs(value(xw, xs, r, c)))
            for c in T.vectorized(8):
                part[tr, tc * 8 + c] = amax[c]
            T.sync_threads()
            if t < tile_h:
                h = bh * tile_h + t
                packed[0] = 0
                for b in T.unroll(blocks):
                    a[0] = T.float32(F.E4M3.amax_floor)
                    for k in T.unroll(per_block):
                        a[0] = T.max(a[0], part[b * per_block + k, t])
                    s = T.call_extern("float32", "__fdiv_rn", a[0], T.float32(F.E4M3.max_value))
                    gb = bm * blocks + b  # global block index
                    if round_sf:
                        bits = T.call_extern("uint32", "__float_as_uint", s)
                        e = T.shift_right(bits - T.uint32(1), T.uint32(23)) + T.uint32(1)  # biased exponent
                        s = T.call_extern("float32", "__uint_as_float", T.shift_left(e, T.uint32(23)))
                        sf_inv[b, t] = T.call_extern("float32", "__uint_as_float", T.shift_left(T.uint32(254) - e, T.uint32(23)))
                        if packed_sf:
                            if npt == 32:
                                packed[0] = packed[0] | T.shift_left(e, T.uint32(8 * b))
                            else:
                                sf[gb // 4, h, gb % 4] = T.Cast("uint8", e)
                                if gb == T.ceildiv(P, npt) - 1:  # the last word's unused bytes are zero
                                    for j in T.unroll(1, 4):
                                        if j > gb % 4:
                                            sf[gb // 4, h, j] = T.uint8(0)
                    else:
                        sf_inv[b, t] = T.call_extern("float32", "__fdiv_rn", T.float32(F.E4M3.max_value), a[0])
                    if not packed_sf:
                        if gb < T.ceildiv(P, npt):
                            sf[gb, h] = s
                if packed_sf and npt == 32:
                    sf[bm, h] = packed[0]
            T.sync_threads()

            # 3. Scale, pack to e4m3, store.
            blk = tr * R // npt
            for c in T.vectorized(8):
                inv[c] = sf_inv[blk, tc * 8 + c]

            if not transpose:
                if valid:
                    for r in T.unroll(R):
                        T.evaluate(T.call_extern(
                            "handle", "tilek_store8", T.address_of(out[row0 + r, col // 4]), quad(xw, xs, inv, r, 0), quad(xw, xs, inv, r, 1)
                        ))  # fmt: skip
            else:
                tile = T.alloc_shared((TILE_T, tile_w), "uint32")
                for r in T.unroll(R):
                    m = tr * R + r
                    chunk = (tc // 2) ^ (m // 16 % chunks)
                    tile[m, chunk * 4 + (tc % 2) * 2] = quad(xw, xs, inv, r, 0)
                    tile[m, chunk * 4 + (tc % 2) * 2 + 1] = quad(xw, xs, inv, r, 1)
                T.sync_threads()
                warp = t // 32
                cm = t % 32 % 8  # 16-token chunk of the tile
                nw = warp * 4 + t % 32 // 8  # word column of the tile
                if warp < store_warps:
                    for v in T.unroll(16):
                        m = cm * 16 + v
                        w[v] = tile[m, ((nw // 4) ^ (m // 16 % chunks)) * 4 + nw % 4]
                    for j in T.unroll(4):
                        select = T.uint32(j | ((j + 4) << 4))
                        for q in T.unroll(4):
                            lo = T.call_extern("uint32", "__byte_perm", w[4 * q], w[4 * q + 1], select)
                            hi = T.call_extern("uint32", "__byte_perm", w[4 * q + 2], w[4 * q + 3], select)
                            o[q] = T.call_extern("uint32", "__byte_perm", lo, hi, T.uint32(0x5410))
                        channel = (bh * tile_w + nw) * 4 + j
                        T.evaluate(T.call_extern(
                            "handle", "tilek_store16", T.address_of(out[channel, bm * (TILE_T // 4) + cm * 4]),
                            o[0], o[1], o[2], o[3],
                        ))  # fmt: skip

    if sf_in is None and not gather:

        @T.prim_func
        def per_channel_cast(
            x: T.Tensor(x_shape, "uint32"), out: T.Tensor(out_shape, "uint32"), sf: T.Tensor(sf_shape, sf_dtype)
        ):
            body(x, None, None, out, sf)

    elif sf_in is None:

        @T.prim_func
        def per_channel_cast(
            x: T.Tensor(x_shape, "uint32"), pos: T.Tensor((P,), "int32"),
            out: T.Tensor(out_shape, "uint32"), sf: T.Tensor(sf_shape, sf_dtype),
        ):  # fmt: skip
            body(x, None, pos, out, sf)

    elif not gather:

        @T.prim_func
        def per_channel_cast(
            x: T.Tensor(x_shape, "uint32"), x_sf: T.Tensor(sf_in_shape, sf_in_dtype),
            out: T.Tensor(out_shape, "uint32"), sf: T.Tensor(sf_shape, sf_dtype),
        ):  # fmt: skip
            body(x, x_sf, None, out, sf)

    else:

        @T.prim_func
        def per_channel_cast(
            x: T.Tensor(x_shape, "uint32"), x_sf: T.Tensor(sf_in_shape, sf_in_dtype), pos: T.Tensor((P,), "int32"),
            out: T.Tensor(out_shape, "uint32"), sf: T.Tensor(sf_shape, sf_dtype),
        ):  # fmt: skip
            body(x, x_sf, pos, out, sf)

    return per_channel_cast


# ---------------------------------------------------------------------------------------------
# The op: reference, rules, launch. Operands ``x`` (or a QuantTensor's data), its per-token scales
# ``x_sf``, the gathered rows ``pos``; results ``(out, sf)``. Not row-wise: a scale spans npt tokens.


def _reference(x, x_sf, pos, *, num_per_tokens, round_sf, x_sf_layout, num_per_channels, use_packed_ue8m0, transpose):
    t, h = x.shape
    if x_sf is not None:  # the kernel's cast-back: fp32 product of the e4m3 value and its per-token scale
        x = F.dequantize_blocks(x, F.load_sf(x_sf, x_sf_layout, (t, h // num_per_channels)), "e4m3", (1, num_per_channels))
    if pos is not None:  # row p = x[pos[p]], zeros for positions outside [0, T)
        padded = jnp.concatenate([x, jnp.zeros((1, h), x.dtype)])
        x = padded[jnp.where((pos >= 0) & (pos < t), pos, t)]
    data, sf = F.quantize_blocks(x, "e4m3", (num_per_tokens, 1), round_sf=round_sf)
    sf = F.store_sf(sf, "ue8m0_along_m" if use_packed_ue8m0 else "row")
    return (data.T if transpose else data), sf


def tiling(h: int, *, quant_in: bool = False, transpose: bool = False) -> tuple[int, int]:
    """``(tile_h, min_blocks)``: the widest tile that divides H (64 for the transposed cast, whose
    smaller tiles ran faster on an H200), and CTAs per SM the registers are budgeted for."""
    if transpose:
        return 64, 2  # 55 registers: 4 CTAs per SM fit anyway
    tile_h = 256 if h % 256 == 0 else 128 if h % 128 == 0 else 64
    return tile_h, 3 if quant_in else 2  # bf16: 64 data registers a thread, which 3 CTAs per SM would spill


def _grid(p: int, h: int, tile_h: int) -> tuple[int, bool]:
    """(CTAs, whether they form one flat grid): (token tiles, channel tiles) while the channel tiles
    fit grid y, else one flat grid."""
    m_tiles, h_tiles = F.ceil_div(p, TILE_T), h // tile_h
    return m_tiles * h_tiles, h_tiles > GRID_LIMITS[1]


def _wide(t: int, p: int, h: int, tile_h: int) -> bool:
    """Whether the kernel needs 64-bit extents: an index (of input or output elements, rows padded to
    whole tiles, with a margin of 4) could reach 2^31."""
    rows = (F.ceil_div(max(t, p), TILE_T) + 1) * TILE_T
    return rows * (h + tile_h) * 4 >= 2**31


@dataclasses.dataclass(frozen=True)
class PerChannelCastConfig:
    """The kernel's tiling: ``tile_h`` channels (64, 128 or 256, dividing H) per CTA of 128 tokens,
    registers budgeted for ``min_blocks`` CTAs per SM, and ``fold`` (None: only beyond grid y's 65,535
    channel tiles) one flat grid instead of (token tiles, channel tiles)."""

    tile_h: int
    min_blocks: int
    fold: bool | None = None


@config_class(PerChannelCastConfig)
def _config(x, x_sf, pos, *, transpose, **_) -> PerChannelCastConfig:
    """:func:`tiling`: the widest tile that divides H (64 transposed)."""
    return PerChannelCastConfig(*tiling(x.shape[1], quant_in=x_sf is not None, transpose=transpose))


def _launch(x, x_sf, pos, *, config: PerChannelCastConfig, num_per_tokens, round_sf, x_sf_layout, num_per_channels,
            use_packed_ue8m0, transpose) -> Launch:  # fmt: skip
    t, h = x.shape
    p = t if pos is None else pos.shape[0]
    fold = _grid(p, h, config.tile_h)[1] if config.fold is None else config.fold
    m_b = F.ceil_div(p, num_per_tokens)
    views = {"x": View((t, h // (4 if x_sf is not None else 2)), dtype=np.uint32)}
    if x_sf_layout == "col_ue8m0":
        views["x_sf"] = View((*x_sf.shape, 4), dtype=np.uint8)
    # (explicit strides: the compact strides of an empty [H, 0] are not the kernel's [H, T/4] ones)
    views["out"] = View((h, t // 4), (t // 4, 1), dtype=np.uint32) if transpose else View((p, h // 4), dtype=np.uint32)
    if use_packed_ue8m0:
        words = F.ceil_div(m_b, 4)
        views["sf"] = View((words, h), dtype=np.uint32) if num_per_tokens == 32 else View((words, h, 4), dtype=np.uint8)
    params = dict(
        tile_h=config.tile_h, npt=num_per_tokens, round_sf=round_sf, sf_in=x_sf_layout, npc=num_per_channels if x_sf_layout else 128,
        packed_sf=use_packed_ue8m0, gather=pos is not None, transpose=transpose, min_blocks=config.min_blocks,
        **({"fold": True} if fold else {}), **({"wide": True} if _wide(t, p, h, config.tile_h) else {}),
    )  # fmt: skip
    return Launch(kernel=per_channel_cast_kernel, params=params, views=views)


# The three public functions check their arguments (and the kernel's limits) before binding this op.
_per_channel_cast_op = TileOp(
    name="per_channel_cast", launch=_launch, operands=("x", "x_sf?", "pos?"), results=("out", "sf"), reference=_reference,
    config=_config,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Rules.

NUM_PER_TOKENS = (32, 128)
NUM_PER_CHANNELS = (32, 128)
H_ALIGN = 64  # hidden must be a multiple of this (v1; v2.1 asks for 128)


def _check_common(name: str, data, fmt: str, num_per_tokens: int, t_rule: int | None, what: str = "x") -> tuple[int, int]:
    """Rules shared by the three ops; ``what`` names the data array in errors ("x" or "x's data")."""
    if not isinstance(fmt, str) or fmt != "e4m3":
        raise ValueError(f"{name}: fmt must be 'e4m3', got {fmt!r}")
    if checks.static_int(name, "num_per_tokens", num_per_tokens) not in NUM_PER_TOKENS:
        raise ValueError(f"{name}: num_per_tokens must be one of {NUM_PER_TOKENS}, got {num_per_tokens}")
    if data.ndim != 2:
        raise ValueError(f"{name}: {what} must be [num_tokens, hidden], got shape {data.shape}")
    t, h = data.shape
    if h == 0 or h % H_ALIGN:
        raise ValueError(f"{name}: hidden ({h}) must be a positive multiple of {H_ALIGN} ({what} has shape {data.shape})")
    if t_rule and t % t_rule:
        raise ValueError(f"{name}: num_tokens ({t}) must be a multiple of {t_rule} ({what} has shape {data.shape})")
    return t, h


def _split_input(name: str, x, plain_dtypes=(jnp.bfloat16,)):
    """``x`` or a QuantTensor ``(data, sf)`` -> (data, sf or None), with dtype checks."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name}: a QuantTensor x must be a pair (data, sf), got {len(x)} items")
        data, x_sf = checks.as_array(name, "x's data", x[0]), checks.as_array(name, "x's sf", x[1])
        if data.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"{name}: QuantTensor data must be float8_e4m3fn, got {data.dtype} for x's data")
        return data, x_sf
    x = checks.as_array(name, "x", x)
    if x.dtype not in plain_dtypes:
        raise ValueError(f"{name}: x must be bfloat16 or a QuantTensor (e4m3 data, sf), got {x.dtype}")
    return x, None


def _input_sf_layout(name: str, x_sf, t: int, h: int, npc: int, layouts, given: str | None) -> str:
    """Which layout the per-token input scales ``[T, H/npc]`` are stored in (from shape and dtype)."""
    groups = h // npc
    shapes = {
        "row": ((t, groups), jnp.float32),
        "col": ((groups, F.align(t, 4)), jnp.float32),
        "col_ue8m0": ((F.ceil_div(groups, 4), F.align(t, 4)), jnp.int32),
    }
    shapes = {k: v for k, v in shapes.items() if k in layouts}
    if given is not None and (not isinstance(given, str) or given not in shapes):
        raise ValueError(f"{name}: x_sf_layout must be one of {tuple(shapes)}, got {given!r}")
    for layout in [given] if given else shapes:
        shape, dtype = shapes[layout]
        if tuple(x_sf.shape) == shape and x_sf.dtype == dtype:
            return layout
    expected = ", ".join(f"{k}: {np.dtype(d).name} {s}" for k, (s, d) in shapes.items() if given in (None, k))
    raise ValueError(
        f"{name}: the QuantTensor's sf must be per-token scales with blocks of (1, {npc}) in a supported layout "
        f"({expected}), got {x_sf.dtype} {tuple(x_sf.shape)} for x's sf"
    )


def _kernel_limits(name: str, impl, operands: dict, p: int, h: int, transpose: bool = False, quant_in: bool = False) -> None:
    """The kernel path's limits, checked (unless ``impl="xla"``) before binding the shared op, so that
    the error names the public op: extents below 2^31 and a grid of fewer than 2^31 CTAs (default tiling)."""
    if impl == "xla":
        return
    _per_channel_cast_op.check_extents([(k, a.shape) for k, a in operands.items()], op=name)
    ctas, _ = _grid(p, h, tiling(h, quant_in=quant_in, transpose=transpose)[0])
    if ctas > GRID_LIMITS[0]:
        raise ValueError(f"{name}: [{p}, {h}] needs {ctas} tiles, more than the kernel's grid takes ({GRID_LIMITS[0]})")


# ---------------------------------------------------------------------------------------------
# Named calls: every configuration the GPU tests run (T, H (which picks the tile width), npt, round_sf,
# packed scales; QuantTensor inputs; gathers; the transposed cast), other tilings ("tuned_"), the
# flat grid forced ("_flat"), the benchmarks'. "small_" calls take the whole contract; "gpu_", "tuned_"
# and "bench_" ones are only traced and lowered off the GPU.

S = jax.ShapeDtypeStruct


def _valid(rng: np.random.Generator, x, *rest):
    """Random arguments with valid values: e4m3 codes without NaN and positive power-of-two per-token
    scales (fp32, or packed UE8M0 bytes) for a QuantTensor x; positions in [-1, T) for a gather."""
    if isinstance(x, tuple):
        data, sf = x
        codes = rng.integers(0, 256, size=data.shape, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x3C
        if sf.dtype == jnp.int32:
            scales = rng.integers(117, 138, size=(*sf.shape, 4), dtype=np.uint8).view(np.int32).reshape(sf.shape)
        else:
            scales = np.exp2(rng.integers(-10, 10, size=sf.shape)).astype(np.float32)
        x = (codes.view(jnp.float8_e4m3fn), scales)
    else:
        x = random_array(rng, x.shape, x.dtype)
    t = x[0].shape[0] if isinstance(x, tuple) else x.shape[0]
    return (x, *(rng.integers(-1, max(t, 1), size=r.shape).astype(np.int32) if isinstance(r, S) else r for r in rest))


def _x(t: int, h: int, npc: int | None = None, layout: str | None = None):
    """bf16 ``[T, H]``, or a QuantTensor of e4m3 data with per-token (1, npc) scales stored in ``layout``."""
    if layout is None:
        return S((t, h), jnp.bfloat16)
    return S((t, h), jnp.float8_e4m3fn), S(*F.sf_storage_shape(layout, (t, h // npc)))


def _name(prefix: str, t: int, h: int, npt: int, round_sf: bool, extra=(), config=None) -> str:
    tuned = [f"tile{config['tile_h']}_mb{config['min_blocks']}"] if config and "tile_h" in config else []
    flat = ["flat"] if config and config.get("fold") else []
    return "_".join([prefix, *extra, f"npt{npt}", *(["round"] if round_sf else []), *tuned, *flat, f"{t}x{h}"])


def _cast(prefix, t, h, npt=128, round_sf=False, packed=False, npc=None, layout=None, config=None) -> ArgSpec:
    kwargs = dict(num_per_tokens=npt, round_sf=round_sf, use_packed_ue8m0=packed)
    kwargs.update(dict(num_per_channels=npc, x_sf_layout=layout) if layout else {})
    extra = ([f"e4m3_1x{npc}_{layout}"] if layout else ["bf16"]) + (["ue8m0"] if packed else [])
    return ArgSpec(_name(prefix, t, h, npt, round_sf, extra, config), (_x(t, h, npc, layout),), kwargs, make=_valid if layout else None,
                   config=config or {}, bench=prefix != "small")  # fmt: skip


def _fused(prefix, t, h, t_out=None, quant=False, round_sf=False, config=None) -> ArgSpec:
    """A per_channel_cast_fused call: bf16 or cast-back (1 x 128 row-major scales) input, gathering
    ``t_out`` rows (None: no gather)."""
    pos = () if t_out is None else (S((t_out,), jnp.int32),)
    args = (_x(t, h, 128, "row") if quant else _x(t, h), "e4m3", 128, round_sf, None, *pos)
    extra = (["e4m3_1x128_row"] if quant else ["bf16"]) + ([f"gather{t_out}"] if pos else [])
    return ArgSpec(_name(prefix, t, h, 128, round_sf, extra, config), args, make=_valid, config=config or {}, bench=prefix != "small")


def _transpose(prefix, t, h, npt=128, round_sf=False, config=None) -> ArgSpec:
    return ArgSpec(_name(prefix, t, h, npt, round_sf, ["bf16"], config), (_x(t, h),), dict(num_per_tokens=npt, round_sf=round_sf),
                   config=config or {}, bench=prefix != "small")  # fmt: skip


ARG_SPECS = (
    # bf16: H picks the tile width (256 | H: 256; else 128 | H: 128; else 64); T = 0 and the smallest T = 128.
    _cast("gpu", 128, 7168),
    _cast("gpu", 4096, 4096, round_sf=True),
    _cast("small", 256, 1152, 32),
    _cast("small", 384, 576, 32, round_sf=True),
    _cast("gpu", 384, 7168, round_sf=True, packed=True),  # 3 blocks: the last packed word has an unused byte
    _cast("small", 256, 1152, 32, round_sf=True, packed=True),
    _cast("small", 0, 4096),
    # QuantTensor inputs: per-token scales in every layout.
    _cast("gpu", 256, 7168, npc=128, layout="row"),
    _cast("small", 384, 4096, 32, round_sf=True, npc=32, layout="col"),
    _cast("small", 512, 1152, 128, round_sf=True, packed=True, npc=32, layout="col_ue8m0"),
    # Other tilings; the flat grid forced.
    _cast("tuned", 256, 4096, config=dict(tile_h=128, min_blocks=3)),
    _cast("tuned", 256, 4096, npc=128, layout="row", config=dict(tile_h=256, min_blocks=2)),
    _cast("gpu", 256, 4096, config=dict(fold=True)),
    _cast("gpu", 256, 4096, npc=128, layout="row", config=dict(fold=True)),
    # The benchmarks' calls and tilings.
    _cast("bench", 4096, 7168),
    _cast("bench", 16384, 7168),
    _cast("bench", 65536, 4096, 32, round_sf=True, packed=True),
    _cast("bench", 16384, 7168, npc=128, layout="row"),
    *(_cast("bench", t, 7168, config=dict(tile_h=tile_h, min_blocks=blocks)) for t, tile_h, blocks in ((16384, 128, 3), (4096, 128, 2))),
    *(_cast("bench", 16384, 7168, npc=128, layout="row", config=dict(tile_h=tile_h, min_blocks=blocks)) for tile_h, blocks in ((256, 2), (128, 3), (128, 4))),
    _cast("bench", 16384, 7168, config=dict(fold=True)),
)  # fmt: skip

FUSED_SPECS = (
    _fused("gpu", 200, 7168, 272),
    _fused("small", 128, 4096, 48, quant=True, round_sf=True),
    _fused("gpu", 256, 2560, quant=True),
    _fused("small", 0, 576, 32),  # nothing to gather from: every position is -1
    _fused("small", 64, 576, 16),  # the smallest T_out
    _fused("gpu", 64, 576, 0),
    _fused("gpu", 200, 1152, 272),  # positions outside [0, T)
    _fused("gpu", 200, 1152, 272, quant=True, round_sf=True),
    _fused("gpu", 200, 576, 272, config=dict(fold=True)),
    _fused("bench", 8192, 7168, 16384),
)

TRANSPOSE_SPECS = (
    _transpose("small", 128, 7168, 32),
    _transpose("gpu", 4096, 576, round_sf=True),
    _transpose("gpu", 256, 4096),
    _transpose("small", 0, 7168, 32),
    _transpose("tuned", 384, 4096, config=dict(tile_h=128, min_blocks=3)),
    _transpose("gpu", 384, 4096, config=dict(fold=True)),
    _transpose("bench", 16384, 7168),
    _transpose("bench", 65536, 4096, 32, round_sf=True),
    *(_transpose("bench", 16384, 7168, config=dict(tile_h=128, min_blocks=blocks)) for blocks in (2, 3)),
)


# ---------------------------------------------------------------------------------------------
# Public functions.

@uses(_per_channel_cast_op, cases=ARG_SPECS)
def per_channel_cast(
    x,
    fmt: str = "e4m3",
    num_per_tokens: int = 128,
    round_sf: bool = False,
    num_per_channels: int | None = None,
    use_packed_ue8m0: bool = False,
    *,
    x_sf_layout: str | None = None,
    impl=None,
    ops,
) -> tuple[jax.Array, jax.Array]:
    """Casts ``x[T, H]`` to e4m3 with one scale per ``num_per_tokens`` tokens x 1 channel (v2.1).

    Args:
      x: bfloat16 ``[T, H]``, or a QuantTensor ``(data e4m3 [T, H], sf)`` with per-token scales of
        blocks ``(1, num_per_channels)``, decoded as ``fp32(data) · sf`` first. Its sf is fp32 row-major
        ``[T, H/npc]``, fp32 column-major storage ``[H/npc, align(T, 4)]`` or packed UE8M0 int32
        ``[ceil(H/npc/4), align(T, 4)]``, told apart by shape and dtype (``x_sf_layout`` =
        ``"row" | "col" | "col_ue8m0"`` settles a tie; row-major wins otherwise).
      num_per_tokens: 32 or 128. T % 128 == 0 (0 allowed); H % 64 == 0 (v2.1 needs 128, v1 64).
      num_per_channels: 32 or 128, QuantTensor input only.
      round_sf: power-of-two scales. use_packed_ue8m0 (needs round_sf): sf packed along M.

    Returns:
      ``(data float8_e4m3fn [T, H], sf)``: sf fp32 ``[T/npt, H]``, or with ``use_packed_ue8m0`` int32
      ``[ceil(T/npt/4), H]`` (``formats`` layout ``"ue8m0_along_m"``: word ``[i, h]`` holds blocks
      ``4i..4i+3`` of channel h, first in the low byte; unused bytes 0).
    """
    name = "per_channel_cast"
    check_impl(impl, name)
    data, x_sf = _split_input(name, x)
    t, h = _check_common(name, data, fmt, num_per_tokens, 128, "x" if x_sf is None else "x's data")
    num_per_tokens = int(num_per_tokens)
    round_sf, use_packed_ue8m0 = checks.static_bool(name, "round_sf", round_sf), checks.static_bool(name, "use_packed_ue8m0", use_packed_ue8m0)
    if use_packed_ue8m0 and not round_sf:
        raise ValueError(f"{name}: use_packed_ue8m0 needs round_sf=True (UE8M0 holds powers of two only)")
    if x_sf_layout is not None and (not isinstance(x_sf_layout, str) or x_sf_layout not in SF_INPUTS[1:]):
        raise ValueError(f"{name}: x_sf_layout must be one of {SF_INPUTS[1:]}, got {x_sf_layout!r}")
    sf_in = None
    if x_sf is None:
        if num_per_channels is not None:
            raise ValueError(f"{name}: num_per_channels is for a QuantTensor x only (a bfloat16 x has no input scales)")
        if x_sf_layout is not None:
            raise ValueError(f"{name}: x_sf_layout is for a QuantTensor x only (a bfloat16 x has no input scales)")
    else:
        if num_per_channels is None or checks.static_int(name, "num_per_channels", num_per_channels) not in NUM_PER_CHANNELS:
            raise ValueError(f"{name}: a QuantTensor x needs num_per_channels in {NUM_PER_CHANNELS}, got {num_per_channels}")
        num_per_channels = int(num_per_channels)
        if h % num_per_channels:
            raise ValueError(f"{name}: hidden ({h}) must be a multiple of num_per_channels={num_per_channels} (x's data has shape {data.shape})")
        sf_in = _input_sf_layout(name, x_sf, t, h, num_per_channels, ("row", "col", "col_ue8m0"), x_sf_layout)
    _kernel_limits(name, impl, {"x": data} if x_sf is None else {"x's data": data, "x's sf": x_sf}, t, h, quant_in=sf_in is not None)
    return ops[0](
        data, x_sf, impl=impl, num_per_tokens=num_per_tokens, round_sf=bool(round_sf), x_sf_layout=sf_in,
        num_per_channels=num_per_channels, use_packed_ue8m0=bool(use_packed_ue8m0), transpose=False,
    )  # fmt: skip


@uses(_per_channel_cast_op, cases=FUSED_SPECS)
def per_channel_cast_fused(
    x,
    fmt: str = "e4m3",
    num_per_tokens: int = 128,
    round_sf: bool = False,
    num_per_channels: int | None = None,
    pos_to_token: jax.Array | None = None,
    *,
    impl=None,
    ops,
) -> tuple[jax.Array, jax.Array]:
    """Per-channel cast with a fused cast-back input and row gather (v1).

    Args:
      x: bfloat16 ``[T, H]``, or a QuantTensor ``(data e4m3 [T, H], sf fp32 [T, H/128])`` (per-token
        scales, row-major; num_per_channels must be 128 or None), decoded as ``fp32(data) · sf``.
      pos_to_token: optional int32 ``[T_out]``: output row p is input row ``pos_to_token[p]``, or zeros
        where it is -1 (any position outside [0, T) gives a zero row). T_out % 16 == 0; without it
        T_out = T and T % 128 == 0. H % 64 == 0.
      num_per_tokens: 128 (v1), or 32.

    Returns:
      ``(data float8_e4m3fn [T_out, H], sf fp32 [ceil(T_out/npt), H])``; a partial last block's
      scale covers its rows only.
    """
    name = "per_channel_cast_fused"
    check_impl(impl, name)
    data, x_sf = _split_input(name, x)
    gather = pos_to_token is not None
    t, h = _check_common(name, data, fmt, num_per_tokens, None if gather else 128, "x" if x_sf is None else "x's data")
    num_per_tokens = int(num_per_tokens)
    round_sf = checks.static_bool(name, "round_sf", round_sf)
    sf_in = None
    operands = {"x": data} if x_sf is None else {"x's data": data, "x's sf": x_sf}
    if x_sf is not None:
        if num_per_channels is not None and checks.static_int(name, "num_per_channels", num_per_channels) != 128:
            raise ValueError(f"{name}: the fused cast-back needs num_per_channels=128, got {num_per_channels}")
        if h % 128:
            raise ValueError(f"{name}: the fused cast-back needs hidden ({h}) to be a multiple of 128 (x's data has shape {data.shape})")
        sf_in = _input_sf_layout(name, x_sf, t, h, 128, ("row",), None)
    elif num_per_channels is not None:
        raise ValueError(f"{name}: num_per_channels is for a QuantTensor x only (a bfloat16 x has no input scales)")
    if gather:
        pos_to_token = checks.as_array(name, "pos_to_token", pos_to_token)
        if pos_to_token.ndim != 1 or pos_to_token.dtype != jnp.int32:
            raise ValueError(f"{name}: pos_to_token must be int32 [T_out], got {pos_to_token.dtype} {pos_to_token.shape}")
        if pos_to_token.shape[0] % 16:
            raise ValueError(f"{name}: pos_to_token's length ({pos_to_token.shape[0]}) must be a multiple of 16")
        operands["pos_to_token"] = pos_to_token
    _kernel_limits(name, impl, operands, pos_to_token.shape[0] if gather else t, h, quant_in=sf_in is not None)
    return ops[0](
        data, x_sf, pos_to_token, impl=impl, num_per_tokens=num_per_tokens, round_sf=bool(round_sf), x_sf_layout=sf_in,
        num_per_channels=128 if sf_in else None, use_packed_ue8m0=False, transpose=False,
    )  # fmt: skip


@uses(_per_channel_cast_op, cases=TRANSPOSE_SPECS)
def per_channel_cast_and_transpose(
    x: jax.Array, fmt: str = "e4m3", num_per_tokens: int = 128, round_sf: bool = False, *, impl=None, ops
) -> tuple[jax.Array, jax.Array]:
    """Per-channel cast with the data transposed (v1).

    Args:
      x: bfloat16 ``[T, H]``, T % 128 == 0 (0 allowed), H % 64 == 0.
      num_per_tokens: 32 or 128.

    Returns:
      ``(data float8_e4m3fn [H, T], sf fp32 [T/npt, H])``: exactly the transpose of
      :func:`per_channel_cast`'s data, and the same sf.
    """
    name = "per_channel_cast_and_transpose"
    check_impl(impl, name)
    data, x_sf = _split_input(name, x)
    if x_sf is not None:
        raise ValueError(f"{name}: x must be bfloat16 (no QuantTensor input)")
    t, h = _check_common(name, data, fmt, num_per_tokens, 128)
    num_per_tokens = int(num_per_tokens)
    round_sf = checks.static_bool(name, "round_sf", round_sf)
    _kernel_limits(name, impl, {"x": data}, t, h, transpose=True)
    return ops[0](
        data, impl=impl, num_per_tokens=num_per_tokens, round_sf=bool(round_sf), x_sf_layout=None, num_per_channels=None,
        use_packed_ue8m0=False, transpose=True,
    )  # fmt: skip
