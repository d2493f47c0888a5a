"""Launch overhead: a chain of 100 tiny calls inside one jit, time per call, beside a chain of 100
non-fusible XLA ops of the same size (kept apart with ``optimization_barrier``), with XLA command
buffers (CUDA graphs) on and off. The calls are a one-CTA elementwise TileLang kernel and the same
elementwise op in XLA, so the device work is alike and the difference is the launch path.

Each command-buffer setting runs in its own process (``python -m benchmarks.overhead --child``),
since XLA reads its flags once; the settings alternate over ``REPEATS`` fresh processes each, and the
medians are reported with their ranges (per-call host cost varies between processes).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_tilek

CHAIN = 100
REPEATS = 3
SHAPE = (64, 64)
FLAGS = {
    "on": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
    "off": "--xla_gpu_enable_command_buffer=",
}


@jax_tilek.kernel
def affine_kernel(n_cols: int):
    """y = x * 2 + 1 on bf16 rows (M a multiple of 64); one CTA of 256 threads per 64 rows."""
    import tilelang.language as T

    M = T.dynamic("M")

    @T.prim_func
    def affine(x: T.Tensor((M, n_cols), "bfloat16"), y: T.Tensor((M, n_cols), "bfloat16")):
        with T.Kernel(M // 64, threads=256) as bx:
            T.assume(M % 64 == 0)
            for i, j in T.Parallel(64, n_cols):
                y[bx * 64 + i, j] = x[bx * 64 + i, j] * T.bfloat16(2) + T.bfloat16(1)

    return affine


def affine(x):
    return jax_tilek.tilelang_call(
        affine_kernel, x, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), params=dict(n_cols=x.shape[1])
    )


def _chain(step, barrier: bool):
    def chain(x):
        for _ in range(CHAIN):
            x = step(x)
            if barrier:
                x = jax.lax.optimization_barrier(x)
        return x

    return chain


PAIRS = {"elementwise": (_chain(affine, False), _chain(lambda x: x * 2 + 1, True))}


def _child() -> None:
    from benchmarks.harness import time_per_call

    x = jax.device_put(np.random.default_rng(0).standard_normal(SHAPE, np.float32).astype(jnp.bfloat16))
    out = {}
    for name, (ours, xla) in PAIRS.items():
        out[name] = {"kernel": time_per_call(ours, [(x,)]) / CHAIN * 1e6, "xla": time_per_call(xla, [(x,)]) / CHAIN * 1e6}
    print(json.dumps(out))


def measure() -> list[dict]:
    samples: dict[str, list[dict]] = {setting: [] for setting in FLAGS}
    for _ in range(REPEATS):
        for setting, flags in FLAGS.items():
            env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
            done = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--child"], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            samples[setting].append(json.loads(done.stdout.strip().splitlines()[-1])["elementwise"])
    results = []
    for setting, runs in samples.items():
        kernel, xla = sorted(r["kernel"] for r in runs), sorted(r["xla"] for r in runs)
        ratios = sorted(r["kernel"] / r["xla"] for r in runs)
        results.append({
            "family": "overhead", "case": f"elementwise x{CHAIN}", "command_buffers": setting,
            "kernel_us_per_call": statistics.median(kernel), "xla_us_per_call": statistics.median(xla),
            "ratio": statistics.median(ratios), "ratio_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
            "samples": runs,
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    return results


def precompile(arch: str) -> None:
    for ours, _ in PAIRS.values():
        jax_tilek.precompile(ours, jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16), arch=arch)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child()
    else:
        measure()
