"""The backward of norm_fn -> mixes -> apply_mix (``mhc_pre``, ``mhc_head``) with the residual's
cotangent written once.

Step by step, that chain's backward writes three cotangents of the residual x (apply_mix's
``mix · dout``; the GEMM's ``d out_mul · fn``, fp32; ``2 x · d sqrsum``) and XLA sums them: on an
H100 (2026-12-07) that sum alone was 30% of an mHC block's forward + backward. Here
:func:`norm_mix_apply_flat` has one custom VJP over the chain (per token, ``G = nH``)::

    dmix[i]  = sum_h dout[h] x[i, h]                              (apply_mix's dmix alone)
    (d out_mul [M], d sqrsum) <- the mixes' VJP (split + Sinkhorn, or the head mix) <- reduce backward
    dx[i, h] = bf16((mix[i] dout[h] + 2 x[i, h] d sqrsum) + sum_m d out_mul[m] fn[m, iH + h])

The last line is one kernel, ``mhc_pre_residual_bwd`` (fp32 FMAs in m order, ``fn`` staged in shared
memory), rounded to bf16 once; ``dfn = d out_mulᵀ x`` is :func:`_norm_fn.products_dfn`. The forward
runs the step-by-step kernels, so its results are those of the unfused path bit for bit.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp

from jax_tilek.kernel import kernel
from jax_tilek.mhc import _apply_mix, _norm_fn, _sinkhorn, _split_mixes
from jax_tilek.mhc._common import THREADS, VEC
from jax_tilek.op import Launch, Rows, TileOp, config_class, with_vjp

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
COLUMNS = 32 * VEC  # a CTA's columns of G: one 16-byte vector per lane


@dataclasses.dataclass(frozen=True)
class ResidualGradConfig:
    """``mhc_pre_residual_bwd``'s tiling: tokens a thread accumulates at once (``tokens_per_thread`` x 8
    fp32 registers), tokens a CTA (``tokens_per_cta``, a multiple of 4 x ``tokens_per_thread``; their
    d out_mul and fn's columns sit in shared memory), and the CTAs per SM it is compiled for
    (``__launch_bounds__``). The default (4, 128, 6) takes 80 registers; (8, 128, 1), the first
    version, took 102-127, ran 4 CTAs an SM and was latency-bound (ncu, H100 2026-12-07: 757 us at
    16384 x 4 x 4096, 70% of DRAM bandwidth). ``bench --family mhc_variants`` times the others; every
    tiling gives the same bits."""

    tokens_per_thread: int = 4
    tokens_per_cta: int = 128
    ctas_per_sm: int = 6


@config_class(ResidualGradConfig)
def _config(*_, **__) -> ResidualGradConfig:
    return ResidualGradConfig()


def residual_grad_reference(dout, x, mix, dmul, dsq, fn, dres=None):
    """``dout [T, H]`` bf16, ``x [T, n, H]`` bf16, ``mix [T, n, 1]``, ``dmul [T, M]``, ``dsq [T]``,
    ``fn [M, nH]`` (fp32), optionally another cotangent of x ``dres [T, n, H]`` bf16 to add ->
    ``dx [T, n, H]`` bf16 (module docstring)."""
    t, n, h = x.shape
    acc = mix * dout.astype(jnp.float32)[:, None, :] + 2.0 * x.astype(jnp.float32) * dsq[:, None, None]
    acc = acc if dres is None else acc + dres.astype(jnp.float32)
    return (acc + jnp.einsum("tm,mk->tk", dmul, fn, precision="highest").reshape(t, n, h)).astype(x.dtype)


@kernel(pass_configs=PASS_CONFIGS)
def residual_grad_kernel(mult: int, hidden: int, rows: int, accumulate: bool, tokens_per_thread: int, tokens_per_cta: int, ctas_per_sm: int):
    """A CTA per (COLUMNS columns of G, ``tokens_per_cta`` tokens): fn's columns and the tokens' d out_mul
    in shared memory; warp w takes tokens ``w * tokens_per_cta / 4 + ...``, ``tokens_per_thread`` at a
    time, a lane one 8-column vector. ``accumulate``: dres is given and added before the rounding."""
    import tilelang.language as T

    N, H, M, STEP, TOKENS = mult, hidden, rows, tokens_per_thread, tokens_per_cta
    G = N * H
    warps = THREADS // 32
    rounds = TOKENS // (warps * STEP)
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_pre_residual_bwd(
        dout: T.Tensor((TT, H), "bfloat16"),
        x: T.Tensor((TT, N, H), "bfloat16"),
        mix: T.Tensor((TT, N, 1), "float32"),
        dmul: T.Tensor((TT, M), "float32"),
        dsq: T.Tensor((TT,), "float32"),
        fn: T.Tensor((M, G), "float32"),
        dres: T.Tensor((TT, N, H), "bfloat16"),
        dx: T.Tensor((TT, N, H), "bfloat16"),
    ):
        with T.Kernel(T.ceildiv(G, COLUMNS), T.ceildiv(TT, TOKENS), threads=THREADS) as (bc, bt):
            T.annotate_min_blocks_per_sm(ctas_per_sm)
            fn_s = T.alloc_shared((M, COLUMNS), "float32")
            d_s = T.alloc_shared((TOKENS, M), "float32")
            f = T.alloc_local((VEC,), "float32")
            acc = T.alloc_local((STEP, VEC), "float32")
            gv = T.alloc_local((VEC,), "bfloat16")
            xv = T.alloc_local((VEC,), "bfloat16")
            rv = T.alloc_local((VEC,), "bfloat16")
            ov = T.alloc_local((VEC,), "bfloat16")
            tid = T.get_thread_binding(0)
            lane = tid % 32
            c0 = bc * COLUMNS
            t0 = bt * TOKENS
            for e in T.serial(M * COLUMNS // THREADS):
                m = (e * THREADS + tid) // COLUMNS
                c = (e * THREADS + tid) % COLUMNS
                fn_s[m, c] = T.if_then_else(c0 + c < G, fn[m, c0 + c], T.float32(0))
            for e in T.serial(-(-TOKENS * M // THREADS)):  # TOKENS * M need not be a multiple of THREADS
                q = e * THREADS + tid
                if q < TOKENS * M:
                    d_s[q // M, q % M] = T.if_then_else(t0 + q // M < TT, dmul[t0 + q // M, q % M], T.float32(0))
            T.sync_threads()
            k = c0 + lane * VEC
            i = k // H
            h = k % H
            for rd in T.serial(rounds):
                r0 = (tid // 32) * (TOKENS // warps) + rd * STEP
                # The element-wise terms first: the STEP tokens' loads are in flight together and the
                # fn products' FMAs cover their latency.
                for s in T.unroll(STEP):
                    t = t0 + r0 + s
                    for j in T.unroll(VEC):
                        acc[s, j] = T.float32(0)
                    if t < TT and k < G:
                        w = mix[t, i, 0]
                        q = T.float32(2) * dsq[t]
                        for j in T.vectorized(VEC):
                            gv[j] = dout[t, h + j]
                        for j in T.vectorized(VEC):
                            xv[j] = x[t, i, h + j]
                        for j in T.unroll(VEC):
                            acc[s, j] = w * T.Cast("float32", gv[j]) + q * T.Cast("float32", xv[j])
                        if accumulate:
                            for j in T.vectorized(VEC):
                                rv[j] = dres[t, i, h + j]
                            for j in T.unroll(VEC):
                                acc[s, j] = acc[s, j] + T.Cast("float32", rv[j])
                for m in T.serial(M):
                    for j in T.vectorized(VEC):
                        f[j] = fn_s[m, lane * VEC + j]
                    for s in T.unroll(STEP):
                        for j in T.unroll(VEC):
                            acc[s, j] = acc[s, j] + d_s[r0 + s, m] * f[j]
                for s in T.unroll(STEP):
                    t = t0 + r0 + s
                    if t < TT and k < G:
                        for j in T.unroll(VEC):
                            ov[j] = T.Cast("bfloat16", acc[s, j])
                        for j in T.vectorized(VEC):
                            dx[t, i, h + j] = ov[j]

    return mhc_pre_residual_bwd


def _launch(dout, x, mix, dmul, dsq, fn, dres, *, config: ResidualGradConfig) -> Launch:
    step, tokens = config.tokens_per_thread, config.tokens_per_cta
    if step < 1 or tokens < 1 or tokens % (THREADS // 32 * step) or config.ctas_per_sm < 1:
        raise ValueError(f"mhc_pre_residual_bwd: {config} needs tokens_per_cta a positive multiple of {THREADS // 32} x tokens_per_thread and ctas_per_sm >= 1")
    params = dict(mult=x.shape[1], hidden=x.shape[2], rows=fn.shape[0], accumulate=dres is not None)
    return Launch(kernel=residual_grad_kernel, params=dict(params, **dataclasses.asdict(config)))


residual_grad_op = TileOp(
    name="mhc_pre_residual_bwd", operands=("dout", "x", "mix", "dmul", "dsq", "fn", "dres?"), results=("dx",),
    reference=residual_grad_reference, rows=Rows(("dout", "x", "mix", "dmul", "dsq", "dres"), ("dx",)),
    config=_config, launch=_launch,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The chain with its fused backward.


def _streams(mixes, scale, base, *, impl, kind: str, n: int, post_mult_value, pre_eps, repeat, sinkhorn_eps):
    """The mixes -> ``(apply_mix's mix [T, n, 1], the other outputs)``: mhc_pre's ``(post, comb)``
    (split + Sinkhorn) or, for the head, none."""
    if kind == "head":
        return _split_mixes.head_flat(mixes, scale, base, impl=impl, pre_eps=pre_eps)[..., None], ()
    pre, post, comb = _split_mixes.split_flat(mixes, scale, base, impl=impl, mult=n, post_mult_value=post_mult_value, pre_eps=pre_eps)
    return pre, (post, _sinkhorn.sinkhorn_flat(comb, impl=impl, repeat=repeat, eps=sinkhorn_eps))


def _primal(x, fn, scale, base, w, *, impl, eps, n_splits, alias: bool, residual_op=None, **mixing):
    mixes = _norm_fn.norm_fn_flat(x, fn, w, impl=impl, eps=eps, n_splits=n_splits)
    mix, rest = _streams(mixes, scale, base, impl=impl, n=x.shape[1], **mixing)
    out = _apply_mix.apply_mix_flat(x, mix, impl=impl)
    return (out, rest, x) if alias else (out, rest)


def _fwd(x, fn, scale, base, w, *, impl, eps, n_splits, alias: bool, residual_op=None, **mixing):
    mixes, (*_, fn_merged, mul, sq) = _norm_fn.norm_fn_fwd(x, fn, w, impl=impl, eps=eps, n_splits=n_splits)
    (mix, rest), streams_vjp = jax.vjp(lambda *a: _streams(*a, impl=impl, n=x.shape[1], **mixing), mixes, scale, base)
    out = _apply_mix._fwd_op(x, mix, impl=impl)
    return ((out, rest, x) if alias else (out, rest)), (x, fn, w, fn_merged, mul, sq, mix, streams_vjp)


def _bwd(residuals, g, *, impl, eps, n_splits, alias: bool, residual_op=None, **mixing):
    x, fn, w, fn_merged, mul, sq, mix, streams_vjp = residuals
    dout, drest, dres = g if alias else (*g, None)
    t, n, h = x.shape
    dmix = _apply_mix.dmix_op(dout, x, mix, impl=impl)
    dmixes, dscale, dbase = streams_vjp((dmix, drest))
    dmul, dsq = _norm_fn._reduce_bwd_op(dmixes, mul, sq, impl=impl, group=n * h, eps=eps)
    dx = (residual_op or residual_grad_op)(dout, x, mix, dmul, dsq, fn_merged, dres, impl=impl)
    dfn = _norm_fn.products_dfn(dmul, x.reshape(t, n * h))
    if w is None:
        return dx, dfn, dscale, dbase, None
    dfn, dw = _norm_fn._merge_bwd_op(dfn, fn, w, impl=impl)
    return dx, dfn, dscale, dbase, dw


def configured(ops) -> TileOp:
    """``residual_grad_op`` as a public function's ``ops`` holds it (with its ``with_config`` fields)."""
    return next((op for op in ops if op.name == residual_grad_op.name), residual_grad_op)


norm_mix_apply_flat = with_vjp(_primal, _fwd, _bwd)
"""``(x [T, n, H] bf16, fn [M, nH], scale, base, norm_weight [nH] | None)`` -> ``(apply_mix output
[T, H] bf16, mhc_pre's (post [T, n, 1], comb [T, n, n]) or ())`` and, with ``alias=True``, x itself
third: a caller that reads the residual only through that alias (``HyperConnection``'s mhc_post)
hands its cotangent to this backward, which adds it in the kernel instead of XLA adding two
``[T, n, H]`` cotangents after it. Static: ``kind`` ("pre" or "head"), ``eps``, ``n_splits``,
``alias`` and the mixes' options; differentiable in every array (module docstring)."""
