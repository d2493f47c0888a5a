"""Launch specs: expressions, symbol binding and the launch record (no TileLang needed)."""

import json
import struct

import numpy as np
import pytest

from jax_tilek.spec import (
    DeviceKernel,
    KernelArg,
    LaunchSpec,
    ScalarParam,
    TensorBinding,
    TensorParam,
    TmaDescriptor,
    compact_strides,
    evaluate,
    symbols,
)


@pytest.mark.parametrize("a", [-7, -1, 0, 5, 9])
@pytest.mark.parametrize("b", [-4, 3, 8])
def test_integer_division_follows_tir(a, b):
    # floordiv/floormod: toward -inf (Python); div/mod: toward zero (C).
    assert evaluate(["floordiv", a, b], {}) == a // b
    assert evaluate(["floormod", a, b], {}) == a % b
    assert evaluate(["div", a, b], {}) == int(a / b)
    assert evaluate(["mod", a, b], {}) == a - b * int(a / b)


def test_expressions():
    env = {"m": 1000, "n": 64}
    assert evaluate(["floordiv", ["add", "m", 127], 128], env) == 8
    assert evaluate(["select", ["lt", "m", "n"], 1, ["max", "m", "n"]], env) == 1000
    assert evaluate(["cast", "int32", ["mul", 2.5, 3]], env) == 7
    assert evaluate(["and", ["ge", "m", 0], ["not", ["eq", "n", 0]]], env) is True
    assert symbols(["add", "m", ["cast", "int64", "s"]]) == {"m", "s"}
    with pytest.raises(KeyError):
        evaluate(["add", "q", 1], env)


def test_compact_strides():
    assert compact_strides((2, 3, 4)) == (12, 4, 1)
    assert compact_strides((0, 5)) == (5, 1)
    assert compact_strides((5, 0)) == (0, 1)


def test_empty_tensors_bind_without_stride_checks():
    spec = LaunchSpec("t", (TensorParam("y", "float32", ("H", "T"), ("T", 1)),), ())
    assert spec.bind({"y": TensorBinding(0, (64, 0), (1, 1))}, {}) == {"H": 64, "T": 0}


def _spec() -> LaunchSpec:
    x = TensorParam("x", "bfloat16", ("M", 1024), ("S", 1))
    y = TensorParam("y", "bfloat16", ("M", 1024), None)
    alpha = ScalarParam("alpha", "float32")
    k0 = DeviceKernel(
        "k0", (["floordiv", ["add", "M", 3], 4], 1, 1), (128, 1, 1), 0, (1, 1, 1), False, False,
        (KernelArg("buffer", "x"), KernelArg("buffer", "y"), KernelArg("scalar", dtype="float32", value="alpha"),
         KernelArg("scalar", dtype="int32", value="M"), KernelArg("tma", "x_desc")),
    )  # fmt: skip
    k1 = DeviceKernel("k1", (["sub", "M", 1000], 1, 1), (32, 1, 1), 1024, (2, 1, 1), True, False, (KernelArg("buffer", "y"),))
    desc = TmaDescriptor("x_desc", "x", 9, (1024, "M"), (["mul", "S", 2],), (64, 128), (1, 1), 0, 3, 2, 0)
    return LaunchSpec("t", (x, y, alpha), (k0, k1), (desc,))


def test_json_round_trip():
    spec = _spec()
    assert LaunchSpec.from_json(json.loads(spec.dumps())) == spec


def test_bind_solves_symbols_and_checks_shapes():
    spec = _spec()
    tensors = {
        "x": TensorBinding(0, (1000, 1024), (2048, 1), offset=1024),
        "y": TensorBinding(1, (1000, 1024), (1024, 1)),
    }
    env = spec.bind(tensors, {"alpha": 1.5})
    assert env == {"M": 1000, "S": 2048, "alpha": 1.5}

    bad = dict(tensors, y=TensorBinding(1, (999, 1024), (1024, 1)))
    with pytest.raises(ValueError, match=r"dimension 0 of tensor 'y' is 999, but the kernel requires M = 1000"):
        spec.bind(bad, {"alpha": 1.0})
    bad = dict(tensors, y=TensorBinding(1, (1000, 512), (512, 1)))
    with pytest.raises(ValueError, match=r"dimension 1 of tensor 'y' is 512, but the kernel requires 1024"):
        spec.bind(bad, {"alpha": 1.0})
    bad = dict(tensors, y=TensorBinding(1, (1000, 1024), (2048, 1)))
    with pytest.raises(ValueError, match="tensor 'y' must be contiguous"):
        spec.bind(bad, {"alpha": 1.0})
    with pytest.raises(ValueError, match=r"scalar parameter\(s\) \['alpha'\] need values"):
        spec.bind(tensors, {})
    with pytest.raises(ValueError, match="must have rank 2"):
        spec.bind(dict(tensors, x=TensorBinding(0, (1000,), (1,))), {"alpha": 1.0})


def test_record_layout():
    spec = _spec()
    tensors = {
        "x": TensorBinding(0, (1000, 1024), (2048, 1), offset=1024),
        "y": TensorBinding(1, (1000, 1024), (1024, 1)),
    }
    env = spec.bind(tensors, {"alpha": 1.5})
    record, entries = spec.record(env, tensors, num_buffers=2, zero_fill=[1])
    alpha_bits = struct.unpack("<i", struct.pack("<f", 1.5))[0]
    x_offset = 1024 * 2  # bytes
    expected = [1, 2, 1, 1, 1]  # version, buffers, zero fills, TMA descriptors, kernels (k1's grid is empty)
    expected += [1]  # zero-fill buffer 1
    expected += [0, x_offset, 9, 2, 1024, 1000, 4096, 64, 128, 1, 1, 0, 3, 2, 0]  # the TMA recipe
    expected += [250, 1, 1, 128, 1, 1, 0, 1, 1, 1, 0, 5]  # k0: grid, block, smem, cluster, flags, nargs
    expected += [0, 0, x_offset, 0, 1, 0, 2, 4, alpha_bits, 2, 4, 1000, 1, 0, 0]
    assert record.dtype == np.int64
    assert record.tolist() == expected
    assert entries == "k0"

    env = spec.bind({**tensors, "x": TensorBinding(0, (1100, 1024), (1024, 1)), "y": TensorBinding(1, (1100, 1024), (1024, 1))}, {"alpha": 1.5})
    record, entries = spec.record(env, tensors, num_buffers=2)
    assert entries == "k0;k1"
    tail = record.tolist()[-(12 + 3):]
    assert tail == [100, 1, 1, 32, 1, 1, 1024, 2, 1, 1, 1, 1, 0, 1, 0]  # k1: PDL flag, cluster (2,1,1)


def test_record_rejects_out_of_range_values():
    spec = _spec()
    tensors = {"x": TensorBinding(0, (4, 1024), (1024, 1)), "y": TensorBinding(1, (4, 1024), (1024, 1))}
    env = dict(spec.bind(tensors, {"alpha": 1.0}), M=2**31)
    with pytest.raises(ValueError, match="does not fit int32"):
        spec.record(env, tensors, num_buffers=2)


def test_bits_of_counts_packed_sub_byte_types():
    import jax.numpy as jnp

    from jax_tilek.spec import bits_of, size_in_bits

    assert [bits_of(n) for n in ("int4", "uint4", "int2", "uint2", "float4_e2m1fn")] == [4, 4, 2, 2, 4]
    assert [bits_of(n) for n in ("bool", "uint8", "float8_e4m3fn", "bfloat16", "float32", "int64")] == [8, 8, 8, 16, 32, 64]
    assert bits_of(jnp.int4) == 4 and bits_of(np.dtype(jnp.float4_e2m1fn)) == 4 and bits_of(np.float16) == 16
    assert size_in_bits((128, 128), jnp.int4) == 128 * 128 * 4  # 8,192 bytes, though numpy's itemsize says 16,384
    assert size_in_bits((0, 7), "float32") == 0


def test_record_rejects_grids_beyond_cuda_limits():
    x = TensorParam("x", "float32", ("M", "N"), None)
    k = DeviceKernel("k", ("N", "M", 1), (128, 1, 1), 0, (1, 1, 1), False, False, (KernelArg("buffer", "x"),))
    spec = LaunchSpec("t", (x,), (k,))
    ok = {"x": TensorBinding(0, (65535, 3), (3, 1))}
    assert spec.record(spec.bind(ok, {}), ok, num_buffers=1)[1] == "k"
    tensors = {"x": TensorBinding(0, (70000, 3), (3, 1))}
    with pytest.raises(ValueError, match=r"kernel 't' \(k\): grid dimension y = 70000 exceeds CUDA's limit of 65535"):
        spec.record(spec.bind(tensors, {}), tensors, num_buffers=1)
