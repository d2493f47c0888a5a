"""Users' own TileLang kernels, as a user of jax_tilek.tilelang_call would write them."""

import jax_tilek


@jax_tilek.kernel
def scale_rows(n_cols: int, dtype: str, block_m: int = 4):
    """y[i, :] = x[i, :] * s[i] for a dynamic number of rows."""
    import tilelang.language as T

    M = T.dynamic("M")

    @T.prim_func
    def main(x: T.Tensor((M, n_cols), dtype), s: T.Tensor((M,), "float32"), y: T.Tensor((M, n_cols), dtype)):
        with T.Kernel(T.ceildiv(M, block_m), threads=128) as (bx,):
            for i, j in T.Parallel(block_m, n_cols):
                if bx * block_m + i < M:
                    y[bx * block_m + i, j] = T.cast(T.cast(x[bx * block_m + i, j], "float32") * s[bx * block_m + i], dtype)

    return main


@jax_tilek.kernel
def gemm(n: int, k: int, block_m: int = 128, block_n: int = 128, block_k: int = 64, stages: int = 3):
    """C[m, n] = A[m, k] @ B[k, n] in bf16 with fp32 accumulation; m is dynamic.

    On sm_90a TileLang lowers this to TMA loads, wgmma and a warp-specialized producer/consumer split
    with ~96 KB of dynamic shared memory.
    """
    import tilelang.language as T

    M = T.dynamic("m")

    @T.prim_func
    def main(A: T.Tensor((M, k), "bfloat16"), B: T.Tensor((k, n), "bfloat16"), C: T.Tensor((M, n), "bfloat16")):
        with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(M, block_m), threads=256) as (bx, by):
            A_s = T.alloc_shared((block_m, block_k), "bfloat16")
            B_s = T.alloc_shared((block_k, block_n), "bfloat16")
            C_l = T.alloc_fragment((block_m, block_n), "float32")
            T.clear(C_l)
            for kk in T.Pipelined(T.ceildiv(k, block_k), num_stages=stages):
                T.copy(A[by * block_m, kk * block_k], A_s)
                T.copy(B[kk * block_k, bx * block_n], B_s)
                T.gemm(A_s, B_s, C_l)
            T.copy(C_l, C[by * block_m, bx * block_n])

    return main


@jax_tilek.kernel
def axpy_then_square(n: int):
    """Two device kernels in one TileLang function: y = alpha * x (x strided), then z = y * y + 1."""
    import tilelang.language as T

    M, S = T.dynamic("m, s")

    @T.prim_func
    def main(
        x: T.StridedTensor((M, n), (S, 1), "float32"),
        y: T.Tensor((M, n), "float32"),
        z: T.Tensor((M, n), "float32"),
        alpha: T.float32,
    ):
        with T.Kernel(M, threads=128) as bx:
            for j in T.Parallel(n):
                y[bx, j] = x[bx, j] * alpha
        with T.Kernel(M, threads=128) as bx:
            for j in T.Parallel(n):
                z[bx, j] = y[bx, j] * y[bx, j] + 1.0

    return main


@jax_tilek.kernel
def scale_rows_maybe(n_cols: int, dtype: str, has_scale: bool, block_m: int = 4):
    """y[i, :] = x[i, :] * s[i] (or x[i, :] without a scale); ``block_m`` rows per CTA."""
    import tilelang.language as T

    M, S = T.dynamic("M, S")

    @T.prim_func
    def main(x: T.Tensor((M, n_cols), dtype), s: T.Tensor((S,), "float32"), y: T.Tensor((M, n_cols), dtype)):
        with T.Kernel(T.ceildiv(M, block_m), threads=128) as (bx,):
            for i, j in T.Parallel(block_m, n_cols):
                if bx * block_m + i < M:
                    if has_scale:
                        y[bx * block_m + i, j] = T.cast(T.cast(x[bx * block_m + i, j], "float32") * s[bx * block_m + i], dtype)
                    else:
                        y[bx * block_m + i, j] = x[bx * block_m + i, j]

    return main
