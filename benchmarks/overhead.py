"""Launch overhead: a chain of 100 tiny kernel calls inside one jit, per call, beside a chain of 100
non-fusible XLA ops of the same size, with XLA command buffers (CUDA graphs) on and off.

Each setting runs in its own process (``python -m benchmarks.overhead --child``), since XLA reads its
flags once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

CHAIN = 100
SHAPE = (1, 64, 64)
FLAGS = {
    "on": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
    "off": "--xla_gpu_enable_command_buffer=",
}


def kernel_chain(x):
    from jax_tilek.transpose import batched_transpose

    for _ in range(CHAIN):
        x = batched_transpose(x, impl="tilelang")
    return x


def xla_chain(x):
    for _ in range(CHAIN):
        x = jax.lax.optimization_barrier(x * 2 + 1)
    return x


def _child() -> None:
    from benchmarks.harness import time_per_call

    x = jax.device_put(np.random.default_rng(0).standard_normal(SHAPE, np.float32).astype(jnp.bfloat16))
    out = {name: time_per_call(jax.jit(fn), [(x,)]) / CHAIN * 1e6 for name, fn in [("kernel", kernel_chain), ("xla", xla_chain)]}
    print(json.dumps(out))


def measure() -> list[dict]:
    results = []
    for setting, flags in FLAGS.items():
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        done = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--child"], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        us = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({
            "family": "overhead", "case": f"chain{CHAIN}", "command_buffers": setting,
            "kernel_us_per_call": us["kernel"], "xla_us_per_call": us["xla"], "ratio": us["kernel"] / us["xla"],
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    return results


def precompile(arch: str) -> None:
    import jax_tilek

    jax_tilek.precompile(kernel_chain, jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16), arch=arch)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child()
    else:
        measure()
