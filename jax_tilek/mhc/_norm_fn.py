"""mhc_pre_norm_fn: the RMS-normalised projection of the flattened residual (TileKernels v1 §5.2,
v2.1 §2.7), with ``mhc_fn_normw_merge`` and ``mhc_reduce_partials_and_rmsnorm``.

Per token, with ``xf = flatten(residual[n, H])`` in fp32 (G = nH) and ``F = fn [M, G]`` (times
``norm_weight [G]`` column-wise when given)::

    mixes[j] = (sum_k xf[k] F[j, k]) * rsqrt(sum_k xf[k]² / G + eps)

The path is TileKernels 2.1's: partials of the GEMM ``out_mul_splitted [S, T, M]`` and of the sum of
squares ``sqrsum_splitted [S, T]``, then ``mhc_reduce_partials_and_rmsnorm`` sums the partials in
split order and applies the RMS scale; the reduce/rmsnorm step and the norm-weight merge are TileLang
kernels, forward and backward. By default (``GEMM_PRECISION = "split_bf16"``) the partials are the
``mhc_pre_norm_fn_products`` kernel (:mod:`._products`: one pass over x for the products and the
squares, on bf16 tensor cores with fn in three bf16 parts, fp32-accurate; TileKernels 2.1 runs the
partials in DeepGEMM's TF32 pre-norm GEMM), S chosen from the shape, not ``n_splits`` (which only
changes fp32 rounding; TileKernels 1.0 forces it to 1). Its XLA form, :func:`split_bf16_products`,
is the reference and the path for shapes the kernel does not take (G not a multiple of 64, or
M > 85), there as one partial. With a ``jnp.einsum`` precision instead the partials are the S-split
fp32 einsum (S = ``n_splits`` contiguous slices of ``ceil(G / S)`` columns, the last one short). On
an H100 (2026-12-07) the mHC block forward+backward at 16384 x 4 x 4096 took 4259 us with split_bf16
as XLA's dot, 4322 us with BF16_BF16_F32_X3, 4594 us with X6.

Backward of the reduce (r = the rsqrt, ``out_mul`` the summed products, ``sqrsum`` the summed squares)::

    d out_mul[j] = dout[j] * r
    d sqrsum     = (sum_j dout[j] out_mul[j]) * r / (sqrsum + eps G) / -2

and of the merge ``F' = F w``: ``dF = dF' w``, ``dw = sum over rows of dF' F`` (rows in order). The
partials' backward is XLA's (``dF = d out_mulᵀ x``, ``dx = d out_mul F + 2 x d sqrsum``); JAX adds every
cotangent of the residual (functional accumulation, in place of TileKernels' ``grad_from_mhc_post``
stash).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import functools

import jax
import jax.numpy as jnp

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.mhc import _products
from jax_tilek.mhc._products import bf16_parts
from jax_tilek.mhc._common import BF16, F32, THREADS, check_dtype, check_eps, check_residual, check_shape, n3
from jax_tilek.op import Launch, Rows, TileOp, resolve_impl, uses, with_vjp
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
MAX_SPLITS = 64
GEMM_PRECISION = "split_bf16"  # the partials GEMM: split_bf16_products, or a jnp.einsum precision (autodiff backward)
MAX_COLUMNS = 96


# ---------------------------------------------------------------------------------------------
# The GEMM partials (XLA).


def split_k_partials(x, fn, n_splits: int):
    """``x [T, G]`` fp32, ``fn [M, G]`` fp32 -> ``(out_mul_splitted [S, T, M], sqrsum_splitted [S, T])``:
    slice s holds columns ``[s * c, min((s + 1) * c, G))``, ``c = ceil(G / S)``."""
    t, g = x.shape
    c = -(-g // n_splits)
    pad = c * n_splits - g
    xs = jnp.pad(x, ((0, 0), (0, pad))).reshape(t, n_splits, c)
    fs = jnp.pad(fn, ((0, 0), (0, pad))).reshape(fn.shape[0], n_splits, c)
    mul = jnp.einsum("tsc,msc->stm", xs, fs, precision=GEMM_PRECISION)
    sq = jnp.einsum("tsc,tsc->st", xs, xs, precision="highest")
    return mul, sq


# ---------------------------------------------------------------------------------------------
# References.


def reduce_reference(mul_s, sq_s, *, group: int, eps: float):
    """``(out [T, M], out_mul [T, M], sqrsum [T])``: the partials summed in split order, then scaled."""
    mul, sq = mul_s[0], sq_s[0]
    for s in range(1, mul_s.shape[0]):
        mul, sq = mul + mul_s[s], sq + sq_s[s]
    r = jax.lax.rsqrt(sq / group + eps)
    return mul * r[:, None], mul, sq


def reduce_backward_reference(dout, mul, sq, *, group: int, eps: float):
    """``(d out_mul [T, M], d sqrsum [T])`` (module docstring)."""
    r = jax.lax.rsqrt(sq / group + eps)
    dmul = dout * r[:, None]
    dsq = jnp.sum(dout * mul, axis=-1) * r / (sq + eps * group) / -2.0
    return dmul, dsq


def merge_reference(fn, w):
    return fn * w


def merge_backward_reference(g, fn, w):
    """``(dfn, dw)``: ``dw`` sums the rows in order."""
    dw = g[0] * fn[0]
    for m in range(1, fn.shape[0]):
        dw = dw + g[m] * fn[m]
    return g * w, dw


# ---------------------------------------------------------------------------------------------
# Kernels.


@kernel(pass_configs=PASS_CONFIGS)
def reduce_fwd_kernel(splits: int, columns: int, group: int, eps: float):
    """One thread per token: sums its S partial rows (in order) and scales them."""
    import tilelang.language as T

    S, M = splits, columns
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_reduce_partials_and_rmsnorm_fwd(
        mul_s: T.Tensor((S, TT, M), "float32"),
        sq_s: T.Tensor((S, TT), "float32"),
        out: T.Tensor((TT, M), "float32"),
        mul: T.Tensor((TT, M), "float32"),
        sq: T.Tensor((TT,), "float32"),
    ):
        with T.Kernel(T.ceildiv(TT, THREADS), threads=THREADS) as b:
            acc = T.alloc_local((M,), "float32")
            q = T.alloc_var("float32")
            r = b * THREADS + T.get_thread_binding(0)
            if r < TT:
                q = sq_s[0, r]
                for j in T.unroll(M):
                    acc[j] = mul_s[0, r, j]
                for s in T.serial(S - 1):
                    q = q + sq_s[s + 1, r]
                    for j in T.unroll(M):
                        acc[j] = acc[j] + mul_s[s + 1, r, j]
                rs = T.rsqrt(q / T.float32(group) + T.float32(eps))
                sq[r] = q
                for j in T.unroll(M):
                    mul[r, j] = acc[j]
                    out[r, j] = acc[j] * rs

    return mhc_reduce_partials_and_rmsnorm_fwd


@kernel(pass_configs=PASS_CONFIGS)
def reduce_bwd_kernel(columns: int, group: int, eps: float):
    """One thread per token."""
    import tilelang.language as T

    M = columns
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_reduce_partials_and_rmsnorm_bwd(
        dout: T.Tensor((TT, M), "float32"),
        mul: T.Tensor((TT, M), "float32"),
        sq: T.Tensor((TT,), "float32"),
        dmul: T.Tensor((TT, M), "float32"),
        dsq: T.Tensor((TT,), "float32"),
    ):
        with T.Kernel(T.ceildiv(TT, THREADS), threads=THREADS) as b:
            d = T.alloc_var("float32")
            r = b * THREADS + T.get_thread_binding(0)
            if r < TT:
                rs = T.rsqrt(sq[r] / T.float32(group) + T.float32(eps))
                d = T.float32(0)
                for j in T.unroll(M):
                    dmul[r, j] = dout[r, j] * rs
                    d = d + dout[r, j] * mul[r, j]
                dsq[r] = d * rs / (sq[r] + T.float32(eps * group)) / T.float32(-2)

    return mhc_reduce_partials_and_rmsnorm_bwd


@kernel(pass_configs=PASS_CONFIGS)
def merge_fwd_kernel(rows: int):
    """One thread per column k: ``out[:, k] = fn[:, k] * w[k]``."""
    import tilelang.language as T

    M = rows
    K = T.dynamic("K")

    @T.prim_func
    def mhc_fn_normw_merge_fwd(fn: T.Tensor((M, K), "float32"), w: T.Tensor((K,), "float32"), out: T.Tensor((M, K), "float32")):
        with T.Kernel(T.ceildiv(K, THREADS), threads=THREADS) as b:
            k = b * THREADS + T.get_thread_binding(0)
            if k < K:
                for m in T.unroll(M):
                    out[m, k] = fn[m, k] * w[k]

    return mhc_fn_normw_merge_fwd


@kernel(pass_configs=PASS_CONFIGS)
def merge_bwd_kernel(rows: int):
    """One thread per column k: ``dfn[:, k] = g[:, k] w[k]``, ``dw[k] = sum_m g[m, k] fn[m, k]``."""
    import tilelang.language as T

    M = rows
    K = T.dynamic("K")

    @T.prim_func
    def mhc_fn_normw_merge_bwd(
        g: T.Tensor((M, K), "float32"),
        fn: T.Tensor((M, K), "float32"),
        w: T.Tensor((K,), "float32"),
        dfn: T.Tensor((M, K), "float32"),
        dw: T.Tensor((K,), "float32"),
    ):
        with T.Kernel(T.ceildiv(K, THREADS), threads=THREADS) as b:
            acc = T.alloc_var("float32")
            k = b * THREADS + T.get_thread_binding(0)
            if k < K:
                acc = g[0, k] * fn[0, k]
                dfn[0, k] = g[0, k] * w[k]
                for m in T.unroll(M - 1):
                    acc = acc + g[m + 1, k] * fn[m + 1, k]
                    dfn[m + 1, k] = g[m + 1, k] * w[k]
                dw[k] = acc

    return mhc_fn_normw_merge_bwd


_reduce_fwd_op = TileOp(
    name="mhc_reduce_partials_and_rmsnorm_fwd", operands=("mul_s", "sq_s"), results=("out", "mul", "sq"), reference=reduce_reference,
    launch=lambda mul_s, sq_s, *, group, eps: Launch(
        kernel=reduce_fwd_kernel, params=dict(splits=mul_s.shape[0], columns=mul_s.shape[2], group=group, eps=float(eps))),
)  # fmt: skip

_reduce_bwd_op = TileOp(
    name="mhc_reduce_partials_and_rmsnorm_bwd", operands=("dout", "mul", "sq"), results=("dmul", "dsq"),
    reference=reduce_backward_reference, rows=Rows(("dout", "mul", "sq"), ("dmul", "dsq")),
    launch=lambda dout, mul, sq, *, group, eps: Launch(kernel=reduce_bwd_kernel, params=dict(columns=mul.shape[1], group=group, eps=float(eps))),
)  # fmt: skip

_merge_fwd_op = TileOp(
    name="mhc_fn_normw_merge_fwd", operands=("fn", "w"), results=("out",), reference=merge_reference,
    launch=lambda fn, w: Launch(kernel=merge_fwd_kernel, params=dict(rows=fn.shape[0])),
)  # fmt: skip

_merge_bwd_op = TileOp(
    name="mhc_fn_normw_merge_bwd", operands=("g", "fn", "w"), results=("dfn", "dw"), reference=merge_backward_reference,
    launch=lambda g, fn, w: Launch(kernel=merge_bwd_kernel, params=dict(rows=fn.shape[0])),
)  # fmt: skip


def _reduce_primal(mul_s, sq_s, *, impl=None, group, eps):
    return _reduce_fwd_op(mul_s, sq_s, impl=impl, group=group, eps=eps)[0]


def _reduce_fwd(mul_s, sq_s, *, impl=None, group, eps):
    out, mul, sq = _reduce_fwd_op(mul_s, sq_s, impl=impl, group=group, eps=eps)
    return out, (mul, sq, mul_s.shape[0])


def _reduce_bwd(res, g, *, impl=None, group, eps):
    mul, sq, s = res
    dmul, dsq = _reduce_bwd_op(g, mul, sq, impl=impl, group=group, eps=eps)
    return jnp.broadcast_to(dmul, (s, *dmul.shape)), jnp.broadcast_to(dsq, (s, *dsq.shape))


reduce_flat = with_vjp(_reduce_primal, _reduce_fwd, _reduce_bwd)


def _merge_primal(fn, w, *, impl=None):
    return _merge_fwd_op(fn, w, impl=impl)


def _merge_fwd(fn, w, *, impl=None):
    return _merge_primal(fn, w, impl=impl), (fn, w)


def _merge_bwd(res, g, *, impl=None):
    return _merge_bwd_op(g, *res, impl=impl)


merge_flat = with_vjp(_merge_primal, _merge_fwd, _merge_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def split_bf16_products(x, fn, splits: int = 1):
    """``x [T, G]`` bf16, ``fn [M, G]`` fp32 -> ``(mul [T, S, M], sq [T, S])`` fp32: per split of G
    (S contiguous slices) ``x fnᵀ`` and the sum of ``x²``, on bf16 tensor cores as XLA runs them
    (``_products.products_reference``, the kernel's definition).

    x is exact in bf16, so ``fn`` split into three bf16 parts gives fp32-accurate products in one dot of
    N = 3M that reads x once; no fp32 copy of x. The backward splits the cotangent in three parts for
    ``dfn`` (fp32-accurate) and takes the leading terms to 16 bits for ``dx`` (which ends in bf16)."""
    return _products.products_reference(x, _products.fn_parts(fn), rows=fn.shape[0], splits=splits)


def _split_fwd(x, fn, splits):
    return split_bf16_products(x, fn, splits), (x, fn)


def _split_bwd(splits, res, g):
    (x, fn), (dmul, dsq) = res, g
    (t, cols), m = x.shape, fn.shape[0]
    x3 = x.reshape(t, splits, cols // splits)
    d_hi, d_mid, _ = bf16_parts(dmul, 3)
    f_hi, f_lo = bf16_parts(fn, 2)
    rhs = jnp.concatenate([f_hi, f_lo, f_hi]).reshape(3 * m, splits, cols // splits)
    dx = jnp.einsum("tsp,psc->tsc", jnp.concatenate([d_hi, d_hi, d_mid], axis=-1), rhs, preferred_element_type=jnp.float32)
    dx = (dx + 2.0 * x3.astype(jnp.float32) * dsq[..., None]).astype(x.dtype).reshape(t, cols)
    return dx, _split_dfn(dmul, x3)


def _split_dfn(dmul, x3):
    """``dmul [T, S, M]`` fp32, ``x3 [T, S, C]`` bf16 -> ``dfn [M, S C]``, dmul in three bf16 parts."""
    m = dmul.shape[-1]
    dfn = jnp.einsum("tsp,tsc->psc", jnp.concatenate(bf16_parts(dmul, 3), axis=-1), x3, preferred_element_type=jnp.float32)
    return ((dfn[:m] + dfn[m : 2 * m]) + dfn[2 * m :]).reshape(m, -1)


split_bf16_products.defvjp(_split_fwd, _split_bwd)


def products(x, fn, n_splits: int, *, impl=None):
    """The GEMM partials ``(out_mul_splitted [S, T, M], sqrsum_splitted [S, T])`` of ``x [T, G]`` bf16
    by ``fn [M, G]`` fp32 as ``GEMM_PRECISION`` computes them, with no VJP. split_bf16: the
    ``mhc_pre_norm_fn_products`` kernel where it takes the shape (S from the shape,
    :mod:`._products`; XLA's form of it with ``impl="xla"``), else one partial of XLA's dot; an
    einsum precision: ``n_splits`` fp32 einsum slices."""
    if GEMM_PRECISION != "split_bf16":
        return split_k_partials(x.astype(jnp.float32), fn, n_splits)
    (t, g), m = x.shape, fn.shape[0]
    kernel = _products.takes(g, m)
    splits = _products.split_count(t, g) if kernel else 1
    if kernel and resolve_impl(impl, _products.products_op.name) != "xla":
        mul, sq = _products.products_op(x, _products.fn_parts(fn), rows=m, splits=splits, impl=impl)
    else:
        mul, sq = split_bf16_products(x, fn, splits)
    return jnp.moveaxis(mul, 1, 0), sq.T


def products_dfn(dmul, x):
    """``dmulᵀ x [M, G]`` fp32 for ``dmul [T, M]`` fp32, ``x [T, G]`` bf16: split_bf16 takes dmul in
    three bf16 parts (fp32-accurate), an einsum precision takes x in fp32."""
    if GEMM_PRECISION == "split_bf16":
        return _split_dfn(dmul[:, None], x[:, None])
    return jnp.einsum("tm,tg->mg", dmul, x.astype(jnp.float32), precision=GEMM_PRECISION)


def products_backward(dmul, dsq, x, fn):
    """The partials' VJP for one cotangent of every split: ``(dx [T, G] bf16, dfn [M, G] fp32)``."""
    if GEMM_PRECISION == "split_bf16":
        return _split_bwd(1, (x, fn), (dmul[:, None], dsq[:, None]))
    dx = jnp.einsum("tm,mg->tg", dmul, fn, precision=GEMM_PRECISION) + 2.0 * x.astype(jnp.float32) * dsq[:, None]
    return dx.astype(x.dtype), products_dfn(dmul, x)


def norm_fn_fwd(x, fn, w, *, impl, eps: float, n_splits: int):
    """``(mixes [T, M], (x, fn, w, fn merged with w, out_mul [T, M], sqrsum [T]))``: the forward and its
    residuals, also the first step of mhc_pre's fused chain (:mod:`._residual_grad`)."""
    t, n, h = x.shape
    fn_merged = fn if w is None else _merge_fwd_op(fn, w, impl=impl)
    mul_s, sq_s = products(x.reshape(t, n * h), fn_merged, n_splits, impl=impl)
    out, mul, sq = _reduce_fwd_op(mul_s, sq_s, impl=impl, group=n * h, eps=eps)
    return out, (x, fn, w, fn_merged, mul, sq)


def _norm_fn_bwd(res, g, *, impl, eps: float, n_splits: int):
    x, fn, w, fn_merged, mul, sq = res
    t, n, h = x.shape
    dmul, dsq = _reduce_bwd_op(g, mul, sq, impl=impl, group=n * h, eps=eps)
    dx, dfn = products_backward(dmul, dsq, x.reshape(t, n * h), fn_merged)
    if w is None:
        return dx.reshape(x.shape), dfn, None
    dfn, dw = _merge_bwd_op(dfn, fn, w, impl=impl)
    return dx.reshape(x.shape), dfn, dw


norm_fn_flat = with_vjp(lambda *a, **k: norm_fn_fwd(*a, **k)[0], norm_fn_fwd, _norm_fn_bwd)
"""``(x [T, n, H] bf16, fn [M, nH], norm_weight [nH] | None)`` -> mixes ``[T, M]`` fp32, differentiable
in all three; static ``impl``, ``eps``, ``n_splits``."""


def check_norm_fn(op: str, residual, fn, norm_weight, eps, n_splits, mhc_mult=None, rows=None):
    residual, n, h = check_residual(op, residual, mhc_mult)
    fn = checks.as_array(op, "fn", fn)
    check_dtype(op, "fn", fn, F32)
    m = fn.shape[0] if fn.ndim == 2 else -1
    if fn.ndim != 2 or fn.shape[1] != n * h or (rows is not None and m != rows) or not 1 <= m <= MAX_COLUMNS:
        want = f"[{rows}, {n * h}]" if rows is not None else f"[M <= {MAX_COLUMNS}, n*H = {n * h}]"
        raise ValueError(f"{op}: fn must be {want} for a residual of n = {n}, H = {h}, got shape {fn.shape}")
    w = checks.as_array(op, "norm_weight", norm_weight, optional=True)
    if w is not None:
        check_dtype(op, "norm_weight", w, F32)
        check_shape(op, "norm_weight", w, (n * h,))
    eps = check_eps(op, "norm_eps", eps)
    s = checks.static_int(op, "n_splits", n_splits)
    if not 1 <= s <= MAX_SPLITS:
        raise ValueError(f"{op}: n_splits must be in [1, {MAX_SPLITS}], got {s}")
    return residual, fn, w, n, h, eps, s


def _case(lead, h, n=4, weight=False, n_splits=16, **options) -> ArgSpec:
    args = (
        jax.ShapeDtypeStruct((*lead, n, h), BF16), jax.ShapeDtypeStruct((n3(n), n * h), F32),
        jax.ShapeDtypeStruct((n * h,), F32) if weight else None, 1e-6,
    )  # fmt: skip
    name = f"{'x'.join(map(str, lead))}x{h}_n{n}_s{n_splits}" + ("_w" if weight else "")
    return ArgSpec(name, args, dict(n_splits=n_splits), make=_make(args), tolerance=1e-3, launches=(2 if weight else 1) + _products.takes(n * h, n3(n)), **options)


def _make(structs):
    def make(rng, *_):
        from jax_tilek.testing import random_array

        res = random_array(rng, structs[0].shape, BF16)
        fn = (rng.standard_normal(structs[1].shape) * 1e-2).astype("float32")
        w = None if structs[2] is None else (1 + 0.1 * rng.standard_normal(structs[2].shape)).astype("float32")
        return res, fn, w, structs[3]

    return make


ARG_SPECS = (
    _case((2, 8), 256),
    _case((13,), 320, weight=True),
    _case((5,), 64, n=2, n_splits=1),
    _case((4096,), 7168, weight=True, bench=True),
    _case((16384,), 4096, bench=True),
)


@uses(_products.products_op, _reduce_fwd_op, _reduce_bwd_op, _merge_fwd_op, _merge_bwd_op, cases=ARG_SPECS, differentiable=True)
def mhc_pre_norm_fn(
    residual: jax.Array, mhc_fn: jax.Array, mhc_norm_weight: jax.Array | None, mhc_norm_eps: float, n_splits: int = 16,
    *, impl=None, ops,
) -> jax.Array:  # fmt: skip
    """The projections ``[..., M]`` fp32 of the RMS-normalised flattened ``residual [..., n, H]`` bf16
    by ``mhc_fn [M, nH]`` fp32 (M = n(n+2) for ``mhc_pre``, at most 96), optionally times
    ``mhc_norm_weight [nH]`` fp32 (module docstring). Differentiable in all three arrays."""
    residual, fn, w, n, h, eps, s = check_norm_fn("mhc_pre_norm_fn", residual, mhc_fn, mhc_norm_weight, mhc_norm_eps, n_splits)
    lead = residual.shape[:-2]
    out = norm_fn_flat(residual.reshape(-1, n, h), fn, w, impl=impl, eps=eps, n_splits=s)
    return out.reshape(*lead, fn.shape[0])


def _merge_case(m, k, **options) -> ArgSpec:
    return ArgSpec(f"{m}x{k}", (jax.ShapeDtypeStruct((m, k), F32), jax.ShapeDtypeStruct((k,), F32)), tolerance=1e-6, **options)


MERGE_SPECS = (_merge_case(24, 1024), _merge_case(8, 200), _merge_case(24, 28672, bench=True))


@uses(_merge_fwd_op, _merge_bwd_op, cases=MERGE_SPECS, differentiable=True)
def mhc_fn_normw_merge(mhc_fn: jax.Array, mhc_norm_weight: jax.Array, *, impl=None, ops) -> jax.Array:
    """``mhc_fn [M, K] * mhc_norm_weight [K]`` (fp32, column-wise). Differentiable: ``dfn = g w``,
    ``dw = sum over rows of g fn`` (TileKernels adds them into ``main_grad`` in place; here they are returned)."""
    name = "mhc_fn_normw_merge"
    fn, w = checks.as_array(name, "mhc_fn", mhc_fn), checks.as_array(name, "mhc_norm_weight", mhc_norm_weight)
    check_dtype(name, "mhc_fn", fn, F32)
    check_dtype(name, "mhc_norm_weight", w, F32)
    if fn.ndim != 2 or not 1 <= fn.shape[0] <= MAX_COLUMNS:
        raise ValueError(f"{name}: mhc_fn must be [M <= {MAX_COLUMNS}, K], got shape {fn.shape}")
    check_shape(name, "mhc_norm_weight", w, (fn.shape[1],))
    return merge_flat(fn, w, impl=impl)


def _reduce_case(s, t, m, **options) -> ArgSpec:
    args = (jax.ShapeDtypeStruct((s, t, m), F32), jax.ShapeDtypeStruct((s, t), F32), 1024, 1e-6)

    def make(rng, *structs):
        return (rng.standard_normal((s, t, m)).astype("float32"), (rng.random((s, t)) * 100 + 1).astype("float32"), 1024, 1e-6)

    return ArgSpec(f"s{s}_{t}x{m}", args, make=make, tolerance=1e-5, **options)


REDUCE_SPECS = (_reduce_case(16, 64, 24), _reduce_case(1, 7, 4), _reduce_case(16, 16384, 24, bench=True))


@uses(_reduce_fwd_op, _reduce_bwd_op, cases=REDUCE_SPECS, differentiable=True)
def mhc_reduce_partials_and_rmsnorm(
    out_mul_splitted: jax.Array, sqrsum_splitted: jax.Array, rms_group_size: int, rms_eps: float, *, impl=None, ops
) -> jax.Array:
    """``out[t, j] = (sum_s mul[s, t, j]) * rsqrt((sum_s sq[s, t]) / rms_group_size + rms_eps)`` from split-K
    partials ``out_mul_splitted [S, T, M]`` and ``sqrsum_splitted [S, T]`` (fp32), splits summed in order.
    Differentiable in both."""
    name = "mhc_reduce_partials_and_rmsnorm"
    mul_s, sq_s = checks.as_array(name, "out_mul_splitted", out_mul_splitted), checks.as_array(name, "sqrsum_splitted", sqrsum_splitted)
    check_dtype(name, "out_mul_splitted", mul_s, F32)
    check_dtype(name, "sqrsum_splitted", sq_s, F32)
    if mul_s.ndim != 3 or not 1 <= mul_s.shape[0] <= MAX_SPLITS or not 1 <= mul_s.shape[2] <= MAX_COLUMNS:
        raise ValueError(f"{name}: out_mul_splitted must be [S <= {MAX_SPLITS}, T, M <= {MAX_COLUMNS}], got shape {mul_s.shape}")
    check_shape(name, "sqrsum_splitted", sq_s, mul_s.shape[:2])
    group = checks.static_int(name, "rms_group_size", rms_group_size)
    if group < 1:
        raise ValueError(f"{name}: rms_group_size must be positive, got {group}")
    return reduce_flat(mul_s, sq_s, impl=impl, group=group, eps=check_eps(name, "rms_eps", rms_eps))
