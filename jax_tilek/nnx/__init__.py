"""Flax NNX layers built on jax_tilek's ops (``pip install jax_tilek[nnx]``).

``RMSNorm`` (fused residual add, optional FP8 output), ``SwiGLU`` (an MLP), ``Router`` and ``MoE``
(routed experts on the fused layout, shared experts, the load-balancing loss). Each layer's ``impl``
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
    RMSNorm,
    SwiGLU,
    param,
)
from jax_tilek.nnx._moe import MoE, Router, RouterBias, load_balancing_loss, scores

__all__ = [
    "EMBED",
    "EXPERT",
    "HEADS",
    "HEAD_DIM",
    "MLP",
    "VOCAB",
    "MoE",
    "RMSNorm",
    "Router",
    "RouterBias",
    "SwiGLU",
    "load_balancing_loss",
    "param",
    "scores",
]
