"""Per-channel FP8 casts at DeepSeek sizes against the same ops in plain JAX (their references): the
ops' named benchmark calls (``bench_`` cases), with their tilings as variants."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats as F
from jax_tilek.quant import per_channel_cast, per_channel_cast_and_transpose, per_channel_cast_fused

from benchmarks.harness import Case

FAMILY = "quant_per_channel"


def _nbytes(tree) -> int:
    """The bytes of the arrays (``jax.ShapeDtypeStruct`` leaves) of a pytree."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def _case(fn, spec) -> Case:
    """A call that reads its arrays once and writes e4m3 data and its scales once."""
    x, kw = spec.args[0], spec.kwargs
    data = x[0] if isinstance(x, tuple) else x
    pos = spec.args[-1] if fn is per_channel_cast_fused else None
    t, h = (data.shape[0] if pos is None else pos.shape[0]), data.shape[1]
    npt = kw.get("num_per_tokens", 128)
    m_b = -(-t // npt)
    sf_bytes = (-(-m_b // 4) if kw.get("use_packed_ue8m0") else m_b) * h * 4
    read = _nbytes(spec.args) if pos is None else 2 * t * h + 4 * t  # a gather reads the rows it gathers
    params = {"shape": f"{t}x{h}", "dtype": np.dtype(data.dtype).name, **spec.config}
    if isinstance(x, tuple):  # an e4m3 QuantTensor with per-token 1 x npc scales
        npc = kw["num_per_channels"]

        def make(key):
            return F.quantize_blocks(jax.random.normal(key, data.shape, jnp.float32) * 4, "e4m3", (1, npc))

        run = lambda impl: lambda d, s: spec.call(fn, impl)((d, s))  # noqa: E731
        return Case.of_impls(FAMILY, spec.name, make, run, read + t * h + sf_bytes, params)
    make = None
    if pos is not None:

        def make(key):  # ~1/T of the positions are -1
            k1, k2 = jax.random.split(key)
            x = (jax.random.normal(k1, data.shape, jnp.float32) * 4).astype(jnp.bfloat16)
            return x, jax.random.randint(k2, pos.shape, -1, data.shape[0], jnp.int32)

    return Case.of_spec(FAMILY, fn, spec, None, read + t * h + sf_bytes, params, make_inputs=make)


def _bench(tuned: bool) -> list[Case]:
    """The benchmark calls (``bench_``) with the default tiling, or with another (``tuned``)."""
    fns = (per_channel_cast, per_channel_cast_fused, per_channel_cast_and_transpose)
    return [_case(fn, s) for fn in fns for s in fn.cases if s.name.startswith("bench_") and bool(s.config) == tuned]


CASES = _bench(tuned=False)
VARIANTS = _bench(tuned=True)
