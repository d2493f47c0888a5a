"""Engram semantics beyond the contract: every op against independent float64 / int64 NumPy math
(TileKernels' torch references rewritten), the gate's backward formula against finite differences,
image tokens, the d = 0 tie, the Sinkhorn fixed point, and argument errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_tilek import engram
from jax_tilek.engram._common import GATE_PARTIALS, sinkhorn_partials

BF16 = ml_dtypes.bfloat16


def _words(m):
    return np.ascontiguousarray(m.astype("<i8")).view("<u4").reshape(*m.shape, 2)


# ---------------------------------------------------------------------------------------------
# Hash.


def hash_numpy(ids, mult, vocab, offsets, mask=None):
    """TileKernels' engram_hash_ref in NumPy int64 (products wrap, % is the floor modulo)."""
    layers, n = mult.shape
    with np.errstate(over="ignore"):
        prod = ids.astype(np.int64)[None] * mult[:, None, :]
    h = prod[..., 0].copy()
    out = []
    for i in range(1, n):
        h ^= prod[..., i]
        out.append(h[..., None] % vocab[:, None, i - 1, :].astype(np.int64))
    res = np.concatenate(out, -1).astype(np.int32) + offsets[:, None, :]
    if mask is not None:
        res[:, mask] = -1
    return res


@pytest.mark.parametrize("big", [False, True])
def test_hash_matches_int64_numpy(big):
    rng = np.random.default_rng(0)
    t, n, layers, tables = 300, 4, 3, 5
    ids = rng.integers(0, 100_000, (t, n)).astype(np.int32)
    if big:
        ids[rng.random((t, n)) < 0.1] *= -1
        mult = rng.integers(-(2**63), 2**63 - 1, (layers, n), dtype=np.int64)
    else:
        mult = rng.integers(1, 100_000, (layers, n)).astype(np.int64)
    vocab = rng.integers(1, 1_000_000, (layers, n - 1, tables)).astype(np.int32)
    vocab[0, 0, 0] = 1  # everything maps to 0
    vocab[1, -1, -1] = 2**30  # the last table: its offset plus index stays within int32
    offsets = np.asarray(engram.make_offsets(vocab))
    np.testing.assert_array_equal(offsets[:, 1:], np.cumsum(vocab.reshape(layers, -1), 1)[:, :-1])
    mask = rng.random(t) < 0.3
    want = hash_numpy(ids, mult, vocab, offsets, mask)
    got = jax.jit(lambda i, *a: engram.engram_hash(i, mult, *a))(ids, vocab, offsets, mask)  # int64 NumPy, a constant
    np.testing.assert_array_equal(np.asarray(got), want)
    got = jax.jit(lambda *a: engram.engram_hash(*a))(ids, _words(mult), vocab, offsets, mask)  # its words, traced
    np.testing.assert_array_equal(np.asarray(got), want)
    small = mult.astype(np.int32) if not big else None
    if small is not None:  # int32 multipliers are sign-extended
        np.testing.assert_array_equal(np.asarray(engram.engram_hash(ids, small, vocab, offsets)), hash_numpy(ids, mult, vocab, offsets))


def test_hash_vmap_folds_and_matches():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, (2, 16, 3)).astype(np.int32)
    mult = rng.integers(1, 1000, (1, 3)).astype(np.int64)
    vocab = rng.integers(10, 100, (1, 2, 2)).astype(np.int32)
    offsets = np.asarray(engram.make_offsets(vocab))
    got = jax.vmap(lambda i: engram.engram_hash(i, _words(mult), vocab, offsets))(ids)
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(got[b]), hash_numpy(ids[b], mult, vocab, offsets))


# ---------------------------------------------------------------------------------------------
# Gate.


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def gate_numpy(x, k, v, w, eps, clamp):
    """TileKernels' engram_gate_ref in float64: (out, dot, gate, rstd_x, rstd_k)."""
    h = x.shape[-1]
    rx = 1 / np.sqrt((x * x).mean(-1) + eps)
    rk = 1 / np.sqrt((k * k).mean(-1) + eps)
    dot = (x * w * k).sum(-1)
    d = dot * rx * rk / np.sqrt(h)
    g = _sigmoid(np.sign(d) * np.sqrt(np.maximum(np.abs(d), clamp)))
    return x + g[..., None] * v[:, None, :], dot, g, rx, rk


def gate_inputs(rng, t=12, hc=3, h=64):
    x = rng.standard_normal((t, hc, h)).astype(BF16)
    kv = rng.standard_normal((t, hc + 1, h)).astype(BF16)
    wh = (1 + 0.3 * rng.standard_normal((hc, h))).astype(BF16)
    we = (1 + 0.3 * rng.standard_normal((hc, h))).astype(BF16)
    return x, kv, wh, we


def f64(a):
    return np.asarray(a, np.float64)


def test_gate_forward_matches_float64():
    rng = np.random.default_rng(2)
    x, kv, wh, we = gate_inputs(rng)
    x[3] = 0  # d = 0: sign(0) = 0, gate exactly 0.5
    mask = np.zeros(len(x), bool)
    mask[[1, 5]] = True
    w = engram.fused_weight(wh, we)
    np.testing.assert_array_equal(np.asarray(w), f64(wh) * f64(we))  # exact product
    out, dot, gate, rx, rk = engram.engram_gate_fwd(x, kv, w, 1e-6, 1e-6, True, mask)
    want = gate_numpy(f64(x), f64(kv[:, :3]), f64(kv[:, 3]), f64(w), 1e-6, 1e-6)
    np.testing.assert_allclose(f64(out)[~mask], want[0][~mask], rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(out)[mask].view(np.uint16), x[mask].view(np.uint16))  # image tokens copied
    for got, ref in zip((dot, gate, rx, rk), want[1:]):
        np.testing.assert_allclose(f64(got), ref, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(gate)[3] == 0.5)
    only = engram.engram_gate_fwd(x, kv.reshape(len(x), -1), w, 1e-6, 1e-6, False, mask)  # flat kv, no saved values
    np.testing.assert_array_equal(np.asarray(only).view(np.uint16), np.asarray(out).view(np.uint16))


def gate_bwd_numpy(go, x, k, v, w, eps, clamp):
    """The backward formula of engram_gate_bwd in float64."""
    _, dot, g, rx, rk = gate_numpy(x, k, v, w, eps, clamp)
    h = x.shape[-1]
    c = rx * rk / np.sqrt(h)
    dldg = (go * v[:, None]).sum(-1)
    dr = np.where(np.abs(dot) * c < clamp, 0, dldg * g * (1 - g) * 0.5 * np.sqrt(c / np.abs(dot)))
    gx = go + dr[..., None] * (k * w - x * (dot * rx**2 / h)[..., None])
    gk = dr[..., None] * (x * w - k * (dot * rk**2 / h)[..., None])
    gv = (go * g[..., None]).sum(1)
    return gx, gk, gv, dr[..., None] * x * k


def test_gate_backward_formula_is_the_derivative():
    """The float64 formula against central differences of the float64 forward."""
    rng = np.random.default_rng(3)
    t, hc, h = 2, 2, 8
    x, k = rng.standard_normal((t, hc, h)), rng.standard_normal((t, hc, h))
    v, w, go = rng.standard_normal((t, h)), 1 + 0.3 * rng.standard_normal((hc, h)), rng.standard_normal((t, hc, h))
    loss = lambda x, k, v, w: np.sum(go * gate_numpy(x, k, v, w, 1e-6, 1e-6)[0])  # noqa: E731
    gx, gk, gv, gw = gate_bwd_numpy(go, x, k, v, w, 1e-6, 1e-6)
    for i, (arr, grad) in enumerate(((x, gx), (k, gk), (v, gv), (w, gw.sum(0)))):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            args = [x, k, v, w]
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += 1e-6
            minus[idx] -= 1e-6
            args[i] = plus
            lp = loss(*args)
            args[i] = minus
            num[idx] = (lp - loss(*args)) / 2e-6
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-6)


def test_gate_backward_matches_float64():
    rng = np.random.default_rng(4)
    x, kv, wh, we = gate_inputs(rng, t=140)  # more tokens than partial rows: blocks of 2
    mask = rng.random(len(x)) < 0.2
    w = engram.fused_weight(wh, we)
    _, dot, gate, rx, rk = engram.engram_gate_fwd(x, kv, w, 1e-6, 1e-6, True, mask)
    go = rng.standard_normal(x.shape).astype(BF16)
    gx, gkv, partial = engram.engram_gate_bwd(go, x, kv, w, dot, gate, rx, rk, 1e-6, mask)
    want = gate_bwd_numpy(f64(go), f64(x), f64(kv[:, :3]), f64(kv[:, 3]), f64(w), 1e-6, 1e-6)
    keep = ~mask
    np.testing.assert_allclose(f64(gx)[keep], want[0][keep], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(f64(gkv)[keep, :3], want[1][keep], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(f64(gkv)[keep, 3], want[2][keep], rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(np.asarray(gx)[mask].view(np.uint16), go[mask].view(np.uint16))
    assert not np.any(f64(gkv)[mask])
    assert partial.shape == (GATE_PARTIALS, 3, 64)
    per = -(-len(x) // GATE_PARTIALS)
    gw = np.where(mask[:, None, None], 0, want[3])
    blocks = np.stack([gw[p * per:(p + 1) * per].sum(0) for p in range(GATE_PARTIALS)])
    np.testing.assert_allclose(f64(partial), blocks, rtol=1e-3, atol=1e-3)
    gh, ge = engram.grad_w_reduce(partial, wh, we)
    np.testing.assert_allclose(f64(gh), f64(partial).sum(0) * f64(we), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f64(ge), f64(partial).sum(0) * f64(wh), rtol=1e-5, atol=1e-4)
    acc = rng.standard_normal(wh.shape).astype(np.float32)
    gh2, _ = engram.grad_w_reduce(partial, wh, we, acc, None)
    np.testing.assert_allclose(f64(gh2), f64(gh) + acc, rtol=1e-6, atol=1e-6)


def test_gate_gradients_through_the_custom_vjp():
    """jax.grad of engram_gate (custom VJP on the ops) against float64 NumPy: kv's flat form, fp32
    weights (fp32 gradients), image tokens get no gradient."""
    rng = np.random.default_rng(5)
    x, kv, wh, we = gate_inputs(rng, t=9, hc=2, h=32)
    wh, we = wh.astype(np.float32), we.astype(np.float32)
    mask = np.zeros(9, bool)
    mask[4] = True
    go = rng.standard_normal(x.shape).astype(BF16).astype(np.float32)  # the output's cotangent is bf16

    def loss(x, kv, wh, we):
        out = engram.engram_gate(x, kv, wh, we, 1e-6, 1e-6, mask)
        return jnp.sum(out.astype(jnp.float32) * go)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, kv.reshape(9, -1), wh, we)
    assert grads[2].dtype == jnp.float32 and grads[1].shape == (9, 96)
    gx, gk, gv, gw = gate_bwd_numpy(f64(go), f64(x), f64(kv[:, :2]), f64(kv[:, 2]), f64(wh) * f64(we), 1e-6, 1e-6)
    gx[mask], gk[mask], gv[mask], gw[mask] = f64(go)[mask], 0, 0, 0
    np.testing.assert_allclose(f64(grads[0]), gx, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(f64(grads[1]).reshape(9, 3, 32), np.concatenate([gk, gv[:, None]], 1), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(f64(grads[2]), gw.sum(0) * f64(we), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(f64(grads[3]), gw.sum(0) * f64(wh), rtol=1e-3, atol=1e-3)


def test_grad_w_reduce_sums_in_order():
    """The kernel's order (0 + row 0 + row 1 + ...) exactly: rows that cancel only in that order."""
    partial = np.zeros((4, 1, 8), np.float32)
    partial[0], partial[1], partial[2], partial[3] = 1e8, 1.0, -1e8, 1.0
    w = np.ones((1, 8), BF16)
    gh, _ = engram.grad_w_reduce(partial, w, w)
    np.testing.assert_array_equal(np.asarray(gh), np.ones((1, 8), np.float32))  # (1e8 + 1) - 1e8 = 0, + 1


# ---------------------------------------------------------------------------------------------
# Sinkhorn.


def test_momentum_matches_float64():
    rng = np.random.default_rng(6)
    g = rng.standard_normal(1000).astype(np.float32)
    m = rng.standard_normal(1000).astype(np.float32)
    for nesterov in (False, True):
        out, new = engram.engram_sinkhorn_momentum_update(g, m, 0.9, nesterov)
        m64 = 0.9 * f64(m) + 0.1 * f64(g)
        np.testing.assert_allclose(f64(new), m64, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(f64(out), 0.9 * m64 + 0.1 * f64(g) if nesterov else m64, rtol=1e-6, atol=1e-6)
    out, new = engram.engram_sinkhorn_momentum_update(g.astype(BF16).reshape(10, 100), m.astype(BF16).reshape(10, 100), 0.9)
    assert out.dtype == jnp.float32 and new.dtype == jnp.bfloat16 and out.shape == (10, 100)


def test_step_reduce_update_finalize_match_float64():
    rng = np.random.default_rng(7)
    r, d = 500, 64
    m = rng.standard_normal((r, d)).astype(np.float32)
    m[7] = 0
    rs, cs = rng.random(r).astype(np.float32), rng.random(d).astype(np.float32)
    norm, rs2, partial = engram.engram_sinkhorn_step(m, rs, cs, 1e-20)
    it = f64(rs)[:, None] * f64(m) * f64(cs)
    n64 = np.sqrt((it**2).sum(1))
    np.testing.assert_allclose(f64(norm), n64, rtol=1e-5)
    live = n64 > 0
    np.testing.assert_allclose(f64(rs2)[live], f64(rs)[live] / n64[live], rtol=1e-5)
    assert partial.shape == (sinkhorn_partials(d), d)
    sq = (f64(rs2)[:, None] * f64(m) * f64(cs)) ** 2
    p = partial.shape[0]
    np.testing.assert_allclose(f64(partial), np.stack([sq[s::p].sum(0) for s in range(p)]), rtol=1e-5, atol=1e-6)
    total = engram.engram_sinkhorn_step_reduce(partial)
    np.testing.assert_allclose(f64(total), sq.sum(0), rtol=1e-5)
    total2, cs2 = engram.engram_sinkhorn_col_update(partial, cs, r, 1e-20)
    np.testing.assert_array_equal(np.asarray(total2), np.asarray(total))
    np.testing.assert_allclose(f64(cs2), f64(cs) / np.sqrt(sq.sum(0) * d / r), rtol=1e-5)
    out = engram.engram_sinkhorn_finalize(m, rs2, cs2, 1e-20, 3.0)
    it = f64(rs2)[:, None] * f64(m) * f64(cs2)
    n = np.sqrt((it**2).sum(1, keepdims=True))
    live = np.arange(r) != 7  # row 7 is zero: rs2 = rs / eps, and a second normalisation gives inf * 0 (TileKernels' semantics)
    np.testing.assert_allclose(f64(out)[live], 3.0 * it[live] / n[live], rtol=1e-5, atol=1e-6)


def test_col_update_keeps_zero_columns_at_zero():
    partial = np.ones((3, 8), np.float32)
    partial[:, 2] = 0
    _, cs = engram.engram_sinkhorn_col_update(partial, np.ones(8, np.float32), 10)
    assert cs[2] == 0 and np.all(np.isfinite(np.asarray(cs)))


def test_sinkhorn_iteration_balances_rows_and_columns():
    """Many row/column steps: rows reach unit norm, columns norm sqrt(R / D) (the update's fixed point)."""
    from jax_tilek.engram._optax import sinkhorn_direction

    rng = np.random.default_rng(8)
    r, d = 96, 32
    x = (rng.standard_normal((r, d)) * np.exp(rng.standard_normal((r, 1))) * np.exp(rng.standard_normal((1, d)))).astype(np.float32)
    out = f64(jax.jit(lambda a: sinkhorn_direction(a, iterations=30, eps=1e-20, alpha=1.0))(x))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), np.sqrt(r / d), rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: engram.engram_gate_fwd(np.zeros((2, 4, 64), BF16), np.zeros((2, 5, 64), BF16), np.zeros((4, 64), np.float32), 1e-6, 1e-6, "yes"),
         TypeError, "save_for_backward must be True or False"),
        (lambda: engram.engram_gate(np.zeros((2, 4, 64), BF16), np.zeros((2, 5, 64), BF16), np.ones((4, 64), BF16), np.ones((4, 64), BF16),
                                    1e-6, 1e-6, impl="cuda"), ValueError, "impl must be one of"),
        (lambda: engram.engram_hash(np.zeros((4, 3), np.int32), np.zeros((1, 3), np.int64), np.ones((1, 2, 200), np.int32),
                                    np.zeros((1, 400), np.int32)), ValueError, r"\(N-1\) \* Tb must be at most 256"),
        (lambda: engram.engram_sinkhorn_finalize(np.zeros((4, 8), np.float32), np.zeros(4, np.float32), np.zeros(8, np.float32), alpha="x"),
         TypeError, "alpha must be a number"),
        (lambda: engram.engram_sinkhorn_step(np.zeros((4, 20000), np.float32), np.zeros(4, np.float32), np.zeros(20000, np.float32)),
         ValueError, "up to 16384"),
    ],
)  # fmt: skip
def test_bad_arguments_raise(call, error, message):
    with pytest.raises(error, match=message):
        call()
