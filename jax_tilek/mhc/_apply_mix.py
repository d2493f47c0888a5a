"""mhc_pre_apply_mix: the sub-layer's input as a weighted sum of the n streams (TileKernels v1 §5.5).

Forward ``out[h] = sum_i mix[i] * x[i, h]`` (fp32, i = 0, 1, ... in order, rounded once to bf16).
Backward ``dx[i, h] = bf16(mix[i] * dout[h])`` and ``dmix[i] = sum_h dout[h] * x[i, h]`` (fp32).
TileKernels adds dx into a stashed bf16 gradient buffer in place; here dx is returned and JAX adds
the residual's cotangents (functional accumulation).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.mhc._common import BF16, F32, THREADS, VEC, check_dtype, check_residual, check_shape
from jax_tilek.op import Launch, Rows, TileOp, uses, with_vjp
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
WARPS = THREADS // 32


# ---------------------------------------------------------------------------------------------
# References.


def weighted_streams(x, mix):
    """``sum_i mix[:, i] * x[:, i]`` in fp32, in stream order: ``x [T, n, H]``, ``mix [T, n, 1]``."""
    acc = mix[:, 0] * x[:, 0].astype(jnp.float32)
    for i in range(1, x.shape[1]):
        acc = acc + mix[:, i] * x[:, i].astype(jnp.float32)
    return acc


def apply_mix_reference(x, mix):
    """``x [T, n, H]`` bf16, ``mix [T, n, 1]`` fp32 -> ``[T, H]`` bf16."""
    return weighted_streams(x, mix).astype(x.dtype)


def apply_mix_backward_reference(dout, x, mix):
    """``(dx [T, n, H] bf16, dmix [T, n, 1] fp32)``."""
    d = dout.astype(jnp.float32)
    dx = (mix * d[:, None, :]).astype(x.dtype)
    dmix = jnp.einsum("th,tih->ti", d, x.astype(jnp.float32), precision="highest")[..., None]
    return dx, dmix


# ---------------------------------------------------------------------------------------------
# Kernels.


@kernel(pass_configs=PASS_CONFIGS)
def apply_mix_fwd_kernel(mult: int, hidden: int):
    """One thread per 16-byte vector of a token's output."""
    import tilelang.language as T

    N, V = mult, hidden // VEC
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_pre_apply_mix_fwd(
        x: T.Tensor((TT, N, hidden), "bfloat16"), mix: T.Tensor((TT, N, 1), "float32"), out: T.Tensor((TT, hidden), "bfloat16")
    ):
        with T.Kernel(T.ceildiv(TT * V, THREADS), threads=THREADS) as b:
            reg = T.alloc_local((VEC,), "bfloat16")
            acc = T.alloc_local((VEC,), "float32")
            res = T.alloc_local((VEC,), "bfloat16")
            f = b * THREADS + T.get_thread_binding(0)
            r = f // V
            v = f % V
            if r < TT:
                for i in T.unroll(N):
                    w = mix[r, i, 0]
                    for j in T.vectorized(VEC):
                        reg[j] = x[r, i, v * VEC + j]
                    for j in T.unroll(VEC):
                        if i == 0:
                            acc[j] = w * T.Cast("float32", reg[j])
                        else:
                            acc[j] = acc[j] + w * T.Cast("float32", reg[j])
                for j in T.unroll(VEC):
                    res[j] = T.Cast("bfloat16", acc[j])
                for j in T.vectorized(VEC):
                    out[r, v * VEC + j] = res[j]

    return mhc_pre_apply_mix_fwd


@kernel(pass_configs=PASS_CONFIGS)
def apply_mix_bwd_kernel(mult: int, hidden: int, with_dx: bool = True):
    """One warp per token: lanes take vectors ``lane, lane + 32, ...``, write dx (``with_dx``) and
    sum ``dout * x[i]``; a butterfly over the warp gives dmix."""
    import tilelang.language as T

    N, V = mult, hidden // VEC
    KV = -(-V // 32)
    TT = T.dynamic("T")

    @T.macro
    def body(dout, x, mix, dx, dmix):
        dv = T.alloc_local((VEC,), "bfloat16")
        xv = T.alloc_local((VEC,), "bfloat16")
        ov = T.alloc_local((VEC,), "bfloat16")
        w = T.alloc_local((N,), "float32")
        acc = T.alloc_local((N,), "float32")
        tid = T.get_thread_binding(0)
        lane = tid % 32
        r = T.get_block_binding(0) * WARPS + tid // 32
        if r < TT:
            for i in T.unroll(N):
                w[i] = mix[r, i, 0]
                acc[i] = T.float32(0)
            for k in T.serial(KV):
                v = lane + k * 32
                if v < V:
                    for j in T.vectorized(VEC):
                        dv[j] = dout[r, v * VEC + j]
                    for i in T.unroll(N):
                        for j in T.vectorized(VEC):
                            xv[j] = x[r, i, v * VEC + j]
                        for j in T.unroll(VEC):
                            acc[i] = acc[i] + T.Cast("float32", dv[j]) * T.Cast("float32", xv[j])
                            if with_dx:
                                ov[j] = T.Cast("bfloat16", w[i] * T.Cast("float32", dv[j]))
                        if with_dx:
                            for j in T.vectorized(VEC):
                                dx[r, i, v * VEC + j] = ov[j]
            for i in T.unroll(N):
                for s in T.unroll(5):
                    acc[i] = acc[i] + T.shfl_xor(acc[i], 16 >> s)
            if lane == 0:
                for i in T.unroll(N):
                    dmix[r, i, 0] = acc[i]

    if not with_dx:

        @T.prim_func
        def mhc_pre_apply_mix_dmix(
            dout: T.Tensor((TT, hidden), "bfloat16"),
            x: T.Tensor((TT, N, hidden), "bfloat16"),
            mix: T.Tensor((TT, N, 1), "float32"),
            dmix: T.Tensor((TT, N, 1), "float32"),
        ):
            with T.Kernel(T.ceildiv(TT, WARPS), threads=THREADS):
                body(dout, x, mix, dmix, dmix)

        return mhc_pre_apply_mix_dmix

    @T.prim_func
    def mhc_pre_apply_mix_bwd(
        dout: T.Tensor((TT, hidden), "bfloat16"),
        x: T.Tensor((TT, N, hidden), "bfloat16"),
        mix: T.Tensor((TT, N, 1), "float32"),
        dx: T.Tensor((TT, N, hidden), "bfloat16"),
        dmix: T.Tensor((TT, N, 1), "float32"),
    ):
        with T.Kernel(T.ceildiv(TT, WARPS), threads=THREADS):
            body(dout, x, mix, dx, dmix)

    return mhc_pre_apply_mix_bwd


_fwd_op = TileOp(
    name="mhc_pre_apply_mix_fwd", operands=("x", "mix"), results=("out",), reference=apply_mix_reference, rows=Rows(("x", "mix"), ("out",)),
    launch=lambda x, mix: Launch(kernel=apply_mix_fwd_kernel, params=dict(mult=x.shape[1], hidden=x.shape[2])),
)  # fmt: skip

_bwd_op = TileOp(
    name="mhc_pre_apply_mix_bwd", operands=("dout", "x", "mix"), results=("dx", "dmix"), reference=apply_mix_backward_reference,
    rows=Rows(("dout", "x", "mix"), ("dx", "dmix")),
    launch=lambda dout, x, mix: Launch(kernel=apply_mix_bwd_kernel, params=dict(mult=x.shape[1], hidden=x.shape[2])),
)  # fmt: skip

dmix_op = TileOp(
    name="mhc_pre_apply_mix_dmix", operands=("dout", "x", "mix"), results=("dmix",),
    reference=lambda dout, x, mix: apply_mix_backward_reference(dout, x, mix)[1], rows=Rows(("dout", "x", "mix"), ("dmix",)),
    launch=lambda dout, x, mix: Launch(kernel=apply_mix_bwd_kernel, params=dict(mult=x.shape[1], hidden=x.shape[2], with_dx=False)),
)  # fmt: skip


def _primal(x, mix, *, impl=None):
    return _fwd_op(x, mix, impl=impl)


def _fwd(x, mix, *, impl=None):
    return _primal(x, mix, impl=impl), (x, mix)


def _bwd(res, g, *, impl=None):
    return _bwd_op(g, *res, impl=impl)


apply_mix_flat = with_vjp(_primal, _fwd, _bwd)


def check_mix(op: str, mix, lead, n: int, name: str = "mix") -> jax.Array:
    mix = checks.as_array(op, name, mix)
    check_dtype(op, name, mix, F32)
    check_shape(op, name, mix, (*lead, n, 1))
    return mix


def _case(lead, h, n=4, **options) -> ArgSpec:
    args = (jax.ShapeDtypeStruct((*lead, n, h), BF16), jax.ShapeDtypeStruct((*lead, n, 1), F32))
    return ArgSpec(f"{'x'.join(map(str, lead))}x{h}_n{n}", args, tolerance=1e-2, **options)


ARG_SPECS = (
    _case((2, 8), 1280),
    _case((3,), 256, n=2),
    _case((5,), 64, n=8),
    _case((0,), 128),
    _case((4096,), 7168, bench=True),
    _case((16384,), 4096, bench=True),
)


@uses(_fwd_op, _bwd_op, cases=ARG_SPECS, differentiable=True)
def mhc_pre_apply_mix(x: jax.Array, mix: jax.Array, *, impl=None, ops) -> jax.Array:
    """``x [..., n, H]`` bf16 mixed by ``mix [..., n, 1]`` fp32 into ``[..., H]`` bf16 (module
    docstring). Differentiable in both."""
    name = "mhc_pre_apply_mix"
    x, n, h = check_residual(name, x, name="x")
    lead = x.shape[:-2]
    mix = check_mix(name, mix, lead, n)
    return apply_mix_flat(x.reshape(-1, n, h), mix.reshape(-1, n, 1), impl=impl).reshape(*lead, h)
