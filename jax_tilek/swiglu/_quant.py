"""SwiGLU fused with FP8 (e4m3) quantization (TileKernels v1 §2.10, v2.1 §2.3).

- :func:`swiglu_forward_and_per_token_cast`: SwiGLU forward, then a per-token ``(1, npc)`` cast.
- :func:`swiglu_backward_and_per_token_cast`: the backward from an e4m3 input with per-token scales:
  the bf16 gradient, its per-token cast, the weight gradient and optionally the recomputed output.
- :func:`swiglu_forward_and_per_channel_cast_and_transpose` (v1): SwiGLU forward rounded to bf16,
  then a per-channel ``(npt, 1)`` cast, optionally transposed (its own kernel, here).

The per-token variants are the forward and backward ops of :mod:`jax_tilek.swiglu._ops`. The math, the
psum layout and the exactness rules are those of :mod:`jax_tilek.swiglu`; the scale-factor rules and
layouts those of :mod:`jax_tilek.quant.formats`. Casts are bit-exact with the references (padding rows
of the psum layout get zero data and zero scales).

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, check_impl, uses
from jax_tilek.quant import formats as F
from jax_tilek.swiglu._cases import WEIGHT_GRAD_TOLERANCE, case, psum_struct, rows_struct, weights_struct
from jax_tilek.swiglu._kernels import MAX_HIDDEN, MAX_ROWS, PASS_CONFIGS, PRELUDE, macros
from jax_tilek.swiglu._ops import arrays, backward_op, check_fmt, forward_op, routing, scalar, words
from jax_tilek.swiglu._reference import TOKEN_ALIGNMENT, forward_act

# The scale layouts as the public flags (use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0).
LAYOUT_FLAGS = {"row": (False, False, False), "row_round": (False, True, False), "col": (True, False, False), "col_ue8m0": (True, True, True)}


def _flags(layout: str) -> dict:
    col, round_sf, packed = LAYOUT_FLAGS[layout]
    return dict(use_tma_aligned_col_major_sf=col, round_sf=round_sf, use_packed_ue8m0=packed)


def _sf_layout(name: str, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf) -> tuple[str, bool]:
    """The scale layout the flags name (``formats.sf_layout``) and round_sf, checked (errors name the op)."""
    flags = [checks.static_bool(name, n, v) for n, v in (
        ("use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf), ("use_packed_ue8m0", use_packed_ue8m0), ("round_sf", round_sf),
    )]  # fmt: skip
    return F.sf_layout(*flags, op=name), flags[2]


# ---------------------------------------------------------------------------------------------
# Per-token casts: the forward and backward ops with fmt / scales.


def _forward_cast_case(name, t, h, npc, layout, psum=False, weights=False, experts=5, rsf=0.75, token_alignment=16, **options):
    routed = (psum_struct(experts) if psum else None, weights_struct(t) if weights else None)
    options.setdefault("routed_scaling_factor", rsf if weights else None)
    return case(f"{name}_{npc}_{layout}", (rows_struct(t, h), "e4m3", npc, *routed), token_alignment=token_alignment, **_flags(layout), **options)


H = "H"  # whole-row scales: num_per_channels = H
FORWARD_CAST_SPECS = tuple(
    _forward_cast_case(name, t, h, h if npc == H else npc, layout, **options)
    for name, t, h, npc, layout, options in (
        ("single_row", 1, 1024, 128, "row", {}),
        ("routed", 201, 2048, 128, "col_ue8m0", dict(psum=True, weights=True, clamp_value=10.0, with_clamped_count=True)),
        ("psum", 129, 2048, 32, "col", dict(psum=True, clamp_value=0.5, with_clamped_count=True)),
        ("weighted", 34, 7168, 32, "col_ue8m0", dict(weights=True)),
        ("routed", 35, 7168, 128, "row_round", dict(psum=True, weights=True, clamp_value=0.5, with_clamped_count=True)),
        ("clamped", 66, 1280, 128, "col_ue8m0", dict(clamp_value=10.0)),
        ("whole_rows_routed", 97, 1024, H, "row", dict(psum=True, weights=True)),
        ("whole_rows_clamped", 35, 576, H, "row_round", dict(clamp_value=0.5, with_clamped_count=True)),
        ("empty", 0, 2048, 32, "col_ue8m0", dict(with_clamped_count=True)),
        ("bench_fwd_cast", 4096, 4096, 128, "col_ue8m0", dict(token_alignment=TOKEN_ALIGNMENT, bench=True)),
        ("bench_fwd_cast", 32768, 2048, 128, "col_ue8m0", dict(token_alignment=TOKEN_ALIGNMENT, bench=True)),
        ("bench_fwd_cast_routed", 65536, 2048, 32, "row", dict(psum=True, weights=True, experts=8, rsf=2.5, clamp_value=10.0, with_clamped_count=True,
                                                     token_alignment=TOKEN_ALIGNMENT, bench=True)),
    )  # fmt: skip
)


@uses(forward_op, cases=FORWARD_CAST_SPECS)
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
    ops,
):
    """SwiGLU forward (as :func:`jax_tilek.swiglu.swiglu_forward`) cast to e4m3 per token.

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
    name = "swiglu_forward_and_per_token_cast"
    check_impl(impl, name)
    check_fmt(name, fmt, ("e4m3",))
    x, psum, weights = arrays(name, x, psum_num_tokens_per_expert, topk_weights)
    sf_layout, round_sf = _sf_layout(name, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    return ops[0](
        x, psum, weights, impl=impl, fmt=fmt, num_per_channels=checks.static_int(name, "num_per_channels", num_per_channels), sf_layout=sf_layout,
        round_sf=round_sf, with_clamped_count=checks.static_bool(name, "with_clamped_count", with_clamped_count),
        **routing(name, routed_scaling_factor, clamp_value, token_alignment),
    )  # fmt: skip


def _backward_cast_case(name, t, h, npc, layout, x_layout, psum=False, weights=False, experts=5, rsf=1.5, token_alignment=16, **options):
    x = (rows_struct(t, h, jnp.float8_e4m3fn), jax.ShapeDtypeStruct(*F.sf_storage_shape(x_layout, (t, 2 * h // npc))))
    routed = (psum_struct(experts) if psum else None, weights_struct(t) if weights else None)
    options.setdefault("routed_scaling_factor", rsf if weights else None)
    return case(f"{name}_{npc}_{layout}_from_{x_layout}", (x, jax.ShapeDtypeStruct((t, h), jnp.bfloat16), "e4m3", npc, *routed),
                x_scales=(npc, x_layout), x_sf_layout=x_layout, token_alignment=token_alignment, **_flags(layout),
                tolerance=WEIGHT_GRAD_TOLERANCE if weights else None, **options)  # fmt: skip


BACKWARD_CAST_SPECS = tuple(
    _backward_cast_case(name, t, h, npc, layout, x_layout, **options)
    for name, t, h, npc, layout, x_layout, options in (
        ("single_row", 1, 1024, 128, "row_round", "row", {}),
        ("routed", 152, 2048, 128, "col_ue8m0", "col_ue8m0", dict(psum=True, weights=True, clamp_value=10.0, do_recompute=True)),
        ("routed", 65, 2048, 32, "col", "row", dict(psum=True, weights=True, clamp_value=0.5)),
        ("weighted", 34, 7168, 32, "col_ue8m0", "col", dict(weights=True, do_recompute=True)),
        ("psum", 67, 1152, 128, "col_ue8m0", "row", dict(psum=True, clamp_value=0.5)),
        # TileKernels' operation order where 1 + l·(1 - s) cancels: the scales show it
        ("weighted", 65, 1024, 128, "row", "row", dict(weights=True)),
        ("weighted", 65, 1024, 32, "col", "row", dict(weights=True)),
        ("bench_bwd_cast_routed", 32768, 2048, 128, "col_ue8m0", "col_ue8m0", dict(psum=True, weights=True, experts=8, rsf=2.5, clamp_value=10.0,
                                                                          do_recompute=True, token_alignment=TOKEN_ALIGNMENT, bench=True)),
    )  # fmt: skip
)


@uses(backward_op, cases=BACKWARD_CAST_SPECS)
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
    ops,
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
    name = "swiglu_backward_and_per_token_cast"
    check_impl(impl, name)
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        raise TypeError(f"{name}: x must be a QuantTensor (data, sf), a pair of arrays, got {type(x).__name__}")
    x_fp8, psum, weights = arrays(name, x[0], psum_num_tokens_per_expert, topk_weights)
    x_sf = checks.as_array(name, "x's scale factors (x[1])", x[1])
    sf_layout, round_sf = _sf_layout(name, use_tma_aligned_col_major_sf, use_packed_ue8m0, round_sf)
    x_sf_layout = sf_layout if x_sf_layout is None else x_sf_layout
    if not (isinstance(x_sf_layout, str) and x_sf_layout in ("row", "col", "col_ue8m0")):
        raise ValueError(f"{name}: x_sf_layout must be 'row', 'col' or 'col_ue8m0', got {x_sf_layout!r:.60}")
    check_fmt(name, fmt, ("e4m3",))
    return ops[0](
        x_fp8, checks.as_array(name, "act_x_grad", act_x_grad), x_sf, psum, weights, impl=impl, fmt="bf16",
        num_per_channels=checks.static_int(name, "num_per_channels", num_per_channels), x_sf_layout=x_sf_layout, sf_layout=sf_layout,
        round_sf=round_sf, do_recompute=checks.static_bool(name, "do_recompute", do_recompute), with_weight_grad=weights is not None,
        **routing(name, routed_scaling_factor, clamp_value, token_alignment),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Per-channel cast (v1): SwiGLU -> bf16 -> (npt, 1) blocks, optionally transposed.

TILE_M, TILE_N = 128, 64  # tokens x channels per tile
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: CTAs loop over the token tiles beyond it
PC_THREADS = 256


@kernel(pass_configs=PASS_CONFIGS)
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
                T.evaluate(T.call_extern("handle", "tilek_store16", T.address_of(out[bn * TILE_N + h, (t0 + (p * 4 + kk) * 16) // 4]), *[
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


def _per_channel_check(x, *, num_per_tokens, **_):
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
    if checks.static_int(name, "num_per_tokens", num_per_tokens) not in (32, 128):
        raise ValueError(f"{name}: num_per_tokens must be 32 or 128, got {num_per_tokens}")


def _per_channel_reference(x, *, num_per_tokens, round_sf=False, transpose=True, clamp_value=None):
    act, _ = forward_act(x, clamp_value=clamp_value)
    act = act.astype(jnp.bfloat16).astype(jnp.float32)
    data, sf = F.quantize_blocks(act, "e4m3", (num_per_tokens, 1), round_sf=round_sf)
    return (data.T if transpose else data), sf


def _per_channel_launch(x, *, num_per_tokens, round_sf=False, transpose=True, clamp_value=None) -> Launch:
    t, h = x.shape[0], x.shape[1] // 2
    return Launch(
        kernel=swiglu_per_channel_cast_kernel,
        params=dict(hidden=h, npt=num_per_tokens, round_sf=bool(round_sf), transpose=bool(transpose), clamp=clamp_value is not None,
                    loop=-(-t // TILE_M) > MAX_GRID_Y),  # fmt: skip
        scalars=dict(clamp_value=scalar(clamp_value)),
        views={"x": words(x.shape, x.dtype), "out": words((h, t) if transpose else (t, h), jnp.float8_e4m3fn)},
    )


# Not row-wise: the scales are per channel, over blocks of tokens.
per_channel_cast_op = TileOp(
    name="swiglu_forward_and_per_channel_cast_and_transpose", launch=_per_channel_launch, operands=("x",), results=("out", "sf"),
    reference=_per_channel_reference, check=_per_channel_check,
)  # fmt: skip


def _per_channel_case(t, h, npt, transpose, round_sf, clamp_value, prefix="", bench=False):
    name = f"{prefix}{npt}" + ("_transposed" if transpose else "") + ("_round_sf" if round_sf else "") + ("_clamped" if clamp_value else "")
    options = dict(num_per_tokens=npt, round_sf=round_sf, without_transpose=not transpose, swiglu_clamp_value=clamp_value)
    return case(name, (rows_struct(t, h),), bench=bench, **options)


PER_CHANNEL_SPECS = (
    _per_channel_case(128, 1024, 128, True, False, None),
    _per_channel_case(384, 2048, 32, True, True, 10.0),
    _per_channel_case(256, 7168, 128, False, True, 0.5),
    _per_channel_case(128, 576, 32, False, False, None),
    _per_channel_case(16384, 4096, 128, True, False, None, prefix="bench_per_channel_", bench=True),
)


@uses(per_channel_cast_op, cases=PER_CHANNEL_SPECS)
def swiglu_forward_and_per_channel_cast_and_transpose(
    x: jax.Array,
    fmt: str = "e4m3",
    num_per_tokens: int = 128,
    round_sf: bool = False,
    without_transpose: bool = False,
    swiglu_clamp_value: Optional[float] = None,
    *,
    impl=None,
    ops,
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
    name = "swiglu_forward_and_per_channel_cast_and_transpose"
    check_impl(impl, name)
    check_fmt(name, fmt, ("e4m3",))
    return ops[0](
        checks.as_array(name, "x", x), impl=impl, num_per_tokens=checks.static_int(name, "num_per_tokens", num_per_tokens),
        round_sf=checks.static_bool(name, "round_sf", round_sf), transpose=not checks.static_bool(name, "without_transpose", without_transpose),
        clamp_value=checks.static_number(name, "swiglu_clamp_value", swiglu_clamp_value, positive=True),
    )  # fmt: skip
