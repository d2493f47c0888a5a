"""Engram family: DeepSeek's conditional-memory gate and its Sinkhorn optimiser (TileKernels v1 §4 and
v2.1 §2.4), as pure functions.

An Engram layer hashes each token's n-gram (the token and the ones before it) into embedding tables
(``engram_hash``), looks the rows up, projects them to per-head keys and a shared value (packed
``kv [T, hc + 1, H]``) and gates the value into each hyper-connection head of the residual stream
``hidden_states [T, hc, H]`` (``engram_gate``). The tables are trained with a momentum + Sinkhorn
normalisation optimiser (``sinkhorn_momentum``).

Ops with TileLang kernels:

- ``engram_hash`` (64-bit n-gram hashes, image tokens -> -1), ``fused_weight``;
- ``engram_gate_fwd`` (saving ``dot``, ``gate_score``, ``rstd_x``, ``rstd_k``; image tokens copied
  through), ``engram_gate_bwd`` (weight gradient as fixed partial rows), ``grad_w_reduce`` (their
  fixed-order sum); ``engram_gate``, differentiable, whose custom VJP runs those four;
- Sinkhorn helpers: ``engram_sinkhorn_momentum_update``, ``engram_sinkhorn_step`` (row step and
  fixed-partition column partials), ``engram_sinkhorn_step_reduce`` (fixed-order sum),
  ``engram_sinkhorn_col_update`` (that sum and the column-scale update in one launch; not in
  TileKernels), ``engram_sinkhorn_finalize``;
- ``sinkhorn_momentum``: an optax ``GradientTransformation`` running the whole update on the kernels.

TileKernels updates buffers in place; these functions return new arrays instead (XLA reuses donated
buffers). Every reference follows TileKernels' torch reference (``torch/engram.py``); the modules'
docstrings give the operation orders and where the kernels round differently.
"""

from jax_tilek.engram._fused_weight import fused_weight
from jax_tilek.engram._gate import engram_gate
from jax_tilek.engram._gate_bwd import engram_gate_bwd
from jax_tilek.engram._gate_fwd import GateConfig, engram_gate_fwd
from jax_tilek.engram._grad_w_reduce import grad_w_reduce
from jax_tilek.engram._hash import engram_hash, make_offsets
from jax_tilek.engram._optax import SinkhornMomentumState, sinkhorn_momentum
from jax_tilek.engram._sinkhorn_finalize import engram_sinkhorn_finalize
from jax_tilek.engram._sinkhorn_momentum import engram_sinkhorn_momentum_update
from jax_tilek.engram._sinkhorn_reduce import engram_sinkhorn_col_update, engram_sinkhorn_step_reduce
from jax_tilek.engram._sinkhorn_step import engram_sinkhorn_step

__all__ = [
    "GateConfig",
    "SinkhornMomentumState",
    "engram_gate",
    "engram_gate_bwd",
    "engram_gate_fwd",
    "engram_hash",
    "engram_sinkhorn_col_update",
    "engram_sinkhorn_finalize",
    "engram_sinkhorn_momentum_update",
    "engram_sinkhorn_step",
    "engram_sinkhorn_step_reduce",
    "fused_weight",
    "grad_w_reduce",
    "make_offsets",
    "sinkhorn_momentum",
]
