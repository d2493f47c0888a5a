"""jax_tilek.nnx.EngramGate (in jax_tilek.nnx._engram) against the same layer written out in plain
JAX/NumPy: n-gram ids, hashing, lookup, projection and gate; gradients through the custom VJP;
image tokens; the tables sharded on a mesh; training the table with sinkhorn_momentum through
optax.multi_transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_tilek import engram  # noqa: E402
from jax_tilek.nnx._engram import EngramGate, is_table, ngram_token_ids  # noqa: E402

VOCAB = [[97, 131], [61, 89]]  # N = 3, Tb = 2
HIDDEN, HC, DIM = 64, 2, 8


def layer(impl=None, param_dtype=jnp.float32, seed=0, pad_rows_to=1):
    return EngramGate(HIDDEN, HC, VOCAB, DIM, impl=impl, param_dtype=param_dtype, pad_rows_to=pad_rows_to, rngs=nnx.Rngs(seed))


def inputs(rng, b=2, s=16):
    tokens = rng.integers(0, 50_000, (b, s))
    x = jnp.asarray(rng.standard_normal((b, s, HC, HIDDEN)), jnp.bfloat16)
    mask = rng.random((b, s)) < 0.2
    return tokens, x, mask


def test_ngram_token_ids():
    ids = np.asarray(ngram_token_ids(np.array([[5, 6, 7, 8]]), 3, pad_id=-9))
    np.testing.assert_array_equal(ids[0], [[5, -9, -9], [6, 5, -9], [7, 6, 5], [8, 7, 6]])


def plain_layer(m: EngramGate, x, ids, mask):
    """The layer written out: NumPy int64 hash, lookup, projection (in m.dtype), the gate reference."""
    n = m.max_ngram_size
    flat = np.asarray(ids).reshape(-1, n).astype(np.int64)
    mult = np.asarray(m.multipliers, np.int64)
    with np.errstate(over="ignore"):
        prod = flat * mult
    h, cols, base = prod[:, 0].copy(), [], 0
    for i in range(1, n):
        h ^= prod[:, i]
        for v in VOCAB[i - 1]:
            cols.append(h % v + base)
            base += v
    idx = np.stack(cols, 1)
    rows = np.asarray(m.table[...])[idx].reshape(len(idx), -1)
    kv = (jnp.asarray(rows).astype(m.dtype) @ m.w_kv[...].astype(m.dtype)).astype(jnp.bfloat16)
    out = engram.engram_gate(x.reshape(-1, HC, HIDDEN), kv, m.weight_hidden[...], m.weight_embed[...], m.clamp_value, m.eps,
                             np.asarray(mask).reshape(-1), impl="xla")  # fmt: skip
    return out.reshape(x.shape)


def test_forward_matches_plain_layer():
    rng = np.random.default_rng(0)
    tokens, x, mask = inputs(rng)
    m = layer()
    ids = ngram_token_ids(tokens, 3)
    got = nnx.jit(lambda m, x, i, k: m(x, i, k))(m, x, ids, mask)
    want = plain_layer(m, x, ids, mask)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(got)[mask].view(np.uint16), np.asarray(x)[mask].view(np.uint16))


def _loss(m, x, ids, mask, w):
    return jnp.sum(m(x, ids, mask).astype(jnp.float32) * w)


def test_gradients_match_the_reference_layer():
    """nnx.grad through the kernels' custom VJPs (references on this machine) against the layer on
    impl='xla' (JAX differentiates the gate reference); image tokens' rows get no gradient."""
    rng = np.random.default_rng(1)
    tokens, x, mask = inputs(rng)
    ids = ngram_token_ids(tokens, 3)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    grads = [nnx.jit(nnx.grad(_loss))(layer(impl), x, ids, mask, w) for impl in (None, "xla")]
    for name in ("table", "w_kv", "weight_hidden", "weight_embed"):
        a, b = np.asarray(grads[0][name][...]), np.asarray(grads[1][name][...])
        assert np.all(np.isfinite(a)) and np.any(a)
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())
    only_masked = np.ones_like(mask)
    g = nnx.grad(_loss)(layer(), x, ids, only_masked, w)
    assert not np.any(np.asarray(g["table"][...])) and not np.any(np.asarray(g["w_kv"][...]))


def test_tables_shard_on_a_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets --xla_force_host_platform_device_count=8)")
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    rng = np.random.default_rng(2)
    tokens, x, mask = inputs(rng, b=2, s=8)
    ids = ngram_token_ids(tokens, 3)
    plain = layer(pad_rows_to=8)
    assert plain.table.shape == (384, DIM)  # 378 rows padded
    with jax.set_mesh(mesh), nnx.logical_axis_rules((("engram_rows", "model"), ("embed", None))):
        m = layer(pad_rows_to=8)
        specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
        assert specs["table"].get_value() == P("model", None) and m.table.sharding.spec == P("model", None)
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        y = nnx.jit(lambda m, x, i, k: m(x, i, k))(m, xs, ids, mask)
        g = nnx.jit(nnx.grad(_loss))(m, xs, ids, mask, jnp.ones(x.shape))
    y0 = plain(x, ids, mask)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
    assert np.isfinite(np.asarray(g["table"][...])).all()


def test_trains_the_table_with_sinkhorn_momentum():
    """optax.multi_transform: Sinkhorn momentum for the table (is_table), Adam for the rest; the loss
    falls and untouched table rows stay where they were."""
    rng = np.random.default_rng(3)
    tokens, x, mask = inputs(rng, b=4, s=32)
    ids = ngram_token_ids(tokens, 3)
    target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    m = layer()
    params = nnx.state(m, nnx.Param)
    labels = jax.tree_util.tree_map_with_path(lambda path, _: "engram" if is_table(path) else "rest", params)
    assert sum(v == "engram" for v in jax.tree.leaves(labels)) == 1
    tx = optax.multi_transform({"engram": engram.sinkhorn_momentum(0.05, iterations=3), "rest": optax.adam(1e-2)}, labels)
    opt = tx.init(params)
    before = np.asarray(m.table[...]).copy()

    def loss(m):
        return jnp.mean((m(x, ids, mask).astype(jnp.float32) - target) ** 2)

    @nnx.jit
    def step(m, opt):
        value, grads = nnx.value_and_grad(loss)(m)
        params = nnx.state(m, nnx.Param)
        updates, opt = tx.update(nnx.state(grads, nnx.Param), opt, params)
        nnx.update(m, optax.apply_updates(params, updates))
        return value, opt

    losses = []
    for _ in range(15):
        value, opt = step(m, opt)
        losses.append(float(value))
    assert losses[-1] < losses[0] and np.all(np.isfinite(losses))
    used = np.unique(np.asarray(m.indices(ids.reshape(-1, 3), mask.reshape(-1))))
    untouched = np.setdiff1d(np.arange(before.shape[0]), used)
    assert untouched.size
    np.testing.assert_array_equal(np.asarray(m.table[...])[untouched], before[untouched])


# ---------------------------------------------------------------------------------------------
# GPU: the layer's forward and gradients on the kernels against the references.


def _gpu_program(impl):
    def run(x, ids, mask, w):
        m = EngramGate(512, 4, [[1 << 20, 1 << 19], [1 << 18, 1 << 18]], 64, impl=impl, rngs=nnx.Rngs(0))
        return nnx.value_and_grad(_loss)(m, x, ids, mask, w)

    return run


GPU_ARGS = (jax.ShapeDtypeStruct((2, 40, 4, 512), jnp.bfloat16), jax.ShapeDtypeStruct((2, 40, 3), jnp.int32),
            jax.ShapeDtypeStruct((2, 40), jnp.bool_), jax.ShapeDtypeStruct((2, 40, 4, 512), jnp.float32))  # fmt: skip
GPU_PROGRAMS = [(_gpu_program("tilelang"), GPU_ARGS)]


@pytest.mark.gpu
def test_gpu_layer_matches_reference(rng, on_gpu):
    tokens = rng.integers(0, 100_000, (2, 40))
    x = jnp.asarray(rng.standard_normal((2, 40, 4, 512)), jnp.bfloat16)
    ids, mask = ngram_token_ids(tokens, 3), rng.random((2, 40)) < 0.2
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    got = on_gpu(_gpu_program("tilelang"), x, ids, mask, w)
    with jax.default_device(jax.devices("cpu")[0]):
        want = jax.jit(_gpu_program("xla"))(x, ids, mask, w)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-3)
    for name in ("table", "w_kv", "weight_hidden", "weight_embed"):
        a, b = np.asarray(got[1][name][...]), np.asarray(want[1][name][...])
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())
