"""mhc_pre_split_mixes and mhc_head_compute_mix: the per-token mixes from the projections
(TileKernels v1 §5.3, §5.7).

split mixes, per token, with ``z = mixes * scale_seg + base`` (scale[0] for the n pre columns,
scale[1] for the n post columns, scale[2] for the n² comb columns)::

    pre  = sigmoid(z[:n]) + pre_eps             # [n, 1]
    post = sigmoid(z[n:2n]) * post_mult_value   # [n, 1]
    comb = z[2n:] as [n, n]                     # raw logits (Sinkhorn comes next)

head mix: ``sigmoid(mix * scale[0] + base) + pre_eps`` (``[..., n]``).

``sigmoid(z) = 1 / (1 + exp(-z))`` in fp32. Backward: ``dz = dpre * s (1 - s)``,
``dz = dpost * post (1 - post / post_mult_value)`` (TileKernels' form), ``dz = dcomb``;
``dmixes = dz * scale_seg``; ``dbase = sum over tokens of dz`` and ``dscale[seg] = sum over tokens
and the segment's columns of dz * mixes``. The token sums run in two kernels: thread p of P
(``P = min(4096, T)``) sums tokens ``p, p + P, ...`` into a partial row, then one CTA per column sums
the P partial rows (128 threads each taking every 128th row, then thread 0 adds the 128 in order).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.mhc._common import F32, THREADS, check_dtype, check_eps, check_mult, check_shape, n3, partial_rows, sigmoid
from jax_tilek.op import Launch, Rows, TileOp, uses, with_vjp
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}


# ---------------------------------------------------------------------------------------------
# References (flat tokens).


def _segment_scale(scale, n: int):
    return jnp.concatenate([jnp.broadcast_to(scale[0], (n,)), jnp.broadcast_to(scale[1], (n,)), jnp.broadcast_to(scale[2], (n * n,))])


def split_reference(mixes, scale, base, *, mult: int, post_mult_value: float, pre_eps: float):
    """``mixes [T, n3]`` -> ``(pre [T, n, 1], post [T, n, 1], comb [T, n, n])``."""
    n, t = mult, mixes.shape[0]
    z = mixes * _segment_scale(scale, n) + base
    pre = sigmoid(z[:, :n]) + pre_eps
    post = sigmoid(z[:, n : 2 * n]) * post_mult_value
    return pre.reshape(t, n, 1), post.reshape(t, n, 1), z[:, 2 * n :].reshape(t, n, n)


def split_backward_reference(dpre, dpost, dcomb, mixes, scale, base, *, mult: int, post_mult_value: float, pre_eps: float):
    """``(dmixes [T, n3], dscale [3], dbase [n3])`` by JAX's VJP of :func:`split_reference`."""
    f = lambda m, s, b: split_reference(m, s, b, mult=mult, post_mult_value=post_mult_value, pre_eps=pre_eps)  # noqa: E731
    return jax.vjp(f, mixes, scale, base)[1]((dpre, dpost, dcomb))


def head_reference(mix, scale, base, *, pre_eps: float):
    """``mix [T, n]`` -> ``sigmoid(mix * scale[0] + base) + pre_eps``."""
    return sigmoid(mix * scale[0] + base) + pre_eps


def head_backward_reference(g, mix, scale, base, *, pre_eps: float):
    """``(dmix [T, n], dscale [1], dbase [n])`` by JAX's VJP of :func:`head_reference`."""
    return jax.vjp(lambda m, s, b: head_reference(m, s, b, pre_eps=pre_eps), mix, scale, base)[1](g)


# ---------------------------------------------------------------------------------------------
# Kernels.


def reduce_partials_macro(T, C: int):
    """The second kernel of a token reduction (a TileLang macro): one CTA per column of
    ``partial [P, C]``, its 128 threads each summing every 128th row, thread 0 adding them in order."""

    @T.macro
    def reduce_partials(partial, total, P):
        with T.Kernel(C, threads=THREADS) as c:
            lanes = T.alloc_shared((THREADS,), "float32")
            acc = T.alloc_var("float32")
            tid = T.get_thread_binding(0)
            acc = T.float32(0)
            for k in T.serial(T.ceildiv(P - tid, THREADS)):
                acc = acc + partial[tid + k * THREADS, c]
            lanes[tid] = acc
            T.sync_threads()
            if tid == 0:
                acc = T.float32(0)
                for k in T.serial(THREADS):
                    acc = acc + lanes[k]
                total[c] = acc

    return reduce_partials


def _sig(T, z):
    return T.float32(1) / (T.float32(1) + T.exp(-z))


@kernel(pass_configs=PASS_CONFIGS)
def split_fwd_kernel(mult: int, post_mult_value: float, pre_eps: float):
    """One thread per token."""
    import tilelang.language as T

    N, C = mult, n3(mult)
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_pre_split_mixes_fwd(
        mixes: T.Tensor((TT, C), "float32"),
        scale: T.Tensor((3,), "float32"),
        base: T.Tensor((C,), "float32"),
        pre: T.Tensor((TT, N, 1), "float32"),
        post: T.Tensor((TT, N, 1), "float32"),
        comb: T.Tensor((TT, N, N), "float32"),
    ):
        with T.Kernel(T.ceildiv(TT, THREADS), threads=THREADS) as b:
            r = b * THREADS + T.get_thread_binding(0)
            if r < TT:
                for j in T.unroll(N):
                    pre[r, j, 0] = _sig(T, mixes[r, j] * scale[0] + base[j]) + T.float32(pre_eps)
                for j in T.unroll(N):
                    post[r, j, 0] = _sig(T, mixes[r, N + j] * scale[1] + base[N + j]) * T.float32(post_mult_value)
                for j in T.unroll(N * N):
                    comb[r, j // N, j % N] = mixes[r, 2 * N + j] * scale[2] + base[2 * N + j]

    return mhc_pre_split_mixes_fwd


@kernel(pass_configs=PASS_CONFIGS)
def split_bwd_kernel(mult: int, post_mult_value: float):
    """Kernel 1: thread p of P takes tokens p, p + P, ...: writes dmixes, sums dz (dbase) and dz · mixes
    per segment (dscale) into partial row p. Kernel 2 sums the partial rows per column."""
    import tilelang.language as T

    N, C = mult, n3(mult)
    TT, P = T.dynamic("T, P")
    reduce_partials = reduce_partials_macro(T, C + 3)

    @T.prim_func
    def mhc_pre_split_mixes_bwd(
        dpre: T.Tensor((TT, N, 1), "float32"),
        dpost: T.Tensor((TT, N, 1), "float32"),
        dcomb: T.Tensor((TT, N, N), "float32"),
        mixes: T.Tensor((TT, C), "float32"),
        scale: T.Tensor((3,), "float32"),
        base: T.Tensor((C,), "float32"),
        dmixes: T.Tensor((TT, C), "float32"),
        dscale: T.Tensor((3,), "float32"),
        dbase: T.Tensor((C,), "float32"),
        partial: T.Tensor((P, C + 3), "float32"),
        totals: T.Tensor((C + 3,), "float32"),
    ):
        with T.Kernel(T.ceildiv(P, THREADS), threads=THREADS) as b:
            acc = T.alloc_local((C + 3,), "float32")
            dz = T.alloc_local((C,), "float32")
            p = b * THREADS + T.get_thread_binding(0)
            if p < P:
                for j in T.unroll(C + 3):
                    acc[j] = T.float32(0)
                for k in T.serial(T.ceildiv(TT - p, P)):
                    r = p + k * P
                    for j in T.unroll(N):
                        s = _sig(T, mixes[r, j] * scale[0] + base[j])
                        dz[j] = dpre[r, j, 0] * (s * (T.float32(1) - s))
                    for j in T.unroll(N):
                        q = _sig(T, mixes[r, N + j] * scale[1] + base[N + j]) * T.float32(post_mult_value)
                        dz[N + j] = dpost[r, j, 0] * (q * (T.float32(1) - q / T.float32(post_mult_value)))
                    for j in T.unroll(N * N):
                        dz[2 * N + j] = dcomb[r, j // N, j % N]
                    for j in T.unroll(N):
                        dmixes[r, 0 + j] = dz[0 + j] * scale[0]
                        acc[0 + j] = acc[0 + j] + dz[0 + j]
                        acc[C + 0] = acc[C + 0] + dz[0 + j] * mixes[r, 0 + j]
                    for j in T.unroll(N):
                        dmixes[r, N + j] = dz[N + j] * scale[1]
                        acc[N + j] = acc[N + j] + dz[N + j]
                        acc[C + 1] = acc[C + 1] + dz[N + j] * mixes[r, N + j]
                    for j in T.unroll(N * N):
                        dmixes[r, 2 * N + j] = dz[2 * N + j] * scale[2]
                        acc[2 * N + j] = acc[2 * N + j] + dz[2 * N + j]
                        acc[C + 2] = acc[C + 2] + dz[2 * N + j] * mixes[r, 2 * N + j]
                for j in T.unroll(C + 3):
                    partial[p, j] = acc[j]

        reduce_partials(partial, totals, P)

        with T.Kernel(1, threads=THREADS) as _:
            tid = T.get_thread_binding(0)
            for k in T.serial(T.ceildiv(C + 3 - tid, THREADS)):
                j = tid + k * THREADS
                if j < C:
                    dbase[j] = totals[j]
                else:
                    dscale[j - C] = totals[j]

    return mhc_pre_split_mixes_bwd


@kernel(pass_configs=PASS_CONFIGS)
def head_fwd_kernel(mult: int, pre_eps: float):
    import tilelang.language as T

    N = mult
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_head_compute_mix_fwd(
        mix: T.Tensor((TT, N), "float32"), scale: T.Tensor((1,), "float32"), base: T.Tensor((N,), "float32"), out: T.Tensor((TT, N), "float32")
    ):
        with T.Kernel(T.ceildiv(TT * N, THREADS), threads=THREADS) as b:
            f = b * THREADS + T.get_thread_binding(0)
            if f < TT * N:
                out[f // N, f % N] = _sig(T, mix[f // N, f % N] * scale[0] + base[f % N]) + T.float32(pre_eps)

    return mhc_head_compute_mix_fwd


@kernel(pass_configs=PASS_CONFIGS)
def head_bwd_kernel(mult: int):
    """As :func:`split_bwd_kernel`: partial rows of (dbase [n], dscale), then their column sums."""
    import tilelang.language as T

    N = mult
    TT, P = T.dynamic("T, P")
    reduce_partials = reduce_partials_macro(T, N + 1)

    @T.prim_func
    def mhc_head_compute_mix_bwd(
        g: T.Tensor((TT, N), "float32"),
        mix: T.Tensor((TT, N), "float32"),
        scale: T.Tensor((1,), "float32"),
        base: T.Tensor((N,), "float32"),
        dmix: T.Tensor((TT, N), "float32"),
        dscale: T.Tensor((1,), "float32"),
        dbase: T.Tensor((N,), "float32"),
        partial: T.Tensor((P, N + 1), "float32"),
        totals: T.Tensor((N + 1,), "float32"),
    ):
        with T.Kernel(T.ceildiv(P, THREADS), threads=THREADS) as b:
            acc = T.alloc_local((N + 1,), "float32")
            p = b * THREADS + T.get_thread_binding(0)
            if p < P:
                for j in T.unroll(N + 1):
                    acc[j] = T.float32(0)
                for k in T.serial(T.ceildiv(TT - p, P)):
                    r = p + k * P
                    for j in T.unroll(N):
                        s = _sig(T, mix[r, j] * scale[0] + base[j])
                        dz = g[r, j] * (s * (T.float32(1) - s))
                        dmix[r, j] = dz * scale[0]
                        acc[j] = acc[j] + dz
                        acc[N] = acc[N] + dz * mix[r, j]
                for j in T.unroll(N + 1):
                    partial[p, j] = acc[j]

        reduce_partials(partial, totals, P)

        with T.Kernel(1, threads=THREADS) as _:
            tid = T.get_thread_binding(0)
            if tid < N:
                dbase[tid] = totals[tid]
            if tid == N:
                dscale[0] = totals[N]

    return mhc_head_compute_mix_bwd


def _workspace(t: int, cols: int) -> dict:
    return {"partial": jax.ShapeDtypeStruct((partial_rows(t), cols), jnp.float32), "totals": jax.ShapeDtypeStruct((cols,), jnp.float32)}


_split_fwd_op = TileOp(
    name="mhc_pre_split_mixes_fwd", operands=("mixes", "scale", "base"), results=("pre", "post", "comb"),
    reference=split_reference, rows=Rows(("mixes",), ("pre", "post", "comb")),
    launch=lambda m, s, b, *, mult, post_mult_value, pre_eps: Launch(
        kernel=split_fwd_kernel, params=dict(mult=mult, post_mult_value=float(post_mult_value), pre_eps=float(pre_eps))),
)  # fmt: skip

_split_bwd_op = TileOp(
    name="mhc_pre_split_mixes_bwd", operands=("dpre", "dpost", "dcomb", "mixes", "scale", "base"),
    results=("dmixes", "dscale", "dbase"), reference=split_backward_reference,
    launch=lambda dpre, dpost, dcomb, m, s, b, *, mult, post_mult_value, pre_eps: Launch(
        kernel=split_bwd_kernel, params=dict(mult=mult, post_mult_value=float(post_mult_value)),
        workspace=_workspace(m.shape[0], n3(mult) + 3)),
)  # fmt: skip

_head_fwd_op = TileOp(
    name="mhc_head_compute_mix_fwd", operands=("mix", "scale", "base"), results=("out",), reference=head_reference,
    rows=Rows(("mix",), ("out",)),
    launch=lambda m, s, b, *, pre_eps: Launch(kernel=head_fwd_kernel, params=dict(mult=m.shape[1], pre_eps=float(pre_eps))),
)  # fmt: skip

_head_bwd_op = TileOp(
    name="mhc_head_compute_mix_bwd", operands=("g", "mix", "scale", "base"), results=("dmix", "dscale", "dbase"),
    reference=head_backward_reference,
    launch=lambda g, m, s, b, *, pre_eps: Launch(kernel=head_bwd_kernel, params=dict(mult=m.shape[1]), workspace=_workspace(m.shape[0], m.shape[1] + 1)),
)  # fmt: skip


def _split_primal(m, s, b, *, impl=None, **static):
    return _split_fwd_op(m, s, b, impl=impl, **static)


def _split_fwd(m, s, b, *, impl=None, **static):
    return _split_primal(m, s, b, impl=impl, **static), (m, s, b)


def _split_bwd(res, g, *, impl=None, **static):
    return _split_bwd_op(*g, *res, impl=impl, **static)


split_flat = with_vjp(_split_primal, _split_fwd, _split_bwd)


def _head_primal(m, s, b, *, impl=None, pre_eps):
    return _head_fwd_op(m, s, b, impl=impl, pre_eps=pre_eps)


def _head_fwd(m, s, b, *, impl=None, pre_eps):
    return _head_primal(m, s, b, impl=impl, pre_eps=pre_eps), (m, s, b)


def _head_bwd(res, g, *, impl=None, pre_eps):
    return _head_bwd_op(g, *res, impl=impl, pre_eps=pre_eps)


head_flat = with_vjp(_head_primal, _head_fwd, _head_bwd)


# ---------------------------------------------------------------------------------------------
# Public functions.


def _split_case(lead, n=4, post_mult_value=2.0, pre_eps=1e-2, **options) -> ArgSpec:
    c = n3(n)
    args = (jax.ShapeDtypeStruct((*lead, c), F32), jax.ShapeDtypeStruct((3,), F32), jax.ShapeDtypeStruct((c,), F32), n, post_mult_value, pre_eps)
    return ArgSpec(f"{'x'.join(map(str, lead))}_n{n}", args, tolerance=2e-5, **options)


SPLIT_SPECS = (
    _split_case((2, 64)),
    _split_case((5,), n=2, post_mult_value=1.0, pre_eps=1e-6),
    _split_case((9,), n=8),
    _split_case((0,)),
    _split_case((16384,), bench=True),
    _split_case((65536,), bench=True),
)


@uses(_split_fwd_op, _split_bwd_op, cases=SPLIT_SPECS, differentiable=True)
def mhc_pre_split_mixes(
    input_mixes: jax.Array, mhc_scale: jax.Array, mhc_base: jax.Array, mhc_mult: int, mhc_post_mult_value: float, mhc_pre_eps: float,
    *, impl=None, ops,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Splits the projections ``input_mixes [..., n3]`` fp32 (n3 = n(n+2)) with ``mhc_scale [3]`` and
    ``mhc_base [n3]`` into ``(pre [..., n, 1], post [..., n, 1], comb [..., n, n])`` (module docstring).
    Differentiable in all three arrays."""
    name = "mhc_pre_split_mixes"
    mixes, scale, base = (checks.as_array(name, k, v) for k, v in (("input_mixes", input_mixes), ("mhc_scale", mhc_scale), ("mhc_base", mhc_base)))
    n = check_mult(name, mhc_mult)
    pm = checks.static_number(name, "mhc_post_mult_value", mhc_post_mult_value, positive=True, optional=False)
    eps = check_eps(name, "mhc_pre_eps", mhc_pre_eps)
    for k, v in (("input_mixes", mixes), ("mhc_scale", scale), ("mhc_base", base)):
        check_dtype(name, k, v, F32)
    if mixes.ndim < 1 or mixes.shape[-1] != n3(n):
        raise ValueError(f"{name}: input_mixes must be [..., n(n+2)] = [..., {n3(n)}] for mhc_mult {n}, got shape {mixes.shape}")
    check_shape(name, "mhc_scale", scale, (3,))
    check_shape(name, "mhc_base", base, (n3(n),))
    lead = mixes.shape[:-1]
    pre, post, comb = split_flat(mixes.reshape(-1, n3(n)), scale, base, impl=impl, mult=n, post_mult_value=pm, pre_eps=eps)
    return pre.reshape(*lead, n, 1), post.reshape(*lead, n, 1), comb.reshape(*lead, n, n)


def _head_case(lead, n=4, pre_eps=1e-2, **options) -> ArgSpec:
    args = (jax.ShapeDtypeStruct((*lead, n), F32), jax.ShapeDtypeStruct((1,), F32), jax.ShapeDtypeStruct((n,), F32), pre_eps)
    return ArgSpec(f"{'x'.join(map(str, lead))}_n{n}", args, tolerance=1e-5, **options)


HEAD_SPECS = (
    _head_case((2, 64)),
    _head_case((7,), n=3),
    _head_case((0,)),
    _head_case((16384,), bench=True),
    _head_case((65536,), bench=True),
)


@uses(_head_fwd_op, _head_bwd_op, cases=HEAD_SPECS, differentiable=True)
def mhc_head_compute_mix(input_mix: jax.Array, mhc_scale: jax.Array, mhc_base: jax.Array, mhc_pre_eps: float, *, impl=None, ops) -> jax.Array:
    """The head's stream weights: ``sigmoid(input_mix * mhc_scale[0] + mhc_base) + mhc_pre_eps``,
    ``input_mix [..., n]`` fp32, ``mhc_scale [1]`` (or a scalar), ``mhc_base [n]``. Differentiable in all three."""
    name = "mhc_head_compute_mix"
    mix, scale, base = (checks.as_array(name, k, v) for k, v in (("input_mix", input_mix), ("mhc_scale", mhc_scale), ("mhc_base", mhc_base)))
    eps = check_eps(name, "mhc_pre_eps", mhc_pre_eps)
    for k, v in (("input_mix", mix), ("mhc_scale", scale), ("mhc_base", base)):
        check_dtype(name, k, v, F32)
    if mix.ndim < 1:
        raise ValueError(f"{name}: input_mix must be [..., n], got a scalar")
    n = check_mult(name, mix.shape[-1])
    if scale.size != 1:
        raise ValueError(f"{name}: mhc_scale must hold one value ([1] or a scalar), got shape {scale.shape}")
    check_shape(name, "mhc_base", base, (n,))
    lead = mix.shape[:-1]
    out = head_flat(mix.reshape(-1, n), scale.reshape(1), base, impl=impl, pre_eps=eps)
    return out.reshape(*lead, n)


def random_mixes(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)
