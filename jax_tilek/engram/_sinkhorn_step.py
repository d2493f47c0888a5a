"""engram_sinkhorn_step: one row-normalisation step of the Engram Sinkhorn iteration (TileKernels v2.1
§2.4; reference ``torch/engram.py: engram_sinkhorn_step_ref``), and the row-group layout shared with
the finalize kernel.

For ``matrix [R, D]`` fp32, ``row_scale [R]``, ``col_scale [D]`` and ``eps``, per row r (fp32, in the
torch reference's order)::

    it[r]        = (row_scale[r] * matrix[r]) * col_scale
    row_norm[r]  = sqrt(sum(it[r]²))
    row_scale'[r] = row_scale[r] / (row_norm[r] + eps)
    col_sumsq   += ((row_scale'[r] * matrix[r]) * col_scale)²        (over all rows)

Functional: returns ``(row_norm, new_row_scale, col_sumsq_partial)`` (TileKernels updates row_scale in
place). ``col_sumsq_partial [P, D]`` are per-row-group partial sums: partial row s sums matrix rows
``s, s + P, s + 2P, ...``; ``P = 396 · rows per CTA`` (:func:`jax_tilek.engram._common.sinkhorn_partials`)
is a function of D only, so every GPU sums the same rows into the same partials in the same order.
``engram_sinkhorn_step_reduce`` sums them in a fixed order. The kernel sums a row's squares in its
thread order, the reference in XLA's: they agree to rounding (TileKernels compares with
``assert_close``).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.engram._common import F32, MAX_SINKHORN_DIM, SINKHORN_CTAS, check_dtype, group_layout, non_negative, sinkhorn_partials
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True, "tl.disable_thread_storage_sync": True}


def row_norms(matrix, row_scale, col_scale):
    """``sqrt(sum(((row_scale * matrix) * col_scale)², axis=1))``."""
    it = row_scale[:, None] * matrix * col_scale[None, :]
    return jnp.sqrt(jnp.sum(it * it, axis=1))


def strided_sum(values: jax.Array, partials: int) -> jax.Array:
    """``values [R, D]`` summed into ``partials`` rows: row s takes rows s, s + partials, ..."""
    r = values.shape[0]
    k = -(-r // partials)
    padded = jnp.pad(values, ((0, k * partials - r), (0, 0)))
    return jnp.sum(padded.reshape(k, partials, values.shape[1]), axis=0)


def step_reference(matrix, row_scale, col_scale, *, eps: float):
    norm = row_norms(matrix, row_scale, col_scale)
    new_scale = row_scale / (norm + eps)
    it = new_scale[:, None] * matrix * col_scale[None, :]
    return norm, new_scale, strided_sum(it * it, sinkhorn_partials(matrix.shape[1]))


def emit_group(T, dim: int):
    """TileLang helpers for a row-group kernel over rows of ``dim`` fp32 (:func:`group_layout`):
    ``(layout, reduce)``. ``reduce(s, red, parity, r, lane)`` sums ``s[0]`` over the
    group's threads, in a fixed order: a butterfly within the warp (or the group, if smaller), then
    the warps of the group in order through ``red[parity, r, :]`` (a CTA-wide barrier: every thread
    must call it)."""
    lay = group_layout(dim)
    width = min(lay.group, 32)

    @T.macro
    def reduce(s, red, parity, r, lane):
        for q in T.unroll(width.bit_length() - 1):
            s[0] = s[0] + T.shfl_xor(s[0], (width // 2) >> q)
        if lay.warps > 1:
            if lane % 32 == 0:
                red[parity, r, lane // 32] = s[0]
            T.sync_threads()
            s[0] = red[parity, r, 0]
            for q in T.unroll(lay.warps - 1):
                s[0] = s[0] + red[parity, r, q + 1]

    return lay, reduce


@kernel(pass_configs=PASS_CONFIGS)
def step_kernel(dim: int, eps: float, ctas: int):
    """CTA b runs ``rows`` row groups; group r (slot ``s = b * rows + r``) takes rows ``s + k P``, keeps
    its columns' scales and sums of squares in registers and writes partial row s at the end."""
    import tilelang.language as T

    lay, reduce = emit_group(T, dim)
    GS, VPT, ROWS, NV = lay.group, lay.vpt, lay.rows, lay.nvec
    E = VPT * 4
    P = ctas * ROWS
    f32 = "float32"
    RR = T.dynamic("R")

    @T.prim_func
    def engram_sinkhorn_step(
        matrix: T.Tensor((RR, dim), f32),
        row_scale: T.Tensor((RR,), f32),
        col_scale: T.Tensor((dim,), f32),
        row_norm: T.Tensor((RR,), f32),
        row_scale_out: T.Tensor((RR,), f32),
        col_sumsq_partial: T.Tensor((P, dim), f32),
    ):
        with T.Kernel(ctas, threads=lay.threads) as b:
            red = T.alloc_shared((2, ROWS, lay.warps), f32)
            cs = T.alloc_local((E,), f32)
            acc = T.alloc_local((E,), f32)
            mv = T.alloc_local((E,), f32)
            s = T.alloc_local((1,), f32)
            rs = T.alloc_var(f32)
            ns = T.alloc_var(f32)
            tid = T.get_thread_binding(0)
            lane = tid % GS
            r = tid // GS
            slot = b * ROWS + r
            for j in T.unroll(VPT):
                if j * GS + lane < NV:
                    for e in T.vectorized(4):
                        cs[j * 4 + e] = col_scale[(j * GS + lane) * 4 + e]
            for i in T.unroll(E):
                acc[i] = T.float32(0)
            for k in T.serial(T.ceildiv(T.max(RR - b * ROWS, 0), P)):
                row = slot + k * P
                s[0] = T.float32(0)
                if row < RR:
                    rs = row_scale[row]
                    for j in T.unroll(VPT):
                        if j * GS + lane < NV:
                            for e in T.vectorized(4):
                                mv[j * 4 + e] = matrix[row, (j * GS + lane) * 4 + e]
                            for e in T.unroll(4):
                                x = rs * mv[j * 4 + e] * cs[j * 4 + e]
                                s[0] = s[0] + x * x
                reduce(s, red, k % 2, r, lane)
                if row < RR:
                    norm = T.sqrt(s[0])
                    ns = rs / (norm + T.float32(eps))
                    if lane == 0:
                        row_norm[row] = norm
                        row_scale_out[row] = ns
                    for j in T.unroll(VPT):
                        if j * GS + lane < NV:
                            for e in T.unroll(4):
                                y = ns * mv[j * 4 + e] * cs[j * 4 + e]
                                acc[j * 4 + e] = acc[j * 4 + e] + y * y
            for j in T.unroll(VPT):
                if j * GS + lane < NV:
                    for e in T.vectorized(4):
                        col_sumsq_partial[slot, (j * GS + lane) * 4 + e] = acc[j * 4 + e]

    return engram_sinkhorn_step


def _launch(matrix, row_scale, col_scale, *, eps) -> Launch:
    return Launch(kernel=step_kernel, params=dict(dim=matrix.shape[1], eps=float(eps), ctas=SINKHORN_CTAS))


_op = TileOp(
    name="engram_sinkhorn_step", launch=_launch, operands=("matrix", "row_scale", "col_scale"),
    results=("row_norm", "row_scale_out", "col_sumsq_partial"), reference=step_reference,
)  # fmt: skip


def check_matrix(op: str, matrix, row_scale, col_scale) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``matrix [R, D]``, ``row_scale [R]``, ``col_scale [D]``, fp32, D % 4 == 0."""
    m = checks.as_array(op, "matrix", matrix)
    rs = checks.as_array(op, "row_scale", row_scale)
    cs = checks.as_array(op, "col_scale", col_scale)
    for n, a in (("matrix", m), ("row_scale", rs), ("col_scale", cs)):
        check_dtype(op, n, a, F32)
    if m.ndim != 2 or m.shape[1] % 4 or not 0 < m.shape[1] <= MAX_SINKHORN_DIM:
        raise ValueError(f"{op}: matrix must be [R, D] with D a positive multiple of 4 up to {MAX_SINKHORN_DIM}, got shape {m.shape}")
    if rs.shape != m.shape[:1] or cs.shape != m.shape[1:]:
        raise ValueError(
            f"{op}: row_scale must be [R] = {list(m.shape[:1])} and col_scale [D] = {list(m.shape[1:])}, got {list(rs.shape)}, {list(cs.shape)}"
        )
    return m, rs, cs


def sinkhorn_make(r: int, d: int):
    """TileKernels' test inputs: a normal matrix, uniform [0, 1) scales."""

    def make(rng, *rest):
        m = rng.standard_normal((r, d)).astype(jnp.float32)
        return (m, rng.random(r).astype(jnp.float32), rng.random(d).astype(jnp.float32), *rest[3:])

    return make


def _case(r: int, d: int, eps: float = 1e-20, **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    return ArgSpec(f"r{r}_d{d}", (s((r, d), F32), s((r,), F32), s((d,), F32), eps), make=sinkhorn_make(r, d), tolerance=1e-5, **options)


ARG_SPECS = (
    _case(1001, 256),
    _case(2001, 5120),
    _case(37, 100),
    _case(3, 4),
    _case(700, 2048, eps=1e-6),
    _case(0, 512),
    _case(1 << 20, 512, bench=True),
    _case(100001, 5120, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def engram_sinkhorn_step(matrix, row_scale, col_scale, eps: float = 1e-20, *, impl=None, ops):
    """One Sinkhorn row step (module docstring).

    Args:
      matrix: fp32 ``[R, D]`` (D % 4 == 0, D <= 16384); row_scale: fp32 ``[R]``; col_scale: fp32 ``[D]``.
      eps: added to every row norm (>= 0).

    Returns:
      ``(row_norm [R], new_row_scale [R], col_sumsq_partial [P, D])``, fp32.
    """
    name = "engram_sinkhorn_step"
    m, rs, cs = check_matrix(name, matrix, row_scale, col_scale)
    return ops[0](m, rs, cs, impl=impl, eps=non_negative(name, "eps", eps))
