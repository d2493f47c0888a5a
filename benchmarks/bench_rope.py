"""RoPE benchmarks (family "rope"): ``apply_rotary`` on query and key in one launch at its named
benchmark sizes -- hidden 4096 (32 query / 8 key heads of 128, NeoX, rot 128) and DeepSeek's hidden
7168 MLA (128 query heads of 192 with rope on the last 64 columns, one shared 64-wide key head, GPT-J
pairs), 4K-64K tokens, random positions into a 64K-row table -- against the same function's plain-JAX
definition (``impl="xla"``) under jit. ``VARIANTS``: the kernel with 256 threads per CTA.

Bytes: query and key read and written once, each token's position, and each distinct cache row once
(``min(T, rows)`` rows: the positions are random)."""

import dataclasses

import jax
import numpy as np

from jax_tilek import rope

from benchmarks.harness import Case, random_on_device

FAMILY = "rope"


def _nbytes(struct) -> int:
    return 0 if struct is None else int(np.prod(struct.shape)) * np.dtype(struct.dtype).itemsize


def _inputs(spec):
    """Random heads and table; positions uniform over the table's rows (random bits would all clamp to
    its first or last row)."""
    query, cache, key, positions = spec.args

    def make(k):
        kq, kc, kk, kp = jax.random.split(k, 4)
        arrays = [random_on_device(kq, query), random_on_device(kc, cache), random_on_device(kk, key)]
        return (*arrays, jax.random.randint(kp, positions.shape, 0, cache.shape[0] - spec.kwargs["seqlen_offset"], positions.dtype))

    return make


def _case(spec) -> Case:
    query, cache, key, positions = spec.args
    rows = min(int(np.prod(query.shape[:-2])), cache.shape[0])
    moved = 2 * (_nbytes(query) + _nbytes(key)) + _nbytes(positions) + rows * cache.shape[1] * 4
    params = {
        "query": "x".join(map(str, query.shape)), "key": "x".join(map(str, key.shape)), "dtype": np.dtype(query.dtype).name,
        "rot": cache.shape[1], "pairs": "gptj" if spec.kwargs["interleaved"] else "neox", **spec.config,
    }  # fmt: skip
    case = Case.of_spec(FAMILY, rope.apply_rotary, spec, None, moved, params, make_inputs=_inputs(spec))
    name = spec.name.removeprefix("bench_")
    if spec.config:  # a tuning: timed against the default kernel's numbers, not plain JAX again
        return dataclasses.replace(case, name=name, xla=None)
    return dataclasses.replace(case, name=name)


def _bench(tunings: bool) -> list[Case]:
    return [_case(s) for s in rope.apply_rotary.cases if s.name.startswith("bench_") and tunings == bool(s.config)]


CASES = _bench(False)
VARIANTS = _bench(True)
