"""engram_sinkhorn_finalize: the final, row-normalised Sinkhorn matrix (TileKernels v2.1 §2.4;
reference ``torch/engram.py: engram_sinkhorn_finalize_ref``).

Per row r, in fp32 and in the torch reference's order::

    norm = sqrt(sum(((row_scale[r] * matrix[r]) * col_scale)²))
    out[r] = ((alpha * (row_scale[r] / (norm + eps))) * matrix[r]) * col_scale

``row_scale`` is not updated. Rows go to groups of threads as in ``engram_sinkhorn_step`` (one row per
group, no persistent loop); results agree with the reference to rounding (the row sum's order).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import F32, non_negative
from jax_tilek.engram._sinkhorn_step import check_matrix, emit_group, row_norms, sinkhorn_make
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}


def finalize_reference(matrix, row_scale, col_scale, *, eps: float, alpha: float):
    new_scale = row_scale / (row_norms(matrix, row_scale, col_scale) + eps)
    return (jnp.float32(alpha) * new_scale)[:, None] * matrix * col_scale[None, :]


@kernel(pass_configs=PASS_CONFIGS)
def finalize_kernel(dim: int, eps: float, alpha: float):
    """Group r of CTA b normalises row ``b * rows + r``."""
    import tilelang.language as T

    lay, reduce = emit_group(T, dim)
    GS, VPT, ROWS, NV = lay.group, lay.vpt, lay.rows, lay.nvec
    E = VPT * 4
    f32 = "float32"
    RR = T.dynamic("R")

    @T.prim_func
    def engram_sinkhorn_finalize(
        matrix: T.Tensor((RR, dim), f32), row_scale: T.Tensor((RR,), f32), col_scale: T.Tensor((dim,), f32), out: T.Tensor((RR, dim), f32)
    ):
        with T.Kernel(T.ceildiv(RR, ROWS), threads=lay.threads) as b:
            red = T.alloc_shared((2, ROWS, lay.warps), f32)
            cs = T.alloc_local((E,), f32)
            mv = T.alloc_local((E,), f32)
            ov = T.alloc_local((4,), f32)
            s = T.alloc_local((1,), f32)
            rs = T.alloc_var(f32)
            tid = T.get_thread_binding(0)
            lane = tid % GS
            r = tid // GS
            row = b * ROWS + r
            s[0] = T.float32(0)
            if row < RR:
                rs = row_scale[row]
                for j in T.unroll(VPT):
                    if j * GS + lane < NV:
                        for e in T.vectorized(4):
                            cs[j * 4 + e] = col_scale[(j * GS + lane) * 4 + e]
                        for e in T.vectorized(4):
                            mv[j * 4 + e] = matrix[row, (j * GS + lane) * 4 + e]
                        for e in T.unroll(4):
                            x = rs * mv[j * 4 + e] * cs[j * 4 + e]
                            s[0] = s[0] + x * x
            reduce(s, red, 0, r, lane)
            if row < RR:
                scale = T.float32(alpha) * (rs / (T.sqrt(s[0]) + T.float32(eps)))
                for j in T.unroll(VPT):
                    if j * GS + lane < NV:
                        for e in T.unroll(4):
                            ov[e] = scale * mv[j * 4 + e] * cs[j * 4 + e]
                        for e in T.vectorized(4):
                            out[row, (j * GS + lane) * 4 + e] = ov[e]

    return engram_sinkhorn_finalize


def _launch(matrix, row_scale, col_scale, *, eps, alpha) -> Launch:
    return Launch(kernel=finalize_kernel, params=dict(dim=matrix.shape[1], eps=float(eps), alpha=float(alpha)))


_op = TileOp(
    name="engram_sinkhorn_finalize", launch=_launch, operands=("matrix", "row_scale", "col_scale"), results=("out",),
    reference=finalize_reference, rows=Rows(("matrix", "row_scale"), ("out",)),
)  # fmt: skip


def _case(r: int, d: int, eps: float = 1e-20, **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    return ArgSpec(f"r{r}_d{d}", (s((r, d), F32), s((r,), F32), s((d,), F32), eps, d**0.5), make=sinkhorn_make(r, d), tolerance=1e-5, **options)


ARG_SPECS = (
    _case(1001, 256),
    _case(2001, 5120),
    _case(37, 100),
    _case(3, 4),
    _case(0, 512),
    _case(1 << 20, 512, bench=True),
    _case(100001, 5120, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def engram_sinkhorn_finalize(matrix, row_scale, col_scale, eps: float = 1e-20, alpha: float = 1.0, *, impl=None, ops) -> jax.Array:
    """The final Sinkhorn matrix (module docstring): fp32 ``matrix [R, D]``, ``row_scale [R]``,
    ``col_scale [D]`` -> fp32 ``[R, D]``. Functional (TileKernels' ``out=`` is XLA's business)."""
    name = "engram_sinkhorn_finalize"
    m, rs, cs = check_matrix(name, matrix, row_scale, col_scale)
    eps = non_negative(name, "eps", eps)
    a = checks.static_number(name, "alpha", alpha, optional=False)
    return ops[0](m, rs, cs, impl=impl, eps=eps, alpha=a)
