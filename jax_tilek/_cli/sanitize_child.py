"""The process ``sanitize --family/--op`` runs under compute-sanitizer: every named case (benchmark
sizes excluded) of the chosen ops with ``impl="tilelang"``, each compared with its reference; writes
the manifest (kernels used, failures) to ``$JAX_TILEK_SANITIZE_MANIFEST``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", action="append", default=[])
    parser.add_argument("--op", action="append", default=[])
    parser.add_argument("--cases-per-op", type=int, default=0, help="each function's first N cases (0: all)")
    args = parser.parse_args(argv)

    from jax_tilek._cli.precompile import family_module
    from jax_tilek._cli.sanitize import MANIFEST_ENV, Manifest
    from jax_tilek.kernel import record_kernels
    from jax_tilek.testing import assert_trees_equal, over_arrays, public_cases, reference_on_cpu

    chosen: dict[str, set[str] | None] = {family_module(f): None for f in args.family}  # None: every function
    for op in args.op:
        family, _, function = op.rpartition(".")
        if chosen.get(family_module(family), set()) is not None:
            chosen.setdefault(family_module(family), set()).add(function)
    manifest, path = Manifest(), os.environ.get(MANIFEST_ENV, "sanitize_manifest.json")
    rng = np.random.default_rng(0)
    taken: dict[str, int] = {}
    for family, functions in sorted(chosen.items()):
        for qualified, fn, case in public_cases([family]):
            if case.bench or (functions is not None and qualified.rsplit(".", 1)[-1] not in functions):
                continue
            taken[qualified] = taken.get(qualified, 0) + 1
            if args.cases_per_op and taken[qualified] > args.cases_per_op:
                continue
            label = f"{qualified}/{case.name}"
            try:
                values = case.arrays(rng)
                kernel, arrays = over_arrays(case.call(fn, "tilelang"), values)
                reference, _ = over_arrays(case.call(fn, "xla"), values)
                with record_kernels() as used:
                    got = jax.block_until_ready(jax.jit(kernel)(*arrays))
                manifest.add(label, used)
                assert_trees_equal(got, reference_on_cpu(reference, arrays), case.tolerance, label)
                if getattr(fn, "differentiable", False):
                    with record_kernels() as used:
                        jax.block_until_ready(_gradient(kernel, arrays))
                    manifest.add(f"{label}/grad", used)
                print(f"ok {label}", flush=True)
            except Exception as e:  # AssertionError included: reported, the other cases go on
                manifest.failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                print(f"FAILED {label}: {e}", flush=True)
            manifest.save(path)  # after every case: a run stopped by --time-limit still says what ran
    manifest.save(path)
    return 1 if manifest.failures else 0


def _gradient(fn, arrays):
    """The gradient of the sum of ``fn``'s floating outputs with respect to its floating inputs: runs
    the backward kernels (no comparison: the GPU tests compare gradients)."""
    import jax.numpy as jnp

    floating = [i for i, a in enumerate(arrays) if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
    if not floating:
        return ()

    def loss(*xs):
        leaves = jax.tree.leaves(fn(*xs))
        return sum(jnp.sum(x.astype(jnp.float32)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))

    return jax.jit(jax.grad(loss, argnums=tuple(floating)))(*arrays)


if __name__ == "__main__":
    sys.exit(main())
