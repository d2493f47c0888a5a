"""Batched transpose: ``x[B, M, N] -> [B, N, M]``, also of a column window of wider rows.

Semantics follow TileKernels' ``batched_transpose``: M and N are multiples of 64, any 1-, 2- or 4-byte
dtype, rows may be strided (here: a window ``columns=(start, stop)`` of the last axis, read in place,
with no slice materialised).

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure, so they must be evaluated when the kernel is built.)
"""


import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Static, TileOp, View, with_vjp

ALIGN = 64  # M and N must be multiples of this


@kernel
def batched_transpose_kernel(dtype: str, tile_m: int, tile_n: int, threads: int = 256, m_fastest: bool = False):
    """One CTA moves a ``tile_m x tile_n`` tile through shared memory with 16-byte accesses.

    Loads are row-vectors of x; stores are row-vectors of y, gathered from a shared-memory column.
    The 16-byte chunks of each shared row are XOR-swizzled by the row's chunk index so both the
    vector stores into shared memory and the column gathers are free of bank conflicts.
    ``m_fastest`` orders the grid so consecutive CTAs take consecutive tiles along M.
    """
    import tilelang.language as T

    vec = 16 // np.dtype(jnp.dtype(dtype)).itemsize  # elements per 16 bytes
    chunks_n, chunks_m = tile_n // vec, tile_m // vec  # 16-byte chunks per tile row / per output row
    rows_per_pass = threads // chunks_n
    gather_c = min(chunks_m, 8)  # lanes of a warp along an output row, and rows per warp:
    gather_r = 32 // gather_c
    passes_out = (tile_n // gather_r) * (chunks_m // gather_c) // (threads // 32)
    assert rows_per_pass >= 1 and tile_m % rows_per_pass == 0 and passes_out >= 1, (tile_m, tile_n, threads)
    B, M, N, S = T.dynamic("B, M, N, S")
    grid = (M // tile_m, N // tile_n, B) if m_fastest else (N // tile_n, M // tile_m, B)

    @T.prim_func
    def batched_transpose(
        x: T.StridedTensor((B, M, N), (M * S, S, 1), dtype),
        y: T.Tensor((B, N, M), dtype),
    ):
        with T.Kernel(*grid, threads=threads) as (g0, g1, b):
            bm, bn = (g0, g1) if m_fastest else (g1, g0)
            T.assume(S % vec == 0)
            T.assume(M % tile_m == 0)
            T.assume(N % tile_n == 0)
            tile = T.alloc_shared((tile_m, tile_n), dtype)
            column = T.alloc_local((vec,), dtype)
            t = T.get_thread_binding(0)
            m0 = bm * tile_m
            n0 = bn * tile_n
            chunk = t % chunks_n
            for k in T.unroll(tile_m // rows_per_pass):
                m = k * rows_per_pass + t // chunks_n
                swizzled = (chunk ^ ((m // vec) % chunks_n)) * vec
                for v in T.vectorized(vec):
                    tile[m, swizzled + v] = x[b, m0 + m, n0 + chunk * vec + v]
            T.sync_threads()
            warp = t // 32
            c = t % 32 % gather_c
            r = t % 32 // gather_c
            for k in T.unroll(passes_out):
                block = k * (threads // 32) + warp
                n = block % (tile_n // gather_r) * gather_r + r
                cm = block // (tile_n // gather_r) * gather_c + c
                for v in T.unroll(vec):
                    m = cm * vec + v
                    column[v] = tile[m, ((n // vec) ^ ((m // vec) % chunks_n)) * vec + n % vec]
                for v in T.vectorized(vec):
                    y[b, n0 + n, m0 + cm * vec + v] = column[v]

    return batched_transpose


def _window(x: jax.Array, columns: tuple[int, int] | None) -> tuple[int, int]:
    return (0, x.shape[-1]) if columns is None else (int(columns[0]), int(columns[1]))


def _reference(x: jax.Array, *, columns: tuple[int, int] | None = None) -> jax.Array:
    start, stop = _window(x, columns)
    return jnp.swapaxes(x[..., start:stop], -1, -2)


def _check(x: jax.Array, *, columns: tuple[int, int] | None = None) -> None:
    if x.ndim != 3:
        raise ValueError(f"batched_transpose: x must be [B, M, N], got shape {x.shape}")
    itemsize = np.dtype(x.dtype).itemsize
    if itemsize not in (1, 2, 4):
        raise ValueError(f"batched_transpose: x's dtype must be 1, 2 or 4 bytes wide, got {x.dtype}")
    start, stop = _window(x, columns)
    if not 0 <= start < stop <= x.shape[-1]:
        raise ValueError(f"batched_transpose: columns={columns} is not a window of x's last axis ({x.shape[-1]})")
    m, n = x.shape[1], stop - start
    if m % ALIGN or n % ALIGN:
        raise ValueError(f"batched_transpose: M and N must be multiples of {ALIGN}, got M={m}, N={n}")
    vec = 16 // itemsize
    if start % vec or x.shape[-1] % vec:
        raise ValueError(
            f"batched_transpose: rows must stay 16-byte aligned: columns start ({start}) and the row "
            f"length ({x.shape[-1]}) must be multiples of {vec} for {x.dtype}"
        )


def _launch(x, *, columns: tuple[int, int] | None = None) -> Launch:
    b, m, s = x.shape
    start, stop = _window(x, columns)
    n = stop - start
    return Launch(
        kernel=batched_transpose_kernel,
        params=dict(
            dtype=np.dtype(x.dtype).name,
            tile_m=128 if m % 128 == 0 else 64,
            tile_n=128 if n % 128 == 0 else 64,
        ),
        views={"x": View(shape=(b, m, n), strides=(m * s, s, 1), offset=start)},
    )


def _batch(args, dims, *, impl, columns=None):
    """vmap folds the mapped axis into B: [V, B, M, S] -> [V*B, M, S]."""
    (x,), (d,) = args, dims
    x = jnp.moveaxis(x, d, 0)
    v, b = x.shape[:2]
    y = _batched_transpose_op(x.reshape(v * b, *x.shape[2:]), impl=impl, columns=columns)
    return [y.reshape(v, b, *y.shape[1:])], [0]


_batched_transpose_op = TileOp(
    name="batched_transpose", launch=_launch, reference=_reference, check=_check, batch=_batch
)


def _primal(x, *, impl=None, columns=None):
    return _batched_transpose_op(x, impl=impl, columns=columns)


def _fwd(x, *, impl=None, columns=None):
    return _primal(x, impl=impl, columns=columns), Static((x.shape[-1], x.dtype))


def _bwd(residuals, g, *, impl=None, columns=None):
    width, dtype = residuals.value
    start, stop = (0, width) if columns is None else columns
    dx = _primal(g, impl=impl)
    return (jnp.pad(dx, ((0, 0), (0, 0), (start, width - stop))).astype(dtype),)


batched_transpose = with_vjp(_primal, _fwd, _bwd)
batched_transpose.__doc__ = """Transposes the last two axes: ``x[B, M, N] -> [B, N, M]``.

Args:
  x: ``[B, M, S]``, any 1-, 2- or 4-byte dtype. M and the window width are multiples of 64.
  columns: ``(start, stop)``, transpose only ``x[..., start:stop]`` (read in place; ``start`` and
    ``S`` are multiples of 16 bytes). Default: all of the last axis.
  impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

Returns:
  ``[B, stop - start, M]``, bit-exact with ``jnp.swapaxes``. Differentiable (the VJP is a transpose).
"""


def transpose(x: jax.Array, *, columns: tuple[int, int] | None = None, impl=None) -> jax.Array:
    """Transposes a matrix: ``x[M, N] -> [N, M]``; see :func:`batched_transpose` for the rules."""
    if x.ndim != 2:
        raise ValueError(f"transpose: x must be [M, N], got shape {x.shape}")
    return batched_transpose(x[None], columns=columns, impl=impl)[0]
