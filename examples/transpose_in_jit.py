"""Batched transpose inside jit, with grad and vmap; the TileLang kernel on Hopper/Blackwell GPUs,
the pure-JAX reference elsewhere (run it anywhere: `python examples/transpose_in_jit.py`)."""

import jax
import jax.numpy as jnp

import jax_tilek
from jax_tilek.transpose import batched_transpose, transpose


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (4, 256, 512), jnp.bfloat16)

    y = jax.jit(batched_transpose)(x)  # [4, 512, 256]
    assert (y == jnp.swapaxes(x, 1, 2)).all()

    # Transpose a column window of wider rows without materialising the slice.
    w = jax.jit(lambda x: batched_transpose(x, columns=(128, 384)))(x)  # [4, 256, 256]
    assert (w == jnp.swapaxes(x[..., 128:384], 1, 2)).all()

    # Gradients (custom VJP: the backward pass is a transpose) and vmap (folded into the batch).
    g = jax.grad(lambda x: jnp.sum(batched_transpose(x).astype(jnp.float32) ** 2))(x)
    v = jax.vmap(transpose)(x)
    print("kernel" if jax_tilek.kernels_available() else "reference", y.shape, w.shape, g.dtype, v.shape)


if __name__ == "__main__":
    main()
