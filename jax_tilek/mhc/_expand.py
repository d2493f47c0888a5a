"""expand_to_mhc / expand_from_embedding: widen ``x [..., H]`` to n residual streams (TileKernels v1 §5.1).

Forward ``out[..., i, :] = x`` for ``i < n``; backward ``dx = sum_i dout[..., i, :]``, summed in fp32
in stream order (i = 0, 1, ...) and rounded once to bf16, as TileKernels' kernel does.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.mhc._common import BF16, THREADS, VEC, check_dtype, check_hidden, check_mult
from jax_tilek.op import Launch, Rows, Static, TileOp, uses, with_vjp
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}


# ---------------------------------------------------------------------------------------------
# References.


def expand_reference(x, *, mhc_mult: int):
    """``x [T, H]`` -> ``[T, n, H]``: n copies of every row (through fp32, so that JAX's transpose
    sums the cotangents in fp32 as the backward kernel does)."""
    wide = x.astype(jnp.float32)[:, None, :]
    return jnp.broadcast_to(wide, (x.shape[0], mhc_mult, x.shape[1])).astype(x.dtype)


def expand_backward_reference(dout):
    """``dout [T, n, H]`` -> ``[T, H]``: the streams summed in fp32 in order, rounded once."""
    acc = dout[:, 0, :].astype(jnp.float32)
    for i in range(1, dout.shape[1]):
        acc = acc + dout[:, i, :].astype(jnp.float32)
    return acc.astype(dout.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels: one thread per 16-byte vector of a token's row.


@kernel(pass_configs=PASS_CONFIGS)
def expand_fwd_kernel(mult: int, hidden: int):
    """Thread f loads vector ``f % (H / 8)`` of row ``f // (H / 8)`` once and stores it n times."""
    import tilelang.language as T

    N, V = mult, hidden // VEC
    TT = T.dynamic("T")

    @T.prim_func
    def expand_to_mhc_fwd(x: T.Tensor((TT, hidden), "bfloat16"), out: T.Tensor((TT, N, hidden), "bfloat16")):
        with T.Kernel(T.ceildiv(TT * V, THREADS), threads=THREADS) as b:
            reg = T.alloc_local((VEC,), "bfloat16")
            f = b * THREADS + T.get_thread_binding(0)
            r = f // V
            v = f % V
            if r < TT:
                for j in T.vectorized(VEC):
                    reg[j] = x[r, v * VEC + j]
                for i in T.unroll(N):
                    for j in T.vectorized(VEC):
                        out[r, i, v * VEC + j] = reg[j]

    return expand_to_mhc_fwd


@kernel(pass_configs=PASS_CONFIGS)
def expand_bwd_kernel(mult: int, hidden: int):
    """Thread f sums vector ``f % (H / 8)`` of row ``f // (H / 8)`` over the n streams (fp32)."""
    import tilelang.language as T

    N, V = mult, hidden // VEC
    TT = T.dynamic("T")

    @T.prim_func
    def expand_to_mhc_bwd(dout: T.Tensor((TT, N, hidden), "bfloat16"), dx: T.Tensor((TT, hidden), "bfloat16")):
        with T.Kernel(T.ceildiv(TT * V, THREADS), threads=THREADS) as b:
            reg = T.alloc_local((VEC,), "bfloat16")
            acc = T.alloc_local((VEC,), "float32")
            res = T.alloc_local((VEC,), "bfloat16")
            f = b * THREADS + T.get_thread_binding(0)
            r = f // V
            v = f % V
            if r < TT:
                for j in T.unroll(VEC):
                    acc[j] = T.float32(0)
                for i in T.unroll(N):
                    for j in T.vectorized(VEC):
                        reg[j] = dout[r, i, v * VEC + j]
                    for j in T.unroll(VEC):
                        acc[j] = acc[j] + T.Cast("float32", reg[j])
                for j in T.unroll(VEC):
                    res[j] = T.Cast("bfloat16", acc[j])
                for j in T.vectorized(VEC):
                    dx[r, v * VEC + j] = res[j]

    return expand_to_mhc_bwd


_fwd_op = TileOp(
    name="expand_to_mhc", operands=("x",), reference=expand_reference, rows=Rows(("x",), ("out",)), results=("out",),
    launch=lambda x, *, mhc_mult: Launch(kernel=expand_fwd_kernel, params=dict(mult=mhc_mult, hidden=x.shape[1])),
)  # fmt: skip

_bwd_op = TileOp(
    name="expand_to_mhc_bwd", operands=("dout",), reference=expand_backward_reference, rows=Rows(("dout",), ("dx",)), results=("dx",),
    launch=lambda dout: Launch(kernel=expand_bwd_kernel, params=dict(mult=dout.shape[1], hidden=dout.shape[2])),
)  # fmt: skip


def _primal(x, *, impl=None, mhc_mult: int):
    return _fwd_op(x, impl=impl, mhc_mult=mhc_mult)


def _fwd(x, *, impl=None, mhc_mult: int):
    return _primal(x, impl=impl, mhc_mult=mhc_mult), None


def _bwd(_, g, *, impl=None, mhc_mult: int):
    return (_bwd_op(g, impl=impl),)


_differentiable = with_vjp(_primal, _fwd, _bwd)


def _check(op: str, x, mhc_mult):
    x = checks.as_array(op, "x", x)
    n = check_mult(op, mhc_mult)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must be [..., H], got a scalar")
    check_dtype(op, "x", x, BF16)
    check_hidden(op, "x", x.shape[-1])
    return x, n


def _case(lead: tuple[int, ...], h: int, n: int = 4, **options) -> ArgSpec:
    return ArgSpec(f"{'x'.join(map(str, lead))}x{h}_n{n}", (jax.ShapeDtypeStruct((*lead, h), BF16), n), **options)


ARG_SPECS = (
    _case((2, 8), 256),
    _case((16,), 1280, 2),
    _case((3,), 64, 8),
    _case((0,), 128),
    _case((4096,), 7168, bench=True),
    _case((16384,), 4096, bench=True),
)


def _expand(op: str, x, mhc_mult, impl):
    x, n = _check(op, x, mhc_mult)
    lead, h = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, h)
    return _differentiable(flat, impl=impl, mhc_mult=n).reshape(*lead, n, h)


@uses(_fwd_op, _bwd_op, cases=ARG_SPECS, differentiable=True)
def expand_to_mhc(x: jax.Array, mhc_mult: int, *, impl=None, ops) -> jax.Array:
    """n copies of every token: ``x [..., H]`` bf16 -> ``[..., n, H]`` bf16 (H a multiple of 8).

    Differentiable: the cotangent of x sums the n streams' cotangents in fp32 (one kernel each way).
    """
    return _expand("expand_to_mhc", x, mhc_mult, impl)


@uses(_fwd_op, _bwd_op, cases=ARG_SPECS, differentiable=True)
def expand_from_embedding(x: jax.Array, mhc_mult: int = 4, *, impl=None, ops) -> jax.Array:
    """The model's entry into mHC: the embedding ``x [..., H]`` widened to the residual ``[..., n, H]``
    (:func:`expand_to_mhc`)."""
    return _expand("expand_from_embedding", x, mhc_mult, impl)
