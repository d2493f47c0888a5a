"""sinkhorn_normalize: project each token's n x n comb logits onto a (near) doubly stochastic matrix
(TileKernels v1 §5.4).

Per token, in float32, in TileKernels' torch reference order (``sinkhorn_normalize_ref``)::

    x = softmax(x, axis=-1) + eps
    x = x / (x.sum(axis=-2) + eps)                  # columns
    repeat - 1 times:
        x = x / (x.sum(axis=-1) + eps)              # rows
        x = x / (x.sum(axis=-2) + eps)              # columns

i.e. ``repeat`` column and ``repeat - 1`` row normalisations; the result's columns sum to 1 (up to
eps) and its rows within the last step's change. The backward kernel recomputes the forward, keeps
every normalisation's input (a lane's entry in registers for n <= 5, a token's matrices in a thread's
local memory above) and back-propagates through each step
(``g <- (g - sum(g * y)) / (s + eps)`` along the normalised axis), then through the softmax
(``g <- (g - sum(g * p)) * p``; the +eps shift passes the gradient unchanged).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.mhc._common import F32, THREADS, check_dtype, check_eps, check_mult
from jax_tilek.op import Launch, Rows, TileOp, uses, with_vjp
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
MAX_REPEAT = 64


# ---------------------------------------------------------------------------------------------
# References.


def _chain(x, axis: int, op):
    parts = [jax.lax.index_in_dim(x, i, axis) for i in range(x.shape[axis])]
    acc = parts[0]
    for p in parts[1:]:
        acc = op(acc, p)
    return acc


def _sum(x, axis: int):
    """A sum along ``axis`` (of size n) as a chain of adds in index order: the kernels' order, and the
    same bits whatever the token count (XLA's CPU reductions, and an exp fused with one, change their
    code with the shape)."""
    return _chain(x, axis, jnp.add)


def sinkhorn_reference(x, *, repeat: int, eps: float):
    """``x [T, n, n]`` fp32 -> the normalised matrices (the module docstring's order)."""
    e = jnp.exp(x - _chain(x, -1, jnp.maximum))
    x = e / _sum(e, -1) + eps
    x = x / (_sum(x, -2) + eps)
    for _ in range(repeat - 1):
        x = x / (_sum(x, -1) + eps)
        x = x / (_sum(x, -2) + eps)
    return x


def sinkhorn_backward_reference(g, x, *, repeat: int, eps: float):
    """The cotangent of x: JAX's VJP of :func:`sinkhorn_reference`."""
    return jax.vjp(lambda v: sinkhorn_reference(v, repeat=repeat, eps=eps), x)[1](g)[0]


# ---------------------------------------------------------------------------------------------
# Kernels. n <= 5 (n = 4 the tuned case): a lane per matrix entry, a token's n² entries in a group of
# GROUP lanes (a power of two), row and column sums gathered by shuffles and added in index order, so
# every lane computes what the one-thread-per-token form below computes. At 4096 tokens one thread
# per token is 32 CTAs whose ~40 dependent normalisations (IEEE divisions) run with no other warp to
# hide them: 25 us forward, 70 us backward per call at n = 4, repeat 20 on an H100 (2026-12-07), in a
# training step. n > 5 (n² > 32 lanes): one thread per token, the n x n matrix in registers.


def lane_group(n: int) -> int:
    """Lanes per token of the lane-per-entry kernels (0: n² > 32, the one-thread-per-token kernels)."""
    nn = n * n
    return 1 << (nn - 1).bit_length() if nn <= 32 else 0


def _emit_lanes(T, N: int, G: int, eps: float):
    """Per-entry building blocks over one-element locals: the calling lane holds entry (i, j) of its
    token's matrix; every lane of the warp must call them (the shuffles take the full warp)."""

    @T.macro
    def line_sum(v, i, j, vals, total, rows: bool):
        """``total = 0 + v[line 0] + ... + v[line n-1]`` over the entry's row (or column), in index order."""
        for c in T.unroll(N):
            vals[c] = T.shfl_sync(v, (i * N + c) if rows else (c * N + j), G)
        total[0] = T.float32(0)
        for c in T.unroll(N):
            total[0] = total[0] + vals[c]

    @T.macro
    def softmax_row(m, p, i, j, vals, total):
        for c in T.unroll(N):
            vals[c] = T.shfl_sync(m[0], i * N + c, G)
        total[0] = vals[0]
        for c in T.unroll(N - 1):
            total[0] = T.max(total[0], vals[c + 1])
        p[0] = T.exp(m[0] - total[0])
        line_sum(p[0], i, j, vals, total, True)
        p[0] = p[0] / total[0]

    @T.macro
    def normalize(p, i, j, vals, total, rows: bool):
        line_sum(p[0], i, j, vals, total, rows)
        p[0] = p[0] / (total[0] + T.float32(eps))

    @T.macro
    def normalize_grad(a_in, g, i, j, vals, total, rows: bool):
        """``g`` through ``y = a / (sum(a) + eps)`` along rows (or columns), given the input ``a_in``."""
        line_sum(a_in, i, j, vals, total, rows)
        s = T.alloc_var("float32")
        s = total[0] + T.float32(eps)
        line_sum(g[0] * (a_in / s), i, j, vals, total, rows)
        g[0] = (g[0] - total[0]) / s

    return line_sum, softmax_row, normalize, normalize_grad


def _lanes(T, b, G: int, N: int, tokens):
    """(token, i, j, live) of the calling lane, THREADS // G tokens per CTA; ``live``: a real entry
    of a real token."""
    tx = T.get_thread_binding(0)
    k = tx % G
    r = b * (THREADS // G) + tx // G
    return r, k // N, k % N, T.And(k < N * N, r < tokens)


@kernel(pass_configs=PASS_CONFIGS)
def sinkhorn_lanes_fwd_kernel(mult: int, repeat: int, eps: float):
    import tilelang.language as T

    N, G = mult, lane_group(mult)
    TT = T.dynamic("T")
    _, softmax_row, normalize, _ = _emit_lanes(T, N, G, eps)

    @T.prim_func
    def mhc_sinkhorn_fwd(x: T.Tensor((TT, N, N), "float32"), out: T.Tensor((TT, N, N), "float32")):
        with T.Kernel(T.ceildiv(TT, THREADS // G), threads=THREADS) as b:
            m = T.alloc_local((1,), "float32")
            p = T.alloc_local((1,), "float32")
            vals = T.alloc_local((N,), "float32")
            total = T.alloc_local((1,), "float32")
            r, i, j, live = _lanes(T, b, G, N, TT)
            m[0] = T.float32(0)
            if live:
                m[0] = x[r, i, j]
            softmax_row(m, p, i, j, vals, total)
            p[0] = p[0] + T.float32(eps)
            normalize(p, i, j, vals, total, False)
            for _ in T.serial(repeat - 1):
                normalize(p, i, j, vals, total, True)
                normalize(p, i, j, vals, total, False)
            if live:
                out[r, i, j] = p[0]

    return mhc_sinkhorn_fwd


@kernel(pass_configs=PASS_CONFIGS)
def sinkhorn_lanes_bwd_kernel(mult: int, repeat: int, eps: float):
    import tilelang.language as T

    N, G = mult, lane_group(mult)
    STEPS = 2 * repeat - 1
    TT = T.dynamic("T")
    line_sum, softmax_row, normalize, normalize_grad = _emit_lanes(T, N, G, eps)

    @T.prim_func
    def mhc_sinkhorn_bwd(
        g_out: T.Tensor((TT, N, N), "float32"), x: T.Tensor((TT, N, N), "float32"), dx: T.Tensor((TT, N, N), "float32")
    ):
        with T.Kernel(T.ceildiv(TT, THREADS // G), threads=THREADS) as b:
            m = T.alloc_local((1,), "float32")
            p = T.alloc_local((1,), "float32")
            cur = T.alloc_local((1,), "float32")
            g = T.alloc_local((1,), "float32")
            hist = T.alloc_local((STEPS,), "float32")
            vals = T.alloc_local((N,), "float32")
            total = T.alloc_local((1,), "float32")
            r, i, j, live = _lanes(T, b, G, N, TT)
            m[0] = T.float32(0)
            g[0] = T.float32(0)
            if live:
                m[0] = x[r, i, j]
                g[0] = g_out[r, i, j]
            softmax_row(m, p, i, j, vals, total)
            cur[0] = p[0] + T.float32(eps)
            hist[0] = cur[0]
            normalize(cur, i, j, vals, total, False)
            for s in T.unroll(repeat - 1):  # unrolled: hist stays in registers
                hist[2 * s + 1] = cur[0]
                normalize(cur, i, j, vals, total, True)
                hist[2 * s + 2] = cur[0]
                normalize(cur, i, j, vals, total, False)
            for s in T.unroll(repeat - 1):
                q = repeat - 2 - s
                normalize_grad(hist[2 * q + 2], g, i, j, vals, total, False)
                normalize_grad(hist[2 * q + 1], g, i, j, vals, total, True)
            normalize_grad(hist[0], g, i, j, vals, total, False)
            line_sum(g[0] * p[0], i, j, vals, total, True)
            if live:
                dx[r, i, j] = (g[0] - total[0]) * p[0]

    return mhc_sinkhorn_bwd


# One thread per token (n > 5).


def _emit(T, N: int, eps: float):
    """The per-token building blocks (TileLang macros over a local ``[n * n]`` matrix)."""

    @T.macro
    def softmax_rows(m, p):
        for i in T.unroll(N):
            mx = T.alloc_var("float32")
            s = T.alloc_var("float32")
            mx = m[i * N]
            for j in T.unroll(N - 1):
                mx = T.max(mx, m[i * N + j + 1])
            s = T.float32(0)
            for j in T.unroll(N):
                p[i * N + j] = T.exp(m[i * N + j] - mx)
                s = s + p[i * N + j]
            for j in T.unroll(N):
                p[i * N + j] = p[i * N + j] / s

    @T.macro
    def normalize(m, rows: bool):
        for a in T.unroll(N):
            s = T.alloc_var("float32")
            s = T.float32(0)
            for b in T.unroll(N):
                s = s + (m[a * N + b] if rows else m[b * N + a])
            s = s + T.float32(eps)
            for b in T.unroll(N):
                if rows:
                    m[a * N + b] = m[a * N + b] / s
                else:
                    m[b * N + a] = m[b * N + a] / s

    @T.macro
    def normalize_grad(a_in, g, rows: bool):
        """``g`` through ``y = a / (sum(a) + eps)`` along rows (or columns), given the input ``a_in``."""
        for a in T.unroll(N):
            s = T.alloc_var("float32")
            d = T.alloc_var("float32")
            s = T.float32(0)
            for b in T.unroll(N):
                s = s + (a_in[a * N + b] if rows else a_in[b * N + a])
            s = s + T.float32(eps)
            d = T.float32(0)
            for b in T.unroll(N):
                if rows:
                    d = d + g[a * N + b] * (a_in[a * N + b] / s)
                else:
                    d = d + g[b * N + a] * (a_in[b * N + a] / s)
            for b in T.unroll(N):
                if rows:
                    g[a * N + b] = (g[a * N + b] - d) / s
                else:
                    g[b * N + a] = (g[b * N + a] - d) / s

    return softmax_rows, normalize, normalize_grad


@kernel(pass_configs=PASS_CONFIGS)
def sinkhorn_fwd_kernel(mult: int, repeat: int, eps: float):
    import tilelang.language as T

    N, NN = mult, mult * mult
    TT = T.dynamic("T")
    softmax_rows, normalize, _ = _emit(T, N, eps)

    @T.prim_func
    def mhc_sinkhorn_fwd(x: T.Tensor((TT, N, N), "float32"), out: T.Tensor((TT, N, N), "float32")):
        with T.Kernel(T.ceildiv(TT, THREADS), threads=THREADS) as b:
            m = T.alloc_local((NN,), "float32")
            p = T.alloc_local((NN,), "float32")
            r = b * THREADS + T.get_thread_binding(0)
            if r < TT:
                for k in T.unroll(NN):
                    m[k] = x[r, k // N, k % N]
                softmax_rows(m, p)
                for k in T.unroll(NN):
                    p[k] = p[k] + T.float32(eps)
                normalize(p, False)
                for _ in T.serial(repeat - 1):
                    normalize(p, True)
                    normalize(p, False)
                for k in T.unroll(NN):
                    out[r, k // N, k % N] = p[k]

    return mhc_sinkhorn_fwd


@kernel(pass_configs=PASS_CONFIGS)
def sinkhorn_bwd_kernel(mult: int, repeat: int, eps: float):
    import tilelang.language as T

    N, NN = mult, mult * mult
    STEPS = 2 * repeat - 1
    TT = T.dynamic("T")
    softmax_rows, normalize, normalize_grad = _emit(T, N, eps)

    @T.prim_func
    def mhc_sinkhorn_bwd(
        g_out: T.Tensor((TT, N, N), "float32"), x: T.Tensor((TT, N, N), "float32"), dx: T.Tensor((TT, N, N), "float32")
    ):
        with T.Kernel(T.ceildiv(TT, THREADS), threads=THREADS) as b:
            m = T.alloc_local((NN,), "float32")
            p = T.alloc_local((NN,), "float32")
            cur = T.alloc_local((NN,), "float32")
            a_in = T.alloc_local((NN,), "float32")
            g = T.alloc_local((NN,), "float32")
            hist = T.alloc_local((STEPS * NN,), "float32")
            r = b * THREADS + T.get_thread_binding(0)
            if r < TT:
                for k in T.unroll(NN):
                    m[k] = x[r, k // N, k % N]
                softmax_rows(m, p)
                for k in T.unroll(NN):
                    cur[k] = p[k] + T.float32(eps)
                    hist[k] = cur[k]
                normalize(cur, False)
                for s in T.serial(repeat - 1):
                    for k in T.unroll(NN):
                        hist[(2 * s + 1) * NN + k] = cur[k]
                    normalize(cur, True)
                    for k in T.unroll(NN):
                        hist[(2 * s + 2) * NN + k] = cur[k]
                    normalize(cur, False)
                for k in T.unroll(NN):
                    g[k] = g_out[r, k // N, k % N]
                for s in T.serial(repeat - 1):
                    q = repeat - 2 - s
                    for k in T.unroll(NN):
                        a_in[k] = hist[(2 * q + 2) * NN + k]
                    normalize_grad(a_in, g, False)
                    for k in T.unroll(NN):
                        a_in[k] = hist[(2 * q + 1) * NN + k]
                    normalize_grad(a_in, g, True)
                for k in T.unroll(NN):
                    a_in[k] = hist[k]
                normalize_grad(a_in, g, False)
                for i in T.unroll(N):
                    d = T.alloc_var("float32")
                    d = T.float32(0)
                    for j in T.unroll(N):
                        d = d + g[i * N + j] * p[i * N + j]
                    for j in T.unroll(N):
                        dx[r, i, j] = (g[i * N + j] - d) * p[i * N + j]

    return mhc_sinkhorn_bwd


def _params(x, repeat, eps):
    return dict(mult=x.shape[1], repeat=repeat, eps=float(eps))


def _kernel(x, lanes, per_token):
    return lanes if lane_group(x.shape[1]) else per_token


_fwd_op = TileOp(
    name="mhc_sinkhorn_fwd", operands=("x",), results=("out",), reference=sinkhorn_reference, rows=Rows(("x",), ("out",)),
    launch=lambda x, *, repeat, eps: Launch(
        kernel=_kernel(x, sinkhorn_lanes_fwd_kernel, sinkhorn_fwd_kernel), params=_params(x, repeat, eps)
    ),
)  # fmt: skip

_bwd_op = TileOp(
    name="mhc_sinkhorn_bwd", operands=("g_out", "x"), results=("dx",), reference=sinkhorn_backward_reference,
    rows=Rows(("g_out", "x"), ("dx",)),
    launch=lambda g, x, *, repeat, eps: Launch(
        kernel=_kernel(x, sinkhorn_lanes_bwd_kernel, sinkhorn_bwd_kernel), params=_params(x, repeat, eps)
    ),
)  # fmt: skip


def _primal(x, *, impl=None, repeat, eps):
    return _fwd_op(x, impl=impl, repeat=repeat, eps=eps)


def _fwd(x, *, impl=None, repeat, eps):
    return _primal(x, impl=impl, repeat=repeat, eps=eps), x


def _bwd(x, g, *, impl=None, repeat, eps):
    return (_bwd_op(g, x, impl=impl, repeat=repeat, eps=eps),)


sinkhorn_flat = with_vjp(_primal, _fwd, _bwd)


def check_sinkhorn(op: str, repeat, eps) -> tuple[int, float]:
    repeat = checks.static_int(op, "repeat", repeat)
    if not 1 <= repeat <= MAX_REPEAT:
        raise ValueError(f"{op}: repeat must be in [1, {MAX_REPEAT}], got {repeat}")
    return repeat, check_eps(op, "eps", eps)


def _case(lead, n=4, repeat=10, eps=1e-6, **options) -> ArgSpec:
    name = f"{'x'.join(map(str, lead))}_n{n}_r{repeat}"
    return ArgSpec(name, (jax.ShapeDtypeStruct((*lead, n, n), F32),), dict(repeat=repeat, eps=eps), tolerance=1e-5, **options)


ARG_SPECS = (
    _case((2, 64)),
    _case((1,)),
    _case((37,), n=2, repeat=3),
    _case((9,), n=3, repeat=4),  # lanes 9-15 of each 16-lane group hold no entry
    _case((7,), n=5, repeat=2),  # 25 entries in a whole warp
    _case((64,), n=8, repeat=1),  # one thread per token
    _case((16384,), bench=True),
    _case((65536,), bench=True),
)


@uses(_fwd_op, _bwd_op, cases=ARG_SPECS, differentiable=True)
def sinkhorn_normalize(x: jax.Array, repeat: int = 10, eps: float = 1e-6, *, impl=None, ops) -> jax.Array:
    """Sinkhorn-normalises ``x [..., n, n]`` fp32 (the module docstring's steps), ``repeat >= 1``.

    Differentiable (a backward kernel that recomputes the forward).
    """
    name = "sinkhorn_normalize"
    x = checks.as_array(name, "x", x)
    repeat, eps = check_sinkhorn(name, repeat, eps)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name}: x must be [..., n, n], got shape {x.shape}")
    check_dtype(name, "x", x, F32)
    n = check_mult(name, x.shape[-1])
    lead = x.shape[:-2]
    return sinkhorn_flat(x.reshape(-1, n, n), impl=impl, repeat=repeat, eps=eps).reshape(*lead, n, n)
