"""RoPE (jax_tilek.rope.apply_rotary): the op contract over its cases, the reference against independent
float64 numpy math (TileKernels' ``rotary_embedding_ref`` semantics), the custom VJP (the conjugate
rotation), launches and kernel configurations lowered for "cuda", vmap, sharding, argument errors, and on
a GPU the kernel against a numpy mirror of its fp32 FMA arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jax_tilek
from jax_tilek import rope
from jax_tilek.rope import _apply_rotary as R
from jax_tilek.testing import OpContract, assert_bytes_equal, decode_record, lower_for_cuda, over_arrays, tilek_calls
from rope_testing import BF16, F16, F32, I32, assert_near, inputs, np_kernel, np_rope, pairs, ulps, window_start

apply_rotary = rope.apply_rotary


def _s(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


# ---------------------------------------------------------------------------------------------
# The contract. With positions, tokens are independent rows (vmap folds, tokens shard); without, a
# token's row is its index in the sequence, so a token-sharded program gathers.

_BAD = [
    ((_s((4, 2, 128)), _s((8, 32), F32)), {}, ValueError, r"rotary dim \(cos_sin_cache.shape\[1\]\) must be 64 or 128, got 32"),
    ((_s((4, 2, 128)), _s((8, 256), F32)), {}, ValueError, "must be 64 or 128, got 256"),
    ((_s((4, 2, 32)), _s((8, 64), F32)), {}, ValueError, r"rotary window of query \(the first rot columns\) must be rot = 64 columns"),
    ((_s((4, 2, 192)), _s((8, 64), F32)), dict(columns=(0, 128)), ValueError, r"columns=\(0, 128\) -> \[0, 128\)\) must be rot = 64"),
    ((_s((4, 2, 192)), _s((8, 64), F32), _s((4, 1, 32))), dict(columns=(-64, None)), ValueError, "rotary window of key"),
    ((_s((4, 2, 100)), _s((8, 64), F32)), {}, ValueError, r"head dim \(100\) and rotary window start \(0\) must be multiples of 8"),
    ((_s((4, 2, 128), F32), _s((8, 64), F32)), dict(columns=(2, 66)), ValueError, r"window start \(2\) must be multiples of 4"),
    ((_s((4, 2, 128)), _s((8, 128), BF16)), {}, ValueError, r"cos_sin_cache must be float32 \[S_ro, rot\]"),
    ((_s((4, 2, 128)), _s((128,), F32)), {}, ValueError, r"cos_sin_cache must be float32 \[S_ro, rot\]"),
    ((_s((4, 2, 128)), _s((0, 128), F32)), {}, ValueError, "at least one row"),
    ((_s((4, 128)), _s((8, 128), F32)), {}, ValueError, r"query must be \[T, heads, D\] or \[B, S, heads, D\]"),
    ((_s((4, 2, 128), np.int32), _s((8, 128), F32)), {}, ValueError, "query must be bfloat16, float16 or float32"),
    ((_s((4, 2, 128)), _s((8, 128), F32), _s((4, 2, 128), F32)), {}, ValueError, "key must have query's dtype"),
    ((_s((4, 2, 128)), _s((8, 128), F32), _s((5, 2, 128))), {}, ValueError, r"key must be \[4, heads, D\] like query"),
    ((_s((2, 4, 2, 128)), _s((8, 128), F32), _s((4, 2, 128))), {}, ValueError, r"key must be \[2, 4, heads, D\]"),
    ((_s((4, 2, 128)), _s((8, 128), F32), None, _s((5,), I32)), {}, ValueError, r"positions must have query's leading shape \[4\]"),
    ((_s((2, 4, 2, 128)), _s((8, 128), F32), None, _s((8,), I32)), {}, ValueError, r"leading shape \[2, 4\]"),
    ((_s((4, 2, 128)), _s((8, 128), F32), None, _s((4,), F32)), {}, ValueError, "positions must be int32 or int64"),
    ((_s((4, 2, 128)), _s((8, 128), F32)), dict(interleaved=1), TypeError, "interleaved must be True or False"),
    ((_s((4, 2, 128)), _s((8, 128), F32)), dict(conjugate="no"), TypeError, "conjugate must be True or False"),
    ((_s((4, 2, 128)), _s((8, 128), F32)), dict(seqlen_offset=1.0), TypeError, "seqlen_offset must be an integer"),
    ((_s((4, 2, 128)), _s((8, 128), F32)), dict(seqlen_offset=2**31), ValueError, "seqlen_offset must fit int32"),
    ((_s((4, 2, 128)), _s((8, 128), F32)), dict(columns=(0, 64, 1)), TypeError, "columns must be None or a pair"),
    ((_s((4, 2, 128)), _s((8, 128), F32)), dict(columns=(0.0, 128)), TypeError, "columns must be an integer"),
    ((_s((4, 2, 128)), _s((8, 128), F32)), dict(impl="cuda"), ValueError, "apply_rotary: impl must be one of"),
    ((_s((2**30, 2, 1, 64)), _s((8, 64), F32)), {}, ValueError, r"query may have at most 2147482623 tokens \(int32 token indices\)"),
    ((_s((4, 1, 64)), _s((2**31, 64), F32)), {}, ValueError, "cos_sin_cache may have at most 2147483647 rows"),
]


class TestApplyRotaryWithPositions(OpContract):
    fn = apply_rotary
    cases = [c for c in apply_rotary.cases if c.args[3] is not None]
    rows = True
    differentiable = (0, 2)
    bad_inputs = _BAD


class TestApplyRotaryWithoutPositions(OpContract):
    fn = apply_rotary
    cases = [c for c in apply_rotary.cases if c.args[3] is None]
    differentiable = (0, 2)


def test_cases_cover_the_layouts():
    """The contract cases (run on the CPU, and on the GPU against the reference) span every option."""
    small = [c for c in apply_rotary.cases if not c.bench]
    kw = [c.kwargs for c in small]
    assert {k["interleaved"] for k in kw} == {False, True} and {k["conjugate"] for k in kw} == {False, True}
    assert {np.dtype(c.args[0].dtype) for c in small} == {BF16, F16, F32}
    assert {c.args[0].ndim for c in small} == {3, 4} and {c.args[1].shape[1] for c in small} == {64, 128}
    assert {c.args[2] is None for c in small} == {False, True} and {c.args[3] is None for c in small} == {False, True}
    assert any(k["seqlen_offset"] for k in kw) and {k["columns"] for k in kw} >= {None, (-64, None), (16, 80)}
    assert any(c.args[0].shape[0] == 0 for c in small)


# ---------------------------------------------------------------------------------------------
# The reference against float64 numpy.


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("conjugate", [False, True], ids=["fwd", "conj"])
@pytest.mark.parametrize("layout", ["3d_positions", "4d_positions", "4d_offset", "3d_offset_suffix", "prefix"])
def test_reference_matches_float64(rng, dtype, interleaved, conjugate, layout):
    lead, q, k, rot, offset, positions, columns = {
        "3d_positions": ((11,), (3, 128), (2, 128), 128, 0, True, None),
        "4d_positions": ((2, 6), (3, 64), (1, 64), 64, 5, True, None),
        "4d_offset": ((3, 7), (2, 64), (2, 64), 64, 9, False, None),
        "3d_offset_suffix": ((9,), (2, 192), (1, 64), 64, 4, False, (-64, None)),
        "prefix": ((5,), (2, 160), (3, 136), 128, 0, True, None),
    }[layout]
    x, y, cache, pos = inputs(rng, lead, q, k, rot, 40, dtype, positions, offset)
    qo, ko = apply_rotary(x, cache, y, pos, interleaved, conjugate, offset, columns=columns, impl="xla")
    for got, src in ((qo, x), (ko, y)):
        start = window_start(src.shape[-1], columns, rot)
        want, scale = np_rope(src, cache, pos, offset, interleaved, conjugate, start)
        got = np.asarray(got)
        assert got.dtype == src.dtype and got.shape == src.shape
        eps = float(np.finfo(dtype).eps) if dtype != BF16 else 2.0**-7
        err = np.abs(got.astype(np.float64) - want)
        assert np.all(err <= eps / 2 * np.abs(want) + 2.0**-22 * scale + (2.0**-24 if dtype == F16 else 0)), err.max()
        outside = np.ones(src.shape[-1], bool)
        outside[start : start + rot] = False
        assert_bytes_equal(got[..., outside], src[..., outside], "passed-through columns")


def test_reference_is_a_rotation(rng):
    """With a real cos/sin table, rotating and rotating back (conjugate) gives the input (fp32), and the
    rotation keeps each pair's norm."""
    cache = np.asarray(rope.make_cos_sin_cache(128, 64))
    x, y, _, pos = inputs(rng, (13,), (4, 128), (2, 128), 128, 64, F32)
    for interleaved in (False, True):
        qo, ko = apply_rotary(x, cache, y, pos, interleaved, impl="xla")
        back = apply_rotary(qo, cache, ko, pos, interleaved, conjugate=True, impl="xla")
        np.testing.assert_allclose(back[0], x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(back[1], y, rtol=1e-5, atol=1e-5)
        fi, si = pairs(128, interleaved)
        np.testing.assert_allclose(np.hypot(qo[..., fi], qo[..., si]), np.hypot(x[..., fi], x[..., si]), rtol=1e-5)


def test_position_zero_is_the_identity_and_offsets_shift_rows(rng):
    cache = np.asarray(rope.make_cos_sin_cache(64, 32))
    x = (rng.standard_normal((6, 2, 64)) * 4).astype(BF16)
    assert_bytes_equal(apply_rotary(x, cache, positions=np.zeros(6, np.int32), impl="xla"), x)
    # without positions, 3-D token t takes row offset + t; 4-D token (b, s) row offset + s
    shifted = apply_rotary(x, cache, seqlen_offset=7, impl="xla")
    assert_bytes_equal(shifted, apply_rotary(x, cache, positions=np.arange(6, dtype=np.int32) + 7, impl="xla"))
    four = apply_rotary(x.reshape(2, 3, 2, 64), cache, seqlen_offset=2, impl="xla")
    assert_bytes_equal(four, apply_rotary(x, cache, positions=np.tile(np.arange(3, dtype=np.int32), 2) + 2, impl="xla").reshape(four.shape))


def test_rows_outside_the_table_are_clamped(rng):
    x, _, cache, _ = inputs(rng, (6,), (2, 64), None, 64, 10)
    pos = np.asarray([-5, -1, 0, 9, 10, 1000], np.int32)
    got = apply_rotary(x, cache, positions=pos, seqlen_offset=0, impl="xla")
    want = apply_rotary(x, cache, positions=np.clip(pos, 0, 9), impl="xla")
    assert_bytes_equal(got, want)
    got = apply_rotary(x, cache, seqlen_offset=7, impl="xla")  # rows 7 .. 12: the last three take row 9
    assert_bytes_equal(got, apply_rotary(x, cache, positions=np.minimum(np.arange(6, dtype=np.int32) + 7, 9), impl="xla"))


def test_make_cos_sin_cache_matches_numpy():
    table = np.asarray(rope.make_cos_sin_cache(64, 300, base=500000.0, scale=2.0))
    theta = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    angle = (np.arange(300) / 2.0)[:, None] * theta
    assert table.dtype == F32 and table.shape == (300, 64)
    np.testing.assert_allclose(table, np.concatenate([np.cos(angle), np.sin(angle)], -1), atol=1e-4)
    with pytest.raises(ValueError, match="rot_dim must be a positive even number"):
        rope.make_cos_sin_cache(63, 8)
    with pytest.raises(ValueError, match="max_positions must be at least 1"):
        rope.make_cos_sin_cache(64, 0)


# ---------------------------------------------------------------------------------------------
# Gradients: the custom VJP runs the conjugate rotation.


def _loss_grads(impl, x, cache, y, pos, w, **kw):
    def loss(x, cache, y):
        qo, ko = apply_rotary(x, cache, y, pos, impl=impl, **kw)
        return jnp.sum(qo.astype(jnp.float32) * w[0]) + jnp.sum(ko.astype(jnp.float32) * w[1])

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, cache, y)


@pytest.mark.parametrize("interleaved,conjugate,columns", [(False, False, None), (True, True, (-64, None)), (True, False, (64, 128))])
def test_vjp_is_the_conjugate_rotation(rng, interleaved, conjugate, columns):
    x, y, cache, pos = inputs(rng, (2, 5), (3, 192), (2, 128), 64, 16, BF16, True, 3)
    w = [(rng.standard_normal(x.shape) * 2).astype(BF16), (rng.standard_normal(y.shape) * 2).astype(BF16)]
    kw = dict(interleaved=interleaved, conjugate=conjugate, seqlen_offset=3, columns=columns)
    dx, dcache, dy = _loss_grads(None, x, cache, y, pos, [jnp.asarray(v, jnp.float32) for v in w], **kw)
    # the cotangents (bf16-exact weights) rotated back by the op itself: bit for bit
    back = apply_rotary(w[0], cache, w[1], pos, interleaved, not conjugate, 3, columns=columns)
    assert_bytes_equal(dx, back[0], "dq")
    assert_bytes_equal(dy, back[1], "dk")
    assert not np.asarray(dcache).any(), "the table is a constant"
    # and autodiff of the reference agrees (the same rotation, each product rounded its own way)
    rx, rcache, ry = _loss_grads("xla", x, cache, y, pos, [jnp.asarray(v, jnp.float32) for v in w], **kw)
    assert not np.asarray(rcache).any()
    for a, b in ((dx, rx), (dy, ry)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-2, atol=1e-2)


def test_grad_of_query_only_and_fp32_orthogonality(rng):
    """For fp32 and a real table the VJP is the transpose of the rotation: <R x, g> = <x, R^T g>."""
    cache = np.asarray(rope.make_cos_sin_cache(128, 32))
    x, _, _, pos = inputs(rng, (9,), (2, 128), None, 128, 32, F32)
    g = rng.standard_normal(x.shape).astype(F32)
    for interleaved in (False, True):
        out, vjp = jax.vjp(lambda x: apply_rotary(x, cache, positions=pos, interleaved=interleaved), x)
        (dx,) = vjp(g)
        np.testing.assert_allclose(np.vdot(np.asarray(out, np.float64), g), np.vdot(x.astype(np.float64), np.asarray(dx)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Lowering for "cuda": launches, records, configurations.


def _case_call(case, fn=apply_rotary, impl=None):
    return over_arrays(case.call(fn, impl), case.structs())


def _tokens(case) -> int:
    return int(np.prod(case.args[0].shape[:-2]))


def _expected_tpc(case, threads=R.THREADS):
    q, cache, k = case.args[0], case.args[1], case.args[2]
    rot, vec = cache.shape[1], R.vec_of(q.dtype)
    cols = case.kwargs["columns"]
    qu = R.row_units(q.shape[-1], window_start(q.shape[-1], cols, rot), rot, vec)
    ku = None if k is None else R.row_units(k.shape[-1], window_start(k.shape[-1], cols, rot), rot, vec)
    return R.tokens_per_cta(R.units_per_token(q.shape[-2], qu, 0 if k is None else k.shape[-2], ku), threads)


@pytest.mark.parametrize("case", [c for c in apply_rotary.cases if not c.name.startswith("bench_")], ids=lambda c: c.name)
def test_lowering_launch_record(case):
    """One launch for query and key; grid ceil(T / tokens per CTA) of 128 threads; the scalars are the
    sequence length (rows of tokens without positions) and the offset; no zero fill (every element is
    written), none at all for zero tokens."""
    call, structs = _case_call(case)
    with jax_tilek.record_kernels() as log:
        (launch,) = tilek_calls(lower_for_cuda(call, *structs))
    assert len({key for *_, key in log}) == 1
    _, params, arch, _ = log[0]
    assert arch == "sm_90a" and launch["name"] == "apply_rotary" and launch["has_cubin"]
    tpc = _expected_tpc(case)
    assert params["tokens_per_cta"] == tpc and params["has_positions"] == (case.args[3] is not None)
    assert params["k_heads"] == (0 if case.args[2] is None else case.args[2].shape[-2])
    record = decode_record(launch["launch"])
    t = _tokens(case)
    if t == 0:  # nothing to launch: the launcher only defines the (empty) results
        assert record["kernels"] == []
        return
    assert record["zero_fill"] == []
    (k,) = record["kernels"]
    assert k["grid"] == [-(-t // tpc), 1, 1] and k["block"] == [128, 1, 1] and k["smem"] == 0
    scalars = [v for kind, _, v in k["args"] if kind == 2]
    assert scalars[0] == t and scalars[1] == case.args[1].shape[0]  # tokens, cache rows
    assert scalars[-1] == case.kwargs["seqlen_offset"]
    if case.args[3] is None:
        assert scalars[-2] == case.args[0].shape[-3]  # the sequence length: S of [B, S, H, D], T of [T, H, D]
    buffers = sorted(b for kind, b, _ in k["args"] if kind == 0)
    assert buffers == list(range(record["num_buffers"]))  # every operand read, every result written


def test_tokens_per_cta_fills_the_threads():
    for units in [4, 8, 12, 40, 72, 96, 100, 128, 320, 1540, 2048, 4100]:
        tpc = R.tokens_per_cta(units, 128)
        work = tpc * units
        fill = work / (-(-work // 128) * 128)
        assert 1 <= tpc <= R.MAX_TOKENS_PER_CTA
        assert fill >= 0.9 or units > 128 and tpc == 1 and fill >= 0.8, (units, tpc, fill)
    assert [R.tokens_per_cta(u, 128) for u in (4, 320, 72, 1540, 12)] == [32, 2, 5, 1, 32]


def test_row_units():
    """A 192-wide bf16 head with the 64-wide window at 128: 4 rotary units, 16 outside vectors in 8 copy units."""
    u = R.row_units(192, 128, 64, 8)
    assert (u.rotary, u.copy, u.outside, u.before, u.total) == (4, 8, 16, 16, 12)
    u = R.row_units(72, 8, 64, 4)  # fp32, odd number of outside vectors
    assert (u.rotary, u.copy, u.outside, u.before) == (8, 1, 2, 2)
    assert R.row_units(128, 0, 128, 8).copy == 0


def test_gradient_lowers_to_the_conjugate_kernel():
    case = next(c for c in apply_rotary.cases if c.name == "neox_bf16_qk")
    call, structs = _case_call(case)
    loss = lambda q, c, k, p: sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in call(q, c, k, p))  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 2))  # the forward's outputs are needed: two launches
    with jax_tilek.record_kernels() as log:
        calls = tilek_calls(lower_for_cuda(grad, *structs))
    assert [c["name"] for c in calls] == ["apply_rotary", "apply_rotary"]
    assert calls[0]["cubin_key"] != calls[1]["cubin_key"]
    assert sorted(p["conjugate"] for _, p, _, _ in log) == [False, True]


def test_with_config():
    case = next(c for c in apply_rotary.cases if c.name == "gpu_neox_bf16_4101")
    fn = apply_rotary.with_config(threads=256, tokens_per_cta=3)
    call, structs = _case_call(case, fn)
    (launch,) = tilek_calls(lower_for_cuda(call, *structs))
    (k,) = decode_record(launch["launch"])["kernels"]
    assert k["block"] == [256, 1, 1] and k["grid"] == [-(-4101 // 3), 1, 1]
    with pytest.raises(ValueError, match="threads must be a multiple of 32"):
        lower_for_cuda(_case_call(case, apply_rotary.with_config(threads=100))[0], *case.structs())
    with pytest.raises(ValueError, match="no config field"):
        apply_rotary.with_config(stages=2)


def test_vmap_without_positions_folds_into_one_launch(rng):
    """A batch of sequences folds into the tokens; each keeps its own row numbering (the kernel's
    ``seqlen`` scalar is the sequence length)."""
    x = (rng.standard_normal((3, 5, 2, 64)) * 4).astype(BF16)
    cache = (rng.standard_normal((16, 64)) * 2).astype(F32)
    f = jax.vmap(lambda x: apply_rotary(x, cache, seqlen_offset=2, interleaved=True), in_axes=1, out_axes=1)
    got = jax.jit(f)(x)
    for b in range(5):
        assert_bytes_equal(np.asarray(got)[:, b], apply_rotary(x[:, b], cache, seqlen_offset=2, interleaved=True))
    text = lower_for_cuda(f, _s(x.shape))
    (launch,) = tilek_calls(text)
    (k,) = decode_record(launch["launch"])["kernels"]
    assert "stablehlo.while" not in text
    scalars = [v for kind, _, v in k["args"] if kind == 2]
    assert scalars == [15, 16, 3, 2]  # 15 tokens, 16 cache rows, sequences of 3, offset 2


def test_int64_positions_lower():
    with jax.enable_x64(True):
        with jax_tilek.record_kernels() as log:
            text = lower_for_cuda(lambda q, c, p: apply_rotary(q, c, positions=p), _s((9, 2, 64)), _s((16, 64), F32), _s((9,), np.int64))
        assert len(tilek_calls(text)) == 1 and log[0][1]["positions_dtype"] == "int64"
        x = (np.random.default_rng(0).standard_normal((9, 2, 64))).astype(BF16)
        cache = np.random.default_rng(1).standard_normal((16, 64)).astype(F32)
        pos = np.arange(9, dtype=np.int64) * 3 - 4
        assert_bytes_equal(apply_rotary(x, cache, positions=pos), apply_rotary(x, cache, positions=pos.astype(np.int32)))


def test_heads_shard_without_collectives(rng):
    """Heads are independent: query and key (as many heads) sharded over their heads run locally, with
    or without positions; tokens without positions are gathered (a token's row is its global index),
    and so are the key's heads when they are fewer than the query's (one mesh axis per factor)."""
    devices = jax.devices("cpu")
    if len(devices) < 8:
        pytest.skip("needs 8 host devices")
    mesh = jax.make_mesh((8,), ("d",), devices=devices[:8])
    x, y, cache, pos = inputs(rng, (4, 6), (8, 128), (8, 128), 128, 32)
    heads = NamedSharding(mesh, PartitionSpec(None, None, "d"))
    for p in (None, pos):
        f = jax.jit(lambda x, c, y, p: apply_rotary(x, c, y, p, seqlen_offset=1))
        args = (jax.device_put(x, heads), cache, jax.device_put(y, heads), p)
        got = f(*args)
        want = apply_rotary(x, cache, y, p, seqlen_offset=1, impl="xla")
        for a, b in zip(got, want):  # XLA's CPU fusion of the per-device reference may contract an FMA
            assert_near(a, b)  # differently from the global one
        assert not any(op in f.lower(*args).compile().as_text() for op in ("all-gather", "all-to-all", "collective-permute"))
    gqa = jax.jit(lambda x, c, y, p: apply_rotary(x, c, y, p))
    args = (jax.device_put(x, heads), cache, y[:, :, :4], pos)
    for a, b in zip(gqa(*args), apply_rotary(x, cache, y[:, :, :4], pos, impl="xla")):
        assert_near(a, b)
    tokens = NamedSharding(mesh, PartitionSpec("d"))
    x2 = x.reshape(24, 8, 128)
    got = jax.jit(lambda x: apply_rotary(x, cache, seqlen_offset=1))(jax.device_put(x2[:16], tokens))
    assert_near(got, apply_rotary(x2[:16], cache, seqlen_offset=1, impl="xla"))


def test_zero_and_one_token(rng):
    for t in (0, 1):
        x, y, cache, pos = inputs(rng, (t,), (3, 128), (1, 128), 128, 8)
        qo, ko = apply_rotary(x, cache, y, pos)
        assert qo.shape == x.shape and ko.shape == y.shape
        if t:
            assert_bytes_equal(qo, apply_rotary(x, cache, y, pos, impl="xla")[0])


def test_tensors_without_heads_pass_through(rng):
    """Zero heads: that tensor comes back as it is; the other is rotated alone, as if given alone."""
    x, y, cache, pos = inputs(rng, (5,), (3, 128), (2, 128), 128, 8)
    empty = np.zeros((5, 0, 128), BF16)
    qo, ko = apply_rotary(empty, cache, y, pos, interleaved=True)
    assert qo.shape == empty.shape
    assert_bytes_equal(ko, apply_rotary(y, cache, positions=pos, interleaved=True))
    qo, ko = apply_rotary(x, cache, empty, pos)
    assert_bytes_equal(qo, apply_rotary(x, cache, positions=pos))
    assert ko.shape == empty.shape
    assert apply_rotary(empty, cache).shape == empty.shape
    (launch,) = tilek_calls(lower_for_cuda(lambda q, c, k: apply_rotary(q, c, k), _s((5, 0, 64)), _s((8, 64), F32), _s((5, 3, 64))))
    assert decode_record(launch["launch"])["kernels"][0]["grid"] == [1, 1, 1]


def test_impl_tilelang_is_refused_off_gpu():
    if jax_tilek.kernels_available():
        pytest.skip("kernels run here")
    with pytest.raises(ValueError, match="impl='tilelang'"):
        jax.jit(lambda x, c: apply_rotary(x, c, impl="tilelang")).lower(_s((4, 2, 64)), _s((8, 64), F32)).compile()


# ---------------------------------------------------------------------------------------------
# GPU: the kernel against the numpy mirror of its arithmetic, on fresh inputs, outputs poisoned.


def _gpu_cases():
    return [c for c in apply_rotary.cases if not c.name.startswith("bench_")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_cases(), ids=lambda c: c.name)
def test_kernel_matches_its_arithmetic(on_gpu, rng, case):
    args = case.arrays(rng)
    call, arrays = over_arrays(case.call(apply_rotary, "tilelang"), args)
    got = on_gpu(call, *arrays)
    query, cache, key, pos = args
    kw = case.kwargs
    rot = cache.shape[1]
    outs = (got,) if key is None else got
    for out, x in zip(outs, (query, key)):
        start = window_start(x.shape[-1], kw["columns"], rot)
        want = np_kernel(x, cache, pos, kw["seqlen_offset"], kw["interleaved"], kw["conjugate"], start)
        out = np.asarray(out)
        assert ulps(out, want) <= 1, case.name  # equal but where the float64 mirror's fma rounds twice
        assert out.size == 0 or (out.view(np.uint8) != want.view(np.uint8)).mean() < 1e-4
        outside = np.ones(x.shape[-1], bool)
        outside[start : start + rot] = False
        assert_bytes_equal(out[..., outside], x[..., outside], f"{case.name} passed-through")


def _gradient_program(x, cache, y, pos, wq, wk):
    """Forward and gradient on the kernels (GPT-J pairs): the backward is the conjugate kernel."""

    def loss(x, y):
        qo, ko = apply_rotary(x, cache, y, pos, interleaved=True, impl="tilelang")
        return jnp.sum(qo.astype(jnp.float32) * wq.astype(jnp.float32)) + jnp.sum(ko.astype(jnp.float32) * wk.astype(jnp.float32))

    return apply_rotary(x, cache, y, pos, interleaved=True, impl="tilelang"), jax.grad(loss, argnums=(0, 1))(x, y)


_GRAD_SHAPES = ((3, 1000, 32, 128), (2048, 128), (3, 1000, 8, 128), (3, 1000))
GPU_PROGRAMS = [  # what the GPU tests launch beyond the cases (tests/gpu_programs.py prepare compiles them)
    (_gradient_program, (_s(_GRAD_SHAPES[0]), _s(_GRAD_SHAPES[1], F32), _s(_GRAD_SHAPES[2]), _s(_GRAD_SHAPES[3], I32),
                         _s(_GRAD_SHAPES[0]), _s(_GRAD_SHAPES[2]))),  # fmt: skip
]


def test_gpu_programs_lower():
    """The GPU test's program lowers for "cuda": the forward launch (the loss is linear, so its gradient
    needs no second forward) and the conjugate launch of the gradient."""
    ((fn, args),) = GPU_PROGRAMS
    with jax_tilek.record_kernels() as log:
        calls = tilek_calls(lower_for_cuda(fn, *args))
    assert len(calls) == 2 and {p["conjugate"] for _, p, _, _ in log} == {False, True}


@pytest.mark.gpu
def test_kernel_gradient_and_out_of_range_rows_on_gpu(on_gpu, rng):
    x, y, cache, pos = inputs(rng, (3, 1000), (32, 128), (8, 128), 128, 2048)
    assert (x.shape, cache.shape, y.shape, pos.shape) == _GRAD_SHAPES
    pos[0, :7] = [-9, -1, 2047, 2048, 5000, 2**31 - 100, 0]
    w = [(rng.standard_normal(x.shape)).astype(BF16), (rng.standard_normal(y.shape)).astype(BF16)]
    (qo, ko), (dx, dy) = on_gpu(_gradient_program, x, cache, y, pos, *w)
    assert ulps(qo, np_kernel(x, cache, pos, 0, True, False)) <= 1
    assert ulps(ko, np_kernel(y, cache, pos, 0, True, False)) <= 1
    assert ulps(dx, np_kernel(w[0], cache, pos, 0, True, True)) <= 1
    assert ulps(dy, np_kernel(w[1], cache, pos, 0, True, True)) <= 1
