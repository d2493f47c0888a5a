"""SwiGLU fused with FP8 (e4m3) quantization (TileKernels v1 §2.10, v2.1 §2.3).

- :func:`swiglu_forward_and_per_token_cast`: SwiGLU forward, then a per-token ``(1, npc)`` cast.
- :func:`swiglu_backward_and_per_token_cast`: the backward from an e4m3 input with per-token scales:
  the bf16 gradient, its per-token cast, the weight gradient and optionally the recomputed output.
- :func:`swiglu_forward_and_per_channel_cast_and_transpose` (v1): SwiGLU forward rounded to bf16,
  then a per-channel ``(npt, 1)`` cast, optionally transposed.

The math, the psum layout and the exactness rules are those of :mod:`jax_tilek.quant.swiglu`; the
scale-factor rules and layouts those of :mod:`jax_tilek.quant.formats`. Casts are bit-exact with the
references (padding rows of the psum layout get zero data and zero scales).

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""


import importlib
from typing import Optional

import jax
import jax.numpy as jnp

from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp
from jax_tilek.quant import formats as F
# The swiglu module (the package's attribute `swiglu` is the public function of that name).
_SWIGLU_MODULE = importlib.import_module("jax_tilek.quant.swiglu")
from jax_tilek.quant.swiglu import (  # noqa: E402
    MAX_HIDDEN,
    MAX_ROWS,
    PASS_CONFIGS,
    PRELUDE,
    TOKEN_ALIGNMENT,
    as_array,
    check_fmt,
    check_impl,
    forward_act,
    macros,
    operands,
    pack_operands,
    scalar,
    static_bool,
    static_int,
    static_number,
    swiglu_backward_op,
    swiglu_forward_op,
    words,
)


def swiglu_forward_and_per_token_cast(
    x: jax.Array,
    fmt: str = "e4m3",
    num_per_channels: int = 128,
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    topk_weights: Optional[jax.Array] = None,
    routed_scaling_factor: Optional[float] = None,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    clamp_value: Optional[float] = None,
    with_clamped_count: bool = False,
    token_alignment: int = TOKEN_ALIGNMENT,
    *,
    impl=None,
):
    """SwiGLU forward (as :func:`jax_tilek.quant.swiglu.swiglu_forward`) cast to e4m3 per token.

    Args:
      x: ``[T, 2H]`` bf16 or fp32, H a multiple of 64.
      fmt: ``"e4m3"``.
      num_per_channels: the scale block ``(1, npc)``: 32 or 128, or H (whole-row scales, v1;
        row-major scales only).
      psum_num_tokens_per_expert, topk_weights, routed_scaling_factor, clamp_value,
        with_clamped_count, token_alignment: as in ``swiglu_forward``; the weights multiply the
        activation before it is quantized.
      use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0: the scale layout and rounding
        (``formats.sf_layout``); column-major layouts are returned as their storage arrays.

    Returns:
      ``(data float8_e4m3fn [T, H], sf)`` (plus int32 ``[4]`` clamp counts if asked). Padding rows
      of the psum layout get zero data and zero scales (TileKernels leaves them unwritten).
    """
    op = "swiglu_forward_and_per_token_cast"
    check_impl(op, impl)
    check_fmt(op, fmt, ("e4m3",))
    x, psum, weights = operands(op, x, psum_num_tokens_per_expert, topk_weights)
    layout, round_sf = scale_layout(op, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    extra, names = pack_operands(("psum", psum), ("weights", weights))
    return swiglu_forward_op(
        x, *extra, impl=impl, names=names, fmt=fmt, npc=static_int(op, "num_per_channels", num_per_channels), layout=layout,
        round_sf=round_sf, rsf=static_number(op, "routed_scaling_factor", routed_scaling_factor),
        clamp=static_number(op, "clamp_value", clamp_value, positive=True), count=static_bool(op, "with_clamped_count", with_clamped_count),
        alignment=static_int(op, "token_alignment", token_alignment),
    )  # fmt: skip


def scale_layout(op: str, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf) -> tuple[str, bool]:
    """The scale layout the flags name (``formats.sf_layout``), and round_sf, with errors naming ``op``."""
    flags = [static_bool(op, n, v) for n, v in (
        ("use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf), ("use_packed_ue8m0", use_packed_ue8m0), ("round_sf", round_sf),
    )]  # fmt: skip
    try:
        return F.sf_layout(*flags), flags[2]
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(op) else f"{op}: {message}") from None


def swiglu_backward_and_per_token_cast(
    x: tuple[jax.Array, jax.Array],
    act_x_grad: jax.Array,
    fmt: str = "e4m3",
    num_per_channels: int = 128,
    psum_num_tokens_per_expert: Optional[jax.Array] = None,
    topk_weights: Optional[jax.Array] = None,
    routed_scaling_factor: Optional[float] = None,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    clamp_value: Optional[float] = None,
    do_recompute: bool = False,
    token_alignment: int = TOKEN_ALIGNMENT,
    x_sf_layout: Optional[str] = None,
    *,
    impl=None,
):
    """SwiGLU backward from an e4m3 input, with the gradient cast to e4m3 per token (v2.1 form).

    Args:
      x: ``(x_fp8 float8_e4m3fn [T, 2H], x_sf)``, per-token ``(1, npc)`` scales over the 2H columns
        in ``x_sf_layout`` ("row", "col" or "col_ue8m0" storage; default: the output's layout).
        The input is ``x_fp8 · sf`` in fp32.
      act_x_grad: ``[T, H]`` bf16 or fp32, the gradient of the forward's output.
      fmt: ``"e4m3"``. num_per_channels: 32 or 128, for the input's and the output's scales.
      psum_num_tokens_per_expert, topk_weights, routed_scaling_factor, clamp_value,
        token_alignment: as in ``swiglu_backward``.
      use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0: the output scales' layout/rounding.
      do_recompute: also return the forward's (weighted) output in bf16.

    Returns:
      ``(x_grad bf16 [T, 2H], (x_grad_fp8 [T, 2H], sf), weight_grad fp32 [T] if topk_weights,
      act_out bf16 [T, H] if do_recompute)``. The cast quantizes the fp32 gradient (not its bf16
      rounding), in ``(1, npc)`` blocks of the 2H columns. Zeros (and zero scales) on padding rows.
    """
    op = "swiglu_backward_and_per_token_cast"
    check_impl(op, impl)
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        raise TypeError(f"{op}: x must be a QuantTensor (data, sf), a pair of arrays, got {type(x).__name__}")
    x_fp8, psum, weights = operands(op, x[0], psum_num_tokens_per_expert, topk_weights)
    x_sf = as_array(op, "x's scale factors (x[1])", x[1])
    layout, round_sf = scale_layout(op, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    x_layout = layout if x_sf_layout is None else x_sf_layout
    if not (isinstance(x_layout, str) and x_layout in ("row", "col", "col_ue8m0")):
        raise ValueError(f"{op}: x_sf_layout must be 'row', 'col' or 'col_ue8m0', got {x_sf_layout!r:.60}")
    check_fmt(op, fmt, ("e4m3",))
    extra, names = pack_operands(("x_sf", x_sf), ("psum", psum), ("weights", weights))
    return swiglu_backward_op(
        x_fp8, as_array(op, "act_x_grad", act_x_grad), *extra, impl=impl, names=names, grad_fmt="bf16",
        npc=static_int(op, "num_per_channels", num_per_channels), x_layout=x_layout, cast=True, layout=layout, round_sf=round_sf,
        rsf=static_number(op, "routed_scaling_factor", routed_scaling_factor), clamp=static_number(op, "clamp_value", clamp_value, positive=True),
        recompute=static_bool(op, "do_recompute", do_recompute), act_fmt="bf16", alignment=static_int(op, "token_alignment", token_alignment),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Per-channel cast (v1): SwiGLU -> bf16 -> (npt, 1) blocks, optionally transposed.

TILE_M, TILE_N = 128, 64  # tokens x channels per tile
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: CTAs loop over the token tiles beyond it
PC_THREADS = 256


@kernel(pass_configs=PASS_CONFIGS, depends=(_SWIGLU_MODULE,))
def swiglu_per_channel_cast_kernel(hidden: int, npt: int, round_sf: bool, transpose: bool, clamp: bool, loop: bool):
    """One 128-token x 64-channel tile per CTA, in three steps:

    1. each thread reads 16-byte chunks of l and r (8 channels), computes the activation, rounds it
       to bf16 and stores it in a shared tile whose 16-byte chunks are XOR-swizzled by the row's
       group of 16 (conflict-free for the row-wise writes here and the column-wise reads below);
    2. each lane takes one channel and 2 x 16 tokens (a warp: 8 channels x 4 token chunks per
       pass), finds the block maxima with shuffles and computes the scales;
    3. transposed: each lane scales and stores its 16 tokens of one channel as one 16-byte row
       segment of ``out[H, T]``; otherwise the inverse scales go through shared memory and rows of
       8 channels are stored as 8 bytes of ``out[T, H]``.

    ``loop`` (a static choice of the launch, only for more than ``MAX_GRID_Y`` token tiles): grid.y
    is ``MAX_GRID_Y`` and each CTA loops over the token tiles ``by, by + MAX_GRID_Y, ...``. Without
    it the grid has one CTA row per token tile and the code has no loop (the faster hot path).
    """
    import tilelang.language as T

    M = macros()
    chunks = TILE_N // 8  # 16-byte chunks (8 bf16) per tile row
    blocks = TILE_M // npt  # scale blocks per tile column
    rows = T.dynamic("T")

    @T.macro
    def swz(m, j):
        return m * chunks + (j ^ ((m // 16) % chunks))

    @T.macro
    def one_tile(x, out, sf, clamp_value, bn, bm, tid, tile, inv, lf, rf, d, vals, sc, amax):
        """Token tile ``bm``, channel tile ``bn``."""
        t0 = bm * TILE_M
        # 1. activations -> bf16 -> shared
        for i in T.unroll(TILE_M * chunks // PC_THREADS):
            c = i * PC_THREADS + tid
            m = c // chunks
            j = c % chunks
            col = bn * (TILE_N // 2) + j * 4  # word of l in x's row
            M["load_unit"](x, t0 + m, col, lf, 8, "bf16")
            M["load_unit"](x, t0 + m, hidden // 2 + col, rf, 8, "bf16")
            for v in T.unroll(8):
                if clamp:
                    lf[v] = T.min(lf[v], clamp_value)
                    rf[v] = T.min(T.max(rf[v], clamp_value * T.float32(-1.0)), clamp_value)
                lf[v] = M["silu"](lf[v], d) * rf[v]
            for q in T.unroll(4):
                tile[swz(m, j), q] = T.call_extern("uint32", "tilek_bf16x2", lf[2 * q], lf[2 * q + 1])
        T.sync_threads()
        # 2. one channel, 2 x 16 tokens per lane; block maxima and scales
        warp = tid // 32
        lane = tid % 32
        h = warp * 8 + lane % 8  # channel within the tile
        kk = lane // 8
        for p in T.unroll(2):
            for i in T.unroll(16):
                m = (p * 4 + kk) * 16 + i
                word = tile[swz(m, h // 8), (h % 8) // 2]
                vals[p, i] = T.reinterpret(T.if_then_else(h % 2 == 0, T.shift_left(word, T.uint32(16)), T.bitwise_and(word, T.uint32(0xFFFF0000))), "float32")
            amax[p] = T.float32(0.0)
            for i in T.unroll(16):
                amax[p] = T.max(amax[p], T.abs(vals[p, i]))
            amax[p] = T.max(amax[p], T.shfl_xor(amax[p], 8))  # chunks 2b, 2b+1: a 32-token block
        if npt == 128:
            amax[0] = T.max(amax[0], amax[1])
            amax[0] = T.max(amax[0], T.shfl_xor(amax[0], 16))
            amax[1] = amax[0]
        for p in T.unroll(2):
            M["e4m3_scales"](amax[p], sc, round_sf)
            block = (p * 4 + kk) * 16 // npt  # scale block within the tile
            if kk % (npt // 16 if npt == 32 else 4) == 0:
                if npt == 32 or p == 0:
                    sf[bm * blocks + block, bn * TILE_N + h] = sc[0]
                    if not transpose:
                        inv[block, h] = sc[1]
            if transpose:
                for i in T.unroll(16):
                    vals[p, i] = vals[p, i] * sc[1]
                T.evaluate(T.call_extern("handle", "tilek_st16", T.address_of(out[bn * TILE_N + h, (t0 + (p * 4 + kk) * 16) // 4]), *[
                    T.call_extern("uint32", "tilek_e4m3x4", *[vals[p, 4 * q + v] for v in range(4)]) for q in range(4)]))  # fmt: skip
        # 3. (not transposed) rows of 8 channels
        if not transpose:
            T.sync_threads()
            for i in T.unroll(TILE_M * chunks // PC_THREADS):
                c = i * PC_THREADS + tid
                m = c // chunks
                j = c % chunks
                for q in T.unroll(4):
                    word = tile[swz(m, j), q]
                    lf[2 * q] = T.reinterpret(T.shift_left(word, T.uint32(16)), "float32") * inv[m // npt, j * 8 + 2 * q]
                    lf[2 * q + 1] = T.reinterpret(T.bitwise_and(word, T.uint32(0xFFFF0000)), "float32") * inv[m // npt, j * 8 + 2 * q + 1]
                M["store_values"](out, t0 + m, (bn * TILE_N + j * 8) // 4, lf, 8, "e4m3")

    @T.prim_func
    def swiglu_per_channel_cast(
        x: T.Tensor((rows, hidden), "uint32"),
        out: T.Tensor((hidden, rows // 4) if transpose else (rows, hidden // 4), "uint32"),
        sf: T.Tensor((rows // npt, hidden), "float32"),
        clamp_value: T.float32,
    ):
        # (loop: the grid's height and the loop's stride stay symbolic, min(tiles, MAX_GRID_Y): a
        # literal 65535 would be folded into int32 offset constants that overflow)
        tiles = T.ceildiv(rows, TILE_M)
        with T.Kernel(hidden // TILE_N, T.min(tiles, MAX_GRID_Y) if loop else tiles, threads=PC_THREADS, prelude=PRELUDE) as (bn, by):
            T.assume(rows % TILE_M == 0)
            tile = T.alloc_shared((TILE_M * chunks, 4), "uint32")
            inv = T.alloc_shared((blocks, TILE_N), "float32")
            tid = T.get_thread_binding(0)
            lf = T.alloc_local((8,), "float32")
            rf = T.alloc_local((8,), "float32")
            d = T.alloc_local((3,), "float32")
            vals = T.alloc_local((2, 16), "float32")
            sc = T.alloc_local((2,), "float32")
            amax = T.alloc_local((2,), "float32")
            if loop:
                for it in T.serial(T.ceildiv(tiles - by, T.min(tiles, MAX_GRID_Y))):
                    T.sync_threads()  # the previous tile's reads of shared memory are done
                    one_tile(x, out, sf, clamp_value, bn, by + it * T.min(tiles, MAX_GRID_Y), tid, tile, inv, lf, rf, d, vals, sc, amax)
            else:
                one_tile(x, out, sf, clamp_value, bn, by, tid, tile, inv, lf, rf, d, vals, sc, amax)

    return swiglu_per_channel_cast


def _pc_check(x, *, npt, round_sf=False, transpose=True, clamp=None):
    name = "swiglu_forward_and_per_channel_cast_and_transpose"
    if x.ndim != 2 or x.shape[1] % (2 * TILE_N) or x.shape[1] == 0:
        raise ValueError(f"{name}: x must be [T, 2H] with 2H a multiple of {2 * TILE_N} (and not 0), got shape {x.shape}")
    if x.shape[1] // 2 > MAX_HIDDEN:
        raise ValueError(f"{name}: H (half of x's last dimension, {x.shape[1] // 2}) must be at most {MAX_HIDDEN}")
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"{name}: x must be bfloat16, got {x.dtype}")
    if x.shape[0] % TILE_M:
        raise ValueError(f"{name}: T ({x.shape[0]}) must be a multiple of {TILE_M}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name}: x may have at most {MAX_ROWS} rows (T; the kernel indexes rows with int32), got {x.shape[0]}")
    if static_int(name, "num_per_tokens", npt) not in (32, 128):
        raise ValueError(f"{name}: num_per_tokens must be 32 or 128, got {npt}")
    static_number(name, "swiglu_clamp_value", clamp, positive=True)


def _pc_reference(x, *, npt, round_sf=False, transpose=True, clamp=None):
    act, _ = forward_act(x, clamp_value=clamp)
    act = act.astype(jnp.bfloat16).astype(jnp.float32)
    data, sf = F.quantize_blocks(act, "e4m3", (npt, 1), round_sf=round_sf)
    return (data.T if transpose else data), sf


def _pc_launch(x, *, npt, round_sf=False, transpose=True, clamp=None):
    t, h = x.shape[0], x.shape[1] // 2
    return Launch(
        kernel=swiglu_per_channel_cast_kernel,
        params=dict(hidden=h, npt=npt, round_sf=bool(round_sf), transpose=bool(transpose), clamp=clamp is not None, loop=-(-t // TILE_M) > MAX_GRID_Y),
        scalars=dict(clamp_value=scalar(clamp)),
        views={"x": words(x.shape, x.dtype), "out": words((h, t) if transpose else (t, h), jnp.float8_e4m3fn)},
    )


swiglu_per_channel_cast_op = TileOp(name="swiglu_forward_and_per_channel_cast_and_transpose", launch=_pc_launch, reference=_pc_reference, check=_pc_check)


def swiglu_forward_and_per_channel_cast_and_transpose(
    x: jax.Array,
    fmt: str = "e4m3",
    num_per_tokens: int = 128,
    round_sf: bool = False,
    without_transpose: bool = False,
    swiglu_clamp_value: Optional[float] = None,
    *,
    impl=None,
):
    """SwiGLU forward, rounded to bf16, cast to e4m3 per channel in ``(npt, 1)`` blocks (v1).

    Args:
      x: bf16 ``[T, 2H]``, T a multiple of 128, H a multiple of 64.
      fmt: ``"e4m3"``. num_per_tokens: 32 or 128.
      round_sf: power-of-two scales. without_transpose: return ``[T, H]`` instead of ``[H, T]``.
      swiglu_clamp_value: the SwiGLU clamp (a runtime kernel scalar here; TileKernels compiles it in).

    Returns:
      ``(out float8_e4m3fn [H, T] (or [T, H]), sf fp32 [T / npt, H])``, bit-exact with casting
      ``swiglu_forward(x).astype(bf16)`` in ``(npt, 1)`` blocks.
    """
    op = "swiglu_forward_and_per_channel_cast_and_transpose"
    check_impl(op, impl)
    check_fmt(op, fmt, ("e4m3",))
    return swiglu_per_channel_cast_op(
        as_array(op, "x", x), impl=impl, npt=static_int(op, "num_per_tokens", num_per_tokens), round_sf=static_bool(op, "round_sf", round_sf),
        transpose=not static_bool(op, "without_transpose", without_transpose), clamp=static_number(op, "swiglu_clamp_value", swiglu_clamp_value, positive=True),
    )  # fmt: skip
