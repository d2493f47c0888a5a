"""grad_w_reduce: the gate's weight gradients from the backward's partial rows (TileKernels v1 §4.5).

``G = sum over p of grad_w_partial[p]`` (p = 0, 1, ... in order: a fixed order, so the result is
deterministic and the same on every GPU), then, in fp32::

    grad_weight_hidden = accumulator_hidden + G * float(weight_embed)
    grad_weight_embed  = accumulator_embed  + G * float(weight_hidden)

TileKernels adds into ``main_grad`` buffers in place; here the accumulators are optional inputs (None:
zeros, and no addition) and the sums are returned. The reference sums the partial rows in the same
order (a scan), so without accumulators it is bit-exact with the kernel; with them, XLA may contract
the product and the addition into one FMA (the kernel does), so they agree to rounding.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import BF16, F32, GATE_PARTIALS, check_dtype
from jax_tilek.engram._fused_weight import check_weights
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, View, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
THREADS = 128
VEC4 = 4
UNROLL = 4  # partial rows loaded ahead


def ordered_sum(partials: jax.Array) -> jax.Array:
    """``partials [P, ...]`` summed over P in order (0 + row 0 + row 1 + ...)."""
    total, _ = jax.lax.scan(lambda acc, row: (acc + row, None), jnp.zeros(partials.shape[1:], jnp.float32), partials)
    return total


def grad_w_reduce_reference(grad_w_partial, weight_hidden, weight_embed, grad_weight_hidden, grad_weight_embed):
    g = ordered_sum(grad_w_partial)
    gh = g * weight_embed.astype(jnp.float32)
    ge = g * weight_hidden.astype(jnp.float32)
    if grad_weight_hidden is not None:
        gh = grad_weight_hidden + gh
    if grad_weight_embed is not None:
        ge = grad_weight_embed + ge
    return gh, ge


@kernel(pass_configs=PASS_CONFIGS)
def grad_w_reduce_kernel(partials: int, size: int, dtype_hidden: str, dtype_embed: str, accumulate_hidden: bool, accumulate_embed: bool):
    """Thread ``i`` sums the 4 columns ``[4 i, 4 i + 4)`` of the flattened partial rows in row order."""
    import tilelang.language as T

    P, NN = partials, size
    f32 = "float32"

    @T.prim_func
    def engram_grad_w_reduce(
        grad_w_partial: T.Tensor((P, NN), f32),
        weight_hidden: T.Tensor((NN,), dtype_hidden),
        weight_embed: T.Tensor((NN,), dtype_embed),
        grad_weight_hidden: T.Tensor((NN,), f32),
        grad_weight_embed: T.Tensor((NN,), f32),
        out_hidden: T.Tensor((NN,), f32),
        out_embed: T.Tensor((NN,), f32),
    ):
        with T.Kernel(T.ceildiv(NN, THREADS * VEC4), threads=THREADS) as b:
            s = T.alloc_local((VEC4,), f32)
            ld = T.alloc_local((UNROLL * VEC4,), f32)
            wh = T.alloc_local((VEC4,), dtype_hidden)
            we = T.alloc_local((VEC4,), dtype_embed)
            ah = T.alloc_local((VEC4,), f32)
            ae = T.alloc_local((VEC4,), f32)
            oh = T.alloc_local((VEC4,), f32)
            oe = T.alloc_local((VEC4,), f32)
            col = (b * THREADS + T.get_thread_binding(0)) * VEC4
            if col < NN:
                for e in T.unroll(VEC4):
                    s[e] = T.float32(0)
                for k in T.serial(P // UNROLL):
                    for u in T.unroll(UNROLL):
                        for e in T.vectorized(VEC4):
                            ld[u * VEC4 + e] = grad_w_partial[k * UNROLL + u, col + e]
                    for u in T.unroll(UNROLL):
                        for e in T.unroll(VEC4):
                            s[e] = s[e] + ld[u * VEC4 + e]
                for u in T.unroll(P % UNROLL):
                    for e in T.vectorized(VEC4):
                        ld[e] = grad_w_partial[P - P % UNROLL + u, col + e]
                    for e in T.unroll(VEC4):
                        s[e] = s[e] + ld[e]
                for e in T.vectorized(VEC4):
                    wh[e] = weight_hidden[col + e]
                for e in T.vectorized(VEC4):
                    we[e] = weight_embed[col + e]
                if accumulate_hidden:
                    for e in T.vectorized(VEC4):
                        ah[e] = grad_weight_hidden[col + e]
                if accumulate_embed:
                    for e in T.vectorized(VEC4):
                        ae[e] = grad_weight_embed[col + e]
                for e in T.unroll(VEC4):
                    if accumulate_hidden:
                        oh[e] = ah[e] + s[e] * T.Cast(f32, we[e])
                    else:
                        oh[e] = s[e] * T.Cast(f32, we[e])
                    if accumulate_embed:
                        oe[e] = ae[e] + s[e] * T.Cast(f32, wh[e])
                    else:
                        oe[e] = s[e] * T.Cast(f32, wh[e])
                for e in T.vectorized(VEC4):
                    out_hidden[col + e] = oh[e]
                for e in T.vectorized(VEC4):
                    out_embed[col + e] = oe[e]

    return engram_grad_w_reduce


def _launch(grad_w_partial, weight_hidden, weight_embed, grad_weight_hidden, grad_weight_embed) -> Launch:
    p, n = grad_w_partial.shape[0], weight_hidden.size
    views = {k: View((n,)) for k in ("weight_hidden", "weight_embed", "grad_weight_hidden", "grad_weight_embed", "out_hidden", "out_embed")}
    views["grad_w_partial"] = View((p, n))
    return Launch(
        kernel=grad_w_reduce_kernel,
        params=dict(partials=p, size=n, dtype_hidden=weight_hidden.dtype.name, dtype_embed=weight_embed.dtype.name,
                    accumulate_hidden=grad_weight_hidden is not None, accumulate_embed=grad_weight_embed is not None),  # fmt: skip
        views=views,
    )


_op = TileOp(
    name="engram_grad_w_reduce", launch=_launch,
    operands=("grad_w_partial", "weight_hidden", "weight_embed", "grad_weight_hidden?", "grad_weight_embed?"),
    results=("out_hidden", "out_embed"), reference=grad_w_reduce_reference,
)  # fmt: skip


def _case(p: int, hc: int, h: int, dtype=BF16, accumulate: bool = False, **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    w, acc = s((hc, h), dtype), (s((hc, h), F32) if accumulate else None)
    name = f"p{p}_hc{hc}_h{h}_{jnp.dtype(dtype).name}" + ("_acc" if accumulate else "")
    return ArgSpec(name, (s((p, hc, h), F32), w, w, acc, acc), tolerance=1e-6 if accumulate else None, **options)


ARG_SPECS = (
    _case(GATE_PARTIALS, 4, 2048),
    _case(GATE_PARTIALS, 4, 7168, accumulate=True),
    _case(7, 3, 136, F32, accumulate=True),
    _case(1, 1, 8),
    _case(GATE_PARTIALS, 4, 4096, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def grad_w_reduce(grad_w_partial, weight_hidden, weight_embed, grad_weight_hidden=None, grad_weight_embed=None, *, impl=None, ops):
    """TileKernels' ``grad_w_reduce`` as a function (module docstring).

    Args:
      grad_w_partial: fp32 ``[P, hc, H]`` (:func:`jax_tilek.engram.engram_gate_bwd`'s, P = 132; any P).
      weight_hidden, weight_embed: ``[hc, H]`` bf16 or fp32.
      grad_weight_hidden, grad_weight_embed: optional fp32 ``[hc, H]`` accumulators.

    Returns:
      ``(grad_weight_hidden, grad_weight_embed)``, fp32 ``[hc, H]``.
    """
    name = "grad_w_reduce"
    wh, we = check_weights(name, weight_hidden, weight_embed)
    partial = checks.as_array(name, "grad_w_partial", grad_w_partial)
    check_dtype(name, "grad_w_partial", partial, F32)
    if partial.ndim != 3 or partial.shape[1:] != wh.shape or partial.shape[0] < 1:
        raise ValueError(f"{name}: grad_w_partial must be [P, hc, H] with [hc, H] = {list(wh.shape)}, got {list(partial.shape)}")
    accs = []
    for n, a in (("grad_weight_hidden", grad_weight_hidden), ("grad_weight_embed", grad_weight_embed)):
        a = checks.as_array(name, n, a, optional=True)
        if a is not None:
            check_dtype(name, n, a, F32)
            if a.shape != wh.shape:
                raise ValueError(f"{name}: {n} must have shape {list(wh.shape)}, got {list(a.shape)}")
        accs.append(a)
    return ops[0](partial, wh, we, *accs, impl=impl)
