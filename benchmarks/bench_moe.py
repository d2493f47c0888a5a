"""MoE benchmarks (family "moe"): every gating and routing function at its named benchmark sizes
(DeepSeek-V3: T = 4K-64K tokens, E = 256 experts, K = 8, hidden 7168), against the same function's
pure-JAX definition (``impl="xla"``: ``lax.top_k``, sorts, segment sums and gathers) under jit.

Inputs: floating-point arrays (token rows, logits, weights, scales) are fresh random values made on
the device for every rotated set; integer arrays (routing tables, top-k indices) are the case's own
valid values (``ArgSpec.arrays``), made once on the host when the case runs.

``VARIANTS`` (family "moe_variants"): expand_to_fused at its benchmark sizes in other ``ExpandConfig``
tunings than the default (the bulk-copy engine storing the rows, 128 threads per CTA): other CTA
sizes, and the per-thread copy (threads per CTA x 16-byte vectors per thread) it replaced."""

import dataclasses
import functools

import jax
import numpy as np

from jax_tilek import moe
from jax_tilek.testing import ArgSpec, over_arrays

from benchmarks.harness import Case, random_on_device

FAMILY = "moe"


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _case(name: str, fn, spec: ArgSpec) -> Case:
    run, structs = over_arrays(spec.call(fn, "xla"), spec.args)
    integers = [i for i, s in enumerate(structs) if not np.issubdtype(s.dtype, np.floating)]

    @functools.cache
    def valid_integers() -> dict:
        """The case's own integer arrays, made on the host when the case first runs (not at import:
        ``spec.arrays`` also draws its floats, GBs for the routing sizes)."""
        host = over_arrays(run, spec.arrays(np.random.default_rng(0)))[1]
        return {i: np.asarray(host[i]) for i in integers}

    def make_inputs(key):
        keys = jax.random.split(key, len(structs))
        given = valid_integers() if integers else {}
        return tuple(given[i] if i in given else random_on_device(k, s) for i, (k, s) in enumerate(zip(keys, structs)))

    out = jax.eval_shape(run, *structs)
    min_bytes = _nbytes(structs) + _nbytes(out)
    if name == "reduce_fused":  # it reads only the T·K mapped rows of its [P, H] input, not the padding
        (p, h), (t, k) = structs[0].shape, structs[-1].shape
        min_bytes -= (p - t * k) * h * np.dtype(structs[0].dtype).itemsize
    params = {"shape": "x".join(map(str, structs[0].shape)), "dtype": np.dtype(structs[0].dtype).name}
    case = Case.of_spec(FAMILY, fn, spec, None, min_bytes, params, make_inputs)
    return dataclasses.replace(case, name=f"{name}/{spec.name}")


def _functions() -> dict:
    """Each public function once (``moe_topk_gate_forward`` is ``moe_topk_gate``)."""
    found = {}
    for name in moe.__all__:
        found.setdefault(id(getattr(moe, name)), (name, getattr(moe, name)))
    return dict(found.values())


CASES = [_case(name, fn, spec) for name, fn in _functions().items() for spec in getattr(fn, "cases", ()) if spec.bench]


EXPAND_TUNINGS = [dict(threads=t, unroll=u, bulk=False) for t, u in ((128, 4), (128, 8), (256, 4))]
EXPAND_TUNINGS += [dict(threads=t) for t in (64, 256)]
VARIANTS = [
    dataclasses.replace(c, name=f"{c.name}_t{tuning['threads']}" + (f"_u{tuning['unroll']}" if tuning.get("bulk") is False else "_bulk"))
    for tuning in EXPAND_TUNINGS
    for spec in moe.expand_to_fused.cases if spec.bench
    for c in [_case("expand_to_fused", moe.expand_to_fused.with_config(**tuning), spec)]
]
