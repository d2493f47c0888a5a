"""Engram benchmarks (family "engram"): every Engram function at its named benchmark sizes (hidden
4096 / 7168 with hc = 4 heads, 4K-64K tokens; Sinkhorn tables of 1M rows x 512 and 100K x 5120;
momentum over 512M elements), against the same function's pure-JAX definition (``impl="xla"``)
under jit; plus two composites:

- ``engram_gate_train``: the differentiable gate's forward and backward (value and gradients for
  hidden_states, kv and both weights: fused_weight + engram_gate_fwd + engram_gate_bwd +
  grad_w_reduce) against JAX's autodiff of the reference;
- ``sinkhorn_momentum``: one update of the optax transform on a table (momentum, 5 row/column
  iterations, finalize: 12 launches) against the same transform on the references.

Bandwidth counts each op's inputs read once and outputs written once (the harness reports it as a
fraction of the run's device copy bandwidth; the goal is >= 85% for the gate and the Sinkhorn steps).
For the transform it counts the passes the algorithm needs: the momentum update (grad and buffer in,
buffer and input out) and one read of the input per Sinkhorn step plus the finalize's write.

Inputs: floats are fresh random values made on the device for every rotated set, image-token masks
random bits (20% set); the hash's integer arrays are the case's own valid values (positive table
sizes), made once on the host. The hash's plain-JAX side does 64-bit arithmetic in 32-bit words (JAX
without x64), so its speed-up is not a like-for-like comparison.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import engram
from jax_tilek.testing import ArgSpec, over_arrays

from benchmarks.harness import Case, random_on_device

FAMILY = "engram"


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _inputs(structs, host_integers):
    """``make_inputs`` for a case: floats random on the device, bools 20% set, integers from the host
    (``host_integers``: a cached callable giving {position: array}) or random bits."""

    def make_inputs(key):
        keys = jax.random.split(key, len(structs))
        given = host_integers() if host_integers is not None else {}
        out = []
        for i, (k, s) in enumerate(zip(keys, structs)):
            if i in given:
                out.append(given[i])
            elif np.dtype(s.dtype) == np.bool_:
                out.append(jax.random.bernoulli(k, 0.2, s.shape))
            else:
                out.append(random_on_device(k, s))
        return tuple(out)

    return make_inputs


def _case(name: str, fn, spec: ArgSpec) -> Case:
    run, structs = over_arrays(spec.call(fn, "xla"), spec.args)
    host = None
    if fn is engram.engram_hash:
        integers = [i for i, s in enumerate(structs) if np.issubdtype(s.dtype, np.integer)]

        @functools.cache
        def host():
            arrays = over_arrays(run, spec.arrays(np.random.default_rng(0)))[1]
            return {i: np.asarray(a) for i, a in enumerate(arrays) if i in integers}

    out = jax.eval_shape(run, *structs)
    params = {"shape": "x".join(map(str, structs[0].shape)), "dtype": np.dtype(structs[0].dtype).name}
    case = Case.of_spec(FAMILY, fn, spec, None, _nbytes(structs) + _nbytes(out), params, _inputs(structs, host))
    return dataclasses.replace(case, name=f"{name}/{spec.name}")


def _functions() -> dict:
    return {name: getattr(engram, name) for name in engram.__all__ if getattr(getattr(engram, name), "cases", ())}


def _gate_train(impl):
    def run(x, kv, wh, we, g):
        def loss(x, kv, wh, we):
            return jnp.sum(engram.engram_gate(x, kv, wh, we, 1e-6, 1e-20, impl=impl).astype(jnp.float32) * g)

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, kv, wh, we)

    return run


def _gate_train_case(t: int, hc: int, h: int) -> Case:
    s = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    structs = (s((t, hc, h), bf16), s((t, hc + 1, h), bf16), s((hc, h), bf16), s((hc, h), bf16), s((t, hc, h), bf16))
    x, kv = t * hc * h * 2, t * (hc + 1) * h * 2
    stats = 4 * t * hc * 4
    # forward: x, kv in, out + stats out; backward: grad_out, x, kv, stats in, grad_x, grad_kv out
    nbytes = (x + kv + x + stats) + (x + x + kv + stats + x + kv)
    return Case(FAMILY, f"engram_gate_train/t{t}_hc{hc}_h{h}", _inputs(structs, None), _gate_train("tilelang"), _gate_train("xla"), nbytes,
                {"shape": f"{t}x{hc}x{h}", "dtype": "bfloat16"})  # fmt: skip


def _transform(impl, iterations):
    tx = engram.sinkhorn_momentum(beta1=0.95, iterations=iterations, impl=impl)
    return lambda g, m: tx.update({"t": g}, engram.SinkhornMomentumState({"t": m}))


def _transform_case(r: int, d: int, iterations: int = 5) -> Case:
    s = jax.ShapeDtypeStruct((r, d), jnp.float32)
    n = r * d * 4
    nbytes = 4 * n + (iterations + 1) * n + n  # momentum (2 in, 2 out); a read per step and the finalize's; its write
    return Case(FAMILY, f"sinkhorn_momentum/r{r}_d{d}_it{iterations}", _inputs((s, s), None), _transform("tilelang", iterations),
                _transform("xla", iterations), nbytes, {"shape": f"{r}x{d}", "dtype": "float32"})  # fmt: skip


CASES = [_case(name, fn, spec) for name, fn in _functions().items() for spec in fn.cases if spec.bench]
CASES += [_gate_train_case(t, 4, h) for t, h in ((4096, 4096), (16384, 7168))]
CASES += [_transform_case(1 << 20, 512), _transform_case(100001, 5120)]
