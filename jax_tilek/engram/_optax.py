"""sinkhorn_momentum: the Engram Sinkhorn optimiser as an optax ``GradientTransformation`` (going past
TileKernels, which ships the kernels and leaves the iteration, including the column-scale update, to
its callers).

For every parameter leaf ``p`` (viewed as a matrix ``[R, D]``: its last axis is D, the others are
rows; a 1-D leaf is one row) and its gradient g, one update is::

    x, m    = engram_sinkhorn_momentum_update(g, m, beta1, nesterov)       # m: the state
    rs, cs  = ones(R), ones(D)
    repeat ``iterations`` times:
        norm, rs, partial = engram_sinkhorn_step(x, rs, cs, eps)           # rows to unit norm
        rs              = where(norm == 0, 0, rs)                         # an all-zero row stays 0
        _, cs           = engram_sinkhorn_col_update(partial, cs, R, eps)  # columns to norm sqrt(R / D)
    update  = engram_sinkhorn_finalize(x, rs, cs, eps, alpha)              # rows to norm alpha

all on the kernels (2 launches per iteration, 2 more per step); ``alpha`` defaults to sqrt(D), so that
entries have unit RMS. The zero-row guard is ours: an untouched embedding row has zero momentum, and
TileKernels' ``row_scale / (0 + eps)`` would grow as ``(1 / eps)^k`` over the iterations and reach
inf (then NaN). The update has the gradient's sign and dtype: chain it with a negative scale (or pass
``learning_rate``, which appends ``optax.scale_by_learning_rate``). Use ``optax.multi_transform`` to
apply it to the Engram tables only.

optax is needed only to build the transform (``pip install jax_tilek[nnx]``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import MAX_SINKHORN_DIM, non_negative
from jax_tilek.engram._sinkhorn_finalize import engram_sinkhorn_finalize
from jax_tilek.engram._sinkhorn_momentum import engram_sinkhorn_momentum_update
from jax_tilek.engram._sinkhorn_reduce import engram_sinkhorn_col_update
from jax_tilek.engram._sinkhorn_step import engram_sinkhorn_step


class SinkhornMomentumState(NamedTuple):
    """The momentum buffer of every leaf (``momentum_dtype``, default the parameter's dtype)."""

    momentum: Any


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[R, D]`` view of a leaf of ``shape``."""
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def sinkhorn_direction(x: jax.Array, *, iterations: int, eps: float, alpha: float | None, impl=None) -> jax.Array:
    """The Sinkhorn-normalised ``x [R, D]`` fp32 (the module docstring's loop after the momentum)."""
    r, d = x.shape
    rs = jnp.ones((r,), jnp.float32)
    cs = jnp.ones((d,), jnp.float32)
    for _ in range(iterations):
        norm, rs, partial = engram_sinkhorn_step(x, rs, cs, eps, impl=impl)
        rs = jnp.where(norm == 0, jnp.float32(0), rs)
        _, cs = engram_sinkhorn_col_update(partial, cs, r, eps, impl=impl)
    return engram_sinkhorn_finalize(x, rs, cs, eps, math.sqrt(d) if alpha is None else alpha, impl=impl)


def sinkhorn_momentum(learning_rate: Any = None, beta1: float = 0.95, nesterov: bool = True, iterations: int = 5, eps: float = 1e-20,
                      alpha: float | None = None, momentum_dtype: Any = None, *, impl=None):  # fmt: skip
    """The Engram Sinkhorn optimiser (module docstring) as an optax ``GradientTransformation``.

    Args:
      learning_rate: None (the transform returns the direction), or a float or optax schedule: then
        ``optax.scale_by_learning_rate(learning_rate)`` is chained after it (updates = -lr · direction).
      beta1: momentum decay; nesterov: feed the Nesterov look-ahead to Sinkhorn.
      iterations: row/column Sinkhorn iterations before the final row normalisation (>= 0).
      eps: added to every row and column norm.
      alpha: the final rows' norm (default sqrt(D)).
      momentum_dtype: the momentum buffers' dtype (bf16 or fp32; default each parameter's).
      impl: passed to every kernel op (None: kernels on Hopper/Blackwell, references elsewhere).

    Every leaf's last axis D must be a multiple of 4 up to 16384 (the kernels' rows).
    """
    import optax

    name = "sinkhorn_momentum"
    beta1 = checks.static_number(name, "beta1", beta1, optional=False)
    nesterov = checks.static_bool(name, "nesterov", nesterov)
    iterations = checks.static_int(name, "iterations", iterations)
    if iterations < 0:
        raise ValueError(f"{name}: iterations must be >= 0, got {iterations}")
    eps = non_negative(name, "eps", eps)
    alpha = checks.static_number(name, "alpha", alpha)
    if momentum_dtype is not None and jnp.dtype(momentum_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"{name}: momentum_dtype must be bfloat16 or float32, got {momentum_dtype}")

    def buffer_dtype(p):
        if momentum_dtype is not None:
            return jnp.dtype(momentum_dtype)
        return jnp.dtype(p.dtype) if jnp.dtype(p.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) else jnp.dtype(jnp.float32)

    def check_leaf(shape):
        d = matrix_shape(tuple(shape))[1]
        if d % 4 or d > MAX_SINKHORN_DIM:
            raise ValueError(f"{name}: a parameter's last axis must be a multiple of 4 up to {MAX_SINKHORN_DIM} (the Sinkhorn kernels' rows), "
                             f"got shape {tuple(shape)}; route other parameters elsewhere with optax.multi_transform")  # fmt: skip

    def init(params):
        def zeros(p):
            check_leaf(jnp.shape(p))
            return jnp.zeros(jnp.shape(p), buffer_dtype(p))

        return SinkhornMomentumState(jax.tree.map(zeros, params))

    def update_leaf(g, m):
        check_leaf(g.shape)
        grad = g if g.dtype in (jnp.bfloat16, jnp.float32) else g.astype(jnp.float32)
        x, m = engram_sinkhorn_momentum_update(grad, m, beta1, nesterov, impl=impl)
        direction = sinkhorn_direction(x.reshape(matrix_shape(g.shape)), iterations=iterations, eps=eps, alpha=alpha, impl=impl)
        return direction.reshape(g.shape).astype(g.dtype), m

    def update(updates, state, params=None):
        del params
        leaves, tree = jax.tree.flatten(updates)
        moms = tree.flatten_up_to(state.momentum)
        pairs = [update_leaf(g, m) for g, m in zip(leaves, moms)]
        return tree.unflatten([u for u, _ in pairs]), SinkhornMomentumState(tree.unflatten([m for _, m in pairs]))

    tx = optax.GradientTransformation(init, update)
    if learning_rate is None:
        return tx
    return optax.chain(tx, optax.scale_by_learning_rate(learning_rate))
