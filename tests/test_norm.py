"""RMSNorm (jax_tilek.norm: norm_forward, norm_forward_and_per_token_cast, norm_backward, rms_norm): the
op contract over the ops' cases, the references against independent numpy arithmetic, the rules,
transforms, lowering, and the kernels bit-exact with that arithmetic on the GPU."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_tilek
from jax_tilek.norm import norm_backward, norm_forward, norm_forward_and_per_token_cast, rms_norm, row_layout
from jax_tilek.quant import formats as F
from jax_tilek.testing import OpContract, assert_bytes_equal, decode_record, jit_call, lower_for_cuda, tilek_calls

BF16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
EPS = 1e-6
SF_FLAGS = {  # layout -> (use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0)
    "row": (False, False, False),
    "row_round": (False, True, False),
    "col": (True, False, False),
    "col_round": (True, True, False),
    "col_ue8m0": (True, True, True),
}


def _inputs(rng, t, h, dtype, residual=True, weight=True, lead=()):
    shape = (*lead, t, h)
    x = (rng.standard_normal(shape, np.float32) * np.exp2(rng.integers(-6, 7, shape[:-1] + (1,)))).astype(dtype)
    r = (rng.standard_normal(shape, np.float32) * 2).astype(dtype) if residual else None
    w = None
    if weight:
        w = (rng.standard_normal(h, np.float32) * 0.5 + 1).astype(dtype)
        w[:QG] = 0  # an all-zero 32-group: y = 0 there, the cast's amax floor applies
    return x, r, w


QG = 32


def calc_diff(x, y) -> float:
    """``|x - y|^2 / (|x|^2 + |y|^2)`` in float64 (TileKernels' ``calc_diff``); 0 when both are zero."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denominator = (x * x + y * y).sum()
    return 0.0 if denominator == 0 else float(((x - y) ** 2).sum() / denominator)


def _ulps(a, b) -> int:
    """The largest distance in units in the last place between two float arrays of one dtype."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    ia, ib = a.view(bits).astype(np.int64), b.view(bits).astype(np.int64)
    ia, ib = np.where(ia < 0, np.iinfo(bits).min - ia, ia), np.where(ib < 0, np.iinfo(bits).min - ib, ib)
    return int(np.abs(ia - ib).max()) if a.size else 0


def _host(fn, *args):
    """Runs ``fn`` jitted on the host CPU (expected values never come from XLA on the GPU)."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return jax.tree.map(np.asarray, jax.jit(fn)(*[None if a is None else jax.device_put(a, cpu) for a in args]))


# ---------------------------------------------------------------------------------------------
# Independent numpy arithmetic (float32 numpy ops are IEEE, one rounding each).


def _np_row_sum(v: np.ndarray, dtype) -> np.ndarray:
    """The kernels' summation order, simulated thread by thread: each of a row's ``group`` threads
    adds its elements ``(j * group + lane) * vec + e`` for j, then e; ``__shfl_xor`` rounds add lane
    ``l ^ o`` for o = 16 (or group / 2), ..., 1; then the row's warps are added in order."""
    lay = row_layout(v.shape[1], dtype)
    t = v.shape[0]
    span = lay.vpt * lay.group * lay.vec
    v = np.pad(v.astype(np.float32), ((0, 0), (0, span - v.shape[1]))).reshape(t, lay.vpt, lay.group, lay.vec)
    lanes = np.zeros((t, lay.group), np.float32)
    for j in range(lay.vpt):
        for e in range(lay.vec):
            lanes = lanes + v[:, j, :, e]
    offset = min(lay.group, 32) // 2
    while offset:
        lanes = lanes + lanes[:, np.arange(lay.group) ^ offset]
        offset //= 2
    if lay.group <= 32:
        return lanes[:, 0]
    total = np.zeros(t, np.float32)
    for w in range(lay.group // 32):
        total = total + lanes[:, 32 * w]
    return total


def _np_forward(x, r, w, eps, out_scale):
    f32 = np.float32
    s = x if r is None else (x.astype(f32) + r.astype(f32)).astype(x.dtype)
    sv = s.astype(f32)
    total = _np_row_sum(sv * sv, x.dtype)
    rstd = f32(1) / np.sqrt(total / f32(x.shape[1]) + f32(eps))
    scale = f32(out_scale) if w is None else w.astype(f32) * f32(out_scale)
    y = ((sv * rstd[:, None]) * scale).astype(x.dtype)
    return y, rstd.astype(f32), s


def _np_cast(y, layout):
    """Per-token e4m3 cast of y in 1 x 32 groups (TileKernels' rules), sf in ``layout`` storage."""
    f32 = np.float32
    t, h = y.shape
    g = np.abs(y.astype(f32)).reshape(t, h // QG, QG)
    a = np.maximum(g.max(-1), f32(1e-4))
    sf = a / f32(448)
    round_sf = layout in ("row_round", "col_round", "col_ue8m0")
    if round_sf:  # the smallest power of two >= sf
        m, e = np.frexp(sf)  # sf = m * 2^e, 0.5 <= m < 1
        e = np.where(m == 0.5, e - 1, e)
        sf, inv = np.exp2(e).astype(f32), np.exp2(-e).astype(f32)
    else:
        inv = f32(448) / a
    q = np.clip(y.astype(f32) * np.repeat(inv, QG, axis=1), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    tp = -(-t // 4) * 4
    if layout.startswith("row"):
        stored = sf
    elif layout in ("col", "col_round"):
        stored = np.zeros((h // QG, tp), f32)
        stored[:, :t] = sf.T
    else:
        kb = h // QG
        b = np.zeros((tp, -(-kb // 4) * 4), np.uint8)
        b[:t, :kb] = (e + 127).astype(np.uint8)
        stored = b.reshape(tp, -(-kb // 4), 4).view(np.int32)[..., 0].T.copy()
    return q, stored


def _np_backward(dy, x, w, rstd, rg, out_scale):
    """dx in the kernel's order, and the per-token dw contributions (fp32)."""
    f32 = np.float32
    rs = rstd[:, None]
    g = dy.astype(f32) * f32(out_scale)
    gw = g if w is None else g * w.astype(f32)
    xh = x.astype(f32) * rs
    mean = (_np_row_sum(xh * gw, x.dtype) / f32(x.shape[1]))[:, None]
    d = (gw - xh * mean) * rs
    if rg is not None:
        d = d + rg.astype(f32)
    return d.astype(x.dtype), xh * g


PARTIAL_SMS = 132  # the backward's partial dw rows: ctas_per_sm per SM of an H200, on every GPU


def _backward_config(h, dtype, has_residual_grad):
    """The backward kernel's configuration (``stages``, ``ctas_per_sm``) its heuristic picks."""
    x = jax.ShapeDtypeStruct((1, h), dtype)
    (op,) = norm_backward.ops
    return op.config_for(x, x, None, None, x if has_residual_grad else None)


def _np_ctas(t, h, dtype, has_residual_grad):
    """CTAs (partial dw row groups) of the backward: a function of the shapes only."""
    lay = row_layout(h, dtype)
    return min(PARTIAL_SMS * _backward_config(h, dtype, has_residual_grad).ctas_per_sm, -(-t // lay.rows))


def _np_dw(contrib, dtype, has_residual_grad):
    """dw as the kernels reduce it: CTA b of NC takes row blocks b, b + NC, ... (rows per block), each
    thread group summing its rows in turn into partial row b * rows + r; then lane l of 32 sums partial
    rows l, l + 32, ... in turn, and the 32 lane sums are added in lane order. NC depends on the
    shapes only (:func:`_np_ctas`), never on the GPU."""
    t, h = contrib.shape
    lay = row_layout(h, dtype)
    nc = _np_ctas(t, h, dtype, has_residual_grad)
    partial = np.zeros((nc * lay.rows, h), np.float32)
    for k in range(-(-(-(-t // lay.rows)) // nc) if nc else 0):
        idx = ((np.arange(nc) + k * nc)[:, None] * lay.rows + np.arange(lay.rows)[None]).reshape(-1)
        partial = np.where((idx < t)[:, None], partial + contrib[np.minimum(idx, t - 1)], partial)
    lanes = np.zeros((32, h), np.float32)
    for k in range(-(-len(partial) // 32)):
        chunk = partial[32 * k : 32 * k + 32]
        lanes[: len(chunk)] = lanes[: len(chunk)] + chunk
    total = np.zeros(h, np.float32)
    for lane in range(32):
        total = total + lanes[lane]
    return total


def _f64_forward(x, r, w, eps, out_scale):
    s = x.astype(np.float64) + (0 if r is None else r.astype(np.float64))
    rstd = 1 / np.sqrt(np.mean(s * s, -1) + eps)
    return s * rstd[:, None] * (1 if w is None else w.astype(np.float64)) * out_scale, rstd


# ---------------------------------------------------------------------------------------------
# The op contract over each function's cases (the kernels against the references on the GPU:
# bit-exact, or within the tolerance a case states where XLA's FMA contraction changes the references).


def _s(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _without_column_major_sf(case) -> bool:
    return not case.kwargs["use_tma_aligned_col_major_sf"]


class TestNormForward(OpContract):
    fn = norm_forward
    rows = True
    bad_inputs = [
        ((_s((4, 5, 6, 128)), None), dict(eps=EPS), ValueError, r"x must be \[T, H\] or \[B, T, H\]"),
        ((_s((4, 128), np.float16), None), dict(eps=EPS), ValueError, "x must be bfloat16 or float32"),
        ((_s((4, 120)), None), dict(eps=EPS), ValueError, "multiple of 16 in"),
        ((_s((4, 8208)), None), dict(eps=EPS), ValueError, "<= 8192|8192], got 8208"),
        ((_s((4, 128)), _s((128,), F32)), dict(eps=EPS), ValueError, "weight must be"),
        ((_s((4, 128)), _s((64,))), dict(eps=EPS), ValueError, "weight must be"),
    ]


class TestNormForwardAndPerTokenCastRowMajorSf(OpContract):
    """Row-major scales are per token: vmap folds into the tokens, and the tokens shard."""

    fn = norm_forward_and_per_token_cast
    cases = [c for c in fn.cases if _without_column_major_sf(c)]
    rows = True
    bad_inputs = [
        ((_s((4, 144)), None), dict(eps=EPS), ValueError, "multiple of 32"),
        ((_s((4, 128)), None), dict(eps=EPS, fmt="e2m1"), ValueError, "fmt must be 'e4m3'"),
        ((_s((4, 128)), None), dict(eps=EPS, num_per_channels=128), ValueError, "num_per_channels must be 32"),
        ((_s((4, 128)), None), dict(eps=EPS, use_packed_ue8m0=True, round_sf=True), ValueError, "needs use_tma_aligned_col_major_sf"),
        ((_s((4, 128)), None), dict(eps=EPS, use_tma_aligned_col_major_sf=True, use_packed_ue8m0=True), ValueError, "needs round_sf"),
    ]


class TestNormForwardAndPerTokenCastColumnMajorSf(OpContract):
    """Column-major scales are one storage of all tokens (padded at its end): vmap maps."""

    fn = norm_forward_and_per_token_cast
    cases = [c for c in fn.cases if not _without_column_major_sf(c)]


class TestNormBackward(OpContract):
    """With a weight: dw sums over the tokens, so vmap maps."""

    fn = norm_backward
    cases = [c for c in fn.cases if c.args[2] is not None]
    bad_inputs = [
        ((_s((4, 144)), _s((4, 144)), None, _s((4,), F32)), {}, ValueError, "multiple of 32"),
        ((_s((4, 128), F32), _s((4, 128)), None, _s((4,), F32)), {}, ValueError, "out_grad must match x"),
        ((_s((4, 128)), _s((4, 128)), None, _s((4,), BF16)), {}, ValueError, "rstd must be float32"),
        ((_s((4, 128)), _s((4, 128)), None, _s((5,), F32)), {}, ValueError, "rstd must be float32"),
        ((_s((4, 128)), _s((4, 128)), None, _s((4,), F32), _s((4, 64))), {}, ValueError, "residual must match x"),
    ]


class TestNormBackwardWithoutWeight(OpContract):
    """Without a weight the backward is row-wise."""

    fn = norm_backward
    cases = [c for c in fn.cases if c.args[2] is None]
    rows = True


class TestRmsNorm(OpContract):
    fn = rms_norm
    rows = True
    differentiable = (0, 1, 3)  # x, weight, residual
    bad_inputs = [((_s((4, 48)), None), dict(eps=EPS), ValueError, "multiple of 32")]


def test_bad_inputs_raise_at_trace_time():
    with pytest.raises(ValueError, match="residual must match x"):
        jax.eval_shape(lambda x, r: norm_forward(x, None, EPS, residual=r), _s((4, 128)), _s((5, 128)))


# ---------------------------------------------------------------------------------------------
# References (CPU).


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("h", [128, 384, 2048, 4096, 7168, 96])
def test_forward_reference_is_the_kernel_arithmetic(rng, h, dtype):
    x, r, w = _inputs(rng, 37, h, dtype)
    out, rstd, ni = jit_call(norm_forward, x, w, EPS, residual=r, out_scale=1.5, with_rstd=True, impl="xla")
    y, rs, s = _np_forward(x, r, w, EPS, 1.5)
    assert_bytes_equal(ni, s)
    if dtype == BF16:  # squares of bf16 values are exact in fp32: nothing for XLA's FMA contraction to change
        assert_bytes_equal(out, y)
        assert_bytes_equal(rstd, rs)
    else:  # XLA may fuse fp32 squares into the sum's adds as FMAs: the last place may differ
        assert _ulps(rstd, rs) <= 2 and _ulps(out, y) <= 4
    y64, rs64 = _f64_forward(s.astype(np.float64), None, w, EPS, 1.5)  # the math, from the rounded s
    np.testing.assert_allclose(np.asarray(rstd), rs64, rtol=1e-5)
    tol = 2.0**-8 if dtype == BF16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), y64, rtol=tol, atol=tol * np.abs(y64).max())


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_forward_without_residual_or_weight(rng, dtype):
    x, _, _ = _inputs(rng, 5, 2048, dtype, residual=False, weight=False)
    out, rstd, ni = norm_forward(x, None, 1e-2, out_scale=0.25, impl="xla")
    y, _, _ = _np_forward(x, None, None, 1e-2, 0.25)
    assert _ulps(out, y) <= (0 if dtype == BF16 else 4)
    assert rstd is None
    assert_bytes_equal(ni, x)


@pytest.mark.parametrize("layout", list(SF_FLAGS))
@pytest.mark.parametrize("h,t", [(7168, 9), (96, 6)])
def test_cast_reference_matches_numpy_and_per_token_cast(rng, layout, h, t):
    x, r, w = _inputs(rng, t, h, BF16)
    col, round_sf, packed = SF_FLAGS[layout]
    (data, sf), y, rstd, ni = jit_call(
        norm_forward_and_per_token_cast, x, w, EPS, residual=r, use_tma_aligned_col_major_sf=col, round_sf=round_sf, use_packed_ue8m0=packed,
        with_out_bf16=True, with_rstd=True, impl="xla",
    )  # fmt: skip
    out, rstd2, _ = jit_call(norm_forward, x, w, EPS, residual=r, with_rstd=True, impl="xla")
    assert_bytes_equal(y, out)
    assert_bytes_equal(rstd, rstd2)
    q, stored = _np_cast(np.asarray(out), layout)
    assert_bytes_equal(data, q)
    assert_bytes_equal(sf, stored)
    d2, s2 = F.quantize_blocks(out, "e4m3", (1, QG), round_sf=round_sf)  # = per_token_cast of the output
    assert_bytes_equal(data, d2)
    back = F.dequantize_blocks(data, F.load_sf(sf, F.sf_layout(col, packed, round_sf), (t, h // QG)), "e4m3", (1, QG))
    assert calc_diff(back, np.asarray(out, np.float32)) < 1e-3


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("h", [128, 2048, 7168, 384])
def test_backward_reference_is_the_kernel_arithmetic(rng, h, dtype):
    x, rg, w = _inputs(rng, 29, h, dtype)
    dy = (rng.standard_normal(x.shape, np.float32)).astype(dtype)
    rstd = (np.abs(rng.standard_normal(29)) + 0.5).astype(np.float32)
    dx, dw = jit_call(norm_backward, dy, x, w, rstd, residual_out_grad=rg, out_scale=2.0, impl="xla")
    dx_np, contrib = _np_backward(dy, x, w, rstd, rg, 2.0)
    assert calc_diff(dx, dx_np) < (1e-6 if dtype == BF16 else 1e-12)  # XLA's FMA contraction aside, equal
    assert_bytes_equal(dw, _np_dw(contrib, dtype, True))  # the kernels' fixed summation order
    # and the sum itself: within 1e-5 relative plus the error bound of sequential fp32 summation
    exact = contrib.astype(np.float64).sum(0)
    bound = 1e-4 + 1e-5 * np.abs(exact) + len(contrib) * 2.0**-24 * np.abs(contrib).astype(np.float64).sum(0)
    assert np.all(np.abs(np.asarray(dw, np.float64) - exact) <= bound)
    # the math in float64
    f = np.float64
    xh, g = x.astype(f) * rstd[:, None], dy.astype(f) * 2.0
    gw = g * w.astype(f)
    dx64 = (gw - xh * np.mean(xh * gw, -1, keepdims=True)) * rstd[:, None] + rg.astype(f)
    assert calc_diff(np.asarray(dx, f), dx64) < (1e-5 if dtype == BF16 else 1e-10)


def test_np_dw_mirror_sums_everything(rng):
    c = rng.standard_normal((40003, 256)).astype(np.float32)
    np.testing.assert_allclose(_np_dw(c, BF16, True), c.astype(np.float64).sum(0), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(_np_dw(c[:3], BF16, False), c[:3].astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,h,dtype,rg,out_scale", [
    (29, 128, BF16, True, 1.5), (9000, 128, F32, False, 1.5), (1500, 2048, BF16, True, 1.5), (4101, 7168, BF16, False, 1.5),
    (700, 96 * 3, F32, True, 1.5), (7, 2048, BF16, False, 2.0), (1, 384, F32, True, 0.5),
], ids=str)  # fmt: skip
def test_dw_reference_is_the_kernel_reduction(rng, t, h, dtype, rg, out_scale):
    """The reference sums dw in the kernels' fixed partition and order (bit for bit with the numpy
    mirror), several row blocks per partial row where there are many tokens, and its products are
    rounded before the sums (no FMA contraction, also where few tokens make XLA fuse everything)."""
    x, g, w = _inputs(rng, t, h, dtype, rg, True)
    dy = rng.standard_normal((t, h), np.float32).astype(dtype)
    rstd = (np.abs(rng.standard_normal(t)) + 0.5).astype(np.float32)
    _, dw = jax.jit(lambda *a: norm_backward(*a, out_scale=out_scale, impl="xla"))(dy, x, w, rstd, g)
    _, contrib = _np_backward(dy, x, w, rstd, g, out_scale)
    assert_bytes_equal(dw, _np_dw(contrib, dtype, rg))


def test_backward_does_not_depend_on_the_sm_count(monkeypatch, rng):
    """The same cubins and the same launches (grids, partial dw rows) whatever SM count the lowering
    assumes, so every GPU reduces dw in the same order; the reference models that order."""
    t, h = 100_000, 7168
    args = _s((t, h)), _s((t, h)), _s((h,)), _s((t,), F32), _s((t, h))
    x, g, w = _inputs(rng, 3000, 256, BF16)
    data = (rng.standard_normal(x.shape, np.float32).astype(BF16), x, w, (np.abs(rng.standard_normal(3000)) + 0.5).astype(np.float32), g)
    texts, keys, refs = {}, {}, {}
    for sms in (114, 132):
        monkeypatch.setenv("JAX_TILEK_NUM_SMS", str(sms))
        with jax_tilek.record_kernels() as log:
            texts[sms] = lower_for_cuda(lambda *a: _backward_fn(None)(*a), *args)  # a fresh function: no cached lowering
        keys[sms] = [key for *_, key in log]
        refs[sms] = jax.jit(lambda *a: _backward_fn("xla")(*a))(*data)[1]
    assert_bytes_equal(refs[114], refs[132])
    assert_bytes_equal(refs[132], _np_dw(_np_backward(*data, 1.0)[1], BF16, True))
    assert keys[114] == keys[132] and len(keys[132]) == 1
    assert tilek_calls(texts[114]) == tilek_calls(texts[132])
    (call,) = tilek_calls(texts[132])
    grids = [k["grid"] for k in decode_record(call["launch"])["kernels"]]
    assert grids == [[_np_ctas(t, h, BF16, True), 1, 1], [h // 32, 1, 1]] and grids[0][0] == PARTIAL_SMS * _backward_config(h, BF16, True).ctas_per_sm


def _loss(x, w, r, impl, out_scale=1.5):
    """A loss whose cotangents are exact on any backend: d out = c (bf16-exact), d norm_input = s / 4."""
    out, ni = rms_norm(x, w, EPS, residual=r, out_scale=out_scale, impl=impl)
    c = np.round(np.cos(np.arange(out.shape[-1])) * 64).astype(np.float32) / 64
    return jnp.sum(out.astype(jnp.float32) * c) + jnp.sum(ni.astype(jnp.float32) ** 2) / 8


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_rms_norm_gradients_match_autodiff_of_the_reference(rng, dtype):
    x, r, w = _inputs(rng, 23, 256, dtype)
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=3)
    ours, theirs = grad(x, w, r, None), grad(x, w, r, "xla")
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == dtype
        assert calc_diff(a, b) < (1e-4 if dtype == BF16 else 1e-10)
    # without residual or weight: out only, grad to x
    f = lambda x, impl: jnp.sum(rms_norm(x, None, EPS, impl=impl).astype(jnp.float32) ** 3)  # noqa: E731
    grad = jax.jit(jax.grad(f), static_argnums=1)
    assert calc_diff(grad(x, None), grad(x, "xla")) < (1e-4 if dtype == BF16 else 1e-10)


def test_three_d_inputs_and_vmap_fold_tokens(rng):
    x, r, w = _inputs(rng, 6, 128, BF16, lead=(3,))
    out, rstd, ni = norm_forward(x, w, EPS, residual=r, with_rstd=True)
    assert out.shape == x.shape and rstd.shape == (3, 6) and ni.shape == x.shape
    flat = norm_forward(x.reshape(18, 128), w, EPS, residual=r.reshape(18, 128), with_rstd=True)
    assert_bytes_equal(out, np.asarray(flat[0]).reshape(x.shape))
    (d, sf), _, _, _ = norm_forward_and_per_token_cast(x, w, EPS, residual=r)
    assert d.shape == x.shape and sf.shape == (3, 6, 4)
    vm = jax.vmap(lambda x, r: norm_forward(x, w, EPS, residual=r, with_rstd=True), in_axes=(1, None))(x, r[:, 0])
    for i in range(6):
        one = norm_forward(x[:, i], w, EPS, residual=r[:, 0], with_rstd=True)
        for a, b in zip(vm, one):
            assert_bytes_equal(np.asarray(a)[i], b)
    text = lower_for_cuda(jax.vmap(lambda x: norm_forward(x, w, EPS)[0]), jax.ShapeDtypeStruct((3, 6, 128), BF16))
    (call,) = tilek_calls(text)
    assert decode_record(call["launch"])["kernels"][0]["grid"] == [-(-18 // 8), 1, 1]  # one launch, 18 tokens


def test_vmap_of_gradients(rng):
    x, r, w = _inputs(rng, 5, 128, F32, lead=(2,))
    g = jax.vmap(jax.grad(lambda x, w, r: _loss(x, w, r, None), argnums=(0, 1, 2)))(x, np.stack([w, w]), r)
    for i in range(2):
        one = jax.grad(lambda x, w, r: _loss(x, w, r, None), argnums=(0, 1, 2))(x[i], w, r[i])
        for a, b in zip(g, one):
            np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))


def test_zero_tokens():
    x = np.zeros((0, 256), BF16)
    out, rstd, ni = norm_forward(x, None, EPS, residual=x, with_rstd=True)
    assert out.shape == (0, 256) and rstd.shape == (0,)
    (d, sf), _, _, _ = norm_forward_and_per_token_cast(x, None, EPS, use_tma_aligned_col_major_sf=True, round_sf=True, use_packed_ue8m0=True)
    assert d.shape == (0, 256) and sf.shape == (2, 0)
    dx, dw = norm_backward(x, x, np.ones(256, BF16), np.zeros(0, np.float32))
    assert dx.shape == (0, 256) and np.array_equal(np.asarray(dw), np.zeros(256, np.float32))


X = jnp.zeros((4, 128), jnp.bfloat16)
R = jnp.ones((4,), jnp.float32)


@pytest.mark.parametrize("call,error,message", [
    (lambda: norm_forward(X, None, -1.0), ValueError, r"norm_forward: eps must be a finite number >= 0.0, got -1.0"),
    (lambda: norm_forward(X, None, float("nan")), ValueError, "norm_forward: eps must be a finite number >= 0"),
    (lambda: norm_forward(X, None, float("inf")), ValueError, "norm_forward: eps must be a finite number >= 0"),
    (lambda: norm_forward(X, None, "1e-6"), TypeError, "norm_forward: eps must be a number, got str"),
    (lambda: norm_forward(X, None, None), TypeError, "norm_forward: eps must be a number, got NoneType"),
    (lambda: norm_forward(X, None, EPS, out_scale=float("nan")), ValueError, "norm_forward: out_scale must be a finite number"),
    (lambda: norm_forward(X, None, EPS, with_rstd="yes"), TypeError, "norm_forward: with_rstd must be True or False"),
    (lambda: norm_forward(X, None, EPS, impl="gpu"), ValueError, r"norm_forward: impl must be one of \(None, 'tilelang', 'xla'\), got 'gpu'"),
    (lambda: norm_forward("x", None, EPS), TypeError, "norm_forward: x must be an array, got str"),
    (lambda: norm_forward(None, None, EPS), TypeError, "norm_forward: x must be an array"),
    (lambda: norm_forward(X, "w", EPS), TypeError, "norm_forward: weight must be an array"),
    (lambda: norm_forward(jnp.zeros((4, 0), jnp.bfloat16), None, EPS), ValueError, "norm_forward: the hidden size H must be a multiple of 16 in"),
    (lambda: norm_forward(jnp.zeros((128,), jnp.bfloat16), None, EPS), ValueError, r"norm_forward: x must be \[T, H\] or \[B, T, H\]"),
    (lambda: norm_forward(jnp.zeros((4, 128), jnp.int8), None, EPS), ValueError, "norm_forward: x must be bfloat16 or float32"),
    (lambda: jax.jit(lambda x, e: norm_forward(x, None, e))(X, 1e-6), TypeError, "norm_forward: eps must be a static number"),
    (lambda: norm_forward_and_per_token_cast(X, None, -1e-6), ValueError, "norm_forward_and_per_token_cast: eps must be a finite number >= 0"),
    (lambda: norm_forward_and_per_token_cast(X, None, EPS, num_per_channels=32.0), TypeError, "norm_forward_and_per_token_cast: num_per_channels must be an int"),
    (lambda: norm_forward_and_per_token_cast(X, None, EPS, round_sf="no"), TypeError, "norm_forward_and_per_token_cast: round_sf must be True or False"),
    (lambda: norm_forward_and_per_token_cast(X, None, EPS, with_out_bf16=None), TypeError, "norm_forward_and_per_token_cast: with_out_bf16 must be True or False"),
    (lambda: norm_forward_and_per_token_cast(X, None, EPS, fmt=["e4m3"]), ValueError, "norm_forward_and_per_token_cast: fmt must be 'e4m3'"),
    (lambda: norm_forward_and_per_token_cast(X, None, EPS, use_packed_ue8m0=True, round_sf=True), ValueError, "norm_forward_and_per_token_cast: use_packed_ue8m0 needs use_tma_aligned_col_major_sf"),
    (lambda: norm_forward_and_per_token_cast(X, None, EPS, impl="x"), ValueError, "norm_forward_and_per_token_cast: impl must be"),
    (lambda: norm_backward(X, X, None, R, out_scale="2"), TypeError, "norm_backward: out_scale must be a number, got str"),
    (lambda: norm_backward(X, X, None, R, out_scale=float("inf")), ValueError, "norm_backward: out_scale must be a finite number"),
    (lambda: norm_backward(X, X, None, "rstd"), TypeError, "norm_backward: rstd must be an array"),
    (lambda: norm_backward(None, X, None, R), TypeError, "norm_backward: out_grad must be an array"),
    (lambda: norm_backward(X, X, None, R, impl="cuda"), ValueError, "norm_backward: impl must be"),
    (lambda: rms_norm(X, None, -1.0), ValueError, "rms_norm: eps must be a finite number >= 0"),
    (lambda: rms_norm(X, None, float("nan")), ValueError, "rms_norm: eps must be a finite number >= 0"),
    (lambda: rms_norm(X, None, EPS, out_scale=None), TypeError, "rms_norm: out_scale must be a number"),
    (lambda: rms_norm(X, None, EPS, impl=0), ValueError, "rms_norm: impl must be"),
    (lambda: rms_norm(jnp.zeros((4, 128), jnp.float16), None, EPS), ValueError, "rms_norm: x must be bfloat16 or float32"),
])  # fmt: skip
def test_bad_arguments_name_the_op_and_the_argument(call, error, message):
    """Bad statics (eps < 0, NaN ...), dtypes, ranks, zero extents and Python objects: a ValueError or
    TypeError naming the op and the argument, at trace time (eps < 0 used to give NaNs silently)."""
    with pytest.raises(error, match=message):
        call()


MAX_ROWS = 2**31 - 2**17  # the documented token limit (int32 row indices with a grid's headroom)


def test_kernels_take_up_to_max_rows():
    """B·T up to ``MAX_ROWS`` tokens lowers (64-bit element offsets, int32 rows); beyond, the op says so."""
    h = 128
    lay = row_layout(h, BF16)
    text = lower_for_cuda(_forward_fn(None, with_rstd=True), *_structs(MAX_ROWS, h, BF16, True, True))
    assert decode_record(tilek_calls(text)[0]["launch"])["kernels"][0]["grid"] == [-(-MAX_ROWS // lay.rows), 1, 1]
    text = lower_for_cuda(_cast_fn(None, **_cast_options("col_ue8m0", with_out=False, with_rstd=False)), *_structs(MAX_ROWS, h, BF16, True, True))
    assert decode_record(tilek_calls(text)[0]["launch"])["kernels"][0]["grid"] == [-(-MAX_ROWS // lay.rows), 1, 1]
    args = _s((MAX_ROWS, h)), _s((MAX_ROWS, h)), _s((h,)), _s((MAX_ROWS,), F32), _s((MAX_ROWS, h))
    grids = [k["grid"] for k in decode_record(tilek_calls(lower_for_cuda(_backward_fn(None), *args))[0]["launch"])["kernels"]]
    assert grids == [[_np_ctas(MAX_ROWS, h, BF16, True), 1, 1], [h // 32, 1, 1]]
    half = MAX_ROWS // 2 + 1  # vmap folds the batch into the tokens only while they stay within the limit
    (call,) = tilek_calls(lower_for_cuda(jax.vmap(lambda x: norm_forward(x, None, EPS)[0]), _s((2, half, h))))
    assert decode_record(call["launch"])["kernels"][0]["grid"] == [-(-half // lay.rows), 1, 1]
    (call,) = tilek_calls(lower_for_cuda(jax.vmap(lambda d, x, s: norm_backward(d, x, None, s)[0]), _s((2, half, h)), _s((2, half, h)), _s((2, half), F32)))
    assert decode_record(call["launch"])["kernels"][0]["grid"] == [_np_ctas(half, h, BF16, False), 1, 1]
    for fn, args in [
        (lambda x: norm_forward(x, None, EPS), [_s((MAX_ROWS + 1, h))]),
        (lambda x: norm_forward_and_per_token_cast(x, None, EPS), [_s((2, MAX_ROWS // 2 + 1, h))]),
        (lambda d, x, s: norm_backward(d, x, None, s), [_s((MAX_ROWS + 1, h)), _s((MAX_ROWS + 1, h)), _s((MAX_ROWS + 1,), F32)]),
        (lambda x: rms_norm(x, None, EPS), [_s((2**31, h))]),
    ]:
        with pytest.raises(ValueError, match=rf"(norm_\w+|rms_norm): x may have at most {MAX_ROWS} tokens"):
            jax.eval_shape(fn, *args)


# ---------------------------------------------------------------------------------------------
# The configurations the GPU runs (the functions' cases but the benchmarks'), each also cross-lowered
# here, compiling its cubin.


def _gpu_cases(fn):
    return [c for c in fn.cases if not c.name.startswith("bench_")]


def _case_id(case):
    return case.name


def _tokens_setup(case):
    """(lead, t, h, dtype, residual, weight) of a norm_forward or norm_forward_and_per_token_cast case."""
    x, w, r = case.args[0], case.args[1], case.args[-1]
    *lead, t, h = x.shape
    return tuple(lead), t, h, np.dtype(x.dtype), r is not None, w is not None


def _layout(options) -> str:
    """The SF_FLAGS name of a cast's options."""
    flags = tuple(options[k] for k in ("use_tma_aligned_col_major_sf", "round_sf", "use_packed_ue8m0"))
    return next(name for name, f in SF_FLAGS.items() if f == flags)


def _cast_options(layout, with_out, with_rstd):
    col, round_sf, packed = SF_FLAGS[layout]
    return dict(use_tma_aligned_col_major_sf=col, round_sf=round_sf, use_packed_ue8m0=packed, with_out_bf16=with_out, with_rstd=with_rstd)


def _forward_fn(impl, **options):
    def fn(x, r, w):
        return norm_forward(x, w, EPS, residual=r, impl=impl, **options)

    return fn


def _cast_fn(impl, **options):
    def fn(x, r, w):
        return norm_forward_and_per_token_cast(x, w, EPS, residual=r, impl=impl, **options)

    return fn


def _backward_fn(impl, **options):
    def fn(dy, x, w, rstd, rg):
        return norm_backward(dy, x, w, rstd, residual_out_grad=rg, impl=impl, **options)

    return fn


def _structs(t, h, dtype, residual, weight, lead=()):
    x = _s((*lead, t, h), dtype)
    return x, (x if residual else None), (_s((h,), dtype) if weight else None)


def _f32_bits(v) -> int:
    return int(np.float32(v).view(np.int32))


@pytest.mark.parametrize("case", _gpu_cases(norm_forward), ids=_case_id)
def test_forward_lowering(case):
    lead, t, h, dtype, residual, weight = _tokens_setup(case)
    text = lower_for_cuda(_forward_fn(None, **case.kwargs), *_structs(t, h, dtype, residual, weight, lead))
    (call,) = tilek_calls(text)
    assert call["name"] == "norm_forward" and call["has_cubin"]
    record = decode_record(call["launch"])
    lay = row_layout(h, dtype)
    tokens = int(np.prod(lead, dtype=int)) * t
    if tokens == 0:
        assert record["kernels"] == []
        return
    (k,) = record["kernels"]
    assert k["grid"] == [-(-tokens // lay.rows), 1, 1] and k["block"] == [lay.threads, 1, 1]
    assert k["args"][-2:] == [(2, 4, _f32_bits(EPS)), (2, 4, _f32_bits(case.kwargs["out_scale"]))]


@pytest.mark.parametrize("case", _gpu_cases(norm_forward_and_per_token_cast), ids=_case_id)
def test_cast_lowering(case):
    lead, t, h, dtype, residual, weight = _tokens_setup(case)
    text = lower_for_cuda(_cast_fn(None, **case.kwargs), *_structs(t, h, dtype, residual, weight, lead))
    (call,) = tilek_calls(text)
    record = decode_record(call["launch"])
    lay = row_layout(h, dtype)
    tokens = int(np.prod(lead, dtype=int)) * t
    rows = -(-tokens // 4) * 4 if _layout(case.kwargs).startswith("col") else tokens  # column-major sf: padding tokens too
    assert [k["grid"] for k in record["kernels"]] == ([[-(-rows // lay.rows), 1, 1]] if tokens else [])


@pytest.mark.parametrize("case", _gpu_cases(norm_backward), ids=_case_id)
def test_backward_lowering(case):
    dy, x, w, rstd, rg = case.args
    (t, h), dtype, weight, rg = x.shape, np.dtype(x.dtype), w is not None, rg is not None
    text = lower_for_cuda(_backward_fn(None, **case.kwargs), *case.args)
    (call,) = tilek_calls(text)
    record = decode_record(call["launch"])
    lay = row_layout(h, dtype)
    config = _backward_config(h, dtype, rg)
    nc = _np_ctas(t, h, dtype, rg)
    grids = [k["grid"] for k in record["kernels"]]
    expected = ([[nc, 1, 1]] if nc else []) + ([[h // 32, 1, 1]] if weight else [])
    assert grids == expected
    if nc:
        k = record["kernels"][0]
        assert k["block"] == [lay.threads, 1, 1]
        assert k["smem"] >= config.stages * (3 if rg else 2) * h * dtype.itemsize
        assert k["smem"] * config.ctas_per_sm <= 227 * 1024


# ---------------------------------------------------------------------------------------------
# GPU: the kernels bit-exact with the numpy arithmetic


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_cases(norm_forward), ids=_case_id)
def test_forward_kernel_is_bit_exact(on_gpu, rng, case):
    lead, t, h, dtype, residual, weight = _tokens_setup(case)
    x, r, w = _inputs(rng, t, h, dtype, residual, weight, lead)
    out, rstd, ni = on_gpu(_forward_fn("tilelang", **case.kwargs), x, r, w)
    y, rs, s = _np_forward(x.reshape(-1, h), None if r is None else r.reshape(-1, h), w, EPS, case.kwargs["out_scale"])
    assert_bytes_equal(out, y.reshape(x.shape))
    assert_bytes_equal(ni, s.reshape(x.shape))
    assert (rstd is None) == (not case.kwargs["with_rstd"])
    if case.kwargs["with_rstd"]:
        assert_bytes_equal(rstd, rs.reshape(x.shape[:-1]))


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_cases(norm_forward_and_per_token_cast), ids=_case_id)
def test_cast_kernel_is_bit_exact(on_gpu, rng, case):
    lead, t, h, dtype, residual, weight = _tokens_setup(case)
    layout, with_out, with_rstd = _layout(case.kwargs), case.kwargs["with_out_bf16"], case.kwargs["with_rstd"]
    x, r, w = _inputs(rng, t, h, dtype, residual, weight, lead)
    (data, sf), out, rstd, ni = on_gpu(_cast_fn("tilelang", **case.kwargs), x, r, w)
    y, rs, s = _np_forward(x.reshape(-1, h), None if r is None else r.reshape(-1, h), w, EPS, 1.0)
    assert_bytes_equal(ni, s.reshape(x.shape))
    assert (out is None) == (not with_out) and (rstd is None) == (not with_rstd)
    if with_out:
        assert_bytes_equal(out, y.reshape(x.shape))
    if with_rstd:
        assert_bytes_equal(rstd, rs.reshape(x.shape[:-1]))
    q, stored = _np_cast(y, layout)  # y as the forward kernel computes it (test_forward_kernel_is_bit_exact)
    assert_bytes_equal(data, q.reshape(x.shape))
    assert_bytes_equal(sf, stored.reshape(sf.shape) if layout.startswith("row") else stored)
    if t and dtype == BF16:  # the JAX reference (on the host) is exact for bf16 inputs too
        (data_ref, sf_ref), *_ = _host(_cast_fn("xla", **case.kwargs), x, r, w)
        assert_bytes_equal(data, data_ref)
        assert_bytes_equal(sf, sf_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_cases(norm_backward), ids=_case_id)
def test_backward_kernel_is_bit_exact(on_gpu, rng, case):
    _, x, w, _, rg = case.args
    (t, h), dtype, out_scale = x.shape, np.dtype(x.dtype), case.kwargs["out_scale"]
    x, g, w = _inputs(rng, t, h, dtype, rg is not None, w is not None)
    dy = rng.standard_normal((t, h), np.float32).astype(dtype)
    rstd = (np.abs(rng.standard_normal(t)) + 0.5).astype(np.float32)
    dx, dw = on_gpu(_backward_fn("tilelang", **case.kwargs), dy, x, w, rstd, g)
    dx_np, contrib = _np_backward(dy, x, w, rstd, g, out_scale)
    assert_bytes_equal(dx, dx_np)
    assert (dw is None) == (w is None)
    if w is not None:
        assert_bytes_equal(dw, _np_dw(contrib, dtype, g is not None))
        _, dw_ref = _host(_backward_fn("xla", **case.kwargs), dy, x, w, rstd, g)  # the reference models the same reduction
        assert_bytes_equal(dw, dw_ref)


@pytest.mark.gpu
def test_rms_norm_gradients_on_gpu(on_gpu, rng):
    t, h = 4101, 7168
    x, r, w = _inputs(rng, t, h, BF16)

    def program(x, w, r, impl):
        return jax.value_and_grad(_loss, argnums=(0, 1, 2))(x, w, r, impl)

    loss, (dx, dw, dr) = on_gpu(lambda x, w, r: program(x, w, r, "tilelang"), x, w, r)
    # the kernels' arithmetic in numpy: forward, then backward with the loss's (exact) cotangents
    y, rstd, s = _np_forward(x, r, w, EPS, 1.5)
    c = np.round(np.cos(np.arange(h)) * 64).astype(np.float32) / 64
    d_out = np.broadcast_to(c, (t, h)).astype(BF16)
    d_ni = (s.astype(np.float32) / 4).astype(BF16)
    dx_np, contrib = _np_backward(d_out, s, w, rstd, d_ni, 1.5)
    assert_bytes_equal(dx, dx_np)
    assert_bytes_equal(dr, dx_np)
    assert_bytes_equal(dw, _np_dw(contrib, BF16, True).astype(BF16))
    expected_loss = (y.astype(np.float64) * c).sum() + (s.astype(np.float64) ** 2).sum() / 8
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    _, (adx, adw, adr) = _host(lambda x, w, r: program(x, w, r, "xla"), x, w, r)  # autodiff of the reference
    assert calc_diff(dx, adx) < 1e-4 and calc_diff(dw, adw) < 1e-4 and calc_diff(dr, adr) < 1e-4


@pytest.mark.gpu
def test_vmap_and_three_d_on_gpu(on_gpu, rng):
    x, r, w = _inputs(rng, 1000, 4096, BF16, lead=(3,))

    def program(x, r, w):
        vm = jax.vmap(lambda x, r: norm_forward(x, w, EPS, residual=r, with_rstd=True, impl="tilelang"))(x, r)
        cast = norm_forward_and_per_token_cast(x, w, EPS, residual=r, round_sf=True, impl="tilelang")
        return vm, cast

    vm, ((data, sf), _, _, _) = on_gpu(program, x, r, w)
    y, rs, s = _np_forward(x.reshape(3000, 4096), r.reshape(3000, 4096), w, EPS, 1.0)
    for a, b in zip(vm, (y, rs, s)):
        assert_bytes_equal(np.asarray(a).reshape(b.shape), b)
    q, stored = _np_cast(y, "row_round")
    assert_bytes_equal(np.asarray(data).reshape(3000, 4096), q)
    assert_bytes_equal(np.asarray(sf).reshape(3000, -1), stored)
