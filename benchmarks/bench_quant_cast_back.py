"""Dequantization benchmarks (family "quant_cast_back"): cast_back of e4m3 / FP4 / E5M6 data, the E5M6
cast, and the quantize-dequantize round trip, at DeepSeek sizes, against the same ops in plain JAX. The
cases are the ops' named benchmark calls (``bench_``)."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import cast_back, per_token_cast_and_cast_back, per_token_cast_to_e5m6
from jax_tilek.quant import formats as F

from benchmarks.harness import Case

FAMILY = "quant_cast_back"


def _nbytes(struct) -> int:
    return int(np.prod(struct.shape)) * np.dtype(struct.dtype).itemsize


def _cast_back_case(spec) -> Case:
    ((data, sf),) = spec.args
    options = spec.kwargs
    fmt = "e5m6" if options["x_special_fmt"] else "e4m3" if data.dtype == jnp.float8_e4m3fn else "e2m1"
    block, layout = options["x_block_size"], options["sf_layout"]
    tokens, hidden = data.shape[0], F.logical_width(data, fmt)

    def make_inputs(key):
        x = jax.random.normal(key, (tokens, hidden), jnp.float32)
        values, scales = F.quantize_blocks(x, fmt, block, round_sf="ue8m0" in layout, use_e4m3_sf=sf.dtype == jnp.float8_e4m3fn)
        return values, F.store_sf(scales, layout)

    out = jnp.bfloat16 if options["fmt"] == "bf16" else jnp.float32
    moved = _nbytes(data) + _nbytes(sf) + tokens * hidden * np.dtype(out).itemsize
    params = {"shape": f"{tokens}x{hidden}", "dtype": f"{fmt}>{options['fmt']}"}
    kernel, xla = spec.call(cast_back, "tilelang"), spec.call(cast_back, "xla")  # x is the QuantTensor (data, sf)
    return Case(FAMILY, spec.name, make_inputs, lambda d, s: kernel((d, s)), lambda d, s: xla((d, s)), moved, params)


def _e5m6_case(spec) -> Case:
    (x,) = spec.args
    tokens, hidden = x.shape
    moved = _nbytes(x) + tokens * hidden * 3 // 2 + 4 * tokens
    return Case.of_spec(FAMILY, per_token_cast_to_e5m6, spec, None, moved, {"shape": f"{tokens}x{hidden}", "dtype": f"{np.dtype(x.dtype).name}>e5m6"})


def _round_trip_case(spec) -> Case:
    (x,) = spec.args
    params = {"shape": "x".join(map(str, x.shape)), "dtype": f"{np.dtype(x.dtype).name}>{spec.kwargs['fmt']}"}
    return Case.of_spec(FAMILY, per_token_cast_and_cast_back, spec, None, 2 * _nbytes(x), params)


def _bench(fn) -> list:
    return [s for s in fn.cases if s.name.startswith("bench_")]


CASES = [
    *(_cast_back_case(s) for s in _bench(cast_back)),
    *(_e5m6_case(s) for s in _bench(per_token_cast_to_e5m6)),
    *(_round_trip_case(s) for s in _bench(per_token_cast_and_cast_back)),
]
