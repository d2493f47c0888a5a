"""The op helper: impl choice, abstract eval, errors, vmap, custom_vjp, lowering, export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_tilek
from jax_tilek import platform
from jax_tilek.op import Launch, Rows, Static, TileOp, View, config_class, uses, with_vjp

import byo_kernels
from jax_tilek.testing import decode_record, lower_for_cuda, random_array, tilek_calls


def _scale_reference(x, s, *, factor=1.0):
    return (x.astype(jnp.float32) * (s[:, None] * factor)).astype(x.dtype)


def _scale_check(x, s, *, factor=1.0):
    if x.ndim != 2 or s.shape != x.shape[:1]:
        raise ValueError(f"scale: x must be [M, N] and s [M], got {x.shape} and {s.shape}")


scale = TileOp(
    name="scale",
    launch=lambda x, s, factor=1.0: Launch(byo_kernels.scale_rows, params=dict(n_cols=x.shape[1], dtype=x.dtype.name)),
    reference=_scale_reference,
    check=_scale_check,
)


def test_impl_must_be_known():
    with pytest.raises(ValueError, match=r"impl must be one of \(None, 'tilelang', 'xla'\), got 'cuda'"):
        scale(jnp.ones((4, 8)), jnp.ones(4), impl="cuda")


def test_check_runs_at_trace_time():
    with pytest.raises(ValueError, match=r"s \[M\], got \(4, 8\) and \(5,\)"):
        jax.eval_shape(scale, jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((5,), jnp.float32))


def test_reference_path_off_gpu(rng):
    x = random_array(rng, (5, 64), np.float32)
    s = random_array(rng, (5,), np.float32)
    expected = x * (s[:, None] * 2.0)
    for impl in (None, "xla"):
        np.testing.assert_allclose(jax.jit(lambda x, s: scale(x, s, factor=2.0, impl=impl))(x, s), expected, rtol=1e-6)


def test_sequential_vmap_fallback(rng):
    x = random_array(rng, (3, 5, 64), np.float32)
    s = random_array(rng, (5,), np.float32)
    y = jax.jit(jax.vmap(scale, in_axes=(0, None)))(x, s)
    np.testing.assert_allclose(y, x * s[None, :, None], rtol=1e-6)
    text = lower_for_cuda(jax.vmap(scale, in_axes=(0, None)), jax.ShapeDtypeStruct((3, 5, 64), jnp.float32), jax.ShapeDtypeStruct((5,), jnp.float32))
    assert "stablehlo.while" in text and len(tilek_calls(text)) == 1


def test_no_derivative_without_vjp():
    with pytest.raises(TypeError, match="has no derivative rule on its kernel path"):
        jax.grad(lambda x: scale(x, jnp.ones(4)).sum())(jnp.ones((4, 8)))


def test_integer_results_have_zero_tangents():
    """An op whose results are integers (or whose only tangents sit on integer operands) differentiates
    as a constant, under jit too, on its kernel path."""
    from jax_tilek.moe import get_fused_mapping, topk_gate_weights

    def loss(logits):
        idx, weights = topk_gate_weights(logits, 2, impl="tilelang")
        mapping = get_fused_mapping(idx, 8, 0, 16, impl="tilelang")
        return (weights * mapping[0][:4, None].astype(weights.dtype)).sum()

    jaxpr = str(jax.make_jaxpr(jax.jit(jax.grad(loss)))(S((4, 8), jnp.float32)))
    assert "tilek_call" in jaxpr


def test_with_vjp_and_static_residuals(rng):
    def primal(x, *, impl=None, power=2):
        return x**power if impl == "xla" else scale(x, jnp.ones(x.shape[0]), impl=impl) ** power

    def fwd(x, *, impl=None, power=2):
        return primal(x, impl=impl, power=power), (x, Static(x.dtype))

    def bwd(res, g, *, impl=None, power=2):
        x, dtype = res
        return ((power * x ** (power - 1) * g).astype(dtype.value),)

    f = with_vjp(primal, fwd, bwd)
    x = random_array(rng, (4, 64), np.float32)
    expected = 3 * x**2
    for impl in (None, "xla"):
        np.testing.assert_allclose(jax.grad(lambda x: f(x, impl=impl, power=3).sum())(x), expected, rtol=1e-5)


def test_lowering_for_cuda_needs_an_arch():
    if platform._local_gpu_arch()[0]:
        pytest.skip("a GPU is present")
    with pytest.raises(platform.NoTargetArchError, match="JAX_TILEK_ARCH=sm_90a"):
        jax.jit(scale).trace(jnp.ones((4, 64)), jnp.ones(4)).lower(lowering_platforms=("cuda",))


def test_kernel_dtype_and_views_are_checked():
    wrong_dtype = TileOp(
        name="wrong", launch=lambda x, s: Launch(byo_kernels.scale_rows, params=dict(n_cols=64, dtype="bfloat16")),
        reference=_scale_reference,
    )  # fmt: skip
    with pytest.raises(ValueError, match="tensor 'x' must be bfloat16, got float32"):
        lower_for_cuda(wrong_dtype, jax.ShapeDtypeStruct((4, 64), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32))
    outside = TileOp(
        name="outside",
        launch=lambda x, s: Launch(
            byo_kernels.scale_rows, params=dict(n_cols=64, dtype="float32"), views={"x": View((4, 64), offset=64)}
        ),
        reference=_scale_reference,
    )
    with pytest.raises(ValueError, match="the view of 'x' reaches outside its buffer"):
        lower_for_cuda(outside, jax.ShapeDtypeStruct((4, 64), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32))
    too_many = TileOp(
        name="too_many",
        launch=lambda x: Launch(byo_kernels.scale_rows, params=dict(n_cols=64, dtype="float32")),
        reference=lambda x: x,
    )
    with pytest.raises(ValueError, match=r"has 3 tensor parameters \['x', 's', 'y'\] but the call has 2 buffers"):
        lower_for_cuda(too_many, jax.ShapeDtypeStruct((4, 64), jnp.float32))


def test_launch_record_in_the_lowered_module():
    x, s = jax.ShapeDtypeStruct((1001, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1001,), jnp.float32)
    (call,) = tilek_calls(lower_for_cuda(scale, x, s))
    record = decode_record(call["launch"])
    assert call["name"] == "scale" and call["entries"] == "main_kernel" and call["has_cubin"]
    assert record["num_buffers"] == 3 and record["zero_fill"] == [] and record["tma"] == []
    (k,) = record["kernels"]
    assert k["grid"] == [251, 1, 1] and k["block"] == [128, 1, 1]
    assert k["args"] == [(0, 1, 0), (0, 0, 0), (0, 2, 0), (2, 4, 1001)]  # s, x, y, M
    (call,) = tilek_calls(lower_for_cuda(scale, jax.ShapeDtypeStruct((0, 64), jnp.bfloat16), jax.ShapeDtypeStruct((0,), jnp.float32)))
    assert decode_record(call["launch"])["kernels"] == [] and call["entries"] == ""


def test_export_serializes_with_the_cubin(tmp_path):
    x, s = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16), jax.ShapeDtypeStruct((64,), jnp.float32)
    exported = jax_tilek.export(scale, x, s, arch="sm_90a")
    restored = jax.export.deserialize(exported.serialize())
    assert restored.platforms == ("cuda",)
    (call,) = tilek_calls(restored.mlir_module())
    assert call["has_cubin"] and call["entries"] == "main_kernel"
    both = jax_tilek.export(scale, x, s, arch="sm_90a", platforms=("cpu", "cuda"))
    y = both.call(jnp.ones((64, 64), jnp.bfloat16), jnp.full((64,), 2.0))  # runs the CPU lowering here
    np.testing.assert_array_equal(np.asarray(y, np.float32), 2.0)


def test_precompile_reports_kernels():
    used = jax_tilek.precompile(scale, jax.ShapeDtypeStruct((9, 64), jnp.bfloat16), jax.ShapeDtypeStruct((9,), jnp.float32), arch="sm_90a")
    assert [(name.rsplit(".", 1)[-1], params, arch) for name, params, arch, _ in used] == [
        ("scale_rows", {"block_m": 4, "dtype": "bfloat16", "n_cols": 64}, "sm_90a")  # the factory's default filled in
    ]


# ---------------------------------------------------------------------------------------------
# Misuse: a clear TypeError / ValueError naming the op, at trace time where possible.

S = jax.ShapeDtypeStruct


@pytest.mark.parametrize(
    "value,message",
    [
        ([[1.0] * 64] * 4, "scale: operand 0 must be an array, got list"),
        ((1.0, 2.0), "scale: operand 0 must be an array, got tuple"),
        (None, "scale: operand 0 must be an array, got NoneType"),
        ("x", "scale: operand 0 must be an array, got str"),
        (object(), "scale: operand 0 must be an array, got object"),
        (np.array([object()] * 4), "scale: operand 0 cannot be a JAX array"),
        (2**40, "scale: operand 0 cannot be a JAX array"),
    ],
    ids=["list", "tuple", "None", "str", "object", "object-array", "big-int"],
)
def test_non_array_operands_are_type_errors(value, message):
    with pytest.raises(TypeError, match=message):
        scale(value, jnp.ones(4))


def test_unhashable_static_options_are_type_errors():
    with pytest.raises(TypeError, match="scale: static options must be hashable"):
        scale(jnp.ones((4, 64)), jnp.ones(4), factor={1.0})


def test_impl_is_checked_before_anything_else():
    with pytest.raises(ValueError, match="scale: impl must be one of"):
        scale(jnp.ones((4, 64)), jnp.ones(4), impl=["xla"])


def test_extents_beyond_int32_are_rejected_at_trace_time():
    x, s = S((2**31, 64), jnp.float32), S((2**31,), jnp.float32)
    for impl in (None, "tilelang"):
        with pytest.raises(ValueError, match=r"scale: operand 0 has 2147483648 elements along axis 0; the kernel takes extents up to 2147483647"):
            jax.eval_shape(lambda x, s: scale(x, s, impl=impl), x, s)
    assert jax.eval_shape(lambda x, s: scale(x, s, impl="xla"), x, s).shape == x.shape  # the reference has no limit
    grow = TileOp(name="grow", launch=None, reference=lambda x: jnp.zeros((2**31,), x.dtype), results=("y",))
    with pytest.raises(ValueError, match="grow: y has 2147483648 elements along axis 0"):
        jax.eval_shape(grow, S((4,), jnp.float32))
    wide = TileOp(name="wide", launch=None, reference=lambda x: x, max_extent=None)
    assert jax.eval_shape(wide, S((2**31,), jnp.float32)).shape == (2**31,)


def test_kernel_check_refuses_tilelang_and_sends_the_default_to_the_reference():
    def limit(x):
        if x.shape[0] > 4:
            raise ValueError("limited: too big for the kernel")

    limited = TileOp(name="limited", launch=None, reference=lambda x: x + 1, kernel_check=limit)
    with pytest.raises(ValueError, match="limited: too big"):
        jax.eval_shape(lambda x: limited(x, impl="tilelang"), S((8,), jnp.float32))
    # impl=None: the reference wherever the kernel cannot take the operands (no tilek_call at all).
    for impl in (None, "xla"):
        assert "tilek_call" not in str(jax.make_jaxpr(lambda x: limited(x, impl=impl))(S((8,), jnp.float32)))
    assert "tilek_call" in str(jax.make_jaxpr(lambda x: limited(x))(S((4,), jnp.float32)))
    np.testing.assert_array_equal(limited(jnp.zeros(8)), np.ones(8))


def _raw_transpose(name, esize, max_extent=2**31 - 1):
    """batched_transpose's kernel with its 3-D grid forced, for lowering errors."""
    from jax_tilek.transpose import batched_transpose_kernel

    def launch(x):
        b, m, n = x.shape
        per_word = 4 // esize
        return Launch(
            batched_transpose_kernel, params=dict(esize=esize, tile_m=128, tile_n=128, threads=256),
            views={"x": View((b, m, n // per_word), dtype=np.uint32), "y": View((b, n, m // per_word), dtype=np.uint32)},
        )  # fmt: skip

    return TileOp(name=name, launch=launch, reference=lambda x: jnp.swapaxes(x, 1, 2), max_extent=max_extent)


def test_lowering_errors_name_the_op():
    raw = _raw_transpose("raw_transpose", 4)
    with pytest.raises(ValueError, match=r"raw_transpose: kernel '.*batched_transpose_kernel' \(batched_transpose_kernel\): grid dimension z = 70000 exceeds CUDA's limit of 65535"):
        lower_for_cuda(raw, S((70000, 128, 128), jnp.float32))
    wide = TileOp(
        name="wide", launch=lambda x, s: Launch(byo_kernels.scale_rows, params=dict(n_cols=64, dtype="float32")),
        reference=_scale_reference, max_extent=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="wide: kernel .* scalar value 2147483648 does not fit int32"):
        lower_for_cuda(wide, S((2**31, 64), jnp.float32), S((2**31,), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.int4, jnp.uint4, jnp.float4_e2m1fn, jnp.int2], ids=lambda d: np.dtype(d).name)
def test_views_of_packed_sub_byte_buffers_are_sized_in_bits(dtype):
    # A [1, 128, 128] buffer of 4- (2-) bit elements holds 8,192 (4,096) bytes; seen as 1-byte elements
    # by a kernel, [1, 128, 32] 32-bit words (16,384 bytes) reach past its end.
    raw = _raw_transpose("subbyte", 1)
    with pytest.raises(ValueError, match=r"subbyte: kernel .*: the view of 'x' reaches outside its buffer \(131072 bits of uint32"):
        lower_for_cuda(raw, S((1, 128, 128), dtype))
    (call,) = tilek_calls(lower_for_cuda(raw, S((1, 128, 128), jnp.uint8)))  # 1-byte elements fit exactly
    assert call["has_cubin"]


def test_global_default_impl(rng):
    """impl=None follows set_default_impl / default_impl / JAX_TILEK_IMPL; an explicit impl wins."""
    x = random_array(rng, (4, 64), np.float32)
    s = random_array(rng, (4,), np.float32)
    f = jax.jit(lambda x, s: scale(x, s))
    with jax_tilek.default_impl("tilelang"):  # no GPU here: the kernel path refuses
        with pytest.raises(ValueError, match="impl='tilelang'"):
            jax.jit(lambda x, s: scale(x, s)).lower(x, s).compile()
        with pytest.raises(ValueError, match="impl='tilelang'"):
            f(x, s)  # the default is part of the jit key: no stale trace of the outer default
        np.testing.assert_allclose(scale(x, s, impl="xla"), x * s[:, None], rtol=1e-6)
    np.testing.assert_allclose(f(x, s), x * s[:, None], rtol=1e-6)
    primitive = lambda: "tilek_call" in str(jax.make_jaxpr(scale)(x, s))  # noqa: E731
    assert primitive()
    with jax_tilek.default_impl("xla"):
        assert not primitive()  # the reference is called directly
    assert primitive()
    jax_tilek.set_default_impl("xla")
    try:
        assert not primitive()
    finally:
        jax_tilek.set_default_impl(None)
    with pytest.raises(ValueError, match="set_default_impl: impl must be one of"):
        jax_tilek.set_default_impl("cuda")


def test_default_impl_from_the_environment():
    import subprocess
    import sys

    code = "import jax_tilek.op as op; print(op.resolve_impl(None, 'x'))"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "JAX_TILEK_IMPL": "xla"},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "xla"


def test_with_vjp_follows_the_default(rng):
    calls = []

    def primal(x, *, impl=None):
        calls.append(impl)
        return x * 2.0

    f = with_vjp(primal, lambda x, *, impl=None: (primal(x, impl=impl), None), lambda r, g, *, impl=None: (2.0 * g,))
    with jax_tilek.default_impl("xla"):
        f(jnp.ones(3))
    assert calls == ["xla"]


# -- named and optional operands, configurations, row-wise ops -----------------------------------


@dataclasses.dataclass(frozen=True)
class _RowsConfig:
    block_m: int


@config_class(_RowsConfig)
def _rows_config(x, s, **_):
    return _RowsConfig(block_m=4 if x.shape[0] < 4096 else 8)


def _maybe_launch(x, s, *, config):
    params = dict(n_cols=x.shape[1], dtype=x.dtype.name, has_scale=s is not None, block_m=config.block_m)
    return Launch(byo_kernels.scale_rows_maybe, params=params)


def _maybe_reference(x, s):
    return x if s is None else (x.astype(jnp.float32) * s[:, None]).astype(x.dtype)


scale_maybe = TileOp(
    name="scale_maybe",
    launch=_maybe_launch,
    operands=("x", "s?"),
    results=("y",),
    reference=_maybe_reference,
    config=_rows_config,
    rows=Rows(operands=("x", "s"), results=("y",)),
)


def _launch_of(text):
    (call,) = tilek_calls(text)
    return decode_record(call["launch"])


def test_an_absent_optional_operand_leaves_its_parameter_unused():
    x = jax.ShapeDtypeStruct((10, 64), jnp.float32)
    record = _launch_of(lower_for_cuda(lambda x: scale_maybe(x), x))
    (kernel,) = record["kernels"]
    assert record["num_buffers"] == 2  # x, y: no buffer for s
    assert [a[1] for a in kernel["args"] if a[0] == 0] == [0, 1]  # the kernel reads no s
    with_s = _launch_of(lower_for_cuda(lambda x, s: scale_maybe(x, s=s), x, jax.ShapeDtypeStruct((10,), jnp.float32)))
    assert sorted(a[1] for a in with_s["kernels"][0]["args"] if a[0] == 0) == [0, 1, 2]


def test_operands_by_name_and_their_errors(rng):
    x = random_array(rng, (6, 64), np.float32)
    s = random_array(rng, (6,), np.float32)
    np.testing.assert_array_equal(scale_maybe(x=x, s=s), _maybe_reference(x, s))
    np.testing.assert_array_equal(scale_maybe(x, None), x)
    with pytest.raises(TypeError, match="operand 'x' is required"):
        scale_maybe(s=s)
    with pytest.raises(TypeError, match="operand 's' given twice"):
        scale_maybe(x, s, s=s)
    with pytest.raises(TypeError, match="takes 2 operands"):
        scale_maybe(x, s, s)


def test_config_heuristic_and_overrides():
    x = jax.ShapeDtypeStruct((10, 64), jnp.float32)
    grid = lambda op, rows: _launch_of(lower_for_cuda(lambda x: op(x), jax.ShapeDtypeStruct((rows, 64), jnp.float32)))["kernels"][0]["grid"]
    assert grid(scale_maybe, 10) == [3, 1, 1] and grid(scale_maybe, 8192) == [1024, 1, 1]  # heuristic: 4, then 8 rows
    assert grid(scale_maybe.with_config(block_m=2), 10) == [5, 1, 1]
    assert grid(scale_maybe.with_config(_RowsConfig(block_m=1)), 10) == [10, 1, 1]
    with pytest.raises(ValueError, match=r"no config field\(s\) \['rows'\]"):
        scale_maybe.with_config(rows=3)
    assert scale_maybe.with_config(block_m=2).with_config(block_m=1).config_overrides == (("block_m", 1),)
    del x


def test_uses_exposes_with_config():
    @uses(scale_maybe)
    def public(x, *, impl=None, ops):
        (op,) = ops
        return op(x, impl=impl)

    x = jax.ShapeDtypeStruct((10, 64), jnp.float32)
    assert _launch_of(lower_for_cuda(public.with_config(block_m=5), x))["kernels"][0]["grid"] == [2, 1, 1]
    assert public.ops == (scale_maybe,)
    with pytest.raises(ValueError, match="no config field"):
        public.with_config(stages=2)


def test_rows_fold_vmap_into_one_launch(rng):
    x = random_array(rng, (3, 5, 64), np.float32)
    s = random_array(rng, (5,), np.float32)
    f = jax.vmap(lambda x, s: scale_maybe(x, s), in_axes=(0, None))
    np.testing.assert_allclose(jax.jit(f)(x, s), x * s[None, :, None], rtol=1e-6)
    text = lower_for_cuda(f, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(s.shape, s.dtype))
    assert "stablehlo.while" not in text
    (kernel,) = _launch_of(text)["kernels"]
    assert kernel["grid"] == [4, 1, 1]  # 15 folded rows, 4 per CTA


def test_rows_shard_along_tokens_without_collectives(rng):
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("d",), devices=jax.devices("cpu")[:8])
    x = jax.device_put(random_array(rng, (16, 64), np.float32), NamedSharding(mesh, PartitionSpec("d")))
    s = random_array(rng, (16,), np.float32)
    f = jax.jit(lambda x, s: scale_maybe(x, s))
    np.testing.assert_array_equal(f(x, s), _maybe_reference(np.asarray(x), s))
    assert f(x, s).sharding.spec == PartitionSpec("d")
    hlo = f.lower(x, s).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo


# The GPU tests' programs, compiled on the build machine (tests/gpu_programs.py prepare).
GPU_PROGRAMS = [
    (lambda x: scale_maybe(x, impl="tilelang"), (jax.ShapeDtypeStruct((37, 64), jnp.float32),)),
    (lambda x, s: scale_maybe(x, s, impl="tilelang"), (jax.ShapeDtypeStruct((37, 64), jnp.float32), jax.ShapeDtypeStruct((37,), jnp.float32))),
]


@pytest.mark.gpu
def test_unused_operand_on_gpu(rng, on_gpu):
    x = random_array(rng, (37, 64), np.float32)
    s = random_array(rng, (37,), np.float32)
    np.testing.assert_array_equal(on_gpu(lambda x: scale_maybe(x, impl="tilelang"), x), x)
    np.testing.assert_array_equal(on_gpu(lambda x, s: scale_maybe(x, s, impl="tilelang"), x, s), _maybe_reference(x, s))
