"""fused_weight: the gate's fused RMSNorm weights ``float(weight_hidden) * float(weight_embed)``
(TileKernels v1 §4.2). bf16 inputs give an exact fp32 product; fp32 inputs (parameters kept in fp32)
are accepted too, their product rounded once.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import BF16, F32, VEC, check_dtype, check_heads, check_hidden
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, View, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
THREADS = 128


def fused_weight_reference(weight_hidden, weight_embed):
    return weight_hidden.astype(jnp.float32) * weight_embed.astype(jnp.float32)


@kernel(pass_configs=PASS_CONFIGS)
def fused_weight_kernel(size: int, dtype_hidden: str, dtype_embed: str):
    """Thread ``i`` multiplies elements ``[8 i, 8 i + 8)`` of the flattened weights."""
    import tilelang.language as T

    NN = size

    @T.prim_func
    def engram_fused_weight(
        weight_hidden: T.Tensor((NN,), dtype_hidden), weight_embed: T.Tensor((NN,), dtype_embed), out: T.Tensor((NN,), "float32")
    ):
        with T.Kernel(T.ceildiv(NN, THREADS * VEC), threads=THREADS) as b:
            a = T.alloc_local((VEC,), dtype_hidden)
            c = T.alloc_local((VEC,), dtype_embed)
            o = T.alloc_local((VEC,), "float32")
            base = (b * THREADS + T.get_thread_binding(0)) * VEC
            if base < NN:
                for j in T.vectorized(VEC):
                    a[j] = weight_hidden[base + j]
                for j in T.vectorized(VEC):
                    c[j] = weight_embed[base + j]
                for j in T.unroll(VEC):
                    o[j] = T.Cast("float32", a[j]) * T.Cast("float32", c[j])
                for j in T.vectorized(VEC):
                    out[base + j] = o[j]

    return engram_fused_weight


def _launch(weight_hidden, weight_embed) -> Launch:
    n = weight_hidden.size
    return Launch(
        kernel=fused_weight_kernel,
        params=dict(size=n, dtype_hidden=weight_hidden.dtype.name, dtype_embed=weight_embed.dtype.name),
        views={k: View((n,)) for k in ("weight_hidden", "weight_embed", "out")},
    )


_op = TileOp(
    name="engram_fused_weight", launch=_launch, operands=("weight_hidden", "weight_embed"), results=("out",), reference=fused_weight_reference
)


def check_weights(op: str, weight_hidden, weight_embed) -> tuple[jax.Array, jax.Array]:
    """The gate's weights: ``[hc, H]`` bf16 or fp32, of one shape."""
    wh = checks.as_array(op, "weight_hidden", weight_hidden)
    we = checks.as_array(op, "weight_embed", weight_embed)
    for name, w in (("weight_hidden", wh), ("weight_embed", we)):
        check_dtype(op, name, w, BF16, F32)
        if w.ndim != 2:
            raise ValueError(f"{op}: {name} must be [hc, H], got shape {w.shape}")
    if wh.shape != we.shape:
        raise ValueError(f"{op}: weight_hidden {list(wh.shape)} and weight_embed {list(we.shape)} must have one shape")
    check_heads(op, wh.shape[0])
    check_hidden(op, wh.shape[1])
    return wh, we


def _case(hc: int, h: int, dtype=BF16, **options) -> ArgSpec:
    w = jax.ShapeDtypeStruct((hc, h), dtype)
    return ArgSpec(f"hc{hc}_h{h}_{jnp.dtype(dtype).name}", (w, w), **options)


ARG_SPECS = (
    _case(4, 2048),
    _case(4, 7168),
    _case(1, 8),
    _case(3, 136, F32),
    _case(4, 4096, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def fused_weight(weight_hidden: jax.Array, weight_embed: jax.Array, *, impl=None, ops) -> jax.Array:
    """``float32(weight_hidden) * float32(weight_embed)``: both ``[hc, H]`` (bf16 or fp32, H % 8 == 0)
    -> fp32 ``[hc, H]``. Bit-exact."""
    wh, we = check_weights("fused_weight", weight_hidden, weight_embed)
    return ops[0](wh, we, impl=impl)
