"""grouped_matmul: ``out[r] = x[r] · w[g]`` for the rows r of segment g (``jax.lax.ragged_dot``), and
its transpose-weight form ``x[r] · w[g]ᵀ``, which is also its ``dx``.

Kernel: a tile table (``_segments.tile_table``, computed by XLA on the device) cuts the rows into
M-tiles of at most 128 rows that never straddle a segment boundary: per tile ``(group, row_start,
row_end)``, with group -1 for rows outside every segment and for the table's unused tail. One CTA per
(N-tile, M-tile), N fastest, so the CTAs of one M-tile run together and share its rows in L2. Each
CTA: a producer warpgroup issues TMA loads of 128 × ``block_k`` rows of x (rows past the tile's end are
loaded, belonging to the next segment or beyond M, where TMA fills zeros) and ``block_k`` ×
``block_n`` of ``w[group]`` into a ``stages``-deep ring; two consumer warpgroups run wgmma (fp32
accumulators in registers) and store only the tile's rows (through shared memory, 16-byte stores).
A tile of group -1 runs no K steps and so stores zeros; a table row past the real count stores
nothing. (TileLang's warp specialization, ``T.Pipelined`` and ``T.gemm`` make the pipeline.)

Custom VJP: ``dx`` is this kernel with the weights transposed (wgmma reads them K-major), ``dw`` is
``grouped_matmul_wgrad``; both reuse the forward's segments (and ``dx`` its tile table).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.gemm import _segments as S
from jax_tilek.gemm._grouped_wgrad import kernel_shapes, matmul_operands, matmul_tiles, random_sizes, wgrad
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, config_class, uses, with_vjp
from jax_tilek.testing import ArgSpec

BLOCK_M = S.BLOCK_M


def _reference(x, w, start, end, tiles, *, transpose_w, out_dtype):
    """``jax.lax.ragged_dot`` (float32 accumulation) of the rows in segment order; rows outside every
    segment give zeros. ``tiles`` (the kernel's schedule) is not read."""
    m = x.shape[0]
    perm, sizes = S.row_order(start, end, m)
    rhs = jnp.swapaxes(w, 1, 2) if transpose_w else w
    y = jax.lax.ragged_dot(x[perm], rhs, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(y).at[perm].set(y).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """The output tile's width (``block_n``; its height is 128 rows), the K step (``block_k``) and the
    depth of the TMA ring (``stages``)."""

    block_n: int = 256
    block_k: int = 64
    stages: int = 4


@config_class(GroupedMatmulConfig)
def _config(x, w, start, end, tiles, *, transpose_w, out_dtype) -> GroupedMatmulConfig:
    """128 × 256 × 64 tiles where N is a multiple of 256, 128 × 128 × 64 otherwise; a 4-deep ring
    (192 KB of shared memory at 128 × 256, the output tile reusing it)."""
    n = w.shape[1] if transpose_w else w.shape[2]
    return GroupedMatmulConfig(block_n=256 if n % 256 == 0 else 128, stages=4)


@kernel
def grouped_matmul_kernel(k: int, n: int, dtype: str, out_dtype: str, transpose_b: bool, block_n: int, block_k: int, stages: int):
    """``out[r] = x[r] · w[g]`` (``w[g]ᵀ`` with ``transpose_b``) per the tile table (module docstring)."""
    import tilelang.language as T

    M, G, NT = T.dynamic("M, G, NT")
    BM, BN, BK = BLOCK_M, block_n, block_k
    w_shape = (G, n, k) if transpose_b else (G, k, n)
    b_tile = (BN, BK) if transpose_b else (BK, BN)
    via_shared = out_dtype != "float32"
    store = S.tile_store(T, BM, BN, via_shared)

    @T.prim_func
    def grouped_matmul(
        x: T.Tensor((M, k), dtype),
        w: T.Tensor(w_shape, dtype),
        tiles: T.Tensor((NT, 3), "int32"),
        out: T.Tensor((M, n), out_dtype),
    ):
        with T.Kernel(T.ceildiv(n, BN), NT, threads=256) as (bn, bt):
            a_s = T.alloc_shared((BM, BK), dtype)
            b_s = T.alloc_shared(b_tile, dtype)
            acc = T.alloc_fragment((BM, BN), "float32")
            g = tiles[bt, 0]
            r0 = tiles[bt, 1]
            r1 = tiles[bt, 2]
            T.clear(acc)
            for kk in T.Pipelined(T.if_then_else(g >= 0, k // BK, 0), num_stages=stages):
                T.copy(x[r0, kk * BK], a_s)
                if transpose_b:
                    T.copy(w[g, bn * BN, kk * BK], b_s)
                else:
                    T.copy(w[g, kk * BK, bn * BN], b_s)
                T.gemm(a_s, b_s, acc, transpose_B=transpose_b)
            c_s = T.alloc_shared((BM, BN), out_dtype) if via_shared else None
            store(out, acc, c_s, r0, r1, bn * BN)

    return grouped_matmul


def _launch(x, w, start, end, tiles, *, config: GroupedMatmulConfig, transpose_w, out_dtype) -> Launch:
    k, n = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    return Launch(
        kernel=grouped_matmul_kernel,
        params=dict(k=k, n=n, dtype=np.dtype(x.dtype).name, out_dtype=np.dtype(out_dtype).name, transpose_b=bool(transpose_w),
                    block_n=config.block_n, block_k=config.block_k, stages=config.stages),
    )  # fmt: skip


def _kernel_check(x, w, start, end, tiles, *, transpose_w, out_dtype):
    k, n = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    kernel_shapes("grouped_matmul", (("K", k), ("N", n)), x, w, out_dtype)


_op = TileOp(
    name="grouped_matmul", launch=_launch, operands=("x", "w", "start", "end", "tiles"), results=("out",),
    reference=_reference, config=_config, kernel_check=_kernel_check,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The custom VJP.


def _primal(x, w, start, end, tiles, *, impl=None, ops, transpose_w, out_dtype):
    return ops[0](x, w, start, end, tiles, impl=impl, transpose_w=transpose_w, out_dtype=out_dtype)


def _fwd(x, w, start, end, tiles, *, impl=None, ops, transpose_w, out_dtype):
    out = _primal(x, w, start, end, tiles, impl=impl, ops=ops, transpose_w=transpose_w, out_dtype=out_dtype)
    return out, (x, w, start, end, tiles)


def _bwd(residuals, dy, *, impl=None, ops, transpose_w, out_dtype):
    """``dx = dy · w[g]ᵀ`` (the forward kernel with the other weight orientation) and
    ``dw[g] = x_gᵀ dy_g`` (or ``dy_gᵀ x_g`` for transposed weights). The kernels read 16-bit operands:
    a wider cotangent (a float32 output) is split into a 16-bit head and tail, each multiplied, and the
    float32 products summed (twice the backward's work, about 16 bits of the cotangent kept)."""
    x, w, start, end, tiles = residuals
    parts = [dy.astype(x.dtype)]
    if np.dtype(dy.dtype).itemsize > np.dtype(x.dtype).itemsize:
        parts.append((dy - parts[0].astype(dy.dtype)).astype(x.dtype))
    wide = len(parts) > 1
    dx_dtype, dw_dtype = ("float32", jnp.float32) if wide else (np.dtype(x.dtype).name, w.dtype)
    dx = sum(ops[0](p, w, start, end, tiles, impl=impl, transpose_w=not transpose_w, out_dtype=dx_dtype) for p in parts)
    dw = sum(wgrad(p, x, start, end, dw_dtype, impl) if transpose_w else wgrad(x, p, start, end, dw_dtype, impl) for p in parts)
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None, None


_differentiable = with_vjp(_primal, _fwd, _bwd)


# ---------------------------------------------------------------------------------------------
# The public function.


def _case(m: int, k: int, n: int, g: int, *, skew: float = 0.0, empty: int = 0, transpose_w: bool = False, segments: bool = False,
          out=None, dtype=jnp.bfloat16, tag: str = "", **options) -> ArgSpec:  # fmt: skip
    """A call on random data: group sizes from :func:`random_sizes` (summing to about 90% of m, so
    some rows are outside every group), or, with ``segments``, a fused-mapping layout: each group's
    rows padded to a multiple of 128, padding rows zero in x, the segments' tail past the last one."""
    w_shape = (g, n, k) if transpose_w else (g, k, n)
    int_struct = jax.ShapeDtypeStruct((g,), jnp.int32)
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct(w_shape, dtype))
    args += (None, int_struct, int_struct) if segments else (int_struct,)

    def make(rng, *structs):
        from jax_tilek.testing import random_array

        x, w = random_array(rng, (m, k), dtype), random_array(rng, w_shape, dtype)
        if not segments:
            return x, w, random_sizes(rng, m, g, skew, empty, total=m - m // 10)
        sizes = random_sizes(rng, m // 2, g, skew, empty)
        padded = -(-sizes // BLOCK_M) * BLOCK_M
        end = np.minimum(np.cumsum(padded), m).astype(np.int32)
        start = (end - np.minimum(padded, end)).astype(np.int32)
        real = np.zeros(m, bool)
        for s, c in zip(start, sizes):
            real[s : s + c] = True
        x = np.where(real[:, None], x, np.zeros_like(x))
        return x, w, None, start, end

    name = f"{np.dtype(dtype).name}_{m}x{k}x{n}_g{g}" + ("_wT" if transpose_w else "") + ("_segments" if segments else "")
    name += (f"_skew{skew:g}" if skew else "") + (f"_empty{empty}" if empty else "") + (f"_{np.dtype(out).name}" if out else "") + tag
    kwargs = dict(transpose_w=transpose_w, preferred_element_type=out) if out is not None else dict(transpose_w=transpose_w)
    return ArgSpec(name, args, kwargs, make=make, **options)


ARG_SPECS = (
    _case(300, 256, 128, 4, empty=1, tolerance=2e-2),
    _case(77, 128, 256, 3, skew=2.0, tolerance=2e-2),
    _case(520, 128, 384, 8, skew=1.0, empty=2, transpose_w=True, tolerance=2e-2),
    _case(640, 256, 256, 4, segments=True, tolerance=2e-2),
    _case(200, 128, 256, 2, out=jnp.float32, tolerance=2e-2),
    _case(0, 128, 128, 2),
    _case(136, 256, 256, 3, skew=1.0, config=dict(block_n=128, stages=3), tag="_n128_s3", tolerance=2e-2),
    # DeepSeek-V3 expert shapes: gate+up projection [T, 7168] x [G, 7168, 4096], down [T, 2048] x [G, 2048, 7168].
    _case(8192, 7168, 4096, 8, bench=True),
    _case(8192, 2048, 7168, 8, bench=True),
    _case(65536, 7168, 4096, 32, skew=1.0, bench=True),
    _case(65536, 2048, 7168, 32, segments=True, bench=True),
)


@uses(_op, cases=ARG_SPECS, differentiable=True)
def grouped_matmul(
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
    """A grouped matmul: ``out[r] = x[r] · w[g]`` for the rows r of group g (``jax.lax.ragged_dot``).

    Args:
      x: ``[M, K]``; w: ``[G, K, N]`` (``[G, N, K]`` with ``transpose_w``, for ``x[r] · w[g]ᵀ``), of one
        dtype (bfloat16 or float16 on the kernel path, with K and N positive multiples of 128).
      group_sizes: int ``[G]``: ``ragged_dot``'s groups, consecutive from row 0 (rows past their sum
        give zeros; a sum past M is clipped). Or
      expert_start, expert_end: int32 ``[G]``: group g is the rows ``[expert_start[g],
        expert_end[g])``, as ``jax_tilek.moe.get_fused_mapping`` returns them (padded, aligned
        segments: no re-layout). Segments must be disjoint; rows outside every segment (e.g. the
        mapping's tail past the real total) give zeros and get zero gradient.
      transpose_w: multiply by ``w[g]ᵀ`` (w stored ``[G, N, K]``).
      preferred_element_type: the output dtype (default x's: ``ragged_dot``'s rule); float32
        accumulation.

    Returns: ``[M, N]``. Differentiable in x and w (a custom VJP running the dx and dw kernels).
    """
    name = "grouped_matmul"
    x, w, groups, transpose_w, _, _ = matmul_operands(name, x, w, group_sizes, expert_start, expert_end, transpose_w)
    if x.dtype != w.dtype:
        raise ValueError(f"{name}: x and w must have one dtype, got {x.dtype} and {w.dtype}")
    start, end, tiles = matmul_tiles(name, x, w, groups)
    out_dtype = np.dtype(preferred_element_type if preferred_element_type is not None else x.dtype)
    return _differentiable(x, w, start, end, tiles, impl=impl, ops=ops, transpose_w=transpose_w, out_dtype=out_dtype.name)
