"""Transpose benchmarks: large batched transposes (expert weights, activations) against jnp.swapaxes,
and the kernel's tilings (``VARIANTS``). The cases are the ops' named benchmark calls."""

import jax.numpy as jnp
import numpy as np

from jax_tilek.transpose import batched_transpose, transpose

from benchmarks.harness import Case


def _case(fn, spec) -> Case:
    (x,) = spec.args
    columns = spec.kwargs.get("columns")
    width = x.shape[-1] if columns is None else columns[1] - columns[0]
    moved = 2 * int(np.prod(x.shape[:-1])) * width * np.dtype(x.dtype).itemsize

    def xla(x):
        start, stop = columns or (0, x.shape[-1])
        return jnp.swapaxes(x[..., start:stop], -1, -2)

    params = {"shape": "x".join(map(str, x.shape)), "dtype": np.dtype(x.dtype).name, **spec.config}
    return Case.of_spec("transpose", fn, spec, xla, moved, params)


def _bench(fn, tilings: bool) -> list[Case]:
    return [_case(fn, s) for s in fn.cases if s.name.startswith("bench_") and tilings == s.name.startswith("bench_t")]


CASES = _bench(batched_transpose, tilings=False) + _bench(transpose, tilings=False)
VARIANTS = _bench(batched_transpose, tilings=True)
