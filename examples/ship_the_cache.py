"""Compile on a build machine, ship the cache (or an exported program) to GPU machines.

Build machine (TileLang + nvcc, no GPU needed):
    JAX_TILEK_CACHE_DIR=./kernels python examples/ship_the_cache.py build
GPU machine (no TileLang; kernels come from the shipped directory):
    JAX_TILEK_CACHE_DIR=./kernels python examples/ship_the_cache.py run
"""

import sys

import jax
import jax.numpy as jnp

import jax_tilek
from jax_tilek.transpose import batched_transpose


def step(x):
    return batched_transpose(x).astype(jnp.float32).sum(axis=-1)


EXAMPLE = jax.ShapeDtypeStruct((8, 1024, 2048), jnp.bfloat16)


def main(mode: str) -> None:
    if mode == "build":
        for kernel, params, arch, key in jax_tilek.precompile(step, EXAMPLE, arch="sm_90a"):
            print(f"compiled {kernel} {params} for {arch} -> {key[:12]}")
        exported = jax_tilek.export(step, EXAMPLE, arch="sm_90a")
        with open("step.jaxexport", "wb") as f:
            f.write(exported.serialize())  # carries its cubins: runs with no cache at all
    else:
        x = jax.random.normal(jax.random.key(0), EXAMPLE.shape, EXAMPLE.dtype)
        print(jax.jit(step)(x).shape)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
