"""grouped_matmul_fp8: ``out[r] = (x[r] · x_sf) · (w[g] · w_sf[g])`` for the rows r of segment g, with
float8_e4m3fn operands and DeepSeek's block scales: 1 × 128 per-token scales on ``x`` (the layouts
``jax_tilek.quant.per_token_cast`` writes: ``"row"``, ``"col"``, ``"col_ue8m0"``) and 128 × 128
block scales on ``w`` (what ``jax_tilek.quant.per_block_cast`` writes for each ``w[g]``, fp32, row
layout). The segments and the M-tile table are :func:`jax_tilek.gemm.grouped_matmul`'s.

Kernel (sm_90a): the bf16 kernel's grid, one CTA per (N-tile, M-tile), N fastest, with 128 × 128
output tiles and a K step of 128, the scales' block. Warp-specialized by TileLang: a producer
warpgroup TMA-loads per K block the x tile ``[128, 128]``, the w tile ``[128 (N), 128 (K)]`` (wgmma
reads 8-bit operands K-major only, so the kernel takes ``w`` as ``[G, N, K]``) and the 128 x-scales of
the tile's rows (column-major storage: one contiguous run) into a ``stages``-deep ring; two consumer
warpgroups (64 rows each) run e4m3 × e4m3 wgmma (m64n128k32) into a per-block fp32 partial sum,
then promote it, DeepGEMM's way: ``acc[i, j] += partial[i, j] · x_sf[r0 + i, kb] · w_sf[g, nb, kb]``
(fp32 registers), so the tensor cores' limited-precision accumulation never spans more than 128
products. The tile's rows go out through shared memory (bf16) or from registers (fp32). Tiles of
no segment run no K blocks and store zeros.

With ``overlap`` (``GroupedMatmulFp8Config``), the promotion runs under the next block's wgmma, as
DeepGEMM overlaps them: even K blocks accumulate into one partial sum, odd ones into another; each
block issues its wgmma asynchronously (``T.wgmma_gemm``), promotes the previous block's partial sum
while the tensor cores work, then waits for its own wgmma (``T.wait_wgmma(0)``), and only then
releases its ring stage to the producer (TileLang releases a stage after the last statement that reads
it: the branch that ends with the wait). The last block is promoted after the loop.

With ``persistent``, one CTA per multiprocessor (``ctas``, a launch-time scalar: the cubin is the same
for any GPU), CTA c running tiles c, c + ctas, ... in the same order with the same per-tile arithmetic
(the same bytes), so that the producer loads the next tile's K blocks while the consumers promote the
last blocks and store the tile; one CTA per tile leaves that ring fill and that epilogue unoverlapped
(at K = 2048 a tile has 16 K blocks). TileLang's automatic warp specialization splits the roles at the
pipelined loop, inside a tile loop: it keeps the mbarrier phases right (counters across tiles) but
ThreadSync then puts a __syncthreads at the top of every tile (the producer waits for the epilogue),
and setmaxnreg lands inside the loop or not at all (the two partial sums spill). So this kernel splits
the roles by hand, DeepGEMM's way: setmaxnreg once, then each role loops over the CTA's tiles, with a
full and an empty mbarrier per ring stage and the ring's clock (its K-block count) in a register of
its own. Its bf16 output tile has shared memory of its own (32 KB), which leaves room for 5 stages
with x's scales in the ring.

With ``pingpong`` (persistent, without ``overlap``), the two consumer warpgroups take turns at the
tensor cores, CUTLASS's ping-pong order at K-block granularity: a warpgroup issues its wgmma, lets the
other one issue (a named-barrier arrive, so that wgmma queues behind its own), then waits for its own,
promotes it and releases the stage, while the other's wgmma runs. ``overlap`` instead promotes a
second partial sum under the same warpgroup's next wgmma. In the SASS of the odd blocks (nvcc 13.0,
2026-12-07) ptxas had moved those 64 FFMAs above the wgmma issue, so half the blocks promoted
unoverlapped; the even blocks' promotion sits in a branch (``kb > 0``), which ptxas does not hoist
across, so the odd blocks' now does too (``even_done``, a flag TileLang cannot fold). Timed on an H100
(2026-12-07) that changed nothing measurable (1171 / 761 us against 1180 / 755 at up G8 / down G32):
the other warpgroup's wgmma likely kept the tensor cores busy during those promotions. By Nsight
Compute's warp-stall samples the consumers' K loop waits most on its chain of dependent scalar
instructions (stage index, w's scale address, wgmma descriptors) and on the ring's full barrier
(``benchmarks/results/h100-2026-12-07-j-fp8/``). A ``wait_group 1`` variant got every wgmma serialized
(C7514). The ping-pong warpgroup reads only its own, completed accumulator.

With ``blocks_per_stage=2`` (the default where K/128 is even and TileLang splits the roles; the
hand-split kernels take it when asked), each ring stage holds
two K blocks (three stages: the same six blocks in flight), so that the consumers' work per stage (the
full-barrier wait, the stage index and phase, the release) comes once per two blocks, and the blocks'
parities are known when the kernel is built (block 2p into one partial sum, 2p + 1 into the other).
The two blocks sit in one statement (``if g >= 0``, true in the loop): otherwise TileLang gives each
tile a barrier of its own and releases x's and w's tiles right after their wgmma's issue, while the
tensor cores still read them. On an H100 (2026-12-07) it took 1091 / 721 us against 1194 / 763 at up
G8 / down G32 (16384 tokens): the per-block scalar work Nsight Compute had found, in part, comes once
per two blocks (not yet profiled again). The hand-split kernels' producer waits for a stage's empty
barrier once and loads both blocks onto its full barrier, the consumers release it once, after both.

With ``multicast=2`` (the hand-split kernel, persistent or on a CTA a tile), the CTAs run in clusters
of two: CTA c (c even) and c + 1 get
tiles t and t + 1 (``ctas`` and N/128 even), one M-tile at N-tiles bn, bn + 1, the same K blocks. Per K
block the two need the same x tile: rank 0's producer TMA-multicasts it into both CTAs' ring stage
(each CTA expects its bytes on its own full barrier); each loads its own w tile and x's scales. A
stage is refilled only when the consumers of both CTAs are done with it: its empty barrier is a
cluster barrier on which lane i of each consumer warp of either CTA arrives for CTA i (2 x 8
arrivals a phase). The x tile comes from L2 once for two CTAs: 24 KB instead of 32 KB a K block per
CTA (DeepGEMM's multicast). A cluster sync follows the barriers' init and ends the kernel (a CTA stays
until its peer has done with its shared memory). On a CTA a tile (``persistent=False``: a grid of every
tile) the bf16 output tile lies over the ring, idle once the consumers are done with the last block
(their named barrier guards it), so that three stages of two K blocks fit beside it.

Row-major ``"row"`` x-scales are transposed to the column-major storage by XLA before the launch
(1/32 of x's bytes); ``w`` given as ``[G, K, N]`` is transposed to ``[G, N, K]`` (with its scales)
by XLA: store FP8 weights as ``[G, N, K]`` (``transpose_w=True``, DeepGEMM's layout) to avoid it.

(No ``from __future__ import annotations``: TileLang resolves a prim_func's annotations through its
closure.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, platform
from jax_tilek.gemm import _segments as S
from jax_tilek.gemm._grouped_wgrad import matmul_operands, matmul_tiles, random_sizes
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, TileOp, config_class, uses
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec

BLOCK = 128  # the scales' block edge: the kernel's K step and N tile
# x's scales are TMA-loaded per K block as a run of SF_BOX entries (4 bytes each) from the tile's first
# row rounded down to SF_ALIGN rows: a TMA copy's innermost coordinate must be a multiple of 16 bytes
# (Hopper raises CUDA_ERROR_ILLEGAL_INSTRUCTION otherwise), and a tile starts at any row. SF_BOX covers
# the <= 3 rows of that rounding (BLOCK + 3, rounded up to 160 so that each stage of the ring is a whole
# number of 128-byte lines).
SF_ALIGN = 4
SF_BOX = 160
SMEM_LIMIT = 227 * 1024  # shared memory a CTA may have on sm_90
PRODUCER_THREADS = 128  # the persistent kernel's producer warpgroup (the other kernel's is TileLang's)
TURN_BARRIERS = (10, 11)  # pingpong: named barriers on which each consumer warpgroup waits for its turn
FP8 = "float8_e4m3fn"
SF_LAYOUTS = ("row", "col", "col_ue8m0")  # x's scale layouts (jax_tilek.quant.formats), as given
OUT_DTYPES = ("bfloat16", "float32")


def dequantize(x, x_sf, w, w_sf, *, x_sf_layout: str) -> tuple[jax.Array, jax.Array]:
    """float32 ``x[M, K]`` and ``w[G, N, K]``: the codes times their block scales (``x_sf`` in
    ``x_sf_layout`` storage, ``w_sf`` fp32 ``[G, N/128, K/128]``)."""
    m, k = x.shape
    g, n, _ = w.shape
    sf = F.load_sf(x_sf, x_sf_layout, (m, k // BLOCK))
    x32 = F.dequantize_blocks(x, sf, "e4m3", (1, BLOCK))
    w32 = F.dequantize_blocks(w.reshape(g * n, k), w_sf.reshape(g * n // BLOCK, k // BLOCK), "e4m3", (BLOCK, BLOCK))
    return x32, w32.reshape(g, n, k)


def _reference(x, x_sf, w, w_sf, start, end, tiles, *, x_sf_layout, out_dtype):
    """Dequantized operands in float32, ``jax.lax.ragged_dot`` of the rows in segment order (float32,
    highest precision); rows outside every segment give zeros. ``tiles`` is not read."""
    x32, w32 = dequantize(x, x_sf, w, w_sf, x_sf_layout=x_sf_layout)
    perm, sizes = S.row_order(start, end, x.shape[0])
    y = jax.lax.ragged_dot(x32[perm], jnp.swapaxes(w32, 1, 2), sizes, precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)  # fmt: skip
    return jnp.zeros_like(y).at[perm].set(y).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class GroupedMatmulFp8Config:
    """The depth of the TMA ring (``stages``; 32.5 KB of shared memory a K block; by default as many as
    fit beside the output tile, at most 6 K blocks: ``resolve``); how x's scales reach the consumers
    (``sf_load``: "ldg", read from global memory before each K block's wgmma, or "tma", loaded by the
    producer into the ring); ``overlap``: promote each K block's partial sum while the next block's
    wgmma runs (two partial sums, 64 more registers a consumer thread) instead of after a synchronous
    wgmma; ``persistent``: one CTA per multiprocessor looping over tiles, so that the ring fills with
    the next tile's K blocks while the current one is finished and stored (module docstring). Its bf16
    output tile needs 32 KB of its own: at most 5 stages with ``sf_load="tma"`` (``shared_bytes``).
    ``multicast=2`` (N a multiple of 256; persistent, or the hand-split kernel on a CTA a tile):
    clusters of two CTAs on neighbouring N-tiles of one M-tile, sharing each K block's x tile (one TMA
    multicast) to cut L2 traffic from 32 to 24 KB a K block per CTA; the same bytes out. ``pingpong``
    (with ``persistent``, without ``overlap``): the consumer warpgroups take turns at the tensor cores,
    each promoting while the other's wgmma runs (module docstring); the same bytes out.
    ``blocks_per_stage=2`` (``sf_load="tma"``, ``overlap``; K/128 even): each ring stage holds two K
    blocks, so that the consumers' per-stage work (barrier wait, stage index and phase, the release)
    comes once per two blocks; the same bytes out. By default two on a CTA a tile (not persistent)
    where the other fields and K allow it and the ring fits, else one."""

    stages: int | None = None
    sf_load: str = "tma"
    overlap: bool = True
    persistent: bool = False
    multicast: int = 1
    pingpong: bool = False
    blocks_per_stage: int | None = None


BLOCKS_IN_FLIGHT = 6  # the ring's depth in K blocks where the config leaves it open (as many as fit, DeepGEMM's rule)


def resolve(config: GroupedMatmulFp8Config, k: int, out_dtype: str) -> GroupedMatmulFp8Config:
    """``config`` with its open fields chosen for K and the output dtype: ``blocks_per_stage`` 2 where
    the schedule takes it (one CTA per tile, ``sf_load="tma"``, ``overlap``, K/128 even) and the ring
    fits, else 1; ``stages``: as many as fit (:func:`shared_bytes`), at most ``BLOCKS_IN_FLIGHT`` K blocks."""
    bps = config.blocks_per_stage
    if bps is None:
        pairs = dataclasses.replace(config, blocks_per_stage=2)
        takes_pairs = not config.persistent and config.sf_load == "tma" and config.overlap and k // BLOCK % 2 == 0
        bps = 2 if takes_pairs and (config.stages is None or shared_bytes(pairs, out_dtype) <= SMEM_LIMIT) else 1
    stages = config.stages
    if stages is None:
        depths = range(max(BLOCKS_IN_FLIGHT // bps, 1), 0, -1)
        stages = next((d for d in depths if shared_bytes(dataclasses.replace(config, stages=d, blocks_per_stage=bps), out_dtype) <= SMEM_LIMIT), 1)
    return dataclasses.replace(config, stages=stages, blocks_per_stage=bps)


@config_class(GroupedMatmulFp8Config)
def _config(x, x_sf, w, w_sf, start, end, tiles, *, x_sf_layout, out_dtype) -> GroupedMatmulFp8Config:
    """The ring's depth and its K blocks a stage left open (:func:`resolve`: six stages of one block, or
    three of two where K/128 is even, five persistent with a bf16 output); x's scales through the
    ring and the promotion under the next wgmma: the fastest of the four on an H100 (2026-12-07, 16384
    tokens: 1177 / 791 us at the up / down G8 / G32 shapes against 1456 / 940 us for ldg without overlap).
    One CTA per tile: ``persistent`` (5 stages) gave the same bytes and no gain on an H100 (2026-12-07:
    1234 / 798 us against 1213 / 813 us), so per-tile fill and epilogue are not what limits it; nor is
    the promotion's overlap: ``pingpong`` took 1244 / 767 us against 1180 / 755 (H100, 2026-12-07).
    Two K blocks a stage in a 3-stage ring (the same 6 blocks in flight): 1091 / 721 us against 1194 /
    763 for one block a stage in 6, 1140 / 759 in 4 (H100, 2026-12-07)."""
    return GroupedMatmulFp8Config()


@kernel
def grouped_matmul_fp8_kernel(k: int, n: int, sf_layout: str, out_dtype: str, stages: int, sf_load: str = "tma", overlap: bool = False,
                              persistent: bool = False, multicast: int = 1, pingpong: bool = False, blocks_per_stage: int = 1):  # fmt: skip
    """``out[r] = Σ_kb (x[r, kb] · w[g, :, kb]ᵀ) · x_sf[r, kb] · w_sf[g, :, kb]`` per the tile table
    (module docstring); ``sf_layout`` "col" (fp32 ``[K/128, MP]``) or "col_ue8m0" (int32
    ``[ceil(K/512), MP]``, byte ``kb % 4`` of word ``kb // 4``); ``overlap``: two partial sums in
    turn, block kb's promotion under block kb + 1's wgmma; ``persistent``: ``ctas`` CTAs (a scalar
    parameter, at most the tiles), the roles split by hand, each looping over the CTA's tiles;
    ``multicast=2`` (N/128 and ``ctas`` even): the roles split by hand, clusters of two CTAs on the
    tiles t, t + 1 (one M-tile, N-tiles bn, bn + 1), the x tile TMA-multicast to both, the ring's
    stages released to both producers; without ``persistent``, ``ctas`` is every tile, one each;
    ``pingpong`` (persistent, no overlap): the consumer warpgroups' wgmmas in turn, each promoting its
    own while the other's runs; ``blocks_per_stage=2`` (tma, overlap, K/128 even): K blocks 2p and
    2p + 1 in ring stage p."""
    import tilelang.language as T

    M, MP, G, NT = T.dynamic("M, MP, G, NT")
    BM = BN = BK = BLOCK
    nbn = n // BN
    kb_count = k // BK
    sf_rows, sf_dtype = (kb_count, "float32") if sf_layout == "col" else (F.ceil_div(kb_count, 4), "int32")
    sf_index = (lambda kb: kb) if sf_layout == "col" else (lambda kb: kb // 4)  # x_sf's row of K block kb
    via_shared = out_dtype != "float32"
    store = S.tile_store(T, BM, BN, via_shared)
    threads = 256  # the two consumer warpgroups (TileLang adds the producer's, or the persistent kernel does)

    @T.macro
    def row_scales(kb, sf_word, w_scale: T.Ref, dst):
        """``dst[i]``: row i's x-scale of K block kb (from its storage word) times w's block scale."""
        for i in T.Parallel(BM):
            sf = sf_word(i)
            if sf_layout == "col":
                dst[i] = sf * w_scale
            else:  # a UE8M0 byte is the biased exponent of a power of two
                byte = T.shift_right(T.reinterpret(sf, "uint32"), T.cast((kb % 4) * 8, "uint32")) & T.uint32(255)
                dst[i] = T.reinterpret(T.shift_left(byte, T.uint32(23)), "float32") * w_scale

    @T.macro
    def promote(acc, part, scale):
        for i, j in T.Parallel(BM, BN):
            acc[i, j] += part[i, j] * scale[i]

    @T.macro
    def load_raw_scales(x_sf, kb, r0, raw):
        """sf_load="ldg": the tile's rows' scale words of K block kb, from global memory."""
        for i in T.Parallel(BM):
            raw[i] = T.if_then_else(r0 + i < MP, x_sf[sf_index(kb), r0 + i], T.cast(0, sf_dtype))

    @T.macro
    def k_block(kb, a, b, sf_word, w_scale: T.Ref, acc, part, row_scale, part_odd, scale_odd, even_done: T.Ref):
        """K block kb's wgmma on the x and w tiles ``a``, ``b`` and its promotion (with ``overlap``,
        the previous block's); every read of ``a``, ``b`` and x's scales is done at the end.
        ``even_done`` (``overlap``): 1 once an even block's partial sum exists (module docstring)."""
        if not overlap:
            T.gemm(a, b, part, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
            row_scales(kb, sf_word, w_scale, row_scale)
            promote(acc, part, row_scale)
        else:
            # Even blocks into part, odd ones into part_odd. Each branch ends with the wait: TileLang
            # releases the stage after this if (the last statement reading a_s, b_s and sa_s), so never
            # under a running wgmma; the persistent kernel releases it after the block too.
            if kb % 2 == 0:
                T.wgmma_gemm(a, b, part, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                if kb > 0:
                    promote(acc, part_odd, scale_odd)
                row_scales(kb, sf_word, w_scale, row_scale)
                T.wait_wgmma(0)
                T.warpgroup_fence_operand(part, num_regs=BM * BN // threads)  # no read of it moves above the wait
                even_done = 1
            else:
                T.wgmma_gemm(a, b, part_odd, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                # Always true here; a branch, like the even blocks' kb > 0, keeps ptxas from hoisting
                # the promotion above the wgmma issue (which TileLang would fold for kb > 0).
                if even_done == 1:
                    promote(acc, part, row_scale)
                row_scales(kb, sf_word, w_scale, scale_odd)
                T.wait_wgmma(0)
                T.warpgroup_fence_operand(part_odd, num_regs=BM * BN // threads)

    @T.macro
    def pingpong_block(kb, a, b, sf_word, w_scale: T.Ref, acc, part, row_scale, blocks):
        """K block kb of the persistent kernel's ping-pong order: consumer warpgroup 0 goes first (and
        then after each turn signal of warpgroup 1, its own first block of the CTA excepted), warpgroup
        1 after each of warpgroup 0's; a warpgroup signals the other's turn as soon as its wgmma is
        issued, so that the other's queues behind it, then waits for it and promotes."""
        first = T.get_thread_binding() < PRODUCER_THREADS + 128  # consumer warpgroup 0
        if first:
            if blocks > 0:
                T.sync_threads(TURN_BARRIERS[0], threads)
        else:
            T.sync_threads(TURN_BARRIERS[1], threads)
        T.wgmma_gemm(a, b, part, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
        if first:
            T.named_barrier_arrive(TURN_BARRIERS[1], threads)
        else:
            T.named_barrier_arrive(TURN_BARRIERS[0], threads)
        row_scales(kb, sf_word, w_scale, row_scale)
        T.wait_wgmma(0)
        T.warpgroup_fence_operand(part, num_regs=BM * BN // threads)
        promote(acc, part, row_scale)

    @T.macro
    def copy_block(x, x_sf, w, kb, g, bn, r0, a_s, b_s, sa_s):
        """K block kb's x and w tiles (and with ``sf_load="tma"`` x's scales) into ``a_s``, ``b_s``
        (``sa_s``): TileLang's roles make them the producer's TMA loads into the ring."""
        T.copy(x[r0, kb * BK], a_s)
        T.copy(w[g, bn * BN, kb * BK], b_s)
        if sf_load == "tma":
            # The scales' TMA box starts at r0 rounded down to SF_ALIGN rows: a TMA copy whose
            # innermost coordinate is not 16-byte aligned faults (CUDA_ERROR_ILLEGAL_INSTRUCTION).
            sf0 = r0 // SF_ALIGN * SF_ALIGN
            T.copy(x_sf[sf_index(kb), sf0 : sf0 + SF_BOX], sa_s)

    @T.macro
    def finish_tile(out, count, bn, r0, r1, acc, part, row_scale, part_odd, scale_odd, c_s):
        """The last block's promotion (``overlap``), then the tile's rows [r0, r1) of ``out``: through
        ``c_s`` (bf16) or from registers (fp32)."""
        if overlap:
            if count % 2 == 1:
                promote(acc, part, row_scale)
            elif count > 0:
                promote(acc, part_odd, scale_odd)
        store(out, acc, c_s, r0, r1, bn * BN)

    if not persistent and multicast == 1:

        @T.prim_func
        def grouped_matmul_fp8(
            x: T.Tensor((M, k), FP8),
            x_sf: T.Tensor((sf_rows, MP), sf_dtype),
            w: T.Tensor((G, n, k), FP8),
            w_sf: T.Tensor((G, nbn, kb_count), "float32"),
            tiles: T.Tensor((NT, 3), "int32"),
            out: T.Tensor((M, n), out_dtype),
        ):
            with T.Kernel(nbn, NT, threads=threads) as (bn, bt):
                a_s = T.alloc_shared((BM, BK), FP8)
                b_s = T.alloc_shared((BN, BK), FP8)
                sa_s = T.alloc_shared((SF_BOX,), sf_dtype) if sf_load == "tma" else None
                if blocks_per_stage == 2:  # the odd K block of each stage
                    a1_s = T.alloc_shared((BM, BK), FP8)
                    b1_s = T.alloc_shared((BN, BK), FP8)
                    sa1_s = T.alloc_shared((SF_BOX,), sf_dtype)
                part = T.alloc_fragment((BM, BN), "float32")
                acc = T.alloc_fragment((BM, BN), "float32")
                row_scale = T.alloc_fragment((BM,), "float32")
                part_odd = T.alloc_fragment((BM, BN), "float32") if overlap else None
                scale_odd = T.alloc_fragment((BM,), "float32") if overlap else None
                raw = T.alloc_fragment((BM,), sf_dtype)
                w_scale = T.alloc_var("float32")
                even_done = T.alloc_var("int32", init=0)
                g = tiles[bt, 0]
                r0 = tiles[bt, 1]
                r1 = tiles[bt, 2]
                sf_word = (lambda i: sa_s[r0 % SF_ALIGN + i]) if sf_load == "tma" else (lambda i: raw[i])
                count = T.if_then_else(g >= 0, kb_count, 0)
                T.clear(acc)
                if overlap:  # never read before written (kb > 0 below), but TileLang's init check cannot tell
                    T.clear(part_odd)
                    T.clear(scale_odd)
                if blocks_per_stage == 1:
                    for kb in T.Pipelined(count, num_stages=stages):
                        copy_block(x, x_sf, w, kb, g, bn, r0, a_s, b_s, sa_s)
                        w_scale = w_sf[g, bn, kb]  # loaded before the wgmma, which hides its latency
                        if sf_load == "ldg":
                            load_raw_scales(x_sf, kb, r0, raw)
                        k_block(kb, a_s, b_s, sf_word, w_scale, acc, part, row_scale, part_odd, scale_odd, even_done)
                else:
                    w_scale1 = T.alloc_var("float32")
                    for kp in T.Pipelined(count // 2, num_stages=stages):
                        copy_block(x, x_sf, w, 2 * kp, g, bn, r0, a_s, b_s, sa_s)
                        copy_block(x, x_sf, w, 2 * kp + 1, g, bn, r0, a1_s, b1_s, sa1_s)
                        w_scale = w_sf[g, bn, 2 * kp]
                        w_scale1 = w_sf[g, bn, 2 * kp + 1]
                        # One statement (g >= 0 holds in the loop): TileLang waits for the whole stage before it
                        # and releases it after it, not each tile after its wgmma's issue. The K blocks'
                        # parities fold (2p even, 2p + 1 odd): no branch on them.
                        if g >= 0:
                            k_block(2 * kp, a_s, b_s, sf_word, w_scale, acc, part, row_scale, part_odd, scale_odd, even_done)
                            k_block(2 * kp + 1, a1_s, b1_s, lambda i: sa1_s[r0 % SF_ALIGN + i], w_scale1, acc, part, row_scale,
                                    part_odd, scale_odd, even_done)  # fmt: skip
                c_s = T.alloc_shared((BM, BN), out_dtype) if via_shared else None  # over the ring, idle by now
                finish_tile(out, count, bn, r0, r1, acc, part, row_scale, part_odd, scale_odd, c_s)

        return grouped_matmul_fp8

    def ring_scales(sa_s, slot, r0, raw):
        """``sf_word`` of the hand-split kernel's K block in ring slot ``slot``: from the ring (tma) or ``raw`` (ldg)."""
        return (lambda i: sa_s[slot, r0 % SF_ALIGN + i]) if sf_load == "tma" else (lambda i: raw[i])

    @T.macro
    def load_block(x, x_sf, w, kb, slot, s, g, bn, r0, full, a_s, b_s, sa_s, last_of_stage: bool):
        """The hand-split producer's TMA loads of K block kb into ring slot ``slot`` (stage s's full
        barrier); the stage's last copy carries the elected thread's arrive."""
        last = {"emit_arrive": 1} if last_of_stage else None  # after each copy's expect_tx
        sf0 = r0 // SF_ALIGN * SF_ALIGN  # as in copy_block
        # multicast: rank 0 loads x into both CTAs, each expecting its bytes on its own full[s]
        T.tma_copy(x[r0 : r0 + BM, kb * BK : kb * BK + BK], a_s[slot, :, :], barrier=full[s],
                   cluster_mask=(1 << multicast) - 1 if multicast > 1 else None)  # fmt: skip
        T.tma_copy(w[g, bn * BN : bn * BN + BN, kb * BK : kb * BK + BK], b_s[slot, :, :], barrier=full[s],
                   annotations=last if sf_load == "ldg" else None)  # fmt: skip
        if sf_load == "tma":
            T.tma_copy(x_sf[sf_index(kb), sf0 : sf0 + SF_BOX], sa_s[slot, :], barrier=full[s], annotations=last)

    @T.prim_func
    def grouped_matmul_fp8_split(
        x: T.Tensor((M, k), FP8),
        x_sf: T.Tensor((sf_rows, MP), sf_dtype),
        w: T.Tensor((G, n, k), FP8),
        w_sf: T.Tensor((G, nbn, kb_count), "float32"),
        tiles: T.Tensor((NT, 3), "int32"),
        out: T.Tensor((M, n), out_dtype),
        ctas: T.int32,
    ):
        with T.Kernel(ctas, threads=PRODUCER_THREADS + threads, cluster_dims=(multicast, 1, 1) if multicast > 1 else None) as c:
            slots = stages * blocks_per_stage  # K blocks in the ring; stage s holds slots s * blocks_per_stage + j
            a_s = T.alloc_shared((slots, BM, BK), FP8)
            b_s = T.alloc_shared((slots, BN, BK), FP8)
            sa_s = T.alloc_shared((slots, SF_BOX), sf_dtype) if sf_load == "tma" else None
            # persistent: in use while the ring fills for the next tile, so its own; else over the ring, idle by then
            # (grouped_matmul_fp8_one_tile_kernel's merge)
            c_s = T.alloc_shared((BM, BN), out_dtype) if via_shared else None
            full = T.alloc_barrier([1] * stages)  # the producer's elected thread, and the TMA bytes (the multicast x tile's too)
            if multicast == 1:
                empty = T.alloc_barrier([threads] * stages)  # every consumer thread
            else:  # one lane of each consumer warp of each CTA of the cluster (the cluster barrier's init ends in a cluster sync)
                empty = T.alloc_cluster_barrier([multicast * threads // 32] * stages)
            part = T.alloc_fragment((BM, BN), "float32")
            acc = T.alloc_fragment((BM, BN), "float32")
            row_scale = T.alloc_fragment((BM,), "float32")
            part_odd = T.alloc_fragment((BM, BN), "float32") if overlap else None
            scale_odd = T.alloc_fragment((BM,), "float32") if overlap else None
            raw = T.alloc_fragment((BM,), sf_dtype)
            w_scale = T.alloc_var("float32")
            w_scale1 = T.alloc_var("float32")  # blocks_per_stage=2: the stage's odd K block's
            even_done = T.alloc_var("int32", init=0)
            blocks = T.alloc_var("int32")  # ring stages this thread's role has gone through, over its tiles: the ring's clock
            # CTA c's tiles: c, c + ctas, ... (persistent), or tile c alone (ctas: all the tiles)
            tile_count = T.ceildiv(nbn * NT - c, ctas) if persistent else 1
            if T.get_thread_binding() < PRODUCER_THREADS:
                T.set_max_nreg(24, 0)
                blocks = 0
                for it in T.serial(tile_count):
                    bn = (c + it * ctas) % nbn
                    bt = (c + it * ctas) // nbn
                    g = tiles[bt, 0]
                    r0 = tiles[bt, 1]
                    for kp in T.serial(T.if_then_else(g >= 0, kb_count // blocks_per_stage, 0)):
                        s = blocks % stages
                        T.mbarrier_wait_parity(empty[s], (blocks // stages) % 2 ^ 1)
                        if blocks_per_stage == 1:
                            load_block(x, x_sf, w, kp, s, s, g, bn, r0, full, a_s, b_s, sa_s, True)
                        else:
                            load_block(x, x_sf, w, 2 * kp, 2 * s, s, g, bn, r0, full, a_s, b_s, sa_s, False)
                            load_block(x, x_sf, w, 2 * kp + 1, 2 * s + 1, s, g, bn, r0, full, a_s, b_s, sa_s, True)
                        blocks = blocks + 1
            else:
                T.set_max_nreg(240, 1)
                blocks = 0
                for it in T.serial(tile_count):
                    bn = (c + it * ctas) % nbn
                    bt = (c + it * ctas) // nbn
                    g = tiles[bt, 0]
                    r0 = tiles[bt, 1]
                    r1 = tiles[bt, 2]
                    count = T.if_then_else(g >= 0, kb_count, 0)
                    T.clear(acc)
                    if overlap:
                        T.clear(part_odd)
                        T.clear(scale_odd)
                    for kp in T.serial(count // blocks_per_stage):
                        s = blocks % stages
                        w_scale = w_sf[g, bn, kp * blocks_per_stage]
                        if sf_load == "ldg":
                            load_raw_scales(x_sf, kp, r0, raw)
                        if blocks_per_stage == 2:
                            w_scale1 = w_sf[g, bn, 2 * kp + 1]
                        T.mbarrier_wait_parity(full[s], (blocks // stages) % 2)
                        if pingpong:
                            pingpong_block(kp, a_s[s, :, :], b_s[s, :, :], ring_scales(sa_s, s, r0, raw), w_scale, acc, part, row_scale, blocks)
                        elif blocks_per_stage == 1:
                            k_block(kp, a_s[s, :, :], b_s[s, :, :], ring_scales(sa_s, s, r0, raw), w_scale, acc, part, row_scale, part_odd,
                                    scale_odd, even_done)  # fmt: skip
                        else:  # the K blocks' parities fold (2p even, 2p + 1 odd): no branch on them
                            k_block(2 * kp, a_s[2 * s, :, :], b_s[2 * s, :, :], ring_scales(sa_s, 2 * s, r0, raw), w_scale, acc, part,
                                    row_scale, part_odd, scale_odd, even_done)  # fmt: skip
                            k_block(2 * kp + 1, a_s[2 * s + 1, :, :], b_s[2 * s + 1, :, :], ring_scales(sa_s, 2 * s + 1, r0, raw), w_scale1,
                                    acc, part, row_scale, part_odd, scale_odd, even_done)  # fmt: skip
                        if multicast == 1:
                            T.mbarrier_arrive(empty[s])
                        else:  # the warp's reads of stage s done, lane i releases it to CTA i's producer
                            T.sync_warp()
                            if T.get_thread_binding() % 32 < multicast:
                                T.mbarrier_arrive(empty[s], T.get_thread_binding() % 32)
                        blocks = blocks + 1
                    finish_tile(out, count, bn, r0, r1, acc, part, row_scale, part_odd, scale_odd, c_s)
                if pingpong and blocks > 0 and T.get_thread_binding() < PRODUCER_THREADS + 128:
                    T.sync_threads(TURN_BARRIERS[0], threads)  # warpgroup 1's turn signal after its last block
            if multicast > 1:
                T.cluster_sync()  # no CTA exits while its peer may still multicast into it or arrive on its barriers

    return grouped_matmul_fp8_split


# The hand-split kernel on a CTA a tile (multicast without persistent). TileLang's default shared-memory merge
# takes the roles' if/else for one statement, in which the ring and the bf16 output tile are both live; its
# liveness-based merge puts the output tile over the ring, idle by then (a named barrier of the consumers
# before the tile's first write), so that three stages of two K blocks fit beside it.
grouped_matmul_fp8_one_tile_kernel = kernel(grouped_matmul_fp8_kernel.factory, name=f"{grouped_matmul_fp8_kernel.name}.one_tile",
                                            pass_configs={"tl.enable_aggressive_shared_memory_merge": True})  # fmt: skip


def shared_bytes(config: GroupedMatmulFp8Config, out_dtype: str) -> int:
    """The kernel's shared memory: the ring, and the bf16 output tile where it cannot reuse the ring
    (persistent: the producer is filling the ring for the next tile meanwhile); ``config.stages`` set,
    an open ``blocks_per_stage`` counted as one."""
    block = 2 * BLOCK * BLOCK + (SF_BOX * 4 if config.sf_load == "tma" else 0)  # x and w tiles (1 byte a code), x's scales
    stage = block * (config.blocks_per_stage or 1)
    out_tile = 0 if np.dtype(out_dtype).name == "float32" else BLOCK * BLOCK * 2
    return config.stages * stage + out_tile if config.persistent else max(config.stages * stage, out_tile)


def _launch(x, x_sf, w, w_sf, start, end, tiles, *, config: GroupedMatmulFp8Config, x_sf_layout, out_dtype) -> Launch:
    config = resolve(config, x.shape[1], out_dtype)
    bps = config.blocks_per_stage
    if bps not in (1, 2) or (bps == 2 and (config.sf_load != "tma" or not config.overlap or x.shape[1] // BLOCK % 2)):
        raise ValueError(f"grouped_matmul_fp8: {config} with K = {x.shape[1]}: blocks_per_stage must be 1, or 2 with "
                         f'sf_load="tma", overlap=True and an even number of {BLOCK}-deep K blocks')  # fmt: skip
    smem = shared_bytes(config, out_dtype)
    if smem > SMEM_LIMIT:
        raise ValueError(f"grouped_matmul_fp8: {config} needs {smem} bytes of shared memory with a {np.dtype(out_dtype).name} output, "
                         f"more than a CTA has ({SMEM_LIMIT}): give it fewer stages")  # fmt: skip
    params = dict(k=x.shape[1], n=w.shape[1], sf_layout=x_sf_layout, out_dtype=np.dtype(out_dtype).name, stages=config.stages,
                  sf_load=config.sf_load, overlap=config.overlap, **({"blocks_per_stage": 2} if bps == 2 else {}))  # fmt: skip
    nbn, mc = w.shape[1] // BLOCK, config.multicast
    if mc not in (1, 2) or nbn % mc:
        raise ValueError(f"grouped_matmul_fp8: {config} with N = {w.shape[1]}: multicast must be 1, or 2 with an even number of "
                         f"{BLOCK}-wide N-tiles")  # fmt: skip
    if config.pingpong and (not config.persistent or config.overlap):
        raise ValueError(f"grouped_matmul_fp8: {config}: pingpong needs persistent=True and overlap=False")
    tiles_total = nbn * tiles.shape[0]  # (N-tiles) x (M-tiles): even with multicast
    extra = ({"multicast": mc} if mc > 1 else {}) | ({"pingpong": True} if config.pingpong else {})
    if config.persistent:
        # The grid is a launch-time value, not part of the cubin: every tile's bytes are the same for any. With
        # multicast, a whole number of clusters: the SMs rounded down to a multiple of the cluster size.
        ctas = min(max(platform.target_num_sms() // mc, 1) * mc, tiles_total)
        return Launch(kernel=grouped_matmul_fp8_kernel, params=dict(params, persistent=True, **extra), scalars=dict(ctas=ctas))
    if mc > 1:  # the hand-split kernel, a CTA a tile
        return Launch(kernel=grouped_matmul_fp8_one_tile_kernel, params=dict(params, **extra), scalars=dict(ctas=tiles_total))
    return Launch(kernel=grouped_matmul_fp8_kernel, params=params)


_op = TileOp(
    name="grouped_matmul_fp8", launch=_launch, operands=("x", "x_sf", "w", "w_sf", "start", "end", "tiles"), results=("out",),
    reference=_reference, config=_config,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Argument rules, shared with grouped_matmul_quantized.


def x_sf_storage(m: int, k: int) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """Shape and dtype of x's 1 × 128 scales ``[M, K/128]`` in each layout (``formats.sf_storage_shape``)."""
    return {layout: F.sf_storage_shape(layout, (m, k // BLOCK)) for layout in SF_LAYOUTS}


def infer_x_sf_layout(name: str, x_sf: jax.Array, m: int, k: int, given) -> str:
    """The layout of x's scales: ``given`` (checked against their shape and dtype), else the one
    layout their shape and dtype fit; a ValueError naming the choices otherwise."""
    storage = x_sf_storage(m, k)
    if given is not None and (not isinstance(given, str) or given not in SF_LAYOUTS):
        raise ValueError(f"{name}: x_sf_layout must be one of {SF_LAYOUTS}, got {given!r}")
    found = (tuple(x_sf.shape), np.dtype(x_sf.dtype))
    fits = [layout for layout in ([given] if given else SF_LAYOUTS) if storage[layout] == found]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise ValueError(f"{name}: x_sf {list(x_sf.shape)} could be 'row' or 'col' storage; say which with x_sf_layout")
    expected = ", ".join(f"{lay}: {d.name}{list(s)}" for lay, (s, d) in storage.items() if given in (None, lay))
    raise ValueError(f"{name}: x_sf must be x's 1 x {BLOCK} scales ({expected}), got {found[1].name}{list(x_sf.shape)}")


def check_blocks(name: str, k: int, n: int) -> None:
    """A ValueError unless K and N are positive multiples of the scales' block."""
    for label, extent in (("K", k), ("N", n)):
        if extent <= 0 or extent % BLOCK:
            raise ValueError(f"{name}: {label} must be a positive multiple of {BLOCK} (the scales' block), got {extent}")


def check_fp8_operands(name: str, x, x_sf, w, w_sf, transpose_w: bool, k: int, n: int, x_sf_layout) -> str:
    """ValueErrors for operands the op does not take (beyond :func:`matmul_operands`' rules); returns
    x's scale layout."""
    if x.dtype != FP8 or w.dtype != FP8:
        raise ValueError(f"{name}: x and w must be {FP8}, got {x.dtype} and {w.dtype}")
    check_blocks(name, k, n)
    g = w.shape[0]
    blocks = (g, n // BLOCK, k // BLOCK) if transpose_w else (g, k // BLOCK, n // BLOCK)
    if tuple(w_sf.shape) != blocks or w_sf.dtype != jnp.float32:
        raise ValueError(f"{name}: w_sf must be float32 {list(blocks)} (w's {BLOCK} x {BLOCK} block scales), got {w_sf.dtype}{list(w_sf.shape)}")
    return infer_x_sf_layout(name, x_sf, x.shape[0], k, x_sf_layout)


def out_dtype_of(name: str, preferred_element_type) -> str:
    out = np.dtype(preferred_element_type if preferred_element_type is not None else jnp.bfloat16).name
    if out not in OUT_DTYPES:
        raise ValueError(f"{name}: preferred_element_type must be bfloat16 or float32, got {out}")
    return out


def kernel_operands(x_sf, w, w_sf, transpose_w: bool, x_sf_layout: str) -> tuple[jax.Array, jax.Array, jax.Array, str]:
    """``(x_sf, w, w_sf, layout)`` as the kernel reads them: column-major x-scales, ``w[G, N, K]``."""
    if x_sf_layout == "row":
        x_sf, x_sf_layout = F.store_sf(x_sf, "col"), "col"
    if not transpose_w:
        w, w_sf = jnp.swapaxes(w, 1, 2), jnp.swapaxes(w_sf, 1, 2)
    return x_sf, w, w_sf, x_sf_layout


# ---------------------------------------------------------------------------------------------
# The public function.


def random_blocks(rng: np.random.Generator, shape: tuple[int, int], block: tuple[int, int]) -> jax.Array:
    """bf16 normal values of about 0.25 times a power of two from 2^-2 to 2^2 drawn per ``block``, so
    that scales differ from block to block (a scale applied to the wrong block shows) while sums over
    K stay of order 1 (the tests' absolute tolerance is not swamped by FP8 rounding)."""
    t, h = shape
    blocks = F.num_blocks(shape, block)
    exponent = rng.integers(-4, 1, size=blocks).astype(np.float32)
    scale = np.repeat(np.repeat(np.exp2(exponent), block[0], axis=0), block[1], axis=1)[:t, :h]
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale, jnp.bfloat16)


def quantized_operands(rng: np.random.Generator, m: int, k: int, n: int, g: int, *, transpose_w: bool, layout: str) -> tuple:
    """``(x, x_sf, w, w_sf)``: :func:`random_blocks` values quantized as ``jax_tilek.quant``'s casts
    would (per token 1 × 128, x's scales stored in ``layout``; per 128 × 128 block of each ``w[g]``)."""
    x8, sf = F.quantize_blocks(random_blocks(rng, (m, k), (1, BLOCK)), "e4m3", (1, BLOCK), round_sf=layout == "col_ue8m0")
    rows, cols = (n, k) if transpose_w else (k, n)
    w8, w_sf = F.quantize_blocks(random_blocks(rng, (g * rows, cols), (BLOCK, BLOCK)), "e4m3", (BLOCK, BLOCK))
    return x8, F.store_sf(sf, layout), w8.reshape(g, rows, cols), w_sf.reshape(g, rows // BLOCK, cols // BLOCK)


def _case(m: int, k: int, n: int, g: int, *, skew: float = 0.0, empty: int = 0, transpose_w: bool = False, segments: bool = False,
          layout: str = "col", out=None, tag: str = "", **options) -> ArgSpec:  # fmt: skip
    """A call on quantized random data (:func:`quantized_operands`): group sizes from
    :func:`random_sizes` (about 90% of m grouped), or with ``segments`` a fused-mapping layout (each
    group padded to a multiple of 128 rows, the tail past the last segment)."""
    w_shape = (g, n, k) if transpose_w else (g, k, n)
    sf_shape, sf_dtype = x_sf_storage(m, k)[layout]
    w_sf_shape = tuple(d // BLOCK if i else d for i, d in enumerate(w_shape))
    int_struct = jax.ShapeDtypeStruct((g,), jnp.int32)
    args = (jax.ShapeDtypeStruct((m, k), FP8), jax.ShapeDtypeStruct(sf_shape, sf_dtype), jax.ShapeDtypeStruct(w_shape, FP8),
            jax.ShapeDtypeStruct(w_sf_shape, jnp.float32))  # fmt: skip
    args += (None, int_struct, int_struct) if segments else (int_struct,)

    def make(rng, *structs):
        operands = quantized_operands(rng, m, k, n, g, transpose_w=transpose_w, layout=layout)
        if not segments:
            return (*operands, random_sizes(rng, m, g, skew, empty, total=m - m // 10))
        sizes = random_sizes(rng, m // 2, g, skew, empty)
        padded = -(-sizes // S.BLOCK_M) * S.BLOCK_M
        end = np.minimum(np.cumsum(padded), m).astype(np.int32)
        return (*operands, None, (end - np.minimum(padded, end)).astype(np.int32), end)

    name = f"e4m3_{m}x{k}x{n}_g{g}_sf_{layout}" + ("_wT" if transpose_w else "") + ("_segments" if segments else "")
    name += (f"_skew{skew:g}" if skew else "") + (f"_empty{empty}" if empty else "") + (f"_{np.dtype(out).name}" if out else "") + tag
    kwargs = dict(transpose_w=transpose_w, preferred_element_type=out) if out is not None else dict(transpose_w=transpose_w)
    return ArgSpec(name, args, kwargs, make=make, **options)


ARG_SPECS = (
    _case(300, 640, 256, 4, empty=1, layout="row", tolerance=2e-2),
    _case(77, 640, 256, 3, skew=2.0, transpose_w=True, tolerance=2e-2),
    _case(520, 640, 256, 8, skew=1.0, empty=2, layout="col_ue8m0", transpose_w=True, tolerance=2e-2),
    _case(640, 640, 256, 4, segments=True, tolerance=2e-2),
    _case(200, 640, 256, 2, out=jnp.float32, tolerance=2e-2),
    _case(0, 640, 256, 2),
    # DeepSeek-V3 expert shapes, weights stored [G, N, K]: gate+up [T, 7168] x [G, 4096, 7168], down [T, 2048] x [G, 7168, 2048].
    _case(8192, 7168, 4096, 8, transpose_w=True, bench=True),
    _case(8192, 2048, 7168, 8, transpose_w=True, bench=True),
    _case(65536, 7168, 4096, 32, skew=1.0, transpose_w=True, bench=True),
    _case(65536, 2048, 7168, 32, segments=True, transpose_w=True, bench=True),
)


@uses(_op, cases=ARG_SPECS)
def grouped_matmul_fp8(
    x: jax.Array,
    x_sf: jax.Array,
    w: jax.Array,
    w_sf: jax.Array,
    group_sizes=None,
    expert_start=None,
    expert_end=None,
    *,
    transpose_w: bool = False,
    x_sf_layout: str | None = None,
    preferred_element_type=None,
    impl=None,
    ops,
) -> jax.Array:
    """An FP8 grouped matmul with block scales: ``out[r] = x̂[r] · ŵ[g]`` for the rows r of group g,
    where ``x̂ = x · x_sf`` per 1 × 128 block and ``ŵ[g] = w[g] · w_sf[g]`` per 128 × 128 block.

    Args:
      x: float8_e4m3fn ``[M, K]``.
      x_sf: x's per-token scales ``[M, K/128]`` as ``jax_tilek.quant.per_token_cast(x, "e4m3", 128,
        ...)`` stores them: fp32 ``"row"`` ``[M, K/128]``, fp32 ``"col"`` ``[K/128, align(M, 4)]``
        (the kernel's layout) or packed UE8M0 ``"col_ue8m0"`` int32 ``[ceil(K/512), align(M, 4)]``.
      w: float8_e4m3fn ``[G, K, N]``, or ``[G, N, K]`` with ``transpose_w`` (the kernel's layout;
        the other one costs an XLA transpose of w per call).
      w_sf: float32 block scales of each ``w[g]`` as stored: ``[G, K/128, N/128]``, or
        ``[G, N/128, K/128]`` with ``transpose_w`` (``jax_tilek.quant.per_block_cast(w[g], "e4m3",
        (128, 128))``'s row layout).
      group_sizes, expert_start, expert_end: the groups, as :func:`jax_tilek.gemm.grouped_matmul`
        takes them (``ragged_dot``'s sizes, or disjoint segments); rows outside every group give zeros.
      transpose_w: w is ``[G, N, K]``.
      x_sf_layout: ``"row"``, ``"col"`` or ``"col_ue8m0"``; by default told from x_sf's shape and dtype.
      preferred_element_type: bfloat16 (default) or float32; accumulation is float32, the scales
        applied per 128-wide K block.

    K and N must be positive multiples of 128. Not differentiable (see
    :func:`grouped_matmul_quantized` for bf16 inputs quantized on the fly).

    Returns: ``[M, N]``.
    """
    name = "grouped_matmul_fp8"
    x, w, groups, transpose_w, k, n = matmul_operands(name, x, w, group_sizes, expert_start, expert_end, transpose_w)
    x_sf, w_sf = checks.as_array(name, "x_sf", x_sf), checks.as_array(name, "w_sf", w_sf)
    layout = check_fp8_operands(name, x, x_sf, w, w_sf, transpose_w, k, n, x_sf_layout)
    out_dtype = out_dtype_of(name, preferred_element_type)
    start, end, tiles = matmul_tiles(name, x, w, groups)
    x_sf, w, w_sf, layout = kernel_operands(x_sf, w, w_sf, transpose_w, layout)
    return ops[0](x, x_sf, w, w_sf, start, end, tiles, impl=impl, x_sf_layout=layout, out_dtype=out_dtype)
