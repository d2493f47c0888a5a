"""jax_tilek.nnx's mHC blocks (HyperConnection, hyper_expand, HyperHead) against the same math written
out in plain JAX, at init (a standard residual) and trained-like parameters, under nnx.jit/grad,
remat and split/merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_tilek.nnx import HyperConnection, HyperHead, RMSNorm, hyper_expand  # noqa: E402

H, N = 64, 4
REPEAT = 4  # Sinkhorn iterations: few, to keep the CPU compiles short
F32, BF16 = jnp.float32, jnp.bfloat16


def tanh_layer(x, w, aux: bool):
    y = jnp.tanh(x.astype(F32) @ w)
    return (y, jnp.mean(y * y)) if aux else y


class Tanh(nnx.Module):
    """A sub-layer ``tanh(x W)``; with ``aux``, it also returns ``mean(y²)`` like an MoE's (y, aux)."""

    def __init__(self, dim: int, *, aux: bool = False, seed: int = 1):
        self.w = nnx.Param(jax.random.normal(jax.random.key(seed), (dim, dim)) * dim**-0.5)
        self.aux = aux

    def __call__(self, x):
        return tanh_layer(x, self.w[...], self.aux)


def block(aux=False, remat=False, seed=0, impl="xla") -> HyperConnection:
    return HyperConnection(Tanh(H, aux=aux), H, N, sinkhorn_repeat=REPEAT, remat=remat, impl=impl, rngs=nnx.Rngs(seed))


def perturb(hc: HyperConnection, seed: int = 7) -> None:
    """Parameters away from init, so that every mix depends on the token."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    hc.scale[...] = jnp.array([0.8, 0.6, 1.5], F32)
    hc.base[...] = hc.base[...] + 0.3 * jax.random.normal(k1, hc.base.shape)
    hc.fn[...] = hc.fn[...] + 0.02 * jax.random.normal(k2, hc.fn.shape)


def residual(seed=3, lead=(2, 6)):
    return jax.random.normal(jax.random.key(seed), (*lead, N, H)).astype(BF16)


# ---------------------------------------------------------------------------------------------
# The same block in plain JAX.


def plain_sinkhorn(logits, repeat, eps):
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(repeat - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c


def plain_block(res, fn, scale, base, sublayer, hc: HyperConnection):
    n, h = res.shape[-2:]
    x = res.astype(F32)
    flat = x.reshape(*x.shape[:-2], n * h)
    mixes = (flat @ fn.T) * jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + hc.norm_eps)
    z = mixes * jnp.concatenate([jnp.full(n, scale[0]), jnp.full(n, scale[1]), jnp.full(n * n, scale[2])]) + base
    pre = jax.nn.sigmoid(z[..., :n]) + hc.pre_eps
    post = jax.nn.sigmoid(z[..., n : 2 * n]) * hc.post_mult_value
    comb = plain_sinkhorn(z[..., 2 * n :].reshape(*z.shape[:-1], n, n), hc.sinkhorn_repeat, hc.sinkhorn_eps)
    layer_input = jnp.einsum("...i,...ih->...h", pre, x).astype(BF16)
    out = sublayer(layer_input)
    y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    y = y.astype(BF16).astype(F32)
    new = (post[..., None] * y[..., None, :] + jnp.einsum("...mo,...mh->...oh", comb, x)).astype(BF16)
    return (new, *rest) if rest else new


def loss_of(out):
    new, aux = out if isinstance(out, tuple) else (out, 0.0)
    return jnp.sum(jnp.sin(new.astype(F32))) + 10.0 * aux


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


# ---------------------------------------------------------------------------------------------


def test_starts_as_a_standard_residual():
    """At init, on n equal streams: every stream becomes ``x + sublayer(x)`` and the head reads ``x``
    back (within the 1% dynamic part)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, H)).astype(BF16)
    stream = hyper_expand(x, N)
    assert stream.shape == (2, 8, N, H) and stream.dtype == BF16
    hc = block()
    want = x.astype(F32) + hc.sublayer(x)
    new = nnx.jit(lambda m, s: m(s))(hc, stream)
    assert new.shape == stream.shape and new.dtype == BF16
    for i in range(N):
        assert rel(new[..., i, :], want) < 0.02
    head = HyperHead(H, N, impl="xla", rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, s: m(s))(head, new)
    assert out.shape == (2, 8, H) and out.dtype == BF16
    assert rel(out, want) < 0.02
    assert rel(new[..., 0, :], new[..., 1, :]) > 0  # the streams' mixes differ per stream from the start


def test_matches_plain_jax_forward_and_gradients():
    """A (y, aux) sub-layer's block against plain JAX; ``remat=True`` recomputes the same gradients."""
    hc, again = block(aux=True), block(aux=True, remat=True)
    perturb(hc)
    perturb(again)
    res = residual()

    def with_output(out):
        return loss_of(out), out[0]

    ours = nnx.jit(nnx.value_and_grad(lambda m, r: with_output(m(r)), argnums=(0, 1), has_aux=True))
    (value, new), (g, g_res) = ours(hc, res)

    @jax.jit
    def theirs(fn, scale, base, w, res):
        return with_output(plain_block(res, fn, scale, base, lambda x: tanh_layer(x, w, aux=True), hc))

    params = (hc.fn[...], hc.scale[...], hc.base[...], hc.sublayer.w[...])
    (want_value, want_new), grads = jax.value_and_grad(theirs, argnums=tuple(range(5)), has_aux=True)(*params, res)
    assert new.dtype == BF16 and rel(new, want_new) < 1e-3
    assert float(value) == pytest.approx(float(want_value), rel=1e-4)
    got = (g["fn"][...], g["scale"][...], g["base"][...], g["sublayer"]["w"][...], g_res)
    for name, a, b in zip(("fn", "scale", "base", "w", "residual"), got, grads):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert rel(a, b) < (1e-2 if name == "residual" else 1e-4), name  # the residual's cotangents are summed in bf16

    (v1, _), (g1, r1) = ours(again, res)
    assert float(v1) == pytest.approx(float(value), rel=1e-6)
    for a, b in zip(jax.tree.leaves((nnx.state(g1, nnx.Param), r1)), jax.tree.leaves((nnx.state(g, nnx.Param), g_res))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


def test_a_small_model_trains_and_survives_split_merge():
    """expand -> two blocks (RMSNorm + sub-layer) -> head, trained a few steps with nnx.jit/grad; a
    split/merge round trip gives the same output and another seed differs until updated."""

    class Model(nnx.Module):
        def __init__(self, seed):
            rngs = nnx.Rngs(seed)
            self.blocks = nnx.List([
                HyperConnection(nnx.Sequential(RMSNorm(H, rngs=rngs), Tanh(H, seed=seed + i)), H, N, sinkhorn_repeat=REPEAT, impl="xla",
                                rngs=rngs) for i in range(2)
            ])  # fmt: skip
            self.head = HyperHead(H, N, impl="xla", rngs=rngs)

        def __call__(self, x):
            s = hyper_expand(x, N, impl="xla")
            for b in self.blocks:
                s = b(s)
            return self.head(s)

    x = jax.random.normal(jax.random.key(1), (4, 8, H)).astype(BF16)
    target = jnp.roll(x, 1, axis=-1).astype(F32)
    model = Model(0)
    opt = nnx.Optimizer(model, __import__("optax").adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x).astype(F32) - target) ** 2))(model)
        opt.update(model, g)
        return loss, g

    losses = []
    for _ in range(8):
        loss, g = step(model, opt)
        losses.append(float(loss))
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(nnx.state(g, nnx.Param)))
    assert losses[-1] < losses[0]

    run = nnx.jit(lambda m, x: m(x))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    np.testing.assert_array_equal(run(nnx.merge(graphdef, params, rest), x), run(model, x))
    other = Model(1)
    assert not np.array_equal(run(other, x), run(model, x))
    nnx.update(other, params, rest)
    np.testing.assert_array_equal(run(other, x), run(model, x))


def test_bad_inputs_raise():
    hc = block()
    with pytest.raises(ValueError, match=r"residual must be \[..., n, H\]"):
        hc(jnp.zeros((3, N, H + 8), BF16))
    with pytest.raises(ValueError, match="bfloat16"):
        hc(jnp.zeros((3, N, H), F32))
