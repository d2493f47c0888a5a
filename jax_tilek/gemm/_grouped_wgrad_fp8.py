"""grouped_matmul_wgrad_fp8: the weight gradient of a grouped matmul from FP8 operands quantized per
channel, DeepSeek-V3's way: ``out[g] = Σ_r a[r]ᵀ b[r]`` over segment g's rows, where the operands
come transposed, as ``jax_tilek.quant.per_channel_cast_and_transpose`` writes them: e4m3 codes
``a_t[A, M]``, ``b_t[B, M]`` (M, the rows, innermost) and fp32 scales ``a_sf[M/128, A]``,
``b_sf[M/128, B]``, one per channel and 128-row block.

Kernel (sm_90a): one CTA per (B-tile, A-tile, group), 128 × 128 output tiles, grid
``(B/128, A/128, G)``; it walks its group's rows in 128-row blocks (the scales' block, which is the
wgmma's K here: 8-bit wgmma reads both operands K-major, hence the transposed inputs). The blocks
wholly inside the segment go through a TMA ring (codes and both blocks' scales) into e4m3 wgmma with
a fresh fp32 partial sum per block, promoted as ``acc[i, j] += partial[i, j] · a_sf[rb, i] ·
b_sf[rb, j]``; the at most two blocks the segment only partly covers (its first and last) are loaded
with the rows outside it zeroed and promoted the same way. A segment need not start or end on a
block: rows of two groups share a block's scales, which only sets the quantization grid. Empty
groups store zeros; no rows at all make the grid empty (the launcher zero-fills).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.gemm._grouped_matmul_fp8 import BLOCK, FP8, out_dtype_of, random_blocks
from jax_tilek.gemm._grouped_wgrad import _reference as wgrad_reference, check_operands, random_sizes
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, config_class, uses
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec


def dequantize_t(codes: jax.Array, sf: jax.Array) -> jax.Array:
    """float32 ``[M, C]``: the transposed codes ``[C, M]`` times their per-channel scales ``[M/128, C]``."""
    return F.dequantize_blocks(codes.T, sf, "e4m3", (BLOCK, 1))


def _reference(a_t, a_sf, b_t, b_sf, start, end, *, out_dtype):
    """The dequantized operands' weight gradient in float32 (``grouped_matmul_wgrad``'s reference)."""
    return wgrad_reference(dequantize_t(a_t, a_sf), dequantize_t(b_t, b_sf), start, end, out_dtype=out_dtype)


@dataclasses.dataclass(frozen=True)
class WgradFp8Config:
    """The depth of the TMA ring (``stages``; 33 KB of shared memory a stage)."""

    stages: int = 4


@config_class(WgradFp8Config)
def _config(a_t, a_sf, b_t, b_sf, start, end, *, out_dtype) -> WgradFp8Config:
    """Four stages: beside them the two partial blocks' tiles and the output tile fit."""
    return WgradFp8Config()


@kernel
def grouped_wgrad_fp8_kernel(a_cols: int, b_cols: int, out_dtype: str, stages: int):
    """``out[g, i, j] = Σ_rb (Σ_{r in rb ∩ segment g} a_t[i, r] b_t[j, r]) · a_sf[rb, i] · b_sf[rb, j]``
    (see the module docstring)."""
    import tilelang.language as T

    M, G = T.dynamic("M, G")
    BM = BN = BR = BLOCK
    via_shared = out_dtype != "float32"

    @T.prim_func
    def grouped_wgrad_fp8(
        a_t: T.Tensor((a_cols, M), FP8),
        a_sf: T.Tensor((M // BR, a_cols), "float32"),
        b_t: T.Tensor((b_cols, M), FP8),
        b_sf: T.Tensor((M // BR, b_cols), "float32"),
        start: T.Tensor((G,), "int32"),
        end: T.Tensor((G,), "int32"),
        out: T.Tensor((G, a_cols, b_cols), out_dtype),
    ):
        with T.Kernel(T.ceildiv(b_cols, BN), T.ceildiv(a_cols, BM), G * T.min(M, 1), threads=256) as (bn, bm, g):
            a_s = T.alloc_shared((BM, BR), FP8)
            b_s = T.alloc_shared((BN, BR), FP8)
            sa_s = T.alloc_shared((BM,), "float32")
            sb_s = T.alloc_shared((BN,), "float32")
            a_p = T.alloc_shared((BM, BR), FP8)
            b_p = T.alloc_shared((BN, BR), FP8)
            sa_p = T.alloc_shared((BM,), "float32")
            sb_p = T.alloc_shared((BN,), "float32")
            part = T.alloc_fragment((BM, BN), "float32")
            acc = T.alloc_fragment((BM, BN), "float32")
            r0 = start[g]
            r1 = end[g]
            first = (r0 + BR - 1) // BR  # the first block wholly inside [r0, r1)
            full = T.max(r1 // BR - first, 0)
            T.clear(acc)
            for s in T.Pipelined(T.if_then_else(r0 < r1, full, 0), num_stages=stages):
                T.copy(a_t[bm * BM, (first + s) * BR], a_s)
                T.copy(b_t[bn * BN, (first + s) * BR], b_s)
                T.copy(a_sf[first + s, bm * BM : bm * BM + BM], sa_s)
                T.copy(b_sf[first + s, bn * BN : bn * BN + BN], sb_s)
                T.gemm(a_s, b_s, part, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(BM, BN):
                    acc[i, j] += part[i, j] * sa_s[i] * sb_s[j]
            # The partly covered blocks: the first (when r0 is inside a block) and the last (when
            # r1 is, unless that block is the first one's).
            for p in T.serial(2):
                rb = T.if_then_else(p == 0, r0 // BR, r1 // BR)
                lo = T.max(r0, rb * BR)
                hi = T.min(r1, rb * BR + BR)
                covers = T.if_then_else(p == 0, r0 % BR != 0, r1 % BR != 0 and rb * BR >= r0)
                if r0 < r1 and covers:
                    for i, r in T.Parallel(BM, BR):
                        a_p[i, r] = T.if_then_else(lo <= rb * BR + r and rb * BR + r < hi, a_t[bm * BM + i, rb * BR + r], T.cast(0, FP8))
                    for j, r in T.Parallel(BN, BR):
                        b_p[j, r] = T.if_then_else(lo <= rb * BR + r and rb * BR + r < hi, b_t[bn * BN + j, rb * BR + r], T.cast(0, FP8))
                    for i in T.Parallel(BM):
                        sa_p[i] = a_sf[rb, bm * BM + i]
                    for j in T.Parallel(BN):
                        sb_p[j] = b_sf[rb, bn * BN + j]
                    T.gemm(a_p, b_p, part, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                    for i, j in T.Parallel(BM, BN):
                        acc[i, j] += part[i, j] * sa_p[i] * sb_p[j]
            if via_shared:
                c_s = T.alloc_shared((BM, BN), out_dtype)
                T.copy(acc, c_s)
                T.copy(c_s, out[g, bm * BM, bn * BN])
            else:
                T.copy(acc, out[g, bm * BM, bn * BN])

    return grouped_wgrad_fp8


def _launch(a_t, a_sf, b_t, b_sf, start, end, *, config: WgradFp8Config, out_dtype) -> Launch:
    return Launch(kernel=grouped_wgrad_fp8_kernel, params=dict(a_cols=a_t.shape[0], b_cols=b_t.shape[0], out_dtype=out_dtype, stages=config.stages))


_op = TileOp(
    name="grouped_matmul_wgrad_fp8", launch=_launch, operands=("a_t", "a_sf", "b_t", "b_sf", "start", "end"), results=("out",),
    reference=_reference, config=_config,
)  # fmt: skip


def wgrad_fp8(a_t, a_sf, b_t, b_sf, start, end, out_dtype: str, impl) -> jax.Array:
    """The op."""
    return _op(a_t, a_sf, b_t, b_sf, start, end, impl=impl, out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# The public function.


def _case(m: int, k: int, n: int, g: int, *, skew: float = 0.0, empty: int = 0, out=None, tag: str = "", **options) -> ArgSpec:
    """x ``[m, k]`` and dy ``[m, n]`` (:func:`random_blocks` values per 128-row block and channel)
    quantized per channel as ``per_channel_cast_and_transpose`` does; about 90% of the rows grouped."""
    structs = []
    for cols in (k, n):
        structs += [jax.ShapeDtypeStruct((cols, m), FP8), jax.ShapeDtypeStruct((m // BLOCK, cols), jnp.float32)]
    args = (*structs, jax.ShapeDtypeStruct((g,), jnp.int32))

    def make(rng, *structs):
        operands = []
        for cols in (k, n):
            codes, sf = F.quantize_blocks(random_blocks(rng, (m, cols), (BLOCK, 1)), "e4m3", (BLOCK, 1))
            operands += [codes.T, sf]
        return (*operands, random_sizes(rng, m, g, skew, empty, total=m - m // 10))

    name = f"e4m3_{m}x{k}x{n}_g{g}" + (f"_skew{skew:g}" if skew else "") + (f"_empty{empty}" if empty else "")
    name += (f"_{np.dtype(out).name}" if out else "") + tag
    return ArgSpec(name, args, dict(preferred_element_type=out) if out else {}, make=make, **options)


ARG_SPECS = (
    _case(384, 256, 128, 4, empty=1, tolerance=2e-2),
    _case(128, 128, 256, 3, skew=2.0, tolerance=2e-2),
    _case(1024, 128, 384, 8, skew=1.0, empty=2, out=jnp.float32, tolerance=2e-2),
    _case(0, 128, 128, 2),
    # DeepSeek-V3: dw of the gate+up projection (x[T, 7168], dy[T, 4096]) and of the down projection.
    _case(8192, 7168, 4096, 8, bench=True),
    _case(8192, 2048, 7168, 8, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def grouped_matmul_wgrad_fp8(
    x_t: jax.Array,
    x_sf: jax.Array,
    dy_t: jax.Array,
    dy_sf: jax.Array,
    group_sizes=None,
    expert_start=None,
    expert_end=None,
    *,
    preferred_element_type=None,
    impl=None,
    ops,
) -> jax.Array:
    """:func:`jax_tilek.gemm.grouped_matmul_wgrad` of FP8 operands quantized per channel (128 rows a
    block), as DeepSeek-V3 computes its weight gradients: ``dw[g] = x_gᵀ · dy_g`` with ``x`` and
    ``dy`` dequantized.

    Args:
      x_t, x_sf: ``jax_tilek.quant.per_channel_cast_and_transpose(x, "e4m3")`` of ``x[M, K]``:
        float8_e4m3fn ``[K, M]`` and float32 ``[M/128, K]``.
      dy_t, dy_sf: the same of ``dy[M, N]``. M a multiple of 128 (0 allowed), K and N positive
        multiples of 128.
      group_sizes, expert_start, expert_end: the groups, as :func:`grouped_matmul_wgrad` takes them.
      preferred_element_type: bfloat16 (default) or float32; accumulation is float32.

    Returns: ``[G, K, N]``; empty groups give zeros.
    """
    name = "grouped_matmul_wgrad_fp8"
    x_t, x_sf, dy_t, dy_sf = (checks.as_array(name, label, v) for label, v in (("x_t", x_t), ("x_sf", x_sf), ("dy_t", dy_t), ("dy_sf", dy_sf)))
    group_sizes, expert_start, expert_end = (None if v is None else checks.as_array(name, label, v)
                                             for label, v in (("group_sizes", group_sizes), ("expert_start", expert_start), ("expert_end", expert_end)))  # fmt: skip
    if x_t.ndim != 2 or dy_t.ndim != 2 or x_t.shape[1] != dy_t.shape[1]:
        raise ValueError(f"{name}: x_t must be [K, M] and dy_t [N, M] with the same M, got {x_t.shape} and {dy_t.shape}")
    if x_t.dtype != FP8 or dy_t.dtype != FP8:
        raise ValueError(f"{name}: x_t and dy_t must be {FP8}, got {x_t.dtype} and {dy_t.dtype}")
    (k, m), n = x_t.shape, dy_t.shape[0]
    if m % BLOCK:
        raise ValueError(f"{name}: M must be a multiple of {BLOCK} (the scales' row block), got {m}")
    for label, extent in (("K", k), ("N", n)):
        if extent <= 0 or extent % BLOCK:
            raise ValueError(f"{name}: {label} must be a positive multiple of {BLOCK}, got {extent}")
    for label, sf, cols in (("x_sf", x_sf, k), ("dy_sf", dy_sf, n)):
        if tuple(sf.shape) != (m // BLOCK, cols) or sf.dtype != jnp.float32:
            raise ValueError(f"{name}: {label} must be float32 [{m // BLOCK}, {cols}] (per channel, {BLOCK} rows a block), got {sf.dtype}{list(sf.shape)}")
    start, end, _ = check_operands(name, jax.ShapeDtypeStruct((m, k), FP8), group_sizes, expert_start, expert_end)
    return ops[0](x_t, x_sf, dy_t, dy_sf, start, end, impl=impl, out_dtype=out_dtype_of(name, preferred_element_type))
