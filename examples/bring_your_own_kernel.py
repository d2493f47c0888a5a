"""Your own TileLang kernel as a JAX function: a row-scaling kernel with a dynamic row count.

On a machine with TileLang this compiles the kernel (no GPU needed to compile); on a GPU it runs it;
with a `reference`, it also runs on CPU. `python examples/bring_your_own_kernel.py`
"""

import jax
import jax.numpy as jnp

import jax_tilek


@jax_tilek.kernel
def scale_rows(n_cols: int, block_m: int = 4):
    import tilelang.language as T

    M = T.dynamic("M")  # one cubin serves every row count

    @T.prim_func
    def main(x: T.Tensor((M, n_cols), "bfloat16"), s: T.Tensor((M,), "float32"), y: T.Tensor((M, n_cols), "bfloat16")):
        with T.Kernel(T.ceildiv(M, block_m), threads=128) as bx:
            for i, j in T.Parallel(block_m, n_cols):
                if bx * block_m + i < M:
                    y[bx * block_m + i, j] = T.cast(T.cast(x[bx * block_m + i, j], "float32") * s[bx * block_m + i], "bfloat16")

    return main


def reference(x, s):
    return (x.astype(jnp.float32) * s[:, None]).astype(x.dtype)


scale = jax_tilek.tilelang_op(
    scale_rows,
    out_shape=lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype),
    params=lambda x, s: dict(n_cols=x.shape[1]),
    reference=reference,
)


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (1000, 512), jnp.bfloat16)
    s = jax.random.uniform(jax.random.key(1), (1000,))
    y = jax.jit(scale)(x, s)
    assert (y == reference(x, s)).all()
    # Inspect the lowering for an H100/H200 on any machine (compiles the cubin when TileLang is here):
    try:
        with jax_tilek.target_arch("sm_90a"):
            text = jax.jit(scale).trace(x, s).lower(lowering_platforms=("cuda",)).as_text()
        print("lowered to", text.count("tilek_launch"), "tilek_launch call(s)")
    except (jax_tilek.CompileError, jax_tilek.KernelNotCompiledError) as e:
        print("no TileLang here and not in the cache:", type(e).__name__)
    print(y.shape, y.dtype)


if __name__ == "__main__":
    main()
