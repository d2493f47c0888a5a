"""Fused RMSNorm benchmarks (family "quant_norm"): norm_forward, norm_forward_and_per_token_cast and
norm_backward at DeepSeek hidden sizes, against the same ops written in plain JAX under jit, and the
kernels' tunings (``VARIANTS``). The cases are the functions' named benchmark calls (``bench_*``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.norm import norm_backward, norm_forward, norm_forward_and_per_token_cast

from benchmarks.harness import Case
from benchmarks.plain_jax import per_token_cast_e4m3

F32 = jnp.float32


def _plain_norm(x, w, eps, r, out_scale=1.0):
    s = x if r is None else (x.astype(F32) + r.astype(F32)).astype(x.dtype)
    sv = s.astype(F32)
    rstd = jax.lax.rsqrt(jnp.mean(sv * sv, axis=-1, keepdims=True) + eps)
    return (sv * rstd * (w.astype(F32) * out_scale)).astype(x.dtype), rstd[:, 0], s


def _plain_forward(x, w, eps, r):
    y, _, s = _plain_norm(x, w, eps, r)
    return y if r is None else (y, s)


def _plain_cast(layout, with_out):
    def plain(x, w, eps, fmt, num_per_channels, r):
        y, _, s = _plain_norm(x, w, eps, r)
        data, sf = per_token_cast_e4m3(y, num_per_channels, layout)
        return data, sf, (y if with_out else None), s

    return plain


def _plain_backward(dy, x, w, rstd, rg):
    rs = rstd[:, None]
    xh, g = x.astype(F32) * rs, dy.astype(F32)
    gw = g * w.astype(F32)
    dx = (gw - xh * jnp.mean(xh * gw, axis=-1, keepdims=True)) * rs
    if rg is not None:
        dx = dx + rg.astype(F32)
    return dx.astype(x.dtype), jnp.sum(xh * g, axis=0)


def _case(fn, spec, xla, moved: int, x: jax.ShapeDtypeStruct) -> Case:
    """The benchmark of a named call: named without "bench_" and the shape (``forward_residual``, and
    ``backward_residual/ctas2_stages2`` for a tuning); a tuning is not timed in plain JAX."""
    shape = "x".join(map(str, x.shape))
    kind, _, tuning = spec.name.removeprefix("bench_").partition(f"_{shape}")
    case = Case.of_spec("quant_norm", fn, spec, xla, moved, {"shape": shape, "dtype": np.dtype(x.dtype).name})
    kernel = case.kernel

    def without_inputs(*arrays):  # an input returned as it is (norm_input without a residual): XLA would copy it
        return [y for y in jax.tree.leaves(kernel(*arrays)) if all(y is not a for a in arrays)]

    name = kind + ("/" + tuning.removeprefix("_") if tuning else "")
    return dataclasses.replace(case, name=name, kernel=without_inputs, xla=None if tuning else case.xla)


def _forward(spec) -> Case:
    x, _, _, r = spec.args
    (t, h), esize = x.shape, np.dtype(x.dtype).itemsize
    moved = t * h * esize * (2 + 2 * (r is not None)) + h * esize  # x (+ residual) in; out (+ norm_input) out; weight
    return _case(norm_forward, spec, _plain_forward, moved, x)


def _cast(spec) -> Case:
    x, *_ = spec.args
    (t, h), esize = x.shape, np.dtype(x.dtype).itemsize
    options = spec.kwargs
    layout = "col_ue8m0" if options["use_packed_ue8m0"] else "row"
    sf_bytes = t * h // 32 * (1 if options["use_packed_ue8m0"] else 4)
    moved = t * h * esize * (3 + options["with_out_bf16"]) + h * esize + t * h + sf_bytes  # x, residual in; norm_input (+ y), data, sf out
    return _case(norm_forward_and_per_token_cast, spec, _plain_cast(layout, options["with_out_bf16"]), moved, x)


def _backward(spec) -> Case:
    _, x, _, _, rg = spec.args
    (t, h), esize = x.shape, np.dtype(x.dtype).itemsize
    moved = t * h * esize * (3 + (rg is not None)) + t * 4 + h * (esize + 4)  # dy, x (, rg) in; dx out; rstd; w in, dw out
    return _case(norm_backward, spec, _plain_backward, moved, x)


def _bench(fn, case, tunings: bool) -> list[Case]:
    return [case(s) for s in fn.cases if s.name.startswith("bench_") and tunings == bool(s.config)]


# Defaults: forward 3 CTAs/SM at 7168 (bf16); backward 1 CTA x 3 stages at 7168, 2 CTAs x 2 stages at 4096.
CASES = _bench(norm_forward, _forward, False) + _bench(norm_forward_and_per_token_cast, _cast, False) + _bench(norm_backward, _backward, False)
VARIANTS = _bench(norm_forward, _forward, True) + _bench(norm_backward, _backward, True)
