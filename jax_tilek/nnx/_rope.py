"""``RotaryEmbedding``: rotary position embedding of attention queries and keys (``jax_tilek.rope``)."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jax_tilek import rope as _rope

Impl = Literal["tilelang", "xla"] | None


class RotaryCache(nnx.Variable):
    """The cos/sin table of a :class:`RotaryEmbedding`: not a ``Param``, so ``nnx.grad`` and optimizers
    (``wrt=nnx.Param``) leave it alone; it is saved and restored with the rest of the model's state."""


class RotaryEmbedding(nnx.Module):
    """Rotates queries and keys by their positions (``jax_tilek.rope.apply_rotary``, one kernel launch
    for both), differentiably.

    The table is float32 ``[max_positions, rot_dim]`` (cos | sin halves), built by
    ``jax_tilek.rope.make_cos_sin_cache(rot_dim, max_positions, base, scale)`` unless ``cos_sin_cache`` is
    given (YaRN or any other schedule). ``rot_dim`` is 64 or 128; with a larger head dim only the window
    ``columns`` rotates (slice bounds applied to each head dim, default the first ``rot_dim`` columns;
    ``(-64, None)`` for DeepSeek's rope-at-the-end layout), the other columns pass through.

    Call with ``query [B, S, heads, D]`` (or ``[T, heads, D]``) and optionally ``key`` (its own heads and
    D, the same dtype: bf16, fp16 or fp32), ``positions`` (int32 ``[B, S]`` / ``[T]``; default each token's
    index in its sequence) and ``seqlen_offset`` (a static int added to every position, e.g. the length
    of a decoding cache); returns the rotated query, or ``(query, key)``. ``inverse=True`` undoes it.
    """

    def __init__(self, rot_dim: int, max_positions: int, *, base: float = 10000.0, scale: float = 1.0, interleaved: bool = False,
                 columns: tuple[int | None, int | None] | None = None, cos_sin_cache: jax.Array | None = None,
                 impl: Impl = None):  # fmt: skip
        if rot_dim not in (64, 128):
            raise ValueError(f"RotaryEmbedding: rot_dim must be 64 or 128 (the kernels' rotary dims), got {rot_dim}")
        if cos_sin_cache is None:
            cos_sin_cache = _rope.make_cos_sin_cache(rot_dim, max_positions, base=base, scale=scale)
        cos_sin_cache = jnp.asarray(cos_sin_cache)
        if cos_sin_cache.shape != (max_positions, rot_dim) or cos_sin_cache.dtype != jnp.float32:
            raise ValueError(
                f"RotaryEmbedding: cos_sin_cache must be float32 [max_positions, rot_dim] = [{max_positions}, {rot_dim}], "
                f"got {cos_sin_cache.dtype}{list(cos_sin_cache.shape)}"
            )
        self.rot_dim, self.max_positions, self.interleaved, self.impl = rot_dim, max_positions, interleaved, impl
        self.columns = None if columns is None else tuple(columns)
        self.cos_sin_cache = RotaryCache(cos_sin_cache)

    def __call__(self, query: jax.Array, key: jax.Array | None = None, positions: jax.Array | None = None, seqlen_offset: int = 0,
                 *, inverse: bool = False) -> Any:  # fmt: skip
        return _rope.apply_rotary(
            query, self.cos_sin_cache[...], key, positions, interleaved=self.interleaved, conjugate=inverse,
            seqlen_offset=seqlen_offset, columns=self.columns, impl=self.impl,
        )  # fmt: skip
