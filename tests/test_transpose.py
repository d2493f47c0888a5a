"""transpose / batched_transpose: reference, rules, transforms, lowering, and the GPU kernel."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.transpose import batched_transpose, transpose

from helpers import decode_record, lower_for_cuda, random_array, tilek_calls

DTYPES = [ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16, np.float32]
# (shape of x, columns window): tiles of 64 and 128 on both axes, a column window of strided rows,
# one batch, and zero batches.
CASES = [
    ((1, 64, 64), None),
    ((3, 128, 192), None),
    ((2, 192, 128), None),
    ((2, 320, 448), None),
    ((2, 128, 384), (128, 320)),
    ((1, 256, 512), (64, 448)),
    ((0, 64, 128), None),
]


def _expected(x: np.ndarray, columns) -> np.ndarray:
    start, stop = columns or (0, x.shape[-1])
    return np.ascontiguousarray(np.swapaxes(x[..., start:stop], -1, -2))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,columns", CASES)
def test_reference_matches_numpy(rng, dtype, shape, columns):
    x = random_array(rng, shape, dtype)
    y = batched_transpose(jnp.asarray(x), columns=columns, impl="xla")
    np.testing.assert_array_equal(np.asarray(y).view(np.uint8), _expected(x, columns).view(np.uint8))


def test_2d_transpose(rng):
    x = random_array(rng, (128, 64), np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(transpose)(x)), x.T)
    np.testing.assert_array_equal(np.asarray(transpose(x, columns=(0, 64))), x.T)


@pytest.mark.parametrize(
    "shape,dtype,columns,message",
    [
        ((64, 64), np.float32, None, r"x must be \[B, M, N\]"),
        ((1, 64, 64), np.complex64, None, "must be 1, 2 or 4 bytes wide"),
        ((1, 96, 64), np.float32, None, "M and N must be multiples of 64, got M=96, N=64"),
        ((1, 64, 160), np.float32, None, "M and N must be multiples of 64, got M=64, N=160"),
        ((1, 64, 128), np.float32, (2, 66), r"columns start \(2\) and the row length \(128\) must be multiples of 4"),
        ((1, 64, 130), np.float32, (0, 64), r"the row length \(130\)"),
        ((1, 64, 128), np.float32, (64, 192), "is not a window"),
    ],
)
def test_bad_inputs_raise_at_trace_time(shape, dtype, columns, message):
    x = jax.ShapeDtypeStruct(shape, dtype)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: batched_transpose(x, columns=columns), x)


def test_abstract_eval_is_exact():
    out = jax.eval_shape(lambda x: batched_transpose(x, columns=(64, 192)), jax.ShapeDtypeStruct((5, 128, 256), jnp.bfloat16))
    assert out.shape == (5, 128, 128) and out.dtype == jnp.bfloat16


def test_grad_on_the_reference_path(rng):
    x = jnp.asarray(random_array(rng, (2, 64, 256), np.float32))
    w = jnp.asarray(random_array(rng, (2, 128, 64), np.float32))

    def loss(x, impl):
        return jnp.sum(batched_transpose(x, columns=(64, 192), impl=impl) * w)

    expected = np.zeros(x.shape, np.float32)
    expected[..., 64:192] = np.swapaxes(np.asarray(w), -1, -2)  # d/dx sum(T(x[..., 64:192]) * w)
    for impl in (None, "xla"):
        np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(x, impl)), expected)


def test_vmap_folds_into_the_batch(rng):
    x = random_array(rng, (3, 2, 64, 128), np.float32)
    y = jax.jit(jax.vmap(batched_transpose, in_axes=1, out_axes=1))(x)
    np.testing.assert_array_equal(np.asarray(y), np.swapaxes(x, -1, -2))
    y = jax.vmap(transpose)(x[0])
    np.testing.assert_array_equal(np.asarray(y), np.swapaxes(x[0], -1, -2))
    text = lower_for_cuda(jax.vmap(batched_transpose), jax.ShapeDtypeStruct((3, 2, 64, 128), jnp.float32))
    (call,) = tilek_calls(text)
    assert decode_record(call["launch"])["kernels"][0]["grid"] == [1, 1, 6]  # vmapped axis folded into B


def test_impl_tilelang_refuses_to_run_off_gpu():
    x = jnp.zeros((1, 64, 64), jnp.float32)
    with pytest.raises(ValueError, match="impl='tilelang' needs an NVIDIA Hopper or Blackwell GPU"):
        jax.jit(lambda x: batched_transpose(x, impl="tilelang"))(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,columns", CASES)
def test_lowers_to_one_launch_per_call(dtype, shape, columns):
    """Cross-lowers every GPU test configuration for "cuda" (compiling its cubin) and reads it back."""
    text = lower_for_cuda(lambda x: batched_transpose(x, columns=columns), jax.ShapeDtypeStruct(shape, dtype))
    (call,) = tilek_calls(text)
    assert call["name"] == "batched_transpose" and call["has_cubin"]
    record = decode_record(call["launch"])
    assert record["num_buffers"] == 2
    b, m, s = shape
    start, stop = columns or (0, s)
    n = stop - start
    if b == 0:  # nothing to do: no launch, the (empty) output is zero-filled
        assert record["kernels"] == [] and record["zero_fill"] == [1] and call["entries"] == ""
        return
    tile_m, tile_n = (128 if m % 128 == 0 else 64), (128 if n % 128 == 0 else 64)
    itemsize = np.dtype(dtype).itemsize
    (k,) = record["kernels"]
    assert call["entries"] == "batched_transpose_kernel"
    assert k["grid"] == [n // tile_n, m // tile_m, b]
    assert k["block"] == [min(256, tile_m * tile_n * itemsize**2 // 64), 1, 1]
    assert k["smem"] == tile_m * tile_n * itemsize
    per_word = 4 // itemsize  # the kernel moves 32-bit words
    assert k["args"][0] == (0, 0, start * itemsize)  # x: operand 0, byte offset to the window
    assert k["args"][1] == (0, 1, 0)  # y: result 0
    assert [a[2] for a in k["args"][2:]] == [b, m, n // per_word, s // per_word]  # B, M, N and row stride in words


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,columns", CASES)
def test_kernel_is_bit_exact(on_gpu, rng, dtype, shape, columns):
    x = random_array(rng, shape, dtype)
    y = on_gpu(lambda x: batched_transpose(x, columns=columns, impl="tilelang"), x)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint8), _expected(x, columns).view(np.uint8))


@pytest.mark.gpu
def test_kernel_grad_and_vmap(on_gpu, rng):
    x = random_array(rng, (3, 2, 128, 256), np.float32)
    w = random_array(rng, (3, 2, 128, 128), np.float32)

    def program(x, w):
        f = jax.vmap(lambda x: batched_transpose(x, columns=(128, 256), impl="tilelang"))
        return f(x), jax.grad(lambda x: jnp.sum(f(x) * w))(x)

    y, g = on_gpu(program, x, w)
    np.testing.assert_array_equal(np.asarray(y), np.swapaxes(x[..., 128:], -1, -2))
    expected = np.zeros_like(x)
    expected[..., 128:] = np.swapaxes(w, -1, -2)
    np.testing.assert_array_equal(np.asarray(g), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,group_m", [(ml_dtypes.bfloat16, 4), (ml_dtypes.float8_e4m3fn, 8), (np.float32, 2)], ids=str)
def test_grouped_cta_order_is_bit_exact(on_gpu, rng, dtype, group_m):
    import jax_tilek
    from jax_tilek.transpose.batched_transpose import batched_transpose_kernel, threads_for

    x = random_array(rng, (3, 1024, 384), dtype)
    esize = np.dtype(dtype).itemsize
    per_word = 4 // esize

    def program(x):
        b, m, n = x.shape
        return jax_tilek.tilelang_call(
            batched_transpose_kernel, x,
            out_shape=jax.ShapeDtypeStruct((b, n, m), x.dtype),
            params=dict(esize=esize, tile_m=128, tile_n=128, threads=threads_for(esize, 128, 128), group_m=group_m),
            views={"x": jax_tilek.View((b, m, n // per_word), dtype=np.uint32), "y": jax_tilek.View((b, n, m // per_word), dtype=np.uint32)},
        )  # fmt: skip

    y = on_gpu(program, x)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint8), _expected(x, None).view(np.uint8))
