"""SwiGLU benchmarks (family "quant_swiglu"): the forward with and without its per-token e4m3 cast, the
backward (un-quantized and from e4m3 with the gradient's cast), and the v1 per-channel cast, at DeepSeek
expert sizes (intermediate H = 2048, 4096), against the same ops written in plain JAX under jit. The
cases are the functions' named benchmark calls (``bench=True``)."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats
from jax_tilek.swiglu import (
    swiglu_backward,
    swiglu_backward_and_per_token_cast,
    swiglu_forward,
    swiglu_forward_and_per_channel_cast_and_transpose,
    swiglu_forward_and_per_token_cast,
)

from benchmarks.harness import Case
from benchmarks.plain_jax import per_token_cast_e4m3

FAMILY = "quant_swiglu"
F32, BF16 = jnp.float32, jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# The ops in plain JAX.


def _valid(t, psum, align):
    rows = jnp.arange(t)
    e = jnp.searchsorted(psum, rows, side="right")
    prev = jnp.where(e > 0, psum[jnp.maximum(e - 1, 0)], 0)
    return (e < psum.shape[0]) & (rows >= (prev + align - 1) // align * align)


def _plain_act(x, w=None, rsf=None, clamp=None):
    h = x.shape[1] // 2
    l, r = x[:, :h].astype(F32), x[:, h:].astype(F32)
    if clamp is not None:
        l, r = jnp.minimum(l, clamp), jnp.clip(r, -clamp, clamp)
    act = l / (1 + jnp.exp(-l)) * r
    if w is not None:
        act = act * (w * rsf)[:, None]
    return act


def _plain_backward(xf, g, w, rsf, clamp):
    h = xf.shape[1] // 2
    l0, r0 = xf[:, :h], xf[:, h:]
    l, r = (jnp.minimum(l0, clamp), jnp.clip(r0, -clamp, clamp)) if clamp is not None else (l0, r0)
    s = jax.nn.sigmoid(l)
    silu, g = l * s, g.astype(F32)
    gw = g if w is None else g * (w * rsf)[:, None]
    dl = gw * r * s * (1 + l * (1 - s))
    dr = gw * silu
    if clamp is not None:
        dl, dr = jnp.where(l0 > clamp, 0, dl), jnp.where(jnp.abs(r0) > clamp, 0, dr)
    act = silu * r
    wg = None if w is None else jnp.sum(g * act, axis=1) * rsf
    return jnp.concatenate([dl, dr], axis=1), wg, act if w is None else act * (w * rsf)[:, None]


# ---------------------------------------------------------------------------------------------
# Inputs (made on the device): x, the psum layout, topk weights, output gradients.


def _psum(t, experts, align):
    """Uneven, aligned segments covering about 90% of the rows (8 experts, one empty)."""
    assert experts == 8
    sizes = np.array([0.2, 0.05, 0.15, 0.1, 0.0, 0.2, 0.1, 0.1]) * t
    psum, prev = [], 0
    for n in sizes:
        start = -(-prev // align) * align
        prev = min(start + int(n), t)
        psum.append(prev)
    return jnp.asarray(psum, jnp.int32)


def _routing(key, spec, psum, w) -> tuple:
    """The spec's psum layout (its experts and token alignment) and topk weights in [0, 1)."""
    return _psum(w.shape[0], psum.shape[0], spec.kwargs["token_alignment"]), jax.random.uniform(key, w.shape, F32)


def _x(key, t, w):
    return (jax.random.normal(key, (t, w), F32) * 2).astype(BF16)


def _x_only(t, w):
    return lambda key: (_x(jax.random.split(key)[0], t, w),)


def _sf_layout(spec) -> str:
    k = spec.kwargs
    return formats.sf_layout(k["use_tma_aligned_col_major_sf"], k["use_packed_ue8m0"], k["round_sf"])


def _params(x) -> dict:
    return {"shape": "x".join(map(str, x.shape)), "dtype": np.dtype(x.dtype).name}


# ---------------------------------------------------------------------------------------------
# The cases.


def _forward_cast_case(spec) -> Case:
    x, routed = spec.args[0], spec.args[1:]
    t, h = x.shape[0], x.shape[1] // 2
    npc, layout, k = spec.template[2], _sf_layout(spec), spec.kwargs
    rsf, clamp = k.get("routed_scaling_factor"), k.get("clamp_value")

    def make(key):
        kx, kw = jax.random.split(key)
        return (_x(kx, t, 2 * h), *_routing(kw, spec, *routed)) if routed else (_x(kx, t, 2 * h),)

    def xla(x, psum=None, w=None):
        act = _plain_act(x, w, rsf, clamp)
        if not routed:
            return per_token_cast_e4m3(act, npc, layout)
        valid = _valid(t, psum, k["token_alignment"])
        q, sf = per_token_cast_e4m3(jnp.where(valid[:, None], act, 0), npc, layout)
        l, r = x[:, :h].astype(F32), x[:, h:].astype(F32)
        counts = jnp.stack([jnp.sum((c & valid[:, None]).astype(jnp.int32)) for c in (l > clamp, r > clamp, r < -clamp)] + [jnp.sum(valid) * h])
        return q, sf, counts

    sf_bytes = t * h // npc * (1 if layout == "col_ue8m0" else 4)
    moved = t * 2 * h * 2 + t * h + sf_bytes + (t * 4 if routed else 0)
    return Case.of_spec(FAMILY, swiglu_forward_and_per_token_cast, spec, xla, moved, _params(x), make)


def _forward_case(spec) -> Case:
    (x,) = spec.args
    t, h = x.shape[0], x.shape[1] // 2
    xla = lambda x: _plain_act(x).astype(BF16)  # noqa: E731
    return Case.of_spec(FAMILY, swiglu_forward, spec, xla, t * 2 * h * 2 + t * h * 2, _params(x), _x_only(t, 2 * h))


def _backward_case(spec) -> Case:
    x, g, psum, w = spec.args
    t, h = x.shape[0], x.shape[1] // 2
    k = spec.kwargs

    def make(key):
        kx, kg, kw = jax.random.split(key, 3)
        return (_x(kx, t, 2 * h), jax.random.normal(kg, g.shape, BF16), *_routing(kw, spec, psum, w))

    def xla(x, g, psum, w):
        grad, wg, _ = _plain_backward(x.astype(F32), g, w, k["routed_scaling_factor"], k["clamp_value"])
        valid = _valid(t, psum, k["token_alignment"])
        return jnp.where(valid[:, None], grad, 0).astype(BF16), jnp.where(valid, wg, 0)

    moved = t * 2 * h * 2 * 2 + t * h * 2 + t * 8
    return Case.of_spec(FAMILY, swiglu_backward, spec, xla, moved, _params(x), make)


def _backward_cast_case(spec) -> Case:
    q, _, g, psum, w = spec.args
    t, h = q.shape[0], q.shape[1] // 2
    npc, layout, k = spec.template[3], _sf_layout(spec), spec.kwargs
    assert k["x_sf_layout"] == layout and k["round_sf"]

    def make(key):
        kx, kg, kw = jax.random.split(key, 3)
        x = jax.random.normal(kx, (t, 2 * h), F32) * 2
        xq, sf = formats.quantize_blocks(x, "e4m3", (1, npc), round_sf=True)
        return xq, formats.store_sf(sf, layout), jax.random.normal(kg, g.shape, BF16), *_routing(kw, spec, psum, w)

    def xla(q, sf, g, psum, w):
        xf = q.astype(F32) * jnp.repeat(formats.load_sf(sf, layout, (t, 2 * h // npc)), npc, axis=1)
        grad, wg, act = _plain_backward(xf, g, w, k["routed_scaling_factor"], k["clamp_value"])
        valid = _valid(t, psum, k["token_alignment"])[:, None]
        grad = jnp.where(valid, grad, 0)
        return grad.astype(BF16), per_token_cast_e4m3(grad, npc, layout), jnp.where(valid[:, 0], wg, 0), jnp.where(valid, act, 0).astype(BF16)

    sf_bytes = t * 2 * h // npc * (1 if layout == "col_ue8m0" else 4)
    moved = (t * 2 * h + sf_bytes + t * h * 2 + t * 4) + (t * 2 * h * 2 + t * 2 * h + sf_bytes + t * 4 + t * h * 2)
    return Case.of_spec(FAMILY, swiglu_backward_and_per_token_cast, spec, xla, moved, _params(q), make)


def _per_channel_case(spec) -> Case:
    (x,) = spec.args
    t, h = x.shape[0], x.shape[1] // 2
    npt = spec.kwargs["num_per_tokens"]
    assert not spec.kwargs["without_transpose"] and spec.kwargs["swiglu_clamp_value"] is None

    def xla(x):
        act = _plain_act(x).astype(BF16).astype(F32)
        a = jnp.maximum(jnp.max(jnp.abs(act.reshape(t // npt, npt, h)), axis=1), 1e-4)
        q = jnp.clip(act.reshape(t // npt, npt, h) * (448 / a)[:, None], -448, 448).astype(jnp.float8_e4m3fn)
        return q.reshape(t, h).T, a / 448

    moved = t * 2 * h * 2 + t * h + t // npt * h * 4
    return Case.of_spec(FAMILY, swiglu_forward_and_per_channel_cast_and_transpose, spec, xla, moved, _params(x), _x_only(t, 2 * h))


def _bench(fn, build) -> list[Case]:
    return [build(spec) for spec in fn.cases if spec.bench]


CASES = [
    *_bench(swiglu_forward_and_per_token_cast, _forward_cast_case),
    *_bench(swiglu_forward, _forward_case),
    *_bench(swiglu_backward, _backward_case),
    *_bench(swiglu_backward_and_per_token_cast, _backward_cast_case),
    *_bench(swiglu_forward_and_per_channel_cast_and_transpose, _per_channel_case),
]
