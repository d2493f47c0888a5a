"""Bring your own kernel: an elementwise kernel with a dynamic dimension, a warp-specialized TMA/wgmma
GEMM with > 48 KB of dynamic shared memory, and a function with two device kernels."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_tilek
from jax_tilek import View

import byo_kernels
from conftest import HAS_GPU
from jax_tilek.testing import decode_record, lower_for_cuda, random_array, tilek_calls

SCALE_ROWS = [1, 5, 4096, 65537]
GEMM_ROWS = [1, 200, 1024]
GEMM_N, GEMM_K = 512, 1024


def scale_rows(x, s, impl=None):
    return jax_tilek.tilelang_call(
        byo_kernels.scale_rows, x, s,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        params=dict(n_cols=x.shape[1], dtype=x.dtype.name),
        reference=lambda x, s: (x.astype(jnp.float32) * s[:, None]).astype(x.dtype),
        impl=impl,
    )  # fmt: skip


def gemm(a, b, impl=None):
    return jax_tilek.tilelang_call(
        byo_kernels.gemm, a, b,
        out_shape=jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.bfloat16),
        params=dict(n=b.shape[1], k=a.shape[1]),
        reference=lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
        impl=impl,
    )  # fmt: skip


def axpy_then_square(x_wide, n, alpha, impl=None):
    """Reads the first n columns of x_wide in place (strided rows); returns (alpha * x, (alpha * x)**2 + 1)."""
    m, s = x_wide.shape
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax_tilek.tilelang_call(
        byo_kernels.axpy_then_square, x_wide,
        out_shape=(out, out),
        params=dict(n=n),
        scalars=dict(alpha=alpha),
        views={"x": View((m, n), (s, 1))},
        reference=lambda x: (alpha * x[:, :n], (alpha * x[:, :n]) ** 2 + 1),
        impl=impl,
    )  # fmt: skip


S = jax.ShapeDtypeStruct
# The GPU tests' programs, compiled on the build machine (tests/gpu_programs.py prepare).
GPU_PROGRAMS = [
    (lambda x, s: scale_rows(x, s, impl="tilelang"), (S((5, 1024), jnp.bfloat16), S((5,), jnp.float32))),
    (lambda a, b: gemm(a, b, impl="tilelang"), (S((200, GEMM_K), jnp.bfloat16), S((GEMM_K, GEMM_N), jnp.bfloat16))),
    (lambda x: axpy_then_square(x, 256, -0.75, impl="tilelang"), (S((777, 384), jnp.float32),)),
]


def _scale_expected(x, s):
    return (x.astype(np.float32) * s[:, None]).astype(x.dtype)


def test_reference_paths(rng):
    x, s = random_array(rng, (5, 256), ml_dtypes.bfloat16), random_array(rng, (5,), np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(scale_rows)(x, s)), _scale_expected(x, s))
    a, b = random_array(rng, (3, GEMM_K), ml_dtypes.bfloat16), random_array(rng, (GEMM_K, GEMM_N), ml_dtypes.bfloat16)
    expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(gemm(a, b), np.float32), expected, rtol=2e-2, atol=0.5)
    xw = random_array(rng, (4, 384), np.float32)
    y, z = axpy_then_square(xw, 256, 1.5)
    np.testing.assert_array_equal(np.asarray(y), 1.5 * xw[:, :256])


def test_calls_with_equal_arguments_share_one_op():
    from jax_tilek import call

    before = call._cached_op.cache_info().misses
    for _ in range(3):
        jax.eval_shape(scale_rows, jax.ShapeDtypeStruct((7, 128), jnp.bfloat16), jax.ShapeDtypeStruct((7,), jnp.float32))
    assert call._cached_op.cache_info().misses == before + 1


def test_lowered_launches():
    (call,) = tilek_calls(
        lower_for_cuda(gemm, jax.ShapeDtypeStruct((200, GEMM_K), jnp.bfloat16), jax.ShapeDtypeStruct((GEMM_K, GEMM_N), jnp.bfloat16))
    )
    record = decode_record(call["launch"])
    (k,) = record["kernels"]
    assert k["grid"] == [GEMM_N // 128, 2, 1] and k["block"] == [384, 1, 1] and k["smem"] > 48 * 1024
    assert [a[0] for a in k["args"]] == [1, 1, 0, 2]  # two TMA descriptors, C, m
    a_map = record["tma"][0]
    assert a_map["buffer"] == 0 and a_map["dims"] == [GEMM_K, 200] and a_map["strides"] == [GEMM_K * 2]

    (call,) = tilek_calls(lower_for_cuda(lambda x: axpy_then_square(x, 256, 1.5), jax.ShapeDtypeStruct((10, 384), jnp.float32)))
    assert call["entries"] == "main_kernel;main_kernel_1"
    k0, k1 = decode_record(call["launch"])["kernels"]
    alpha_bits = int(np.float32(1.5).view(np.int32))
    assert k0["args"] == [(0, 0, 0), (0, 1, 0), (2, 4, alpha_bits), (2, 4, 10), (2, 4, 384)]  # x, y, alpha, m, s
    assert k1["args"] == [(0, 1, 0), (0, 2, 0), (2, 4, 10)]  # y, z, m


def _scale_call(x, s, **kwargs):
    return jax_tilek.tilelang_call(
        byo_kernels.scale_rows, x, s,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        params=dict(n_cols=x.shape[1], dtype=x.dtype.name),
        reference=lambda x, s: x * s[:, None],
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(buffers=dict(x=0, y=0)), r"binds both 'x' and 'y' to buffer 0 \(operand 0\)"),
        (dict(buffers=dict(x=0, s=1)), r"output 0 \(buffer 2\) is bound to no kernel parameter"),
        (dict(buffers=dict(x=0, s=1, y=3)), r"buffers\['y'\] = 3 is not a buffer index 0\.\.2"),
        (dict(buffers=dict(x=0, s=1, y=2), views={"X": View((4, 64))}), r"views names \['X'\], which buffers does not bind"),
        (dict(zero_fill=(1,)), r"zero_fill index 1 is out of range"),
        (dict(zero_fill=(-1,)), r"zero_fill index -1 is out of range"),
    ],
)
def test_bindings_are_checked_when_traced(rng, kwargs, error):
    x, s = random_array(rng, (4, 64), np.float32), random_array(rng, (4,), np.float32)
    with pytest.raises(ValueError, match=error):
        _scale_call(x, s, **kwargs)  # on any machine: before any kernel is built
    with pytest.raises(ValueError, match=error):
        jax.eval_shape(lambda x, s: _scale_call(x, s, **kwargs), x, s)


def test_view_names_are_checked_against_the_kernel():
    pytest.importorskip("tilelang")
    args = jax.ShapeDtypeStruct((4, 64), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float32)
    with pytest.raises(ValueError, match=r"views names \['X'\], which are not tensor parameters of the kernel \['x', 's', 'y'\]"):
        lower_for_cuda(lambda x, s: _scale_call(x, s, views={"X": View((4, 64))}), *args)
    lower_for_cuda(lambda x, s: _scale_call(x, s, views={"x": View((4, 64))}), *args)  # the right name


def test_a_call_without_reference_says_what_to_pass(rng):
    x = random_array(rng, (4, 64), np.float32)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    with pytest.raises(ValueError, match=r"no reference was given.*Pass reference="):
        jax_tilek.tilelang_call(byo_kernels.scale_rows, x, np.ones(4, np.float32), out_shape=out, params=dict(n_cols=64, dtype="float32"), impl="xla")
    if not HAS_GPU:
        with pytest.raises(ValueError, match=r"no reference was given.*Pass reference="):
            jax_tilek.tilelang_call(byo_kernels.scale_rows, x, np.ones(4, np.float32), out_shape=out, params=dict(n_cols=64, dtype="float32"))


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_elementwise_kernel_on_gpu(on_gpu, rng):
    inputs = [(random_array(rng, (m, 1024), ml_dtypes.bfloat16), random_array(rng, (m,), np.float32)) for m in SCALE_ROWS]
    outs = on_gpu(lambda *xs: [scale_rows(x, s, impl="tilelang") for x, s in xs], *inputs)
    for (x, s), y in zip(inputs, outs):
        np.testing.assert_array_equal(np.asarray(y).view(np.uint16), _scale_expected(x, s).view(np.uint16))


@pytest.mark.gpu
def test_gemm_kernel_on_gpu(on_gpu, rng):
    b = random_array(rng, (GEMM_K, GEMM_N), ml_dtypes.bfloat16)
    lhs = [random_array(rng, (m, GEMM_K), ml_dtypes.bfloat16) for m in GEMM_ROWS]
    outs = on_gpu(
        lambda b, *lhs: [(gemm(a, b, impl="tilelang"), jnp.dot(a, b, preferred_element_type=jnp.float32)) for a in lhs],
        b, *lhs,
    )  # fmt: skip
    for a, (c, c_xla) in zip(lhs, outs):
        ref = a.astype(np.float64) @ b.astype(np.float64)
        c = np.asarray(c, np.float64)
        assert np.linalg.norm(c - ref) / np.linalg.norm(ref) < 5e-3  # bf16 output rounding
        c_xla = np.asarray(c_xla, np.float64)
        assert np.linalg.norm(c - c_xla) / np.linalg.norm(c_xla) < 5e-3


@pytest.mark.gpu
def test_two_kernel_function_on_gpu(on_gpu, rng):
    xw = random_array(rng, (777, 384), np.float32)
    y, z = on_gpu(lambda x: axpy_then_square(x, 256, -0.75, impl="tilelang"), xw)
    np.testing.assert_array_equal(np.asarray(y), np.float32(-0.75) * xw[:, :256])
    ref = (-0.75 * xw[:, :256].astype(np.float64)) ** 2 + 1
    np.testing.assert_allclose(np.asarray(z), ref, rtol=1e-6)
