"""Shared pieces of the Flax NNX layers (parameters with logical axes, dtypes) and the dense layers
``RMSNorm`` and ``SwiGLU``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jax_tilek import norm as _norm
from jax_tilek import swiglu as _swiglu

Impl = Literal["tilelang", "xla"] | None
Initializer = Callable[..., jax.Array]

# Logical axis names of the layers' parameters; a mesh shards them through ``nnx.logical_axis_rules``.
EMBED, MLP, EXPERT, VOCAB, HEADS, HEAD_DIM = "embed", "mlp", "expert", "vocab", "heads", "head_dim"


def mesh_is_set() -> bool:
    """Whether a mesh is in context (``jax.set_mesh``): parameters are then sharded as they are created."""
    return not jax.sharding.get_abstract_mesh().empty


def param(rngs: nnx.Rngs | None, init: Initializer, shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...]) -> nnx.Param:
    """An ``nnx.Param`` from ``init`` annotated with logical ``axes`` (``nnx.with_partitioning``).

    Under a mesh (``jax.set_mesh`` and ``nnx.logical_axis_rules``) it is sharded as it is created;
    without one it is created unsharded (``nnx.get_partition_spec`` still reads the annotation)."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = nnx.with_partitioning(init, axes)(key, shape, dtype)
    return nnx.Param(value, eager_sharding=mesh_is_set())


def rows(x: jax.Array) -> jax.Array:
    """``x[..., H]`` as ``[T, H]``."""
    return x.reshape(-1, x.shape[-1])


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, with the residual add fused (``jax_tilek.norm.rms_norm``).

    ``x`` and ``residual``: ``[..., H]`` bfloat16 or float32 (``dtype`` casts them first); H % 32 == 0.
    The weight (``param_dtype``, axis ``"embed"``) is cast to x's dtype.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Any = None, param_dtype: Any = jnp.float32, impl: Impl = None,
                 rngs: nnx.Rngs | None = None):  # fmt: skip
        self.dim, self.eps, self.dtype, self.impl = dim, eps, dtype, impl
        self.weight = param(rngs, nnx.initializers.ones, (dim,), param_dtype, (EMBED,))

    def _inputs(self, x: jax.Array, residual: jax.Array | None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        dtype = self.dtype or x.dtype
        return x.astype(dtype), None if residual is None else residual.astype(dtype), self.weight[...].astype(dtype)

    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)`` (the new residual stream)."""
        x, residual, weight = self._inputs(x, residual)
        return _norm.rms_norm(x, weight, self.eps, residual, impl=self.impl)

    def cast_fp8(self, x: jax.Array, residual: jax.Array | None = None) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """The normed output quantized for an FP8 matmul: ``((data, sf), x + residual)``, ``data``
        float8_e4m3fn ``[..., H]`` and ``sf`` float32 ``[..., H/32]`` (per-token 1 x 32 scales,
        ``jax_tilek.norm.norm_forward_and_per_token_cast``). Forward only (not differentiable)."""
        x, residual, weight = self._inputs(x, residual)
        quantized, _, _, norm_input = _norm.norm_forward_and_per_token_cast(x, weight, self.eps, residual=residual, impl=self.impl)
        return quantized, norm_input


class SwiGLU(nnx.Module):
    """A SwiGLU MLP: ``(silu(x W_l) * (x W_r)) W_down`` with ``W_up = [W_l | W_r]``.

    ``x``: ``[..., dim]``; computes in ``dtype`` (default x's), parameters in ``param_dtype``: ``w_up``
    ``[dim, 2·hidden]`` (axes ``"embed", "mlp"``), ``w_down`` ``[hidden, dim]`` (``"mlp", "embed"``).
    The activation is ``jax_tilek.swiglu.swiglu`` (hidden % 64 == 0), with an optional ``clamp_value``.
    """

    def __init__(self, dim: int, hidden: int, *, clamp_value: float | None = None, dtype: Any = None, param_dtype: Any = jnp.float32,
                 impl: Impl = None, rngs: nnx.Rngs):  # fmt: skip
        self.dim, self.hidden, self.clamp_value, self.dtype, self.impl = dim, hidden, clamp_value, dtype, impl
        init = nnx.initializers.lecun_normal()
        self.w_up = param(rngs, init, (dim, 2 * hidden), param_dtype, (EMBED, MLP))
        self.w_down = param(rngs, init, (hidden, dim), param_dtype, (MLP, EMBED))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        h = rows(x).astype(dtype) @ self.w_up[...].astype(dtype)
        a = _swiglu.swiglu(h, clamp_value=self.clamp_value, impl=self.impl)
        return (a @ self.w_down[...].astype(dtype)).reshape(x.shape)
