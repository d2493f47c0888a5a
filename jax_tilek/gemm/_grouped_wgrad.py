"""grouped_matmul_wgrad: the weight gradient of a grouped matmul, ``out[g] = a_gᵀ · b_g`` summed over
segment g's rows (``a``: ``x`` and ``b``: ``dy`` give ``dw`` of ``x · w[g]``).

Kernel: one CTA per (N-tile, K-tile, group), grid ``(B/BN, A/BM, G)``; it walks its group's rows in
steps of ``block_r``: full steps in a TMA + wgmma pipeline (a producer warpgroup and two consumer
warpgroups: TileLang's warp specialization), then at most one partial step whose rows past the
segment's end are zeroed as they are loaded. Empty groups store zeros (and no rows at all make the grid empty: the launcher zero-fills). fp32 accumulation; the tile
goes out through shared memory and a TMA store (bf16/fp16) or from registers (fp32).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.gemm import _segments as S
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, config_class, uses
from jax_tilek.testing import ArgSpec

KERNEL_DTYPES = ("bfloat16", "float16")
OUT_DTYPES = ("bfloat16", "float16", "float32")


def _reference(a, b, start, end, *, out_dtype):
    """``out[g] = Σ_{start[g] <= r < end[g]} a[r]ᵀ b[r]`` in float32 (the transpose of ``ragged_dot``
    in its right operand), cast to ``out_dtype``."""
    m, g = a.shape[0], start.shape[0]
    perm, sizes = S.row_order(start, end, m)
    a32, b32 = a[perm].astype(jnp.float32), b[perm].astype(jnp.float32)
    zeros = jnp.zeros((g, a.shape[1], b.shape[1]), jnp.float32)
    _, transpose = jax.vjp(lambda w: jax.lax.ragged_dot(a32, w, sizes, preferred_element_type=jnp.float32), zeros)
    return transpose(b32)[0].astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class WgradConfig:
    """Tiles of ``out[g]`` (``block_m`` × ``block_n``), rows per pipeline step (``block_r``) and
    pipeline depth (``stages``)."""

    block_m: int = 128
    block_n: int = 256
    block_r: int = 64
    stages: int = 4


@config_class(WgradConfig)
def _config(a, b, start, end, *, out_dtype) -> WgradConfig:
    """128 × 256 tiles where B's width allows (128 × 128 otherwise), 64 rows a step, 4 stages."""
    block_n = 256 if b.shape[1] % 256 == 0 else 128
    return WgradConfig(block_n=block_n, stages=4 if block_n == 256 else 5)


@kernel
def grouped_wgrad_kernel(a_cols: int, b_cols: int, dtype: str, out_dtype: str, block_m: int, block_n: int, block_r: int, stages: int):
    """``out[g, i, j] = Σ_r a[r, i] b[r, j]`` over ``start[g] <= r < end[g]`` (see the module docstring)."""
    import tilelang.language as T

    M, G = T.dynamic("M, G")
    BM, BN, BR = block_m, block_n, block_r
    via_shared = out_dtype != "float32"

    @T.prim_func
    def grouped_wgrad(
        a: T.Tensor((M, a_cols), dtype),
        b: T.Tensor((M, b_cols), dtype),
        start: T.Tensor((G,), "int32"),
        end: T.Tensor((G,), "int32"),
        out: T.Tensor((G, a_cols, b_cols), out_dtype),
    ):
        # No rows: an empty grid (the launcher zero-fills the result; TMA cannot describe 0 rows).
        with T.Kernel(T.ceildiv(b_cols, BN), T.ceildiv(a_cols, BM), G * T.min(M, 1), threads=256) as (bn, bm, g):
            a_s = T.alloc_shared((BR, BM), dtype)
            b_s = T.alloc_shared((BR, BN), dtype)
            a_t = T.alloc_shared((BR, BM), dtype)
            b_t = T.alloc_shared((BR, BN), dtype)
            acc = T.alloc_fragment((BM, BN), "float32")
            r0 = start[g]
            r1 = end[g]
            steps = T.max(r1 - r0, 0) // BR
            T.clear(acc)
            for s in T.Pipelined(steps, num_stages=stages):
                T.copy(a[r0 + s * BR, bm * BM], a_s)
                T.copy(b[r0 + s * BR, bn * BN], b_s)
                T.gemm(a_s, b_s, acc, transpose_A=True)
            rest = r0 + steps * BR
            if rest < r1:
                for i, j in T.Parallel(BR, BM):
                    a_t[i, j] = T.if_then_else(rest + i < r1, a[rest + i, bm * BM + j], T.cast(0, dtype))
                for i, j in T.Parallel(BR, BN):
                    b_t[i, j] = T.if_then_else(rest + i < r1, b[rest + i, bn * BN + j], T.cast(0, dtype))
                T.gemm(a_t, b_t, acc, transpose_A=True)
            if via_shared:
                c_s = T.alloc_shared((BM, BN), out_dtype)
                T.copy(acc, c_s)
                T.copy(c_s, out[g, bm * BM, bn * BN])
            else:
                T.copy(acc, out[g, bm * BM, bn * BN])

    return grouped_wgrad


def _launch(a, b, start, end, *, config: WgradConfig, out_dtype) -> Launch:
    return Launch(
        kernel=grouped_wgrad_kernel,
        params=dict(a_cols=a.shape[1], b_cols=b.shape[1], dtype=np.dtype(a.dtype).name, out_dtype=np.dtype(out_dtype).name,
                    block_m=config.block_m, block_n=config.block_n, block_r=config.block_r, stages=config.stages),
    )  # fmt: skip


def kernel_shapes(name: str, what: str, a, b, out_dtype) -> None:
    """The kernels' limits: 16-bit floating inputs of one dtype, widths multiples of 128, rows present."""
    if np.dtype(a.dtype).name not in KERNEL_DTYPES or a.dtype != b.dtype:
        raise ValueError(f"{name}: the kernel takes bfloat16 or float16 operands of one dtype, got {a.dtype} and {b.dtype} (use impl='xla')")
    if np.dtype(out_dtype).name not in OUT_DTYPES:
        raise ValueError(f"{name}: the kernel writes bfloat16, float16 or float32, got {np.dtype(out_dtype).name} (use impl='xla')")
    for label, extent in what:
        if extent <= 0 or extent % 128:
            raise ValueError(f"{name}: the kernel needs {label} to be a positive multiple of 128, got {extent} (use impl='xla')")


def _kernel_check(a, b, start, end, *, out_dtype):
    kernel_shapes("grouped_matmul_wgrad", (("the width of a", a.shape[1]), ("the width of b", b.shape[1])), a, b, out_dtype)


_op = TileOp(
    name="grouped_matmul_wgrad", launch=_launch, operands=("a", "b", "start", "end"), results=("out",),
    reference=_reference, config=_config, kernel_check=_kernel_check,
)  # fmt: skip


def wgrad(a, b, start, end, out_dtype, impl) -> jax.Array:
    """The op (``out_dtype`` any dtype spelling)."""
    return _op(a, b, start, end, impl=impl, out_dtype=np.dtype(out_dtype).name)


# ---------------------------------------------------------------------------------------------
# The public function.


def check_operands(name: str, x, group_sizes, expert_start, expert_end) -> tuple[jax.Array, jax.Array, int]:
    """Segments ``(start, end)`` from ``group_sizes`` or ``(expert_start, expert_end)`` (exactly one
    form), checked; and G."""
    m = x.shape[0]
    if group_sizes is not None:
        if expert_start is not None or expert_end is not None:
            raise ValueError(f"{name}: give group_sizes or (expert_start, expert_end), not both")
        if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
            raise ValueError(f"{name}: group_sizes must be an integer [G] array, got {group_sizes.dtype}{list(group_sizes.shape)}")
        if group_sizes.shape[0] == 0:
            raise ValueError(f"{name}: there must be at least one group")
        start, end = S.segments_of_sizes(group_sizes, m)
        return start, end, group_sizes.shape[0]
    if expert_start is None or expert_end is None:
        raise ValueError(f"{name}: give group_sizes, or both expert_start and expert_end")
    for label, v in (("expert_start", expert_start), ("expert_end", expert_end)):
        if v.ndim != 1 or v.dtype != jnp.int32:
            raise ValueError(f"{name}: {label} must be int32 [G], got {v.dtype}{list(v.shape)}")
    if expert_start.shape != expert_end.shape:
        raise ValueError(f"{name}: expert_start and expert_end must have one shape, got {expert_start.shape} and {expert_end.shape}")
    if expert_start.shape[0] == 0:
        raise ValueError(f"{name}: there must be at least one group")
    start, end = S.clamp_segments(expert_start, expert_end, m)
    return start, end, expert_start.shape[0]


def matmul_operands(name: str, x, w, group_sizes, expert_start, expert_end, transpose_w) -> tuple:
    """The argument rules the grouped matmuls share: ``x``, ``w`` and the groups as arrays (None where
    absent), ``transpose_w`` a static bool, ``x [M, K]`` and ``w [G, K, N]`` (``[G, N, K]`` with
    ``transpose_w``) agreeing on K. Returns ``(x, w, (group_sizes, expert_start, expert_end),
    transpose_w, K, N)``."""
    x, w = checks.as_array(name, "x", x), checks.as_array(name, "w", w)
    groups = tuple(None if v is None else checks.as_array(name, label, v)
                   for label, v in (("group_sizes", group_sizes), ("expert_start", expert_start), ("expert_end", expert_end)))  # fmt: skip
    transpose_w = checks.static_bool(name, "transpose_w", transpose_w)
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"{name}: x must be [M, K] and w [G, K, N] (rank 2 and 3), got shapes {x.shape} and {w.shape}")
    k, n = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    if x.shape[1] != k:
        raise ValueError(f"{name}: x is [M, {x.shape[1]}] but w{list(w.shape)} takes K = {k}" + (" (transpose_w)" if transpose_w else ""))
    return x, w, groups, transpose_w, k, n


def matmul_tiles(name: str, x, w, groups) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(start, end, tiles)``: the segments of ``groups`` (:func:`check_operands`), as many as w has,
    and the kernels' M-tile table."""
    start, end, g = check_operands(name, x, *groups)
    if g != w.shape[0]:
        raise ValueError(f"{name}: {g} groups but w has {w.shape[0]}")
    return start, end, S.tile_table(start, end, x.shape[0])


def random_sizes(rng: np.random.Generator, m: int, g: int, skew: float = 0.0, empty: int = 0, total: int | None = None) -> np.ndarray:
    """int32 group sizes summing to ``total`` (default m): multinomial over weights ``rank^-skew``
    (0: balanced, larger: a few groups take most rows), ``empty`` groups forced to 0."""
    total = m if total is None else total
    weights = np.arange(1, g + 1, dtype=np.float64) ** -skew
    rng.shuffle(weights)
    if empty:
        weights[rng.choice(g, size=min(empty, g - 1), replace=False)] = 0
    return rng.multinomial(total, weights / weights.sum()).astype(np.int32)


def _case(m: int, k: int, n: int, g: int, *, skew: float = 0.0, empty: int = 0, dtype=jnp.bfloat16, tag: str = "", **options) -> ArgSpec:
    args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m, n), dtype), jax.ShapeDtypeStruct((g,), jnp.int32))

    def make(rng, *structs):
        from jax_tilek.testing import random_array

        return random_array(rng, (m, k), dtype), random_array(rng, (m, n), dtype), random_sizes(rng, m, g, skew, empty)

    name = f"{np.dtype(dtype).name}_{m}x{k}x{n}_g{g}" + (f"_skew{skew:g}" if skew else "") + (f"_empty{empty}" if empty else "") + tag
    return ArgSpec(name, args, make=make, **options)


ARG_SPECS = (
    _case(300, 256, 128, 4, empty=1, tolerance=5e-2),
    _case(77, 128, 256, 3, skew=2.0, tolerance=5e-2),
    _case(0, 128, 128, 2),
    _case(1000, 128, 384, 8, skew=1.0, empty=2, tolerance=5e-2),
    _case(8192, 7168, 2048, 8, bench=True),  # DeepSeek-V3 dw of the down projection: dy[T, 7168] against x[T, 2048] ...
    _case(8192, 2048, 7168, 8, bench=True, tag="_down"),
    _case(65536, 7168, 4096, 32, skew=1.0, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def grouped_matmul_wgrad(
    x: jax.Array, dy: jax.Array, group_sizes=None, expert_start=None, expert_end=None, *, preferred_element_type=None, impl=None, ops
) -> jax.Array:
    """The weight gradient of :func:`grouped_matmul`: ``dw[g] = x_gᵀ · dy_g``.

    Args:
      x: ``[M, K]``; dy: ``[M, N]`` of x's dtype (bfloat16 or float16 on the kernel path; K and N
        positive multiples of 128).
      group_sizes: int ``[G]`` (``jax.lax.ragged_dot``'s groups: consecutive rows from row 0), or
      expert_start, expert_end: int32 ``[G]`` disjoint segments ``[start, end)`` (as
        ``jax_tilek.moe.get_fused_mapping`` returns them); rows outside every segment are ignored.
      preferred_element_type: the result dtype (default x's); accumulation is float32.

    Returns: ``[G, K, N]``; empty groups give zeros.
    """
    name = "grouped_matmul_wgrad"
    x, dy = checks.as_array(name, "x", x), checks.as_array(name, "dy", dy)
    group_sizes, expert_start, expert_end = (None if v is None else checks.as_array(name, label, v)
                                             for label, v in (("group_sizes", group_sizes), ("expert_start", expert_start), ("expert_end", expert_end)))  # fmt: skip
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"{name}: x must be [M, K] and dy [M, N] with the same M, got {x.shape} and {dy.shape}")
    if x.dtype != dy.dtype:
        raise ValueError(f"{name}: x and dy must have one dtype, got {x.dtype} and {dy.dtype}")
    start, end, _ = check_operands(name, x, group_sizes, expert_start, expert_end)
    out_dtype = np.dtype(preferred_element_type if preferred_element_type is not None else x.dtype)
    return ops[0](x, dy, start, end, impl=impl, out_dtype=out_dtype.name)
