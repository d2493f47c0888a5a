"""Ops under automatic partitioning across devices (8 host CPU devices; see conftest.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_tilek.op import ShardingRule, propagate_specs
from jax_tilek.transpose import batched_transpose, transpose

from jax_tilek.testing import random_array

COLLECTIVES = re.compile(r"all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter")


@pytest.fixture
def mesh():
    if len(jax.devices("cpu")) < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return jax.make_mesh((8,), ("d",), devices=jax.devices("cpu")[:8])


def _run(fn, x, mesh, spec):
    x = jax.device_put(x, NamedSharding(mesh, spec))
    compiled = jax.jit(fn).lower(x).compile()
    return compiled(x), compiled.as_text()


@pytest.mark.parametrize(
    "shape,spec,out_spec",
    [((8, 64, 128), P("d"), P("d")), ((2, 512, 128), P(None, "d"), P(None, None, "d")), ((2, 64, 512), P(None, None, "d"), P(None, "d"))],
)
def test_sharded_axes_stay_sharded_without_communication(rng, mesh, shape, spec, out_spec):
    x = random_array(rng, shape, np.float32)
    y, hlo = _run(batched_transpose, x, mesh, spec)
    np.testing.assert_array_equal(np.asarray(y), np.swapaxes(x, 1, 2))
    assert y.sharding.spec == out_spec
    assert not COLLECTIVES.search(hlo), COLLECTIVES.search(hlo)


def test_column_window_is_gathered(rng, mesh):
    x = random_array(rng, (2, 64, 1024), np.float32)
    y, hlo = _run(lambda x: batched_transpose(x, columns=(256, 768)), x, mesh, P(None, None, "d"))
    np.testing.assert_array_equal(np.asarray(y), np.swapaxes(x[..., 256:768], 1, 2))
    assert y.sharding.spec in (P(), P(None, None, None), P(None, None))


def test_2d_and_vmap_under_sharding(rng, mesh):
    x = random_array(rng, (8, 64, 128), np.float32)
    y, hlo = _run(jax.vmap(transpose), x, mesh, P("d"))
    np.testing.assert_array_equal(np.asarray(y), np.swapaxes(x, 1, 2))
    assert not COLLECTIVES.search(hlo)


def test_gradient_under_sharding(rng, mesh):
    x = random_array(rng, (8, 64, 128), np.float32)
    w = jnp.asarray(random_array(rng, (8, 128, 64), np.float32))
    g, _ = _run(jax.grad(lambda x: jnp.sum(batched_transpose(x) * w)), x, mesh, P("d"))
    np.testing.assert_array_equal(np.asarray(g), np.swapaxes(np.asarray(w), 1, 2))


def test_propagate_specs():
    rule = ShardingRule("b m n, n -> b n m")
    ins, outs = propagate_specs(rule, [P("x", None, "y"), P(None)])
    assert ins == [P("x", None, "y"), P("y")] and outs == [P("x", "y", None)]
    ins, outs = propagate_specs(ShardingRule("b m s -> b n m", replicated=("s", "n")), [P(None, "x", "y")])
    assert ins == [P(None, "x", None)] and outs == [P(None, None, "x")]
    ins, outs = propagate_specs(ShardingRule("a b -> b a"), [P("x", "x")])  # one mesh axis, two factors
    assert ins == [P("x", None)] and outs == [P(None, "x")]
