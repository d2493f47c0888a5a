"""jax_tilek.nnx.MoE against a plain-JAX dense-dispatch MoE with the same weights: routing exactly,
outputs, the load-balancing loss and gradients (float32 on the references; bfloat16 through the ops'
custom VJPs, which on CPU run the references)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_tilek.nnx import MoE, RouterBias

GATES = {
    "sqrtsoftplus": dict(),
    "top2_sum_sigmoid_groups": dict(gate="top2_sum", scoring_func="sigmoid", num_groups=4, num_topk_groups=2),
    "top2_sum_softmax": dict(gate="top2_sum", scoring_func="softmax"),
}


def dense_routing(p: dict, x: jax.Array, k: int, gate: str = "sqrtsoftplus", scoring_func: str = "sqrtsoftplus", num_groups: int = 0,
                  num_topk_groups: int = 0, routed_scaling_factor: float = 1.0, **_):  # fmt: skip
    """``(topk_idx, topk_weights, scores)`` by the TileKernels rules, with ``jax.lax.top_k``."""
    logits = x.astype(jnp.float32) @ p["router_w"]
    s = {"sigmoid": jax.nn.sigmoid, "softmax": lambda v: jax.nn.softmax(v, -1)}.get(scoring_func, lambda v: jnp.sqrt(jax.nn.softplus(v)))(logits)
    rank = (logits if scoring_func == "softmax" else s) + p["bias"]
    if num_groups:
        t, e = rank.shape
        grouped = rank.reshape(t, num_groups, e // num_groups)
        _, best = jax.lax.top_k(jnp.sum(jax.lax.top_k(grouped, 2)[0], -1), num_topk_groups)
        keep = jnp.any(best[:, :, None] == jnp.arange(num_groups), axis=1)
        rank = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)
    _, idx = jax.lax.top_k(rank, k)
    chosen = jnp.take_along_axis(s, idx, 1)
    return idx, chosen / (chosen.sum(1, keepdims=True) + 1e-20) * routed_scaling_factor, s


def swiglu_mlp(x, w_up, w_down):
    h = x @ w_up
    left, right = jnp.split(h, 2, axis=-1)
    return (jax.nn.silu(left) * right) @ w_down


def dense_moe(p: dict, x: jax.Array, k: int, **gate) -> tuple[jax.Array, jax.Array]:
    """Every expert on every token, combined with the routing weights; plus the shared expert; and
    the balance loss ``sum_e f_e P_e`` (float32 throughout)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    idx, weights, s = dense_routing(p, x, k, **gate)
    e = p["w_up"].shape[0]
    every = jax.vmap(swiglu_mlp, in_axes=(None, 0, 0))(x, p["w_up"], p["w_down"])  # [E, T, D]
    picked = every[idx, jnp.arange(x.shape[0])[:, None]]  # [T, K, D]
    y = jnp.einsum("tk,tkd->td", weights, picked) + swiglu_mlp(x, p["shared_up"], p["shared_down"])
    f = jnp.zeros((e,)).at[idx.reshape(-1)].add(1.0) * e / idx.size
    aux = jnp.sum(f * jnp.mean(s / s.sum(1, keepdims=True), 0))
    return y, aux


def params_of(m: MoE) -> dict:
    return {"router_w": m.router.w[...], "bias": m.router.bias[...], "w_up": m.w_up[...], "w_down": m.w_down[...],
            "shared_up": m.shared.w_up[...], "shared_down": m.shared.w_down[...]}  # fmt: skip


def grads_of(g) -> dict:
    return {"router_w": g["router"]["w"][...], "w_up": g["w_up"][...], "w_down": g["w_down"][...],
            "shared_up": g["shared"]["w_up"][...], "shared_down": g["shared"]["w_down"][...]}  # fmt: skip


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make(dim: int, ffn: int, gate: str, dtype, impl, seed: int = 0) -> MoE:
    return MoE(dim, ffn, 8, 2, num_shared_experts=1, routed_scaling_factor=1.5, dtype=dtype, impl=impl, rngs=nnx.Rngs(seed), **GATES[gate])


def check_against_dense(m: MoE, x: jax.Array, gate: str, tol: float) -> None:
    kw = dict(GATES[gate], routed_scaling_factor=1.5)
    cot = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)

    def layer_loss(m, x):
        y, aux = m(x)
        return jnp.sum(y.astype(jnp.float32) * cot) + 3.0 * aux, (y, aux)

    (_, (y, aux)), (g, gx) = nnx.jit(nnx.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True))(m, x)

    def dense_loss(p, x):
        y, aux = dense_moe(p, x, 2, **kw)
        return jnp.sum(y.reshape(x.shape) * cot) + 3.0 * aux, (y, aux)

    p = params_of(m)
    (_, (y_ref, aux_ref)), (g_ref, gx_ref) = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1), has_aux=True))(p, x.astype(jnp.float32))
    tokens = x.reshape(-1, x.shape[-1]).astype(m.dtype)
    idx = nnx.jit(lambda r, t: r(t)[0])(m.router, tokens)
    idx_ref = jax.jit(lambda p, t: dense_routing(p, t, 2, **kw)[0])(p, tokens.astype(jnp.float32))
    np.testing.assert_array_equal(idx, idx_ref)  # routing exactly equal, in the gate's order
    assert y.shape == x.shape and y.dtype == m.dtype
    assert rel_err(y, y_ref.reshape(x.shape)) < tol
    assert abs(float(aux) - float(aux_ref)) < 1e-5
    assert rel_err(gx, gx_ref) < tol
    for name, grad in grads_of(g).items():
        assert rel_err(grad, g_ref[name]) < tol, name
    assert "bias" not in g["router"]  # the ranking bias is no Param: no gradient, the optimizer leaves it


@pytest.mark.parametrize("gate", list(GATES))
def test_matches_dense_float32_reference(gate):
    m = make(64, 64, gate, jnp.float32, "xla")
    x = jax.random.normal(jax.random.key(1), (3, 20, 64), jnp.float32)
    check_against_dense(m, x, gate, tol=1e-5)


@pytest.mark.parametrize("gate", ["sqrtsoftplus", "top2_sum_sigmoid_groups"])
def test_matches_dense_bfloat16_through_the_ops(gate):
    """impl=None: the ops' primitives and custom VJPs (kernels on a GPU, their references on CPU)."""
    m = make(128, 128, gate, jnp.bfloat16, None)
    x = jax.random.normal(jax.random.key(2), (2, 32, 128), jnp.float32).astype(jnp.bfloat16)
    check_against_dense(m, x, gate, tol=2e-2)


GPU_SHAPE = (3, 100, 128)  # 300 tokens: segments that end inside an M-tile


@pytest.mark.gpu
@pytest.mark.parametrize("gate", list(GATES))
def test_kernels_match_dense_bfloat16(gate):
    """impl="tilelang": the gate, mapping, expand, grouped GEMMs, SwiGLU and reduce kernels forward
    and backward, against the dense float32 MoE."""
    m = make(128, 128, gate, jnp.bfloat16, "tilelang")
    x = jax.random.normal(jax.random.key(4), GPU_SHAPE, jnp.float32).astype(jnp.bfloat16)
    check_against_dense(m, x, gate, tol=2e-2)


def _gpu_program(gate: str):
    """What test_kernels_match_dense_bfloat16 launches: the layer's value and gradients."""
    graphdef, state = nnx.split(make(128, 128, gate, jnp.bfloat16, "tilelang"))

    def program(state, x):
        def loss(m, x):
            y, aux = m(x)
            return jnp.sum(y.astype(jnp.float32)) + aux

        return nnx.value_and_grad(loss, argnums=(0, 1))(nnx.merge(graphdef, state), x)

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return program, (abstract, jax.ShapeDtypeStruct(GPU_SHAPE, jnp.bfloat16))


GPU_PROGRAMS = [_gpu_program(gate) for gate in GATES]


def test_router_bias_ranks_but_does_not_weigh():
    m = make(64, 64, "sqrtsoftplus", jnp.float32, "xla")
    x = jax.random.normal(jax.random.key(3), (16, 64), jnp.float32)
    m.router.bias[...] = jnp.zeros((8,)).at[5].set(100.0)
    idx, weights, _ = m.router(x)
    assert (idx[:, 0] == 5).all()
    np.testing.assert_allclose(weights.sum(1), 1.5, rtol=1e-6)
    ref_idx, ref_w, _ = dense_routing(params_of(m), x, 2, routed_scaling_factor=1.5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(weights, ref_w, rtol=1e-6)
    assert isinstance(m.router.bias, RouterBias)


def test_balance_loss_of_a_collapsed_routing():
    m = make(64, 64, "sqrtsoftplus", jnp.float32, "xla")
    m.router.w[...] = jnp.zeros((64, 8)).at[:, 0].set(1.0)  # x = 1: logits (64, 0, ..., 0)
    _, aux = nnx.jit(lambda m, x: m(x))(m, jnp.ones((4, 64)))
    u0, u = 8.0, float(jnp.sqrt(jnp.log(2.0)))  # sqrt(softplus(64)), sqrt(softplus(0)); ties go to expert 1
    assert float(aux) == pytest.approx(4 * u0 / (u0 + 7 * u) + 4 * u / (u0 + 7 * u), rel=1e-6)  # f = (4, 4, 0, ...)


def test_fp8_moe_stays_near_the_bf16_layer():
    """MoE(fp8=True): the same parameters give the bf16 layer's output up to FP8 rounding (e4m3 with
    block scales: under 10%), the same routing and aux loss, and gradients of every parameter
    close to the bf16 layer's (the backward is bf16, straight through the casts)."""
    bf16 = MoE(128, 128, 8, 2, num_shared_experts=1, impl="xla", rngs=nnx.Rngs(3))
    fp8 = MoE(128, 128, 8, 2, num_shared_experts=1, fp8=True, impl="xla", rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (96, 128), jnp.float32).astype(jnp.bfloat16)

    def loss(layer, x):
        y, aux = layer(x)
        return jnp.vdot(y.astype(jnp.float32), x.astype(jnp.float32)) + aux, (y, aux)

    (_, (y8, aux8)), g8 = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(fp8, x)
    (_, (y16, aux16)), g16 = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(bf16, x)
    assert float(aux8) == float(aux16)
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))  # noqa: E731
    assert 0 < rel(y8, y16) < 0.1  # e4m3 keeps 3 mantissa bits: a few per cent a product, two products
    for (path, a), b in zip(jax.tree.leaves_with_path(g8), jax.tree.leaves(g16), strict=True):
        assert rel(a, b) < 0.1, jax.tree_util.keystr(path)


def test_fp8_moe_refuses_what_the_fp8_gemm_cannot_take():
    with pytest.raises(ValueError, match="multiples of 128"):
        MoE(128, 64, 8, 2, fp8=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bfloat16"):
        MoE(128, 128, 8, 2, fp8=True, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_bad_router_options():
    with pytest.raises(ValueError, match="top2_sum"):
        MoE(128, 128, 8, 2, num_groups=2, num_topk_groups=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="scoring_func"):
        MoE(128, 128, 8, 2, scoring_func="sigmoid", rngs=nnx.Rngs(0))
