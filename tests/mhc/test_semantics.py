"""mHC semantics beyond the contract: TileKernels' torch-reference math (in float64 numpy), Sinkhorn
double stochasticity, big-fuse and recompute bit-exact against the step-by-step path, gradients in
float64, and argument errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek import mhc

BF16 = ml_dtypes.bfloat16


def _res(rng, shape):
    return (rng.standard_normal(shape) * 2).astype(BF16)


def test_sinkhorn_doubly_stochastic_and_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4, 4)).astype(np.float32)
    out = np.asarray(mhc.sinkhorn_normalize(x, repeat=10, eps=1e-6))
    np.testing.assert_allclose(out.sum(-2), 1.0, atol=1e-5)  # the last step normalises columns
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-2)  # rows: within the last step's change
    y = np.exp(x - x.max(-1, keepdims=True)).astype(np.float64)
    y = y / y.sum(-1, keepdims=True) + 1e-6
    y = y / (y.sum(-2, keepdims=True) + 1e-6)
    for _ in range(9):
        y = y / (y.sum(-1, keepdims=True) + 1e-6)
        y = y / (y.sum(-2, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)


def test_split_mixes_and_head_match_numpy():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((2, 5, 24)).astype(np.float32)
    s, b = rng.standard_normal(3).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    pre, post, comb = mhc.mhc_pre_split_mixes(m, s, b, 4, 2.0, 1e-2)
    z = m.astype(np.float64) * np.concatenate([np.full(4, s[0]), np.full(4, s[1]), np.full(16, s[2])]) + b
    sig = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(pre[..., 0], sig[..., :4] + 1e-2, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(post[..., 0], sig[..., 4:8] * 2, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(comb, z[..., 8:].reshape(2, 5, 4, 4), rtol=1e-5, atol=2e-5)
    h = mhc.mhc_head_compute_mix(m[..., :4], s[:1], b[:4], 1e-2)
    np.testing.assert_allclose(h, 1 / (1 + np.exp(-(m[..., :4].astype(np.float64) * s[0] + b[:4]))) + 1e-2, rtol=1e-5, atol=1e-5)


def test_apply_mix_post_norm_fn_match_numpy():
    rng = np.random.default_rng(2)
    res, x = _res(rng, (3, 4, 64)), _res(rng, (3, 64))
    mix = rng.random((3, 4, 1)).astype(np.float32)
    comb = rng.random((3, 4, 4)).astype(np.float32)
    r64, x64 = res.astype(np.float64), x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(mhc.mhc_pre_apply_mix(res, mix), np.float64), (r64 * mix).sum(-2), rtol=1e-2, atol=1e-2)
    want = x64[:, None] * mix + np.einsum("tmo,tmh->toh", comb, r64)
    np.testing.assert_allclose(np.asarray(mhc.mhc_post(x, res, mix, comb), np.float64), want, rtol=1e-2, atol=1e-2)
    fn = (rng.standard_normal((24, 256)) * 1e-2).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
    flat = r64.reshape(3, 256)
    want = flat @ (fn * w).T.astype(np.float64) / np.sqrt((flat**2).mean(-1, keepdims=True) + 1e-6)
    for splits in (1, 3, 16):
        np.testing.assert_allclose(mhc.mhc_pre_norm_fn(res, fn, w, 1e-6, splits), want, rtol=1e-3, atol=1e-3)


def _pre_inputs(rng, t=6, h=64, n=4, weight=True):
    c = n * (n + 2)
    return (
        _res(rng, (t, n, h)), (rng.standard_normal((c, n * h)) * 1e-2).astype(np.float32),
        (rng.standard_normal(3) * 0.5).astype(np.float32), (rng.standard_normal(c) * 0.5).astype(np.float32),
        (1 + 0.1 * rng.standard_normal(n * h)).astype(np.float32) if weight else None,
    )  # fmt: skip


@pytest.mark.parametrize("weight", [False, True])
def test_big_fuse_is_exactly_the_step_path(weight):
    res, fn, scale, base, w = _pre_inputs(np.random.default_rng(3), weight=weight)
    kw = dict(post_mult_value=2.0, pre_eps=1e-2, sinkhorn_eps=1e-6, sinkhorn_repeat=10)
    post, comb, li = jax.jit(lambda *a: mhc.mhc_pre_big_fuse(*a, rms_eps=1e-6, mhc_pre_eps=1e-2, mhc_sinkhorn_eps=1e-6,
                                                             mhc_post_mult_value=2.0, sinkhorn_repeat=10))(res, fn, scale, base, w)  # fmt: skip
    mixes = mhc.mhc_pre_norm_fn(res, fn, w, 1e-6)
    pre, post2, comb2 = mhc.mhc_pre_split_mixes(mixes, scale, base, 4, kw["post_mult_value"], kw["pre_eps"])
    comb2 = mhc.sinkhorn_normalize(comb2, 10, 1e-6)
    li2 = mhc.mhc_pre_apply_mix(res, pre)
    for a, b in ((post, post2), (comb, comb2), (li, li2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    li3, (post3, comb3) = mhc.mhc_pre(res, fn, scale, base, w, **kw)
    np.testing.assert_array_equal(np.asarray(li3), np.asarray(li))
    if weight:  # norm_weight is honoured (TileKernels' big-fuse drops it)
        _, _, li_unweighted = mhc.mhc_pre_big_fuse(res, fn, scale, base, None)
        assert not np.array_equal(np.asarray(li_unweighted), np.asarray(mhc.mhc_pre_big_fuse(res, fn, scale, base, w)[2]))


@pytest.mark.parametrize("layers,post_layers", [(1, 1), (3, 2), (3, 3)])
def test_recompute_is_exactly_the_loop(layers, post_layers):
    rng = np.random.default_rng(4)
    res = _res(rng, (2, 3, 4, 64))
    pre = [rng.random((2, 3, 4, 1)).astype(np.float32) for _ in range(layers)]
    outs = [_res(rng, (2, 3, 64)) for _ in range(post_layers)]
    post = [rng.random((2, 3, 4, 1)).astype(np.float32) * 2 for _ in range(post_layers)]
    comb = [rng.random((2, 3, 4, 4)).astype(np.float32) for _ in range(post_layers)]
    inputs, residuals = jax.jit(mhc.mhc_multilayer_recompute)(res, pre, outs, post, comb)
    assert len(inputs) == layers and len(residuals) == post_layers
    r = res
    for i in range(layers):
        np.testing.assert_array_equal(np.asarray(inputs[i]), np.asarray(mhc.mhc_pre_apply_mix(r, pre[i])))
        if i < post_layers:
            r = mhc.mhc_post(outs[i], r, post[i], comb[i])
            np.testing.assert_array_equal(np.asarray(residuals[i]), np.asarray(r))


def test_pre_post_block_gradients_match_float64():
    """d loss of a whole block (expand -> pre -> layer -> post -> head) through the custom VJPs,
    against jax.grad of the same math written in float64 (no bf16 rounding of the stream)."""
    rng = np.random.default_rng(5)
    t, n, h = 4, 4, 32
    emb = _res(rng, (t, h))
    fn = (rng.standard_normal((24, n * h)) * 1e-1).astype(np.float32)
    scale, base = (rng.standard_normal(3) * 0.5).astype(np.float32), (rng.standard_normal(24) * 0.5).astype(np.float32)
    hfn = (rng.standard_normal((n, n * h)) * 1e-1).astype(np.float32)
    hs, hb = np.float32([0.7]), (rng.standard_normal(n) * 0.5).astype(np.float32)
    w = (rng.standard_normal((t, h)) * 0.1).astype(np.float32)

    def block(fn, scale, base, hfn, hb):
        res = mhc.expand_from_embedding(emb, n)
        li, (post, comb) = mhc.mhc_pre(res, fn, scale, base, post_mult_value=2.0, pre_eps=1e-2)
        res = mhc.mhc_post(jnp.tanh(li.astype(jnp.float32)).astype(jnp.bfloat16), res, post, comb)
        return jnp.sum(mhc.mhc_head(res, hfn, hs, hb, pre_eps=1e-2).astype(jnp.float32) * w)

    def block64(fn, scale, base, hfn, hb):
        res = jnp.broadcast_to(jnp.asarray(emb, jnp.float64)[:, None], (t, n, h))

        def mixes(res, f):
            flat = res.reshape(t, n * h)
            return flat @ f.T / jnp.sqrt(jnp.mean(flat**2, -1, keepdims=True) + 1e-6)

        z = mixes(res, fn) * jnp.concatenate([jnp.full(4, scale[0]), jnp.full(4, scale[1]), jnp.full(16, scale[2])]) + base
        pre, post = jax.nn.sigmoid(z[:, :4]) + 1e-2, jax.nn.sigmoid(z[:, 4:8]) * 2
        c = jax.nn.softmax(z[:, 8:].reshape(t, 4, 4), -1) + 1e-6
        c = c / (c.sum(-2, keepdims=True) + 1e-6)
        for _ in range(9):
            c = c / (c.sum(-1, keepdims=True) + 1e-6)
            c = c / (c.sum(-2, keepdims=True) + 1e-6)
        li = jnp.einsum("ti,tih->th", pre, res)
        res = jnp.tanh(li)[:, None] * post[..., None] + jnp.einsum("tmo,tmh->toh", c, res)
        mix = jax.nn.sigmoid(mixes(res, hfn) * hs[0] + hb) + 1e-2
        return jnp.sum(jnp.einsum("ti,tih->th", mix, res) * w)

    args = (fn, scale, base, hfn, hb)
    got = jax.jit(jax.grad(block, argnums=range(5)))(*args)
    with jax.enable_x64(True):
        want = jax.grad(block64, argnums=range(5))(*(jnp.asarray(a, jnp.float64) for a in args))
    for g, e in zip(got, want):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=5e-2, atol=5e-2 * np.abs(e).max())


def _pre64(res, fn, scale, base, w, n, post_mult=2.0, pre_eps=1e-2, repeat=10, eps=1e-6):
    """mhc_pre in float64: ``(layer_input, post, comb)``."""
    t = res.shape[0]
    flat = res.reshape(t, -1)
    z = flat @ (fn * w).T / jnp.sqrt(jnp.mean(flat**2, -1, keepdims=True) + 1e-6)
    z = z * jnp.concatenate([jnp.full(n, scale[0]), jnp.full(n, scale[1]), jnp.full(n * n, scale[2])]) + base
    pre, post = jax.nn.sigmoid(z[:, :n]) + pre_eps, jax.nn.sigmoid(z[:, n : 2 * n]) * post_mult
    c = jax.nn.softmax(z[:, 2 * n :].reshape(t, n, n), -1) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(repeat - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return jnp.einsum("ti,tih->th", pre, res), post[..., None], c


def _with_gemm(algorithm, f):
    """``f`` traced with ``_norm_fn.GEMM_PRECISION = algorithm``."""
    from jax_tilek.mhc import _norm_fn

    def traced(*args):
        saved, _norm_fn.GEMM_PRECISION = _norm_fn.GEMM_PRECISION, algorithm
        try:
            return f(*args)
        finally:
            _norm_fn.GEMM_PRECISION = saved

    return traced


def _pre_loss(pre, cts):
    def f(*a):
        return sum(jnp.sum(v * c.astype(v.dtype)) for v, c in zip(pre(*a), cts))

    return f


def _pre_grad(algorithm, n, alias):
    """jax.grad of mhc_pre against cotangents ``(d layer_input, d post, d comb[, d residual alias])``
    in every input."""

    def ours(r, f, s, b, w):
        li, (post, comb), *res = mhc.mhc_pre(r, f, s, b, w, mhc_mult=n, post_mult_value=2.0, pre_eps=1e-2, return_residual=alias)
        return li.astype(jnp.float32), post, comb, *(x.astype(jnp.float32) for x in res)

    return jax.jit(_with_gemm(algorithm, lambda *a: jax.grad(_pre_loss(ours, a[5:]), argnums=range(5))(*a[:5])))


FUSED_SHAPES = [(5, 4, 40), (130, 2, 264)]
FUSED_VARIANTS = [("split_bf16", False), ("highest", False), ("split_bf16", True)]


def _pre_structs(t, n, h, alias):
    f32, m = jnp.float32, n * (n + 2)
    shapes = [(m, n * h), (3,), (m,), (n * h,), (t, h), (t, n, 1), (t, n, n)] + ([(t, n, h)] if alias else [])
    return (jax.ShapeDtypeStruct((t, n, h), jnp.bfloat16), *(jax.ShapeDtypeStruct(s, f32) for s in shapes))


@pytest.mark.parametrize("algorithm,alias", FUSED_VARIANTS)
@pytest.mark.parametrize("t,n,h", FUSED_SHAPES)
def test_pre_fused_backward_matches_float64(algorithm, alias, t, n, h):
    """mhc_pre's backward (the residual's cotangent in one kernel, mhc_pre_residual_bwd; on the CPU its
    reference) against float64 autodiff in every input, the residual included (with ``alias``, plus
    the cotangent of the returned residual); T not a multiple of the kernel's 128 tokens, nH not a
    multiple of its 256 columns."""
    rng = np.random.default_rng(11)
    m = n * (n + 2)
    res = _res(rng, (t, n, h))
    fn = (rng.standard_normal((m, n * h)) * 1e-1).astype(np.float32)
    scale, base = (rng.standard_normal(3) * 0.5).astype(np.float32), (rng.standard_normal(m) * 0.5).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(n * h)).astype(np.float32)
    cts = [rng.standard_normal(s).astype(np.float32) for s in ((t, h), (t, n, 1), (t, n, n), (t, n, h))[: 4 if alias else 3]]
    for i in (0, 3)[: 2 if alias else 1]:  # the bf16 outputs' cotangents are bf16: exact in both
        cts[i] = cts[i].astype(BF16).astype(np.float32)
    args = (res, fn, scale, base, w, *cts)
    grad = _pre_grad(algorithm, n, alias)
    assert "mhc_pre_residual_bwd" in str(jax.make_jaxpr(grad)(*args))
    got = grad(*args)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in (res, fn, scale, base, w)]
        want = jax.grad(_pre_loss(lambda *a: (*_pre64(*a, n), a[0]), cts), argnums=range(5))(*args64)
    assert got[0].dtype == jnp.bfloat16
    for i, (g, e) in enumerate(zip(got, want)):  # dx rounded once to bf16; its RMS term 2 x d sqrsum is ~1% of it
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=1e-2, atol=(1e-3 if i == 0 else 5e-3) * np.abs(e).max())


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: mhc.expand_to_mhc(np.zeros((4, 64), BF16), 9), "mhc_mult must be in"),
        (lambda: mhc.expand_to_mhc(np.zeros((4, 60), BF16), 4), "multiple of 8"),
        (lambda: mhc.expand_to_mhc(np.zeros((4, 64), np.float32), 4), "must be bfloat16"),
        (lambda: mhc.sinkhorn_normalize(np.zeros((4, 3, 4), np.float32)), r"\[..., n, n\]"),
        (lambda: mhc.sinkhorn_normalize(np.zeros((4, 4, 4), np.float32), repeat=0), "repeat"),
        (lambda: mhc.sinkhorn_normalize(np.zeros((4, 4, 4), BF16)), "float32"),
        (lambda: mhc.mhc_pre_apply_mix(np.zeros((2, 4, 64), BF16), np.zeros((2, 3, 1), np.float32)), "mix must have shape"),
        (lambda: mhc.mhc_post(np.zeros((2, 64), BF16), np.zeros((2, 4, 64), BF16), np.zeros((2, 4, 1), np.float32),
                              np.zeros((2, 4, 3), np.float32)), "comb_res_mix"),  # fmt: skip
        (lambda: mhc.mhc_pre_split_mixes(np.zeros((2, 23), np.float32), np.zeros(3, np.float32), np.zeros(24, np.float32), 4, 1.0, 1e-6),
         "input_mixes"),  # fmt: skip
        (lambda: mhc.mhc_pre_norm_fn(np.zeros((2, 4, 64), BF16), np.zeros((24, 255), np.float32), None, 1e-6), "fn must be"),
        (lambda: mhc.mhc_pre_norm_fn(np.zeros((2, 4, 64), BF16), np.zeros((24, 256), np.float32), None, 1e-6, 0), "n_splits"),
        (lambda: mhc.mhc_pre(*_pre_inputs(np.random.default_rng(0), n=4)[:4], mhc_mult=2), "streams"),
        (lambda: mhc.mhc_multilayer_recompute(np.zeros((2, 4, 64), BF16), [np.zeros((2, 4, 1), np.float32)] * 3, [], [], []), "L_post"),
        (lambda: mhc.mhc_head_compute_mix(np.zeros((2, 4), np.float32), np.zeros(2, np.float32), np.zeros(4, np.float32), 1e-2), "one value"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("splits", [1, 4])
def test_split_bf16_products_match_float64_with_gradients(splits):
    """The partials GEMM on bf16 tensor cores (fn in three bf16 parts) is fp32-accurate per split of
    the columns, and so is its custom backward against float64 autodiff (dx to its bf16 rounding)."""
    from jax_tilek.mhc import _norm_fn

    rng = np.random.default_rng(7)
    x = _res(rng, (37, 320))
    fn = (rng.standard_normal((24, 320)) * 1e-2).astype(np.float32)
    dmul, dsq = rng.standard_normal((37, splits, 24)).astype(np.float32), rng.standard_normal((37, splits)).astype(np.float32)
    x64, fn64 = x.astype(np.float64).reshape(37, splits, -1), fn.astype(np.float64).reshape(24, splits, -1)
    parts = jax.jit(lambda a: [p.astype(jnp.float32) for p in _norm_fn.bf16_parts(a, 3)])(fn)
    np.testing.assert_array_equal((parts[0] + parts[1]) + parts[2], fn)  # three parts hold fp32 exactly
    mul, sq = _norm_fn.split_bf16_products(jnp.asarray(x), jnp.asarray(fn), splits)
    assert mul.shape == (37, splits, 24) and sq.shape == (37, splits)
    bound = 1e-6 * np.einsum("tsc,msc->tsm", np.abs(x64), np.abs(fn64))
    assert np.all(np.abs(np.asarray(mul, np.float64) - np.einsum("tsc,msc->tsm", x64, fn64)) <= bound)  # fp32 accuracy
    np.testing.assert_allclose(sq, (x64**2).sum(2), rtol=1e-6)
    _, vjp = jax.vjp(lambda x, fn: _norm_fn.split_bf16_products(x, fn, splits), jnp.asarray(x), jnp.asarray(fn))
    dx, dfn = vjp((jnp.asarray(dmul), jnp.asarray(dsq)))
    assert dx.dtype == jnp.bfloat16 and dfn.dtype == jnp.float32
    want_dx = np.einsum("tsm,msc->tsc", dmul.astype(np.float64), fn64) + 2 * x64 * dsq[..., None]
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx.reshape(37, 320), rtol=8e-3, atol=1e-6)
    np.testing.assert_allclose(dfn, np.einsum("tsm,tsc->msc", dmul.astype(np.float64), x64).reshape(24, 320), rtol=1e-4, atol=1e-4)


PRODUCTS_SHAPES = [(1, 4, 64), (130, 4, 256), (517, 2, 3584), (4099, 4, 1024)]  # T, n, H


def _products_call(t, n, h):
    from jax_tilek.mhc import _norm_fn

    return jax.jit(lambda x, fn: _norm_fn.products(x, fn, 16))


@pytest.mark.parametrize("t,n,h", PRODUCTS_SHAPES)
def test_products_match_float64_per_split(t, n, h):
    """The partials (the ``mhc_pre_norm_fn_products`` kernel on a GPU): each split's products to fp32
    accuracy and its sum of squares, for token counts off the 128-token tile and S > 1."""
    from jax_tilek.mhc import _products

    rng = np.random.default_rng(t)
    m, g = n * (n + 2), n * h
    x, fn = _res(rng, (t, g)), (rng.standard_normal((m, g)) * 1e-2).astype(np.float32)
    mul, sq = _products_call(t, n, h)(x, fn)
    s = _products.split_count(t, g)
    assert mul.shape == (s, t, m) and sq.shape == (s, t)
    x64, fn64 = x.astype(np.float64).reshape(t, s, -1), fn.astype(np.float64).reshape(m, s, -1)
    bound = 1e-5 * np.einsum("tsc,msc->stm", np.abs(x64), np.abs(fn64))  # fp32 sums (bf16 parts: ~4e-3)
    assert np.all(np.abs(np.asarray(mul, np.float64) - np.einsum("tsc,msc->stm", x64, fn64)) <= bound)
    np.testing.assert_allclose(sq, (x64**2).sum(2).T, rtol=2e-6)


def _norm_fn_grad(algorithm):
    f = lambda r, f, w: jnp.sum(jnp.sin(mhc.mhc_pre_norm_fn(r, f, w, 1e-6)))  # noqa: E731
    return jax.jit(_with_gemm(algorithm, jax.value_and_grad(f, argnums=(0, 1, 2))))


def test_split_bf16_path_matches_the_highest_path():
    """mhc_pre_norm_fn and its gradients agree whichever algorithm runs the partials GEMM."""
    rng = np.random.default_rng(8)
    res = _res(rng, (19, 4, 96))
    fn = (rng.standard_normal((24, 384)) * 1e-2).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(384)).astype(np.float32)

    (v1, g1), (v2, g2) = (_norm_fn_grad(a)(res, fn, w) for a in ("highest", "split_bf16"))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1[0], np.float32), np.asarray(g2[0], np.float32), rtol=1e-2, atol=1e-4)
    for a, b in zip(g1[1:], g2[1:]):  # fp32 sums over tokens, in other orders
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(a))))


# What the GPU runs of these tests launch beyond the families' cases (tests/gpu_programs.py prepare).
_F32 = jnp.float32
GPU_PROGRAMS = [(_pre_grad(a, n, alias), _pre_structs(t, n, h, alias)) for a, alias in FUSED_VARIANTS for t, n, h in FUSED_SHAPES] + [
    (_norm_fn_grad(a), (jax.ShapeDtypeStruct((19, 4, 96), jnp.bfloat16), jax.ShapeDtypeStruct((24, 384), _F32), jax.ShapeDtypeStruct((384,), _F32)))
    for a in ("split_bf16", "highest")
] + [(_products_call(t, n, h), (jax.ShapeDtypeStruct((t, n * h), jnp.bfloat16), jax.ShapeDtypeStruct((n * (n + 2), n * h), _F32))) for t, n, h in PRODUCTS_SHAPES]
