"""Flax NNX layers built on jax_tilek's ops (``pip install jax_tilek[nnx]``).

``RMSNorm`` (fused residual add, optional FP8 output), ``FP8Linear`` (DeepSeek-style FP8 training),
``SwiGLU`` (an MLP, optionally FP8), ``Router`` and ``MoE`` (routed experts on the fused layout,
shared experts, the load-balancing loss; bf16 or FP8 expert matmuls), ``RotaryEmbedding``,
``EngramGate`` (hash → table lookup → gate, tables shardable by rows) and the mHC residual blocks
``HyperConnection``, ``hyper_expand``, ``HyperHead``. Each layer's ``impl``
(None: kernels on Hopper/Blackwell GPUs, references elsewhere; ``"tilelang"``; ``"xla"``) is passed to
every op it calls; None follows ``jax_tilek.set_default_impl`` / ``jax_tilek.default_impl``.

Parameters carry logical axis names (``nnx.with_partitioning``): ``"embed"``, ``"mlp"``, ``"expert"``.
Map them to a mesh with ``nnx.logical_axis_rules`` and create the model under ``jax.set_mesh`` to shard
it as it is created, or read ``nnx.get_partition_spec(nnx.state(model))`` under the rules.
"""

from jax_tilek.nnx._layers import (
    EMBED,
    EXPERT,
    HEAD_DIM,
    HEADS,
    MLP,
    VOCAB,
    FP8Linear,
    RMSNorm,
    SwiGLU,
    param,
)
from jax_tilek.nnx._engram import ENGRAM_ROWS, EngramGate, is_table, ngram_token_ids
from jax_tilek.nnx._mhc import HyperConnection, HyperHead, hyper_expand
from jax_tilek.nnx._moe import MoE, Router, RouterBias, load_balancing_loss, scores
from jax_tilek.nnx._rope import RotaryCache, RotaryEmbedding

__all__ = [
    "EMBED",
    "ENGRAM_ROWS",
    "EngramGate",
    "EXPERT",
    "FP8Linear",
    "HEADS",
    "HEAD_DIM",
    "HyperConnection",
    "HyperHead",
    "MLP",
    "VOCAB",
    "MoE",
    "RMSNorm",
    "RotaryCache",
    "RotaryEmbedding",
    "Router",
    "RouterBias",
    "SwiGLU",
    "hyper_expand",
    "is_table",
    "load_balancing_loss",
    "ngram_token_ids",
    "param",
    "scores",
]
