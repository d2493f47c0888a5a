"""jax_tilek.nnx RotaryEmbedding (in jax_tilek/nnx/_rope.py): the table, the call against apply_rotary,
the table kept out of the parameters and gradients, errors, lowering to one launch for query and key."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek import rope
from jax_tilek.testing import assert_bytes_equal, lower_for_cuda, tilek_calls

nnx = pytest.importorskip("flax.nnx")
from jax_tilek.nnx._rope import RotaryCache, RotaryEmbedding  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def _qk(rng, b=2, s=6, hq=4, hk=2, d=128, dtype=BF16):
    return (rng.standard_normal((b, s, hq, d)) * 2).astype(dtype), (rng.standard_normal((b, s, hk, d)) * 2).astype(dtype)


def test_call_is_apply_rotary_with_its_table(rng):
    layer = RotaryEmbedding(64, 32, base=500.0, interleaved=True, columns=(-64, None))
    assert_bytes_equal(layer.cos_sin_cache[...], rope.make_cos_sin_cache(64, 32, base=500.0))
    q, k = _qk(rng, d=192)
    pos = rng.integers(0, 32, (2, 6)).astype(np.int32)
    got = layer(q, k[..., :64], pos)
    want = rope.apply_rotary(q, layer.cos_sin_cache[...], k[..., :64], pos, interleaved=True, columns=(-64, None))
    for a, b in zip(got, want):
        assert_bytes_equal(a, b)
    assert_bytes_equal(layer(q, seqlen_offset=3), rope.apply_rotary(q, layer.cos_sin_cache[...], interleaved=True, seqlen_offset=3,
                                                                    columns=(-64, None)))  # fmt: skip
    back = layer(*layer(q.astype(np.float32), k[..., :64].astype(np.float32), pos), pos, inverse=True)
    np.testing.assert_allclose(back[0], q.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_table_is_not_a_parameter_and_gradients_flow(rng):
    layer = RotaryEmbedding(128, 16)
    assert not jax.tree.leaves(nnx.state(layer, nnx.Param))
    (table,) = jax.tree.leaves(nnx.state(layer, RotaryCache))
    assert table.shape == (16, 128) and table.dtype == jnp.float32
    q, k = _qk(rng, dtype=np.float32)
    w = rng.standard_normal(q.shape).astype(np.float32)

    def loss(layer, q):
        return jnp.sum(layer(q) * w)

    dq = jax.grad(loss, argnums=1)(layer, q)
    np.testing.assert_allclose(dq, layer(w, inverse=True), rtol=1e-6, atol=1e-6)  # the transposed rotation
    grads = nnx.grad(loss)(layer, q)  # with respect to the parameters: there are none
    assert not jax.tree.leaves(nnx.state(grads, nnx.Param))


def test_custom_table_and_errors():
    table = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.float32)
    assert_bytes_equal(RotaryEmbedding(64, 8, cos_sin_cache=table).cos_sin_cache[...], table)
    with pytest.raises(ValueError, match="rot_dim must be 64 or 128"):
        RotaryEmbedding(32, 8)
    with pytest.raises(ValueError, match=r"cos_sin_cache must be float32 \[max_positions, rot_dim\] = \[9, 64\]"):
        RotaryEmbedding(64, 9, cos_sin_cache=table)
    with pytest.raises(ValueError, match="rotary window of query"):
        RotaryEmbedding(128, 8)(jnp.zeros((2, 3, 1, 64), jnp.bfloat16))


def test_one_launch_for_query_and_key_in_a_jitted_model():
    layer = RotaryEmbedding(128, 64)
    graphdef, state = nnx.split(layer)

    def f(state, q, k):
        return nnx.merge(graphdef, state)(q, k)

    s = jax.ShapeDtypeStruct
    text = lower_for_cuda(f, state, s((2, 16, 8, 128), jnp.bfloat16), s((2, 16, 2, 128), jnp.bfloat16))
    assert [c["name"] for c in tilek_calls(text)] == ["apply_rotary"]
