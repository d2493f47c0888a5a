"""mhc_post: write the sub-layer's output back into the n streams (TileKernels v1 §5.6).

Forward, per token, in fp32 (TileKernels' torch reference order: the comb term first, summed over the
source stream m = 0, 1, ..., then the post term added)::

    new[o, h] = bf16(x[h] * post[o] + sum_m comb[m, o] * residual[m, h])

The first index of comb is the source stream. Backward (dnew = the cotangent of new)::

    dresidual[i, h] = bf16(sum_o comb[i, o] * dnew[o, h])
    dcomb[i, o]     = sum_h residual[i, h] * dnew[o, h]       (fp32)
    dpost[o]        = sum_h x[h] * dnew[o, h]                 (fp32)
    dx[h]           = bf16(sum_o post[o] * dnew[o, h])

TileKernels stashes dresidual on the residual's storage for later in-place accumulation; here it is
returned and JAX adds the residual's cotangents.

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


def post_f32(x, residual, post, comb):
    """The fp32 values before rounding: ``x [T, H]``, ``residual [T, n, H]``, ``post [T, n, 1]``, ``comb [T, n, n]``."""
    n = residual.shape[1]
    res = residual.astype(jnp.float32)
    xf = x.astype(jnp.float32)  # once: JAX's transpose then sums x's cotangents in fp32, as the kernel does
    outs = []
    for o in range(n):
        term = comb[:, 0, o, None] * res[:, 0]
        for m in range(1, n):
            term = term + comb[:, m, o, None] * res[:, m]
        outs.append(xf * post[:, o] + term)
    return jnp.stack(outs, axis=1)


def post_reference(x, residual, post, comb):
    return post_f32(x, residual, post, comb).astype(residual.dtype)


def post_backward_reference(dnew, x, residual, post, comb):
    """``(dx [T, H] bf16, dresidual [T, n, H] bf16, dpost [T, n, 1], dcomb [T, n, n])``."""
    d = dnew.astype(jnp.float32)
    res = residual.astype(jnp.float32)
    hi = "highest"
    dres = jnp.einsum("tio,toh->tih", comb, d, precision=hi).astype(residual.dtype)
    dcomb = jnp.einsum("tih,toh->tio", res, d, precision=hi)
    dpost = jnp.einsum("th,toh->to", x.astype(jnp.float32), d, precision=hi)[..., None]
    dx = jnp.einsum("to,toh->th", post[..., 0], d, precision=hi).astype(x.dtype)
    return dx, dres, dpost, dcomb


# ---------------------------------------------------------------------------------------------
# Kernels.


@kernel(pass_configs=PASS_CONFIGS)
def post_fwd_kernel(mult: int, hidden: int):
    """One thread per 16-byte vector of a token's row: loads x and the n residual vectors, writes the
    n new vectors."""
    import tilelang.language as T

    N, V = mult, hidden // VEC
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_post_fwd(
        x: T.Tensor((TT, hidden), "bfloat16"),
        residual: T.Tensor((TT, N, hidden), "bfloat16"),
        post: T.Tensor((TT, N, 1), "float32"),
        comb: T.Tensor((TT, N, N), "float32"),
        out: T.Tensor((TT, N, hidden), "bfloat16"),
    ):
        with T.Kernel(T.ceildiv(TT * V, THREADS), threads=THREADS) as b:
            xv = T.alloc_local((VEC,), "bfloat16")
            rv = T.alloc_local((N * VEC,), "bfloat16")
            acc = T.alloc_local((VEC,), "float32")
            ov = T.alloc_local((VEC,), "bfloat16")
            f = b * THREADS + T.get_thread_binding(0)
            r = f // V
            v = f % V
            if r < TT:
                for j in T.vectorized(VEC):
                    xv[j] = x[r, v * VEC + j]
                for m in T.unroll(N):
                    for j in T.vectorized(VEC):
                        rv[m * VEC + j] = residual[r, m, v * VEC + j]
                for o in T.unroll(N):
                    for j in T.unroll(VEC):
                        acc[j] = comb[r, 0, o] * T.Cast("float32", rv[j])
                    for m in T.unroll(N - 1):
                        for j in T.unroll(VEC):
                            acc[j] = acc[j] + comb[r, m + 1, o] * T.Cast("float32", rv[(m + 1) * VEC + j])
                    for j in T.unroll(VEC):
                        ov[j] = T.Cast("bfloat16", T.Cast("float32", xv[j]) * post[r, o, 0] + acc[j])
                    for j in T.vectorized(VEC):
                        out[r, o, v * VEC + j] = ov[j]

    return mhc_post_fwd


@kernel(pass_configs=PASS_CONFIGS)
def post_bwd_kernel(mult: int, hidden: int):
    """One warp per token: lanes take vectors ``lane, lane + 32, ...``, write dresidual and dx, and
    keep n² + n fp32 sums (dcomb, dpost) that a butterfly over the warp completes."""
    import tilelang.language as T

    N, V = mult, hidden // VEC
    NN = N * N
    KV = -(-V // 32)
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_post_bwd(
        dnew: T.Tensor((TT, N, hidden), "bfloat16"),
        x: T.Tensor((TT, hidden), "bfloat16"),
        residual: T.Tensor((TT, N, hidden), "bfloat16"),
        post: T.Tensor((TT, N, 1), "float32"),
        comb: T.Tensor((TT, N, N), "float32"),
        dx: T.Tensor((TT, hidden), "bfloat16"),
        dresidual: T.Tensor((TT, N, hidden), "bfloat16"),
        dpost: T.Tensor((TT, N, 1), "float32"),
        dcomb: T.Tensor((TT, N, N), "float32"),
    ):
        with T.Kernel(T.ceildiv(TT, WARPS), threads=THREADS) as b:
            dv = T.alloc_local((N * VEC,), "float32")
            xv = T.alloc_local((VEC,), "bfloat16")
            rv = T.alloc_local((VEC,), "bfloat16")
            ld = T.alloc_local((VEC,), "bfloat16")
            ov = T.alloc_local((VEC,), "bfloat16")
            cw = T.alloc_local((NN,), "float32")
            pw = T.alloc_local((N,), "float32")
            acc = T.alloc_local((NN + N,), "float32")
            s = T.alloc_local((VEC,), "float32")
            tid = T.get_thread_binding(0)
            lane = tid % 32
            r = b * WARPS + tid // 32
            if r < TT:
                for k in T.unroll(NN):
                    cw[k] = comb[r, k // N, k % N]
                for o in T.unroll(N):
                    pw[o] = post[r, o, 0]
                for k in T.unroll(NN + N):
                    acc[k] = T.float32(0)
                for k in T.serial(KV):
                    v = lane + k * 32
                    if v < V:
                        for o in T.unroll(N):
                            for j in T.vectorized(VEC):
                                ld[j] = dnew[r, o, v * VEC + j]
                            for j in T.unroll(VEC):
                                dv[o * VEC + j] = T.Cast("float32", ld[j])
                        for j in T.vectorized(VEC):
                            xv[j] = x[r, v * VEC + j]
                        # dx and dpost
                        for j in T.unroll(VEC):
                            s[j] = pw[0] * dv[j]
                        for o in T.unroll(N - 1):
                            for j in T.unroll(VEC):
                                s[j] = s[j] + pw[o + 1] * dv[(o + 1) * VEC + j]
                        for j in T.unroll(VEC):
                            ov[j] = T.Cast("bfloat16", s[j])
                        for j in T.vectorized(VEC):
                            dx[r, v * VEC + j] = ov[j]
                        for o in T.unroll(N):
                            for j in T.unroll(VEC):
                                acc[NN + o] = acc[NN + o] + T.Cast("float32", xv[j]) * dv[o * VEC + j]
                        # dresidual and dcomb
                        for i in T.unroll(N):
                            for j in T.vectorized(VEC):
                                rv[j] = residual[r, i, v * VEC + j]
                            for j in T.unroll(VEC):
                                s[j] = cw[i * N] * dv[j]
                            for o in T.unroll(N - 1):
                                for j in T.unroll(VEC):
                                    s[j] = s[j] + cw[i * N + o + 1] * dv[(o + 1) * VEC + j]
                            for j in T.unroll(VEC):
                                ov[j] = T.Cast("bfloat16", s[j])
                            for j in T.vectorized(VEC):
                                dresidual[r, i, v * VEC + j] = ov[j]
                            for o in T.unroll(N):
                                for j in T.unroll(VEC):
                                    acc[i * N + o] = acc[i * N + o] + T.Cast("float32", rv[j]) * dv[o * VEC + j]
                for k in T.unroll(NN + N):
                    for q in T.unroll(5):
                        acc[k] = acc[k] + T.shfl_xor(acc[k], 16 >> q)
                if lane == 0:
                    for k in T.unroll(NN):
                        dcomb[r, k // N, k % N] = acc[k]
                    for o in T.unroll(N):
                        dpost[r, o, 0] = acc[NN + o]

    return mhc_post_bwd


def _params(residual):
    return dict(mult=residual.shape[1], hidden=residual.shape[2])


_fwd_op = TileOp(
    name="mhc_post_fwd", operands=("x", "residual", "post", "comb"), results=("out",), reference=post_reference,
    rows=Rows(("x", "residual", "post", "comb"), ("out",)),
    launch=lambda x, residual, post, comb: Launch(kernel=post_fwd_kernel, params=_params(residual)),
)  # fmt: skip

_bwd_op = TileOp(
    name="mhc_post_bwd", operands=("dnew", "x", "residual", "post", "comb"), results=("dx", "dresidual", "dpost", "dcomb"),
    reference=post_backward_reference, rows=Rows(("dnew", "x", "residual", "post", "comb"), ("dx", "dresidual", "dpost", "dcomb")),
    launch=lambda dnew, x, residual, post, comb: Launch(kernel=post_bwd_kernel, params=_params(residual)),
)  # fmt: skip


def _primal(x, residual, post, comb, *, impl=None):
    return _fwd_op(x, residual, post, comb, impl=impl)


def _fwd(x, residual, post, comb, *, impl=None):
    return _primal(x, residual, post, comb, impl=impl), (x, residual, post, comb)


def _bwd(res, g, *, impl=None):
    return _bwd_op(g, *res, impl=impl)


post_flat = with_vjp(_primal, _fwd, _bwd)


def _case(lead, h, n=4, **options) -> ArgSpec:
    args = (
        jax.ShapeDtypeStruct((*lead, h), BF16), jax.ShapeDtypeStruct((*lead, n, h), BF16),
        jax.ShapeDtypeStruct((*lead, n, 1), F32), jax.ShapeDtypeStruct((*lead, n, n), F32),
    )  # fmt: skip
    return ArgSpec(f"{'x'.join(map(str, lead))}x{h}_n{n}", args, tolerance=1e-2, **options)


ARG_SPECS = (
    _case((2, 8), 1280),
    _case((3,), 256, n=2),
    _case((5,), 64, n=8),
    _case((0,), 128),
    _case((4096,), 7168, bench=True),
    _case((16384,), 4096, bench=True),
)


def check_post(op: str, x, residual, post_layer_mix, comb_res_mix):
    residual, n, h = check_residual(op, residual)
    lead = residual.shape[:-2]
    x = checks.as_array(op, "x", x)
    check_dtype(op, "x", x, BF16)
    check_shape(op, "x", x, (*lead, h))
    post = checks.as_array(op, "post_layer_mix", post_layer_mix)
    comb = checks.as_array(op, "comb_res_mix", comb_res_mix)
    for k, v, shape in (("post_layer_mix", post, (*lead, n, 1)), ("comb_res_mix", comb, (*lead, n, n))):
        check_dtype(op, k, v, F32)
        check_shape(op, k, v, shape)
    return x, residual, post, comb, n, h


@uses(_fwd_op, _bwd_op, cases=ARG_SPECS, differentiable=True)
def mhc_post(x: jax.Array, residual: jax.Array, post_layer_mix: jax.Array, comb_res_mix: jax.Array, *, impl=None, ops) -> jax.Array:
    """The new residual ``[..., n, H]`` bf16 from the sub-layer output ``x [..., H]`` bf16, the old
    ``residual [..., n, H]`` bf16, ``post_layer_mix [..., n, 1]`` and ``comb_res_mix [..., n, n]`` fp32
    (module docstring). Differentiable in all four (one backward kernel)."""
    x, residual, post, comb, n, h = check_post("mhc_post", x, residual, post_layer_mix, comb_res_mix)
    lead = residual.shape[:-2]
    out = post_flat(x.reshape(-1, h), residual.reshape(-1, n, h), post.reshape(-1, n, 1), comb.reshape(-1, n, n), impl=impl)
    return out.reshape(*lead, n, h)
