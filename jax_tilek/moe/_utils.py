"""MoE routing utilities (TileKernels v1 §1.4-1.8, v2.1 §2.2): ``normalize_weight``, ``aux_fi``,
``group_count``, ``mask_indices_by_tp`` and ``unique_group_indices`` (the functional form of
``inplace_unique_group_indices``).

Index arrays are int32 (or int64 with ``jax_enable_x64``) ``[T, K]``; ``-1`` marks an empty slot.
Every kernel here is deterministic and independent of the GPU's SM count: histograms add integers,
and the per-row ops give each row to one thread.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, uses
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True}
THREADS = 128
MAX_TOPK = 32  # per-row kernels keep a row in registers
MAX_BINS = 4096  # histogram bins held in shared memory
INDEX_DTYPES = (jnp.int32, jnp.int64)
EPS = 1e-20  # normalize_weight's and the gates' denominator floor


def _index_array(op: str, name: str, value, *, ndim: int | None = 2) -> jax.Array:
    a = checks.as_array(op, name, value)
    if a.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: {name} must be int32 or int64, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be [T, K] (rank 2), got shape {a.shape}")
    return a


def _kernel_topk(op: str, k: int) -> None:
    if k > MAX_TOPK:
        raise ValueError(f"{op}: the kernel takes at most {MAX_TOPK} top-k slots per row, got {k} (use impl='xla')")


def _tokens(op: str, count: int) -> None:
    if count >= 2**31 - 2**16:
        raise ValueError(f"{op}: the kernel takes fewer than 2^31 - 2^16 elements, got {count} (use impl='xla')")


# ---------------------------------------------------------------------------------------------
# normalize_weight


def butterfly_sum(w: jax.Array) -> jax.Array:
    """The sum over the last axis (K <= 32) in the order of TileKernels 2.1's warp reduction: for
    masks 16, 8, 4, 2, 1, slot ``j`` (with ``j & mask == 0`` and ``j ^ mask < K``) adds slot
    ``j ^ mask``; the sum is slot 0. fp32, one rounding per addition."""
    k = w.shape[-1]
    s = [w[..., j] for j in range(k)]
    for mask in (16, 8, 4, 2, 1):
        s = [s[j] + s[j ^ mask] if (j & mask) == 0 and (j ^ mask) < k else s[j] for j in range(k)]
    return s[0] if k else jnp.zeros(w.shape[:-1], w.dtype)


def _normalize_weight_reference(topk_weights):
    denominator = jnp.float32(EPS) + butterfly_sum(topk_weights)
    return denominator, F.exact_div(topk_weights, denominator[:, None])


@kernel(pass_configs=PASS_CONFIGS)
def normalize_weight_kernel(num_topk: int):
    """One row per thread, 128 rows per CTA: the butterfly sum of :func:`butterfly_sum`, then IEEE divisions."""
    import tilelang.language as T

    N = T.dynamic("N")
    dst = tuple(j for m in (16, 8, 4, 2, 1) for j in range(num_topk) if (j & m) == 0 and (j ^ m) < num_topk)
    src = tuple(j ^ m for m in (16, 8, 4, 2, 1) for j in range(num_topk) if (j & m) == 0 and (j ^ m) < num_topk)

    @T.prim_func
    def normalize_weight(
        topk_weights: T.Tensor((N, num_topk), "float32"),
        denominator: T.Tensor((N,), "float32"),
        normalized: T.Tensor((N, num_topk), "float32"),
    ):
        with T.Kernel(T.ceildiv(N, THREADS), threads=THREADS) as b:
            w = T.alloc_local((num_topk,), "float32")
            s = T.alloc_local((num_topk,), "float32")
            d = T.alloc_var("float32")
            row = b * THREADS + T.get_thread_binding(0)
            if row < N:
                for j in T.unroll(num_topk):
                    w[j] = topk_weights[row, j]
                    s[j] = w[j]
                for q in device.static_range(len(dst)):
                    s[dst[q]] = T.ieee_add(s[dst[q]], s[src[q]])
                d = T.ieee_add(T.float32(EPS), s[0])
                denominator[row] = d
                for j in T.unroll(num_topk):
                    normalized[row, j] = T.ieee_fdiv(w[j], d)

    return normalize_weight


def _normalize_weight_check(topk_weights):
    name = "normalize_weight"
    if topk_weights.ndim != 2:
        raise ValueError(f"{name}: topk_weights must be [T, K] (rank 2), got shape {topk_weights.shape}")
    if topk_weights.dtype != jnp.float32:
        raise ValueError(f"{name}: topk_weights must be float32, got {topk_weights.dtype}")
    if topk_weights.shape[1] > MAX_TOPK:
        raise ValueError(f"{name}: topk_weights may have at most {MAX_TOPK} columns (one warp per token), got {topk_weights.shape[1]}")


def _normalize_weight_kernel_check(topk_weights):
    _tokens("normalize_weight", topk_weights.shape[0])
    if topk_weights.shape[1] == 0:
        raise ValueError("normalize_weight: the kernel needs K >= 1 (use impl='xla')")


_normalize_weight_op = TileOp(
    name="normalize_weight",
    launch=lambda w: Launch(kernel=normalize_weight_kernel, params=dict(num_topk=w.shape[1])),
    operands=("topk_weights",), results=("denominator", "normalized"), reference=_normalize_weight_reference,
    check=_normalize_weight_check, kernel_check=_normalize_weight_kernel_check,
    rows=Rows(("topk_weights",), ("denominator", "normalized")),
)  # fmt: skip


def _weights_case(t: int, k: int, **options) -> ArgSpec:
    return ArgSpec(f"{t}x{k}", (jax.ShapeDtypeStruct((t, k), jnp.float32),), make=lambda rng, s: (rng.random(s.shape, np.float32),), **options)


NORMALIZE_WEIGHT_SPECS = (_weights_case(8, 8), _weights_case(1, 1), _weights_case(0, 6), _weights_case(16, 6), _weights_case(65536, 8, bench=True))  # K = 1, 6, 8


@uses(_normalize_weight_op, cases=NORMALIZE_WEIGHT_SPECS)
def normalize_weight(topk_weights: jax.Array, *, impl=None, ops) -> tuple[jax.Array, jax.Array]:
    """Normalizes each token's top-k weights to sum to one (TileKernels 2.1 semantics).

    Args:
      topk_weights: float32 ``[T, K]``, K <= 32.

    Returns:
      ``(denominator, normalized)``: float32 ``[T]`` ``1e-20 + Σ_k w_k`` (summed in the gate's butterfly
      order, :func:`butterfly_sum`; ``1e-20`` added last) and float32 ``[T, K]`` ``w / denominator``
      (IEEE division).
    """
    w = checks.as_array("normalize_weight", "topk_weights", topk_weights)
    return ops[0](w, impl=impl)


# ---------------------------------------------------------------------------------------------
# Histograms: group_count and aux_fi


def _histogram(idx: jax.Array, bins: int) -> jax.Array:
    """int32 ``[bins]``: how many entries of ``idx`` equal each bin (entries outside [0, bins) are ignored)."""
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < bins)
    return jnp.zeros((bins + 1,), jnp.int32).at[jnp.where(valid, flat, bins).astype(jnp.int32)].add(1)[:bins]


def _aux_fi_scale(num_tokens: int, num_experts: int, num_aux_topk: int) -> tuple[np.float32, np.float32]:
    """(E, T · num_aux_topk) as fp32, as TileKernels' reference rounds them."""
    return np.float32(num_experts), np.float32(num_tokens * num_aux_topk)


def _count_reference(idx, *, bins, mode, num_aux_topk=1):
    counts = _histogram(idx, bins)
    if mode == "count":
        return counts
    e, d = _aux_fi_scale(idx.shape[0], bins, num_aux_topk)
    if idx.shape[0] == 0:
        return jnp.zeros((bins,), jnp.float32)
    return F.exact_div(counts.astype(jnp.float32) * e, d)


@kernel(pass_configs=PASS_CONFIGS)
def histogram_kernel(idx_dtype: str, mode: str):
    """Kernel 1: CTA ``b`` counts entries ``[b·4096, (b+1)·4096)`` into a shared histogram (integer
    atomics), then adds it to the zero-filled global counts. For ``mode="aux_fi"`` a second kernel
    (one CTA) turns counts into ``count · E / (T · num_aux_topk)`` in fp32 (``e``, ``d`` scalars)."""
    import tilelang.language as T

    NE, bins = T.dynamic("NE, bins")
    chunk = THREADS * 32

    @T.prim_func
    def histogram(
        idx: T.Tensor((NE,), idx_dtype),
        counts: T.Tensor((bins,), "int32"),
        out: T.Tensor((bins,), "float32"),
        e: T.float32,
        d: T.float32,
    ):
        with T.Kernel(T.ceildiv(NE, chunk), threads=THREADS) as b:
            hist = T.alloc_shared((MAX_BINS,), "int32")
            t = T.get_thread_binding(0)
            for r in T.serial(T.ceildiv(bins, THREADS)):
                if r * THREADS + t < bins:
                    hist[r * THREADS + t] = 0
            T.sync_threads()
            for r in T.unroll(chunk // THREADS):
                i = b * chunk + r * THREADS + t
                if i < NE:
                    v = idx[i]
                    if T.And(v >= 0, v < bins):
                        T.atomic_add(hist[T.Cast("int32", v)], 1)
            T.sync_threads()
            for r in T.serial(T.ceildiv(bins, THREADS)):
                j = r * THREADS + t
                if j < bins:
                    if hist[j] != 0:
                        T.atomic_add(counts[j], hist[j])

        if mode == "aux_fi":
            with T.Kernel(T.ceildiv(bins, THREADS), threads=THREADS) as c:
                j = c * THREADS + T.get_thread_binding(0)
                if j < bins:
                    out[j] = T.ieee_fdiv(T.ieee_mul(T.Cast("float32", counts[j]), e), d)

    return histogram


def _histogram_launch(idx, *, bins, mode, num_aux_topk=1) -> Launch:
    from jax_tilek.op import View

    t = idx.shape[0]
    e, d = _aux_fi_scale(t, bins, num_aux_topk) if t else (np.float32(bins), np.float32(1))  # T = 0: zeros
    params = dict(idx_dtype=np.dtype(idx.dtype).name, mode=mode)
    views = {"idx": View((int(np.prod(idx.shape)),))}
    if mode == "count":
        return Launch(kernel=histogram_kernel, params=params, buffers={"idx": 0, "counts": "counts", "out": None},
                      views=views, scalars=dict(e=float(e), d=float(d)), zero_fill=("counts",))  # fmt: skip
    return Launch(kernel=histogram_kernel, params=params, buffers={"idx": 0, "counts": "counts", "out": "fi"}, views=views,
                  scalars=dict(e=float(e), d=float(d)), workspace={"counts": jax.ShapeDtypeStruct((bins,), jnp.int32)},
                  zero_fill=("counts",))  # fmt: skip


def _histogram_kernel_check(idx, *, bins, mode, num_aux_topk=1):
    _tokens(mode, int(np.prod(idx.shape)))
    if bins > MAX_BINS:
        raise ValueError(f"{'group_count' if mode == 'count' else 'aux_fi'}: the kernel takes at most {MAX_BINS} bins, got {bins} (use impl='xla')")


_group_count_op = TileOp(
    name="group_count", launch=_histogram_launch, operands=("group_idx",), results=("counts",), reference=_count_reference,
    kernel_check=_histogram_kernel_check,
)  # fmt: skip
_aux_fi_op = TileOp(
    name="aux_fi", launch=_histogram_launch, operands=("topk_idx",), results=("fi",), reference=_count_reference,
    kernel_check=_histogram_kernel_check,
)  # fmt: skip


def random_topk_idx(rng: np.random.Generator, t: int, k: int, e: int, masked: float = 0.1, dtype=np.int32) -> np.ndarray:
    """TileKernels-style routing: K distinct experts per token (ascending), a fraction of slots -1."""
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :k] if t else np.zeros((0, k), np.int64)
    idx = np.where(rng.random((t, k)) < masked, -1, idx)
    return idx.astype(dtype)


def _idx_case(name: str, t: int, k: int, e: int, kwargs: dict, masked: float = 0.1, **options) -> ArgSpec:
    return ArgSpec(name, (jax.ShapeDtypeStruct((t, k), jnp.int32),), kwargs, make=lambda rng, s: (random_topk_idx(rng, t, k, e, masked),), **options)


GROUP_COUNT_SPECS = (
    _idx_case("8x4_g8", 8, 4, 8, dict(num_groups=8)),
    _idx_case("1x1_g16", 1, 1, 16, dict(num_groups=16)),
    _idx_case("0x4_g8", 0, 4, 8, dict(num_groups=8)),
    _idx_case("33x8_g72_masked", 33, 8, 72, dict(num_groups=72), masked=1.0),
    _idx_case("bench_65536x8_g256", 65536, 8, 256, dict(num_groups=256), bench=True),
)


@uses(_group_count_op, cases=GROUP_COUNT_SPECS)
def group_count(group_idx: jax.Array, num_groups: int, *, impl=None, ops) -> jax.Array:
    """How many entries of ``group_idx`` (int32/int64, any shape) fall in each group.

    Returns int32 ``[num_groups]``; negative entries (and entries >= num_groups) are ignored. Exact.
    """
    name = "group_count"
    idx = _index_array(name, "group_idx", group_idx, ndim=None)
    bins = checks.static_int(name, "num_groups", num_groups)
    if bins < 1:
        raise ValueError(f"{name}: num_groups must be positive, got {bins}")
    return ops[0](idx, impl=impl, bins=bins, mode="count")


AUX_FI_SPECS = (
    _idx_case("8x6_e64_aux6", 8, 6, 64, dict(num_experts=64, num_aux_topk=6)),
    _idx_case("16x8_e384_aux1", 16, 8, 384, dict(num_experts=384, num_aux_topk=1)),
    _idx_case("1x1_e8", 1, 1, 8, dict(num_experts=8, num_aux_topk=1)),
    _idx_case("0x8_e256", 0, 8, 256, dict(num_experts=256, num_aux_topk=8)),
    _idx_case("bench_65536x8_e256", 65536, 8, 256, dict(num_experts=256, num_aux_topk=8), bench=True),
)


@uses(_aux_fi_op, cases=AUX_FI_SPECS)
def aux_fi(topk_idx: jax.Array, num_experts: int, num_aux_topk: int, *, impl=None, ops) -> jax.Array:
    """The load-balancing frequency of each expert: ``f[e] = count(topk_idx == e) · E / (T · num_aux_topk)``.

    Args:
      topk_idx: int32/int64 ``[T, K]``; entries outside [0, E) (the -1 slots) are ignored.
      num_experts, num_aux_topk: static positive ints.

    Returns float32 ``[E]``, computed as TileKernels' reference rounds it: ``fl(fl(count · E) / fl(T · n))``
    (deterministic: the counts are exact integers); zeros for T = 0.
    """
    name = "aux_fi"
    idx = _index_array(name, "topk_idx", topk_idx)
    e = checks.static_int(name, "num_experts", num_experts)
    n = checks.static_int(name, "num_aux_topk", num_aux_topk)
    if e < 1 or n < 1:
        raise ValueError(f"{name}: num_experts and num_aux_topk must be positive, got {e} and {n}")
    return ops[0](idx, impl=impl, bins=e, mode="aux_fi", num_aux_topk=n)


# ---------------------------------------------------------------------------------------------
# mask_indices_by_tp


def _mask_reference(indices, *, per_gpu, tp_rank, num_tp_ranks):
    per_dp = num_tp_ranks * per_gpu
    v = indices
    invalid = (v < 0) | ((v // per_gpu) % num_tp_ranks != tp_rank)
    v = v - tp_rank * per_gpu
    v = v - (v // per_dp) * (per_dp - per_gpu)
    return jnp.where(invalid | (v < 0), jnp.asarray(-1, v.dtype), v)


@kernel(pass_configs=PASS_CONFIGS)
def mask_indices_kernel(idx_dtype: str):
    """One element per thread (indices as a flat array); ``per_gpu``, ``tp_rank``, ``num_tp`` are scalars.
    Truncating division equals the reference's floor division: negative indices are filtered first."""
    import tilelang.language as T

    NE = T.dynamic("NE")

    @T.prim_func
    def mask_indices_by_tp(
        indices: T.Tensor((NE,), idx_dtype), out: T.Tensor((NE,), idx_dtype), per_gpu: T.int32, tp_rank: T.int32, num_tp: T.int32
    ):
        with T.Kernel(T.ceildiv(NE, THREADS), threads=THREADS) as b:
            i = b * THREADS + T.get_thread_binding(0)
            if i < NE:
                v = indices[i]
                g = T.Cast(idx_dtype, per_gpu)
                keep = T.And(v >= 0, (v // g) % T.Cast(idx_dtype, num_tp) == T.Cast(idx_dtype, tp_rank))
                local = v - T.Cast(idx_dtype, tp_rank) * g
                dp = g * T.Cast(idx_dtype, num_tp)
                renumbered = local - (local // dp) * (dp - g)
                out[i] = T.if_then_else(T.And(keep, renumbered >= 0), renumbered, T.Cast(idx_dtype, -1))

    return mask_indices_by_tp


def _mask_launch(indices, *, per_gpu, tp_rank, num_tp_ranks) -> Launch:
    from jax_tilek.op import View

    n = int(np.prod(indices.shape))
    return Launch(kernel=mask_indices_kernel, params=dict(idx_dtype=np.dtype(indices.dtype).name),
                  views={"indices": View((n,)), "out": View((n,))},
                  scalars=dict(per_gpu=per_gpu, tp_rank=tp_rank, num_tp=num_tp_ranks))  # fmt: skip


_mask_op = TileOp(
    name="mask_indices_by_tp", launch=_mask_launch, operands=("indices",), results=("out",), reference=_mask_reference,
    kernel_check=lambda i, **_: _tokens("mask_indices_by_tp", int(np.prod(i.shape))),
    rows=lambda i, **_: Rows(("indices",), ("out",)) if i.ndim >= 1 else None,
)  # fmt: skip


def _mask_case(name, t, k, n, ep, tp_rank, tp, **options) -> ArgSpec:
    return _idx_case(name, t, k, n, dict(n=n, num_ep_ranks=ep, tp_rank=tp_rank, num_tp_ranks=tp), **options)


MASK_SPECS = (
    _mask_case("8x8_n256_ep8_tp2_r1", 8, 8, 256, 8, 1, 2),
    _mask_case("16x6_n288_ep8_tp4_r3", 16, 6, 288, 8, 3, 4),
    _mask_case("1x1_n64_ep8_tp8_r0", 1, 1, 64, 8, 0, 8),
    _mask_case("0x8_n256_ep8_tp2_r0", 0, 8, 256, 8, 0, 2),
    _mask_case("bench_65536x8_n256_ep8_tp2", 65536, 8, 256, 8, 1, 2, bench=True),
)


@uses(_mask_op, cases=MASK_SPECS)
def mask_indices_by_tp(indices: jax.Array, n: int, num_ep_ranks: int, tp_rank: int, num_tp_ranks: int, *, impl=None, ops) -> jax.Array:
    """Keeps the expert indices of one TP rank, renumbered locally (TileKernels v1 §1.7).

    With ``per_gpu = n // num_ep_ranks`` and ``per_dp = num_tp_ranks · per_gpu``: an index ``v < 0`` or with
    ``(v // per_gpu) % num_tp_ranks != tp_rank`` becomes -1; otherwise ``v' = v - tp_rank · per_gpu``,
    ``v' -= (v' // per_dp) · (per_dp - per_gpu)`` (-1 if negative): the index among the experts of the EP
    ranks with ``rank % num_tp_ranks == tp_rank``, in DP-group order.

    Args:
      indices: int32/int64, any shape. n, num_ep_ranks, tp_rank, num_tp_ranks: static ints.

    Returns: the same shape and dtype.
    """
    name = "mask_indices_by_tp"
    idx = _index_array(name, "indices", indices, ndim=None)
    n, ep, rank, tp = (checks.static_int(name, a, v) for a, v in (("n", n), ("num_ep_ranks", num_ep_ranks), ("tp_rank", tp_rank), ("num_tp_ranks", num_tp_ranks)))
    if ep < 1 or tp < 1:
        raise ValueError(f"{name}: num_ep_ranks and num_tp_ranks must be positive, got {ep} and {tp}")
    if n < ep:
        raise ValueError(f"{name}: n must be at least num_ep_ranks ({ep}) so that each rank has an expert, got {n}")
    if not 0 <= rank < tp:
        raise ValueError(f"{name}: tp_rank must be in [0, num_tp_ranks = {tp}), got {rank}")
    if n * tp >= 2**31:
        raise ValueError(f"{name}: n · num_tp_ranks must be below 2^31, got {n * tp}")
    return ops[0](idx, impl=impl, per_gpu=n // ep, tp_rank=rank, num_tp_ranks=tp)


# ---------------------------------------------------------------------------------------------
# unique_group_indices


def _unique_reference(group_indices, *, num_groups):
    k = group_indices.shape[1]
    g = group_indices
    dup = jnp.zeros(g.shape, bool)
    for j in range(1, k):
        dup = dup.at[:, j].set(jnp.any(g[:, :j] == g[:, j : j + 1], axis=1))
    return jnp.where(dup & (g >= 0), jnp.asarray(-1, g.dtype), g)


@kernel(pass_configs=PASS_CONFIGS)
def unique_group_indices_kernel(num_topk: int, idx_dtype: str):
    """One row per thread: entry ``j`` becomes -1 when an earlier entry of the row equals it (K(K-1)/2
    comparisons, so any index value works, not only those below 128 as in TileKernels' bit set)."""
    import tilelang.language as T

    N = T.dynamic("N")

    @T.prim_func
    def unique_group_indices(group_indices: T.Tensor((N, num_topk), idx_dtype), out: T.Tensor((N, num_topk), idx_dtype)):
        with T.Kernel(T.ceildiv(N, THREADS), threads=THREADS) as b:
            g = T.alloc_local((num_topk,), idx_dtype)
            seen = T.alloc_var("int32")
            row = b * THREADS + T.get_thread_binding(0)
            if row < N:
                for j in T.unroll(num_topk):
                    g[j] = group_indices[row, j]
                for j in device.static_range(num_topk):
                    seen = 0
                    for i in device.static_range(j):
                        if g[i] == g[j]:
                            seen = 1
                    out[row, j] = T.if_then_else(T.And(seen == 1, g[j] >= 0), T.Cast(idx_dtype, -1), g[j])

    return unique_group_indices


_unique_op = TileOp(
    name="unique_group_indices",
    launch=lambda g, *, num_groups: Launch(kernel=unique_group_indices_kernel, params=dict(num_topk=g.shape[1], idx_dtype=np.dtype(g.dtype).name)),
    operands=("group_indices",), results=("out",), reference=_unique_reference,
    kernel_check=lambda g, **_: (_kernel_topk("unique_group_indices", g.shape[1]), _tokens("unique_group_indices", g.shape[0])),
    rows=Rows(("group_indices",), ("out",)),
)  # fmt: skip


def _groups_of_topk(rng, t, k, e, groups):
    idx = random_topk_idx(rng, t, k, e)
    return (np.where(idx >= 0, idx // (e // groups), -1).astype(np.int32),)


def _unique_case(name, t, k, e, groups, **options) -> ArgSpec:
    return ArgSpec(name, (jax.ShapeDtypeStruct((t, k), jnp.int32),), dict(num_groups=groups),
                   make=lambda rng, s: _groups_of_topk(rng, t, k, e, groups), **options)  # fmt: skip


UNIQUE_SPECS = (
    _unique_case("8x8_e256_g8", 8, 8, 256, 8),
    _unique_case("16x8_e72_g72", 16, 8, 72, 72),
    _unique_case("1x1_e16_g16", 1, 1, 16, 16),
    _unique_case("0x8_e256_g16", 0, 8, 256, 16),
    _unique_case("bench_65536x8_e256_g8", 65536, 8, 256, 8, bench=True),
)


@uses(_unique_op, cases=UNIQUE_SPECS)
def unique_group_indices(group_indices: jax.Array, num_groups: int, *, impl=None, ops) -> jax.Array:
    """The functional form of TileKernels' ``inplace_unique_group_indices``: in each row, every later
    duplicate of a non-negative group index becomes -1 (the first occurrence stays); negative entries
    stay as they are.

    Args:
      group_indices: int32/int64 ``[T, K]`` (K <= 32 on the kernel path).
      num_groups: static positive int (<= 128, TileKernels' rule; the result does not depend on it).

    Returns: the deduplicated indices, same shape and dtype.
    """
    name = "unique_group_indices"
    g = _index_array(name, "group_indices", group_indices)
    groups = checks.static_int(name, "num_groups", num_groups)
    if not 1 <= groups <= 128:
        raise ValueError(f"{name}: num_groups must be in [1, 128], got {groups}")
    return ops[0](g, impl=impl, num_groups=groups)
