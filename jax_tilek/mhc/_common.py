"""Shared argument checks, shape helpers and kernel constants of the mHC family.

Conventions (TileKernels v1 §5): the residual stream is ``[..., n, H]`` bfloat16 (n = ``mhc_mult``
streams), mixes are float32, and ``n3 = n * (n + 2)`` projections split as ``[pre n | post n | comb n²]``.
Every op flattens the leading axes into one token axis ``T``; the TileOps work on ``[T, ...]``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks

MAX_MULT = 8  # largest n the kernels take (the post backward keeps n² + n sums per lane)
VEC = 8  # bf16 elements per 16-byte vector: H must be a multiple of it
THREADS = 128
BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)
PARTIAL_ROWS = 4096  # per-thread partial rows of the token reductions (d scale, d base)


def n3(n: int) -> int:
    """Projections per token: n pre + n post + n² comb."""
    return n * (n + 2)


def check_mult(op: str, mhc_mult: Any) -> int:
    """``mhc_mult`` as an int in ``[1, MAX_MULT]`` (a ValueError otherwise; n = 4 is the tuned case)."""
    n = checks.static_int(op, "mhc_mult", mhc_mult)
    if not 1 <= n <= MAX_MULT:
        raise ValueError(f"{op}: mhc_mult must be in [1, {MAX_MULT}] (4 is the tuned case), got {n}")
    return n


def check_hidden(op: str, name: str, h: int) -> None:
    if h <= 0 or h % VEC:
        raise ValueError(f"{op}: the hidden size of {name} must be a positive multiple of {VEC} (16-byte bf16 vectors), got {h}")


def check_dtype(op: str, name: str, x: jax.Array, dtype: Any) -> None:
    if x.dtype != jnp.dtype(dtype):
        raise ValueError(f"{op}: {name} must be {jnp.dtype(dtype).name}, got {x.dtype}")


def check_residual(op: str, residual: Any, mhc_mult: int | None = None, name: str = "residual") -> tuple[jax.Array, int, int]:
    """``residual`` as a bf16 array ``[..., n, H]``; returns ``(residual, n, H)``."""
    residual = checks.as_array(op, name, residual)
    if residual.ndim < 2:
        raise ValueError(f"{op}: {name} must be [..., n, H], got shape {residual.shape}")
    check_dtype(op, name, residual, BF16)
    n, h = residual.shape[-2:]
    if mhc_mult is not None and n != mhc_mult:
        raise ValueError(f"{op}: {name} has {n} streams (axis -2), but mhc_mult is {mhc_mult}")
    check_mult(op, n)
    check_hidden(op, name, h)
    return residual, n, h


def check_shape(op: str, name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(x.shape)}")


def check_eps(op: str, name: str, value: Any) -> float:
    return checks.static_number(op, name, value, minimum=0.0, optional=False)


def tokens(lead: tuple[int, ...]) -> int:
    return int(math.prod(lead))


def partial_rows(t: int) -> int:
    """Partial rows of a token reduction kernel: thread ``p`` of ``P`` sums tokens ``p, p + P, ...``."""
    return max(1, min(PARTIAL_ROWS, t))


def sigmoid(z: jax.Array) -> jax.Array:
    """``1 / (1 + exp(-z))`` in float32, the kernels' formula."""
    return 1.0 / (1.0 + jnp.exp(-z))


def random_probs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Softmax of normal draws along the last-but-one axis ``[..., n, 1]`` (TileKernels' test mixes)."""
    z = rng.standard_normal(shape).astype(np.float32)
    e = np.exp(z - z.max(axis=-2, keepdims=True))
    return (e / e.sum(axis=-2, keepdims=True)).astype(np.float32)
