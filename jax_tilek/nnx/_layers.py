"""Shared pieces of the Flax NNX layers (parameters with logical axes, dtypes) and the dense layers
``RMSNorm``, ``FP8Linear`` and ``SwiGLU``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jax_tilek import gemm
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


def fp8_matmul(x: jax.Array, w: jax.Array, *, impl: Impl = None) -> jax.Array:
    """``x [T, K] · w [K, N]`` bf16 run in FP8, DeepSeek's way: x cast per token (1 × 128), w per
    128 × 128 block, to e4m3 (``jax_tilek.gemm.grouped_matmul_quantized`` with one group); gradients
    straight through the casts, their products in FP8 too. K and N multiples of 128; returns bf16 ``[T, N]``."""
    sizes = jnp.full((1,), x.shape[0], jnp.int32)
    return gemm.grouped_matmul_quantized(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)[None], sizes, impl=impl)


class FP8Linear(nnx.Module):
    """A bias-free linear layer trained in FP8, DeepSeek-V3 style: bf16 (or ``param_dtype``) master
    weights ``kernel [din, dout]`` (axes ``axes``), the forward product in e4m3 with 1 × 128 activation
    and 128 × 128 weight block scales (:func:`fp8_matmul`), the backward products in FP8 as well
    (dy per token for dx; x and dy per channel for dw; straight through the casts). ``x [..., din]`` -> bf16 ``[..., dout]``;
    din and dout multiples of 128."""

    def __init__(self, din: int, dout: int, *, axes: tuple[str | None, str | None] = (EMBED, MLP), param_dtype: Any = jnp.float32,
                 impl: Impl = None, rngs: nnx.Rngs):  # fmt: skip
        for label, extent in (("din", din), ("dout", dout)):
            if extent <= 0 or extent % 128:
                raise ValueError(f"FP8Linear: {label} must be a positive multiple of 128 (the scales' block), got {extent}")
        self.din, self.dout, self.impl = din, dout, impl
        self.kernel = param(rngs, nnx.initializers.lecun_normal(), (din, dout), param_dtype, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return fp8_matmul(rows(x), self.kernel[...], impl=self.impl).reshape(*x.shape[:-1], self.dout)


class SwiGLU(nnx.Module):
    """A SwiGLU MLP: ``(silu(x W_l) * (x W_r)) W_down`` with ``W_up = [W_l | W_r]``.

    ``x``: ``[..., dim]``; computes in ``dtype`` (default x's), parameters in ``param_dtype``: ``w_up``
    ``[dim, 2·hidden]`` (axes ``"embed", "mlp"``), ``w_down`` ``[hidden, dim]`` (``"mlp", "embed"``).
    The activation is ``jax_tilek.swiglu.swiglu`` (hidden % 64 == 0), with an optional ``clamp_value``.
    ``fp8=True`` runs both products as :func:`fp8_matmul` (dim and hidden multiples of 128; output bf16).
    """

    def __init__(self, dim: int, hidden: int, *, clamp_value: float | None = None, dtype: Any = None, param_dtype: Any = jnp.float32,
                 fp8: bool = False, impl: Impl = None, rngs: nnx.Rngs):  # fmt: skip
        self.dim, self.hidden, self.clamp_value, self.dtype, self.fp8, self.impl = dim, hidden, clamp_value, dtype, fp8, impl
        init = nnx.initializers.lecun_normal()
        self.w_up = param(rngs, init, (dim, 2 * hidden), param_dtype, (EMBED, MLP))
        self.w_down = param(rngs, init, (hidden, dim), param_dtype, (MLP, EMBED))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.bfloat16 if self.fp8 else self.dtype or x.dtype
        matmul = (lambda a, w: fp8_matmul(a, w, impl=self.impl)) if self.fp8 else (lambda a, w: a @ w.astype(dtype))  # noqa: E731
        h = matmul(rows(x).astype(dtype), self.w_up[...])
        a = _swiglu.swiglu(h, clamp_value=self.clamp_value, impl=self.impl)
        return matmul(a, self.w_down[...]).reshape(x.shape)
