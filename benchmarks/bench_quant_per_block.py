"""2-D block casts at DeepSeek sizes against the same ops in plain JAX (their references):
per_block_cast (bf16 / fp32 -> e4m3 / e2m1, and its halves), per_block_cast_lossless (FP4 -> FP8) and
batched_transpose_weight_sf (weight scales -> DeepGEMM UE8M0). The casts' calls are their named
benchmark calls (``bench_`` cases)."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats as F
from jax_tilek.quant import (
    batched_transpose_weight_sf,
    per_block_cast,
    per_block_cast_lossless,
    per_block_cast_with_precomputed_sf,
    per_block_cast_with_sf_only,
)

from benchmarks.harness import Case

FAMILY = "quant_per_block"


def _nbytes(tree) -> int:
    """The bytes of the arrays (``jax.ShapeDtypeStruct`` leaves) of a pytree."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def _cast(fn, spec) -> Case:
    """A per-block cast's call: it reads its arrays once and writes its results once."""
    x, rest = spec.args[0], spec.args[1:]
    with_sf = lambda x, sf: spec.call(fn, "xla")(x, *rest[:-1], sf)  # noqa: E731
    out = jax.eval_shape(with_sf, x, rest[-1]) if rest else jax.eval_shape(spec.call(fn, "xla"), x)
    params = {"shape": "x".join(map(str, x.shape)), "dtype": np.dtype(x.dtype).name}

    def make_x_sf(key):  # x and the scales per_block_cast computes for it (positive, row-major)
        x = (jax.random.normal(key, spec.args[0].shape, jnp.float32) * 4).astype(spec.args[0].dtype)
        return x, per_block_cast_with_sf_only(x, *rest[:-1], impl="xla")

    return Case.of_spec(FAMILY, fn, spec, None, _nbytes(spec.args) + _nbytes(out), params, make_inputs=make_x_sf if rest else None)


def _lossless(spec) -> Case:
    """FP4 data with power-of-two scales (within 2^11 of each other) in the call's input layout."""
    ((data, sf),), kw = spec.args, spec.kwargs
    t, h = data.shape[0], data.shape[1] * 2

    def make(key):
        k1, k2 = jax.random.split(key)
        exponents = jax.random.randint(k2, F.num_blocks((t, h), kw["x_block_size"]), 120, 131, jnp.int32)  # scales within 2^11
        return jax.random.bits(k1, data.shape, jnp.uint8), F.store_sf(jax.lax.bitcast_convert_type(exponents << 23, jnp.float32), kw["x_sf_layout"])

    run = lambda impl: lambda d, s: spec.call(per_block_cast_lossless, impl)((d, s))  # noqa: E731
    moved = _nbytes(spec.args) + _nbytes(jax.eval_shape(run("xla"), data, sf))
    return Case.of_impls(FAMILY, spec.name, make, run, moved, {"shape": f"{t}x{h}", "dtype": "e2m1"})


def _weight_sf(spec) -> Case:
    """One layer's MoE weights: 256 experts of w13 (4096 x 7168 -> sf 32 x 56) and w2 (7168 x 2048 -> 56 x 16)."""
    (structs,) = spec.args
    shapes = [s.shape for s in structs]

    def make(key):
        keys = jax.random.split(key, len(shapes))
        return tuple(jax.lax.bitcast_convert_type(jax.random.randint(k, s, 100, 140, jnp.int32) << 23, jnp.float32) for k, s in zip(keys, shapes))

    out_words = sum(g * (-(-k // 4) * n * 128 + -(-n // 4) * k * 128) for g, n, k in shapes)
    run = lambda impl: lambda *s: spec.call(batched_transpose_weight_sf, impl)(list(s))  # noqa: E731
    moved = sum(g * n * k * 4 for g, n, k in shapes) + out_words * 4
    return Case.of_impls(FAMILY, "weight_sf_moe_layer", make, run, moved, {"shape": "256x(32x56,56x16)", "dtype": "float32"})


def _bench(fn) -> list:
    return [s for s in fn.cases if s.name.startswith("bench_")]


CASES = [
    *(_cast(fn, s) for fn in (per_block_cast, per_block_cast_with_sf_only, per_block_cast_with_precomputed_sf) for s in _bench(fn)),
    *(_lossless(s) for s in _bench(per_block_cast_lossless)),
    *(_weight_sf(s) for s in _bench(batched_transpose_weight_sf)),
]
