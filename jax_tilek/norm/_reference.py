"""The pure-JAX references of the RMSNorm ops, written in the kernels' operation order (see
:mod:`jax_tilek.norm` for the arithmetic and where XLA's FMA contraction makes them differ)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek.norm._kernels import QUANT_GROUP, RowLayout, backward_config, backward_ctas, row_layout
from jax_tilek.quant import formats


def row_sum(v: jax.Array, lay: RowLayout) -> jax.Array:
    """``sum(v, axis=-1)`` of fp32 ``v[T, H]`` in the kernels' order: each thread adds its elements
    in turn (its vectors, then their elements), a butterfly adds the row's lanes within each warp,
    then the warps are added in order."""
    t = v.shape[0]
    span = lay.vpt * lay.group * lay.vec
    v = jnp.pad(v, ((0, 0), (0, span - lay.hidden))).reshape(t, lay.vpt, lay.group, lay.vec)
    acc = jnp.zeros((t, lay.group), jnp.float32)
    for j in range(lay.vpt):
        for e in range(lay.vec):
            acc = acc + v[:, j, :, e]
    width = min(lay.group, 32)
    lanes = acc.reshape(t, lay.group // width, width)
    while width > 1:  # lane i and lane i ^ (width / 2) hold the same sum afterwards
        width //= 2
        lanes = lanes[..., :width] + lanes[..., width : 2 * width]
    warps = lanes[..., 0]
    if lay.warps == 1:
        return warps[:, 0]
    total = jnp.zeros((t,), jnp.float32)
    for w in range(lay.warps):
        total = total + warps[:, w]
    return total


def normalize(x: jax.Array, residual: jax.Array | None, weight: jax.Array | None, eps: float, out_scale: float):
    """``(y, rstd, s)`` for 2-D ``x``: the RMSNorm forward in the kernel's operation order."""
    f32 = jnp.float32
    lay = row_layout(x.shape[-1], x.dtype)
    s = x if residual is None else (x.astype(f32) + residual.astype(f32)).astype(x.dtype)
    sv = s.astype(f32)
    mean = formats.exact_div(row_sum(sv * sv, lay), np.float32(x.shape[-1]))
    rstd = formats.exact_div(np.float32(1), jnp.sqrt(mean + np.float32(eps)))
    scale = np.float32(out_scale) if weight is None else weight.astype(f32) * np.float32(out_scale)
    y = ((sv * rstd[:, None]) * scale).astype(x.dtype)
    return y, rstd, s


def forward_reference(x, residual, weight, *, eps: float, out_scale: float, outputs: tuple[str, ...], sf_layout: str, round_sf: bool):
    """The forward op's ``outputs`` (names from out, norm_input, rstd, data, sf) for ``x[T, H]``."""
    y, rstd, s = normalize(x, residual, weight, eps, out_scale)
    values = {"out": y, "norm_input": s, "rstd": rstd}
    if sf_layout:
        data, sf = formats.quantize_blocks(y, "e4m3", (1, QUANT_GROUP), round_sf=round_sf)
        values.update(data=data, sf=formats.store_sf(sf, sf_layout))
    return tuple(values[name] for name in outputs)


@jax.custom_jvp
def _rounded(p: jax.Array) -> jax.Array:
    """fp32 ``p`` unchanged, but rounded on its own: XLA cannot contract the product that makes it into
    a later sum (an FMA; an optimization barrier does not stop that). Its bits are or-ed with
    ``isnan(p)``, a no-op the compiler cannot see through."""
    bits = jax.lax.bitcast_convert_type(p, jnp.uint32)
    return jax.lax.bitcast_convert_type(bits | (p != p).astype(jnp.uint32), jnp.float32)


_rounded.defjvp(lambda primals, tangents: (_rounded(primals[0]), tangents[0]))


def _sequential_sum(chunks: jax.Array) -> jax.Array:
    """``chunks[0] + chunks[1] + ...`` in that order (fp32, from zero), over the leading axis."""
    return jax.lax.scan(lambda acc, c: (acc + c, None), jnp.zeros(chunks.shape[1:], jnp.float32), chunks)[0]


def reduce_dw(contrib: jax.Array, lay: RowLayout, ctas: int) -> jax.Array:
    """``sum(contrib, axis=0)`` of fp32 ``contrib[T, H]`` in the backward kernels' order.

    Kernel 1: CTA ``b`` of ``ctas`` takes row blocks ``b, b + ctas, ...`` (``lay.rows`` rows each) and
    thread group ``r`` adds its rows in turn into partial row ``b * rows + r``; kernel 2: lane ``l`` of
    32 adds partial rows ``l, l + 32, ...`` in turn, then the 32 lane sums are added in lane order.
    Rows past the last token count as zeros (adding zero to a sum leaves it unchanged).
    """
    t, h = contrib.shape
    if t == 0:
        return jnp.zeros((h,), jnp.float32)
    width = ctas * lay.rows  # partial rows
    steps = -(-t // width)
    chunks = jnp.pad(contrib, ((0, steps * width - t), (0, 0))).reshape(steps, width, h)
    partial = _sequential_sum(chunks)  # row b * rows + r of chunk k is token (b + k * ctas) * rows + r
    lanes = _sequential_sum(jnp.pad(partial, ((0, -width % 32), (0, 0))).reshape(-1, 32, h))
    total = jnp.zeros((h,), jnp.float32)
    for lane in range(32):
        total = total + lanes[lane]
    return total


def backward_reference(dy, x, rstd, weight, residual_grad, *, out_scale: float, outputs: tuple[str, ...]):
    """``(dx,)`` or ``(dx, dw)`` in the kernels' operation order: dx per row, dw summed over the tokens
    in the fixed partition of :func:`reduce_dw` that the default configuration's CTA count makes."""
    f32 = jnp.float32
    t, h = x.shape
    lay = row_layout(h, x.dtype)
    rs = rstd[:, None]
    g = dy.astype(f32) * np.float32(out_scale)
    gw = g if weight is None else g * weight.astype(f32)
    xh = x.astype(f32) * rs
    mean = formats.exact_div(row_sum(xh * gw, lay), np.float32(h))[:, None]
    d = (gw - xh * mean) * rs
    if residual_grad is not None:
        d = d + residual_grad.astype(f32)
    dx = d.astype(x.dtype)
    if "dw" not in outputs:
        return (dx,)
    ctas = backward_ctas(t, lay, backward_config(h, x.dtype, residual_grad is not None)[1])
    return dx, reduce_dw(_rounded(xh * g), lay, ctas)
