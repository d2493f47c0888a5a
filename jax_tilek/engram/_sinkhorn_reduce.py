"""engram_sinkhorn_step_reduce (TileKernels v2.1 §2.4) and engram_sinkhorn_col_update (beyond
TileKernels, which leaves the column-scale update to its callers).

``engram_sinkhorn_step_reduce``: ``col_sumsq = sum over p of col_sumsq_partial[p]`` with p = 0, 1, ...
in order (fixed: deterministic and the same on every GPU; the reference scans in the same order, so
the two are bit-exact).

``engram_sinkhorn_col_update``: the same sum, then the column step of the Sinkhorn iteration in the
same launch. After a row step every row of the iterate has unit norm, so its total sum of squares is
R and a column's share is R / D; the column scale brings each column to that share::

    col_scale'[c] = col_scale[c] / (sqrt(col_sumsq[c] * (D / R)) + eps)      (0 where col_sumsq[c] = 0)

(``D / R`` rounded to fp32 once.) A column that is all zeros keeps scale 0 instead of growing by
1 / eps each iteration (its entries are zero whatever the scale).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import F32, MAX_SINKHORN_DIM, check_dtype, non_negative, sinkhorn_partials
from jax_tilek.engram._grad_w_reduce import ordered_sum
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
THREADS = 64
UNROLL = 8  # partial rows loaded ahead


def reduce_reference(col_sumsq_partial, col_scale=None, *, eps: float = 0.0, factor: float = 1.0, update: bool = False):
    total = ordered_sum(col_sumsq_partial)
    if not update:
        return (total,)
    scale = col_scale / (jnp.sqrt(total * jnp.float32(factor)) + jnp.float32(eps))
    return total, jnp.where(total == 0, jnp.float32(0), scale)


@kernel(pass_configs=PASS_CONFIGS)
def reduce_kernel(partials: int, dim: int, update: bool, eps: float):
    """Thread ``i`` sums the 4 columns ``[4 i, 4 i + 4)`` over the partial rows in order (and updates their scales)."""
    import tilelang.language as T

    P, DD = partials, dim
    f32 = "float32"

    @T.prim_func
    def engram_sinkhorn_reduce(
        col_sumsq_partial: T.Tensor((P, DD), f32),
        col_scale: T.Tensor((DD,), f32),
        col_sumsq: T.Tensor((DD,), f32),
        col_scale_out: T.Tensor((DD,), f32),
        factor: T.float32,
    ):
        with T.Kernel(T.ceildiv(DD, THREADS * 4), threads=THREADS) as b:
            s = T.alloc_local((4,), f32)
            ld = T.alloc_local((UNROLL * 4,), f32)
            cs = T.alloc_local((4,), f32)
            col = (b * THREADS + T.get_thread_binding(0)) * 4
            if col < DD:
                for e in T.unroll(4):
                    s[e] = T.float32(0)
                for k in T.serial(P // UNROLL):
                    for u in T.unroll(UNROLL):
                        for e in T.vectorized(4):
                            ld[u * 4 + e] = col_sumsq_partial[k * UNROLL + u, col + e]
                    for u in T.unroll(UNROLL):
                        for e in T.unroll(4):
                            s[e] = s[e] + ld[u * 4 + e]
                for u in T.unroll(P % UNROLL):
                    for e in T.vectorized(4):
                        ld[e] = col_sumsq_partial[P - P % UNROLL + u, col + e]
                    for e in T.unroll(4):
                        s[e] = s[e] + ld[e]
                for e in T.vectorized(4):
                    col_sumsq[col + e] = s[e]
                if update:
                    for e in T.vectorized(4):
                        cs[e] = col_scale[col + e]
                    for e in T.unroll(4):
                        cs[e] = T.if_then_else(s[e] == T.float32(0), T.float32(0), cs[e] / (T.sqrt(s[e] * factor) + T.float32(eps)))
                    for e in T.vectorized(4):
                        col_scale_out[col + e] = cs[e]

    return engram_sinkhorn_reduce


def _launch(col_sumsq_partial, col_scale, *, eps=0.0, factor=1.0, update=False) -> Launch:
    return Launch(
        kernel=reduce_kernel,
        params=dict(partials=col_sumsq_partial.shape[0], dim=col_sumsq_partial.shape[1], update=update, eps=float(eps) if update else 0.0),
        scalars=dict(factor=float(factor)), buffers={} if update else {"col_scale": None, "col_scale_out": None},
    )  # fmt: skip


def _results(*_, update=False, **__):
    return ("col_sumsq", "col_scale_out") if update else ("col_sumsq",)


_op = TileOp(
    name="engram_sinkhorn_reduce", launch=_launch, operands=("col_sumsq_partial", "col_scale?"), results=_results, reference=reduce_reference,
)  # fmt: skip


def check_partial(op: str, col_sumsq_partial) -> jax.Array:
    p = checks.as_array(op, "col_sumsq_partial", col_sumsq_partial)
    check_dtype(op, "col_sumsq_partial", p, F32)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] % 4 or not 0 < p.shape[1] <= MAX_SINKHORN_DIM:
        raise ValueError(f"{op}: col_sumsq_partial must be [P, D], P >= 1, D a positive multiple of 4 up to {MAX_SINKHORN_DIM}, got shape {p.shape}")
    return p


def _case(d: int, p: int | None = None, **options) -> ArgSpec:
    p = p if p is not None else sinkhorn_partials(d)
    return ArgSpec(f"p{p}_d{d}", (jax.ShapeDtypeStruct((p, d), F32),), make=lambda rng, *_: (rng.random((p, d)).astype(jnp.float32),), **options)


ARG_SPECS = (
    _case(256),
    _case(5120),
    _case(100, p=3),
    _case(4, p=1),
    _case(512, bench=True),
    _case(5120, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def engram_sinkhorn_step_reduce(col_sumsq_partial, *, impl=None, ops) -> jax.Array:
    """The column sums of squares from ``engram_sinkhorn_step``'s partial rows: fp32 ``[P, D]`` ->
    ``[D]``, summed over P in order (module docstring). Functional (TileKernels writes an out buffer)."""
    p = check_partial("engram_sinkhorn_step_reduce", col_sumsq_partial)
    return ops[0](p, None, impl=impl)[0]


def _update_case(d: int, r: int, p: int | None = None, eps: float = 1e-20, zero: bool = False, **options) -> ArgSpec:
    p = p if p is not None else sinkhorn_partials(d)

    def make(rng, *_):
        part = rng.random((p, d)).astype(jnp.float32)
        if zero:
            part[:, ::7] = 0
        return part, rng.random(d).astype(jnp.float32), r, eps

    args = (jax.ShapeDtypeStruct((p, d), F32), jax.ShapeDtypeStruct((d,), F32), r, eps)
    return ArgSpec(f"p{p}_d{d}_r{r}" + ("_zero" if zero else ""), args, make=make, **options)


UPDATE_SPECS = (
    _update_case(256, 1001, zero=True),
    _update_case(5120, 100001),
    _update_case(100, 37, p=3, eps=1e-6),
    _update_case(512, 1 << 20, bench=True),
)


@uses(_op, cases=UPDATE_SPECS)
def engram_sinkhorn_col_update(col_sumsq_partial, col_scale, num_rows: int, eps: float = 1e-20, *, impl=None, ops):
    """The column step of the Sinkhorn iteration in one launch (module docstring).

    Args:
      col_sumsq_partial: fp32 ``[P, D]`` from ``engram_sinkhorn_step``.
      col_scale: fp32 ``[D]``, the current column scales.
      num_rows: R, the matrix's rows (> 0).
      eps: added to every column norm (>= 0).

    Returns:
      ``(col_sumsq [D], new_col_scale [D])``, fp32.
    """
    name = "engram_sinkhorn_col_update"
    p = check_partial(name, col_sumsq_partial)
    cs = checks.as_array(name, "col_scale", col_scale)
    check_dtype(name, "col_scale", cs, F32)
    if cs.shape != p.shape[1:]:
        raise ValueError(f"{name}: col_scale must be [D] = {list(p.shape[1:])}, got {list(cs.shape)}")
    r = checks.static_int(name, "num_rows", num_rows)
    if r < 1:
        raise ValueError(f"{name}: num_rows must be positive, got {r}")
    eps = non_negative(name, "eps", eps)
    return ops[0](p, cs, impl=impl, eps=eps, factor=float(p.shape[1]) / r, update=True)
