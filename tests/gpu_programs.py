"""Programs that test_gpu_runtime.py runs in fresh processes: ``python gpu_programs.py MODE [ARG]``.

Modes:
  run                 run the program RUNS times, print a JSON line: output digest, and the
                      launcher's execute counts (JAX_TILEK_LAUNCH_STATS=1)
  run-cached DIR      the same, with JAX's persistent compilation cache in DIR; also print the number
                      of cache hits
  exported FILE       deserialize a jax.export artifact and run it; print its output digest
  prepare ARCH        build machine: compile this program and the GPU_PROGRAMS of the test modules
                      (what GPU tests launch beyond the op families' cases) for ARCH, and write the exported
                      program into the kernel cache (the op families' cases: python -m jax_tilek.testing)
"""

from __future__ import annotations

import hashlib
import json
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jax_tilek
from jax_tilek.transpose import batched_transpose

SHAPE = (4, 256, 512)
EXPORT_FILE = "transpose_program.jaxexport"
RUNS = 5
LAUNCHES_PER_RUN = 3
DTYPE = jnp.bfloat16


def program(x):
    y = batched_transpose(x, impl="tilelang")
    y = (y.astype(jnp.float32) * 2 + 1).astype(x.dtype)
    z = batched_transpose(y, impl="tilelang")
    return z, batched_transpose(z, columns=(128, 384), impl="tilelang")


def example_input() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal(SHAPE, np.float32).astype(ml_dtypes.bfloat16)


def expected_output() -> tuple[np.ndarray, np.ndarray]:
    x = example_input()
    z = (np.swapaxes(x, 1, 2).astype(np.float32) * 2 + 1).astype(ml_dtypes.bfloat16)
    z = np.ascontiguousarray(np.swapaxes(z, 1, 2))
    return z, np.ascontiguousarray(np.swapaxes(z[..., 128:384], 1, 2))


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).view(np.uint8).tobytes())
    return h.hexdigest()


def main() -> None:
    mode = sys.argv[1]
    if mode == "prepare":
        return prepare(sys.argv[2])
    x = jnp.asarray(example_input())
    if mode in ("run", "run-cached"):
        hits = []
        if mode == "run-cached":
            from jax._src import monitoring

            monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
            jax.config.update("jax_compilation_cache_dir", sys.argv[2])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        compiled = jax.jit(program).lower(x).compile()
        for _ in range(RUNS):
            out = jax.block_until_ready(compiled(x))
        print(json.dumps({
            "digest": digest(out),
            "expected": digest(expected_output()),
            "launches": RUNS * LAUNCHES_PER_RUN,
            **jax_tilek._ffi.launch_stats(),
            "cache_hits": len(hits),
        }))  # fmt: skip
    elif mode == "exported":
        with open(sys.argv[2], "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        out = jax.block_until_ready(exported.call(x))
        print(json.dumps({"digest": digest(out), "expected": digest(expected_output())}))
    else:
        raise SystemExit(f"unknown mode {mode}")


def modules_with_gpu_programs() -> list:
    """Every test module that defines ``GPU_PROGRAMS``: the (fn, abstract args) its GPU tests launch
    beyond the op families' named cases (imported as pytest would, with its folder on sys.path)."""
    import glob
    import importlib
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    modules = []
    for path in sorted(glob.glob(os.path.join(here, "**", "test_*.py"), recursive=True)):
        with open(path) as f:
            if "\nGPU_PROGRAMS = " not in f.read():
                continue
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            modules.append(importlib.import_module(os.path.basename(path)[:-3]))
        except BaseException as e:  # pytest.importorskip's Skipped: an optional dependency is missing
            if type(e).__name__ != "Skipped":
                raise
            print(f"skipped {os.path.relpath(path, here)}: {e}")
    return modules


def prepare(arch: str) -> None:
    import os

    from jax_tilek import config

    x = jax.ShapeDtypeStruct(SHAPE, DTYPE)
    jax_tilek.precompile(program, x, arch=arch)
    os.makedirs(os.path.join(config.cache_dir(), "exports"), exist_ok=True)
    with open(os.path.join(config.cache_dir(), "exports", EXPORT_FILE), "wb") as f:
        f.write(jax_tilek.export(program, x, arch=arch).serialize())
    programs = [p for module in modules_with_gpu_programs() for p in module.GPU_PROGRAMS]
    for fn, args in programs:
        jax_tilek.precompile(fn, *args, arch=arch)
    print(f"prepared the runtime program, its export and {len(programs)} GPU test programs for {arch}")


if __name__ == "__main__":
    assert jax_tilek  # registers the launcher before anything runs
    main()
