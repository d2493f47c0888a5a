"""grouped_matmul_quantized: a bf16 grouped matmul whose forward runs in FP8: ``x`` is cast per token
(1 × 128 blocks, ``jax_tilek.quant.per_token_cast``, column-major fp32 scales: the FP8 kernel's
layout), each ``w[g]`` per 128 × 128 block (``jax_tilek.quant.per_block_cast``), and
``grouped_matmul_fp8`` multiplies them: three launches.

Backward (a custom VJP, the same for every ``impl``): straight through the quantization, the
gradients of the unquantized product ``x · w[g]``, by the bf16 kernels of
:func:`jax_tilek.gemm.grouped_matmul` (``dx = dy · w[g]ᵀ``, ``dw[g] = x_gᵀ · dy_g``) from the saved
bf16 ``x`` and ``w``. DeepSeek-V3 runs these two products in FP8 as well; keeping them bf16 costs
their speed-up but puts no FP8 rounding into the gradients, and saves only what the bf16 op saves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import quant
from jax_tilek.gemm import _segments as S
from jax_tilek.gemm._grouped_matmul import _bwd as bf16_bwd
from jax_tilek.gemm._grouped_matmul_fp8 import BLOCK, _op as fp8_op, check_blocks, out_dtype_of, random_blocks
from jax_tilek.gemm._grouped_wgrad import matmul_operands, matmul_tiles, random_sizes
from jax_tilek.op import TileOp, resolve_impl, uses
from jax_tilek.testing import ArgSpec


def quantize(x: jax.Array, w: jax.Array, *, transpose_w: bool, impl) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(x8, x_sf, w8, w_sf)`` as the FP8 kernel reads them: e4m3 ``x[M, K]`` with fp32 scales in
    column-major storage ``[K/128, align(M, 4)]``, e4m3 ``w[G, N, K]`` with fp32 ``[G, N/128, K/128]``.
    ``w`` is ``[G, K, N]`` (``[G, N, K]`` with ``transpose_w``): the former is cast in place and its
    e4m3 codes transposed (half the bytes of transposing bf16)."""
    x8, x_sf = quant.per_token_cast(x, "e4m3", BLOCK, use_tma_aligned_col_major_sf=True, impl=impl)
    g, rows, cols = w.shape
    w8, w_sf = quant.per_block_cast(w.reshape(g * rows, cols), "e4m3", (BLOCK, BLOCK), impl=impl)
    w8, w_sf = w8.reshape(g, rows, cols), w_sf.reshape(g, rows // BLOCK, cols // BLOCK)
    if not transpose_w:
        w8, w_sf = jnp.swapaxes(w8, 1, 2), jnp.swapaxes(w_sf, 1, 2)
    return x8, x_sf, w8, w_sf


@functools.lru_cache(maxsize=256)
def _differentiable(op: TileOp, impl, transpose_w: bool, out_dtype: str):
    """``f(x, w, start, end, tiles)`` with the straight-through custom VJP (module docstring)."""

    def forward(x, w, start, end, tiles):
        x8, x_sf, w8, w_sf = quantize(x, w, transpose_w=transpose_w, impl=impl)
        return op(x8, x_sf, w8, w_sf, start, end, tiles, impl=impl, x_sf_layout="col", out_dtype=out_dtype)

    f = jax.custom_vjp(forward)
    f.defvjp(
        lambda *arrays: (forward(*arrays), arrays),
        lambda residuals, dy: bf16_bwd(residuals, dy, impl=impl, transpose_w=transpose_w, out_dtype=out_dtype),
    )
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


@uses(fp8_op, cases=ARG_SPECS, differentiable=True)
def grouped_matmul_quantized(
    x: jax.Array,
    w: jax.Array,
    group_sizes=None,
    expert_start=None,
    expert_end=None,
    *,
    transpose_w: bool = False,
    preferred_element_type=None,
    impl=None,
    ops,
) -> jax.Array:
    """:func:`jax_tilek.gemm.grouped_matmul` of bf16 operands with its forward in FP8: x cast per
    token (1 × 128), each ``w[g]`` per 128 × 128 block, to e4m3, then :func:`grouped_matmul_fp8`.

    Args:
      x: bfloat16 ``[M, K]``; w: bfloat16 ``[G, K, N]`` (``[G, N, K]`` with ``transpose_w``); K and N
        positive multiples of 128.
      group_sizes, expert_start, expert_end: the groups, as ``grouped_matmul`` takes them.
      preferred_element_type: bfloat16 (default) or float32.

    Returns: ``[M, N]``. Differentiable in x and w, straight through the quantization: the gradients
    of the bf16 product, by the bf16 kernels (the module docstring says why).
    """
    name = "grouped_matmul_quantized"
    x, w, groups, transpose_w, k, n = matmul_operands(name, x, w, group_sizes, expert_start, expert_end, transpose_w)
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"{name}: x and w must be bfloat16, got {x.dtype} and {w.dtype}")
    check_blocks(name, k, n)
    out_dtype = out_dtype_of(name, preferred_element_type)
    start, end, tiles = matmul_tiles(name, x, w, groups)
    return _differentiable(ops[0], resolve_impl(impl, name), transpose_w, out_dtype)(x, w, start, end, tiles)
