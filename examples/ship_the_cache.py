"""Compile on a build machine, ship the kernel cache and an exported program to GPU machines.

Build machine (TileLang + nvcc, no GPU needed):
    python examples/ship_the_cache.py build [DIR]   # writes DIR/kernels/ (the cache), DIR/step.jaxexport
Copy DIR to the GPU machine (no TileLang needed there), then:
    python examples/ship_the_cache.py run [DIR]     # runs from DIR/kernels/, then loads and runs the export

DIR defaults to ./.tilek_ship (git-ignored in this repository). The program is exported for "cuda" and
"cpu", so `run` works on a CPU too, where both take the pure-JAX reference.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_tilek
from jax_tilek.transpose import batched_transpose


def step(x):
    return batched_transpose(x).astype(jnp.float32).sum(axis=-1)


EXAMPLE = jax.ShapeDtypeStruct((8, 1024, 2048), jnp.bfloat16)
ARCH = "sm_90a"  # H100/H200; sm_100a for B200


def build(out: str) -> None:
    with jax_tilek.use_cache_dir(os.path.join(out, "kernels")):
        for kernel, params, arch, key in jax_tilek.precompile(step, EXAMPLE, arch=ARCH):
            print(f"compiled {kernel} {params} for {arch} -> {key[:12]}")
        # Carries its cubins: runs with no cache at all (import jax_tilek first, for the launcher).
        exported = jax_tilek.export(step, EXAMPLE, arch=ARCH, platforms=("cuda", "cpu"))
    with open(os.path.join(out, "step.jaxexport"), "wb") as f:
        f.write(exported.serialize())
    print(f"wrote {out}/kernels and {out}/step.jaxexport")


def run(out: str) -> None:
    x = jax.random.normal(jax.random.key(0), EXAMPLE.shape, EXAMPLE.dtype)
    # 1. From the shipped cache: never compiles; a kernel missing from it is an error naming it.
    with jax_tilek.use_cache_dir(os.path.join(out, "kernels")), jax_tilek.offline_mode():
        y = jax.jit(step)(x)
    # 2. The exported program: needs neither TileLang nor the cache.
    with open(os.path.join(out, "step.jaxexport"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    backend = jax.default_backend()
    if backend == "gpu" and not jax_tilek.kernels_available():
        print(f"the exported program carries {ARCH} kernels; this GPU cannot run them")
        return
    z = exported.call(x)
    np.testing.assert_allclose(np.asarray(z), np.asarray(y), rtol=1e-6)
    print("kernel" if backend == "gpu" else "reference", "path:", y.shape, "exported program agrees")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "run"
    directory = sys.argv[2] if len(sys.argv) > 2 else ".tilek_ship"
    os.makedirs(directory, exist_ok=True)
    build(directory) if mode == "build" else run(directory)
