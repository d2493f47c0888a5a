"""transpose / batched_transpose: reference, rules, transforms, lowering, and the GPU kernel."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, random_array, tilek_calls
from jax_tilek.transpose import batched_transpose, transpose

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


class TestBatchedTranspose(OpContract):
    """The op contract over batched_transpose's cases (the GPU kernel bit-exact against jnp.swapaxes
    on every dtype, tile and window case, and the grouped CTA orders)."""

    fn = batched_transpose
    rows = True  # vmap folds into B, and B shards
    differentiable = (0,)
    bad_inputs = [
        ((jax.ShapeDtypeStruct((2, 64, 64), jnp.int4),), {}, ValueError, "stores packed"),
        ((jax.ShapeDtypeStruct((2, 96, 64), jnp.bfloat16),), {}, ValueError, "multiples of 64"),
    ]


class TestTranspose(OpContract):
    fn = transpose
    differentiable = (0,)
    vmappable = True


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


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int2", "uint2", "float4_e2m1fn"])
@pytest.mark.parametrize("impl", [None, "xla"])
def test_packed_sub_byte_dtypes_are_rejected(dtype, impl):
    """XLA stores these packed (2 or 4 per byte): numpy's itemsize (1) would have the kernel move twice
    (four times) the buffer."""
    for fn, shape in [(batched_transpose, (1, 128, 128)), (transpose, (128, 128))]:
        with pytest.raises(ValueError, match=rf"{fn.__name__}: x's dtype must be 1, 2 or 4 bytes wide, got {dtype}, which XLA stores packed"):
            jax.eval_shape(lambda x: fn(x, impl=impl), jax.ShapeDtypeStruct(shape, getattr(jnp, dtype)))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: transpose([[1.0] * 64] * 64), TypeError, "transpose: x must be an array, got list"),
        (lambda: batched_transpose([[[1.0] * 64] * 64]), TypeError, "batched_transpose: x must be an array, got list"),
        (lambda: transpose(object()), TypeError, "transpose: x must be an array, got object"),
        (lambda: transpose(None), TypeError, "transpose: x must be an array, got NoneType"),
        (lambda: transpose(jnp.zeros((64, 128)), columns=(0.5, 64.5)), TypeError, "transpose: columns must be an integer, got 0.5"),
        (lambda: batched_transpose(jnp.zeros((1, 64, 128)), columns=64), TypeError, r"batched_transpose: columns must be None or a pair \(start, stop\)"),
        (lambda: batched_transpose(jnp.zeros((1, 64, 128)), columns="0:64"), TypeError, "batched_transpose: columns must be None or a pair"),
        (lambda: batched_transpose(jnp.zeros((1, 64, 128)), columns=(0, 64, 128)), TypeError, "batched_transpose: columns must be None or a pair"),
        (lambda: transpose(jnp.zeros((64, 128)), columns=(True, 64)), TypeError, "transpose: columns must be an integer, got True"),
        (lambda: transpose(jnp.zeros((64, 96))), ValueError, "transpose: M and N must be multiples of 64"),
        (lambda: transpose(jnp.zeros((64, 128)), impl="cuda"), ValueError, "transpose: impl must be one of"),
        (lambda: batched_transpose(jnp.zeros((1, 64, 128)), impl=1), ValueError, "batched_transpose: impl must be one of"),
    ],
)
def test_misuse_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_integer_columns_are_fine(rng):
    x = random_array(rng, (64, 256), np.float32)
    np.testing.assert_array_equal(np.asarray(transpose(x, columns=(np.int64(64), np.int32(192)))), x[:, 64:192].T)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 64, 2**31), r"batched_transpose: x has 2147483648 elements along axis 2; the kernel takes extents up to 2147483647"),
        ((2**31, 64, 64), "batched_transpose: x has 2147483648 elements along axis 0"),
        ((2**30, 2**20, 64), r"batched_transpose: x \[1073741824, 1048576, 64\] has 8796093022208 tiles to transpose, more than"),
    ],
)
def test_sizes_beyond_the_kernel_are_rejected_at_trace_time(shape, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: batched_transpose(x, impl="tilelang"), jax.ShapeDtypeStruct(shape, jnp.uint8))
    assert jax.eval_shape(lambda x: batched_transpose(x, impl="xla"), jax.ShapeDtypeStruct(shape, jnp.uint8)).shape == (shape[0], shape[2], shape[1])


# Shapes whose 3-D grid (N tiles, M tiles, B) would exceed CUDA's 65,535 on grid y or z: the kernel
# takes one flat grid of every tile instead. (shape, dtype, columns, expected tiles)
LARGE = [
    ((70000, 64, 64), np.float32, None, 70000),
    ((1, 65537 * 64, 64), ml_dtypes.float8_e4m3fn, None, 65537),
    ((1, 65537 * 64, 128), np.uint8, (64, 128), 65537),
    ((65536, 128, 64), ml_dtypes.float8_e4m3fn, None, 65536),
    ((2, 65536 * 128 + 128, 256), ml_dtypes.bfloat16, (64, 192), 2 * 65537),
    ((1, 2**31 - 64, 64), np.uint8, None, 2**25 - 1),
]


@pytest.mark.parametrize("shape,dtype,columns,tiles", LARGE, ids=lambda v: str(v))
def test_large_batches_and_row_counts_take_a_flat_grid(shape, dtype, columns, tiles):
    text = lower_for_cuda(lambda x: batched_transpose(x, columns=columns), jax.ShapeDtypeStruct(shape, dtype))
    (call,) = tilek_calls(text)
    (k,) = decode_record(call["launch"])["kernels"]
    assert k["grid"] == [tiles, 1, 1]
    b, m, s = shape
    start, stop = columns or (0, s)
    per_word = 4 // np.dtype(dtype).itemsize
    assert [a[2] for a in k["args"][2:]] == [b, m, (stop - start) // per_word, s // per_word]


def test_vmap_over_many_matrices_lowers():
    """vmap folds the mapped axis into B: 70,000 matrices are one launch on the flat grid."""
    x = jax.ShapeDtypeStruct((70000, 64, 128), jnp.bfloat16)
    (call,) = tilek_calls(lower_for_cuda(jax.vmap(transpose), x))
    assert decode_record(call["launch"])["kernels"][0]["grid"] == [70000, 1, 1]
    (call,) = tilek_calls(lower_for_cuda(jax.vmap(jax.vmap(transpose)), jax.ShapeDtypeStruct((350, 200, 64, 128), jnp.bfloat16)))
    assert decode_record(call["launch"])["kernels"][0]["grid"] == [70000, 1, 1]


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


# The kernel bit-exact on every dtype, tile and window case, and in grouped CTA orders: TestBatchedTranspose.


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


FLAT_CASES = [c for c in batched_transpose.cases if c.name.startswith("flat_")]  # up to 1.1 GB each


@pytest.mark.gpu
@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda c: c.name)
def test_kernel_flat_grid_is_bit_exact(on_gpu, rng, case):
    (x,) = case.arrays(rng)
    columns = case.kwargs["columns"]
    y = on_gpu(case.call(batched_transpose, "tilelang"), x)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint8), _expected(x, columns).view(np.uint8))
