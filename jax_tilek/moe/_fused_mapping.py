"""get_fused_mapping: the expert-major ("fused") layout of routed tokens (TileKernels v1 §1.9).

Every (token, k) pair routed to expert e gets a row ("position") in e's segment; segments are
contiguous, in expert order, each padded to a multiple of ``alignment`` rows. JAX needs static shapes,
so the position arrays have a static capacity P (TileKernels' upper bound, or the caller's
``num_expanded_tokens``); rows past the real total are padding (-1), and the real total comes back as
an int32 array (TileKernels syncs with the host to trim; jax_tilek never does).

Order within a segment: ascending flat index ``t·K + k`` (token order). TileKernels' kernel leaves it
to its grid (it depends on the SM count; its test checks only consistency); this order is the one a
stable sort gives, so the kernel here follows it exactly and does not depend on the GPU. Real rows
come first in each segment, its padding last, as in TileKernels.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, View, uses
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec

PASS_CONFIGS = {"tl.disable_warp_specialized": True}
MAX_EXPERTS = 1024
THREADS = 256
WARPS = THREADS // 32
WARP_ITEMS = 512  # entries per warp: 16 rounds of 32
CHUNK = WARPS * WARP_ITEMS  # entries per CTA
MAX_ENTRIES = 2**31 - 2 * CHUNK  # int32 flat indices

RESULTS = ("pos_to_expert", "pos_to_token", "pos_to_token_topk", "token_topk_to_pos", "expert_start", "expert_end",
           "num_tokens_per_expert", "num_expanded_tokens")  # fmt: skip


def capacity(num_tokens: int, num_topk: int, num_experts: int, alignment: int) -> int:
    """TileKernels' static bound on the aligned total: ``(T·K + (alignment−1)·E) // alignment · alignment``
    (each segment adds at most ``alignment − 1`` padding rows, and the total is a multiple of ``alignment``)."""
    return (num_tokens * num_topk + (alignment - 1) * num_experts) // alignment * alignment


def _reference(topk_idx, *, num_experts, num_expanded_tokens, alignment):
    t, k = topk_idx.shape
    n, e, p = t * k, num_experts, num_expanded_tokens
    flat = topk_idx.reshape(n)
    valid = (flat >= 0) & (flat < e)
    expert = jnp.where(valid, flat, e).astype(jnp.int32)  # invalid entries sort last, into bin E
    counts = jnp.zeros((e + 1,), jnp.int32).at[expert].add(1)
    aligned = (counts[:e] + (alignment - 1)) // alignment * alignment
    end = jnp.cumsum(aligned, dtype=jnp.int32)
    start = end - aligned
    first = jnp.cumsum(counts, dtype=jnp.int32) - counts  # where each expert's entries start in sorted order
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)
    sorted_expert = expert[order]
    pos_sorted = jnp.concatenate([start, jnp.zeros((1,), jnp.int32)])[sorted_expert] + jnp.arange(n, dtype=jnp.int32) - first[sorted_expert]
    pos = jnp.zeros((n,), jnp.int32).at[order].set(pos_sorted)
    pos = jnp.where(valid & (pos < p), pos, -1)
    target = jnp.where(pos >= 0, pos, p)
    arange = jnp.arange(n, dtype=jnp.int32)

    def scatter(values):
        return jnp.full((p,), -1, jnp.int32).at[target].set(values, mode="drop")

    return (scatter(expert), scatter(arange // k if k else arange), scatter(arange), pos.reshape(t, k),
            start, end, aligned, jnp.sum(aligned, dtype=jnp.int32))  # fmt: skip


@kernel(pass_configs=PASS_CONFIGS)
def fused_mapping_kernel(num_experts: int, idx_dtype: str):
    """Three kernels, no grid-wide barrier (so nothing depends on the SM count):

    1. CTA ``b`` (entries ``[b·CHUNK, (b+1)·CHUNK)``) counts its entries per expert (shared integer
       atomics) into ``offsets[b, e]``, and fills a grid-strided share of the position arrays with -1.
    2. One CTA: each thread sums one expert's counts over the CTAs of kernel 1, aligns the total, and
       the CTA scans the aligned totals (Hillis-Steele in shared memory) into the segment starts; each
       thread then turns its expert's column of ``offsets`` into exclusive prefixes (the first row of
       each CTA's entries of that expert).
    3. CTA ``b`` again: warp ``w`` owns ``WARP_ITEMS`` consecutive entries; per-warp counts (shared
       atomics) and an exclusive scan over the warps give each warp's first row per expert; then each
       warp walks its entries 32 at a time in order, ranks equal experts among the lanes
       (``__match_any_sync`` and ``__popc`` of the lower lanes) and advances the expert's row by the
       group's size (written by the group's highest lane after a warp barrier).
    """
    import tilelang.language as T

    E = num_experts
    NE = T.dynamic("NE")  # T·K entries
    P = T.dynamic("P")
    NB = T.dynamic("NB")  # CTAs of kernels 1 and 3: max(1, ceil(NE / CHUNK))
    scan_threads = max(32, 1 << (E - 1).bit_length())
    expert_rounds = F.ceil_div(E, THREADS)

    @T.prim_func
    def get_fused_mapping(
        topk_idx: T.Tensor((NE,), idx_dtype),
        pos_to_expert: T.Tensor((P,), "int32"),
        pos_to_token: T.Tensor((P,), "int32"),
        pos_to_token_topk: T.Tensor((P,), "int32"),
        token_topk_to_pos: T.Tensor((NE,), "int32"),
        expert_start: T.Tensor((E,), "int32"),
        expert_end: T.Tensor((E,), "int32"),
        num_tokens_per_expert: T.Tensor((E,), "int32"),
        num_expanded_tokens: T.Tensor((1,), "int32"),
        offsets: T.Tensor((NB, E), "int32"),
        num_topk: T.int32,
        alignment: T.int32,
    ):
        with T.Kernel(NB, threads=THREADS) as b:
            hist = T.alloc_shared((E,), "int32")
            t = T.get_thread_binding(0)
            for r in T.unroll(expert_rounds):
                if r * THREADS + t < E:
                    hist[r * THREADS + t] = 0
            for r in T.serial(T.ceildiv(P, NB * THREADS)):
                p = (r * NB + b) * THREADS + t
                if p < P:
                    pos_to_expert[p] = -1
                    pos_to_token[p] = -1
                    pos_to_token_topk[p] = -1
            T.sync_threads()
            for r in T.unroll(CHUNK // THREADS):
                i = b * CHUNK + r * THREADS + t
                if i < NE:
                    v = topk_idx[i]
                    if T.And(v >= 0, v < E):
                        T.atomic_add(hist[T.Cast("int32", v)], 1)
            T.sync_threads()
            for r in T.unroll(expert_rounds):
                if r * THREADS + t < E:
                    offsets[b, r * THREADS + t] = hist[r * THREADS + t]

        with T.Kernel(1, threads=scan_threads):
            scan = T.alloc_shared((scan_threads,), "int32")
            count = T.alloc_var("int32")
            size = T.alloc_var("int32")
            other = T.alloc_var("int32")
            row = T.alloc_var("int32")
            c = T.alloc_var("int32")
            t = T.get_thread_binding(0)
            count = 0
            if t < E:
                for q in T.serial(NB):
                    count = count + offsets[q, t]
            size = (count + (alignment - 1)) // alignment * alignment
            scan[t] = size
            T.sync_threads()
            for s in T.unroll((scan_threads - 1).bit_length()):
                other = 0
                if t >= (1 << s):
                    other = scan[t - (1 << s)]
                T.sync_threads()
                scan[t] = scan[t] + other
                T.sync_threads()
            if t < E:
                expert_start[t] = scan[t] - size
                expert_end[t] = scan[t]
                num_tokens_per_expert[t] = size
                row = scan[t] - size
                for q in T.serial(NB):
                    c = offsets[q, t]
                    offsets[q, t] = row
                    row = row + c
            if t == scan_threads - 1:
                num_expanded_tokens[0] = scan[t]

        with T.Kernel(NB, threads=THREADS) as b:
            rows = T.alloc_shared((WARPS, E), "int32")
            run = T.alloc_var("int32")
            c = T.alloc_var("int32")
            e = T.alloc_var("int32")
            pos = T.alloc_var("int32")
            t = T.get_thread_binding(0)
            w = t // 32
            lane = t % 32
            for r in T.unroll(F.ceil_div(WARPS * E, THREADS)):
                if r * THREADS + t < WARPS * E:
                    rows[(r * THREADS + t) // E, (r * THREADS + t) % E] = 0
            T.sync_threads()
            for r in T.unroll(WARP_ITEMS // 32):
                i = b * CHUNK + w * WARP_ITEMS + r * 32 + lane
                if i < NE:
                    v = topk_idx[i]
                    if T.And(v >= 0, v < E):
                        T.atomic_add(rows[w, T.Cast("int32", v)], 1)
            T.sync_threads()
            for r in T.unroll(expert_rounds):
                if r * THREADS + t < E:
                    run = offsets[b, r * THREADS + t]
                    for q in T.unroll(WARPS):
                        c = rows[q, r * THREADS + t]
                        rows[q, r * THREADS + t] = run
                        run = run + c
            T.sync_threads()
            below = (T.uint32(1) << T.Cast("uint32", lane)) - T.uint32(1)
            for r in T.serial(WARP_ITEMS // 32):
                i = b * CHUNK + w * WARP_ITEMS + r * 32 + lane
                e = -1
                if i < NE:
                    if T.And(topk_idx[i] >= 0, topk_idx[i] < E):
                        e = T.Cast("int32", topk_idx[i])
                group = T.call_extern("uint32", "__match_any_sync", T.uint32(0xFFFFFFFF), e)
                pos = -1
                if e >= 0:
                    pos = rows[w, e] + T.call_extern("int32", "__popc", group & below)
                T.sync_warp()
                if T.And(e >= 0, (group >> T.Cast("uint32", lane)) == T.uint32(1)):
                    rows[w, e] = pos + 1
                T.sync_warp()
                if i < NE:
                    if pos < P:
                        token_topk_to_pos[i] = pos
                        if pos >= 0:
                            pos_to_expert[pos] = e
                            pos_to_token[pos] = i // num_topk
                            pos_to_token_topk[pos] = i
                    else:
                        token_topk_to_pos[i] = -1

    return get_fused_mapping


def num_ctas(entries: int) -> int:
    return max(1, F.ceil_div(entries, CHUNK))


def _launch(topk_idx, *, num_experts, num_expanded_tokens, alignment) -> Launch:
    t, k = topk_idx.shape
    n = t * k
    return Launch(
        kernel=fused_mapping_kernel,
        params=dict(num_experts=num_experts, idx_dtype=np.dtype(topk_idx.dtype).name),
        scalars=dict(num_topk=k, alignment=alignment),
        views={"topk_idx": View((n,)), "token_topk_to_pos": View((n,)), "num_expanded_tokens": View((1,))},
        workspace={"offsets": jax.ShapeDtypeStruct((num_ctas(n), num_experts), jnp.int32)},
    )


def _kernel_check(topk_idx, *, num_experts, num_expanded_tokens, alignment):
    n = topk_idx.shape[0] * topk_idx.shape[1]
    if n > MAX_ENTRIES or num_expanded_tokens > MAX_ENTRIES:
        raise ValueError(f"get_fused_mapping: the kernel takes at most {MAX_ENTRIES} entries and positions, got {n} and {num_expanded_tokens}")
    if topk_idx.shape[1] == 0:
        raise ValueError("get_fused_mapping: the kernel needs K >= 1 (use impl='xla')")


_op = TileOp(
    name="get_fused_mapping", launch=_launch, operands=("topk_idx",), results=RESULTS, reference=_reference,
    kernel_check=_kernel_check,
)  # fmt: skip


def random_topk_idx(rng: np.random.Generator, t: int, k: int, e: int, masked: float = 0.1) -> np.ndarray:
    """K distinct experts per token in random order, a fraction ``masked`` of the slots -1 (int32)."""
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :k] if t else np.zeros((0, k), np.int64)
    return np.where(rng.random((t, k)) < masked, -1, idx).astype(np.int32)


def _case(t: int, k: int, e: int, alignment: int, p: int = 0, masked: float = 0.1, **options) -> ArgSpec:
    name = f"{t}x{k}_e{e}_a{alignment}" + (f"_p{p}" if p else "") + ("_masked" if masked == 1 else "")
    return ArgSpec(name, (jax.ShapeDtypeStruct((t, k), jnp.int32), e, p, alignment),
                   make=lambda rng, s, *rest: (random_topk_idx(rng, t, k, e, masked), *rest), **options)  # fmt: skip


# Named calls (three kernel configurations: E = 8, 256, 384): edge sizes (1 token, 0 tokens, every slot masked, alignment 1, a caller-given capacity
# too small for the total), E = 8 ... 384, K = 1 ... 8; DeepSeek-V3 sizes for the benchmarks.
ARG_SPECS = (
    _case(33, 8, 256, 128),
    _case(1, 1, 8, 16),
    _case(0, 6, 8, 64),
    _case(40, 6, 256, 16, masked=1.0),
    _case(100, 4, 384, 1),
    _case(64, 8, 8, 64, p=1000),
    _case(9000, 8, 256, 128),  # several CTAs
    _case(4096, 8, 256, 128, bench=True),
    _case(65536, 8, 256, 128, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def get_fused_mapping(
    topk_idx: jax.Array,
    num_experts: int,
    num_expanded_tokens: int = 0,
    alignment: int = 128,
    force_no_sync: bool = False,
    *,
    impl=None,
    ops,
) -> tuple[jax.Array, ...]:
    """The fused expert-major layout of ``topk_idx`` (TileKernels' ``get_fused_mapping``, without host syncs).

    Args:
      topk_idx: int32/int64 ``[T, K]``; entries outside ``[0, E)`` (the -1 slots) are not routed.
      num_experts: E, at most 1024.
      num_expanded_tokens: the static capacity P; 0 takes :func:`capacity` (the exact upper bound).
        Entries whose row would fall at or beyond P get position -1 (check the returned total).
      alignment: each expert's segment is padded to a multiple of it (positive).
      force_no_sync: accepted for TileKernels' signature; jax_tilek never syncs with the host.

    Returns:
      ``(pos_to_expert, pos_to_token, pos_to_token_topk, token_topk_to_pos, expert_start, expert_end,
      num_tokens_per_expert, num_expanded_tokens)``: int32 ``[P]`` ×3 (-1 for padding rows),
      int32 ``[T, K]`` (-1 for unrouted slots), int32 ``[E]`` ×3 (segment start, end, and aligned size),
      and the int32 scalar total of the aligned sizes (TileKernels returns a Python list instead).
      Within a segment rows follow ascending ``t·K + k``; padding rows come last.
    """
    name = "get_fused_mapping"
    idx = checks.as_array(name, "topk_idx", topk_idx)
    if idx.ndim != 2:
        raise ValueError(f"{name}: topk_idx must be [T, K] (rank 2), got shape {idx.shape}")
    if idx.dtype not in (jnp.int32, jnp.int64):
        raise ValueError(f"{name}: topk_idx must be int32 or int64, got {idx.dtype}")
    e = checks.static_int(name, "num_experts", num_experts)
    p = checks.static_int(name, "num_expanded_tokens", num_expanded_tokens)
    a = checks.static_int(name, "alignment", alignment)
    checks.static_bool(name, "force_no_sync", force_no_sync)
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"{name}: num_experts must be in [1, {MAX_EXPERTS}], got {e}")
    if not 1 <= a <= 2**20:
        raise ValueError(f"{name}: alignment must be in [1, 2^20], got {a}")
    if p < 0:
        raise ValueError(f"{name}: num_expanded_tokens must be >= 0 (0: the upper bound), got {p}")
    t, k = idx.shape
    if p == 0:
        p = capacity(t, k, e, a)
    return ops[0](idx, impl=impl, num_experts=e, num_expanded_tokens=p, alignment=a)
