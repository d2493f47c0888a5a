"""jax_tilek.engram.sinkhorn_momentum (the optax transform) against a plain-JAX implementation of the
same update over many steps; chaining, optax.multi_transform, untouched rows; on a GPU, the kernels
against the references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

optax = pytest.importorskip("optax")

from jax_tilek import engram


def plain_sinkhorn_momentum(lr, beta1=0.95, nesterov=True, iterations=5, eps=1e-20, alpha=None):
    """The update written out in plain JAX (fp32 momentum): momentum, row/column Sinkhorn steps with
    the zero-row/-column guards, the final row normalisation times alpha, then -lr."""

    def one(g, m):
        r, d = int(np.prod(g.shape[:-1])), g.shape[-1]
        g32 = g.astype(jnp.float32)
        m = beta1 * m + (1 - beta1) * g32
        x = (beta1 * m + (1 - beta1) * g32 if nesterov else m).reshape(r, d)
        rs, cs = jnp.ones(r), jnp.ones(d)
        for _ in range(iterations):
            norm = jnp.sqrt(jnp.sum((rs[:, None] * x * cs) ** 2, 1))
            rs = jnp.where(norm == 0, 0.0, rs / (norm + eps))
            colsq = jnp.sum((rs[:, None] * x * cs) ** 2, 0)
            cs = jnp.where(colsq == 0, 0.0, cs / (jnp.sqrt(colsq * (d / r)) + eps))
        norm = jnp.sqrt(jnp.sum((rs[:, None] * x * cs) ** 2, 1))
        a = np.sqrt(d) if alpha is None else alpha
        out = (a * rs / (norm + eps))[:, None] * x * cs
        return (-lr * out).reshape(g.shape).astype(g.dtype), m

    def init(params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def update(grads, state, params=None):
        leaves, tree = jax.tree.flatten(grads)
        pairs = [one(g, m) for g, m in zip(leaves, tree.flatten_up_to(state))]
        return tree.unflatten([u for u, _ in pairs]), tree.unflatten([m for _, m in pairs])

    return optax.GradientTransformation(init, update)


def _params(rng):
    return {"table": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), "proj": jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)}


def _grads(rng, params, step):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    g["table"] = g["table"].at[5:9].set(0)  # rows no token touched: zero momentum forever
    if step % 3 == 0:
        g["table"] = g["table"].at[:, 3].set(0)
    return g


def _run(tx, params, steps, seed=0):
    rng = np.random.default_rng(seed)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    history = []
    for k in range(steps):
        params, state = step(params, state, _grads(rng, params, k))
        history.append(params)
    return history


@pytest.mark.parametrize("nesterov,iterations", [(True, 5), (False, 2), (True, 0)])
def test_matches_plain_jax_over_many_steps(nesterov, iterations):
    params = _params(np.random.default_rng(1))
    ours = _run(optax.chain(optax.clip_by_global_norm(10.0), engram.sinkhorn_momentum(0.01, 0.9, nesterov, iterations)), params, 25)
    plain = _run(optax.chain(optax.clip_by_global_norm(10.0), plain_sinkhorn_momentum(0.01, 0.9, nesterov, iterations)), params, 25)
    for k, (a, b) in enumerate(zip(ours, plain)):
        for name in a:
            np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=2e-5, atol=2e-5, err_msg=f"step {k} {name}")
    final = ours[-1]["table"]
    assert np.all(np.isfinite(np.asarray(final)))
    np.testing.assert_array_equal(np.asarray(final[5:9]), np.asarray(params["table"][5:9]))  # untouched rows do not move


def test_update_shape_dtype_and_row_norms():
    """One update of a fresh state: rows of norm alpha = sqrt(D) (unit RMS), the gradient's dtype; the
    momentum in bf16 when asked."""
    rng = np.random.default_rng(2)
    g = {"t": jnp.asarray(rng.standard_normal((40, 24)), jnp.bfloat16)}
    tx = engram.sinkhorn_momentum(iterations=3, momentum_dtype=jnp.bfloat16)
    state = tx.init(g)
    assert state.momentum["t"].dtype == jnp.bfloat16
    u, state = jax.jit(tx.update)(g, state)
    assert u["t"].dtype == jnp.bfloat16 and u["t"].shape == (40, 24)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u["t"], np.float64), axis=1), np.sqrt(24), rtol=2e-2)


def test_multi_transform_routes_only_the_tables():
    rng = np.random.default_rng(3)
    params = _params(rng)
    labels = {"table": "engram", "proj": "rest"}
    tx = optax.multi_transform({"engram": engram.sinkhorn_momentum(0.01), "rest": optax.sgd(0.1)}, labels)
    ref = optax.multi_transform({"engram": plain_sinkhorn_momentum(0.01), "rest": optax.sgd(0.1)}, labels)
    a, b = _run(tx, params, 6), _run(ref, params, 6)
    for name in params:
        np.testing.assert_allclose(np.asarray(a[-1][name]), np.asarray(b[-1][name]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(iterations=-1), ValueError, "iterations must be >= 0"),
        (dict(momentum_dtype=jnp.float16), ValueError, "momentum_dtype must be bfloat16 or float32"),
        (dict(nesterov=0), TypeError, "nesterov must be True or False"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        engram.sinkhorn_momentum(**kwargs)


def test_bad_leaf_names_multi_transform():
    tx = engram.sinkhorn_momentum()
    with pytest.raises(ValueError, match="multiple of 4 .*multi_transform"):
        tx.init({"bias": jnp.zeros((6,))})


# ---------------------------------------------------------------------------------------------
# GPU: the transform on the kernels against the same transform on the references.


def gpu_update(impl, iterations=5):
    tx = engram.sinkhorn_momentum(beta1=0.95, iterations=iterations, impl=impl)
    return lambda g, m: tx.update({"t": g}, engram.SinkhornMomentumState({"t": m}))


GPU_SHAPES = [(100001, 512), (1001, 5120), (37, 100)]
GPU_PROGRAMS = [(gpu_update("tilelang"), (jax.ShapeDtypeStruct(s, jnp.float32), jax.ShapeDtypeStruct(s, jnp.float32))) for s in GPU_SHAPES]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_transform_matches_reference(rng, on_gpu, shape):
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32).at[:3].set(0)
    m = jnp.asarray(rng.standard_normal(shape), jnp.float32).at[:3].set(0)
    got = on_gpu(gpu_update("tilelang"), g, m)
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.jit(gpu_update("xla"))(g, m)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_transform_lowers_to_the_kernels():
    """Per leaf: the momentum kernel, two launches per iteration (step, column update), the finalize."""
    from jax_tilek.testing import lower_for_cuda, tilek_calls

    s = jax.ShapeDtypeStruct((1000, 64), jnp.float32)
    calls = tilek_calls(lower_for_cuda(gpu_update(None, iterations=3), s, s))
    names = [c["name"] for c in calls]
    assert names == ["engram_sinkhorn_momentum"] + ["engram_sinkhorn_step", "engram_sinkhorn_reduce"] * 3 + ["engram_sinkhorn_finalize"], names
