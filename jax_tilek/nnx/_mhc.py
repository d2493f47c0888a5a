"""mHC (manifold-constrained hyper-connection) residual blocks: ``HyperConnection`` wraps a sub-layer,
``hyper_expand`` enters the n residual streams from the embedding, ``HyperHead`` leaves them before the
final norm (``jax_tilek.mhc``; TileKernels v1 §5, v2.1 §2.7).

A model built with them::

    stream = hyper_expand(embed(tokens), n)               # [..., H] -> [..., n, H] bf16
    for block in blocks:                                  # each sub-layer in a HyperConnection
        stream = block.attn(stream)                       # mhc_pre -> norm + attention -> mhc_post
        stream, aux = block.moe(stream)                   # a (y, aux) sub-layer: (stream, aux)
    logits = unembed(final_norm(head(stream)))            # HyperHead: mhc_head -> [..., H]

Initialisation (the same in every block, so a model starts as a pre-norm residual network): the streams
start as n copies of the embedding; ``pre`` = 1/n per stream (the sub-layer reads the streams' mean),
``post`` = 1 per stream (each stream adds the whole sub-layer output), ``comb`` = a symmetric matrix with
``comb_diagonal`` (0.9) on its diagonal, already doubly stochastic so Sinkhorn keeps it. With equal
streams that is exactly ``stream + sublayer(stream)`` on every stream. The per-token (dynamic) part
enters through ``scale`` = ``mix_scale`` (0.01) times projections ``fn`` drawn with unit-variance output
(``std = (nH)^-1/2`` on the RMS-normalised residual): small enough to leave the residual behaviour
intact (mixes move by ~1%), non-zero so that ``fn`` and ``scale`` both get gradients and the streams'
mixes differ from the first step (with ``fn = 0`` every stream would get the same mixes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tilek import mhc
from jax_tilek.nnx._layers import Impl, param

_LOGIT_CLIP = 0.99  # a sigmoid target of 1 (n = 1 pre, post_mult_value = 1 post) has no finite logit


def _logit(p: float) -> float:
    p = min(max(p, 1 - _LOGIT_CLIP), _LOGIT_CLIP)
    return math.log(p / (1 - p))


def _constant(value: np.ndarray) -> Callable[..., jax.Array]:
    return lambda key, shape, dtype: jnp.asarray(value, dtype).reshape(shape)


def _projection(rngs: nnx.Rngs | None, rows: int, n: int, dim: int) -> nnx.Param:
    """``fn [rows, n·dim]`` fp32 with unit-variance projections of a unit-RMS input."""
    return param(rngs, nnx.initializers.normal((n * dim) ** -0.5), (rows, n * dim), jnp.float32, (None, None))


def initial_base(mhc_mult: int, *, pre_eps: float = 1e-6, post_mult_value: float = 2.0, comb_diagonal: float = 0.9) -> np.ndarray:
    """The biases ``[n(n+2)]`` fp32 ``[pre n | post n | comb n²]`` of a block at init (module docstring):
    ``sigmoid(pre) + pre_eps = 1/n``, ``sigmoid(post) · post_mult_value = 1`` and comb logits whose
    row softmax has ``comb_diagonal`` on the diagonal (targets past 0.99 are clipped to it)."""
    n = mhc_mult
    pre = np.full(n, _logit(1 / n - pre_eps))
    post = np.full(n, _logit(1 / post_mult_value))
    diag = math.log(comb_diagonal * (n - 1) / (1 - comb_diagonal)) if n > 1 else 0.0
    return np.concatenate([pre, post, (np.eye(n) * diag).reshape(-1)]).astype(np.float32)


def hyper_expand(x: jax.Array, mhc_mult: int = 4, *, impl: Impl = None) -> jax.Array:
    """The embedding ``x [..., H]`` (cast to bf16) as n equal residual streams ``[..., n, H]`` bf16
    (``jax_tilek.mhc.expand_from_embedding``)."""
    return mhc.expand_from_embedding(x.astype(jnp.bfloat16), mhc_mult, impl=impl)


class HyperConnection(nnx.Module):
    """An mHC residual block around ``sublayer``: ``mhc_pre`` -> ``sublayer`` -> ``mhc_post``.

    ``residual [..., n, H]`` bf16 -> the new residual ``[..., n, H]`` bf16. The sub-layer (any callable,
    usually an ``nnx.Module`` holding its own pre-norm, e.g. ``nnx.Sequential(RMSNorm, Attention)``) maps
    the mixed input ``[..., H]`` bf16 to ``[..., H]``; extra positional arguments are passed to it. If it
    returns a tuple ``(y, *rest)`` (an MoE's ``(y, aux)``), ``y`` is written back and the call returns
    ``(new_residual, *rest)``. Its output is cast to bf16.

    Parameters (fp32, replicated): ``fn [n(n+2), nH]`` (the mixes' projection of the RMS-normalised
    flattened residual), ``scale [3]`` (pre, post, comb) and ``base [n(n+2)]``; initialised as the
    module docstring says. There is no norm weight: a per-column weight on ``fn``'s input is a
    reparametrisation of ``fn`` itself. ``post_mult_value`` (2, the mHC paper's ``2·sigmoid``),
    ``pre_eps``, ``norm_eps``, ``sinkhorn_eps``, ``sinkhorn_repeat`` (20, the paper's) and ``n_splits``
    go to ``jax_tilek.mhc.mhc_pre``.

    ``remat=True`` recomputes the block in the backward pass (``nnx.remat``, i.e. ``jax.checkpoint``,
    with ``remat_policy``, default: save nothing): only the block's input residual is kept. It does not
    call ``mhc_multilayer_recompute``: that op re-derives the residuals of several layers from the first
    one given every layer's mixes and outputs, which here would need one custom VJP spanning several
    sub-layers' parameters; ``jax.checkpoint`` re-runs the same per-layer apply-mix and post kernels
    (``mhc_multilayer_recompute`` is bit-identical to that loop), and checkpointing several blocks in one
    ``nnx.remat`` gives the multi-layer form.
    """

    def __init__(self, sublayer: Callable[..., Any], dim: int, mhc_mult: int = 4, *, post_mult_value: float = 2.0, pre_eps: float = 1e-6,
                 norm_eps: float = 1e-6, sinkhorn_eps: float = 1e-6, sinkhorn_repeat: int = 20, n_splits: int = 16, mix_scale: float = 0.01,
                 comb_diagonal: float = 0.9, remat: bool = False, remat_policy: Callable[..., bool] | None = None, impl: Impl = None,
                 rngs: nnx.Rngs):  # fmt: skip
        n = mhc_mult
        self.sublayer = sublayer
        self.dim, self.mhc_mult, self.post_mult_value, self.pre_eps, self.norm_eps = dim, n, post_mult_value, pre_eps, norm_eps
        self.sinkhorn_eps, self.sinkhorn_repeat, self.n_splits = sinkhorn_eps, sinkhorn_repeat, n_splits
        self.remat, self.remat_policy, self.impl = remat, remat_policy, impl
        self.fn = _projection(rngs, n * (n + 2), n, dim)
        self.scale = param(rngs, nnx.initializers.constant(mix_scale), (3,), jnp.float32, (None,))
        base = initial_base(n, pre_eps=pre_eps, post_mult_value=post_mult_value, comb_diagonal=comb_diagonal)
        self.base = param(rngs, _constant(base), base.shape, jnp.float32, (None,))

    def __call__(self, residual: jax.Array, *args: Any) -> Any:
        if residual.shape[-2:] != (self.mhc_mult, self.dim):
            raise ValueError(f"HyperConnection: residual must be [..., n, H] = [..., {self.mhc_mult}, {self.dim}], got {residual.shape}")
        if self.remat:
            return nnx.remat(HyperConnection._forward, policy=self.remat_policy)(self, residual, *args)
        return self._forward(residual, *args)

    def _forward(self, residual: jax.Array, *args: Any) -> Any:
        x, (post, comb), residual = mhc.mhc_pre(
            residual, self.fn[...], self.scale[...], self.base[...], norm_eps=self.norm_eps, mhc_mult=self.mhc_mult,
            post_mult_value=self.post_mult_value, pre_eps=self.pre_eps, sinkhorn_eps=self.sinkhorn_eps,
            sinkhorn_repeat=self.sinkhorn_repeat, n_splits=self.n_splits, return_residual=True, impl=self.impl,
        )  # fmt: skip
        out = self.sublayer(x, *args)
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        new = mhc.mhc_post(y.astype(jnp.bfloat16), residual, post, comb, impl=self.impl)
        return new if rest is None else (new, *rest)


class HyperHead(nnx.Module):
    """Leaves the n streams for the LM head: ``residual [..., n, H]`` bf16 -> ``[..., H]`` bf16, a
    per-token weighted sum of the streams (``jax_tilek.mhc.mhc_head``; the final norm comes after it).

    Parameters (fp32): ``fn [n, nH]``, ``scale [1]`` (``mix_scale``), ``base [n]`` with
    ``sigmoid(base) + pre_eps = 1/n``: at init the streams' mean (module docstring).
    """

    def __init__(self, dim: int, mhc_mult: int = 4, *, pre_eps: float = 1e-6, norm_eps: float = 1e-6, n_splits: int = 16, mix_scale: float = 0.01,
                 impl: Impl = None, rngs: nnx.Rngs):  # fmt: skip
        n = mhc_mult
        self.dim, self.mhc_mult, self.pre_eps, self.norm_eps, self.n_splits, self.impl = dim, n, pre_eps, norm_eps, n_splits, impl
        self.fn = _projection(rngs, n, n, dim)
        self.scale = param(rngs, nnx.initializers.constant(mix_scale), (1,), jnp.float32, (None,))
        self.base = param(rngs, nnx.initializers.constant(_logit(1 / n - pre_eps)), (n,), jnp.float32, (None,))

    def __call__(self, residual: jax.Array) -> jax.Array:
        return mhc.mhc_head(residual, self.fn[...], self.scale[...], self.base[...], norm_eps=self.norm_eps, mhc_mult=self.mhc_mult,
                            pre_eps=self.pre_eps, n_splits=self.n_splits, impl=self.impl)  # fmt: skip
