"""engram_hash: n-gram token ids -> indices into the concatenated Engram embedding tables
(TileKernels v1 §4.1, v2.1 §2.4; reference ``torch/engram.py: engram_hash_ref``).

Per layer ``l`` and token ``t``, with 64-bit two's-complement arithmetic (products wrap modulo 2^64)::

    h_i = XOR_{j <= i} int64(ids[t, j]) * multipliers[l, j]             i = 0 .. N-1
    out[l, t, (i-1)*Tb + b] = int32(h_i mod vocab_sizes[l, i-1, b]) + offsets[l, (i-1)*Tb + b]

for i = 1 .. N-1 and every table b: each n-gram order 2..N hashes into Tb tables. ``mod`` is the
floor modulo of TileKernels' torch reference (``%`` on int64 tensors: the result has the divisor's
sign, so a negative hash maps into [0, vocab) too); vocab sizes must be positive. Image tokens
(``image_token_mask``) get -1 in every slot (TileKernels 2.1).

JAX without x64 has no int64 arrays: ``multipliers`` may be given as int64 (a NumPy array, or a JAX
array under ``jax_enable_x64``), as int32 (sign-extended), or as its little-endian uint32 words
``[L, N, 2]``; the op takes the words and the kernel reads them as int64. (Without x64, an int64 array
passed *through* ``jax.jit`` arrives truncated to int32: close over NumPy int64 multipliers, or pass
the words.) The reference does the
64-bit arithmetic in 32-bit words (a 16-bit-limb product, a bit-serial remainder).

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.engram._common import check_dtype, check_mask, check_shape
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, ShardingRule, TileOp, View, map_batch, uses
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
THREADS = 128
MAX_NGRAM = 16
MAX_SLOTS = 256  # (N - 1) * Tb per layer


# ---------------------------------------------------------------------------------------------
# 64-bit arithmetic in uint32 words (x64 off).


def _mul_wide(a, b):
    """``(lo, hi)`` words of the 64-bit product of two uint32 arrays (16-bit limbs)."""
    mask = jnp.uint32(0xFFFF)
    a0, a1, b0, b1 = a & mask, a >> 16, b & mask, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & mask) + (p10 & mask)
    return (p00 & mask) | (mid << 16), p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)


def _mul64(x_lo, x_hi, m_lo, m_hi):
    """The product of two 64-bit values (word pairs) modulo 2^64."""
    lo, carry = _mul_wide(x_lo, m_lo)
    return lo, carry + x_lo * m_hi + x_hi * m_lo


def _urem(lo, hi, v):
    """The unsigned 64-bit value ``hi:lo`` modulo ``v`` (uint32, 0 < v < 2^31), one bit at a time."""

    def step(i, r):
        k = jnp.uint32(63) - i.astype(jnp.uint32)
        word = jnp.where(k >= 32, hi, lo) >> (k & 31)  # shifts stay below 32 (XLA's wider shifts differ under jit)
        r = (r << 1) | (word & 1)
        return jnp.where(r >= v, r - v, r)

    return jax.lax.fori_loop(0, 64, step, jnp.zeros(jnp.broadcast_shapes(lo.shape, v.shape), jnp.uint32))


def _floor_mod(lo, hi, v):
    """The signed 64-bit value ``hi:lo`` floor-modulo ``v`` (int32 > 0), as int32 in [0, v)."""
    vu = v.astype(jnp.uint32)
    r = _urem(lo, hi, vu).astype(jnp.int32)
    ones = jnp.full(vu.shape, 0xFFFFFFFF, jnp.uint32)
    wrap = (_urem(ones, ones, vu) + 1).astype(jnp.int32)  # 2^64 mod v, up to v
    wrap = jnp.where(wrap == v, 0, wrap)
    d = r - wrap  # a negative value is U - 2^64
    d = jnp.where(d < 0, d + v, d)
    return jnp.where((hi >> 31) == 1, d, r)


def hash_reference(ids, multipliers, vocab_sizes, offsets, image_token_mask):
    """``ids [T, N]`` int32, ``multipliers`` uint32 words ``[L, N, 2]``, ``vocab_sizes [L, N-1, Tb]``,
    ``offsets [L, (N-1)*Tb]`` -> int32 ``[L, T, (N-1)*Tb]`` (the module docstring's hash)."""
    t, n = ids.shape
    layers, _, tables = vocab_sizes.shape
    x_lo = jax.lax.bitcast_convert_type(ids, jnp.uint32)[None, :]
    x_hi = jnp.where(ids < 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(0))[None, :]
    h_lo = h_hi = None
    slots = []
    for j in range(n):
        p_lo, p_hi = _mul64(x_lo[..., j], x_hi[..., j], multipliers[:, None, j, 0], multipliers[:, None, j, 1])
        h_lo, h_hi = (p_lo, p_hi) if j == 0 else (h_lo ^ p_lo, h_hi ^ p_hi)
        if j:
            slots.append(_floor_mod(h_lo[..., None], h_hi[..., None], vocab_sizes[:, None, j - 1, :]))
    out = jnp.concatenate(slots, axis=-1) if slots else jnp.zeros((layers, t, 0), jnp.int32)
    out = out + offsets[:, None, :]
    if image_token_mask is not None:
        out = jnp.where(image_token_mask[None, :, None], -1, out)
    return out


# ---------------------------------------------------------------------------------------------
# Kernel: one thread per (token, layer).


@kernel(pass_configs=PASS_CONFIGS)
def hash_kernel(ngram: int, layers: int, tables: int, has_mask: bool):
    """Thread ``x`` of CTA ``(b, l)`` hashes token ``b * THREADS + x`` for layer ``l`` (int64 products,
    xor chain, TIR's floor modulo)."""
    import tilelang.language as T

    N, L, B = ngram, layers, tables
    K = (N - 1) * B
    TT = T.dynamic("T")

    @T.prim_func
    def engram_hash(
        ids: T.Tensor((TT, N), "int32"),
        multipliers: T.Tensor((L, N), "int64"),
        vocab_sizes: T.Tensor((L, N - 1, B), "int32"),
        offsets: T.Tensor((L, K), "int32"),
        image_token_mask: T.Tensor((TT,), "bool"),
        out: T.Tensor((L, TT, K), "int32"),
    ):
        with T.Kernel(T.ceildiv(TT, THREADS), L, threads=THREADS) as (bx, l):
            h = T.alloc_var("int64")
            t = bx * THREADS + T.get_thread_binding(0)
            if t < TT:
                h = T.Cast("int64", ids[t, 0]) * multipliers[l, 0]
                for i in T.unroll(N - 1):
                    h = h ^ (T.Cast("int64", ids[t, i + 1]) * multipliers[l, i + 1])
                    for b in T.unroll(B):
                        r = T.Cast("int32", T.floormod(h, T.Cast("int64", vocab_sizes[l, i, b]))) + offsets[l, i * B + b]
                        if has_mask:
                            out[l, t, i * B + b] = T.if_then_else(image_token_mask[t], -1, r)
                        else:
                            out[l, t, i * B + b] = r

    return engram_hash


def _launch(ids, multipliers, vocab_sizes, offsets, image_token_mask) -> Launch:
    layers, n = multipliers.shape[:2]
    return Launch(
        kernel=hash_kernel,
        params=dict(ngram=n, layers=layers, tables=vocab_sizes.shape[2], has_mask=image_token_mask is not None),
        views={"multipliers": View((layers, n), dtype=np.int64)},
    )


def _sharding(ids, multipliers, vocab_sizes, offsets, image_token_mask) -> ShardingRule:
    """Tokens shard; the tables' axes stay whole."""
    mask = ", t" if image_token_mask is not None else ""
    return ShardingRule(f"t n, l n w, l m b, l k{mask} -> l t k", replicated=("n", "l", "w", "m", "b", "k"))  # in order of appearance


def _batch(operands, dims, *, impl):
    """vmap over the tokens alone folds into the token axis (one launch); otherwise one call per element."""
    ids, multipliers, vocab_sizes, offsets, mask = operands
    d_ids, d_mult, d_vocab, d_off, d_mask = dims
    if d_mult is None and d_vocab is None and d_off is None and (d_ids is not None or d_mask is not None):
        size = ids.shape[d_ids] if d_ids is not None else mask.shape[d_mask]
        ids = jnp.moveaxis(ids, d_ids, 0) if d_ids is not None else jnp.broadcast_to(ids, (size, *ids.shape))
        if mask is not None:
            mask = jnp.moveaxis(mask, d_mask, 0) if d_mask is not None else jnp.broadcast_to(mask, (size, *mask.shape))
            mask = mask.reshape(-1)
        t = ids.shape[1]
        out = _op(ids.reshape(size * t, ids.shape[2]), multipliers, vocab_sizes, offsets, mask, impl=impl)
        return [out.reshape(out.shape[0], size, t, out.shape[2])], [1]
    present = [i for i, a in enumerate(operands) if a is not None]
    args = [operands[i] for i in present]

    def one(*xs):
        full = [None] * len(operands)
        for i, x in zip(present, xs):
            full[i] = x
        return [_op(*full, impl=impl)]

    return map_batch(args, [dims[i] for i in present], one)


_op = TileOp(
    name="engram_hash", launch=_launch, operands=("ids", "multipliers", "vocab_sizes", "offsets", "image_token_mask?"),
    results=("out",), reference=hash_reference, sharding=_sharding, batch=_batch,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Public function.


def multiplier_words(op: str, multipliers) -> jax.Array:
    """``multipliers`` as the little-endian uint32 words ``[L, N, 2]`` of its int64 values."""
    if isinstance(multipliers, (np.ndarray, np.generic)) and multipliers.dtype in (np.int64, np.uint64):
        m = np.ascontiguousarray(np.asarray(multipliers).astype(np.int64)).astype("<i8")
        return jnp.asarray(m.view("<u4").reshape(*m.shape, 2))
    m = checks.as_array(op, "multipliers", multipliers)
    if m.dtype in (jnp.int64, jnp.uint64):
        return jax.lax.bitcast_convert_type(m, jnp.uint32)
    if m.dtype == jnp.int32:
        return jnp.stack([jax.lax.bitcast_convert_type(m, jnp.uint32), jnp.where(m < 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(0))], -1)
    if m.dtype == jnp.uint32 and m.ndim == 3 and m.shape[-1] == 2:
        return m
    raise ValueError(
        f"{op}: multipliers must be int64 [L, N] (NumPy, or JAX with x64), int32 [L, N], or its uint32 words [L, N, 2]; got {m.dtype}{list(m.shape)}"
    )


def make_offsets(vocab_sizes) -> jax.Array:
    """TileKernels' ``make_offsets``: per layer, the exclusive prefix sum of the flattened table sizes
    ``vocab_sizes [L, N-1, Tb]`` -> int32 ``[L, (N-1)*Tb]``."""
    v = jnp.asarray(vocab_sizes, jnp.int32)
    flat = v.reshape(v.shape[0], -1)
    return (jnp.cumsum(flat, axis=1, dtype=jnp.int32) - flat).astype(jnp.int32)


def _words(m: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(m.astype("<i8")).view("<u4").reshape(*m.shape, 2)


def _make(t: int, n: int, layers: int, tables: int, big: bool, mask: bool):
    def make(rng, *_):
        ids = rng.integers(0, 100_000, (t, n)).astype(np.int32)
        if big:  # products wrap modulo 2^64; negative hashes; a few negative ids
            mult = rng.integers(-(2**63), 2**63 - 1, (layers, n), dtype=np.int64)
            ids[rng.random((t, n)) < 0.05] *= -1
        else:
            mult = rng.integers(1, 100_000, (layers, n)).astype(np.int64)
        vocab = rng.integers(100_000, 1_000_000, (layers, n - 1, tables)).astype(np.int32)
        flat = vocab.reshape(layers, -1)
        offsets = (np.cumsum(flat, axis=1) - flat).astype(np.int32)
        arrays = [ids, _words(mult), vocab, offsets]
        if mask:
            arrays.append(rng.random(t) < 0.2)
        return tuple(arrays)

    return make


def _case(t: int, n: int = 3, layers: int = 2, tables: int = 8, big: bool = False, mask: bool = False, **options) -> ArgSpec:
    s = jax.ShapeDtypeStruct
    args = [s((t, n), jnp.int32), s((layers, n, 2), jnp.uint32), s((layers, n - 1, tables), jnp.int32), s((layers, (n - 1) * tables), jnp.int32)]
    args.append(s((t,), jnp.bool_) if mask else None)
    name = f"t{t}_n{n}_l{layers}_tb{tables}" + ("_wrap" if big else "") + ("_mask" if mask else "")
    return ArgSpec(name, tuple(args), make=_make(t, n, layers, tables, big, mask), **options)


ARG_SPECS = (
    _case(4001),
    _case(64, big=True, mask=True),
    _case(1, n=2, layers=1, tables=1, mask=True),
    _case(0, mask=True),
    _case(40, n=5, layers=3, tables=4, big=True),
    _case(16384, bench=True),
    _case(65536, mask=True, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def engram_hash(ngram_token_ids, multipliers, vocab_sizes, offsets, image_token_mask=None, *, impl=None, ops) -> jax.Array:
    """TileKernels' ``engram_hash`` (module docstring): table indices for every layer and n-gram table.

    Args:
      ngram_token_ids: int32 ``[T, N]``: column j is the token j positions back (N = max n-gram size, 2..16).
      multipliers: the per-layer hash multipliers ``[L, N]``: int64 (NumPy, or JAX under x64), int32
        (sign-extended), or the int64's little-endian uint32 words ``[L, N, 2]``.
      vocab_sizes: int32 ``[L, N-1, Tb]``, positive table sizes.
      offsets: int32 ``[L, (N-1)*Tb]``, each table's first row in the concatenated table
        (:func:`make_offsets`).
      image_token_mask: optional bool ``[T]``; True tokens get -1 everywhere.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      int32 ``[L, T, (N-1)*Tb]``.
    """
    name = "engram_hash"
    ids = checks.as_array(name, "ngram_token_ids", ngram_token_ids)
    check_dtype(name, "ngram_token_ids", ids, jnp.int32)
    if ids.ndim != 2 or not 2 <= ids.shape[1] <= MAX_NGRAM:
        raise ValueError(f"{name}: ngram_token_ids must be [T, N] with 2 <= N <= {MAX_NGRAM}, got shape {ids.shape}")
    t, n = ids.shape
    words = multiplier_words(name, multipliers)
    if words.ndim != 3 or words.shape[1] != n:
        raise ValueError(f"{name}: multipliers must be [L, N] with N = {n} (the n-gram size), got {list(words.shape[:-1])}")
    layers = words.shape[0]
    vocab = checks.as_array(name, "vocab_sizes", vocab_sizes)
    check_dtype(name, "vocab_sizes", vocab, jnp.int32)
    if vocab.ndim != 3 or vocab.shape[:2] != (layers, n - 1) or vocab.shape[2] < 1:
        raise ValueError(f"{name}: vocab_sizes must be [L, N-1, Tb] = [{layers}, {n - 1}, Tb], got shape {vocab.shape}")
    slots = (n - 1) * vocab.shape[2]
    if slots > MAX_SLOTS:
        raise ValueError(f"{name}: (N-1) * Tb must be at most {MAX_SLOTS}, got {slots}")
    offsets = checks.as_array(name, "offsets", offsets)
    check_dtype(name, "offsets", offsets, jnp.int32)
    check_shape(name, "offsets", offsets, (layers, slots))
    mask = check_mask(name, image_token_mask, (t,))
    return ops[0](ids, words, vocab, offsets, mask, impl=impl)
