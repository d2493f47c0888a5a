"""MoE family: gating and routing (TileKernels v1 §1 and v2.1 §1.3, §2.2), as pure functions.

Gating: ``topk_gate``, ``topk_sum_and_topk_group_idx``, ``top2_sum_gate`` (v1), ``moe_topk_gate``
(= ``moe_topk_gate_forward``) and ``moe_topk_gate_backward`` (v2.1), and ``topk_gate_weights``, the
differentiable routing weights. Routing: ``get_fused_mapping`` (static capacity, padding rows -1, the
real count as an array), ``expand_to_fused`` / ``expand_to_fused_with_sf`` and ``reduce_fused``
(each other's transpose: their VJPs call each other). Utilities: ``normalize_weight``, ``aux_fi``,
``group_count``, ``mask_indices_by_tp``, ``unique_group_indices``. Indices are int32.
"""

from jax_tilek.moe._expand import expand_to_fused, expand_to_fused_with_sf
from jax_tilek.moe._fused_mapping import get_fused_mapping
from jax_tilek.moe._moe_topk_gate import moe_topk_gate, moe_topk_gate_backward, moe_topk_gate_forward, topk_gate_weights
from jax_tilek.moe._reduce import reduce_fused
from jax_tilek.moe._top2_sum_gate import top2_sum_gate
from jax_tilek.moe._topk_gate import topk_gate, topk_sum_and_topk_group_idx
from jax_tilek.moe._utils import aux_fi, group_count, mask_indices_by_tp, normalize_weight, unique_group_indices

__all__ = [
    "aux_fi",
    "expand_to_fused",
    "expand_to_fused_with_sf",
    "get_fused_mapping",
    "group_count",
    "mask_indices_by_tp",
    "moe_topk_gate",
    "moe_topk_gate_backward",
    "moe_topk_gate_forward",
    "normalize_weight",
    "reduce_fused",
    "top2_sum_gate",
    "topk_gate",
    "topk_gate_weights",
    "topk_sum_and_topk_group_idx",
    "unique_group_indices",
]
