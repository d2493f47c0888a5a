"""engram_gate_fwd: the Engram gate's forward pass (TileKernels v1 §4.3 and v2.1 §2.4: packed ``kv``,
image tokens copied through; reference ``torch/engram.py: engram_gate_ref``).

Per token t and head h, in fp32, with ``x = hidden_states[t, h]``, ``k = kv[t, h]``, ``v = kv[t, hc]``,
``w = weight_fused[h]`` (= weight_hidden * weight_embed) and ``s = H^-1/2``::

    rstd_x = 1 / sqrt(mean(x * x) + eps)          rstd_k = 1 / sqrt(mean(k * k) + eps)
    dot    = sum(x * w * k)                       # saved unnormalised, as TileKernels' kernel does
    d      = dot * rstd_x * rstd_k * s            # = <RMSNorm(x)·wh, RMSNorm(k)·we> / sqrt(H)
    gate   = sigmoid(sign(d) * sqrt(max(|d|, clamp_value)))
    out    = bf16(x + gate * v)                   # image tokens: out = hidden_states

``sign`` is the torch reference's (sign(0) = 0, so d = 0 gives gate 0.5; TileKernels' CUDA kernel uses
copysign and gives sigmoid(+sqrt(clamp)) there). The reference sums in XLA's order and the kernel in
its thread order (each thread its elements in order, then a butterfly and the warps in order), so
results agree to rounding (TileKernels compares with ``calc_diff``). With ``save_for_backward`` the op
also returns ``dot``, ``gate``, ``rstd_x``, ``rstd_k`` (fp32 ``[T, hc]``; computed for image tokens
too), which :func:`jax_tilek.engram.engram_gate_bwd` takes. TileKernels' ``inplace`` has no meaning
for a functional op (XLA reuses donated buffers itself).

Kernel: persistent, a CTA per (head, slice of tokens) keeps its head's fused weights in registers;
per token it loads x, k and v together (16-byte vectors), reduces the three sums over the CTA, and
writes the output row.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp

from jax_tilek import checks, platform
from jax_tilek.engram._common import BF16, F32, VEC, check_dtype, check_heads, check_hidden, check_mask, gate_layout, non_negative, positive
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, config_class, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True, "tl.disable_thread_storage_sync": True}
SAVED = ("dot", "gate_score", "rstd_x", "rstd_k")


# ---------------------------------------------------------------------------------------------
# Reference.


def gate_math(x, k, v, w, eps: float, clamp_value: float):
    """The module docstring's math in fp32 on ``x, k [T, hc, H]``, ``v [T, H]``, ``w [hc, H]`` (all
    fp32): ``(out fp32, dot, gate, rstd_x, rstd_k)``. Shared by the op's reference and the
    differentiable gate's (JAX differentiates it)."""
    h = x.shape[-1]
    rstd_x = jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + eps)
    rstd_k = jax.lax.rsqrt(jnp.mean(k * k, axis=-1) + eps)
    dot = jnp.sum(x * w * k, axis=-1)
    d = dot * rstd_x * rstd_k * (h**-0.5)
    magnitude = jnp.abs(d)
    gate = jax.nn.sigmoid(jnp.sign(d) * jnp.sqrt(jnp.where(magnitude < clamp_value, clamp_value, magnitude)))
    return x + gate[..., None] * v[:, None, :], dot, gate, rstd_x, rstd_k


def gate_fwd_reference(hidden_states, kv, weight_fused, image_token_mask, *, eps, clamp_value, save_for_backward, **_):
    hc = hidden_states.shape[1]
    f = lambda a: a.astype(jnp.float32)  # noqa: E731
    out, dot, gate, rstd_x, rstd_k = gate_math(f(hidden_states), f(kv[:, :hc]), f(kv[:, hc]), weight_fused, eps, clamp_value)
    out = out.astype(hidden_states.dtype)
    if image_token_mask is not None:
        out = jnp.where(image_token_mask[:, None, None], hidden_states, out)
    return (out, dot, gate, rstd_x, rstd_k) if save_for_backward else (out,)


# ---------------------------------------------------------------------------------------------
# Kernel.


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Threads per CTA (whole warps; each thread takes ceil(H / 8 / threads) 16-byte vectors of a row)
    and the CTAs per SM the kernel is compiled for (``__launch_bounds__``; also sizes the persistent
    grid of the forward)."""

    threads: int
    blocks_per_sm: int


def default_gate_config(hidden: int) -> GateConfig:
    """At most 4 vectors per thread; as many CTAs per SM as leave about 128 registers a thread."""
    threads = gate_layout(hidden).threads
    return GateConfig(threads, max(1, min(16, 512 // threads)))


@config_class(GateConfig)
def _config(hidden_states, *_, **__) -> GateConfig:
    return default_gate_config(hidden_states.shape[-1])


@kernel(pass_configs=PASS_CONFIGS)
def gate_fwd_kernel(heads: int, hidden: int, eps: float, clamp_value: float, save: bool, has_mask: bool, threads: int, blocks_per_sm: int):
    """CTA ``(h, c)`` of ``(hc, ctas)`` takes tokens ``c, c + ctas, ...`` for head h (module docstring)."""
    import tilelang.language as T

    lay = gate_layout(hidden, threads)
    G, VPT, NV, W = lay.threads, lay.vpt, lay.nvec, lay.warps
    E = VPT * VEC
    SCALE = float(hidden) ** -0.5
    f32, bf16 = "float32", "bfloat16"
    TT = T.dynamic("T")

    @T.prim_func
    def engram_gate_fwd(
        hidden_states: T.Tensor((TT, heads, hidden), bf16),
        kv: T.Tensor((TT, heads + 1, hidden), bf16),
        weight_fused: T.Tensor((heads, hidden), f32),
        image_token_mask: T.Tensor((TT,), "bool"),
        out: T.Tensor((TT, heads, hidden), bf16),
        dot: T.Tensor((TT, heads), f32),
        gate_score: T.Tensor((TT, heads), f32),
        rstd_x: T.Tensor((TT, heads), f32),
        rstd_k: T.Tensor((TT, heads), f32),
        ctas: T.int32,
    ):
        with T.Kernel(heads, ctas, threads=G) as (h, c):
            T.annotate_min_blocks_per_sm(blocks_per_sm)
            red = T.alloc_shared((2, 3, W), f32)
            wv = T.alloc_local((E,), f32)
            xv = T.alloc_local((E,), bf16)
            kx = T.alloc_local((E,), bf16)
            vv = T.alloc_local((E,), bf16)
            ov = T.alloc_local((VEC,), bf16)
            sx = T.alloc_var(f32)
            sk = T.alloc_var(f32)
            sd = T.alloc_var(f32)
            rx = T.alloc_var(f32)
            rk = T.alloc_var(f32)
            g = T.alloc_var(f32)
            tid = T.get_thread_binding(0)
            lane = tid % 32
            warp = tid // 32
            for j in T.unroll(VPT):
                if j * G + tid < NV:
                    for e in T.vectorized(VEC):
                        wv[j * VEC + e] = weight_fused[h, (j * G + tid) * VEC + e]
            for it in T.serial(T.ceildiv(T.max(TT - c, 0), ctas)):
                t = c + it * ctas
                for j in T.unroll(VPT):
                    if j * G + tid < NV:
                        for e in T.vectorized(VEC):
                            xv[j * VEC + e] = hidden_states[t, h, (j * G + tid) * VEC + e]
                        for e in T.vectorized(VEC):
                            kx[j * VEC + e] = kv[t, h, (j * G + tid) * VEC + e]
                        for e in T.vectorized(VEC):
                            vv[j * VEC + e] = kv[t, heads, (j * G + tid) * VEC + e]
                sx = T.float32(0)
                sk = T.float32(0)
                sd = T.float32(0)
                for j in T.unroll(VPT):
                    if j * G + tid < NV:
                        for e in T.unroll(VEC):
                            xf = T.Cast(f32, xv[j * VEC + e])
                            kf = T.Cast(f32, kx[j * VEC + e])
                            sx = sx + xf * xf
                            sk = sk + kf * kf
                            sd = sd + xf * wv[j * VEC + e] * kf
                for q in T.unroll(5):
                    sx = sx + T.shfl_xor(sx, 16 >> q)
                    sk = sk + T.shfl_xor(sk, 16 >> q)
                    sd = sd + T.shfl_xor(sd, 16 >> q)
                if W > 1:
                    if lane == 0:
                        red[it % 2, 0, warp] = sx
                        red[it % 2, 1, warp] = sk
                        red[it % 2, 2, warp] = sd
                    T.sync_threads()
                    sx = red[it % 2, 0, 0]
                    sk = red[it % 2, 1, 0]
                    sd = red[it % 2, 2, 0]
                    for q in T.unroll(W - 1):
                        sx = sx + red[it % 2, 0, q + 1]
                        sk = sk + red[it % 2, 1, q + 1]
                        sd = sd + red[it % 2, 2, q + 1]
                rx = T.float32(1) / T.sqrt(sx / T.float32(hidden) + T.float32(eps))
                rk = T.float32(1) / T.sqrt(sk / T.float32(hidden) + T.float32(eps))
                d = sd * rx * rk * T.float32(SCALE)
                a = T.sqrt(T.max(T.abs(d), T.float32(clamp_value)))
                g = T.float32(1) / (T.float32(1) + T.exp(-T.if_then_else(d > 0, a, T.if_then_else(d < 0, -a, T.float32(0)))))
                if save:
                    if tid == 0:
                        dot[t, h] = sd
                        gate_score[t, h] = g
                        rstd_x[t, h] = rx
                        rstd_k[t, h] = rk
                for j in T.unroll(VPT):
                    if j * G + tid < NV:
                        for e in T.unroll(VEC):
                            y = T.Cast(bf16, T.Cast(f32, xv[j * VEC + e]) + g * T.Cast(f32, vv[j * VEC + e]))
                            if has_mask:
                                ov[e] = T.if_then_else(image_token_mask[t], xv[j * VEC + e], y)
                            else:
                                ov[e] = y
                        for e in T.vectorized(VEC):
                            out[t, h, (j * G + tid) * VEC + e] = ov[e]

    return engram_gate_fwd


def _results(*_, save_for_backward, **__) -> tuple[str, ...]:
    return ("out", *SAVED) if save_for_backward else ("out",)


def forward_ctas(tokens: int, heads: int, blocks_per_sm: int) -> int:
    """CTAs per head of the persistent forward: the resident CTAs of the target GPU shared by the heads."""
    return max(1, min(max(tokens, 1), platform.target_num_sms() * blocks_per_sm // heads))


def _launch(hidden_states, kv, weight_fused, image_token_mask, *, eps, clamp_value, save_for_backward, config: GateConfig) -> Launch:
    t, heads, hidden = hidden_states.shape
    return Launch(
        kernel=gate_fwd_kernel,
        params=dict(heads=heads, hidden=hidden, eps=float(eps), clamp_value=float(clamp_value), save=bool(save_for_backward),
                    has_mask=image_token_mask is not None, threads=config.threads, blocks_per_sm=config.blocks_per_sm),  # fmt: skip
        scalars=dict(ctas=forward_ctas(t, heads, config.blocks_per_sm)),
        buffers={} if save_for_backward else {name: None for name in SAVED},
    )


_op = TileOp(
    name="engram_gate_fwd", launch=_launch, operands=("hidden_states", "kv", "weight_fused", "image_token_mask?"), results=_results,
    reference=gate_fwd_reference, config=_config, rows=Rows(("hidden_states", "kv", "image_token_mask"), ("out", *SAVED)),
)  # fmt: skip


def check_gate_inputs(op: str, hidden_states, kv, lead_from_x: bool = True) -> tuple[jax.Array, jax.Array, int, int]:
    """``hidden_states [..., hc, H]`` and ``kv [..., hc + 1, H]`` (or ``[..., (hc + 1) * H]``), bf16; returns
    them flattened to ``[T, hc, H]``, ``[T, hc + 1, H]`` with ``(hc, H)``."""
    x = checks.as_array(op, "hidden_states", hidden_states)
    kv = checks.as_array(op, "kv", kv)
    if x.ndim < 2:
        raise ValueError(f"{op}: hidden_states must be [..., hc, H], got shape {x.shape}")
    check_dtype(op, "hidden_states", x, BF16)
    check_dtype(op, "kv", kv, BF16)
    heads, hidden = x.shape[-2:]
    check_heads(op, heads)
    check_hidden(op, hidden)
    lead = x.shape[:-2]
    if kv.shape == (*lead, (heads + 1) * hidden):
        kv = kv.reshape(*lead, heads + 1, hidden)
    if kv.shape != (*lead, heads + 1, hidden):
        raise ValueError(f"{op}: kv must be [..., hc + 1, H] = {[*lead, heads + 1, hidden]} (or [..., (hc + 1) * H]), got {list(kv.shape)}")
    return x.reshape(-1, heads, hidden), kv.reshape(-1, heads + 1, hidden), heads, hidden


def check_stat(op: str, name: str, value, shape) -> jax.Array:
    a = checks.as_array(op, name, value)
    check_dtype(op, name, a, F32)
    if a.shape != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(a.shape)}")
    return a


def gate_make(t: int, hc: int, h: int, mask: bool, fused: bool = True, zero_token: bool = False):
    """Realistic gate inputs: normal activations, weights near 1 (their product as fp32 when ``fused``)."""
    import numpy as np

    def make(rng, *_):
        x = rng.standard_normal((t, hc, h)).astype(np.float32)
        kv = rng.standard_normal((t, hc + 1, h)).astype(np.float32)
        if zero_token and t > 1:
            x[1] = 0  # d = 0 exactly: sign(0) = 0, gate 0.5
        wh = (1 + 0.2 * rng.standard_normal((hc, h))).astype(jnp.bfloat16)
        we = (1 + 0.2 * rng.standard_normal((hc, h))).astype(jnp.bfloat16)
        arrays = [x.astype(jnp.bfloat16), kv.astype(jnp.bfloat16)]
        arrays += [wh.astype(np.float32) * we.astype(np.float32)] if fused else [wh, we]
        return arrays, (rng.random(t) < 0.25 if mask else None)

    return make


def _case(t: int, hc: int, h: int, save: bool = True, mask: bool = False, eps: float = 1e-20, clamp: float = 1e-6, **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    args = (s((t, hc, h), BF16), s((t, hc + 1, h), BF16), s((hc, h), F32), eps, clamp, save, s((t,), jnp.bool_) if mask else None)
    made = gate_make(t, hc, h, mask, zero_token=not options.get("bench", False))

    def make(rng, *_):
        x, kv, w, m = flat(made(rng))
        return x, kv, w, eps, clamp, save, m

    name = f"t{t}_hc{hc}_h{h}" + ("" if save else "_nosave") + ("_mask" if mask else "")
    return ArgSpec(name, args, make=make, tolerance=1e-2, **options)


def flat(made) -> tuple:
    """``(arrays, mask)`` of :func:`gate_make` as one tuple of arguments."""
    arrays, mask = made
    return (*arrays, mask)


ARG_SPECS = (
    _case(67, 4, 2048, mask=True),
    _case(33, 4, 7168),
    _case(16, 4, 4096, save=False, mask=True),
    _case(5, 1, 64, clamp=0.5),
    _case(3, 3, 2568, mask=True, config=dict(threads=64)),
    _case(0, 4, 1024),
    _case(4096, 4, 4096, bench=True),
    _case(16384, 4, 7168, bench=True),
    _case(65536, 4, 4096, save=False, bench=True),
    _case(65536, 4, 7168, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def engram_gate_fwd(hidden_states, kv, weight_fused, eps: float = 1e-20, clamp_value: float = 1e-6, save_for_backward: bool = True,
                    image_token_mask=None, *, impl=None, ops):  # fmt: skip
    """TileKernels 2.1's ``engram_gate_fwd`` (module docstring).

    Args:
      hidden_states: bf16 ``[..., hc, H]`` (H % 8 == 0, hc <= 16).
      kv: bf16 ``[..., hc + 1, H]`` or ``[..., (hc + 1) * H]``: keys then the shared value.
      weight_fused: fp32 ``[hc, H]`` (:func:`jax_tilek.engram.fused_weight`).
      eps: RMSNorm epsilon (>= 0); clamp_value: the gate's clamp (> 0).
      save_for_backward: also return ``(dot, gate_score, rstd_x, rstd_k)``, fp32 ``[..., hc]``.
      image_token_mask: optional bool ``[...]``: those tokens are copied through.

    Returns:
      ``out`` bf16 like hidden_states, or ``(out, dot, gate_score, rstd_x, rstd_k)``.
    """
    name = "engram_gate_fwd"
    x, kv, heads, hidden = check_gate_inputs(name, hidden_states, kv)
    lead = jnp.shape(hidden_states)[:-2]
    w = check_stat(name, "weight_fused", weight_fused, (heads, hidden))
    mask = check_mask(name, image_token_mask, lead)
    eps = non_negative(name, "eps", eps)
    clamp = positive(name, "clamp_value", clamp_value)
    save = checks.static_bool(name, "save_for_backward", save_for_backward)
    outs = ops[0](x, kv, w, None if mask is None else mask.reshape(-1), impl=impl, eps=eps, clamp_value=clamp, save_for_backward=save)
    out = outs[0].reshape(*lead, heads, hidden)
    if not save:
        return out
    return (out, *(o.reshape(*lead, heads) for o in outs[1:]))
