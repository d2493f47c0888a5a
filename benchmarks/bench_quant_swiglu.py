"""SwiGLU benchmarks (family "quant_swiglu"): the forward with and without its per-token e4m3 cast, the
backward (un-quantized and from e4m3 with the gradient's cast), and the v1 per-channel cast, at DeepSeek
expert sizes (intermediate H = 2048, 4096), against the same ops written in plain JAX under jit."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.quant import formats
from jax_tilek.quant.swiglu import swiglu_backward, swiglu_forward
from jax_tilek.quant.swiglu_quant import (
    swiglu_backward_and_per_token_cast,
    swiglu_forward_and_per_channel_cast_and_transpose,
    swiglu_forward_and_per_token_cast,
)

from benchmarks.harness import Case
from benchmarks.plain_jax import per_token_cast_e4m3

F32, BF16 = jnp.float32, jnp.bfloat16
EXPERTS, ALIGN = 8, 128
SF_FLAGS = {"row": (False, False, False), "col_ue8m0": (True, True, True)}  # col-major, packed, round_sf


# ---------------------------------------------------------------------------------------------
# The ops in plain JAX.


def _valid(t, psum):
    rows = jnp.arange(t)
    e = jnp.searchsorted(psum, rows, side="right")
    prev = jnp.where(e > 0, psum[jnp.maximum(e - 1, 0)], 0)
    return (e < psum.shape[0]) & (rows >= (prev + ALIGN - 1) // ALIGN * ALIGN)


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
# Inputs.


def _psum(t):
    """Eight experts with uneven, 128-aligned segments covering about 90% of the rows."""
    sizes = np.array([0.2, 0.05, 0.15, 0.1, 0.0, 0.2, 0.1, 0.1]) * t
    psum, prev = [], 0
    for n in sizes:
        start = -(-prev // ALIGN) * ALIGN
        prev = min(start + int(n), t)
        psum.append(prev)
    return jnp.asarray(psum, jnp.int32)


def _forward_inputs(t, h, routed):
    def make(key):
        kx, kw = jax.random.split(key)
        x = (jax.random.normal(kx, (t, 2 * h), F32) * 2).astype(BF16)
        if not routed:
            return (x,)
        return x, _psum(t), jax.random.uniform(kw, (t,), F32)

    return make


def _forward_cast_case(t, h, npc, layout, routed):
    col_major, packed, round_sf = SF_FLAGS[layout]
    kw = dict(routed_scaling_factor=2.5, clamp_value=10.0, with_clamped_count=True, token_alignment=ALIGN) if routed else {}
    sf_bytes = t * h // npc * (1 if packed else 4)
    moved = t * 2 * h * 2 + t * h + sf_bytes + (t * 4 if routed else 0)

    def kernel(x, psum=None, w=None):
        return swiglu_forward_and_per_token_cast(
            x, "e4m3", npc, psum, w, use_tma_aligned_col_major_sf=col_major, round_sf=round_sf, use_packed_ue8m0=packed, impl="tilelang", **kw
        )  # fmt: skip

    def xla(x, psum=None, w=None):
        act = _plain_act(x, w, 2.5, 10.0 if routed else None)
        if not routed:
            return per_token_cast_e4m3(act, npc, layout)
        valid = _valid(x.shape[0], psum)
        q, sf = per_token_cast_e4m3(jnp.where(valid[:, None], act, 0), npc, layout)
        h_ = x.shape[1] // 2
        l, r = x[:, :h_].astype(F32), x[:, h_:].astype(F32)
        counts = jnp.stack([jnp.sum((c & valid[:, None]).astype(jnp.int32)) for c in (l > 10, r > 10, r < -10)] + [jnp.sum(valid) * h_])
        return q, sf, counts

    return Case(
        family="quant_swiglu", name=f"fwd_cast_{npc}_{layout}" + ("_routed" if routed else ""),
        make_inputs=_forward_inputs(t, h, routed), kernel=kernel, xla=xla, min_bytes=moved,
        params={"shape": f"{t}x{2 * h}", "dtype": "bfloat16"},
    )  # fmt: skip


def _forward_case(t, h):
    return Case(
        family="quant_swiglu", name="fwd_bf16",
        make_inputs=_forward_inputs(t, h, False),
        kernel=lambda x: swiglu_forward(x, "bf16", impl="tilelang"),
        xla=lambda x: _plain_act(x).astype(BF16),
        min_bytes=t * 2 * h * 2 + t * h * 2, params={"shape": f"{t}x{2 * h}", "dtype": "bfloat16"},
    )  # fmt: skip


def _backward_case(t, h):
    def make(key):
        kx, kg, kw = jax.random.split(key, 3)
        x = (jax.random.normal(kx, (t, 2 * h), F32) * 2).astype(BF16)
        return x, jax.random.normal(kg, (t, h), BF16), _psum(t), jax.random.uniform(kw, (t,), F32)

    def kernel(x, g, psum, w):
        return swiglu_backward(x, g, "bf16", psum, w, 2.5, 10.0, ALIGN, impl="tilelang")

    def xla(x, g, psum, w):
        grad, wg, _ = _plain_backward(x.astype(F32), g, w, 2.5, 10.0)
        valid = _valid(t, psum)
        return jnp.where(valid[:, None], grad, 0).astype(BF16), jnp.where(valid, wg, 0)

    moved = t * 2 * h * 2 * 2 + t * h * 2 + t * 8
    return Case(
        family="quant_swiglu", name="bwd_bf16_routed", make_inputs=make, kernel=kernel, xla=xla, min_bytes=moved,
        params={"shape": f"{t}x{2 * h}", "dtype": "bfloat16"},
    )  # fmt: skip


def _backward_cast_case(t, h, npc=128, layout="col_ue8m0"):
    col_major, packed, round_sf = SF_FLAGS[layout]

    def make(key):
        kx, kg, kw = jax.random.split(key, 3)
        x = jax.random.normal(kx, (t, 2 * h), F32) * 2
        q, sf = formats.quantize_blocks(x, "e4m3", (1, npc), round_sf=True)
        return q, formats.store_sf(sf, layout), jax.random.normal(kg, (t, h), BF16), _psum(t), jax.random.uniform(kw, (t,), F32)

    def kernel(q, sf, g, psum, w):
        return swiglu_backward_and_per_token_cast(
            (q, sf), g, "e4m3", npc, psum, w, 2.5, col_major, round_sf, packed, 10.0, True, ALIGN, impl="tilelang"
        )  # fmt: skip

    def xla(q, sf, g, psum, w):
        xf = q.astype(F32) * jnp.repeat(formats.load_sf(sf, layout, (t, 2 * h // npc)), npc, axis=1)
        grad, wg, act = _plain_backward(xf, g, w, 2.5, 10.0)
        valid = _valid(t, psum)[:, None]
        grad = jnp.where(valid, grad, 0)
        return grad.astype(BF16), per_token_cast_e4m3(grad, npc, layout), jnp.where(valid[:, 0], wg, 0), jnp.where(valid, act, 0).astype(BF16)

    sf_bytes = t * 2 * h // npc * (1 if packed else 4)
    moved = (t * 2 * h + sf_bytes + t * h * 2 + t * 4) + (t * 2 * h * 2 + t * 2 * h + sf_bytes + t * 4 + t * h * 2)
    return Case(
        family="quant_swiglu", name=f"bwd_cast_{npc}_{layout}_routed", make_inputs=make, kernel=kernel, xla=xla, min_bytes=moved,
        params={"shape": f"{t}x{2 * h}", "dtype": "float8_e4m3fn"},
    )  # fmt: skip


def _per_channel_case(t, h, npt=128):
    def xla(x):
        act = _plain_act(x).astype(BF16).astype(F32)
        a = jnp.maximum(jnp.max(jnp.abs(act.reshape(t // npt, npt, h)), axis=1), 1e-4)
        q = jnp.clip(act.reshape(t // npt, npt, h) * (448 / a)[:, None], -448, 448).astype(jnp.float8_e4m3fn)
        return q.reshape(t, h).T, a / 448

    return Case(
        family="quant_swiglu", name=f"per_channel_{npt}_transpose",
        make_inputs=_forward_inputs(t, h, False),
        kernel=lambda x: swiglu_forward_and_per_channel_cast_and_transpose(x, "e4m3", npt, impl="tilelang"),
        xla=xla, min_bytes=t * 2 * h * 2 + t * h + t // npt * h * 4,
        params={"shape": f"{t}x{2 * h}", "dtype": "bfloat16"},
    )  # fmt: skip


CASES = [
    _forward_cast_case(4096, 4096, 128, "col_ue8m0", False),
    _forward_cast_case(32768, 2048, 128, "col_ue8m0", False),
    _forward_cast_case(65536, 2048, 32, "row", True),
    _forward_case(32768, 2048),
    _backward_case(32768, 2048),
    _backward_cast_case(32768, 2048),
    _per_channel_case(16384, 4096),
]
