"""jax_tilek.nnx's RMSNorm and SwiGLU against plain JAX, and every layer under the NNX transforms,
split/merge, orbax checkpointing and a sharded CPU mesh (conftest makes eight host devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

nnx = pytest.importorskip("flax.nnx")

import jax_tilek
from jax_tilek.nnx import MoE, RMSNorm, SwiGLU


def rms_norm_ref(x, w, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def swiglu_ref(x, w_up, w_down):
    left, right = jnp.split(x @ w_up, 2, axis=-1)
    return (jax.nn.silu(left) * right) @ w_down


def moe(impl=None, seed=0) -> MoE:
    return MoE(128, 128, 8, 2, num_shared_experts=1, impl=impl, rngs=nnx.Rngs(seed))


def run(model, x):
    return nnx.jit(lambda m, x: m(x))(model, x)


@pytest.mark.parametrize("impl", [None, "xla"])
def test_rms_norm_with_fused_residual(impl):
    norm = RMSNorm(64, impl=impl)
    norm.weight[...] = jax.random.uniform(jax.random.key(0), (64,), minval=0.5, maxval=1.5)
    x, r = jax.random.normal(jax.random.key(1), (2, 2, 5, 64))

    def loss(norm, x, r):
        out, stream = norm(x, r)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(stream**2), (out, stream)

    (_, (out, stream)), (g, gx, gr) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(norm, x, r)
    w = norm.weight[...]

    def ref_loss(w, x, r):
        out = rms_norm_ref(x + r, w)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum((x + r) ** 2)

    rg, rgx, _ = jax.grad(ref_loss, argnums=(0, 1, 2))(w, x, r)
    np.testing.assert_allclose(out, rms_norm_ref(x + r, w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stream, x + r, rtol=1e-6)
    np.testing.assert_allclose(g["weight"][...], rg, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gx, rgx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gr, rgx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm(x), rms_norm_ref(x, w), rtol=1e-5, atol=1e-6)  # no residual: the output alone


def test_rms_norm_fp8_output_dequantizes_to_the_bf16_output():
    norm = RMSNorm(128, dtype=jnp.bfloat16)
    x, r = jax.random.normal(jax.random.key(2), (2, 16, 128))
    (data, sf), stream = nnx.jit(lambda n, x, r: n.cast_fp8(x, r))(norm, x, r)
    out, _ = norm(x, r)
    assert data.dtype == jnp.float8_e4m3fn and data.shape == (16, 128) and sf.shape == (16, 4) and sf.dtype == jnp.float32
    deq = data.astype(jnp.float32).reshape(16, 4, 32) * sf[:, :, None]
    np.testing.assert_allclose(deq.reshape(16, 128), out.astype(jnp.float32), rtol=0.07, atol=1e-2)
    bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_array_equal(stream, (bf16(x) + bf16(r)).astype(jnp.bfloat16))  # in the compute dtype


@pytest.mark.parametrize("impl,dtype,tol", [("xla", jnp.float32, 1e-5), (None, jnp.float32, 1e-5), (None, jnp.bfloat16, 2e-2)])
def test_swiglu_mlp(impl, dtype, tol):
    mlp = SwiGLU(64, 128, dtype=dtype, impl=impl, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (3, 7, 64))
    loss = lambda mlp, x: jnp.sum(jnp.sin(mlp(x).astype(jnp.float32)))
    y = run(mlp, x)
    g, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(mlp, x)
    up, down = mlp.w_up[...], mlp.w_down[...]
    rg_up, rg_down, rgx = jax.grad(lambda u, d, x: jnp.sum(jnp.sin(swiglu_ref(x, u, d))), argnums=(0, 1, 2))(up, down, x)
    assert y.shape == x.shape and y.dtype == dtype
    for got, want in ((y, swiglu_ref(x, up, down)), (g["w_up"][...], rg_up), (g["w_down"][...], rg_down), (gx, rgx)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_impl_follows_the_global_default():
    """impl=None resolves through jax_tilek.default_impl: 'tilelang' refuses on CPU, 'xla' runs."""
    mlp = SwiGLU(64, 64, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 64))
    with jax_tilek.default_impl("xla"):
        assert run(mlp, x).shape == (4, 64)
    if not jax_tilek.kernels_available():
        with jax_tilek.default_impl("tilelang"), pytest.raises(ValueError, match="needs an NVIDIA Hopper or Blackwell GPU"):
            jax.block_until_ready(run(mlp, x))
        with pytest.raises(ValueError, match="needs an NVIDIA Hopper or Blackwell GPU"):
            jax.block_until_ready(run(SwiGLU(64, 64, impl="tilelang", rngs=nnx.Rngs(0)), x))


def test_split_merge_and_state_round_trip():
    m = moe()
    x = jax.random.normal(jax.random.key(4), (32, 128), jnp.bfloat16)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    again = nnx.merge(graphdef, params, rest)
    np.testing.assert_array_equal(run(again, x)[0], run(m, x)[0])
    other = moe(seed=1)
    assert not np.array_equal(run(other, x)[0], run(m, x)[0])
    nnx.update(other, params, rest)
    np.testing.assert_array_equal(run(other, x)[0], run(m, x)[0])


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    m = moe()
    m.router.bias[...] = jnp.arange(8, dtype=jnp.float32) / 10  # a non-Param variable travels too
    x = jax.random.normal(jax.random.key(5), (32, 128), jnp.bfloat16)
    _, state = nnx.split(m)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "moe", state)
        ckpt.wait_until_finished()
        abstract = nnx.eval_shape(lambda: moe(seed=1))
        graphdef, abstract_state = nnx.split(abstract)
        restored = nnx.merge(graphdef, ckpt.restore(tmp_path / "moe", abstract_state))
    np.testing.assert_array_equal(restored.router.bias[...], m.router.bias[...])
    np.testing.assert_array_equal(run(restored, x)[0], run(m, x)[0])


def test_vmap_stacks_layers_and_maps_calls():
    """nnx.vmap creates a stack of layers (one per key) and applies each to its own input."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def stack(key):
        return SwiGLU(64, 64, rngs=nnx.Rngs(key))

    layers = stack(jax.random.split(jax.random.key(6), 3))
    assert layers.w_up.shape == (3, 64, 128)
    x = jax.random.normal(jax.random.key(7), (3, 5, 64))
    y = nnx.vmap(lambda mlp, x: mlp(x), in_axes=(0, 0))(layers, x)
    for i in range(3):
        np.testing.assert_allclose(y[i], swiglu_ref(x[i], layers.w_up[i], layers.w_down[i]), rtol=1e-5, atol=1e-5)

    m = moe()
    xs = jax.random.normal(jax.random.key(8), (2, 16, 128), jnp.bfloat16)
    ys, aux = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0)))(m, xs)  # each batch element routed on its own
    for i in range(2):
        y_i, aux_i = run(m, xs[i])
        np.testing.assert_allclose(np.asarray(ys[i], np.float32), np.asarray(y_i, np.float32), rtol=1e-2, atol=1e-2)
        assert float(aux[i]) == pytest.approx(float(aux_i), rel=1e-5)


@pytest.mark.parametrize(
    "rules,up_spec",
    [
        ((("embed", None), ("mlp", "model"), ("expert", None)), P(None, None, "model")),  # tensor parallel
        ((("embed", None), ("mlp", None), ("expert", "model")), P("model", None, None)),  # expert parallel
    ],
)
def test_logical_axes_shard_on_a_mesh(rules, up_spec):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets --xla_force_host_platform_device_count=8)")
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    x = jax.random.normal(jax.random.key(9), (4, 16, 128), jnp.bfloat16)
    plain = moe()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        m = moe()
        specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
        assert specs["w_up"].get_value() == up_spec and m.w_up.sharding.spec == up_spec
        assert m.shared.w_up.sharding.spec == (P(None, "model") if up_spec[2] else P(None, None))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        y, aux = run(m, xs)
        g = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x)[0].astype(jnp.float32) ** 2)))(m, xs)
    y0, aux0 = run(plain, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y0, np.float32), rtol=2e-2, atol=2e-2)
    assert float(aux) == pytest.approx(float(aux0), rel=1e-5)
    assert np.isfinite(np.asarray(g["w_up"][...], np.float32)).all()


def test_fp8_linear_is_the_dequantized_product():
    """FP8Linear: x cast per token (1 x 128) and the kernel per 128 x 128 block to e4m3, their
    dequantized product (float64 here) rounded to bf16; gradients those of the unquantized bf16
    product within FP8's rounding (their products run in FP8 too)."""
    from jax_tilek.nnx import FP8Linear
    from jax_tilek.quant import formats as F

    layer = FP8Linear(256, 384, impl="xla", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (3, 50, 256), jnp.float32).astype(jnp.bfloat16)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert y.shape == (3, 50, 384) and y.dtype == jnp.bfloat16
    x8, x_sf = F.quantize_blocks(x.reshape(150, 256), "e4m3", (1, 128))
    w = layer.kernel[...].astype(jnp.bfloat16)
    w8, w_sf = F.quantize_blocks(w, "e4m3", (128, 128))
    deq = lambda q, sf, block: np.asarray(q, np.float64) * np.repeat(np.repeat(np.asarray(sf, np.float64), block[0], 0), block[1], 1)  # noqa: E731
    expected = deq(x8, x_sf, (1, 128)) @ deq(w8, w_sf, (128, 128))
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(150, 384), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - (x @ w).astype(jnp.float32)))) > 0  # really quantized

    g = jax.random.normal(jax.random.key(3), y.shape, jnp.float32).astype(jnp.bfloat16)
    graphdef, state = nnx.split(layer)  # one parameter: the kernel

    def objective(x, kernel):
        return jnp.vdot(nnx.merge(graphdef, jax.tree.map(lambda _: kernel, state))(x).astype(jnp.float32), g.astype(jnp.float32))

    dx, dw = jax.jit(jax.grad(objective, argnums=(0, 1)))(x, layer.kernel[...])
    dx_expected = np.asarray(g.astype(jnp.float32) @ w.astype(jnp.float32).T)
    np.testing.assert_allclose(np.asarray(dx, np.float32), dx_expected, rtol=0, atol=0.1 * np.abs(dx_expected).max())
    dw_expected = np.asarray(x.reshape(150, 256).astype(jnp.float32).T @ g.reshape(150, 384).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(dw, np.float32), dw_expected, rtol=0, atol=0.1 * np.abs(dw_expected).max())
    assert not np.array_equal(np.asarray(dx, np.float32), dx_expected.astype(jnp.bfloat16).astype(np.float32))  # FP8 backward


def test_fp8_linear_refuses_sizes_off_the_block():
    from jax_tilek.nnx import FP8Linear

    with pytest.raises(ValueError, match="dout must be a positive multiple of 128"):
        FP8Linear(128, 200, rngs=nnx.Rngs(0))
