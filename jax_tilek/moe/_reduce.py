"""reduce_fused: sum the fused (expert-major) rows of each token back into its row (TileKernels v1 §1.12).

``out[t] = cast((Σ_k x[pos_k] · s_k) · sf)`` over the slots with ``pos_k = token_topk_to_pos[t, k]`` in
``[0, P)``, ``s_k = w[t, k] · x_sf[pos_k]`` (each factor optional, default 1). The order is that of
TileKernels' torch reference: fp32 accumulator starting at 0; for k = 0 .. K-1, ``s = w`` (or 1), then
``s = s · x_sf[pos]`` (one rounding), then ``acc = fma(float(x[pos]), s, acc)`` (one rounding: the
reference's ``torch.compile``'d ``a * b + c``, the kernel's FMA); then ``acc · sf[0]`` (one rounding) and a
plain cast to the output dtype (bf16/fp32 round to nearest even; float8_e4m3fn as XLA casts:
round to nearest even, overflow to NaN, as torch's ``.to(float8_e4m3fn)``).

Custom VJP: the cotangent of x is ``expand_to_fused`` of the output's, scaled per row by ``s``.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, View, resolve_impl, uses, with_vjp
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True}
PRELUDE = device.prelude(device.E4M3_NOSAT, device.E4M3_TO_FLOAT)
THREADS = 128
UNROLL = 2  # 16-byte input vectors per thread and slot
IN_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn)
MAX_FLAT = 2**31 - 2**20
_F32 = np.float32


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """fp32 ``a · b + c`` rounded once (``jax_tilek.swiglu.fma_f32``, exact for ``|a|, |b| < 2^100`` and
    products that are zero or above 2^-100); infinities and NaN of the product pass through as ``p + c``."""
    from jax_tilek.swiglu import fma_f32

    p = a * b
    ok = jnp.isfinite(p) & (jnp.abs(a) < _F32(2.0**100)) & (jnp.abs(b) < _F32(2.0**100))
    return jnp.where(ok, fma_f32(jnp.where(ok, a, 0), jnp.where(ok, b, 0), c), p + c)


def _gather(values: jax.Array, pos: jax.Array) -> jax.Array:
    """``values[pos]`` along axis 0, zeros where ``pos`` is outside ``[0, len(values))``."""
    n = values.shape[0]
    return values.at[jnp.where((pos >= 0) & (pos < n), pos, n)].get(mode="fill", fill_value=0)


def _scales(topk_weights, token_topk_to_pos, x_sf, p: int) -> jax.Array:
    """``s[t, k] = w[t, k] · x_sf[pos]`` (each factor 1 when absent), fp32 ``[T, K]``."""
    s = jnp.ones(token_topk_to_pos.shape, jnp.float32) if topk_weights is None else topk_weights
    if x_sf is not None:
        s = s * _gather(x_sf, token_topk_to_pos)
    return s


def _accumulate(x, topk_weights, token_topk_to_pos, x_sf) -> jax.Array:
    p, h = x.shape
    t, k = token_topk_to_pos.shape
    s = _scales(topk_weights, token_topk_to_pos, x_sf, p)

    def add_slot(j, acc):
        pos = token_topk_to_pos[:, j]
        valid = ((pos >= 0) & (pos < p))[:, None]
        return jnp.where(valid, fma(_gather(x, pos).astype(jnp.float32), jax.lax.dynamic_slice_in_dim(s, j, 1, 1), acc), acc)

    # A loop, not K unrolled copies: XLA:CPU of jaxlib 0.11.2 did not finish compiling six unrolled
    # emulated FMAs (bfloat16 rows, K = 6) within 40 s on an H100 machine.
    return jax.lax.fori_loop(0, k, add_slot, jnp.zeros((t, h), jnp.float32))


def _reference(x, topk_weights, token_topk_to_pos, x_sf, sf, *, out_dtype):
    acc = _accumulate(x, topk_weights, token_topk_to_pos, x_sf)
    if sf is not None:
        acc = acc * sf[0]
    return acc.astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# The kernel.


def _kernel_dtype(dtype) -> str:
    """Float8 travels as its bytes (uint8) and is converted by the prelude's helpers."""
    return "uint8" if np.dtype(dtype) == np.dtype(jnp.float8_e4m3fn) else np.dtype(dtype).name


@kernel(pass_configs=PASS_CONFIGS)
def reduce_kernel(num_topk: int, in_dtype: str, out_dtype: str, has_weights: bool, has_x_sf: bool, has_sf: bool):
    """Flat over (token, chunk of one 16-byte input vector), ``UNROLL`` chunks per thread, consecutive
    threads on consecutive chunks (coalesced; a CTA spans several tokens when rows are short). A thread
    reads its token's K positions and weights (L1 broadcasts), then for each valid slot in order loads
    its chunk of ``x[pos]`` as one 16-byte vector and FMAs it into fp32 registers."""
    import tilelang.language as T

    K = num_topk
    in_bytes = np.dtype(jnp.float8_e4m3fn if in_dtype == "float8_e4m3fn" else in_dtype).itemsize
    VEC = 16 // in_bytes
    span = THREADS * UNROLL
    in_k, out_k = _kernel_dtype(in_dtype), _kernel_dtype(out_dtype)
    N, P, H = T.dynamic("N, P, H")
    chunks = H // VEC

    def load(v):
        if in_dtype == "float8_e4m3fn":
            return T.call_extern("float32", "tilek_e4m3_to_float", v)
        return T.Cast("float32", v)

    def store(a):
        if out_dtype == "float8_e4m3fn":
            return T.call_extern("uint8", "tilek_e4m3_nosat", a)
        return T.Cast(out_k, a)

    @T.prim_func
    def reduce_fused(
        x: T.Tensor((P, H), in_k),
        topk_weights: T.Tensor((N, K), "float32"),
        token_topk_to_pos: T.Tensor((N, K), "int32"),
        x_sf: T.Tensor((P,), "float32"),
        sf: T.Tensor((1,), "float32"),
        out: T.Tensor((N, H), out_k),
    ):
        with T.Kernel(T.ceildiv(N * chunks, span), threads=THREADS, prelude=PRELUDE) as b:
            T.assume(H % VEC == 0)
            acc = T.alloc_local((UNROLL, VEC), "float32")
            xv = T.alloc_local((VEC,), in_k)
            ov = T.alloc_local((VEC,), out_k)
            s = T.alloc_var("float32")
            tid = T.get_thread_binding(0)
            for u in T.unroll(UNROLL):
                f = (b * UNROLL + u) * THREADS + tid
                r = f // chunks
                c = f % chunks
                if r < N:
                    for j in T.unroll(VEC):
                        acc[u, j] = T.float32(0)
                    for k in T.unroll(K):
                        pos = token_topk_to_pos[r, k]
                        if T.And(pos >= 0, pos < P):
                            s = T.float32(1)
                            if has_weights:
                                s = topk_weights[r, k]
                            if has_x_sf:
                                s = T.ieee_mul(s, x_sf[pos])
                            for j in T.vectorized(VEC):
                                xv[j] = x[pos, c * VEC + j]
                            for j in T.unroll(VEC):
                                acc[u, j] = T.call_extern("float32", "__fmaf_rn", load(xv[j]), s, acc[u, j])
                    for j in T.unroll(VEC):
                        if has_sf:
                            ov[j] = store(T.ieee_mul(acc[u, j], sf[0]))
                        else:
                            ov[j] = store(acc[u, j])
                    for j in T.vectorized(VEC):
                        out[r, c * VEC + j] = ov[j]

    return reduce_fused


def _launch(x, topk_weights, token_topk_to_pos, x_sf, sf, *, out_dtype) -> Launch:
    p, h = x.shape
    t = token_topk_to_pos.shape[0]
    views = {}
    if x.dtype == jnp.float8_e4m3fn:
        views["x"] = View((p, h), dtype=np.uint8)
    if np.dtype(out_dtype) == np.dtype(jnp.float8_e4m3fn):
        views["out"] = View((t, h), dtype=np.uint8)
    params = dict(num_topk=token_topk_to_pos.shape[1], in_dtype=np.dtype(x.dtype).name, out_dtype=np.dtype(out_dtype).name,
                  has_weights=topk_weights is not None, has_x_sf=x_sf is not None, has_sf=sf is not None)  # fmt: skip
    return Launch(kernel=reduce_kernel, params=params, views=views)


def _kernel_check(x, topk_weights, token_topk_to_pos, x_sf, sf, *, out_dtype):
    name = "reduce_fused"
    if x.dtype not in IN_DTYPES:
        raise ValueError(f"{name}: the kernel takes bfloat16, float32 or float8_e4m3fn rows, got {x.dtype} (use impl='xla')")
    if np.dtype(out_dtype) not in [np.dtype(d) for d in IN_DTYPES]:
        raise ValueError(f"{name}: the kernel writes bfloat16, float32 or float8_e4m3fn, got {np.dtype(out_dtype).name} (use impl='xla')")
    row_bytes = x.shape[1] * np.dtype(x.dtype).itemsize
    if row_bytes % 16:
        raise ValueError(f"{name}: the kernel loads 16-byte vectors: a row of x must be a multiple of 16 bytes, got {row_bytes} (use impl='xla')")
    if token_topk_to_pos.shape[0] * (row_bytes // 16) > MAX_FLAT:
        raise ValueError(f"{name}: the kernel takes fewer than {MAX_FLAT} 16-byte vectors per call (use impl='xla')")


_reduce_op = TileOp(
    name="reduce_fused", launch=_launch, operands=("x", "topk_weights?", "token_topk_to_pos", "x_sf?", "sf?"), results=("out",),
    reference=_reference, kernel_check=_kernel_check,
)  # fmt: skip


def reduce_rows(x, topk_weights, token_topk_to_pos, x_sf=None, sf=None, *, out_dtype, impl=None) -> jax.Array:
    """The op itself (no argument checks, no VJP), for the VJPs of expand and reduce; dtypes the
    kernel does not take fall back to the reference."""
    impl = resolve_impl(impl, "reduce_fused")
    if x.dtype not in IN_DTYPES or np.dtype(out_dtype) not in [np.dtype(d) for d in IN_DTYPES] or (x.shape[1] * x.dtype.itemsize) % 16:
        impl = "xla"
    return _reduce_op(x, topk_weights, token_topk_to_pos, x_sf, sf, impl=impl, out_dtype=np.dtype(out_dtype))


# ---------------------------------------------------------------------------------------------
# The custom VJP.


def _primal(x, topk_weights, token_topk_to_pos, x_sf, sf, *, out_dtype, impl=None):
    return reduce_rows(x, topk_weights, token_topk_to_pos, x_sf, sf, out_dtype=out_dtype, impl=impl)


def _fwd(x, topk_weights, token_topk_to_pos, x_sf, sf, *, out_dtype, impl=None):
    return _primal(x, topk_weights, token_topk_to_pos, x_sf, sf, out_dtype=out_dtype, impl=impl), (x, topk_weights, token_topk_to_pos, x_sf, sf)


def _bwd(residuals, g, *, out_dtype, impl=None):
    from jax_tilek.moe._expand import _expand_op

    x, w, ttp, x_sf, sf = residuals
    p, h = x.shape
    t, k = ttp.shape
    g = g.astype(jnp.float32)
    d_acc = g * sf[0] if sf is not None else g
    valid = (ttp >= 0) & (ttp < p)
    s = _scales(w, ttp, x_sf, p)
    target = jnp.where(valid, ttp, p).reshape(t * k)
    s_row = jnp.zeros((p,), jnp.float32).at[target].set(s.reshape(t * k), mode="drop")
    # x's cotangent: row pos of slot (t, k) is d_acc[t] · s[t, k]: expand d_acc, then scale each row.
    spread = _expand_op(d_acc, ttp, jnp.zeros((p,), jnp.int32), impl=impl) if (h * 4) % 16 == 0 else _expand_op(d_acc, ttp, jnp.zeros((p,), jnp.int32), impl="xla")
    dx = (spread * s_row[:, None]).astype(x.dtype)
    dw = dx_sf = dsf = None
    if w is not None or x_sf is not None:
        rows = _gather(x, ttp).astype(jnp.float32)  # [T, K, H]
        ds = jnp.where(valid, jnp.einsum("th,tkh->tk", d_acc, rows), 0)
        if w is not None:
            dw = ds * _gather(x_sf, ttp) if x_sf is not None else ds
        if x_sf is not None:
            wk = w if w is not None else jnp.ones((t, k), jnp.float32)
            dx_sf = jnp.zeros((p,), jnp.float32).at[target].add((ds * wk).reshape(t * k), mode="drop")
    if sf is not None:
        dsf = jnp.sum(g * _accumulate(x, w, ttp, x_sf)).reshape(1)
    return dx, dw, None, dx_sf, dsf


_differentiable = with_vjp(_primal, _fwd, _bwd)


# ---------------------------------------------------------------------------------------------
# Public function.


def _case(t: int, h: int, k: int, e: int, dtype=jnp.bfloat16, weights: bool = True, with_x_sf: bool = False,
          fp8_out: bool = False, alignment: int = 1, masked: float = 0.1, **options) -> ArgSpec:  # fmt: skip
    from jax_tilek.moe._expand import valid_mapping
    from jax_tilek.moe._fused_mapping import capacity

    p = capacity(t, k, e, alignment)
    S = jax.ShapeDtypeStruct
    xs = S((p, h), dtype)
    x = (xs, S((p,), jnp.float32)) if with_x_sf else xs
    args = (x, S((t, k), jnp.float32) if weights else None, S((t, k), jnp.int32), "e4m3" if fp8_out else "", S((1,), jnp.float32) if fp8_out else None)

    def make(rng, *structs):
        from jax_tilek.testing import random_array

        ttp, _ = valid_mapping(rng, t, k, e, alignment, masked)
        rows = random_array(rng, (p, h), dtype) if dtype != jnp.float8_e4m3fn else (rng.standard_normal((p, h), np.float32) * 50).astype(dtype)
        xv = (rows, rng.standard_normal((p,), np.float32)) if with_x_sf else rows
        w = rng.random((t, k), np.float32) if weights else None
        sf = rng.standard_normal((1,), np.float32) if fp8_out else None
        return xv, w, ttp, args[3], sf

    name = f"{np.dtype(dtype).name}_{t}x{h}_k{k}_e{e}" + ("_w" if weights else "") + ("_xsf" if with_x_sf else "") + ("_e4m3out" if fp8_out else "")
    return ArgSpec(name + ("_masked" if masked == 1 else ""), args, make=make, **options)


ARG_SPECS = (
    _case(17, 512, 6, 16),
    _case(9, 256, 8, 64, jnp.float32, weights=False, with_x_sf=True, fp8_out=True),
    _case(5, 1024, 4, 8, jnp.float8_e4m3fn, with_x_sf=True, alignment=16),
    _case(1, 256, 1, 8, fp8_out=True),
    _case(0, 256, 8, 8, alignment=4),
    _case(12, 256, 6, 384, masked=1.0),
    _case(4096, 7168, 8, 256, alignment=128, bench=True),
    _case(16384, 7168, 8, 256, alignment=128, bench=True),
)


@uses(_reduce_op, cases=ARG_SPECS, differentiable=True)
def reduce_fused(
    x,
    topk_weights: jax.Array | None,
    token_topk_to_pos: jax.Array,
    fp8_format: str = "",
    sf: jax.Array | None = None,
    *,
    impl=None,
    ops,
) -> jax.Array:
    """Sums each token's fused rows back into its row (see the module docstring for the exact order).

    Args:
      x: ``[P, H]`` bfloat16, float32 or float8_e4m3fn, or ``(x, x_sf)`` with ``x_sf`` float32 ``[P]`` (a
        scale per fused row).
      topk_weights: float32 ``[T, K]`` or None.
      token_topk_to_pos: int32 ``[T, K]``: token t's rows (-1 or out of range: skipped).
      fp8_format: ``""`` (output in x's dtype) or ``"e4m3"`` (float8_e4m3fn output).
      sf: float32 ``[1]``, a scale applied before the cast; only with ``fp8_format="e4m3"``.

    Returns: ``[T, H]``. Differentiable in x, x_sf, topk_weights and sf (custom VJP).
    """
    name = "reduce_fused"
    x_sf = None
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise TypeError(f"{name}: x must be an array or an (x, x_sf) pair, got a sequence of {len(x)}")
        x, x_sf = x
        x_sf = checks.as_array(name, "x_sf", x_sf)
    x = checks.as_array(name, "x", x)
    ttp = checks.as_array(name, "token_topk_to_pos", token_topk_to_pos)
    w = checks.as_array(name, "topk_weights", topk_weights, optional=True)
    sf = checks.as_array(name, "sf", sf, optional=True)
    if x.ndim != 2 or x.dtype not in IN_DTYPES:
        raise ValueError(f"{name}: x must be bfloat16, float32 or float8_e4m3fn [P, H], got {x.dtype}{list(x.shape)}")
    if ttp.ndim != 2 or ttp.dtype != jnp.int32:
        raise ValueError(f"{name}: token_topk_to_pos must be int32 [T, K], got {ttp.dtype}{list(ttp.shape)}")
    if w is not None and (w.dtype != jnp.float32 or w.shape != ttp.shape):
        raise ValueError(f"{name}: topk_weights must be float32 {list(ttp.shape)} (the shape of token_topk_to_pos), got {w.dtype}{list(w.shape)}")
    if x_sf is not None and (x_sf.dtype != jnp.float32 or x_sf.shape != x.shape[:1]):
        raise ValueError(f"{name}: x_sf must be float32 [{x.shape[0]}] (one scale per row of x), got {x_sf.dtype}{list(x_sf.shape)}")
    if fp8_format not in ("", "e4m3"):
        raise ValueError(f"{name}: fp8_format must be '' or 'e4m3', got {fp8_format!r}")
    if sf is not None:
        if fp8_format != "e4m3":
            raise ValueError(f"{name}: sf is only allowed with fp8_format='e4m3' (TileKernels: only FP8 output supports sf)")
        if sf.dtype != jnp.float32 or sf.shape != (1,):
            raise ValueError(f"{name}: sf must be float32 [1], got {sf.dtype}{list(sf.shape)}")
    out_dtype = np.dtype(jnp.float8_e4m3fn) if fp8_format == "e4m3" else np.dtype(x.dtype)
    return _differentiable(x, w, ttp, x_sf, sf, out_dtype=out_dtype, impl=impl)
