"""Expert parallelism for the MoE layer: experts sharded over one mesh axis, tokens dispatched to them
with a ragged all-to-all inside ``jax.shard_map``.

With n devices on the axis, device r holds experts ``[r·E/n, (r+1)·E/n)`` and T/n tokens. Per device:

1. route the local tokens and lay their (token, k) rows out expert-major (``get_fused_mapping`` with
   alignment 1, ``expand_to_fused``): S = T/n·K rows, the rows of global expert g at
   ``[start[g], start[g] + count[g])``;
2. exchange the per-expert counts and send offsets (one small ``all_to_all``), lay out the receive
   buffer expert-major over the local experts (segments aligned to the layer's ``alignment``; within a
   segment, rows by source device), and tell each source where its slices land (a second small
   ``all_to_all``);
3. send the rows with a ragged all-to-all of E slices (slice g to g's owner), run the local experts
   (``MoE.experts``: grouped GEMMs on the segments), send the results back with the reverse exchange
   (the transpose of the first), and combine them with the routing weights (``reduce_fused``).

With ``dispatch_fp8``, step 3 sends each row as e4m3 with its 1 × 128 fp32 scales
(``jax_tilek.quant.per_token_cast`` before ``expand_to_fused_with_sf``; ``per_token_cast_back`` after
the exchange): about half the bytes of bf16 rows, as DeepEP dispatches. The experts see the
dequantized rows; the results travel back in the layer's dtype, and the gradient of the dispatch goes
straight through the quantization (the transpose of the unquantized dispatch: bf16 rows back).

The receive buffer has the exact static bound ``(n·S + (alignment−1)·E/n)`` rounded down to a multiple
of ``alignment`` rows: every source sends at most S rows, each local segment adds less than
``alignment`` padding rows; nothing is ever dropped. The ops inside are the same per-device calls as
the single-device layer, so the kernels run unchanged.

``jax.lax.ragged_all_to_all`` has no XLA:CPU implementation (jax 0.10): on CPU the exchange is
:func:`padded_ragged_all_to_all`, the same result from an ``all_to_all`` of fixed-capacity padded
buffers; the choice is made per lowering platform (``jax.lax.platform_dependent``).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from jax_tilek import moe, quant

if TYPE_CHECKING:
    from jax_tilek.nnx._moe import MoE

EXPERT_WEIGHTS = (("w_up",), ("w_down",))


def padded_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array, send_sizes: jax.Array, output_offsets: jax.Array,
                             recv_sizes: jax.Array, *, axis_name: str, capacity: int) -> jax.Array:  # fmt: skip
    """``jax.lax.ragged_all_to_all``'s result, through an ``all_to_all`` of padded buffers.

    Call inside ``shard_map`` over ``axis_name`` (n devices). The four int arrays have length n·m: m
    slices per peer, as in ``ragged_all_to_all``. The slices sent to one peer are packed into a buffer of
    ``capacity`` rows, so the sum of ``send_sizes`` over each peer's slices must be at most ``capacity``
    (rows past it are lost). Exact otherwise, and differentiable in ``operand`` and ``output``.
    """
    n = jax.lax.axis_size(axis_name)
    m = input_offsets.shape[0] // n
    slot = jnp.arange(capacity, dtype=jnp.int32)

    def locate(offsets: jax.Array, sizes: jax.Array) -> jax.Array:
        """For each peer's packed buffer row: its row in the ragged array (-1 past the peer's slices)."""
        sizes, offsets = sizes.reshape(n, m).astype(jnp.int32), offsets.reshape(n, m).astype(jnp.int32)
        ends = jnp.cumsum(sizes, axis=1)
        piece = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)  # [n, capacity]
        clipped = jnp.minimum(piece, m - 1)
        row = jnp.take_along_axis(offsets - (ends - sizes), clipped, axis=1) + slot
        return jnp.where(piece < m, row, -1)

    def outside(row: jax.Array, size: int) -> jax.Array:
        return jnp.where(row >= 0, row, size).reshape(-1)

    source = outside(locate(input_offsets, send_sizes), operand.shape[0])
    packed = operand.at[source].get(mode="fill", fill_value=0)
    received = jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=True)  # peer s's buffer at rows [s·capacity, (s+1)·capacity)
    landing = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    target = outside(locate(landing, recv_sizes), output.shape[0])
    return output.at[target].set(received, mode="drop")


def ragged_all_to_all(operand: jax.Array, num_rows: int, input_offsets: jax.Array, send_sizes: jax.Array, output_offsets: jax.Array,
                      recv_sizes: jax.Array, *, axis_name: str, capacity: int) -> jax.Array:  # fmt: skip
    """``jax.lax.ragged_all_to_all`` into zeros ``[num_rows, ...]`` where the lowering platform has it,
    :func:`padded_ragged_all_to_all` (with ``capacity``) on CPU."""

    def native(*args: jax.Array) -> jax.Array:
        return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

    def padded(*args: jax.Array) -> jax.Array:
        return padded_ragged_all_to_all(*args, axis_name=axis_name, capacity=capacity)

    # Varying over the axis, as the received rows are: both branches must give the same type.
    output = jax.lax.pcast(jnp.zeros((num_rows, *operand.shape[1:]), operand.dtype), axis_name, to="varying")
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    return jax.lax.platform_dependent(*args, cpu=padded, default=native)


class Plan(NamedTuple):
    """One device's side of the exchange, as ``ragged_all_to_all`` arguments (int32 ``[E]`` each, slice
    ``s·E/n + l`` for peer s and its l-th expert) and the local experts' segments (int32 ``[E/n]``).

    Dispatch: send ``(send_offsets, send_sizes)`` to ``dest_offsets``, receive ``recv_sizes``. Return:
    send ``(recv_offsets, recv_sizes)`` to ``source_offsets``, receive ``send_sizes``.
    """

    send_offsets: jax.Array
    send_sizes: jax.Array
    dest_offsets: jax.Array
    recv_offsets: jax.Array
    recv_sizes: jax.Array
    source_offsets: jax.Array
    start: jax.Array
    end: jax.Array


def exchange_plan(send_offsets: jax.Array, send_sizes: jax.Array, axis_name: str, alignment: int) -> Plan:
    """The plan from this device's expert-major rows: global expert g's rows at ``[send_offsets[g],
    send_offsets[g] + send_sizes[g])``. The receive layout: local expert l's segment starts at the
    aligned sum of the earlier segments and holds the sources' rows in source order."""
    n = jax.lax.axis_size(axis_name)
    per_peer = send_sizes.shape[0] // n
    mine = jnp.stack([send_sizes, send_offsets]).reshape(2, n, per_peer).transpose(1, 0, 2)
    theirs = jax.lax.all_to_all(mine, axis_name, 0, 0, tiled=True)  # [source, (count, offset), local expert]
    counts, source_offsets = theirs[:, 0], theirs[:, 1]
    totals = jnp.sum(counts, axis=0)
    aligned = (totals + (alignment - 1)) // alignment * alignment
    start = jnp.cumsum(aligned) - aligned
    recv_offsets = start + jnp.cumsum(counts, axis=0) - counts
    dest_offsets = jax.lax.all_to_all(recv_offsets, axis_name, 0, 0, tiled=True)
    return Plan(send_offsets, send_sizes, dest_offsets.reshape(-1), recv_offsets.reshape(-1), counts.reshape(-1), source_offsets.reshape(-1),
                start, start + totals)  # fmt: skip


def receive_rows(num_sent: int, axis_size: int, local_experts: int, alignment: int) -> int:
    """The receive buffer's exact bound: ``axis_size`` sources of at most ``num_sent`` rows each, plus
    less than ``alignment`` padding rows per local segment, in a multiple of ``alignment``."""
    return (axis_size * num_sent + (alignment - 1) * local_experts) // alignment * alignment


FP8_BLOCK = 128  # the scale block of an FP8-dispatched row: 1 x 128, as the FP8 experts' activations


def dispatch(tokens: jax.Array, token_topk_to_pos: jax.Array, pos_to_expert: jax.Array, plan: Plan, num_rows: int, axis_name: str,
             capacity: int, impl: str | None) -> jax.Array:  # fmt: skip
    """The expanded rows of ``tokens[T/n, dim]`` sent to their experts' devices: ``[num_rows, dim]``."""
    return send_rows(moe.expand_to_fused(tokens, token_topk_to_pos, pos_to_expert, impl=impl), num_rows, plan, axis_name, capacity)


def send_rows(rows: jax.Array, num_rows: int, plan: Plan, axis_name: str, capacity: int) -> jax.Array:
    """The dispatch exchange of expert-major ``rows`` into ``[num_rows, ...]`` (the plan's dispatch side)."""
    return ragged_all_to_all(rows, num_rows, plan.send_offsets, plan.send_sizes, plan.dest_offsets, plan.recv_sizes,
                             axis_name=axis_name, capacity=capacity)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def dispatch_fp8(tokens: jax.Array, token_topk_to_pos: jax.Array, pos_to_expert: jax.Array, plan: Plan, num_rows: int, axis_name: str,
                 capacity: int, impl: str | None) -> jax.Array:  # fmt: skip
    """:func:`dispatch` of e4m3 rows with 1 x 128 fp32 scales, dequantized on arrival to tokens' dtype
    (the bytes travel as uint8: the exchange need not know float8). Gradient: straight through."""
    data, sf = quantized_rows(tokens, token_topk_to_pos, pos_to_expert, impl)
    data, sf = (send_rows(a, num_rows, plan, axis_name, capacity) for a in (jax.lax.bitcast_convert_type(data, jnp.uint8), sf))
    return dequantized_rows(jax.lax.bitcast_convert_type(data, jnp.float8_e4m3fn), sf, tokens.dtype, impl)


def quantized_rows(tokens: jax.Array, token_topk_to_pos: jax.Array, pos_to_expert: jax.Array, impl: str | None) -> tuple[jax.Array, jax.Array]:
    """The FP8 dispatch's send side: the expanded rows as e4m3 ``[S, dim]`` and their fp32 scales ``[S, dim/128]``."""
    data, sf = quant.per_token_cast(tokens, "e4m3", FP8_BLOCK, impl=impl)
    return moe.expand_to_fused_with_sf((data, sf), FP8_BLOCK, token_topk_to_pos, pos_to_expert, impl=impl)


def dequantized_rows(data: jax.Array, sf: jax.Array, dtype: Any, impl: str | None) -> jax.Array:
    """The FP8 dispatch's receive side: ``data · sf`` in ``dtype`` (bfloat16 or float32)."""
    fmt = "bf16" if dtype == jnp.bfloat16 else "fp32"
    return quant.per_token_cast_back((data, sf), fmt, FP8_BLOCK, impl=impl).astype(dtype)


def _dispatch_fp8_fwd(tokens, token_topk_to_pos, pos_to_expert, plan, num_rows, axis_name, capacity, impl):
    out = dispatch_fp8(tokens, token_topk_to_pos, pos_to_expert, plan, num_rows, axis_name, capacity, impl)
    return out, (token_topk_to_pos, pos_to_expert, plan)


def _dispatch_fp8_bwd(num_rows, axis_name, capacity, impl, residuals, cotangent):
    token_topk_to_pos, pos_to_expert, plan = residuals
    tokens = jnp.zeros((token_topk_to_pos.shape[0], cotangent.shape[1]), cotangent.dtype)
    # dispatch is linear in tokens: its VJP at zeros is its transpose (the forward part is dead code).
    _, transpose = jax.vjp(lambda t: dispatch(t, token_topk_to_pos, pos_to_expert, plan, num_rows, axis_name, capacity, impl), tokens)
    return (transpose(cotangent)[0], None, None, None)


dispatch_fp8.defvjp(_dispatch_fp8_fwd, _dispatch_fp8_bwd)


def local_moe(layer: MoE, tokens: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """One device's part (inside ``shard_map``): ``tokens[T/n, dim]`` and a layer holding its E/n experts
    -> its tokens' output ``[T/n, dim]`` and the load-balancing loss of all T tokens."""
    n = jax.lax.axis_size(axis_name)
    e, k, a, impl = layer.num_experts, layer.num_topk, layer.alignment, layer.impl
    idx, weights, probs = layer.router(tokens)
    pos_to_expert, _, _, token_topk_to_pos, start, _, counts, _ = moe.get_fused_mapping(idx, e, 0, 1, impl=impl)
    plan = exchange_plan(start, counts, axis_name, a)
    s = pos_to_expert.shape[0]  # T/n·K: the mapping's capacity at alignment 1
    send = dispatch_fp8 if layer.dispatch_fp8 else dispatch
    received = send(tokens, token_topk_to_pos, pos_to_expert, plan, receive_rows(s, n, e // n, a), axis_name, s, impl)
    out = layer.experts(received, plan.start, plan.end)
    back = ragged_all_to_all(out, s, plan.recv_offsets, plan.recv_sizes, plan.source_offsets, plan.send_sizes,
                             axis_name=axis_name, capacity=s)  # fmt: skip
    y = moe.reduce_fused(back, weights, token_topk_to_pos, impl=impl)
    if layer.shared is not None:
        y = y + layer.shared(tokens)
    return y, balance_loss(counts, probs, tokens.shape[0] * n, k, axis_name)


def balance_loss(counts: jax.Array, probs: jax.Array, num_tokens: int, num_topk: int, axis_name: str) -> jax.Array:
    """``load_balancing_loss`` of all devices' tokens from the local routed ``counts[E]`` and normalized
    scores ``probs[T/n, E]``: ``f_e`` rounded as ``jax_tilek.moe.aux_fi`` rounds it, on the summed counts."""
    if not num_tokens:
        return jnp.float32(0)
    total = jax.lax.psum(counts, axis_name).astype(jnp.float32)
    f = total * jnp.float32(counts.shape[0]) / jnp.float32(num_tokens * num_topk)
    return jnp.sum(jax.lax.stop_gradient(f) * jax.lax.pmean(jnp.mean(probs, axis=0), axis_name))


def axis_size(layer: MoE, num_tokens: int | None = None) -> int:
    """The size of the layer's expert axis in the mesh in context, after checking the configuration:
    E and the token count (when given) divisible by it."""
    name, axis = f"MoE(expert_axis={layer.expert_axis!r})", layer.expert_axis
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"{name}: needs a mesh with axis {axis!r} in context (jax.set_mesh), got {mesh.axis_names if not mesh.empty else 'none'}")
    n = mesh.shape[axis]
    if layer.num_experts % n:
        raise ValueError(f"{name}: num_experts must be divisible by the size of mesh axis {axis!r} ({n}), got {layer.num_experts}")
    if num_tokens is not None and num_tokens % n:
        raise ValueError(f"{name}: the token count must be divisible by the size of mesh axis {axis!r} ({n}), got {num_tokens}")
    return n


def expert_parallel(layer: MoE, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``layer(x)`` with its experts and tokens split over ``layer.expert_axis`` (module docstring):
    ``x[..., dim]`` -> ``(y, aux_loss)`` as the single-device layer returns them (on an Explicit axis,
    ``y`` sharded as x)."""
    axis, mesh = layer.expert_axis, jax.sharding.get_abstract_mesh()
    axis_size(layer, math.prod(x.shape[:-1]))
    explicit = mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Explicit
    tokens = x.reshape(-1, x.shape[-1]).astype(layer.dtype)
    x_spec = P() if jax.typeof(tokens).sharding.mesh.empty else jax.typeof(tokens).sharding.spec
    graphdef, experts, rest = nnx.split(layer, lambda path, _: tuple(path) in EXPERT_WEIGHTS, ...)
    args, specs = (experts, rest, tokens), (P(axis), P(), P(axis))
    if explicit:  # shard_map takes Explicit-axis arrays only sharded as in_specs say (it reshards Auto ones itself)
        args = tuple(jax.tree.map(lambda a, spec=spec: jax.sharding.reshard(a, spec), arg) for arg, spec in zip(args, specs))

    def per_device(experts: nnx.State, rest: nnx.State, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return local_moe(nnx.merge(graphdef, experts, rest), tokens, axis)

    # check_vma=False: the ops' references and kernels have no rules for varying manual axes.
    y, aux = jax.shard_map(per_device, in_specs=specs, out_specs=(P(axis), P()), axis_names={axis}, check_vma=False)(*args)
    if explicit:  # back to x's sharding, where the reshape needs no communication
        y = jax.sharding.reshard(y, x_spec)
    return y.reshape(x.shape), aux
