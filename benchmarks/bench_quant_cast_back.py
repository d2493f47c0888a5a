"""Dequantization benchmarks (family "quant_cast_back"): cast_back of e4m3 / FP4 / E5M6 data, the E5M6
cast, and the quantize-dequantize round trip, at DeepSeek sizes, against the same ops in plain JAX."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats as F
from jax_tilek.quant.cast_back import cast_back, per_token_cast_and_cast_back
from jax_tilek.quant.e5m6 import per_token_cast_to_e5m6

from benchmarks.harness import Case

FAMILY = "quant_cast_back"


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _cast_back_case(fmt, tokens, hidden, block, layout, out, e4m3_sf=False):
    special = "e5m6" if fmt == "e5m6" else None
    round_sf = layout == "col_ue8m0"

    def make_inputs(key):
        x = jax.random.normal(key, (tokens, hidden), jnp.float32)
        data, sf = F.quantize_blocks(x, fmt, block, round_sf=round_sf, use_e4m3_sf=e4m3_sf)
        return data, F.store_sf(sf, layout)

    data, sf = jax.eval_shape(make_inputs, jax.random.key(0))
    out_dtype = jnp.bfloat16 if out == "bf16" else jnp.float32
    moved = _nbytes(data.shape, data.dtype) + _nbytes(sf.shape, sf.dtype) + _nbytes((tokens, hidden), out_dtype)
    return Case(
        family=FAMILY,
        name=f"cast_back_{block[0]}x{block[1]}_{layout}" + ("_e4m3sf" if e4m3_sf else ""),
        make_inputs=make_inputs,
        kernel=lambda d, s: cast_back((d, s), out, block, special, sf_layout=layout, impl="tilelang"),
        xla=lambda d, s: cast_back((d, s), out, block, special, sf_layout=layout, impl="xla"),
        min_bytes=moved,
        params={"shape": f"{tokens}x{hidden}", "dtype": f"{fmt}>{out}"},
    )


def _e5m6_case(tokens, hidden, dtype, layout_flags):
    def make_inputs(key):
        return (jax.random.normal(key, (tokens, hidden), jnp.float32).astype(dtype),)

    moved = _nbytes((tokens, hidden), dtype) + tokens * hidden * 3 // 2 + 4 * tokens

    def op(impl):
        return lambda x: per_token_cast_to_e5m6(x, hidden, *layout_flags, impl=impl)

    return Case(
        family=FAMILY,
        name="per_token_cast_to_e5m6",
        make_inputs=make_inputs,
        kernel=op("tilelang"),
        xla=op("xla"),
        min_bytes=moved,
        params={"shape": f"{tokens}x{hidden}", "dtype": f"{np.dtype(dtype).name}>e5m6"},
    )


def _round_trip_case(tokens, hidden, dtype, fmt, npc, **flags):
    def make_inputs(key):
        return (jax.random.normal(key, (tokens, hidden), jnp.float32).astype(dtype),)

    def op(impl):
        return lambda x: per_token_cast_and_cast_back(x, fmt, npc, impl=impl, **flags)

    return Case(
        family=FAMILY,
        name=f"cast_and_cast_back_1x{npc}" + "".join(f"_{k}" for k, v in flags.items() if v),
        make_inputs=make_inputs,
        kernel=op("tilelang"),
        xla=op("xla"),
        min_bytes=2 * _nbytes((tokens, hidden), dtype),
        params={"shape": f"{tokens}x{hidden}", "dtype": f"{np.dtype(dtype).name}>{fmt}"},
    )


CASES = [
    _cast_back_case("e4m3", 16384, 7168, (1, 128), "col_ue8m0", "bf16"),
    _cast_back_case("e4m3", 65536, 4096, (1, 128), "row", "bf16"),
    _cast_back_case("e4m3", 16384, 7168, (128, 128), "row", "bf16"),
    _cast_back_case("e4m3", 4096, 4096, (1, 128), "col", "fp32"),
    _cast_back_case("e4m3", 16384, 7168, (1, 128), "col", "bf16", e4m3_sf=True),  # e4m3 scales, 16-byte aligned columns
    _cast_back_case("e4m3", 65536, 576, (1, 128), "col_ue8m0", "bf16"),  # a partial last block
    _cast_back_case("e2m1", 16384, 7168, (1, 32), "col_ue8m0", "bf16"),
    _cast_back_case("e5m6", 16384, 7168, (1, 7168), "row", "bf16"),
    _e5m6_case(16384, 7168, jnp.bfloat16, (False, False, False)),
    _round_trip_case(16384, 7168, jnp.bfloat16, "e4m3", 128),
    _round_trip_case(16384, 4096, jnp.bfloat16, "e2m1", 16, use_e4m3_sf=True),
    _round_trip_case(65536, 576, jnp.bfloat16, "e4m3", 128),  # a partial last group
]
