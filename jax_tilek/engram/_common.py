"""Shared argument checks, thread layouts and constants of the Engram family.

Conventions (TileKernels v1 §4, v2.1 §2.4): ``hidden_states`` is ``[T, hc, H]`` bfloat16 (``hc`` the
hyper-connection heads), ``kv`` is packed ``[T, hc + 1, H]`` bfloat16 (keys ``kv[:, :hc]``, the shared
value ``kv[:, hc]``), per-head statistics are float32 ``[T, hc]``. The TileOps work on those flat
shapes; the public functions flatten leading axes into ``T``.

Partial sums that the kernels write per CTA (the gate's weight gradient, Sinkhorn's column sums of
squares) use a *fixed* number of partial rows, a function of the shapes only (not of the GPU), so
that every GPU sums in the same order and the references can mirror the partition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jax_tilek import checks

BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)
VEC = 8  # bf16 elements per 16-byte vector: H must be a multiple of it
MAX_HEADS = 16
MAX_HIDDEN = 32768
GATE_PARTIALS = 132  # partial rows of the gate's weight gradient (one per SM of an H100/H200): fixed
SINKHORN_CTAS = 396  # CTAs of the Sinkhorn row step (3 per SM of an H100/H200): fixed
MAX_SINKHORN_DIM = 16384


def check_dtype(op: str, name: str, x: jax.Array, *dtypes: Any) -> None:
    allowed = [jnp.dtype(d) for d in dtypes]
    if x.dtype not in allowed:
        names = " or ".join(d.name for d in allowed)
        raise ValueError(f"{op}: {name} must be {names}, got {x.dtype}")


def check_shape(op: str, name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(x.shape)}")


def check_hidden(op: str, hidden: int) -> None:
    if hidden <= 0 or hidden % VEC or hidden > MAX_HIDDEN:
        raise ValueError(f"{op}: the hidden size must be a positive multiple of {VEC} (16-byte bf16 vectors) up to {MAX_HIDDEN}, got {hidden}")


def check_heads(op: str, heads: int) -> None:
    if not 1 <= heads <= MAX_HEADS:
        raise ValueError(f"{op}: the number of heads (hc_mult) must be in [1, {MAX_HEADS}], got {heads}")


def positive(op: str, name: str, value: Any) -> float:
    return checks.static_number(op, name, value, positive=True, optional=False)


def non_negative(op: str, name: str, value: Any) -> float:
    return checks.static_number(op, name, value, minimum=0.0, optional=False)


def check_mask(op: str, mask: Any, lead: tuple[int, ...]) -> jax.Array | None:
    """``image_token_mask`` as a bool array of the tokens' leading shape, or None."""
    mask = checks.as_array(op, "image_token_mask", mask, optional=True)
    if mask is None:
        return None
    check_dtype(op, "image_token_mask", mask, jnp.bool_)
    check_shape(op, "image_token_mask", mask, lead)
    return mask


# ---------------------------------------------------------------------------------------------
# Thread layouts.


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How ``threads`` threads cover one row of ``nvec`` 16-byte vectors: thread ``i`` owns vectors
    ``j * threads + i`` for ``j < vpt`` (those past ``nvec`` are skipped)."""

    nvec: int
    threads: int
    vpt: int

    @property
    def warps(self) -> int:
        return max(1, self.threads // 32)


def gate_layout(hidden: int, threads: int | None = None) -> RowLayout:
    """The gate kernels' layout for one head's row of ``hidden`` bf16: by default whole warps, the
    fewest that keep at most 4 vectors (32 elements) per thread."""
    nvec = hidden // VEC
    if threads is None:
        threads = 32 * -(-nvec // (4 * 32))
    if threads % 32 or not 32 <= threads <= 1024:
        raise ValueError(f"gate threads must be a multiple of 32 in [32, 1024], got {threads}")
    return RowLayout(nvec, threads, -(-nvec // threads))


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Rows of ``dim`` fp32 covered by groups of ``group`` threads (4-float vectors, ``vpt`` per thread,
    vector ``j * group + lane``); a CTA runs ``rows`` groups side by side (``rows * group`` threads).
    Groups of up to 32 threads sum a row with shuffles; wider groups (whole warps) also through shared
    memory."""

    dim: int
    group: int
    vpt: int
    rows: int

    @property
    def nvec(self) -> int:
        return self.dim // 4

    @property
    def threads(self) -> int:
        return self.group * self.rows

    @property
    def warps(self) -> int:
        """Warps per group (1 for a group within a warp)."""
        return max(1, self.group // 32)


def group_layout(dim: int) -> GroupLayout:
    """The Sinkhorn kernels' layout: at most 4 vectors (16 floats) per thread; a power of two up to 32
    threads per row, several rows per 256-thread CTA, or whole warps per row for wide rows."""
    nvec = dim // 4
    want = -(-nvec // 4)
    if want <= 32:
        group = 1 << max(0, (want - 1).bit_length())
        return GroupLayout(dim, group, -(-nvec // group), 256 // group)
    group = 32 * -(-want // 32)
    return GroupLayout(dim, group, -(-nvec // group), max(1, 256 // group))


def sinkhorn_partials(dim: int) -> int:
    """Partial rows of the Sinkhorn step's column sums of squares: one per row group of every CTA."""
    return SINKHORN_CTAS * group_layout(dim).rows
