"""apply_rotary: rotary position embedding of query (and key) heads, one kernel launch for both.

Semantics are TileKernels v2.1's ``transform.apply_rotary`` and its torch reference
``rotary_embedding_ref`` (v2 §2.5), made functional. Where our reference notes leave a point open (the
cache layout, position handling, pairing, the columns outside the rotary dim, the operation order and
rounding) this follows TileKernels' ``transform/rope_kernel.py``, ``rope_cuda.py`` and ``torch/rope.py``
exactly; the deviations are named below (clamped rows, the ``columns`` window, new arrays):

- ``query`` / ``key``: ``[T, heads, D]`` or ``[B, S, heads, D]``, bf16, fp16 or fp32, one dtype; key
  may have its own head count and head dim.
- ``cos_sin_cache``: fp32 ``[S_ro, rot]``, row ``r`` is ``[cos(r θ_0 .. r θ_{rot/2-1}) | sin(...)]``:
  cos in the first half, sin in the second. ``rot`` is 64 or 128.
- cache row of token t: ``seqlen_offset + positions[t]`` with positions (``[T]`` or ``[B, S]``,
  int32/int64); without positions ``seqlen_offset + s``, s the token's index in its sequence (for 3-D
  inputs the token index itself). Rows outside ``[0, S_ro)`` are clamped to it (TileKernels leaves them
  undefined); the sum is taken in the positions' integer type.
- Pairing: NeoX (rotate-half) pairs column ``i`` with ``i + rot/2`` of the rotary window; GPT-J
  (``interleaved``) pairs ``2i`` with ``2i + 1``. Pair ``i`` uses ``cos[i]``, ``sin[i]``.
- ``a' = a·cos − b·sin``, ``b' = a·sin + b·cos`` (``conjugate``: the inverse rotation, sin negated),
  computed in fp32 and rounded once to the input dtype. The kernel computes each as
  ``fma(a, cos, ∓round(b·sin))`` / ``fma(a, ±sin, round(b·cos))`` like TileKernels' CUDA kernel; the JAX
  reference writes the products and the difference (XLA may contract them into one FMA), so results
  agree to the last fp32 place before rounding (TileKernels' tests compare with ``calc_diff <= 1e-8``
  for the same reason).
- Partial rotary: the rotary window is ``rot`` columns of the head dim, the first ``rot`` by default
  (the torch reference's layout, which passes the other columns through), or any 16-byte aligned window
  named by ``columns`` (slice bounds ``x[..., start:stop]`` resolved against each tensor's own head
  dim, so ``columns=(-64, None)`` is DeepSeek's ``q[..., -rot:]``). TileKernels rotates a strided view in
  place; here the untouched columns are copied into the new arrays by the same kernel.

Kernel: one pass over the tokens' rows. A row of one head is cut into units of 2 x 16 bytes: ``rot / 2 /
VEC`` rotary units (two 16-byte vectors holding VEC pairs, plus VEC cos and VEC sin from the cache row),
then copy units (two 16-byte vectors of the columns outside the window). A CTA takes
``tokens_per_cta`` tokens and its threads walk all their units (query heads, then key heads) in order,
so query and key take one launch.

Gradients: ``custom_vjp`` whose backward is the same kernel with ``conjugate`` flipped (the rotation is
orthogonal), the window's other columns passed straight through. ``cos_sin_cache`` is a constant (its
gradient is zero on every path), positions are integers.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import MAX_EXTENT, Launch, Rows, ShardingRule, TileOp, check_impl, config_class, uses, with_vjp
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}
ROT_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
POSITION_DTYPES = (jnp.dtype(jnp.int32), jnp.dtype(jnp.int64))
F32 = jnp.dtype(jnp.float32)
THREADS = 128
MAX_TOKENS_PER_CTA = 32
MAX_TOKENS = MAX_EXTENT - 1024  # int32 token indices b * tokens_per_cta + k, k < 1024 (configured tokens per CTA)
NAME = "apply_rotary"


def vec_of(dtype) -> int:
    """Elements per 16-byte vector."""
    return 16 // jnp.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------
# Reference.


def cache_rows(tokens: int, cache_len: int, positions, *, seqlen: int, seqlen_offset: int):
    """The cache row of each of ``tokens`` flat tokens: ``seqlen_offset + positions`` (in the positions'
    integer type), or ``seqlen_offset + t % seqlen``; clamped to ``[0, cache_len)``."""
    if positions is None:
        rows = jnp.arange(tokens, dtype=jnp.int32) % jnp.int32(seqlen) + jnp.int32(seqlen_offset)
    else:
        rows = positions + jnp.asarray(seqlen_offset, positions.dtype)
    return jnp.clip(rows, 0, cache_len - 1).astype(jnp.int32)


def rotate(x, cos, sin, *, start: int, interleaved: bool, conjugate: bool):
    """``x [N, H, D]`` with columns ``start .. start + rot`` rotated by ``cos``/``sin`` ``[N, rot/2]``
    (fp32); the other columns pass through."""
    rot = 2 * cos.shape[-1]
    window = x[:, :, start : start + rot].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    if conjugate:
        s = -s
    if interleaved:
        a, b = window[..., 0::2], window[..., 1::2]
    else:
        a, b = window[..., : rot // 2], window[..., rot // 2 :]
    first, second = a * c - b * s, a * s + b * c
    if interleaved:
        rotated = jnp.stack([first, second], axis=-1).reshape(window.shape)
    else:
        rotated = jnp.concatenate([first, second], axis=-1)
    return jnp.concatenate([x[:, :, :start], rotated.astype(x.dtype), x[:, :, start + rot :]], axis=-1)


def rotary_reference(query, key, cos_sin_cache, positions, *, seqlen, seqlen_offset, q_start, k_start, interleaved, conjugate):
    """The op on flat tokens: ``(query_out,)`` or ``(query_out, key_out)``."""
    half = cos_sin_cache.shape[1] // 2
    rows = cache_rows(query.shape[0], cos_sin_cache.shape[0], positions, seqlen=seqlen, seqlen_offset=seqlen_offset)
    table = cos_sin_cache[rows]
    cos, sin = table[:, :half], table[:, half:]
    options = dict(interleaved=interleaved, conjugate=conjugate)
    outs = (rotate(query, cos, sin, start=q_start, **options),)
    if key is not None:
        outs += (rotate(key, cos, sin, start=k_start, **options),)
    return outs


# ---------------------------------------------------------------------------------------------
# Kernel.


@dataclasses.dataclass(frozen=True)
class RowUnits:
    """How one head row of ``dim`` columns, rotary window at ``start``, is cut into units of 2 x 16 bytes:
    ``rotary`` units of VEC pairs, then ``copy`` units of the ``outside`` 16-byte vectors beyond the
    window (unit ``k`` copies vectors ``k`` and ``k + copy``); ``before`` vectors precede the window."""

    rotary: int
    copy: int
    outside: int
    before: int

    @property
    def total(self) -> int:
        return self.rotary + self.copy


def row_units(dim: int, start: int, rot: int, vec: int) -> RowUnits:
    outside = (dim - rot) // vec
    return RowUnits(rot // 2 // vec, -(-outside // 2), outside, start // vec)


def units_per_token(q_heads: int, q_units: RowUnits, k_heads: int, k_units: RowUnits | None) -> int:
    return q_heads * q_units.total + (k_heads * k_units.total if k_units else 0)


def tokens_per_cta(units: int, threads: int) -> int:
    """Tokens per CTA (at most 32) for ``units`` per token: the fewest whose units fill the threads'
    slots exactly within ``max(8, ceil(units / threads))`` iterations; else the fewest filling at least
    90% of the slots of the iterations they take; else the best filling."""
    limit = max(8, -(-units // threads))
    fills = []
    for tpc in range(1, MAX_TOKENS_PER_CTA + 1):
        iters = -(-tpc * units // threads)
        fills.append((tpc * units / (iters * threads), iters, tpc))
    for wanted in (1.0, 0.9):
        for fill, iters, tpc in fills:
            if fill >= wanted and (wanted < 1.0 or iters <= limit):
                return tpc
    return max(fills, key=lambda f: (f[0], -f[2]))[2]


@kernel(pass_configs=PASS_CONFIGS)
def rotary_kernel(
    dtype: str,
    positions_dtype: str,
    rot: int,
    q_heads: int,
    q_dim: int,
    q_start: int,
    k_heads: int,
    k_dim: int,
    k_start: int,
    interleaved: bool,
    conjugate: bool,
    has_positions: bool,
    threads: int,
    tokens_per_cta: int,
):
    """Rotates ``query [N, q_heads, q_dim]`` (and ``key [N, k_heads, k_dim]`` when ``k_heads``) into
    ``query_out`` / ``key_out``, copying the columns outside the rotary windows.

    Thread ``tid`` of CTA ``b`` takes flat units ``f = i * threads + tid`` of the CTA's
    ``tokens_per_cta * U`` units (U per token: each query head's row units, then each key head's), i.e.
    token ``b * tokens_per_cta + f // U``, unit ``f % U``. A rotary unit loads two 16-byte vectors (NeoX:
    at ``c·VEC`` and ``rot/2 + c·VEC`` of the window; GPT-J: the 2·VEC columns at ``2c·VEC``) and VEC
    cos, VEC sin of the token's cache row, rotates the VEC pairs in fp32 with ``fma`` and stores both
    vectors; a copy unit moves up to two 16-byte vectors from outside the window.
    """
    import tilelang.language as T

    VEC = vec_of(dtype)
    HALF = rot // 2
    RV = rot // VEC  # vectors per window
    PH = VEC // 2  # pairs per vector (GPT-J)
    qu = row_units(q_dim, q_start, rot, VEC)
    ku = row_units(k_dim, k_start, rot, VEC) if k_heads else None
    QU = q_heads * qu.total
    U = units_per_token(q_heads, qu, k_heads, ku)
    TPC = tokens_per_cta
    ITERS = -(-TPC * U // threads)
    KH, KD = max(k_heads, 1), (k_dim if k_heads else VEC)
    f32 = "float32"
    N, S = T.dynamic("N, S")

    @T.macro
    def rotary_unit(x, out, t, h, c, start, seqlen, seqlen_offset, positions, cos_sin, va, vb, oa, ob, cs, sn):
        if has_positions:
            raw = positions[t] + T.Cast(positions_dtype, seqlen_offset)
            row = T.Cast("int32", T.max(T.min(raw, T.Cast(positions_dtype, S - 1)), T.Cast(positions_dtype, 0)))
        else:
            row = T.max(T.min(t % seqlen + seqlen_offset, S - 1), 0)
        if interleaved:
            ca = start + 2 * c * VEC
            cb = ca + VEC
        else:
            ca = start + c * VEC
            cb = ca + HALF
        for j in T.vectorized(VEC):
            va[j] = x[t, h, ca + j]
        for j in T.vectorized(VEC):
            vb[j] = x[t, h, cb + j]
        for j in T.vectorized(VEC):
            cs[j] = cos_sin[row, c * VEC + j]
        for j in T.vectorized(VEC):
            sn[j] = cos_sin[row, HALF + c * VEC + j]
        for j in device.static_range(VEC):
            # pair j: (a[j], b[j]) for NeoX; for GPT-J two neighbours of vector a (j < VEC/2) or of vector b
            if interleaved:
                k = 2 * (j % PH)
                src, dst = (va, oa) if j < PH else (vb, ob)
                a, b = T.Cast(f32, src[k]), T.Cast(f32, src[k + 1])
            else:
                a, b = T.Cast(f32, va[j]), T.Cast(f32, vb[j])
            if conjugate:
                first = T.ieee_fmaf(a, cs[j], T.ieee_mul(b, sn[j]))
                second = T.ieee_fmaf(a, -sn[j], T.ieee_mul(b, cs[j]))
            else:
                first = T.ieee_fmaf(a, cs[j], -T.ieee_mul(b, sn[j]))
                second = T.ieee_fmaf(a, sn[j], T.ieee_mul(b, cs[j]))
            if interleaved:
                dst[k] = T.Cast(dtype, first)
                dst[k + 1] = T.Cast(dtype, second)
            else:
                oa[j] = T.Cast(dtype, first)
                ob[j] = T.Cast(dtype, second)
        for j in T.vectorized(VEC):
            out[t, h, ca + j] = oa[j]
        for j in T.vectorized(VEC):
            out[t, h, cb + j] = ob[j]

    @T.macro
    def copy_vector(x, out, t, h, v, before, va):
        w = v + T.if_then_else(v < before, 0, RV)  # vector index in the row, past the window's vectors
        for j in T.vectorized(VEC):
            va[j] = x[t, h, w * VEC + j]
        for j in T.vectorized(VEC):
            out[t, h, w * VEC + j] = va[j]

    def head_macro(units: RowUnits, start: int):
        """The unit ``s`` of head ``h`` of token ``t`` of one tensor (its row layout ``units``)."""

        @T.macro
        def head_unit(x, out, t, h, s, seqlen, seqlen_offset, positions, cos_sin, va, vb, oa, ob, cs, sn):
            if units.copy == 0:
                rotary_unit(x, out, t, h, s, start, seqlen, seqlen_offset, positions, cos_sin, va, vb, oa, ob, cs, sn)
            elif s < units.rotary:
                rotary_unit(x, out, t, h, s, start, seqlen, seqlen_offset, positions, cos_sin, va, vb, oa, ob, cs, sn)
            else:
                copy_vector(x, out, t, h, s - units.rotary, units.before, va)
                if units.outside % 2 == 0:
                    copy_vector(x, out, t, h, s - units.rotary + units.copy, units.before, va)
                else:
                    if s - units.rotary + units.copy < units.outside:
                        copy_vector(x, out, t, h, s - units.rotary + units.copy, units.before, va)

        return head_unit

    query_unit = head_macro(qu, q_start)
    key_unit = head_macro(ku, k_start) if k_heads else None

    @T.prim_func
    def apply_rotary(
        query: T.Tensor((N, q_heads, q_dim), dtype),
        key: T.Tensor((N, KH, KD), dtype),
        cos_sin_cache: T.Tensor((S, rot), f32),
        positions: T.Tensor((N,), positions_dtype),
        query_out: T.Tensor((N, q_heads, q_dim), dtype),
        key_out: T.Tensor((N, KH, KD), dtype),
        seqlen: T.int32,
        seqlen_offset: T.int32,
    ):
        with T.Kernel(T.ceildiv(N, TPC), threads=threads) as b:
            va = T.alloc_local((VEC,), dtype)
            vb = T.alloc_local((VEC,), dtype)
            oa = T.alloc_local((VEC,), dtype)
            ob = T.alloc_local((VEC,), dtype)
            cs = T.alloc_local((VEC,), f32)
            sn = T.alloc_local((VEC,), f32)
            tid = T.get_thread_binding(0)
            for i in T.serial(ITERS):
                f = i * threads + tid
                t = b * TPC + f // U
                u = f % U
                if T.And(f < TPC * U, t < N):
                    if k_heads == 0:
                        query_unit(query, query_out, t, u // qu.total, u % qu.total, seqlen, seqlen_offset, positions, cos_sin_cache,
                                   va, vb, oa, ob, cs, sn)  # fmt: skip
                    else:
                        if u < QU:
                            query_unit(query, query_out, t, u // qu.total, u % qu.total, seqlen, seqlen_offset, positions, cos_sin_cache,
                                       va, vb, oa, ob, cs, sn)  # fmt: skip
                        else:
                            key_unit(key, key_out, t, (u - QU) // ku.total, (u - QU) % ku.total, seqlen, seqlen_offset, positions,
                                     cos_sin_cache, va, vb, oa, ob, cs, sn)  # fmt: skip

    return apply_rotary


# ---------------------------------------------------------------------------------------------
# The op on flat tokens: query [N, Hq, Dq], key [N, Hk, Dk]?, cos_sin_cache [S_ro, rot], positions [N]?.


@dataclasses.dataclass(frozen=True)
class RotaryConfig:
    """Threads per CTA and tokens per CTA (None: :func:`tokens_per_cta` for the shapes and threads)."""

    threads: int = THREADS
    tokens_per_cta: int | None = None


@config_class(RotaryConfig)
def _config(query, key, cos_sin_cache, positions, **_) -> RotaryConfig:
    """128 threads; tokens per CTA picked to fill them."""
    return RotaryConfig()


def _results(query, key, cos_sin_cache, positions, **_) -> tuple[str, ...]:
    return ("query_out",) if key is None else ("query_out", "key_out")


def _units(query, key, cos_sin_cache, *, q_start, k_start) -> int:
    rot, vec = cos_sin_cache.shape[1], vec_of(query.dtype)
    qu = row_units(query.shape[2], q_start, rot, vec)
    ku = None if key is None else row_units(key.shape[2], k_start, rot, vec)
    return units_per_token(query.shape[1], qu, 0 if key is None else key.shape[1], ku)


def _launch(query, key, cos_sin_cache, positions, *, seqlen, seqlen_offset, q_start, k_start, interleaved, conjugate,
            config: RotaryConfig) -> Launch:  # fmt: skip
    threads = int(config.threads)
    units = _units(query, key, cos_sin_cache, q_start=q_start, k_start=k_start)
    tpc = config.tokens_per_cta or tokens_per_cta(units, threads)
    if threads % 32 or not 32 <= threads <= 1024 or not 1 <= tpc <= 1024:
        raise ValueError(f"RotaryConfig: threads must be a multiple of 32 in [32, 1024] and tokens_per_cta in [1, 1024], got {config}")
    params = dict(
        dtype=query.dtype.name, positions_dtype="int32" if positions is None else positions.dtype.name, rot=cos_sin_cache.shape[1],
        q_heads=query.shape[1], q_dim=query.shape[2], q_start=q_start,
        k_heads=0 if key is None else key.shape[1], k_dim=0 if key is None else key.shape[2], k_start=0 if key is None else k_start,
        interleaved=interleaved, conjugate=conjugate, has_positions=positions is not None, threads=threads, tokens_per_cta=tpc,
    )  # fmt: skip
    return Launch(
        kernel=rotary_kernel,
        params=params,
        scalars=dict(seqlen=int(seqlen), seqlen_offset=int(seqlen_offset)),
        buffers={} if key is not None else {"key_out": None},
    )


def _sharding(query, key, cos_sin_cache, positions, **_) -> ShardingRule:
    """Heads may stay sharded; tokens too where each has its positions (without, a token's row is its
    index, which a shard does not know). Head dims (the window has global offsets) and the cache are
    replicated. Query and key heads are one factor when their counts are equal; otherwise two, and the
    core gives a mesh axis to only one of them (the other tensor is gathered)."""
    ins, outs = ["t hq dq"], ["t hq dq"]
    if key is not None:
        hk = "hq" if key.shape[1] == query.shape[1] else "hk"
        ins.append(f"t {hk} dk")
        outs.append(f"t {hk} dk")
    ins.append("s r")
    if positions is not None:
        ins.append("t")
    free = {"hq", "hk"} | ({"t"} if positions is not None else set())
    factors = dict.fromkeys(" ".join(ins).split())  # in order of appearance (Shardy wants them sorted)
    return ShardingRule(f"{', '.join(ins)} -> {', '.join(outs)}", replicated=tuple(f for f in factors if f not in free))


_rotary_op = TileOp(
    name=NAME, launch=_launch, operands=("query", "key?", "cos_sin_cache", "positions?"), results=_results,
    reference=rotary_reference, config=_config, rows=Rows(("query", "key", "positions"), ("query_out", "key_out")),
    sharding=_sharding, max_extent=MAX_TOKENS,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Differentiable: the backward is the conjugate rotation.


def _primal(query, key, cos_sin_cache, positions, *, impl=None, ops, conjugate, **static):
    return ops[0](query, key, cos_sin_cache, positions, impl=impl, conjugate=conjugate, **static)


def _fwd(query, key, cos_sin_cache, positions, *, impl=None, ops, conjugate, **static):
    out = _primal(query, key, cos_sin_cache, positions, impl=impl, ops=ops, conjugate=conjugate, **static)
    return out, (cos_sin_cache, positions)


def _bwd(residuals, g, *, impl=None, ops, conjugate, **static):
    cos_sin_cache, positions = residuals
    gq, gk = g if len(g) == 2 else (g[0], None)
    grads = ops[0](gq, gk, cos_sin_cache, positions, impl=impl, conjugate=not conjugate, **static)
    return grads[0], (grads[1] if gk is not None else None), None, None


_differentiable = with_vjp(_primal, _fwd, _bwd)


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _window(name: str, dim: int, columns, rot: int) -> int:
    """The rotary window's first column in a head dim of ``dim``."""
    if columns is None:
        start, stop = 0, rot
    else:
        start, stop, _ = slice(*columns).indices(dim)
    if stop - start != rot or not 0 <= start <= dim - rot:
        where = "the first rot columns" if columns is None else f"columns={tuple(columns)} -> [{start}, {stop})"
        raise ValueError(
            f"{NAME}: the rotary window of {name} ({where}) must be rot = {rot} columns (cos_sin_cache.shape[1]) "
            f"inside its head dim {dim}"
        )
    return start


def _columns(columns):
    if columns is None:
        return None
    if isinstance(columns, (str, bytes)) or not hasattr(columns, "__len__") or len(columns) != 2:
        raise TypeError(f"{NAME}: columns must be None or a pair (start, stop) of slice bounds, got {columns!r}")
    return tuple(None if c is None else checks.static_int(NAME, "columns", c) for c in columns)


def _check_heads(name: str, x, lead: tuple[int, ...], dtype) -> None:
    if x.ndim != len(lead) + 2 or tuple(x.shape[: len(lead)]) != tuple(lead):
        raise ValueError(f"{NAME}: {name} must be [{', '.join(map(str, lead))}, heads, D] like query, got shape {x.shape}")
    if x.dtype != dtype:
        raise ValueError(f"{NAME}: {name} must have query's dtype {dtype}, got {x.dtype}")


def _check_alignment(name: str, dim: int, start: int, vec: int, dtype) -> None:
    if dim % vec or start % vec:
        raise ValueError(
            f"{NAME}: {name}'s head dim ({dim}) and rotary window start ({start}) must be multiples of {vec} "
            f"(16-byte vectors of {jnp.dtype(dtype).name})"
        )


# ---------------------------------------------------------------------------------------------
# Named cases.

BF16, F16 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


def _make(offset: int):
    """Random heads; a table of cos/sin of random angles (the magnitudes of a real one); positions uniform
    over the rows ``seqlen_offset`` leaves in range."""

    def make(rng, query, cos_sin_cache, key, positions):
        from jax_tilek.testing import random_array

        draw = lambda s: None if s is None else random_array(rng, s.shape, s.dtype)  # noqa: E731
        rows, rot = cos_sin_cache.shape
        angles = rng.uniform(0, 2 * np.pi, size=(rows, rot // 2))
        table = np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
        pos = None
        if positions is not None:
            pos = rng.integers(0, max(rows - offset, 1), size=positions.shape).astype(positions.dtype)
        return draw(query), table, draw(key), pos

    return make


def _case(name, q, k, rot, cache_rows_, *, lead=None, dtype=BF16, positions=True, interleaved=False, conjugate=False,
          seqlen_offset=0, columns=None, **options) -> ArgSpec:  # fmt: skip
    """``q``/``k``: (heads, D) per token; ``lead``: the token axes ((T,) or (B, S))."""
    s = jax.ShapeDtypeStruct
    args = (
        s((*lead, *q), dtype), s((cache_rows_, rot), F32), None if k is None else s((*lead, *k), dtype),
        s(lead, jnp.int32) if positions else None,
    )  # fmt: skip
    kwargs = dict(interleaved=interleaved, conjugate=conjugate, seqlen_offset=seqlen_offset, columns=columns)
    tolerance = 1e-5 if dtype == F32 else 1e-2
    return ArgSpec(name, args, kwargs, make=_make(seqlen_offset), tolerance=tolerance, **options)


# Contract cases (small, every path), the GPU tests' sizes ("gpu_": token counts off every block size,
# traced and lowered only on the CPU) and the benchmarks' ("bench_": DeepSeek-style hidden 4096 with 32
# query / 8 key heads of 128, and hidden 7168 MLA: 128 query heads of 192 with rope on the last 64,
# one shared 64-wide key head, GPT-J pairs).
ARG_SPECS = (
    _case("neox_bf16_qk", (4, 128), (2, 128), 128, 64, lead=(7,)),
    _case("gptj_bf16_4d_offset", (3, 64), (1, 64), 64, 32, lead=(2, 5), positions=False, interleaved=True, seqlen_offset=3),
    _case("mla_bf16_suffix_conj", (2, 192), (1, 64), 64, 40, lead=(16,), interleaved=True, conjugate=True, columns=(-64, None)),
    _case("neox_f32_prefix_q", (3, 160), None, 128, 16, lead=(6,), dtype=F32),
    _case("gptj_f16_middle_nopos", (1, 96), (2, 80), 64, 8, lead=(5,), dtype=F16, positions=False, interleaved=True, columns=(16, 80)),
    _case("neox_bf16_zero_tokens", (4, 128), (2, 128), 128, 8, lead=(0,)),
    _case("gpu_neox_bf16_4101", (32, 128), (8, 128), 128, 8192, lead=(4101,), bench=True),
    _case("gpu_gptj_f32_1", (5, 64), (5, 64), 64, 16, lead=(1,), dtype=F32, interleaved=True, bench=True),
    _case("gpu_mla_bf16_3x1000", (128, 192), (1, 64), 64, 4096, lead=(3, 1000), interleaved=True, columns=(-64, None), bench=True),
    _case("gpu_neox_bf16_nopos_offset_2x2049", (16, 128), (16, 128), 128, 4200, lead=(2, 2049), positions=False, seqlen_offset=100,
          bench=True),  # fmt: skip
    *(_case(f"bench_h4096_{t}", (32, 128), (8, 128), 128, 65536, lead=(t,), bench=True) for t in (4096, 16384, 65536)),
    *(_case(f"bench_mla7168_{t}", (128, 192), (1, 64), 64, 65536, lead=(t,), interleaved=True, columns=(-64, None), bench=True)
      for t in (4096, 16384)),  # fmt: skip
    # tunings (benchmarks.bench_rope's VARIANTS)
    _case("bench_threads256_h4096_16384", (32, 128), (8, 128), 128, 65536, lead=(16384,), config=dict(threads=256), bench=True),
    _case("bench_threads256_mla7168_16384", (128, 192), (1, 64), 64, 65536, lead=(16384,), interleaved=True, columns=(-64, None),
          config=dict(threads=256), bench=True),  # fmt: skip
)


# ---------------------------------------------------------------------------------------------
# The public function.


@uses(_rotary_op, cases=ARG_SPECS, differentiable=True)
def apply_rotary(
    query: jax.Array,
    cos_sin_cache: jax.Array,
    key: jax.Array | None = None,
    positions: jax.Array | None = None,
    interleaved: bool = False,
    conjugate: bool = False,
    seqlen_offset: int = 0,
    *,
    columns: tuple[int | None, int | None] | None = None,
    impl=None,
    ops,
):
    """Rotary position embedding of ``query`` (and ``key``, in the same launch); returns new arrays.

    Args:
      query: ``[T, heads, D]`` or ``[B, S, heads, D]``; bf16, fp16 or fp32.
      cos_sin_cache: fp32 ``[S_ro, rot]``, cos in ``[:, :rot/2]``, sin in ``[:, rot/2:]``; rot 64 or 128.
      key: like query (same leading axes and dtype), its own heads and D; or None.
      positions: int32/int64 ``[T]`` (3-D inputs) or ``[B, S]`` (4-D): each token's cache row, plus
        ``seqlen_offset``; without, a token's index in its sequence plus ``seqlen_offset``. Rows outside
        the cache are clamped to it.
      interleaved: GPT-J pairs ``(2i, 2i+1)``; default NeoX ``(i, i + rot/2)``.
      conjugate: the inverse rotation.
      seqlen_offset: a static int added to every row.
      columns: the rotary window of each head, as slice bounds ``(start, stop)`` applied to query's and
        key's own head dims (``(-64, None)``: the last 64 columns); ``stop - start`` must be rot, and
        start and D multiples of 16 bytes. Default: the first rot columns (TileKernels' reference).
        Columns outside the window are returned unchanged.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      The rotated query, or ``(query, key)`` when key is given; shapes and dtypes of the inputs.
      Differentiable in query and key (the backward rotates the cotangents back with the same kernel);
      ``cos_sin_cache`` is treated as a constant. A tensor with zero heads comes back as it is. The exact
      arithmetic and kernel layout: the docstring of :mod:`jax_tilek.rope._apply_rotary`.
    """
    check_impl(impl, NAME)
    query = checks.as_array(NAME, "query", query)
    cos_sin_cache = checks.as_array(NAME, "cos_sin_cache", cos_sin_cache)
    key = checks.as_array(NAME, "key", key, optional=True)
    positions = checks.as_array(NAME, "positions", positions, optional=True)
    interleaved = checks.static_bool(NAME, "interleaved", interleaved)
    conjugate = checks.static_bool(NAME, "conjugate", conjugate)
    seqlen_offset = checks.static_int(NAME, "seqlen_offset", seqlen_offset)
    columns = _columns(columns)
    if not -(2**31) <= seqlen_offset < 2**31:
        raise ValueError(f"{NAME}: seqlen_offset must fit int32, got {seqlen_offset}")
    if query.ndim not in (3, 4):
        raise ValueError(f"{NAME}: query must be [T, heads, D] or [B, S, heads, D], got shape {query.shape}")
    if query.dtype not in DTYPES:
        raise ValueError(f"{NAME}: query must be bfloat16, float16 or float32, got {query.dtype}")
    if cos_sin_cache.ndim != 2 or cos_sin_cache.dtype != F32:
        raise ValueError(f"{NAME}: cos_sin_cache must be float32 [S_ro, rot], got {cos_sin_cache.dtype}{list(cos_sin_cache.shape)}")
    rot = cos_sin_cache.shape[1]
    if rot not in ROT_DIMS:
        raise ValueError(f"{NAME}: the rotary dim (cos_sin_cache.shape[1]) must be 64 or 128, got {rot}")
    if cos_sin_cache.shape[0] < 1:
        raise ValueError(f"{NAME}: cos_sin_cache must have at least one row")
    lead = tuple(query.shape[:-2])
    vec = vec_of(query.dtype)
    q_start = _window("query", query.shape[-1], columns, rot)
    _check_alignment("query", query.shape[-1], q_start, vec, query.dtype)
    k_start = 0
    if key is not None:
        _check_heads("key", key, lead, query.dtype)
        k_start = _window("key", key.shape[-1], columns, rot)
        _check_alignment("key", key.shape[-1], k_start, vec, key.dtype)
    if positions is not None:
        if tuple(positions.shape) != lead:
            raise ValueError(f"{NAME}: positions must have query's leading shape {list(lead)}, got {list(positions.shape)}")
        if positions.dtype not in POSITION_DTYPES:
            raise ValueError(f"{NAME}: positions must be int32 or int64, got {positions.dtype}")
    tokens = math.prod(lead)
    if tokens > MAX_TOKENS:
        raise ValueError(f"{NAME}: query may have at most {MAX_TOKENS} tokens (int32 token indices), got {tokens}")
    if cos_sin_cache.shape[0] > MAX_EXTENT:
        raise ValueError(f"{NAME}: cos_sin_cache may have at most {MAX_EXTENT} rows (int32 row indices), got {cos_sin_cache.shape[0]}")
    # A tensor without heads has nothing to rotate: it comes back as it is, the other one alone takes the op.
    rotated = [x for x in (query, key) if x is not None and x.shape[-2] > 0]
    starts = [start for x, start in ((query, q_start), (key, k_start)) if x is not None and x.shape[-2] > 0]
    if not rotated:
        return query if key is None else (query, key)
    flat = lambda x: None if x is None else x.reshape(-1, *x.shape[-2:])  # noqa: E731
    static = dict(
        seqlen=max(int(lead[-1]), 1), seqlen_offset=seqlen_offset, q_start=starts[0], k_start=starts[1] if len(starts) > 1 else 0,
        interleaved=interleaved, conjugate=conjugate,
    )  # fmt: skip
    outs = _differentiable(
        flat(rotated[0]), flat(rotated[1]) if len(rotated) > 1 else None, jax.lax.stop_gradient(cos_sin_cache),
        None if positions is None else positions.reshape(-1), impl=impl, ops=ops, **static,
    )  # fmt: skip
    outs = iter(o.reshape(x.shape) for o, x in zip(outs, rotated))
    q_out = next(outs) if query.shape[-2] > 0 else query
    return q_out if key is None else (q_out, next(outs) if key.shape[-2] > 0 else key)
