"""Per-token quantization benchmarks (DeepSeek sizes) and the dtype cast, against the same ops in plain JAX."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats as F
from jax_tilek.quant import per_token_cast, per_token_cast_with_precomputed_sf, per_token_cast_with_sf_only
from jax_tilek.quant import cast

from benchmarks.harness import Case

FAMILY = "quant_per_token"


def _sf_bytes(tokens, hidden, npc, flags):
    layout = F.sf_layout(flags.get("use_tma_aligned_col_major_sf", False), flags.get("use_packed_ue8m0", False), flags.get("round_sf", False))
    shape, dtype = F.sf_storage_shape(layout, (tokens, F.ceil_div(hidden, npc)), jnp.float8_e4m3fn if flags.get("use_e4m3_sf") else np.float32)
    return int(np.prod(shape)) * dtype.itemsize


def _per_token(fn, spec) -> Case:
    """A named benchmark call of a per-token cast: bytes read (x, given scales) and written (data, scales)."""
    x, kw = spec.args[0], spec.kwargs
    data = x[0] if isinstance(x, tuple) else x
    tokens, hidden = data.shape[0], data.shape[1] * (2 if data.dtype == jnp.uint8 else 1)
    fmt, npc = spec.args[1:3] if fn is per_token_cast_with_precomputed_sf else (kw["fmt"], kw["num_per_channels"])
    read = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(spec.args) if isinstance(a, jax.ShapeDtypeStruct))
    written = (0 if fn is per_token_cast_with_sf_only else int(tokens * hidden * (1 if fmt == "e4m3" else 0.5)))
    written += 0 if fn is per_token_cast_with_precomputed_sf else _sf_bytes(tokens, hidden, npc, kw)
    src = f"fp4[{kw['x_block_size'][0]}x{kw['x_block_size'][1]}]" if isinstance(x, tuple) else np.dtype(x.dtype).name
    params = {"shape": f"{tokens}x{hidden}", "dtype": f"{src}->{fmt}/{npc}", **spec.config}
    if isinstance(x, tuple):  # packed FP4 with 1x32 UE8M0 scales, made here
        return Case.of_impls(FAMILY, spec.name, _fp4_with_ue8m0(tokens, hidden), lambda impl: lambda d, s: spec.call(fn, impl)((d, s)), read + written, params)
    make = _x_and_scales(spec) if fn is per_token_cast_with_precomputed_sf else None
    return Case.of_spec(FAMILY, fn, spec, None, read + written, params, make_inputs=make)


def _x_and_scales(spec):
    """x and the scales per_token_cast computes for it (the layout of the call's flags)."""
    (tokens, hidden), kw = spec.args[0].shape, spec.kwargs

    def make(key):
        x = (jax.random.normal(key, (tokens, hidden), jnp.float32) * 3).astype(jnp.bfloat16)
        return x, per_token_cast_with_sf_only(x, "e4m3", spec.args[2], round_sf=kw.get("use_packed_ue8m0", False), **kw, impl="xla")

    return make


def _fp4_with_ue8m0(tokens, hidden):
    def make(key):
        k1, k2 = jax.random.split(key)
        data = jax.random.randint(k1, (tokens, hidden // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        exponents = jax.random.randint(k2, (tokens, hidden // 32), 117, 137, jnp.int32).astype(jnp.uint32)
        sf = F.store_sf(jax.lax.bitcast_convert_type(exponents << 23, jnp.float32), "col_ue8m0")
        return data, sf

    return make


def _bench(tuned: bool) -> list[Case]:
    """The per-token casts' benchmark calls (``bench_``): default thread mappings, or other ones."""
    fns = (per_token_cast, per_token_cast_with_sf_only, per_token_cast_with_precomputed_sf)
    return [_per_token(fn, s) for fn in fns for s in fn.cases if s.name.startswith("bench_") and bool(s.config) == tuned]


def _cast(tuned: bool) -> list[Case]:
    """The dtype cast's benchmark calls (``bench_``): the default thread mapping, or other ones."""
    cases = []
    for spec in cast.cases:
        if spec.name.startswith("bench_") and bool(spec.config) == tuned:
            (x,) = spec.args
            dst, sr = spec.kwargs["dtype"], spec.kwargs["stochastic_rounding"]
            moved = x.size * (np.dtype(x.dtype).itemsize + np.dtype(dst).itemsize)
            params = {"shape": "x".join(map(str, x.shape)), "dtype": f"{np.dtype(x.dtype).name}->{dst}{'/sr' if sr else ''}", **spec.config}
            cases.append(Case.of_spec(FAMILY, cast, spec, None, moved, params))
    return cases


CASES = [
    *_bench(tuned=False),
    *_cast(tuned=False),
]

# Thread mappings: (elements per thread, threads per CTA).
VARIANTS = [
    *_cast(tuned=True),
    *_bench(tuned=True),
]
