"""grouped_matmul_quantized: a bf16 grouped matmul run in FP8, forward and backward, DeepSeek-V3's way.

Forward: ``x`` cast per token (1 × 128 blocks, ``jax_tilek.quant.per_token_cast``, column-major fp32
scales: the FP8 kernel's layout), each ``w[g]`` per 128 × 128 block (``jax_tilek.quant.per_block_cast``),
and ``grouped_matmul_fp8`` multiplies them: three launches.

Backward (a custom VJP; straight through the quantization, the gradients of ``x · w[g]`` with FP8
operands):

- ``dx = dy · w[g]ᵀ``: ``dy`` cast per token (1 × 128 along N), times the forward's FP8 ``w`` (its
  128 × 128 blocks serve both orientations), by ``grouped_matmul_fp8``;
- ``dw[g] = x_gᵀ · dy_g``: ``x`` and ``dy`` cast per channel (128 × 1 blocks along the rows) and
  transposed (``jax_tilek.quant.per_channel_cast_and_transpose``; rows padded with zeros to a
  multiple of 128 first), by ``grouped_matmul_wgrad_fp8``.

``fp8_backward=False`` runs the two products in bf16 instead (``jax_tilek.gemm.grouped_matmul``'s
kernels on the saved bf16 ``x`` and ``w``): slower, with no FP8 rounding in the gradients.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, quant
from jax_tilek.gemm import _segments as S
from jax_tilek.gemm._grouped_matmul import _bwd as bf16_bwd, _op as bf16_op
from jax_tilek.gemm._grouped_matmul_fp8 import BLOCK, _op as fp8_op, check_blocks, out_dtype_of, random_blocks
from jax_tilek.gemm._grouped_wgrad import matmul_operands, matmul_tiles, random_sizes
from jax_tilek.gemm._grouped_wgrad_fp8 import _op as wgrad_fp8_op
from jax_tilek.op import TileOp, resolve_impl, uses
from jax_tilek.testing import ArgSpec


def per_token(x: jax.Array, impl) -> tuple[jax.Array, jax.Array]:
    """e4m3 ``x[M, C]`` with 1 × 128 fp32 scales in the FP8 kernel's column-major storage."""
    return quant.per_token_cast(x, "e4m3", BLOCK, use_tma_aligned_col_major_sf=True, impl=impl)


def per_block(w: jax.Array, impl) -> tuple[jax.Array, jax.Array]:
    """e4m3 ``w[G, R, C]`` with fp32 128 × 128 block scales ``[G, R/128, C/128]``."""
    g, rows, cols = w.shape
    w8, w_sf = quant.per_block_cast(w.reshape(g * rows, cols), "e4m3", (BLOCK, BLOCK), impl=impl)
    return w8.reshape(g, rows, cols), w_sf.reshape(g, rows // BLOCK, cols // BLOCK)


def per_channel_t(x: jax.Array, impl) -> tuple[jax.Array, jax.Array]:
    """e4m3 ``xᵀ[C, M']`` with per-channel fp32 scales ``[M'/128, C]``: x's rows padded with zeros to
    ``M'``, a multiple of 128."""
    pad = -x.shape[0] % BLOCK
    return quant.per_channel_cast_and_transpose(jnp.pad(x, ((0, pad), (0, 0))) if pad else x, "e4m3", BLOCK, impl=impl)


def fp8_bwd(fp8: TileOp, wgrad: TileOp, impl, transpose_w: bool, residuals, dy):
    """``(dx, dw)`` from FP8 operands (module docstring); residuals ``(x, w8, w_sf, start, end,
    tiles)`` with the forward's FP8 ``w`` as ``[G, K, N]`` (the dx product's kernel layout)."""
    x, w8, w_sf, start, end, tiles = residuals
    dy = dy.astype(jnp.bfloat16)
    dy8, dy_sf = per_token(dy, impl)
    dx = fp8(dy8, dy_sf, w8, w_sf, start, end, tiles, impl=impl, x_sf_layout="col", out_dtype="bfloat16")
    x_t, x_t_sf = per_channel_t(x, impl)
    dy_t, dy_t_sf = per_channel_t(dy, impl)
    if transpose_w:
        dw = wgrad(dy_t, dy_t_sf, x_t, x_t_sf, start, end, impl=impl, out_dtype="bfloat16")
    else:
        dw = wgrad(x_t, x_t_sf, dy_t, dy_t_sf, start, end, impl=impl, out_dtype="bfloat16")
    return dx, dw, None, None, None


@functools.lru_cache(maxsize=256)
def _differentiable(fp8: TileOp, wgrad: TileOp, impl, transpose_w: bool, out_dtype: str, fp8_backward: bool):
    """``f(x, w, start, end, tiles)`` with the straight-through custom VJP (module docstring)."""

    def forward_with_weights(x, w, start, end, tiles):
        """The product and FP8 ``w`` in both orientations: ``[G, N, K]`` for this kernel, ``[G, K, N]`` for dx's."""
        x8, x_sf = per_token(x, impl)
        w8, w_sf = per_block(w, impl)
        swapped = jnp.swapaxes(w8, 1, 2), jnp.swapaxes(w_sf, 1, 2)
        nk, kn = ((w8, w_sf), swapped) if transpose_w else (swapped, (w8, w_sf))
        return fp8(x8, x_sf, *nk, start, end, tiles, impl=impl, x_sf_layout="col", out_dtype=out_dtype), kn

    def fwd(x, w, start, end, tiles):
        out, kn = forward_with_weights(x, w, start, end, tiles)
        return out, ((x, *kn, start, end, tiles) if fp8_backward else (x, w, start, end, tiles))

    def bwd(residuals, dy):
        if fp8_backward:
            return fp8_bwd(fp8, wgrad, impl, transpose_w, residuals, dy)
        return bf16_bwd(residuals, dy, impl=impl, ops=(bf16_op,), transpose_w=transpose_w, out_dtype=out_dtype)

    f = jax.custom_vjp(lambda *arrays: forward_with_weights(*arrays)[0])
    f.defvjp(fwd, bwd)
    return f


def _case(m: int, k: int, n: int, g: int, *, skew: float = 0.0, empty: int = 0, transpose_w: bool = False, segments: bool = False,
          tag: str = "", **options) -> ArgSpec:  # fmt: skip
    """A call on :func:`random_blocks` bf16 data with :func:`random_sizes` groups (about 90% of m
    grouped), or with ``segments`` each group padded to a multiple of 128 rows."""
    w_shape = (g, n, k) if transpose_w else (g, k, n)
    int_struct = jax.ShapeDtypeStruct((g,), jnp.int32)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct(w_shape, jnp.bfloat16))
    args += (None, int_struct, int_struct) if segments else (int_struct,)

    def make(rng, *structs):
        x = random_blocks(rng, (m, k), (1, BLOCK))
        w = random_blocks(rng, (g * w_shape[1], w_shape[2]), (BLOCK, BLOCK)).reshape(w_shape)
        if not segments:
            return x, w, random_sizes(rng, m, g, skew, empty, total=m - m // 10)
        sizes = random_sizes(rng, m // 2, g, skew, empty)
        padded = -(-sizes // S.BLOCK_M) * S.BLOCK_M
        end = np.minimum(np.cumsum(padded), m).astype(np.int32)
        return x, w, None, (end - np.minimum(padded, end)).astype(np.int32), end

    name = f"bfloat16_{m}x{k}x{n}_g{g}" + ("_wT" if transpose_w else "") + ("_segments" if segments else "")
    name += (f"_skew{skew:g}" if skew else "") + (f"_empty{empty}" if empty else "") + tag
    return ArgSpec(name, args, dict(transpose_w=transpose_w), make=make, launches=3, **options)


ARG_SPECS = (
    _case(300, 640, 256, 4, empty=1, tolerance=2e-2),
    _case(200, 640, 256, 3, skew=2.0, transpose_w=True, tolerance=2e-2),
    _case(640, 640, 256, 4, segments=True, tolerance=2e-2),
    _case(0, 640, 256, 2),
    # DeepSeek-V3 expert shapes, bf16 weights [G, K, N] as grouped_matmul's benchmarks take them.
    _case(8192, 7168, 4096, 8, bench=True),
    _case(8192, 2048, 7168, 8, bench=True),
)


@uses(fp8_op, wgrad_fp8_op, cases=ARG_SPECS, differentiable=True)
def grouped_matmul_quantized(
    x: jax.Array,
    w: jax.Array,
    group_sizes=None,
    expert_start=None,
    expert_end=None,
    *,
    transpose_w: bool = False,
    preferred_element_type=None,
    fp8_backward: bool = True,
    impl=None,
    ops,
) -> jax.Array:
    """:func:`jax_tilek.gemm.grouped_matmul` of bf16 operands run in FP8: x cast per token (1 × 128),
    each ``w[g]`` per 128 × 128 block, to e4m3, then :func:`grouped_matmul_fp8`; the backward products
    in FP8 too (the module docstring).

    Args:
      x: bfloat16 ``[M, K]``; w: bfloat16 ``[G, K, N]`` (``[G, N, K]`` with ``transpose_w``); K and N
        positive multiples of 128.
      group_sizes, expert_start, expert_end: the groups, as ``grouped_matmul`` takes them.
      preferred_element_type: bfloat16 (default) or float32.
      fp8_backward: run ``dx`` and ``dw`` in FP8 (default) or, False, by the bf16 kernels.

    Returns: ``[M, N]``. Differentiable in x and w, straight through the quantization.
    """
    name = "grouped_matmul_quantized"
    x, w, groups, transpose_w, k, n = matmul_operands(name, x, w, group_sizes, expert_start, expert_end, transpose_w)
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"{name}: x and w must be bfloat16, got {x.dtype} and {w.dtype}")
    check_blocks(name, k, n)
    out_dtype = out_dtype_of(name, preferred_element_type)
    start, end, tiles = matmul_tiles(name, x, w, groups)
    fp8_backward = checks.static_bool(name, "fp8_backward", fp8_backward)
    return _differentiable(*ops, resolve_impl(impl, name), transpose_w, out_dtype, fp8_backward)(x, w, start, end, tiles)
