"""batched_transpose_weight_sf: DeepGEMM packed UE8M0 sf0/sf1 against numpy, rules, lowering, the GPU kernel."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tilek.quant import batched_transpose_weight_sf
from jax_tilek.testing import OpContract, decode_record, lower_for_cuda, tilek_calls
from quant_testing import assert_bytes_equal


def np_weight_sf(sf: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """sf0 [(G,) ceil(k_sf/4), n] and sf1 [(G,) ceil(n_sf/4), k], int32, from the definition."""
    s3 = sf if sf.ndim == 3 else sf[None]
    g, ns, ks = s3.shape
    e = (s3.view(np.uint32) >> 23) & 0xFF
    sf0 = np.zeros((g, -(-ks // 4), ns * bs), np.uint32)
    sf1 = np.zeros((g, -(-ns // 4), ks * bs), np.uint32)
    for p in range(sf0.shape[1]):
        for j in range(4):
            if 4 * p + j < ks:
                sf0[:, p, :] |= np.repeat(e[:, :, 4 * p + j], bs, axis=1) << (8 * j)  # row r uses scale row r // bs
    for p in range(sf1.shape[1]):
        for i in range(4):
            if 4 * p + i < ns:
                sf1[:, p, :] |= np.repeat(e[:, 4 * p + i, :], bs, axis=1) << (8 * i)  # column c uses scale column c // bs
    sf0, sf1 = sf0.view(np.int32), sf1.view(np.int32)
    return (sf0, sf1) if sf.ndim == 3 else (sf0[0], sf1[0])


class TestBatchedTransposeWeightSf(OpContract):
    fn = batched_transpose_weight_sf
    bad_inputs = [(([jax.ShapeDtypeStruct((4, 4), jnp.float32)],), dict(block_size=64, transpose_sf1s=[False]), ValueError, r"block_size must be one of \(32, 128\)")]


def warp_tasks(shape: tuple[int, int, int], bs: int) -> int:
    """Warps of one weight's scales ``(G, n_sf, k_sf)``: each writes up to 512 words of one output row."""
    g, n_sf, k_sf = shape
    return g * -(-k_sf // 4) * -(-n_sf * bs // 512) + g * -(-n_sf // 4) * -(-k_sf * bs // 512)


def random_scales(rng, shape, exact=True):
    """Powers of two over the whole exponent range; with exact=False also signs and mantissas (ignored)."""
    sf = np.exp2(rng.integers(-126, 128, size=shape).astype(np.float64)).astype(np.float32)
    if not exact:
        sf *= rng.uniform(1, 2, size=shape).astype(np.float32) * rng.choice([-1, 1], size=shape).astype(np.float32)
    return sf


# (shape of sf, block size): 2-D and grouped; k_sf and n_sf multiples of 4 or not (partial words).
CASES = [
    ((56, 16), 128),
    ((4, 7, 3), 128),
    ((2, 8, 40), 128),
    ((1, 1), 128),
    ((256, 56, 16), 128),  # MoE experts: 256 groups of a 7168 x 2048 weight
    ((12, 36), 32),
    ((3, 4, 20), 32),
]


@pytest.mark.parametrize("exact", [True, False])
def test_reference_matches_numpy(rng, exact):
    for bs in (32, 128):
        sfs = [random_scales(rng, shape, exact) for shape, b in CASES if b == bs and (exact or len(shape) == 2 or shape[0] < 256)]
        out = batched_transpose_weight_sf([jnp.asarray(s) for s in sfs], bs, [i % 2 == 0 for i in range(len(sfs))], impl="xla")
        assert len(out) == len(sfs)
        for s, (sf0, sf1) in zip(sfs, out):
            e0, e1 = np_weight_sf(s, bs)
            assert_bytes_equal(sf0, e0)
            assert_bytes_equal(sf1, e1)


def test_layout_matches_tilekernels_views(rng):
    """TileKernels' logical sf0 (n, ceil(k_sf/4)) with strides (1, n) is this storage transposed: row r's
    word p holds the exponents of scale row r // bs, columns 4p .. 4p+3, the first in the low byte."""
    s = random_scales(rng, (3, 9))
    (sf0, sf1), = batched_transpose_weight_sf([s], 128, [False], impl="xla")
    logical0, logical1 = (np.ascontiguousarray(np.asarray(a).T) for a in (sf0, sf1))  # (n, 3) and (k, 1)
    e = ((s.view(np.uint32) >> 23) & 0xFF).astype(np.uint8)
    for r in (0, 127, 128, 383):
        assert list(logical0[r : r + 1].view(np.uint8)[0]) == list(e[r // 128, 0:4]) + list(e[r // 128, 4:8]) + [e[r // 128, 8], 0, 0, 0]
    for c in (0, 1000):
        assert list(logical1[c : c + 1].view(np.uint8)[0]) == list(e[0:3, c // 128]) + [0]


def test_empty_list():
    assert batched_transpose_weight_sf([], 128, []) == []


def test_abstract_eval_shapes():
    out = jax.eval_shape(
        lambda a, b: batched_transpose_weight_sf([a, b], 32, [True, False]),
        jax.ShapeDtypeStruct((12, 36), jnp.float32), jax.ShapeDtypeStruct((5, 8, 4), jnp.float32),
    )  # fmt: skip
    assert [(x.shape, x.dtype) for pair in out for x in pair] == [
        ((9, 384), jnp.int32), ((3, 1152), jnp.int32), ((5, 1, 256), jnp.int32), ((5, 2, 128), jnp.int32)
    ]


@pytest.mark.parametrize(
    "shapes,dtype,bs,flags,message",
    [
        ([(4, 4)], jnp.float32, 64, [False], r"block_size must be one of \(32, 128\)"),
        ([(4, 4)], jnp.bfloat16, 128, [False], r"sf\[0\] must be float32"),
        ([(4,)], jnp.float32, 128, [False], r"sf\[0\] must be float32 \(n/bs, k/bs\) or \(G, n/bs, k/bs\)"),
        ([(4, 4), (3, 4)], jnp.float32, 32, [False, False], r"sf\[1\] of shape \[3, 4\] with block_size 32 means n = 96, k = 128"),
        ([(4, 4)], jnp.float32, 32, [False, True], "1 scale arrays but 2 transpose_sf1s flags"),
        ([(0, 4, 4)], jnp.float32, 128, [False], "G >= 1"),
    ],
)
def test_bad_inputs_raise_at_trace_time(shapes, dtype, bs, flags, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda *s: batched_transpose_weight_sf(list(s), bs, flags), *[jax.ShapeDtypeStruct(x, dtype) for x in shapes])


# ---------------------------------------------------------------------------------------------
# Lowering and GPU.


def _lower(cases, bs):
    structs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape, b in cases if b == bs]
    return tilek_calls(lower_for_cuda(lambda *s: batched_transpose_weight_sf(list(s), bs, [False] * len(s)), *structs))


@pytest.mark.parametrize("bs", [32, 128])
def test_one_launch_for_the_list(bs):
    (call,) = _lower(CASES, bs)
    assert call["has_cubin"]
    record = decode_record(call["launch"])
    shapes = [s if len(s) == 3 else (1, *s) for s, b in CASES if b == bs]
    assert record["num_buffers"] == 3 * len(shapes)
    (k,) = record["kernels"]
    warps = sum(warp_tasks(s, bs) for s in shapes)
    assert k["grid"] == [-(-warps // 8), 1, 1] and k["block"] == [256, 1, 1]
    assert sorted(a[1] for a in k["args"]) == list(range(3 * len(shapes)))


def test_long_lists_take_several_launches():
    """One launch serves up to 32 weights: 33 take two, of 32 * 3 and 3 buffers (operands and results;
    counted in the text, whose launch record of 32 weights is printed in hex)."""
    structs = [jax.ShapeDtypeStruct((4, 4), jnp.float32)] * 33
    text = lower_for_cuda(lambda *s: batched_transpose_weight_sf(list(s), 32, [False] * len(s)), *structs)
    calls = [line for line in text.splitlines() if "stablehlo.custom_call @tilek_launch" in line]
    buffers = [re.search(r"@tilek_launch\(([^)]*)\)", c).group(1).count("%") + c.split("->")[-1].count("tensor<") for c in calls]
    assert buffers == [96, 3]


@pytest.mark.gpu
def test_kernel_is_bit_exact(on_gpu, rng):
    sfs = {bs: [random_scales(rng, shape, exact=False) for shape, b in CASES if b == bs] for bs in (32, 128)}

    def program(small, large):
        return [batched_transpose_weight_sf(small, 32, [True] * len(small), impl="tilelang"),
                batched_transpose_weight_sf(large, 128, [False] * len(large), impl="tilelang")]  # fmt: skip

    outs = on_gpu(program, sfs[32], sfs[128])
    for bs, out in zip((32, 128), outs):
        for s, (sf0, sf1) in zip(sfs[bs], out):
            e0, e1 = np_weight_sf(s, bs)
            assert_bytes_equal(sf0, e0)
            assert_bytes_equal(sf1, e1)


def test_arguments_raise_naming_the_op():
    name = "batched_transpose_weight_sf"
    s = np.ones((4, 4), np.float32)
    with pytest.raises(TypeError, match=rf"^{name}: sf must be a list or tuple of arrays"):
        batched_transpose_weight_sf(np.ones((2, 4, 4), np.float32), 128, [False, False])  # not split along G silently
    with pytest.raises(TypeError, match=rf"^{name}: transpose_sf1s must be a list or tuple"):
        batched_transpose_weight_sf([s], 128, "T")
    with pytest.raises(TypeError, match=rf"^{name}: transpose_sf1s\[0\] must be True or False"):
        batched_transpose_weight_sf([s], 128, ["yes"])
    with pytest.raises(TypeError, match=rf"^{name}: block_size must be an int"):
        batched_transpose_weight_sf([s], 128.0, [False])
    with pytest.raises(TypeError, match=rf"^{name}: sf\[1\] must be an array"):
        batched_transpose_weight_sf([s, "abc"], 128, [False, False])
    with pytest.raises(ValueError, match=rf"^{name}: block_size must be one of"):
        batched_transpose_weight_sf([s], 0, [False])


def test_huge_weights_are_refused_or_lower():
    """The kernel is generated for the shapes with int32 indices: each array below 2^31 elements."""
    for shape in [(2**12, 64, 64), (12, 2**20), (2**20, 12)]:
        with pytest.raises(ValueError, match=r"each array may have at most 2\^28 elements"):
            jax.eval_shape(lambda s: batched_transpose_weight_sf([s], 128, [False]), jax.ShapeDtypeStruct(shape, jnp.float32))
    for shape in [(2**11, 64, 64), (4, 2**20), (2**20, 4)]:  # 2^28 and 2^27 words: the largest lower
        (call,) = _lower([(shape, 128)], 128)
        (k,) = decode_record(call["launch"])["kernels"]
        assert k["grid"] == [-(-warp_tasks(shape if len(shape) == 3 else (1, *shape), 128) // 8), 1, 1]
