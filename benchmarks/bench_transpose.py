"""Transpose benchmarks: large batched transposes (expert weights, activations) against jnp.swapaxes."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_tilek.transpose import batched_transpose, transpose

from benchmarks.harness import Case


def _random(shape, dtype):
    import jax

    def make(key):
        return ((jax.random.normal(key, shape, jnp.float32) * 4).astype(dtype),)

    return make


def _case(name, shape, dtype, columns=None):
    itemsize = np.dtype(dtype).itemsize
    width = shape[-1] if columns is None else columns[1] - columns[0]
    moved = 2 * int(np.prod(shape[:-1])) * width * itemsize

    def xla(x):
        start, stop = columns or (0, x.shape[-1])
        return jnp.swapaxes(x[..., start:stop], -1, -2)

    return Case(
        family="transpose",
        name=name,
        make_inputs=_random(shape, dtype),
        kernel=lambda x: batched_transpose(x, columns=columns, impl="tilelang")
        if len(shape) == 3
        else transpose(x, columns=columns, impl="tilelang"),
        xla=xla,
        min_bytes=moved,
        params={"shape": "x".join(map(str, shape)), "dtype": np.dtype(dtype).name},
    )


CASES = [
    _case("batched", (8, 4096, 7168), ml_dtypes.bfloat16),
    _case("batched", (8, 4096, 7168), ml_dtypes.float8_e4m3fn),
    _case("batched", (4, 4096, 4096), np.float32),
    _case("2d", (16384, 7168), ml_dtypes.bfloat16),
    _case("2d_window", (8192, 14336), ml_dtypes.bfloat16, columns=(0, 7168)),
    _case("batched_small", (2, 2048, 2048), ml_dtypes.bfloat16),
    _case("batched_many", (131072, 64, 128), ml_dtypes.bfloat16),  # B beyond grid z: the flat grid
]


def _tiles(shape, dtype, tile_m, tile_n, threads=None, group_m=0, cache_hints=False):
    """The kernel with fixed tile sizes, to compare tilings."""
    import jax
    import jax_tilek
    from jax_tilek.transpose.batched_transpose import batched_transpose_kernel, threads_for

    esize = np.dtype(dtype).itemsize
    per_word = 4 // esize
    threads = threads or threads_for(esize, tile_m, tile_n)

    def kernel(x):
        b, m, n = x.shape
        return jax_tilek.tilelang_call(
            batched_transpose_kernel, x,
            out_shape=jax.ShapeDtypeStruct((b, n, m), x.dtype),
            params=dict(esize=esize, tile_m=tile_m, tile_n=tile_n, threads=threads, group_m=group_m, cache_hints=cache_hints),
            views={"x": jax_tilek.View((b, m, n // per_word), dtype=np.uint32), "y": jax_tilek.View((b, n, m // per_word), dtype=np.uint32)},
        )  # fmt: skip

    case = _case(f"t{tile_m}x{tile_n}/{threads}" + (f"/g{group_m}" if group_m else "") + ("/hints" if cache_hints else ""), shape, dtype)
    case.kernel = kernel
    return case


_BIG = {
    "bfloat16": ((8, 4096, 7168), ml_dtypes.bfloat16),
    "float8_e4m3fn": ((8, 4096, 7168), ml_dtypes.float8_e4m3fn),
    "float32": ((4, 4096, 4096), np.float32),
}
VARIANTS = [
    _tiles(*_BIG[dtype], *config)
    for dtype, configs in {
        "bfloat16": [
            (128, 128, None, 0, True), (256, 128, None, 0, True), (128, 256, None, 0, True), (128, 256), (256, 256, 512),
            (128, 128, None, 1),  # the flat grid that large B or M take, against the default 3-D grid
        ],
        "float8_e4m3fn": [(128, 128, None, 0, True), (256, 256, None, 0, True)],
        "float32": [(128, 128, None, 0, True), (128, 64, None, 0, True), (64, 128, None, 0, True)],
    }.items()
    for config in configs
]
