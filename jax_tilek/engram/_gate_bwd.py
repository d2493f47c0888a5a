"""engram_gate_bwd: the Engram gate's backward pass (TileKernels v1 §4.4, v2.1 §2.4: packed ``kv``,
image tokens), from the forward's saved ``dot``, ``gate_score``, ``rstd_x``, ``rstd_k``.

Per token t and head h, in fp32, with ``go = grad_out[t, h]``, x, k, v, w as in the forward,
``c = H^-1/2 · rstd_x · rstd_k`` and ``g = gate_score``::

    dL/dgate = sum(go * v)
    dr       = 0 if |dot| · c < clamp_value else dL/dgate · g (1 - g) · 0.5 · sqrt(c / |dot|)
    grad_x   = go + dr · (k · w - x · dot · rstd_x² / H)
    grad_k   = dr · (x · w - k · dot · rstd_k² / H)
    grad_v   = sum over heads of go · g                      (heads in order)
    grad_w_partial[p, h] = sum over the tokens of block p of dr · x · k

(the gradient of the forward's ``out`` through the RMS statistics included: this is JAX's gradient of
the forward reference). Image tokens: ``grad_x = grad_out``, ``grad_k = grad_v = 0``, no weight
gradient. ``grad_kv`` packs ``[grad_k, grad_v]`` like ``kv``; grad_x and grad_kv are bf16.

The weight gradient comes as ``GATE_PARTIALS`` (132) partial rows, row p the sum over tokens
``[p · ceil(T/132), (p + 1) · ceil(T/132))`` -- a fixed partition (TileKernels: one row per SM), so
the sum is the same on every GPU; :func:`jax_tilek.engram.grad_w_reduce` reduces them in a fixed
order. Kernel: CTA (h, p) takes head h of block p's tokens, keeps its weight-gradient slice in
registers, reduces dL/dgate over the CTA per token, and also writes grad_v for the 1/hc-th slice of H
that belongs to head h (reading the other heads' grad_out, which their CTAs are loading at the same
time, mostly from L2).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import BF16, F32, GATE_PARTIALS, VEC, check_dtype, check_mask, gate_layout, positive
from jax_tilek.engram._gate_fwd import GateConfig, check_gate_inputs, check_stat, default_gate_config, gate_fwd_reference, gate_make
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, config_class, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True, "tl.disable_thread_storage_sync": True}


def token_blocks(tokens: int, partials: int = GATE_PARTIALS) -> int:
    """Tokens per partial row of the weight gradient."""
    return -(-tokens // partials)


def blocked_sum(values: jax.Array, partials: int = GATE_PARTIALS) -> jax.Array:
    """``values [T, ...]`` summed over the tokens of each of ``partials`` contiguous blocks -> ``[partials, ...]``."""
    t = values.shape[0]
    per = token_blocks(t, partials)
    padded = jnp.pad(values, [(0, partials * per - t)] + [(0, 0)] * (values.ndim - 1))
    return jnp.sum(padded.reshape(partials, per, *values.shape[1:]), axis=1)


def gate_bwd_reference(grad_out, hidden_states, kv, weight_fused, dot, gate_score, rstd_x, rstd_k, image_token_mask, *, clamp_value, **_):
    t, hc, hidden = hidden_states.shape
    f = lambda a: a.astype(jnp.float32)  # noqa: E731
    go, x, k, v = f(grad_out), f(hidden_states), f(kv[:, :hc]), f(kv[:, hc])
    dldg = jnp.sum(go * v[:, None, :], axis=-1)
    c = hidden**-0.5 * rstd_x * rstd_k
    magnitude = jnp.abs(dot)
    dr = jnp.where(magnitude * c < clamp_value, 0.0, dldg * gate_score * (1 - gate_score) * 0.5 * jnp.sqrt(c / magnitude))
    masked = None if image_token_mask is None else image_token_mask[:, None]
    if masked is not None:
        dr = jnp.where(masked, 0.0, dr)
    cx = (dot * rstd_x * rstd_x / hidden)[..., None]
    ck = (dot * rstd_k * rstd_k / hidden)[..., None]
    grad_x = go + dr[..., None] * (k * weight_fused - x * cx)
    grad_k = dr[..., None] * (x * weight_fused - k * ck)
    grad_v = jnp.sum(go * gate_score[..., None], axis=1)
    if masked is not None:
        grad_x = jnp.where(masked[..., None], go, grad_x)
        grad_k = jnp.where(masked[..., None], 0.0, grad_k)
        grad_v = jnp.where(masked, 0.0, grad_v)
    grad_kv = jnp.concatenate([grad_k, grad_v[:, None, :]], axis=1)
    partial = blocked_sum(dr[..., None] * x * k)
    return grad_x.astype(hidden_states.dtype), grad_kv.astype(kv.dtype), partial


@config_class(GateConfig)
def _config(grad_out, *_, **__) -> GateConfig:
    return default_gate_config(grad_out.shape[-1])


@kernel(pass_configs=PASS_CONFIGS)
def gate_bwd_kernel(heads: int, hidden: int, clamp_value: float, has_mask: bool, partials: int, threads: int, blocks_per_sm: int):
    """CTA ``(h, p)`` of ``(hc, partials)`` takes head h of token block p (module docstring)."""
    import tilelang.language as T

    lay = gate_layout(hidden, threads)
    G, VPT, NV, W = lay.threads, lay.vpt, lay.nvec, lay.warps
    E = VPT * VEC
    SV = -(-NV // heads)  # grad_v vectors per head slice
    VS = -(-SV // G)
    SCALE = float(hidden) ** -0.5
    f32, bf16 = "float32", "bfloat16"
    TT = T.dynamic("T")

    @T.prim_func
    def engram_gate_bwd(
        grad_out: T.Tensor((TT, heads, hidden), bf16),
        hidden_states: T.Tensor((TT, heads, hidden), bf16),
        kv: T.Tensor((TT, heads + 1, hidden), bf16),
        weight_fused: T.Tensor((heads, hidden), f32),
        dot: T.Tensor((TT, heads), f32),
        gate_score: T.Tensor((TT, heads), f32),
        rstd_x: T.Tensor((TT, heads), f32),
        rstd_k: T.Tensor((TT, heads), f32),
        image_token_mask: T.Tensor((TT,), "bool"),
        grad_x: T.Tensor((TT, heads, hidden), bf16),
        grad_kv: T.Tensor((TT, heads + 1, hidden), bf16),
        grad_w_partial: T.Tensor((partials, heads, hidden), f32),
    ):
        with T.Kernel(heads, partials, threads=G) as (h, p):
            T.annotate_min_blocks_per_sm(blocks_per_sm)
            red = T.alloc_shared((2, W), f32)
            acc = T.alloc_local((E,), f32)
            gov = T.alloc_local((E,), bf16)
            xv = T.alloc_local((E,), bf16)
            kx = T.alloc_local((E,), bf16)
            vv = T.alloc_local((E,), bf16)
            wv = T.alloc_local((VEC,), f32)
            ox = T.alloc_local((VEC,), bf16)
            ok = T.alloc_local((VEC,), bf16)
            gts = T.alloc_local((heads,), f32)
            gvs = T.alloc_local((VEC,), f32)
            ld = T.alloc_local((VEC,), bf16)
            dl = T.alloc_var(f32)
            dr = T.alloc_var(f32)
            masked = T.alloc_var("bool")
            tid = T.get_thread_binding(0)
            lane = tid % 32
            warp = tid // 32
            per = T.ceildiv(TT, partials)
            start = T.min(per * p, TT)
            stop = T.min(start + per, TT)
            for i in T.unroll(E):
                acc[i] = T.float32(0)
            for i in T.serial(stop - start):
                t = start + i
                for j in T.unroll(VPT):
                    if j * G + tid < NV:
                        for e in T.vectorized(VEC):
                            gov[j * VEC + e] = grad_out[t, h, (j * G + tid) * VEC + e]
                        for e in T.vectorized(VEC):
                            vv[j * VEC + e] = kv[t, heads, (j * G + tid) * VEC + e]
                        for e in T.vectorized(VEC):
                            xv[j * VEC + e] = hidden_states[t, h, (j * G + tid) * VEC + e]
                        for e in T.vectorized(VEC):
                            kx[j * VEC + e] = kv[t, h, (j * G + tid) * VEC + e]
                dl = T.float32(0)
                for j in T.unroll(VPT):
                    if j * G + tid < NV:
                        for e in T.unroll(VEC):
                            dl = dl + T.Cast(f32, gov[j * VEC + e]) * T.Cast(f32, vv[j * VEC + e])
                for q in T.unroll(5):
                    dl = dl + T.shfl_xor(dl, 16 >> q)
                if W > 1:
                    if lane == 0:
                        red[i % 2, warp] = dl
                    T.sync_threads()
                    dl = red[i % 2, 0]
                    for q in T.unroll(W - 1):
                        dl = dl + red[i % 2, q + 1]
                g = gate_score[t, h]
                rx = rstd_x[t, h]
                rk = rstd_k[t, h]
                raw = dot[t, h]
                c = T.float32(SCALE) * rx * rk
                magnitude = T.abs(raw)
                dr = T.if_then_else(
                    magnitude * c < T.float32(clamp_value), T.float32(0),
                    dl * g * (T.float32(1) - g) * T.float32(0.5) * T.sqrt(c / magnitude),
                )  # fmt: skip
                masked = False
                if has_mask:
                    masked = image_token_mask[t]
                    if masked:
                        dr = T.float32(0)
                cx = raw * rx * rx / T.float32(hidden)
                ck = raw * rk * rk / T.float32(hidden)
                for j in T.unroll(VPT):
                    if j * G + tid < NV:
                        for e in T.vectorized(VEC):
                            wv[e] = weight_fused[h, (j * G + tid) * VEC + e]
                        for e in T.unroll(VEC):
                            xf = T.Cast(f32, xv[j * VEC + e])
                            kf = T.Cast(f32, kx[j * VEC + e])
                            gf = T.Cast(f32, gov[j * VEC + e])
                            ox[e] = T.if_then_else(masked, gov[j * VEC + e], T.Cast(bf16, gf + dr * (kf * wv[e] - xf * cx)))
                            ok[e] = T.if_then_else(masked, T.Cast(bf16, 0), T.Cast(bf16, dr * (xf * wv[e] - kf * ck)))
                            acc[j * VEC + e] = acc[j * VEC + e] + dr * xf * kf
                        for e in T.vectorized(VEC):
                            grad_x[t, h, (j * G + tid) * VEC + e] = ox[e]
                        for e in T.vectorized(VEC):
                            grad_kv[t, h, (j * G + tid) * VEC + e] = ok[e]
                for q in T.unroll(heads):
                    gts[q] = gate_score[t, q]
                for j in T.unroll(VS):
                    vec = h * SV + j * G + tid
                    if T.And(j * G + tid < SV, vec < NV):
                        for e in T.unroll(VEC):
                            gvs[e] = T.float32(0)
                        for q in T.unroll(heads):
                            for e in T.vectorized(VEC):
                                ld[e] = grad_out[t, q, vec * VEC + e]
                            for e in T.unroll(VEC):
                                gvs[e] = gvs[e] + T.Cast(f32, ld[e]) * gts[q]
                        for e in T.unroll(VEC):
                            ox[e] = T.if_then_else(masked, T.Cast(bf16, 0), T.Cast(bf16, gvs[e]))
                        for e in T.vectorized(VEC):
                            grad_kv[t, heads, vec * VEC + e] = ox[e]
            for j in T.unroll(VPT):
                if j * G + tid < NV:
                    for e in T.vectorized(VEC):
                        grad_w_partial[p, h, (j * G + tid) * VEC + e] = acc[j * VEC + e]

    return engram_gate_bwd


def _launch(grad_out, hidden_states, kv, weight_fused, *stats_and_mask, clamp_value, config: GateConfig) -> Launch:
    _, heads, hidden = hidden_states.shape
    image_token_mask = stats_and_mask[-1]
    return Launch(
        kernel=gate_bwd_kernel,
        params=dict(heads=heads, hidden=hidden, clamp_value=float(clamp_value), has_mask=image_token_mask is not None, partials=GATE_PARTIALS,
                    threads=config.threads, blocks_per_sm=config.blocks_per_sm),  # fmt: skip
    )


_op = TileOp(
    name="engram_gate_bwd", launch=_launch,
    operands=("grad_out", "hidden_states", "kv", "weight_fused", "dot", "gate_score", "rstd_x", "rstd_k", "image_token_mask?"),
    results=("grad_x", "grad_kv", "grad_w_partial"), reference=gate_bwd_reference, config=_config,
)  # fmt: skip


def _make(t: int, hc: int, h: int, mask: bool, eps: float, clamp: float):
    """The forward reference's saved values for realistic inputs, and a random grad_out."""
    made = gate_make(t, hc, h, mask, zero_token=True)

    def make(rng, *_):
        (x, kv, w), m = made(rng)
        _, dot, gate, rx, rk = jax.jit(lambda *a: gate_fwd_reference(*a, eps=eps, clamp_value=clamp, save_for_backward=True))(x, kv, w, m)
        go = rng.standard_normal(x.shape).astype(jnp.bfloat16)
        return (go, x, kv, w, *(jax.device_get(a) for a in (dot, gate, rx, rk)), clamp, m)

    return make


def _case(t: int, hc: int, h: int, mask: bool = False, eps: float = 1e-20, clamp: float = 1e-6, **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    x, stat = s((t, hc, h), BF16), s((t, hc), F32)
    args = (x, x, s((t, hc + 1, h), BF16), s((hc, h), F32), stat, stat, stat, stat, clamp, s((t,), jnp.bool_) if mask else None)
    name = f"t{t}_hc{hc}_h{h}" + ("_mask" if mask else "")
    return ArgSpec(name, args, make=_make(t, hc, h, mask, eps, clamp), tolerance=1e-2, **options)


ARG_SPECS = (
    _case(67, 4, 2048, mask=True),
    _case(300, 4, 7168),
    _case(5, 1, 64, clamp=0.5, mask=True),
    _case(3, 3, 2568, config=dict(threads=64)),
    _case(0, 4, 1024),
    _case(4096, 4, 4096, bench=True),
    _case(16384, 4, 7168, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def engram_gate_bwd(grad_out, hidden_states, kv, weight_fused, dot, gate_score, rstd_x, rstd_k, clamp_value: float = 1e-6,
                    image_token_mask=None, *, impl=None, ops):  # fmt: skip
    """TileKernels 2.1's ``engram_gate_bwd`` (module docstring).

    Args:
      grad_out: bf16 like hidden_states ``[..., hc, H]``.
      hidden_states, kv, weight_fused: the forward's inputs.
      dot, gate_score, rstd_x, rstd_k: the forward's saved fp32 ``[..., hc]``.
      clamp_value: the forward's clamp (> 0).
      image_token_mask: the forward's mask, or None.

    Returns:
      ``(grad_x, grad_kv, grad_w_partial)``: bf16 like hidden_states, bf16 like kv (packed, ``[..., hc + 1,
      H]`` or ``[..., (hc + 1) * H]`` as given), fp32 ``[132, hc, H]``.
    """
    name = "engram_gate_bwd"
    x, kv_flat, heads, hidden = check_gate_inputs(name, hidden_states, kv)
    lead = jnp.shape(hidden_states)[:-2]
    go = checks.as_array(name, "grad_out", grad_out)
    check_dtype(name, "grad_out", go, BF16)
    if go.shape != jnp.shape(hidden_states):
        raise ValueError(f"{name}: grad_out must have hidden_states' shape {list(jnp.shape(hidden_states))}, got {list(go.shape)}")
    w = check_stat(name, "weight_fused", weight_fused, (heads, hidden))
    stats = [check_stat(name, n, a, (*lead, heads)).reshape(-1, heads) for n, a in
             (("dot", dot), ("gate_score", gate_score), ("rstd_x", rstd_x), ("rstd_k", rstd_k))]  # fmt: skip
    mask = check_mask(name, image_token_mask, lead)
    clamp = positive(name, "clamp_value", clamp_value)
    gx, gkv, partial = ops[0](go.reshape(x.shape), x, kv_flat, w, *stats, None if mask is None else mask.reshape(-1), impl=impl, clamp_value=clamp)
    return gx.reshape(jnp.shape(hidden_states)), gkv.reshape(jnp.shape(kv)), partial

