"""Row segments of a grouped matmul, shared by its ops: group sizes as segments, the kernels' M-tile
table (computed on the device, no host sync), and the row order the ``ragged_dot`` references use.

A segment ``g`` is the rows ``[start[g], end[g])`` of ``x`` that multiply ``w[g]``. Segments must be
disjoint (what the kernels write where they overlap is unspecified); they need not be sorted, aligned or
cover every row: rows outside every segment give zero output and get zero gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK_M = 128  # rows per M-tile of the forward / dx kernel (the tile table is built for it)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def segments_of_sizes(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.ragged_dot``'s groups as segments: group g takes the next ``group_sizes[g]`` rows,
    clipped to the ``m`` rows there are (negative sizes count as 0)."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    end = jnp.cumsum(sizes, dtype=jnp.int32)
    return jnp.minimum(end - sizes, m), jnp.minimum(end, m)


def clamp_segments(start: jax.Array, end: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Segments clipped to ``[0, m)``; an inverted segment becomes empty."""
    s = jnp.clip(start.astype(jnp.int32), 0, m)
    return s, jnp.clip(end.astype(jnp.int32), s, m)


def max_tiles(m: int, groups: int, block_m: int = BLOCK_M) -> int:
    """The static length of the tile table: ``ceil(m / block_m)`` full tiles plus one partial tile for
    each of the ``2·G + 1`` intervals (G segments and the gaps around them); none for no rows (the
    kernel's grid is then empty and the launcher only zero-fills)."""
    return ceil_div(m, block_m) + 2 * groups + 1 if m else 0


def tile_table(start: jax.Array, end: jax.Array, m: int, block_m: int = BLOCK_M) -> jax.Array:
    """int32 ``[max_tiles, 3]``: per M-tile ``(group, row_start, row_end)``.

    Rows ``[0, m)`` are cut into intervals: the (clamped, non-empty) segments in order of their starts
    and the gaps between them; each interval into tiles of at most ``block_m`` rows. A gap's tiles have
    group -1 (the kernel writes zeros to their rows); table rows past the real tile count are
    ``(-1, 0, 0)`` (the kernel's CTA for them does nothing).
    """
    g = start.shape[0]
    s, e = clamp_segments(start, end, m)
    nonempty = e > s
    order = jnp.argsort(jnp.where(nonempty, s, m), stable=True)  # empty segments last, as [0, 0)
    real = nonempty[order]
    s_sorted, e_sorted = jnp.where(real, s[order], 0), jnp.where(real, e[order], 0)
    reached = jax.lax.cummax(e_sorted) if g else e_sorted
    previous = jnp.concatenate([jnp.zeros((1,), jnp.int32), reached[:-1]]) if g else reached
    gap_start = previous
    gap_end = jnp.where(real, jnp.maximum(s_sorted, previous), previous)
    tail = reached[-1] if g else jnp.int32(0)
    # Interleaved: gap 0, segment 0, gap 1, segment 1, ..., the final gap.
    i_start = jnp.concatenate([jnp.stack([gap_start, s_sorted], 1).reshape(-1), tail[None]])
    i_end = jnp.concatenate([jnp.stack([gap_end, e_sorted], 1).reshape(-1), jnp.full((1,), m, jnp.int32)])
    i_group = jnp.concatenate([jnp.stack([jnp.full((g,), -1, jnp.int32), order.astype(jnp.int32)], 1).reshape(-1), jnp.full((1,), -1, jnp.int32)])
    length = jnp.maximum(i_end - i_start, 0)
    tiles = (length + block_m - 1) // block_m
    last = jnp.cumsum(tiles, dtype=jnp.int32)
    t = jnp.arange(max_tiles(m, g, block_m), dtype=jnp.int32)
    which = jnp.minimum(jnp.searchsorted(last, t, side="right"), 2 * g).astype(jnp.int32)
    valid = t < last[-1]
    row0 = i_start[which] + (t - (last[which] - tiles[which])) * block_m
    row1 = jnp.minimum(row0 + block_m, i_end[which])
    return jnp.stack([jnp.where(valid, i_group[which], -1), jnp.where(valid, row0, 0), jnp.where(valid, row1, 0)], 1)


def row_order(start: jax.Array, end: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """``(perm, sizes)``: a stable permutation of the rows that lists segment 0's rows, then segment
    1's, ..., then the rows outside every segment, and each segment's row count; ``x[perm]`` with
    ``sizes`` is a ``ragged_dot`` operand. (A row in several segments is taken as in the one starting
    last at or before it.)"""
    g = start.shape[0]
    s, e = clamp_segments(start, end, m)
    rows = jnp.arange(m, dtype=jnp.int32)
    key = jnp.where(e > s, s, m)
    order = jnp.argsort(key, stable=True)
    k = jnp.searchsorted(key[order], rows, side="right").astype(jnp.int32) - 1
    group = order[jnp.clip(k, 0, max(g - 1, 0))].astype(jnp.int32)
    inside = (k >= 0) & (rows < e[group])
    row_group = jnp.where(inside, group, g)
    perm = jnp.argsort(row_group, stable=True)
    sizes = jnp.zeros((g + 1,), jnp.int32).at[row_group].add(1)[:g]
    return perm, sizes


def tile_store(T, rows: int, cols: int, via_shared: bool):
    """The forward kernels' epilogue, a TileLang macro ``store(out, acc, c_s, r0, r1, c0)``: the rows
    ``r0 + i < r1`` of the fp32 tile ``acc [rows, cols]`` into ``out[r0 + i, c0 + j]``, through the
    shared tile ``c_s`` (16-bit outputs) or from registers (fp32; ``c_s`` None). ``c_s`` is swizzled:
    unswizzled, each stmatrix store's 8 rows, 256 or 512 bytes apart, fall in the same banks (8-way
    conflicts; Nsight Compute of the FP8 kernel, H100 2026-12-07: 26% of its shared-memory wavefronts)."""
    from tilelang.layout import make_swizzled_layout

    @T.macro
    def store(out, acc, c_s, r0, r1, c0):
        if via_shared:
            T.annotate_layout({c_s: make_swizzled_layout(c_s)})
            T.copy(acc, c_s)
            for i, j in T.Parallel(rows, cols):
                if r0 + i < r1:
                    out[r0 + i, c0 + j] = c_s[i, j]
        else:
            for i, j in T.Parallel(rows, cols):
                if r0 + i < r1:
                    out[r0 + i, c0 + j] = acc[i, j]

    return store
