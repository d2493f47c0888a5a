"""engram_gate: the differentiable Engram gate (TileKernels 2.1 ``modeling.engram.engram_gate`` /
``EngramGateFn``; v1 §4.6, v2.1 §2.4).

    gate = sigmoid(signed_sqrt(<RMSNorm(x)·wh, RMSNorm(k)·we> / sqrt(H)))    out = x + gate · v

per token and head (``jax_tilek.engram.engram_gate_fwd`` gives the exact steps). The custom VJP runs
the kernels: the forward is ``fused_weight`` then ``engram_gate_fwd`` saving ``dot``, ``gate_score``,
``rstd_x``, ``rstd_k`` (nothing is recomputed in the backward); the backward is ``engram_gate_bwd``
then ``grad_w_reduce``, which sums the weight gradient's fixed partial rows in a fixed order
(deterministic, the same bits on every GPU). Weight gradients are cast to the weights' dtypes
(TileKernels returns fp32 or accumulates into ``main_grad``; pass fp32 weights to get fp32 gradients).

``impl="xla"`` differentiates the reference: the same math with the fused weight formed as
``float(wh) * float(we)`` first (the kernels' order; TileKernels' torch reference multiplies
``(x·wh)·(k·we)``, equal up to rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_tilek.engram import _fused_weight, _gate_bwd, _gate_fwd, _grad_w_reduce
from jax_tilek.engram._common import BF16, check_mask, non_negative, positive
from jax_tilek.engram._fused_weight import check_weights, fused_weight_reference
from jax_tilek.engram._gate_fwd import check_gate_inputs, flat, gate_fwd_reference, gate_make
from jax_tilek.op import uses, with_vjp
from jax_tilek.testing import ArgSpec


def engram_gate_reference(x, kv, weight_hidden, weight_embed, image_token_mask, *, clamp_value: float, eps: float):
    """The gate on flat ``x [T, hc, H]``, ``kv [T, hc + 1, H]``: JAX differentiates this for ``impl="xla"``."""
    w = fused_weight_reference(weight_hidden, weight_embed)
    return gate_fwd_reference(x, kv, w, image_token_mask, eps=eps, clamp_value=clamp_value, save_for_backward=False)[0]


def _primal(x, kv, wh, we, mask, *, impl, clamp_value, eps, ops):
    if impl == "xla":
        return engram_gate_reference(x, kv, wh, we, mask, clamp_value=clamp_value, eps=eps)
    w = ops[0](wh, we, impl=impl)
    return ops[1](x, kv, w, mask, impl=impl, eps=eps, clamp_value=clamp_value, save_for_backward=False)[0]


def _fwd(x, kv, wh, we, mask, *, impl, clamp_value, eps, ops):
    w = ops[0](wh, we, impl=impl)
    out, dot, gate, rstd_x, rstd_k = ops[1](x, kv, w, mask, impl=impl, eps=eps, clamp_value=clamp_value, save_for_backward=True)
    return out, (x, kv, wh, we, w, mask, dot, gate, rstd_x, rstd_k)


def _bwd(residuals, g, *, impl, clamp_value, eps, ops):
    x, kv, wh, we, w, mask, dot, gate, rstd_x, rstd_k = residuals
    grad_x, grad_kv, partial = ops[2](g, x, kv, w, dot, gate, rstd_x, rstd_k, mask, impl=impl, clamp_value=clamp_value)
    grad_wh, grad_we = ops[3](partial, wh, we, None, None, impl=impl)
    return grad_x, grad_kv, grad_wh.astype(wh.dtype), grad_we.astype(we.dtype), None


_gate = with_vjp(_primal, _fwd, _bwd)


def _case(t: int, hc: int, h: int, mask: bool = False, dtype=BF16, lead: tuple[int, ...] = (), **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    shape = (*lead, t)
    args = (s((*shape, hc, h), BF16), s((*shape, hc + 1, h), BF16), s((hc, h), dtype), s((hc, h), dtype), 1e-6, 1e-20,
            s(shape, jnp.bool_) if mask else None)  # fmt: skip
    made = gate_make(t * (lead[0] if lead else 1), hc, h, mask, fused=False, zero_token=not options.get("bench", False))

    def make(rng, *_):
        x, kv, wh, we, m = flat(made(rng))
        wh, we = (wh.astype(dtype), we.astype(dtype))
        reshape = lambda a: None if a is None else a.reshape(*shape, *a.shape[1:])  # noqa: E731
        return reshape(x), reshape(kv), wh, we, 1e-6, 1e-20, reshape(m)

    name = "x".join(map(str, shape)) + f"_hc{hc}_h{h}" + ("_mask" if mask else "") + ("" if jnp.dtype(dtype) == BF16 else "_f32w")
    return ArgSpec(name, args, make=make, tolerance=1e-2, launches=2, **options)


ARG_SPECS = (
    _case(64, 4, 2048, mask=True),
    _case(8, 4, 1024, lead=(2,)),
    _case(3, 2, 264, dtype=jnp.float32, mask=True),
    _case(0, 4, 512),
    _case(4096, 4, 4096, bench=True),
    _case(16384, 4, 7168, bench=True),
)


@uses(_fused_weight._op, _gate_fwd._op, _gate_bwd._op, _grad_w_reduce._op, cases=ARG_SPECS, differentiable=True)
def engram_gate(hidden_states, kv, weight_hidden, weight_embed, clamp_value: float = 1e-6, eps: float = 1e-20, image_token_mask=None, *,
                impl=None, ops):  # fmt: skip
    """The differentiable Engram gate (module docstring).

    Args:
      hidden_states: bf16 ``[..., hc, H]`` (H % 8 == 0, hc <= 16).
      kv: bf16 ``[..., hc + 1, H]`` or ``[..., (hc + 1) * H]``: keys, then the value shared by the heads.
      weight_hidden, weight_embed: the RMSNorm weights ``[hc, H]``, bf16 or fp32.
      clamp_value: the signed square root's clamp (> 0); eps: the RMSNorm epsilon (>= 0).
      image_token_mask: optional bool ``[...]``: those tokens pass through (no gradient to kv or weights).
      impl: None (kernels on Hopper/Blackwell, references elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      bf16 like hidden_states.
    """
    name = "engram_gate"
    x, kv_flat, heads, hidden = check_gate_inputs(name, hidden_states, kv)
    lead = jnp.shape(hidden_states)[:-2]
    wh, we = check_weights(name, weight_hidden, weight_embed)
    if wh.shape != (heads, hidden):
        raise ValueError(f"{name}: the weights must be [hc, H] = {[heads, hidden]}, got {list(wh.shape)}")
    mask = check_mask(name, image_token_mask, lead)
    clamp = positive(name, "clamp_value", clamp_value)
    eps = non_negative(name, "eps", eps)
    out = _gate(x, kv_flat, wh, we, None if mask is None else mask.reshape(-1), impl=impl, clamp_value=clamp, eps=eps, ops=ops)
    return out.reshape(*lead, heads, hidden)
