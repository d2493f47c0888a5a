"""expand_to_fused and expand_to_fused_with_sf: copy each token's row to its positions in the fused
expert-major layout (TileKernels v1 §1.10-1.11).

Semantics are those of TileKernels' torch reference: the output starts as zeros and row ``x[t]`` is
written to every position ``token_topk_to_pos[t, k]`` in ``[0, P)``; ``pos_to_expert`` only gives P.
(TileKernels' kernel zero-fills the rows whose ``pos_to_expert`` is negative instead, the same for a
mapping from ``get_fused_mapping``; here every row no slot targets is zero, whatever the mapping.)
Positions must be distinct (as ``get_fused_mapping`` makes them).

The kernels move bytes: data rows as 16-byte vectors of any dtype (bf16, fp32, float8_e4m3fn, packed
FP4 ...), scales as 4- or 1-byte elements. Custom VJP: the transpose of ``expand_to_fused`` is
``reduce_fused`` without weights.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Static, TileOp, View, config_class, uses, with_vjp
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True}
PRELUDE = device.prelude(device.BULK_STORE)
MAX_FLAT = 2**31 - 2**20  # int32 flat (row, vector) indices
SF_LAYOUTS = ("row", "col", "col_ue8m0")


# ---------------------------------------------------------------------------------------------
# Reference.


def scatter_rows(rows: jax.Array, token_topk_to_pos: jax.Array, num_rows: int) -> jax.Array:
    """zeros ``[num_rows, W]`` with ``rows[t]`` written at every position ``token_topk_to_pos[t, k]`` in range."""
    t, k = token_topk_to_pos.shape
    pos = token_topk_to_pos.reshape(t * k)
    target = jnp.where((pos >= 0) & (pos < num_rows), pos, num_rows)
    src = jnp.repeat(rows, k, axis=0)
    return jnp.zeros((num_rows, *rows.shape[1:]), rows.dtype).at[target].set(src, mode="drop")


def _expand_reference(x, token_topk_to_pos, pos_to_expert, x_sf=None, *, sf_layout=None):
    p = pos_to_expert.shape[0]
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
        # The same values; JAX's transpose then sums the K cotangents in fp32, as reduce_fused does.
        out = scatter_rows(x.astype(jnp.float32), token_topk_to_pos, p).astype(x.dtype)
    else:
        out = scatter_rows(x, token_topk_to_pos, p)
    if x_sf is None:
        return out
    if sf_layout == "row":
        return out, scatter_rows(x_sf, token_topk_to_pos, p)
    cols = scatter_rows(x_sf.T[: x.shape[0]], token_topk_to_pos, p).T  # [W, P]
    return out, jnp.pad(cols, ((0, 0), (0, F.tma_aligned(p, x_sf.dtype) - p)))


# ---------------------------------------------------------------------------------------------
# The kernel.


@kernel(pass_configs=PASS_CONFIGS)
def expand_kernel(num_topk: int, has_sf: bool, sf_dtype: str, sf_col: bool, threads: int, unroll: int, bulk_row_words: int = 0):
    """Up to three kernels:

    1. One thread per slot: ``targeted[pos] = 1`` (a zero-filled workspace).
    2. The copy of ``max(T, P)`` rows. With ``bulk_row_words`` (rows of that many words, static; the
       default config): one CTA per (row, chunk of the row), whose threads load the chunk of ``x[r]``
       into shared memory; one thread hands the K stores to the bulk-copy engine (``cp.async.bulk``
       shared -> global), and the threads write zeros to output row r when no slot targets it.
       Without: flat over (row, 16-byte vector), ``unroll`` vectors per thread (consecutive threads
       take consecutive vectors): a thread loads its vector of ``x[r]`` once and stores it at each of
       the row's positions, and writes zeros to vector ``v`` of output row ``r`` when no slot targets it.
    3. With scales (``has_sf``): one thread per (token, scale element) stores the element at each
       position of the token (row-major ``[P, W]`` or column-major ``[W, align(P)]`` storage, which the
       launcher zero-fills).
    """
    import tilelang.language as T

    K = num_topk
    N, P = T.dynamic("N, P")  # tokens, positions
    W = bulk_row_words or T.dynamic("W")  # 4-byte words per row
    vecs = W // 4
    span = threads * unroll
    SN, SP, SW = T.dynamic("SN, SP, SW")  # scale storage extents along tokens (padded when column-major), per token
    sf_in_shape = (SW, SN) if sf_col else (SN, SW)
    sf_out_shape = (SW, SP) if sf_col else (SP, SW)

    @T.prim_func
    def expand_to_fused(
        x: T.Tensor((N, W), "uint32"),
        token_topk_to_pos: T.Tensor((N, K), "int32"),
        out: T.Tensor((P, W), "uint32"),
        targeted: T.Tensor((P,), "int32"),
        x_sf: T.Tensor(sf_in_shape, sf_dtype),
        out_sf: T.Tensor(sf_out_shape, sf_dtype),
    ):
        with T.Kernel(T.ceildiv(N * K, threads), threads=threads) as b:
            i = b * threads + T.get_thread_binding(0)
            if i < N * K:
                pos = token_topk_to_pos[i // K, i % K]
                if T.And(pos >= 0, pos < P):
                    targeted[pos] = 1

        if bulk_row_words:
            chunk = bulk_chunk_words(bulk_row_words)
            chunk_vecs = chunk // 4
            with T.Kernel(T.max(N, P), bulk_row_words // chunk, threads=threads, prelude=PRELUDE) as (r, c):
                buf = T.alloc_shared((chunk,), "uint32")
                tid = T.get_thread_binding(0)
                if r < N:
                    for i in T.unroll(T.ceildiv(chunk_vecs, threads)):
                        v = i * threads + tid
                        if v < chunk_vecs:
                            for j in T.vectorized(4):
                                buf[v * 4 + j] = x[r, c * chunk + v * 4 + j]
                    T.fence_proxy_async()  # the bulk copies read what these generic stores wrote
                    T.sync_threads()
                    if tid == 0:
                        for k in T.serial(K):
                            pos = token_topk_to_pos[r, k]
                            if T.And(pos >= 0, pos < P):
                                T.call_extern("handle", "tilek_bulk_store", T.address_of(out[pos, c * chunk]), T.address_of(buf[0]), chunk * 4)
                        T.tma_store_arrive()
                        T.tma_store_wait(0)
                if r < P:
                    if targeted[r] == 0:
                        for i in T.unroll(T.ceildiv(chunk_vecs, threads)):
                            v = i * threads + tid
                            if v < chunk_vecs:
                                for j in T.vectorized(4):
                                    out[r, c * chunk + v * 4 + j] = T.uint32(0)

        else:
            with T.Kernel(T.ceildiv(T.max(N, P) * vecs, span), threads=threads) as b:
                T.assume(W % 4 == 0)
                reg = T.alloc_local((4,), "uint32")
                tid = T.get_thread_binding(0)
                for u in T.unroll(unroll):
                    f = (b * unroll + u) * threads + tid
                    r = f // vecs
                    v = f % vecs
                    if r < N:
                        for j in T.vectorized(4):
                            reg[j] = x[r, v * 4 + j]
                        for k in T.unroll(K):
                            pos = token_topk_to_pos[r, k]
                            if T.And(pos >= 0, pos < P):
                                for j in T.vectorized(4):
                                    out[pos, v * 4 + j] = reg[j]
                    if r < P:
                        if targeted[r] == 0:
                            for j in T.vectorized(4):
                                out[r, v * 4 + j] = T.uint32(0)

        if has_sf:
            with T.Kernel(T.ceildiv(N * SW, threads), threads=threads) as b:
                i = b * threads + T.get_thread_binding(0)
                r = i // SW
                c = i % SW
                if r < N:
                    for k in T.unroll(K):
                        pos = token_topk_to_pos[r, k]
                        if T.And(pos >= 0, pos < P):
                            if sf_col:
                                out_sf[c, pos] = x_sf[c, r]
                            else:
                                out_sf[pos, c] = x_sf[r, c]

    return expand_to_fused


def _row_words(x) -> int:
    return x.shape[1] * np.dtype(x.dtype).itemsize // 4


BULK_CHUNK_WORDS = 4096  # 16 KiB of shared memory per CTA at most


def bulk_chunk_words(row_words: int) -> int:
    """The bulk copy's chunk of a row: the fewest equal chunks of at most 16 KiB, each a whole number
    of 16-byte vectors."""
    chunks = -(-row_words // BULK_CHUNK_WORDS)
    while row_words % chunks or (row_words // chunks) % 4:
        chunks += 1
    return row_words // chunks


@dataclasses.dataclass(frozen=True)
class ExpandConfig:
    """Threads per CTA (a multiple of 32 in [32, 1024]), 16-byte vectors each thread copies (1 ... 16),
    and ``bulk``: one CTA per row chunk, the K stores by the bulk-copy engine (``unroll`` unused)."""

    threads: int = 128
    unroll: int = 4
    bulk: bool = True


@config_class(ExpandConfig)
def _config(x, token_topk_to_pos, pos_to_expert, x_sf=None, **_) -> ExpandConfig:
    """The bulk copy with 128 threads: on an H100 (2026-12-07) 98% / 92% of a device copy at 4096 /
    16384 tokens of 7168 bf16, top-8, against 80% / 70% for the best per-thread tuning (128 x 4)."""
    return ExpandConfig()


def _launch(x, token_topk_to_pos, pos_to_expert, x_sf=None, *, sf_layout=None, config: ExpandConfig) -> Launch:
    threads, unroll = int(config.threads), int(config.unroll)
    if threads % 32 or not 32 <= threads <= 1024 or not 1 <= unroll <= 16:
        raise ValueError(f"ExpandConfig: threads must be a multiple of 32 in [32, 1024] and unroll in [1, 16], got {config}")
    t, p = x.shape[0], pos_to_expert.shape[0]
    words = _row_words(x)
    views = {"x": View((t, words), dtype=np.uint32), "out": View((p, words), dtype=np.uint32)}
    params = dict(num_topk=token_topk_to_pos.shape[1], has_sf=False, sf_dtype="uint32", sf_col=False, threads=threads, unroll=unroll,
                  bulk_row_words=words if config.bulk else 0)  # fmt: skip
    buffers = {"x": "x", "token_topk_to_pos": "token_topk_to_pos", "out": "out", "targeted": "targeted", "x_sf": None, "out_sf": None}
    zero_fill = ["targeted"]
    if x_sf is not None:
        sf_dtype = np.uint8 if np.dtype(x_sf.dtype).itemsize == 1 else np.uint32
        col = sf_layout != "row"
        width = x_sf.shape[0] if col else x_sf.shape[1]
        out_shape = (width, F.tma_aligned(p, x_sf.dtype)) if col else (p, width)
        params.update(has_sf=True, sf_dtype=np.dtype(sf_dtype).name, sf_col=col)
        buffers.update(x_sf="x_sf", out_sf="out_sf")
        views.update(x_sf=View(tuple(x_sf.shape), (x_sf.shape[1], 1), dtype=sf_dtype), out_sf=View(out_shape, (out_shape[1], 1), dtype=sf_dtype))
        zero_fill.append("out_sf")
    return Launch(kernel=expand_kernel, params=params, buffers=buffers, views=views, zero_fill=tuple(zero_fill),
                  workspace={"targeted": jax.ShapeDtypeStruct((p,), jnp.int32)})  # fmt: skip


def _kernel_check(x, token_topk_to_pos, pos_to_expert, x_sf=None, *, sf_layout=None):
    name = "expand_to_fused_with_sf" if x_sf is not None else "expand_to_fused"
    row_bytes = x.shape[1] * np.dtype(x.dtype).itemsize
    if row_bytes % 16:
        raise ValueError(f"{name}: the kernel copies 16-byte vectors: a row of x must be a multiple of 16 bytes, got {row_bytes} (use impl='xla')")
    rows = max(x.shape[0], pos_to_expert.shape[0])
    if rows * (row_bytes // 16) > MAX_FLAT or x.shape[0] * token_topk_to_pos.shape[1] > MAX_FLAT:
        raise ValueError(f"{name}: the kernel takes fewer than {MAX_FLAT} 16-byte vectors per call, got {rows} rows of {row_bytes} bytes")


_expand_op = TileOp(
    name="expand_to_fused", launch=_launch, operands=("x", "token_topk_to_pos", "pos_to_expert", "x_sf?"),
    results=lambda *a, **s: ("out",) if a[3] is None else ("out", "out_sf"),
    reference=_expand_reference, kernel_check=_kernel_check, config=_config,
)  # fmt: skip


def _check_mapping(name: str, x, token_topk_to_pos, pos_to_expert) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [T, H] (rank 2), got shape {x.shape}")
    if token_topk_to_pos.ndim != 2 or token_topk_to_pos.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: token_topk_to_pos must be [T, K] with T = {x.shape[0]} (the rows of x), got shape {token_topk_to_pos.shape}")
    if token_topk_to_pos.dtype != jnp.int32:
        raise ValueError(f"{name}: token_topk_to_pos must be int32, got {token_topk_to_pos.dtype}")
    if pos_to_expert.ndim != 1 or pos_to_expert.dtype != jnp.int32:
        raise ValueError(f"{name}: pos_to_expert must be int32 [P], got {pos_to_expert.dtype}{list(pos_to_expert.shape)}")


# ---------------------------------------------------------------------------------------------
# expand_to_fused (differentiable in x).


def _primal(x, token_topk_to_pos, pos_to_expert, *, impl=None, ops):
    return ops[0](x, token_topk_to_pos, pos_to_expert, impl=impl)


def _fwd(x, token_topk_to_pos, pos_to_expert, *, impl=None, ops):
    return _primal(x, token_topk_to_pos, pos_to_expert, impl=impl, ops=ops), (token_topk_to_pos, Static((x.dtype, pos_to_expert.shape)))


def _bwd(residuals, g, *, impl=None, ops):
    from jax_tilek.moe._reduce import reduce_rows

    token_topk_to_pos, static = residuals
    dtype, pte_shape = static.value
    dx = reduce_rows(g, None, token_topk_to_pos, out_dtype=g.dtype, impl=impl).astype(dtype)
    return dx, None, None


_differentiable = with_vjp(_primal, _fwd, _bwd)


def valid_mapping(rng: np.random.Generator, t: int, k: int, e: int, alignment: int, masked: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(token_topk_to_pos, pos_to_expert)`` of a random routing (numpy, TileKernels' layout at capacity)."""
    from jax_tilek.moe._fused_mapping import capacity, random_topk_idx

    idx = random_topk_idx(rng, t, k, e, masked)
    p = capacity(t, k, e, alignment)
    flat = idx.reshape(-1)
    counts = np.bincount(flat[flat >= 0], minlength=e)
    size = -(-counts // alignment) * alignment
    start = np.cumsum(size) - size
    pos = np.full(flat.shape, -1, np.int32)
    pte = np.full((p,), -1, np.int32)
    fill = start.copy()
    for i in np.flatnonzero(flat >= 0):
        pos[i] = fill[flat[i]]
        pte[pos[i]] = flat[i]
        fill[flat[i]] += 1
    return pos.reshape(t, k), pte


def _case(t: int, h: int, k: int, e: int, alignment: int, dtype=jnp.bfloat16, masked: float = 0.1, **options) -> ArgSpec:
    from jax_tilek.moe._fused_mapping import capacity

    p = capacity(t, k, e, alignment)
    args = (jax.ShapeDtypeStruct((t, h), dtype), jax.ShapeDtypeStruct((t, k), jnp.int32), jax.ShapeDtypeStruct((p,), jnp.int32))

    def make(rng, *structs):
        from jax_tilek.testing import random_array

        ttp, pte = valid_mapping(rng, t, k, e, alignment, masked)
        return random_array(rng, (t, h), dtype), ttp, pte

    name = f"{np.dtype(dtype).name}_{t}x{h}_k{k}_e{e}_a{alignment}" + ("_masked" if masked == 1 else "")
    return ArgSpec(name, args, make=make, **options)


ARG_SPECS = (
    _case(17, 576, 6, 16, 16),
    _case(1, 2048, 1, 8, 16, jnp.float32),
    _case(0, 256, 8, 8, 4),
    _case(12, 128, 6, 8, 8, masked=1.0),
    _case(32, 7168, 8, 384, 1),
    _case(77, 512, 4, 8, 16, config=dict(threads=256, unroll=2, bulk=False)),
    _case(33, 576, 6, 16, 16, config=dict(threads=64, unroll=1, bulk=False)),
    _case(9, 16384, 2, 8, 4, config=dict(threads=64)),  # two chunks per row
    _case(0, 1024, 4, 8, 4),
    _case(4096, 7168, 8, 256, 128, bench=True),
    _case(16384, 7168, 8, 256, 128, bench=True),
)


@uses(_expand_op, cases=ARG_SPECS, differentiable=True)
def expand_to_fused(x: jax.Array, token_topk_to_pos: jax.Array, pos_to_expert: jax.Array, *, impl=None, ops) -> jax.Array:
    """Copies each token's row to its positions in the fused layout.

    Args:
      x: ``[T, H]``, any dtype (the kernel needs rows of a multiple of 16 bytes).
      token_topk_to_pos: int32 ``[T, K]``: the positions of token t (-1: none).
      pos_to_expert: int32 ``[P]``; only its length P is used (see the module docstring).

    Returns: ``[P, H]`` of x's dtype: ``out[token_topk_to_pos[t, k]] = x[t]``, every other row zero.
    Differentiable in x (its cotangent is ``reduce_fused`` of the output's, without weights).
    """
    name = "expand_to_fused"
    x, ttp, pte = (checks.as_array(name, n, v) for n, v in (("x", x), ("token_topk_to_pos", token_topk_to_pos), ("pos_to_expert", pos_to_expert)))
    _check_mapping(name, x, ttp, pte)
    return _differentiable(x, ttp, pte, impl=impl, ops=ops)


# ---------------------------------------------------------------------------------------------
# expand_to_fused_with_sf.


def _sf_case(t: int, h: int, npc: int, layout: str, e4m3_sf: bool = False, k: int = 6, e: int = 64, alignment: int = 16, **options) -> ArgSpec:
    from jax_tilek.moe._fused_mapping import capacity

    p = capacity(t, k, e, alignment)
    shape, sf_dtype = F.sf_storage_shape(layout, (t, F.ceil_div(h, npc)), jnp.float8_e4m3fn if e4m3_sf else jnp.float32)
    data = jax.ShapeDtypeStruct((t, h), jnp.float8_e4m3fn)
    args = ((data, jax.ShapeDtypeStruct(shape, sf_dtype)), npc, jax.ShapeDtypeStruct((t, k), jnp.int32), jax.ShapeDtypeStruct((p,), jnp.int32))

    def make(rng, *structs):
        from jax_tilek.testing import random_array

        ttp, pte = valid_mapping(rng, t, k, e, alignment)
        sf = random_array(rng, shape, sf_dtype)
        return (random_array(rng, (t, h), jnp.float8_e4m3fn), sf), npc, ttp, pte

    name = f"{t}x{h}_npc{npc}_{layout}" + ("_e4m3sf" if e4m3_sf else "")
    return ArgSpec(name, args, dict(use_tma_aligned_col_major_sf=layout != "row"), make=make, **options)


SF_ARG_SPECS = (
    _sf_case(17, 576, 128, "row"),
    _sf_case(9, 2048, 32, "col_ue8m0"),
    _sf_case(5, 512, 128, "col"),
    _sf_case(3, 256, 32, "row", e4m3_sf=True),
    _sf_case(0, 512, 128, "col_ue8m0"),
    _sf_case(4096, 7168, 128, "col_ue8m0", e=256, alignment=128, bench=True),
)


@uses(_expand_op, cases=SF_ARG_SPECS)
def expand_to_fused_with_sf(
    x: tuple[jax.Array, jax.Array],
    num_per_channels: int,
    token_topk_to_pos: jax.Array,
    pos_to_expert: jax.Array,
    use_tma_aligned_col_major_sf: bool = False,
    *,
    impl=None,
    ops,
) -> tuple[jax.Array, jax.Array]:
    """Expands a per-token-quantized tensor and its scales into the fused layout.

    Args:
      x: ``(data, sf)`` as ``jax_tilek.quant.per_token_cast`` returns it: data ``[T, H]`` (float8_e4m3fn,
        packed FP4 uint8 ``[T, H/2]``, any dtype); sf in the layout the flags name
        (``formats.sf_storage_shape`` with ``K_b = ceil(H / num_per_channels)`` blocks): row-major fp32 or
        float8_e4m3fn ``[T, K_b]`` (or int32 packed UE8M0 ``[T, ceil(K_b/4)]``) without the flag;
        TMA-aligned column-major ``[K_b, align(T, 16 / sf_bytes)]`` (fp32, float8_e4m3fn) or packed UE8M0
        int32 ``[ceil(K_b/4), align(T, 4)]`` with it.
      num_per_channels: the scale block width (32 or 128 in TileKernels; 16 ... 128 or H here).
      token_topk_to_pos, pos_to_expert: as for :func:`expand_to_fused`.
      use_tma_aligned_col_major_sf: the scale layout of input and output (jax_tilek returns column-major
        scales as their storage arrays; TileKernels takes a row-major input and makes the output column-major).

    Returns:
      ``(data[P, ...], sf)`` with sf in the same layout for P rows (column-major storage padded to
      ``align(P, 16 / sf_bytes)`` columns); rows (columns) no slot targets are zero.
    """
    name = "expand_to_fused_with_sf"
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"{name}: x must be a (data, sf) pair, got {type(x).__name__}")
    data, sf = (checks.as_array(name, n, v) for n, v in (("x data", x[0]), ("x sf", x[1])))
    ttp, pte = (checks.as_array(name, n, v) for n, v in (("token_topk_to_pos", token_topk_to_pos), ("pos_to_expert", pos_to_expert)))
    col = checks.static_bool(name, "use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf)
    _check_mapping(name, data, ttp, pte)
    npc = checks.static_int(name, "num_per_channels", num_per_channels)
    if npc < 1:
        raise ValueError(f"{name}: num_per_channels must be positive, got {npc}")
    t = data.shape[0]
    if sf.ndim != 2:
        raise ValueError(f"{name}: the scales must be a 2-D storage array, got shape {sf.shape}")
    if sf.dtype == jnp.int32:
        layout = "col_ue8m0" if col else "row"
    elif sf.dtype in (jnp.float32, jnp.float8_e4m3fn):
        layout = "col" if col else "row"
    else:
        raise ValueError(f"{name}: the scales must be float32, float8_e4m3fn or int32 (packed UE8M0), got {sf.dtype}")
    if layout == "row":
        if sf.shape[0] != t:
            raise ValueError(f"{name}: row-major scales must have T = {t} rows, got shape {sf.shape}")
    else:
        expected = F.tma_aligned(t, sf.dtype)
        if sf.shape[1] != expected:
            raise ValueError(f"{name}: column-major scale storage must have align(T, {F.tma_alignment(sf.dtype)}) = {expected} columns, got shape {sf.shape}")
    # The block count the scales hold: K_b blocks of npc values, packed 4 per word for UE8M0.
    values = data.shape[1] * (2 if data.dtype == jnp.uint8 else 1)  # packed FP4 holds two values per byte
    k_b = F.ceil_div(values, npc)
    width = sf.shape[0] if layout != "row" else sf.shape[1]
    want = F.ceil_div(k_b, 4) if sf.dtype == jnp.int32 else k_b
    if width != want:
        raise ValueError(f"{name}: the scales hold {width} entries per token, but ceil(H / num_per_channels) = {k_b} blocks need {want}")
    return ops[0](data, ttp, pte, sf, impl=impl, sf_layout=layout)
