"""Batched transpose: ``x[B, M, N] -> [B, N, M]``, also of a column window of wider rows.

Semantics follow TileKernels' ``batched_transpose``: M and N are multiples of 64, any 1-, 2- or 4-byte
dtype, rows may be strided (here: a window ``columns=(start, stop)`` of the last axis, read in place,
with no slice materialised). Sub-byte dtypes (``int4``, ``uint4``, ``int2``, ``uint2``,
``float4_e2m1fn``), which XLA stores packed, are rejected.

Grid: ``(N tiles, M tiles, B)`` when M tiles and B fit CUDA's 65,535 limit on grid y and z; otherwise
one flat grid of every tile (the kernel's ``group_m=1`` order), so any batch and row count is covered.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure, so they must be evaluated when the kernel is built.)
"""


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, ShardingRule, Static, TileOp, View, check_impl, config_class, uses, with_vjp
from jax_tilek.spec import GRID_LIMITS, bits_of
from jax_tilek.testing import ArgSpec

ALIGN = 64  # M and N must be multiples of this

# 16-byte global accesses the compiler cannot split (nvcc splits uint4 stores from 4-byte-aligned
# arrays), with optional cache-policy hints: streaming stores, loads that skip L1 and prefetch 256 B.
def _access_prelude(cache_hints: bool) -> str:
    store, load = (".cs", ".L1::no_allocate.L2::256B") if cache_hints else ("", "")
    return device.prelude(device.store16(store), device.copy16_to_shared(load))


@kernel
def batched_transpose_kernel(
    esize: int, tile_m: int, tile_n: int, threads: int = 256, group_m: int = 0, cache_hints: bool = False
):
    """Transposes ``esize``-byte elements, seen as 32-bit words, one ``tile_m x tile_n`` tile per CTA.

    x is ``[B, M, N]`` and y ``[B, N * per_word, M / per_word]`` in words (``per_word = 4 / esize``
    elements each). A CTA loads its tile with 16-byte vectors into shared memory, whose 16-byte
    chunks are XOR-swizzled by row group so that the column reads that follow are free of bank
    conflicts. Each thread then reads one word per row for ``4 * per_word`` rows, regroups the
    elements with ``__byte_perm`` into ``per_word`` output rows, and stores each as a 16-byte vector.
    ``group_m > 0`` orders the CTAs in groups of ``group_m`` consecutive M tiles per N tile (M must be
    a multiple of ``group_m * tile_m``), so neighbouring CTAs also write neighbouring output bytes.
    ``cache_hints`` streams the stores (``.cs``) and loads past L1 with 256-byte L2 prefetches.

    Index arithmetic: TileLang computes addresses in 64 bits; the 32-bit values left (tile indices,
    the tiles per matrix, the bound check of a store) stay below 2^31 for extents below 2^31 and fewer
    than 2^31 tiles in all, which the op checks at trace time.
    """
    import tilelang.language as T

    per_word = 4 // esize  # elements per 32-bit word
    span = 4 * per_word  # tile rows that make one 16-byte chunk of an output row
    tile_nw = tile_n // per_word  # words per tile row
    chunks_n = tile_nw // 4  # 16-byte chunks per tile row
    chunks_m = tile_m // span  # 16-byte chunks per output row
    rows_per_pass = threads // chunks_n
    gather_c = min(chunks_m, 8)  # a warp covers gather_c chunks along M ...
    gather_r = 32 // gather_c  # ... of gather_r word columns
    warps = threads // 32
    passes = (tile_nw // gather_r) * (chunks_m // gather_c) // warps
    assert rows_per_pass >= 1 and tile_m % rows_per_pass == 0 and passes >= 1, (esize, tile_m, tile_n, threads)
    B, M, N, S = T.dynamic("B, M, N, S")  # M in rows; N and the row stride S in words

    def regroup(w, j, q):
        """Word q of output row j: element j of the words of ``per_word`` consecutive rows."""
        if per_word == 1:
            return w[q]
        if per_word == 2:
            select = T.if_then_else(j == 0, T.uint32(0x5410), T.uint32(0x7632))
            return T.call_extern("uint32", "__byte_perm", w[2 * q], w[2 * q + 1], select)
        select = T.Cast("uint32", j | ((j + 4) << 4))
        lo = T.call_extern("uint32", "__byte_perm", w[4 * q], w[4 * q + 1], select)
        hi = T.call_extern("uint32", "__byte_perm", w[4 * q + 2], w[4 * q + 3], select)
        return T.call_extern("uint32", "__byte_perm", lo, hi, T.uint32(0x5410))

    @T.prim_func
    def batched_transpose(
        x: T.StridedTensor((B, M, N), (M * S, S, 1), "uint32"),
        y: T.Tensor((B, N * per_word, M // per_word), "uint32"),
    ):
        grid = (B * (M // tile_m) * (N // tile_nw),) if group_m else (N // tile_nw, M // tile_m, B)
        with T.Kernel(*grid, threads=threads, prelude=_access_prelude(cache_hints)) as blocks:
            if group_m:
                tiles = (M // tile_m) * (N // tile_nw)
                b = blocks // tiles
                in_group = blocks % tiles % (group_m * (N // tile_nw))
                bm = blocks % tiles // (group_m * (N // tile_nw)) * group_m + in_group % group_m
                bn = in_group // group_m
            else:
                bn, bm, b = blocks
            T.assume(S % 4 == 0)
            T.assume(M % tile_m == 0)
            T.assume(N % tile_nw == 0)
            tile = T.alloc_shared((tile_m, tile_nw), "uint32")
            w = T.alloc_local((span,), "uint32")
            out = T.alloc_local((4,), "uint32")
            t = T.get_thread_binding(0)
            chunk = t % chunks_n
            for k in T.unroll(tile_m // rows_per_pass):
                m = k * rows_per_pass + t // chunks_n
                if cache_hints:
                    T.evaluate(T.call_extern(
                        "handle", "tilek_copy16_to_shared",
                        T.address_of(tile[m, (chunk ^ (m // span % chunks_n)) * 4]),
                        T.address_of(x[b, bm * tile_m + m, bn * tile_nw + chunk * 4]),
                    ))  # fmt: skip
                else:
                    for v in T.vectorized(4):
                        tile[m, (chunk ^ (m // span % chunks_n)) * 4 + v] = x[b, bm * tile_m + m, bn * tile_nw + chunk * 4 + v]
            T.sync_threads()
            warp = t // 32
            c = t % 32 % gather_c
            r = t % 32 // gather_c
            for k in T.unroll(passes):
                block = k * warps + warp
                nw = block % (tile_nw // gather_r) * gather_r + r
                cm = block // (tile_nw // gather_r) * gather_c + c
                for v in T.unroll(span):
                    m = cm * span + v
                    w[v] = tile[m, (nw // 4 ^ (m // span % chunks_n)) * 4 + nw % 4]
                for j in T.unroll(per_word):
                    for q in T.unroll(4):
                        out[q] = regroup(w, j, q)
                    row = (bn * tile_nw + nw) * per_word + j
                    column = bm * (tile_m // per_word) + cm * 4
                    T.evaluate(T.call_extern("handle", "tilek_store16", T.address_of(y[b, row, column]), out[0], out[1], out[2], out[3]))

    return batched_transpose


def threads_for(esize: int, tile_m: int, tile_n: int) -> int:
    """256 threads, or fewer when a tile has less work: each thread stores 4 / esize 16-byte rows."""
    return min(256, tile_m * tile_n * esize // (16 * (4 // esize)))


def _window(x: jax.Array, columns: tuple[int, int] | None) -> tuple[int, int]:
    return (0, x.shape[-1]) if columns is None else (int(columns[0]), int(columns[1]))


def _columns(columns, name: str) -> tuple[int, int] | None:
    """The ``columns`` option as None or a pair of Python ints (TypeError naming the op otherwise)."""
    if columns is None:
        return None
    if isinstance(columns, (str, bytes)) or not hasattr(columns, "__len__") or len(columns) != 2:
        raise TypeError(f"{name}: columns must be None or a pair (start, stop), got {columns!r}")
    return tuple(checks.static_int(name, "columns", c) for c in columns)


def _tiles(m: int, n: int) -> tuple[int, int]:
    """The CTA tile ``(tile_m, tile_n)``: 128 along an axis it divides, else 64."""
    return (128 if m % 128 == 0 else 64), (128 if n % 128 == 0 else 64)


def _grid(b: int, m: int, n: int) -> tuple[int, bool]:
    """(CTAs, whether they form one flat grid): the 3-D grid (N tiles, M tiles, B) while M tiles and B
    fit grid y and z, else a flat grid of every tile."""
    tile_m, tile_n = _tiles(m, n)
    ctas = b * (m // tile_m) * (n // tile_n)
    return ctas, b > GRID_LIMITS[2] or m // tile_m > GRID_LIMITS[1]


def _reference(x: jax.Array, *, columns: tuple[int, int] | None = None) -> jax.Array:
    start, stop = _window(x, columns)
    return jnp.swapaxes(x[..., start:stop], -1, -2)


def _check(x: jax.Array, *, columns: tuple[int, int] | None = None) -> None:
    if x.ndim != 3:
        raise ValueError(f"batched_transpose: x must be [B, M, N], got shape {x.shape}")
    bits = bits_of(x.dtype)
    if bits < 8:
        raise ValueError(
            f"batched_transpose: x's dtype must be 1, 2 or 4 bytes wide, got {x.dtype}, which XLA stores packed "
            f"({bits} bits per element); transpose its bytes instead, e.g. as uint8"
        )
    if bits not in (8, 16, 32):
        raise ValueError(f"batched_transpose: x's dtype must be 1, 2 or 4 bytes wide, got {x.dtype}")
    itemsize = bits // 8
    columns = _columns(columns, "batched_transpose")
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


def _kernel_check(x: jax.Array, *, columns: tuple[int, int] | None = None) -> None:
    """The flat grid covers every tile while there are fewer than 2^31 (x of 2^43 or more elements)."""
    start, stop = _window(x, columns)
    ctas, _ = _grid(x.shape[0], x.shape[1], stop - start)
    if ctas > GRID_LIMITS[0]:
        raise ValueError(
            f"batched_transpose: x {list(x.shape)} has {ctas} tiles to transpose, more than the kernel's grid "
            f"takes ({GRID_LIMITS[0]})"
        )


@dataclasses.dataclass(frozen=True)
class TransposeConfig:
    """The kernel's tiling: ``tile_m x tile_n`` elements per CTA (each a multiple of 64 dividing M and
    the window width), ``threads`` per CTA (None: :func:`threads_for`), ``group_m`` consecutive M
    tiles per N tile in the CTA order (0: the 3-D grid; shapes beyond grid y or z always take the
    flat order, 1), ``cache_hints`` for streaming stores and L2-prefetching loads."""

    tile_m: int
    tile_n: int
    threads: int | None = None
    group_m: int = 0
    cache_hints: bool = False


@config_class(TransposeConfig)
def _config(x, *, columns: tuple[int, int] | None = None) -> TransposeConfig:
    """128-element tiles along the axes 128 divides (64 elsewhere), the 3-D grid, no cache hints."""
    start, stop = _window(x, columns)
    return TransposeConfig(*_tiles(x.shape[1], stop - start))


def _launch(x, *, config: TransposeConfig, columns: tuple[int, int] | None = None) -> Launch:
    b, m, s = x.shape
    start, stop = _window(x, columns)
    n = stop - start
    esize = np.dtype(x.dtype).itemsize
    per_word = 4 // esize  # the kernel sees every dtype as 32-bit words
    tile_m, tile_n = config.tile_m, config.tile_n
    if m % tile_m or n % tile_n:
        raise ValueError(f"the tile {tile_m}x{tile_n} does not divide the {m}x{n} matrices")
    _, flat = _grid(b, m, n)
    group_m = 1 if flat else config.group_m
    threads = config.threads or threads_for(esize, tile_m, tile_n)
    params = dict(esize=esize, tile_m=tile_m, tile_n=tile_n, threads=threads)
    params.update({"group_m": group_m} if group_m else {}, **({"cache_hints": True} if config.cache_hints else {}))
    return Launch(
        kernel=batched_transpose_kernel,
        params=params,
        views={
            "x": View((b, m, n // per_word), (m * s // per_word, s // per_word, 1), start // per_word, np.uint32),
            "y": View((b, n, m // per_word), dtype=np.uint32),
        },
    )


def _sharding(x, *, columns=None) -> ShardingRule:
    """Every axis may stay sharded; a column window has global offsets, so then its axis may not."""
    if columns is None:
        return ShardingRule("b m n -> b n m")
    return ShardingRule("b m s -> b n m", replicated=("s", "n"))


_batched_transpose_op = TileOp(
    name="batched_transpose", launch=_launch, operands=("x",), results=("y",), reference=_reference, check=_check,
    config=_config, rows=Rows(("x",), ("y",)), sharding=_sharding, kernel_check=_kernel_check,
)  # fmt: skip


def _primal(x, *, ops, impl=None, columns=None):
    return ops[0](x, impl=impl, columns=columns)


def _fwd(x, *, ops, impl=None, columns=None):
    return _primal(x, ops=ops, impl=impl, columns=columns), Static((x.shape[-1], x.dtype))


def _bwd(residuals, g, *, ops, impl=None, columns=None):
    width, dtype = residuals.value
    start, stop = (0, width) if columns is None else columns
    dx = _primal(g, ops=ops, impl=impl)
    return (jnp.pad(dx, ((0, 0), (0, 0), (start, width - stop))).astype(dtype),)


_differentiable = with_vjp(_primal, _fwd, _bwd)


def _matrices(*shape: int, dtype=jnp.bfloat16) -> tuple[jax.ShapeDtypeStruct]:
    return (jax.ShapeDtypeStruct(shape, dtype),)


def _case(prefix: str, shape: tuple[int, ...], dtype, columns=None, **options) -> ArgSpec:
    name = f"{prefix}_{np.dtype(dtype).name}_{'x'.join(map(str, shape))}" + (f"_cols{columns[0]}-{columns[1]}" if columns else "")
    return ArgSpec(name, (jax.ShapeDtypeStruct(shape, dtype),), dict(columns=columns), **options)


# Named calls: tiles of 64 and 128 on both axes, column windows of strided rows, one and zero
# batches; the flat grid of batches and row counts beyond grid z and y; grouped CTA orders; the
# benchmarks' sizes.
ARG_SPECS = (
    *(
        _case("small", shape, dtype, columns)
        for dtype in (jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32)
        for shape, columns in (
            ((1, 64, 64), None), ((3, 128, 192), None), ((2, 192, 128), None), ((2, 320, 448), None),
            ((2, 128, 384), (128, 320)), ((1, 256, 512), (64, 448)), ((0, 64, 128), None), ((8, 64, 128), None),
        )  # fmt: skip
    ),
    _case("flat", (70000, 64, 64), jnp.float32, bench=True),
    _case("flat", (1, 65537 * 64, 64), jnp.float8_e4m3fn, bench=True),
    _case("flat", (1, 65537 * 64, 128), jnp.uint8, (64, 128), bench=True),
    *(
        _case(f"grouped{group_m}", (3, 1024, 384), dtype, config=dict(group_m=group_m))
        for dtype, group_m in ((jnp.bfloat16, 4), (jnp.float8_e4m3fn, 8), (jnp.float32, 2), (jnp.bfloat16, 1))
    ),
    _case("bench", (8, 4096, 7168), jnp.bfloat16, bench=True),
    _case("bench", (8, 4096, 7168), jnp.float8_e4m3fn, bench=True),
    _case("bench", (4, 4096, 4096), jnp.float32, bench=True),
    _case("bench", (2, 2048, 2048), jnp.bfloat16, bench=True),
    _case("bench", (131072, 64, 128), jnp.bfloat16, bench=True),
    _case("bench", (1, 8192, 14336), jnp.bfloat16, (0, 7168), bench=True),
    *(
        _case(f"bench_t{tm}x{tn}" + (f"_{threads}" if threads else "") + (f"_g{group}" if group else "") + ("_hints" if hints else ""),
              shape, dtype, bench=True, config=dict(tile_m=tm, tile_n=tn, threads=threads, group_m=group, cache_hints=hints))  # fmt: skip
        for (shape, dtype), variants in (
            (((8, 4096, 7168), jnp.bfloat16), [(128, 128, None, 0, True), (256, 128, None, 0, True), (128, 256, None, 0, True),
                                              (128, 256, None, 0, False), (256, 256, 512, 0, False), (128, 128, None, 1, False)]),
            (((8, 4096, 7168), jnp.float8_e4m3fn), [(128, 128, None, 0, True), (256, 256, None, 0, True)]),
            (((4, 4096, 4096), jnp.float32), [(128, 128, None, 0, True), (128, 64, None, 0, True), (64, 128, None, 0, True)]),
        )  # fmt: skip
        for tm, tn, threads, group, hints in variants
    ),
)


@uses(_batched_transpose_op, cases=ARG_SPECS, differentiable=True)
def batched_transpose(x: jax.Array, *, columns: tuple[int, int] | None = None, impl=None, ops) -> jax.Array:
    """Transposes the last two axes: ``x[B, M, N] -> [B, N, M]``.

    Args:
      x: ``[B, M, S]``, any 1-, 2- or 4-byte dtype (not the packed sub-byte ones). M and the window
        width are multiples of 64; any B.
      columns: ``(start, stop)`` integers, transpose only ``x[..., start:stop]`` (read in place;
        ``start`` and ``S`` are multiples of 16 bytes). Default: all of the last axis.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``[B, stop - start, M]``, bit-exact with ``jnp.swapaxes``. Differentiable (the VJP is a transpose).
    """
    check_impl(impl, "batched_transpose")
    x = checks.as_array("batched_transpose", "x", x)
    return _differentiable(x, columns=_columns(columns, "batched_transpose"), impl=impl, ops=ops)


MATRIX_SPECS = (
    ArgSpec("matrix_bfloat16_192x320", (jax.ShapeDtypeStruct((192, 320), jnp.bfloat16),)),
    ArgSpec("matrix_window_float32_128x384", (jax.ShapeDtypeStruct((128, 384), jnp.float32),), dict(columns=(128, 320))),
    ArgSpec("bench_matrix_bfloat16_16384x7168", (jax.ShapeDtypeStruct((16384, 7168), jnp.bfloat16),), bench=True),
)


@uses(_batched_transpose_op, cases=MATRIX_SPECS, differentiable=True)
def transpose(x: jax.Array, *, columns: tuple[int, int] | None = None, impl=None, ops) -> jax.Array:
    """Transposes a matrix: ``x[M, N] -> [N, M]``; see :func:`batched_transpose` for the rules."""
    check_impl(impl, "transpose")
    x = checks.as_array("transpose", "x", x)
    if x.ndim != 2:
        raise ValueError(f"transpose: x must be [M, N], got shape {x.shape}")
    columns = _columns(columns, "transpose")
    try:
        return _differentiable(x[None], columns=columns, impl=impl, ops=ops)[0]
    except (TypeError, ValueError) as e:  # the rules are batched_transpose's; the error names this op
        prefix, message = "batched_transpose: ", str(e).split("\n--------------------\n")[0]  # without JAX's note
        if type(e) in (TypeError, ValueError) and message.startswith(prefix):
            raise type(e)("transpose: " + message[len(prefix) :]) from None
        raise
