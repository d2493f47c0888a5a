"""The Engram gate layer: n-gram hash -> embedding-table lookup -> key/value projection -> gate into
the hyper-connection heads of the residual stream (``jax_tilek.engram``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tilek import engram
from jax_tilek.nnx._layers import EMBED, Impl, param

ENGRAM_ROWS = "engram_rows"  # the logical axis of the Engram tables' rows (shard it over a mesh axis)


def ngram_token_ids(tokens: jax.Array, max_ngram_size: int, pad_id: int = 0) -> jax.Array:
    """``tokens [..., S]`` (int) -> int32 ``[..., S, N]``: column j holds the token j positions back in
    its sequence (``pad_id`` before the start), the layout ``engram_hash`` takes."""
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    s = tokens.shape[-1]
    cols = []
    for j in range(max_ngram_size):
        shifted = jnp.concatenate([jnp.full((*tokens.shape[:-1], min(j, s)), pad_id, jnp.int32), tokens[..., : s - j]], axis=-1)
        cols.append(shifted[..., :s])
    return jnp.stack(cols, axis=-1)


def default_multipliers(max_ngram_size: int, seed: int = 0) -> tuple[int, ...]:
    """Odd 62-bit hash multipliers from a seed (NumPy's generator: the same on every host)."""
    rng = np.random.default_rng(seed)
    return tuple(int(v) * 2 + 1 for v in rng.integers(1, 2**61, max_ngram_size, dtype=np.int64))


class EngramGate(nnx.Module):
    """An Engram layer: each token's n-grams (orders 2..N) are hashed into ``Tb`` tables per order
    (``jax_tilek.engram.engram_hash``; image tokens get no lookup), the rows are looked up in one
    concatenated table ``table [sum(vocab_sizes), embed_dim]``, concatenated per token and projected by
    ``w_kv [(N-1)·Tb·embed_dim, (hc+1)·H]`` to the packed keys and value, and
    ``jax_tilek.engram.engram_gate`` gates the value into every head of ``hidden_states``.

    Args:
      hidden: H (a multiple of 8); hc_mult: the residual stream's heads.
      vocab_sizes: ``[N-1, Tb]`` positive table sizes (order 2..N, table b); N = rows + 1.
      embed_dim: the tables' width.
      multipliers: N int64 hash multipliers (default :func:`default_multipliers` of ``seed``).
      clamp_value, eps: the gate's clamp and RMSNorm epsilon.
      dtype: the projection's compute dtype; param_dtype: the parameters' (the gate takes the RMSNorm
        weights in bf16 or fp32 as they are).
      pad_rows_to: round the table's rows up to a multiple of this (e.g. the mesh axis that shards them).

    Parameters carry logical axes: the table ``(ENGRAM_ROWS, None)`` -- map ``"engram_rows"`` to a mesh
    axis to shard the (large) tables by rows -- ``w_kv`` ``(None, "embed")``, the RMSNorm weights
    ``(None, "embed")``. Train the table with ``jax_tilek.engram.sinkhorn_momentum`` through
    ``optax.multi_transform`` (:func:`is_table` labels it).
    """

    def __init__(self, hidden: int, hc_mult: int, vocab_sizes: Sequence[Sequence[int]], embed_dim: int, *, multipliers: Sequence[int] | None = None,
                 seed: int = 0, clamp_value: float = 1e-6, eps: float = 1e-6, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.float32,
                 pad_rows_to: int = 1, impl: Impl = None, rngs: nnx.Rngs):  # fmt: skip
        vocab = np.asarray(vocab_sizes, np.int64)
        if vocab.ndim != 2 or vocab.size == 0 or np.any(vocab <= 0):
            raise ValueError(f"EngramGate: vocab_sizes must be a non-empty [N-1, Tb] of positive sizes, got shape {vocab.shape}")
        if vocab.sum() >= 2**31:
            raise ValueError(f"EngramGate: the tables' rows must add up to less than 2^31, got {int(vocab.sum())}")
        n = vocab.shape[0] + 1
        mult = default_multipliers(n, seed) if multipliers is None else tuple(int(m) for m in multipliers)
        if len(mult) != n:
            raise ValueError(f"EngramGate: {n} multipliers needed (one per n-gram position), got {len(mult)}")
        self.hidden, self.hc_mult, self.embed_dim, self.max_ngram_size = hidden, hc_mult, embed_dim, n
        self.vocab_sizes = tuple(tuple(int(v) for v in row) for row in vocab)
        self.multipliers = mult
        self.clamp_value, self.eps, self.dtype, self.impl = clamp_value, eps, dtype, impl
        slots = vocab.size
        rows = -(-int(vocab.sum()) // pad_rows_to) * pad_rows_to  # rows past the tables are never looked up
        self.table = param(rngs, nnx.initializers.normal(1.0), (rows, embed_dim), param_dtype, (ENGRAM_ROWS, None))
        self.w_kv = param(rngs, nnx.initializers.lecun_normal(), (slots * embed_dim, (hc_mult + 1) * hidden), param_dtype, (None, EMBED))
        self.weight_hidden = param(rngs, nnx.initializers.ones, (hc_mult, hidden), param_dtype, (None, EMBED))
        self.weight_embed = param(rngs, nnx.initializers.ones, (hc_mult, hidden), param_dtype, (None, EMBED))

    def indices(self, ngram_ids: jax.Array, image_token_mask: jax.Array | None = None) -> jax.Array:
        """``ngram_ids [T, N]`` int32 -> the table rows ``[T, (N-1)·Tb]`` int32 (-1 for image tokens)."""
        vocab = np.asarray(self.vocab_sizes, np.int32)[None]
        words = np.asarray(self.multipliers, np.int64)[None]
        offsets = engram.make_offsets(vocab)
        return engram.engram_hash(ngram_ids, words, vocab, offsets, image_token_mask, impl=self.impl)[0]

    def kv(self, ngram_ids: jax.Array, image_token_mask: jax.Array | None = None) -> jax.Array:
        """The packed keys and value ``[T, (hc+1)·H]`` (``dtype``) of ``ngram_ids [T, N]``."""
        idx = self.indices(ngram_ids, image_token_mask)
        rows = jnp.take(self.table[...], jnp.maximum(idx, 0), axis=0)  # image tokens' rows are never used
        flat = rows.reshape(idx.shape[0], -1).astype(self.dtype)
        return flat @ self.w_kv[...].astype(self.dtype)

    def _weight(self, w: nnx.Param) -> jax.Array:
        value = w[...]
        return value if value.dtype in (jnp.bfloat16, jnp.float32) else value.astype(jnp.float32)

    def __call__(self, hidden_states: jax.Array, ngram_ids: jax.Array, image_token_mask: jax.Array | None = None) -> jax.Array:
        """``hidden_states [..., hc, H]`` (cast to bf16), ``ngram_ids [..., N]`` int32
        (:func:`ngram_token_ids`), ``image_token_mask`` optional bool ``[...]`` -> bf16 ``[..., hc, H]``."""
        lead = hidden_states.shape[:-2]
        ids = jnp.asarray(ngram_ids).reshape(-1, self.max_ngram_size)
        mask = None if image_token_mask is None else jnp.asarray(image_token_mask).reshape(-1)
        kv = self.kv(ids, mask).astype(jnp.bfloat16)
        x = hidden_states.astype(jnp.bfloat16).reshape(-1, self.hc_mult, self.hidden)
        out = engram.engram_gate(x, kv, self._weight(self.weight_hidden), self._weight(self.weight_embed), self.clamp_value, self.eps, mask,
                                 impl=self.impl)  # fmt: skip
        return out.reshape(*lead, self.hc_mult, self.hidden)


def is_table(path: Sequence[Any], _value: Any = None) -> bool:
    """For ``optax.multi_transform`` labels over an ``nnx.state`` (``jax.tree_util.tree_map_with_path``):
    whether a leaf is an Engram table (an attribute ``table``, as EngramGate names it)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    while names and names[-1] == "value":  # a Variable's own leaf
        names.pop()
    return bool(names) and names[-1] == "table"
