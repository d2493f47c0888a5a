"""Fused RMSNorm benchmarks (family "quant_norm"): norm_forward, norm_forward_and_per_token_cast and
norm_backward at DeepSeek hidden sizes, against the same ops written in plain JAX under jit."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant.norm import norm_backward, norm_forward, norm_forward_and_per_token_cast

from benchmarks.harness import Case
from benchmarks.plain_jax import per_token_cast_e4m3

EPS = 1e-6
F32 = jnp.float32
SF_FLAGS = {"row": (False, False, False), "col_ue8m0": (True, True, True)}  # col, round_sf, packed


def _plain_norm(x, w, r, out_scale=1.0):
    s = x if r is None else (x.astype(F32) + r.astype(F32)).astype(x.dtype)
    sv = s.astype(F32)
    rstd = jax.lax.rsqrt(jnp.mean(sv * sv, axis=-1, keepdims=True) + EPS)
    return (sv * rstd * (w.astype(F32) * out_scale)).astype(x.dtype), rstd[:, 0], s


def _plain_backward(dy, x, w, rstd, rg):
    rs = rstd[:, None]
    xh, g = x.astype(F32) * rs, dy.astype(F32)
    gw = g * w.astype(F32)
    dx = (gw - xh * jnp.mean(xh * gw, axis=-1, keepdims=True)) * rs
    if rg is not None:
        dx = dx + rg.astype(F32)
    return dx.astype(x.dtype), jnp.sum(xh * g, axis=0)


def _normal(key, shape, dtype, scale=1.0):
    return (jax.random.normal(key, shape, F32) * scale).astype(dtype)


def _forward_inputs(t, h, dtype, residual):
    def make(key):
        kx, kw, kr = jax.random.split(key, 3)
        x, w = _normal(kx, (t, h), dtype, 4), _normal(kw, (h,), dtype, 0.5) + 1
        return (x, w, _normal(kr, (t, h), dtype)) if residual else (x, w)

    return make


def _forward_case(t, h, dtype=jnp.bfloat16, residual=True):
    esize = np.dtype(dtype).itemsize
    moved = t * h * esize * (2 + 2 * residual) + h * esize  # x (+ residual) in; out (+ norm_input) out; weight

    def kernel(x, w, r=None):  # norm_input is x itself without a residual: not returned (XLA would copy it)
        out, _, ni = norm_forward(x, w, EPS, residual=r, impl="tilelang")
        return (out, ni) if residual else out

    def xla(x, w, r=None):
        y, _, s = _plain_norm(x, w, r)
        return (y, s) if residual else y

    return Case(
        family="quant_norm", name="forward" + ("_residual" if residual else ""),
        make_inputs=_forward_inputs(t, h, dtype, residual), kernel=kernel, xla=xla, min_bytes=moved,
        params={"shape": f"{t}x{h}", "dtype": np.dtype(dtype).name},
    )  # fmt: skip


def _cast_case(t, h, layout, with_out, dtype=jnp.bfloat16):
    esize = np.dtype(dtype).itemsize
    col, round_sf, packed = SF_FLAGS[layout]
    sf_bytes = t * h // 32 * (1 if packed else 4)
    moved = t * h * esize * (3 + with_out) + h * esize + t * h + sf_bytes  # x, residual in; norm_input (+ y), data, sf out

    def kernel(x, w, r):
        (data, sf), out, _, ni = norm_forward_and_per_token_cast(
            x, w, EPS, residual=r, use_tma_aligned_col_major_sf=col, round_sf=round_sf, use_packed_ue8m0=packed,
            with_out_bf16=with_out, impl="tilelang",
        )  # fmt: skip
        return data, sf, out, ni

    def xla(x, w, r):
        y, _, s = _plain_norm(x, w, r)
        data, sf = per_token_cast_e4m3(y, 32, layout)
        return data, sf, (y if with_out else None), s

    return Case(
        family="quant_norm", name=f"forward_cast_{layout}" + ("_out" if with_out else ""),
        make_inputs=_forward_inputs(t, h, dtype, True), kernel=kernel, xla=xla, min_bytes=moved,
        params={"shape": f"{t}x{h}", "dtype": np.dtype(dtype).name},
    )  # fmt: skip


def _backward_case(t, h, residual_grad, dtype=jnp.bfloat16):
    esize = np.dtype(dtype).itemsize
    moved = t * h * esize * (3 + residual_grad) + t * 4 + h * (esize + 4)  # dy, x (, rg) in; dx out; rstd; w in, dw out

    def make(key):
        kd, kx, kw, kr, kg = jax.random.split(key, 5)
        dy, x = _normal(kd, (t, h), dtype), _normal(kx, (t, h), dtype, 4)
        w, rstd = _normal(kw, (h,), dtype, 0.5) + 1, jax.random.uniform(kr, (t,), F32, 0.1, 1.0)
        return (dy, x, w, rstd) + ((_normal(kg, (t, h), dtype),) if residual_grad else ())

    def kernel(dy, x, w, rstd, rg=None):
        return norm_backward(dy, x, w, rstd, residual_out_grad=rg, impl="tilelang")

    return Case(
        family="quant_norm", name="backward" + ("_residual" if residual_grad else ""),
        make_inputs=make, kernel=kernel, xla=_plain_backward if residual_grad else lambda *a: _plain_backward(*a, None),
        min_bytes=moved, params={"shape": f"{t}x{h}", "dtype": np.dtype(dtype).name},
    )  # fmt: skip


CASES = [
    _forward_case(16384, 7168),
    _forward_case(65536, 4096, residual=False),
    _cast_case(16384, 7168, "col_ue8m0", with_out=False),
    _cast_case(4096, 7168, "col_ue8m0", with_out=False),
    _cast_case(65536, 4096, "row", with_out=True),
    _backward_case(16384, 7168, residual_grad=True),
    _backward_case(4096, 4096, residual_grad=False),
    _backward_case(65536, 4096, residual_grad=True),
]


def _tuned(case, name, tuning):
    """``case`` run with the kernel tuned by hand (``tuning`` of the internal op), without the XLA timing."""
    from jax_tilek.quant import norm

    if case.name.startswith("forward_residual"):

        def kernel(x, w, r):
            return norm._forward_op(
                x, r, w, impl="tilelang", eps=EPS, out_scale=1.0, has_residual=True, has_weight=True, with_out=True,
                with_rstd=False, sf_layout="", round_sf=False, tuning=tuning,
            )  # fmt: skip
    else:

        def kernel(dy, x, w, rstd, rg):
            return norm._backward_op(dy, x, rstd, w, rg, impl="tilelang", out_scale=1.0, has_weight=True, has_residual_grad=True, tuning=tuning)

    return Case(
        family="quant_norm", name=f"{case.name}/{name}", make_inputs=case.make_inputs, kernel=kernel, xla=None,
        min_bytes=case.min_bytes, params=case.params,
    )  # fmt: skip


# Defaults: forward 3 CTAs/SM at 7168 (bf16); backward 1 CTA x 3 stages at 7168, 2 CTAs x 2 stages at 4096.
VARIANTS = [
    *(_tuned(CASES[0], f"blocks{n}", (("blocks_per_sm", n),)) for n in (2, 4)),
    *(_tuned(CASES[5], f"ctas{c}_stages{s}", (("ctas_per_sm", c), ("stages", s))) for c, s in ((2, 2), (1, 4))),
    *(_tuned(CASES[7], f"ctas{c}_stages{s}", (("ctas_per_sm", c), ("stages", s))) for c, s in ((2, 4), (3, 2))),
]
