"""jax_tilek.nnx.MoE with ``expert_axis`` (expert parallelism) on 8 host CPU devices (tests/conftest.py):
forward, load-balancing loss and gradients equal the single-device layer's for EP = 2, 4, 8, with even
and uneven routing; the CPU exchange (``padded_ragged_all_to_all``) against ``ragged_all_to_all``'s
documented semantics; ``ragged_all_to_all`` itself in the program lowered for CUDA; bad configurations;
the FP8 dispatch against the single-device layer on rows rounded through e4m3 (straight-through gradient).
On a machine with 2 or 4 GPUs: the kernels' path against the single-device layer."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

nnx = pytest.importorskip("flax.nnx")

from jax_tilek import moe, quant  # noqa: E402
from jax_tilek.nnx import MoE  # noqa: E402
from jax_tilek.nnx._moe import load_balancing_loss  # noqa: E402
from jax_tilek.nnx._moe_parallel import dequantized_rows, padded_ragged_all_to_all, quantized_rows, ragged_all_to_all  # noqa: E402
from jax_tilek.testing import lower_for_cuda  # noqa: E402

DIM, EXPERTS, TOPK, TOKENS = 64, 8, 2, (3, 16)
RULES = (("embed", None), ("mlp", None), ("expert", "ep"))
BIASES = {
    "even": np.zeros(EXPERTS, np.float32),
    "one_device": np.array([0, 0, 0, 0, 0, 0, 50, 100], np.float32),  # every row to experts 6 and 7: the last device (two for EP = 8)
    "skewed": np.array([0.0, 0.1, 0.0, 0.2, 0.0, 0.3, 1.0, 3.0], np.float32),
}


def mesh_of(n: int, axis_type: AxisType = AxisType.Explicit, platform: str = "cpu") -> jax.sharding.Mesh:
    devices = jax.devices(platform)
    if len(devices) < n:
        pytest.skip(f"needs {n} {platform} devices (host devices: XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return jax.make_mesh((n,), ("ep",), axis_types=(axis_type,), devices=devices[:n])


def make(expert_axis: str | None = None, num_experts: int = EXPERTS, dim: int = DIM, dtype=jnp.float32, impl="xla", alignment: int = 8,
         dispatch_fp8: bool = False) -> MoE:  # fmt: skip
    return MoE(dim, dim, num_experts, TOPK, num_shared_experts=1, routed_scaling_factor=1.5, alignment=alignment, dtype=dtype, impl=impl,
               expert_axis=expert_axis, dispatch_fp8=dispatch_fp8, rngs=nnx.Rngs(0))  # fmt: skip


def inputs(dim: int = DIM, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(1), (*TOKENS, dim), jnp.float32)
    return x.astype(dtype), jax.random.normal(jax.random.key(2), x.shape, jnp.float32)


# XLA:CPU compiles these programs about twice as fast (the compilations are most of this file's time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if jax.default_backend() == "cpu" else None


@partial(jax.jit, static_argnums=(0, 4), compiler_options=FAST_COMPILE)
def _value_and_grads(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, cot: jax.Array, forward=None):
    def loss(m, x):
        y, aux = (forward or type(m).__call__)(m, x)
        return jnp.sum(y.astype(jnp.float32) * cot) + 3.0 * aux, (y, aux)

    (_, (y, aux)), (g, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(nnx.merge(graphdef, state), x)
    return y, aux, g, gx


def value_and_grads(m: MoE, x: jax.Array, cot: jax.Array, forward=None):
    """``(y, aux_loss, parameter gradients, x's gradient)`` of ``sum(y · cot) + 3 · aux_loss`` (of ``m(x)``,
    or of ``forward(m, x)``)."""
    return _value_and_grads(*nnx.split(m), x, cot, forward)


def results(m: MoE, forward=None) -> dict:
    """Per bias: y, the loss, the input's gradient and every parameter's (one compilation)."""
    x, cot = inputs(m.dim, m.dtype)
    out = {}
    for name, bias in BIASES.items():
        m.router.bias[...] = jnp.asarray(bias)
        y, aux, g, gx = value_and_grads(m, x, cot, forward)
        out[name] = (y, aux, gx, dict(nnx.to_flat_state(g)))
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_same_results(parallel: dict, single: dict, tol: float, y_tol: float) -> None:
    for name, (y, aux, gx, grads) in parallel.items():
        y0, aux0, gx0, grads0 = single[name]
        assert y.shape == y0.shape and y.dtype == y0.dtype
        assert rel_err(y, y0) < y_tol, name
        assert float(aux) == pytest.approx(float(aux0), rel=1e-5), name
        assert rel_err(gx, gx0) < tol, name
        assert grads.keys() == grads0.keys()
        for path, g in grads.items():
            assert rel_err(g[...], grads0[path][...]) < tol, (name, path)


@pytest.fixture(scope="module")
def single_device() -> dict:
    with jax.default_device(jax.devices("cpu")[0]):  # CPU on a GPU machine too: the same arithmetic as the CPU meshes'
        return results(make())


def test_the_uneven_routing_is_uneven():
    """The "one_device" bias outranks every score (sqrt(softplus(logits)) + bias): all tokens pick 7 and 6."""
    m = make()
    logits = np.asarray(inputs()[0].reshape(-1, DIM) @ m.router.w[...], np.float64)
    ranking = np.sqrt(np.logaddexp(0, logits)) + BIASES["one_device"]
    assert (np.sort(np.argsort(-ranking, axis=1)[:, :TOPK], axis=1) == [6, 7]).all()


@pytest.mark.parametrize("n,axis_type,created_on_mesh", [(2, AxisType.Explicit, False), (4, AxisType.Auto, False), (8, AxisType.Explicit, True)])
def test_matches_the_single_device_layer(single_device, n, axis_type, created_on_mesh):
    """Created on the mesh, the experts' weights are sharded over "ep" (the rules); else replicated."""
    mesh = mesh_of(n, axis_type)
    with jax.default_device(jax.devices("cpu")[0]):
        m = None if created_on_mesh else make("ep")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        parallel = results(m or make("ep"))
    assert_same_results(parallel, single_device, tol=1e-5, y_tol=1e-6)
    if created_on_mesh:  # the experts' gradients stay where their weights are
        assert all(grads[("w_up",)][...].sharding.spec == P("ep", None, None) for *_, grads in parallel.values())


@pytest.mark.gpu
@pytest.mark.parametrize("n,dispatch_fp8", [(2, False), (4, False), (2, True)])
def test_gpu_kernels_match_the_single_device_layer(n, dispatch_fp8):
    """impl="tilelang", bfloat16: the kernels inside shard_map, the exchange by ragged_all_to_all (the
    kernels are those of test_nnx_moe.py's GPU programs: dim 128, E = 8, K = 2); with the FP8
    dispatch, against the single-device layer fed the rounded rows."""
    kw = dict(dim=128, dtype=jnp.bfloat16, impl="tilelang", alignment=128)
    mesh = mesh_of(n, platform="gpu")
    single = results(make(**kw), rounded_experts_input if dispatch_fp8 else None)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        parallel = results(make("ep", dispatch_fp8=dispatch_fp8, **kw))
    assert_same_results(parallel, single, tol=1e-2, y_tol=1e-2)


def rounded_experts_input(m: MoE, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The single-device layer, its routed experts fed the rows rounded through e4m3 with 1 x 128 scales
    (the FP8 dispatch's rounding), the gradient straight through that rounding."""
    tokens = x.reshape(-1, m.dim).astype(m.dtype)
    fmt = "bf16" if m.dtype == jnp.bfloat16 else "fp32"
    rounded = quant.per_token_cast_back(quant.per_token_cast(tokens, "e4m3", 128, impl="xla"), fmt, 128, impl="xla")
    rounded = tokens + jax.lax.stop_gradient(rounded - tokens)
    idx, weights, probs = m.router(tokens)
    pos_to_expert, _, _, token_topk_to_pos, start, end, _, _ = moe.get_fused_mapping(idx, m.num_experts, 0, m.alignment, impl="xla")
    fused = moe.expand_to_fused(rounded, token_topk_to_pos, pos_to_expert, impl="xla")
    y = moe.reduce_fused(m.experts(fused, start, end), weights, token_topk_to_pos, impl="xla") + m.shared(tokens)
    return y.reshape(x.shape), load_balancing_loss(idx, probs)


def test_fp8_dispatch_is_the_layer_on_rounded_rows():
    """EP = 8 (the uneven routings leave devices without rows); other sizes share the exchange code."""
    with jax.default_device(jax.devices("cpu")[0]):
        single = results(make(dim=128), rounded_experts_input)
        unrounded = results(make(dim=128))
    with jax.set_mesh(mesh_of(8)), nnx.logical_axis_rules(RULES):
        parallel = results(make("ep", dim=128, dispatch_fp8=True))
    assert_same_results(parallel, single, tol=1e-5, y_tol=1e-6)
    for name in BIASES:  # the rounding is there: e4m3 keeps 3 mantissa bits
        assert 1e-3 < rel_err(parallel[name][0], unrounded[name][0]) < 0.1, name


def _fp8_dispatch_kernels(tokens, token_topk_to_pos, pos_to_expert, received):
    """The FP8 dispatch's kernels at test_gpu_kernels_match_the_single_device_layer's sizes (EP = 2)."""
    sent = quantized_rows(tokens, token_topk_to_pos, pos_to_expert, "tilelang")
    return sent, dequantized_rows(*received, jnp.bfloat16, "tilelang")


_ROWS = TOKENS[0] * TOKENS[1] // 2  # per device at EP = 2
_RECEIVED = (2 * _ROWS * TOPK + 127 * EXPERTS // 2) // 128 * 128
GPU_PROGRAMS = [(_fp8_dispatch_kernels, (jax.ShapeDtypeStruct((_ROWS, 128), jnp.bfloat16), jax.ShapeDtypeStruct((_ROWS, TOPK), jnp.int32),
                                         jax.ShapeDtypeStruct((_ROWS * TOPK,), jnp.int32),
                                         (jax.ShapeDtypeStruct((_RECEIVED, 128), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((_RECEIVED, 1), jnp.float32))))]  # fmt: skip


def reference_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """``jax.lax.ragged_all_to_all``'s documented semantics over all devices at once (numpy; a list per device)."""
    n = len(operands)
    m = len(input_offsets[0]) // n
    results = [o.copy() for o in outputs]
    for src in range(n):
        for i in range(n * m):
            dst, j = divmod(i, m)
            size, start, at = send_sizes[src][i], input_offsets[src][i], output_offsets[src][i]
            assert size == recv_sizes[dst][src * m + j]
            results[dst][at : at + size] = operands[src][start : start + size]
    return results


def random_exchange(rng: np.random.Generator, n: int, m: int, rows: int, out_rows: int):
    """Slices of random sizes (at most ``rows`` per peer) from random offsets, landing disjoint on each receiver."""
    sizes = [[] for _ in range(n)]
    for src in range(n):
        for _ in range(n):
            total = rng.integers(0, rows + 1)
            sizes[src] += list(np.diff(np.concatenate([[0], np.sort(rng.integers(0, total + 1, m - 1)), [total]])))
    in_offsets = [[rng.integers(0, rows - s + 1) for s in row] for row in sizes]
    out_offsets = [[0] * (n * m) for _ in range(n)]
    for dst in range(n):
        incoming = [(src, dst * m + j) for src in range(n) for j in range(m)]
        rng.shuffle(incoming)
        at = 0
        for src, i in incoming:
            at += int(rng.integers(0, 3))  # gaps keep the output's values
            out_offsets[src][i] = at
            at += sizes[src][i]
        assert at <= out_rows
    recv = [[sizes[src][dst * m + j] for src in range(n) for j in range(m)] for dst in range(n)]
    return [np.asarray(a, np.int32) for a in (in_offsets, sizes, out_offsets, recv)]


def run_exchange(fn, n: int, operand, output, *int_arrays, capacity: int):
    """``fn`` under shard_map over n devices: each device's operand/output are its block of rows."""

    def per_device(x, out, *ints):
        return fn(x, out, *(a.reshape(-1) for a in ints), axis_name="ep", capacity=capacity)

    with jax.set_mesh(mesh_of(n, AxisType.Auto)):
        specs = (P("ep"),) * (2 + len(int_arrays))
        return jax.jit(jax.shard_map(per_device, in_specs=specs, out_specs=P("ep")))(operand, output, *int_arrays)


def test_padded_exchange_on_the_documented_example():
    operand = np.array([1, 2, 2, 3, 4, 0], np.float32).reshape(6, 1)
    ints = [np.array(v, np.int32) for v in ([[0, 1], [0, 1]], [[1, 2], [1, 1]], [[0, 0], [1, 2]], [[1, 1], [2, 1]])]
    out = run_exchange(padded_ragged_all_to_all, 2, operand, np.zeros((8, 1), np.float32), *ints, capacity=3)
    np.testing.assert_array_equal(np.asarray(out).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize("n,m", [(4, 1), (4, 3), (8, 2)])
def test_padded_exchange_matches_the_semantics(rng, n, m):
    rows, out_rows = 12, 4 * n * 12
    in_off, sizes, out_off, recv = random_exchange(rng, n, m, rows, out_rows)
    operands = [rng.standard_normal((rows, 3)).astype(np.float32) for _ in range(n)]
    outputs = [rng.standard_normal((out_rows, 3)).astype(np.float32) for _ in range(n)]
    expected = reference_ragged_all_to_all(operands, outputs, in_off, sizes, out_off, recv)
    got = run_exchange(padded_ragged_all_to_all, n, np.concatenate(operands), np.concatenate(outputs), in_off, sizes, out_off, recv, capacity=rows)
    np.testing.assert_array_equal(np.asarray(got), np.concatenate(expected))


def test_platform_exchange_runs_the_padded_one_on_cpu(rng):
    n, m, rows = 4, 2, 10
    in_off, sizes, out_off, recv = random_exchange(rng, n, m, rows, 3 * n * rows)
    operands = [rng.standard_normal((rows, 2)).astype(np.float32) for _ in range(n)]
    zeros = [np.zeros((3 * n * rows, 2), np.float32)] * n
    expected = reference_ragged_all_to_all(operands, zeros, in_off, sizes, out_off, recv)

    def exchange(x, out, *ints, axis_name, capacity):
        return ragged_all_to_all(x, out.shape[0], *ints, axis_name=axis_name, capacity=capacity)

    got = run_exchange(exchange, n, np.concatenate(operands), np.concatenate(zeros), in_off, sizes, out_off, recv, capacity=rows)
    np.testing.assert_array_equal(np.asarray(got), np.concatenate(expected))


def test_cuda_lowering_uses_ragged_all_to_all():
    """Forward and backward: the dispatch and the return, and their transposes."""
    with jax.set_mesh(mesh_of(4)), nnx.logical_axis_rules(RULES):
        graphdef, state = nnx.split(make("ep"))

        def program(state, x):
            return nnx.grad(lambda m, x: m(x)[0].sum(), argnums=(0, 1))(nnx.merge(graphdef, state), x)

        cuda = lower_for_cuda(program, state, jax.ShapeDtypeStruct((64, DIM), jnp.float32))
    assert cuda.count("ragged_all_to_all") == 4  # on CPU, test_matches_the_single_device_layer runs the padded exchange


def test_fp8_dispatch_sends_bytes_and_returns_full_precision():
    """Forward: the rows as e4m3 bytes and their fp32 scales; the return and both transposes in the layer's dtype."""
    with jax.set_mesh(mesh_of(4)), nnx.logical_axis_rules(RULES):
        graphdef, state = nnx.split(make("ep", dim=128, dtype=jnp.bfloat16, dispatch_fp8=True))

        def program(state, x):
            return nnx.grad(lambda m, x: m(x)[0].astype(jnp.float32).sum(), argnums=(0, 1))(nnx.merge(graphdef, state), x)

        cuda = lower_for_cuda(program, state, jax.ShapeDtypeStruct((64, 128), jnp.bfloat16))
    exchanged = [line.split(":")[-1] for line in cuda.splitlines() if "ragged_all_to_all" in line]
    assert len(exchanged) == 5, exchanged
    assert sorted(next(t for t in ("xui8>", "xf32>", "xbf16>") if t in e) for e in exchanged) == ["xbf16>"] * 3 + ["xf32>", "xui8>"]


def test_bad_configurations_name_the_rule():
    with jax.set_mesh(mesh_of(4)), nnx.logical_axis_rules(RULES):
        with pytest.raises(ValueError, match=r"num_experts must be divisible by the size of mesh axis 'ep' \(4\), got 6"):
            make("ep", num_experts=6)
        m = make("ep")
        with pytest.raises(ValueError, match=r"the token count must be divisible by the size of mesh axis 'ep' \(4\), got 10"):
            m(jnp.zeros((2, 5, DIM)))
    with pytest.raises(ValueError, match="needs a mesh with axis 'ep' in context"):
        m(jnp.zeros((8, DIM)))
    with jax.set_mesh(mesh_of(2)), pytest.raises(ValueError, match="needs a mesh with axis 'experts'"):
        make("experts")
    with pytest.raises(ValueError, match=r"MoE\(dispatch_fp8=True\) needs expert_axis, dim a multiple of 128"):
        make(dispatch_fp8=True, dim=128)
    with jax.set_mesh(mesh_of(2)), pytest.raises(ValueError, match="dim a multiple of 128 .* got expert_axis='ep', dim 64"):
        make("ep", dispatch_fp8=True)
