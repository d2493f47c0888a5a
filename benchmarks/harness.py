"""A benchmark harness every kernel family reuses.

Method (per case):
- input sets are made on the device; there are enough of them that together they exceed the L2
  cache (``ROTATE_BYTES``), and one jitted program applies the function once to each set, the calls
  chained by ``optimization_barrier`` so XLA neither merges nor reorders them. Timing a program of
  many calls amortises the host's dispatch cost, so small kernels are measured too;
- the program is warmed up, then timed as ``REPEATS`` batches of back-to-back runs, each batch ending
  in ``jax.block_until_ready``; the reported time per call is the median over batches;
- bandwidth counts the fewest bytes the op must move (inputs read once, outputs written once) and
  is reported as a fraction of the run's device-to-device copy bandwidth: a 256 MiB copy (bytes read
  plus written), rotated and timed the same way, measured once per run;
- the same op written in plain JAX runs under ``jax.jit`` the same way, and the speed-up is its time
  over the kernel's.

Precompile mode (``precompile_arch``) only lowers every case for "cuda", filling the kernel cache on
a build machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_tilek
from jax_tilek._cli.report import table  # noqa: F401  (re-exported: benchmarks.compare uses it)
from jax_tilek.testing import over_arrays

ROTATE_BYTES = 512 * 2**20  # > 8x the L2 of an H100 (50 MB) or H200 (60 MB)
MIN_CALLS = 16  # calls per timed program, at least (unless they would hold more than held_budget())
MAX_HELD_BYTES = 8 * 2**30
REPEATS = 15
MIN_BATCH_SECONDS = 0.02


@dataclasses.dataclass
class Case:
    """One benchmark: the kernel op, the same op in plain JAX, and the bytes it must move."""

    family: str
    name: str
    make_inputs: Callable[[jax.Array], tuple[jax.Array, ...]]  # a PRNG key -> one input set, on device
    kernel: Callable[..., Any]
    xla: Callable[..., Any] | None
    min_bytes: int
    params: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of_spec(cls, family: str, fn: Callable[..., Any], spec: Any, xla: Callable[..., Any] | None, min_bytes: int, params: dict | None = None, make_inputs=None) -> "Case":
        """A case of a named call (:class:`jax_tilek.testing.ArgSpec`) of a public function: its array
        arguments (the struct leaves of ``spec.args``, in order) are made on the device (random normals
        times 4, or random integers; or by ``make_inputs``), its other arguments and options are the
        spec's. ``xla`` takes the same arguments as the function (None: the function with ``impl="xla"``)."""
        kernel, structs = over_arrays(spec.call(fn, "tilelang"), spec.args)
        plain = over_arrays(xla if xla is not None else spec.call(fn, "xla"), spec.args)[0]
        return cls(family, spec.name, make_inputs or random_inputs(structs), kernel, plain, int(min_bytes), dict(params or {}))

    @classmethod
    def of_impls(cls, family: str, name: str, make_inputs, op_with_impl: Callable[[str], Callable[..., Any]], min_bytes: int, params: dict) -> "Case":
        """A case whose kernel and plain-JAX sides are one op called with ``impl="tilelang"`` and ``impl="xla"``."""
        return cls(family, name, make_inputs, op_with_impl("tilelang"), op_with_impl("xla"), int(min_bytes), params)


def random_on_device(key: jax.Array, struct: jax.ShapeDtypeStruct) -> jax.Array:
    """Random values of ``struct``'s shape and dtype, made on the device: normals times 4 (cast), or
    random bits for integers."""
    dtype = np.dtype(struct.dtype)
    if np.issubdtype(dtype, np.integer):
        return jax.random.bits(key, struct.shape, jnp.dtype(f"uint{dtype.itemsize * 8}")).view(dtype)
    return (jax.random.normal(key, struct.shape, jnp.float32) * 4).astype(dtype)


def random_inputs(structs: Sequence[jax.ShapeDtypeStruct]) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """A PRNG key -> one :func:`random_on_device` array per struct, each from its own split of the key."""
    return lambda key: tuple(random_on_device(k, s) for k, s in zip(jax.random.split(key, len(structs)), structs))


def _input_bytes(inputs: Sequence[Any]) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(inputs))


def _program(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One call of ``fn`` per input set, in order, each call's inputs fenced on the previous output."""

    def program(input_sets):
        outs = []
        for inputs in input_sets:
            if outs:
                inputs, _ = jax.lax.optimization_barrier((inputs, outs[-1]))
            outs.append(fn(*inputs))
        return outs

    return jax.jit(program)


def time_per_call(fn: Callable[..., Any], input_sets: Sequence[tuple[Any, ...]]) -> float:
    """Median over batches of the seconds per call of ``fn``, one call per input set per program."""
    program = _program(fn)
    sets = list(input_sets)
    jax.block_until_ready(program(sets))  # compile, load, touch every set
    start = time.perf_counter()
    jax.block_until_ready(program(sets))
    once = max(time.perf_counter() - start, 1e-6)
    runs = max(1, int(math.ceil(MIN_BATCH_SECONDS / once)))
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(runs):
            out = program(sets)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (runs * len(sets)))
    return statistics.median(samples)


def _copy(x):
    return jnp.copy(x)  # a jit output never aliases an undonated input: XLA emits a device copy


COPY_BYTES = 256 * 2**20


@functools.cache
def copy_gbps() -> float:
    """The device-to-device copy bandwidth of this run (read + write bytes per second, in GB/s)."""
    make = jax.jit(lambda key: jax.random.bits(key, (COPY_BYTES // 4,), jnp.uint32))
    sets = [(make(k),) for k in jax.random.split(jax.random.key(1), MIN_CALLS)]
    return 2 * COPY_BYTES / time_per_call(_copy, sets) / 1e9


def _call_bytes(fn: Callable[..., Any], inputs: Sequence[Any]) -> int:
    """Device bytes one call of ``fn`` needs beside its inputs: its outputs and XLA's temporaries (the
    compiled program's memory analysis; the outputs alone where a backend gives none)."""
    try:
        stats = jax.jit(fn).lower(*inputs).compile().memory_analysis()
        return int(stats.output_size_in_bytes + stats.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - no analysis here: count the outputs
        return _input_bytes(jax.eval_shape(fn, *inputs))


def held_budget() -> int:
    """Bytes a timed program may hold: 45% of the device's memory (the rest for XLA's own pools and
    the other side's program), or ``MAX_HELD_BYTES`` where the device does not say."""
    stats = jax.devices()[0].memory_stats() or {}
    return int(0.45 * stats["bytes_limit"]) if "bytes_limit" in stats else MAX_HELD_BYTES


def set_count(per_set: int, per_call: int, budget: int) -> int:
    """Input sets per timed program: enough to rotate ``ROTATE_BYTES`` past L2 (at most 64), at least
    ``MIN_CALLS``, fewer (down to 1) where the program, which holds every set's inputs and every call's
    outputs and temporaries, would pass ``budget``."""
    fits = max(1, budget // max(per_set + per_call, 1))
    return max(1, min(64, fits, max(MIN_CALLS, int(math.ceil(ROTATE_BYTES / per_set)))))


def run_case(case: Case, key: jax.Array) -> dict:
    keys = iter(jax.random.split(key, 65))
    make = jax.jit(case.make_inputs)
    first = make(next(keys))
    per_set = max(_input_bytes(first), 1)  # sets past L2
    per_call = max(_call_bytes(fn, first) for fn in (case.kernel, case.xla) if fn is not None)
    sets = set_count(per_set, per_call, held_budget())
    device_sets = [first] + [make(next(keys)) for _ in range(sets - 1)]

    t_kernel = time_per_call(jax.jit(case.kernel), device_sets)
    result = {"family": case.family, "case": case.name, **case.params, "time_us": t_kernel * 1e6}
    result["gbps"] = case.min_bytes / t_kernel / 1e9
    result["copy_gbps"] = copy_gbps()
    result["frac_of_copy"] = result["gbps"] / result["copy_gbps"]
    if case.xla is not None:
        t_xla = time_per_call(jax.jit(case.xla), device_sets)
        result["xla_time_us"] = t_xla * 1e6
        result["speedup_vs_xla"] = t_xla / t_kernel
    return result


def precompile_case(case: Case, arch: str) -> None:
    inputs = jax.eval_shape(case.make_inputs, jax.random.key(0))
    jax_tilek.precompile(case.kernel, *inputs, arch=arch)


def run(cases: Sequence[Case], *, json_path: str | None = None, precompile_arch: str | None = None) -> list[dict]:
    if precompile_arch:
        for case in cases:
            precompile_case(case, precompile_arch)
            print(f"precompiled {case.family}/{case.name}", flush=True)
        return []
    key = jax.random.key(0)
    results = []
    for case in cases:
        key, sub = jax.random.split(key)
        try:
            results.append(run_case(case, sub))
        except Exception as e:  # noqa: BLE001 - one case failing (out of memory, say) leaves the others' numbers
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results.append({"family": case.family, "case": case.name, **case.params, "error": f"{type(e).__name__}: {message}"[:300]})
            jax.clear_caches()
        print(json.dumps(results[-1]), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "results": results}, f, indent=1)
    return results
