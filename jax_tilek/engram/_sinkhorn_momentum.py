"""engram_sinkhorn_momentum_update: the momentum step of the Engram Sinkhorn optimiser (TileKernels
v2.1 §2.4; reference ``torch/engram.py: engram_sinkhorn_momentum_update_ref``).

Elementwise, in fp32 (``g = float(grad)``, ``m = float(momentum_buffer)``)::

    m'  = fma(m, beta1, (1 - beta1) * g)                      # the new buffer, stored in its dtype
    out = fma(g, 1 - beta1, beta1 * m') if nesterov else m'   # fp32, before the buffer's rounding

with ``1 - beta1`` rounded to fp32 once (TileKernels' CUDA kernel; its torch reference computes the
same ``scaled_grad + beta1 * m`` on CUDA). Functional: returns ``(sinkhorn_input, new_momentum_buffer)``.
The JAX reference writes the same expressions, but XLA chooses whether to contract them into FMAs,
so the two agree to the last place.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import BF16, F32, check_dtype
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
THREADS = 256
VEC4 = 4


def momentum_reference(grad, momentum_buffer, *, beta1: float, nesterov: bool):
    g = grad.astype(jnp.float32)
    m = momentum_buffer.astype(jnp.float32)
    one_minus = jnp.float32(1.0 - beta1)
    b = jnp.float32(beta1)
    m = m * b + one_minus * g
    out = g * one_minus + b * m if nesterov else m
    return out, m.astype(momentum_buffer.dtype)


@kernel(pass_configs=PASS_CONFIGS)
def momentum_kernel(grad_dtype: str, momentum_dtype: str, beta1: float, nesterov: bool):
    """Thread ``i`` updates elements ``[4 i, 4 i + 4)`` (vectors when all 4 are in range)."""
    import tilelang.language as T

    NN = T.dynamic("N")
    f32 = "float32"
    B, OM = float(beta1), float(1.0 - beta1)

    def update(gf, mf):
        """(the new momentum, the output) as expressions of the fp32 grad and momentum."""
        m_new = T.ieee_fmaf(mf, T.float32(B), T.float32(OM) * gf)
        return m_new, (T.ieee_fmaf(gf, T.float32(OM), T.float32(B) * m_new) if nesterov else m_new)

    @T.prim_func
    def engram_sinkhorn_momentum(
        grad: T.Tensor((NN,), grad_dtype),
        momentum_buffer: T.Tensor((NN,), momentum_dtype),
        sinkhorn_input: T.Tensor((NN,), f32),
        momentum_out: T.Tensor((NN,), momentum_dtype),
    ):
        with T.Kernel(T.ceildiv(NN, THREADS * VEC4), threads=THREADS) as b:
            gv = T.alloc_local((VEC4,), grad_dtype)
            mv = T.alloc_local((VEC4,), momentum_dtype)
            ov = T.alloc_local((VEC4,), f32)
            nv = T.alloc_local((VEC4,), momentum_dtype)
            base = (b * THREADS + T.get_thread_binding(0)) * VEC4
            if base + VEC4 <= NN:
                for e in T.vectorized(VEC4):
                    gv[e] = grad[base + e]
                for e in T.vectorized(VEC4):
                    mv[e] = momentum_buffer[base + e]
                for e in T.unroll(VEC4):
                    m_new, o = update(T.Cast(f32, gv[e]), T.Cast(f32, mv[e]))
                    nv[e] = T.Cast(momentum_dtype, m_new)
                    ov[e] = o
                for e in T.vectorized(VEC4):
                    sinkhorn_input[base + e] = ov[e]
                for e in T.vectorized(VEC4):
                    momentum_out[base + e] = nv[e]
            elif base < NN:
                for e in T.serial(NN - base):
                    m_new, o = update(T.Cast(f32, grad[base + e]), T.Cast(f32, momentum_buffer[base + e]))
                    momentum_out[base + e] = T.Cast(momentum_dtype, m_new)
                    sinkhorn_input[base + e] = o

    return engram_sinkhorn_momentum


def _launch(grad, momentum_buffer, *, beta1, nesterov) -> Launch:
    return Launch(
        kernel=momentum_kernel,
        params=dict(grad_dtype=grad.dtype.name, momentum_dtype=momentum_buffer.dtype.name, beta1=float(beta1), nesterov=bool(nesterov)),
    )


_op = TileOp(
    name="engram_sinkhorn_momentum", launch=_launch, operands=("grad", "momentum_buffer"), results=("sinkhorn_input", "momentum_out"),
    reference=momentum_reference, rows=Rows(("grad", "momentum_buffer"), ("sinkhorn_input", "momentum_out")),
)  # fmt: skip


def _case(n: int, grad_dtype=F32, momentum_dtype=F32, nesterov: bool = True, **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    name = f"n{n}_g{jnp.dtype(grad_dtype).name}_m{jnp.dtype(momentum_dtype).name}" + ("_nesterov" if nesterov else "")
    return ArgSpec(name, (s((n,), grad_dtype), s((n,), momentum_dtype), 0.95, nesterov), tolerance=1e-6, **options)


ARG_SPECS = (
    _case(1001 * 256),
    _case(4099, BF16, F32, nesterov=False),
    _case(1027, F32, BF16),
    _case(3, BF16, BF16),
    _case(0),
    _case(1000001 * 512, bench=True),
    _case(1000001 * 512, BF16, BF16, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def engram_sinkhorn_momentum_update(grad, momentum_buffer, beta1: float, nesterov: bool = True, *, impl=None, ops):
    """TileKernels 2.1's momentum update as a function (module docstring).

    Args:
      grad, momentum_buffer: one shape, each bf16 or fp32.
      beta1: the momentum decay; nesterov: return the Nesterov look-ahead instead of the momentum.

    Returns:
      ``(sinkhorn_input, new_momentum_buffer)``: fp32, and the buffer's dtype, both of grad's shape.
    """
    name = "engram_sinkhorn_momentum_update"
    g = checks.as_array(name, "grad", grad)
    m = checks.as_array(name, "momentum_buffer", momentum_buffer)
    check_dtype(name, "grad", g, BF16, F32)
    check_dtype(name, "momentum_buffer", m, BF16, F32)
    if g.shape != m.shape:
        raise ValueError(f"{name}: grad {list(g.shape)} and momentum_buffer {list(m.shape)} must have one shape")
    b = checks.static_number(name, "beta1", beta1, optional=False)
    nesterov = checks.static_bool(name, "nesterov", nesterov)
    out, new = ops[0](g.reshape(-1), m.reshape(-1), impl=impl, beta1=b, nesterov=nesterov)
    return out.reshape(g.shape), new.reshape(m.shape)

