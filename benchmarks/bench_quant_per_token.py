"""Per-token quantization benchmarks (DeepSeek sizes) and the dtype cast, against the same ops in plain JAX."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats as F
ptc = importlib.import_module("jax_tilek.quant.per_token_cast")  # modules, not the functions
cast_module = importlib.import_module("jax_tilek.quant.cast")
from jax_tilek.quant.cast import cast

from benchmarks.harness import Case

FAMILY = "quant_per_token"
PACKED = dict(use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True)


def _sf_bytes(tokens, hidden, npc, flags):
    layout = F.sf_layout(flags.get("use_tma_aligned_col_major_sf", False), flags.get("use_packed_ue8m0", False), flags.get("round_sf", False))
    shape, dtype = F.sf_storage_shape(layout, (tokens, F.ceil_div(hidden, npc)), jnp.float8_e4m3fn if flags.get("use_e4m3_sf") else np.float32)
    return int(np.prod(shape)) * dtype.itemsize


def _per_token(name, tokens, hidden, fmt, npc, flags, dtype=jnp.bfloat16, tuning=None, **extra):
    def make(key):
        return ((jax.random.normal(key, (tokens, hidden), jnp.float32) * 3).astype(dtype),)

    def run(impl):
        def f(x):
            if tuning is None:
                return ptc.per_token_cast(x, fmt, npc, impl=impl, **flags, **extra)
            static = ptc._static(fmt, npc, None, None, flags.get("use_tma_aligned_col_major_sf", False), flags.get("round_sf", False),
                                 flags.get("use_packed_ue8m0", False), flags.get("use_e4m3_sf", False), extra.get("stochastic_cast", False),
                                 None, None, "full")  # fmt: skip
            args = (x, jnp.zeros((1,), jnp.uint32)) if extra.get("stochastic_cast") else (x,)
            return ptc._op(*args, impl=impl, tuning=tuning, **static)

        return f

    data_bytes = tokens * hidden * (1 if fmt == "e4m3" else 0.5)
    moved = tokens * hidden * np.dtype(dtype).itemsize + int(data_bytes) + _sf_bytes(tokens, hidden, npc, flags)
    return Case.of_impls(FAMILY, name, make, run, moved, {"shape": f"{tokens}x{hidden}", "dtype": f"{np.dtype(dtype).name}->{fmt}/{npc}"})


def _split(name, tokens, hidden, npc, flags):
    """The two halves of per_token_cast: scales only (reads x), and the cast with those scales given."""
    sf_flags = {k: v for k, v in flags.items() if k != "round_sf"}

    def make_x(key):
        return ((jax.random.normal(key, (tokens, hidden), jnp.float32) * 3).astype(jnp.bfloat16),)

    def make_x_sf(key):
        (x,) = make_x(key)
        return x, ptc.per_token_cast_with_sf_only(x, "e4m3", npc, **flags, impl="xla")

    sf_only = lambda impl: lambda x: ptc.per_token_cast_with_sf_only(x, "e4m3", npc, **flags, impl=impl)  # noqa: E731
    with_sf = lambda impl: lambda x, sf: ptc.per_token_cast_with_precomputed_sf(x, "e4m3", npc, sf, **sf_flags, impl=impl)  # noqa: E731
    x_bytes, sf_bytes = tokens * hidden * 2, _sf_bytes(tokens, hidden, npc, flags)
    params = {"shape": f"{tokens}x{hidden}", "dtype": f"bfloat16->e4m3/{npc}"}
    return [
        Case.of_impls(FAMILY, f"{name}_sf_only", make_x, sf_only, x_bytes + sf_bytes, params),
        Case.of_impls(FAMILY, f"{name}_precomputed_sf", make_x_sf, with_sf, x_bytes + sf_bytes + tokens * hidden, params),
    ]


def _requant(name, tokens, hidden, npc, flags):
    """Packed FP4 with 1x32 UE8M0 scales -> e4m3 per-token 1 x npc."""

    def make(key):
        k1, k2 = jax.random.split(key)
        data = jax.random.randint(k1, (tokens, hidden // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        exponents = jax.random.randint(k2, (tokens, hidden // 32), 117, 137, jnp.int32).astype(jnp.uint32)
        sf = F.store_sf(jax.lax.bitcast_convert_type(exponents << 23, jnp.float32), "col_ue8m0")
        return data, sf

    def run(impl):
        return lambda d, s: ptc.per_token_cast((d, s), "e4m3", npc, x_block_size=(1, 32), impl=impl, **flags)

    moved = tokens * hidden // 2 + tokens * hidden // 32 + tokens * hidden + _sf_bytes(tokens, hidden, npc, flags)
    return Case.of_impls(FAMILY, name, make, run, moved, {"shape": f"{tokens}x{hidden}", "dtype": f"fp4[1x32]->e4m3/{npc}"})


def _cast(name, shape, src, dst, stochastic=False, tuning=None):
    def make(key):
        return ((jax.random.normal(key, shape, jnp.float32) * 3).astype(src),)

    def run(impl):
        if tuning is None:
            return lambda x: cast(x, dst, stochastic, impl=impl)
        seed = (jnp.zeros((1,), jnp.uint32),) if stochastic else ()
        name = np.dtype(dst).name
        return lambda x: cast_module._cast_op(x, *seed, dtype=name, stochastic_rounding=stochastic, tuning=tuning, impl=impl)

    n = int(np.prod(shape))
    dtypes = f"{np.dtype(src).name}->{np.dtype(dst).name}{'/sr' if stochastic else ''}"
    return Case.of_impls(FAMILY, name, make, run, n * (np.dtype(src).itemsize + np.dtype(dst).itemsize), {"shape": "x".join(map(str, shape)), "dtype": dtypes})


CASES = [
    _per_token("e4m3_ue8m0", 4096, 7168, "e4m3", 128, PACKED),
    _per_token("e4m3_ue8m0", 65536, 7168, "e4m3", 128, PACKED),
    _per_token("e4m3_row", 16384, 4096, "e4m3", 128, {}),
    _per_token("e2m1_ue8m0", 16384, 7168, "e2m1", 32, PACKED),
    _per_token("e4m3_rowwise", 16384, 7168, "e4m3", 7168, dict(round_sf=True)),
    _per_token("e4m3_ue8m0_partial", 65536, 576, "e4m3", 128, PACKED),  # H % npc != 0: a partial last block
    _per_token("e4m3_col_e4m3sf", 16384, 7168, "e4m3", 128, dict(use_tma_aligned_col_major_sf=True, use_e4m3_sf=True)),
    _per_token("e4m3_ue8m0_sr", 16384, 7168, "e4m3", 128, PACKED, stochastic_cast=True),
    _requant("fp4_to_e4m3", 16384, 7168, 128, PACKED),
    *_split("e4m3_ue8m0", 16384, 7168, 128, PACKED),
    _cast("cast", (16384, 7168), jnp.float32, jnp.bfloat16),
    _cast("cast_sr", (16384, 7168), jnp.float32, jnp.bfloat16, True),
    _cast("cast_sr", (16384, 7168), jnp.bfloat16, jnp.float8_e4m3fn, True),
]

# Thread mappings: (elements per thread, threads per CTA).
VARIANTS = [
    *(_cast(f"cast/e{e}t{t}", (16384, 7168), jnp.float32, jnp.bfloat16, tuning=(e, t)) for e, t in [(8, 256), (32, 256), (16, 512), (16, 128)]),
    _per_token("e4m3_ue8m0/e16t256", 65536, 7168, "e4m3", 128, PACKED, tuning=(16, 256)),
    *(_per_token(f"e2m1_ue8m0/e{e}t{t}", 16384, 7168, "e2m1", 32, PACKED, tuning=(e, t)) for e, t in [(16, 256), (32, 512)]),
]
