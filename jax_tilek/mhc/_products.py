"""The partials GEMM of mhc_pre_norm_fn in one pass over the residual (TileKernels 2.1's
``out_mul_splitted`` and ``sqrsum_splitted``, which it computes with DeepGEMM's TF32 pre-norm GEMM).

Per token ``x [G]`` bf16 (G = nH, the flattened residual), ``fn [M, G]`` fp32 and split
``s`` of S contiguous column slices of ``G / S``::

    mul[t, s, j] = sum over slice s of x[k] fn[j, k]      (fp32-accurate)
    sq[t, s]     = sum over slice s of x[k]²              (fp32)

x is exact in bf16 and fn is exact as the sum of its three bf16 parts (:func:`bf16_parts`), so
one bf16 tensor-core GEMM against ``b = [hi; mid; lo] [3M, G]`` (zero rows pad it to a multiple of
16) gives each part's products exactly, summed in fp32; ``mul = (p_hi + p_mid) + p_lo``. The sum of
squares comes from the same shared-memory tile of x, so the residual is read once (XLA's dot and
its separate reduction read it twice; the dot's 128-wide tiles also did 5x the work of N = 72).

S is not TileKernels' ``n_splits``: :func:`split_count` picks it from the token count so that each
multiprocessor of an H100 has a CTA; ``mhc_reduce_partials_and_rmsnorm`` sums the
splits in order. Results depend on S (fp32 rounding of the splits' sum), never on the GPU.
"""

import jax
import jax.numpy as jnp

from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp

BLOCK_M = 128  # tokens per CTA: two consumer warpgroups of 64 rows
BLOCK_K = 64  # columns per pipeline step
STAGES = 4
THREADS = 256  # the consumers (TileLang adds the producer warpgroup)
TARGET_CTAS = 132  # one per H100 multiprocessor: the consumers' 240 registers a thread take its register file
MAX_PARTS_ROWS = 256  # wgmma's largest N: 3M padded to 16 must fit


def padded_rows(rows: int) -> int:
    """Rows of ``b`` for ``fn [rows, G]``: three parts, padded to a multiple of 16."""
    return -(-3 * rows // 16) * 16


def takes(group: int, rows: int) -> bool:
    """Whether the kernel takes ``x [T, group]`` by ``fn [rows, group]`` (its launches in a case's count)."""
    return group % BLOCK_K == 0 and padded_rows(rows) <= MAX_PARTS_ROWS


def split_count(tokens: int, group: int) -> int:
    """S: doubled while the grid stays within TARGET_CTAS and each split keeps whole BLOCK_K steps."""
    blocks, s = max(1, -(-tokens // BLOCK_M)), 1
    while blocks * s * 2 <= TARGET_CTAS and group % (2 * s * BLOCK_K) == 0 and 2 * s * BLOCK_K * 4 <= group:
        s *= 2
    return s


def bf16_parts(a: jax.Array, count: int) -> list[jax.Array]:
    """``count`` bf16 arrays whose fp32 sum is ``a`` fp32 to ``8 * count`` significant bits (hi first;
    three parts hold any normal fp32 exactly). Each part but the last is ``a`` truncated to its top 8
    significant bits by a bit mask, not by a bf16 round trip: XLA, allowed excess precision, may drop
    a round trip's rounding and leave ``a - a = 0`` for the next part."""
    parts = []
    for _ in range(count - 1):
        bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFF0000)
        head = jax.lax.bitcast_convert_type(bits, jnp.float32)
        parts.append(head.astype(jnp.bfloat16))  # exact
        a = a - head  # exact
    return [*parts, a.astype(jnp.bfloat16)]


def fn_parts(fn: jax.Array) -> jax.Array:
    """``fn [M, G]`` fp32 -> ``b [padded_rows(M), G]`` bf16: its hi, mid and lo parts, then zeros (the
    kernel's operand; not differentiable: ``_norm_fn.split_bf16_products`` is the differentiable form)."""
    m = fn.shape[0]
    return jnp.pad(jnp.concatenate(bf16_parts(fn, 3)), ((0, padded_rows(m) - 3 * m), (0, 0)))


def products_reference(x: jax.Array, b: jax.Array, *, rows: int, splits: int) -> tuple[jax.Array, jax.Array]:
    """``x [T, G]`` bf16, ``b [NP, G]`` bf16 -> ``(mul [T, S, M], sq [T, S])`` fp32 (module docstring)."""
    t, g = x.shape
    xs = x.reshape(t, splits, g // splits)
    p = jnp.einsum("tsc,psc->tsp", xs, b.reshape(-1, splits, g // splits), preferred_element_type=jnp.float32)
    m = rows
    mul = (p[..., :m] + p[..., m : 2 * m]) + p[..., 2 * m : 3 * m]
    return mul, jnp.sum(jnp.square(xs.astype(jnp.float32)), axis=2)


@kernel
def products_kernel(group: int, rows: int, splits: int):
    """A CTA per (BLOCK_M tokens, split): the TMA ring brings x's and b's BLOCK_K columns, the
    consumers run the wgmma into a [BLOCK_M, NP] fp32 tile and square-sum the same x tile."""
    import tilelang.language as T

    G, M, S = group, rows, splits
    NP = padded_rows(M)
    BM, BK = BLOCK_M, BLOCK_K
    CS = G // S
    TT = T.dynamic("T")

    @T.prim_func
    def mhc_pre_norm_fn_products(
        x: T.Tensor((TT, G), "bfloat16"),
        b: T.Tensor((NP, G), "bfloat16"),
        mul: T.Tensor((TT, S, M), "float32"),
        sq: T.Tensor((TT, S), "float32"),
    ):
        with T.Kernel(T.ceildiv(TT, BM), S, threads=THREADS) as (bt, s):
            x_s = T.alloc_shared((BM, BK), "bfloat16")
            b_s = T.alloc_shared((NP, BK), "bfloat16")
            acc = T.alloc_fragment((BM, NP), "float32")
            squares = T.alloc_fragment((BM, BK), "float32")
            step_sum = T.alloc_fragment((BM,), "float32")
            sq_acc = T.alloc_fragment((BM,), "float32")
            t0 = bt * BM
            c0 = s * CS
            T.clear(acc)
            T.clear(sq_acc)
            for k in T.Pipelined(CS // BK, num_stages=STAGES):
                T.copy(x[t0, c0 + k * BK], x_s)
                T.copy(b[0, c0 + k * BK], b_s)
                T.gemm(x_s, b_s, acc, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(BM, BK):
                    squares[i, j] = T.Cast("float32", x_s[i, j]) * T.Cast("float32", x_s[i, j])
                T.reduce_sum(squares, step_sum, dim=1)
                for i in T.Parallel(BM):
                    sq_acc[i] = sq_acc[i] + step_sum[i]
            c_s = T.alloc_shared((BM, NP), "float32")
            T.copy(acc, c_s)
            for i, j in T.Parallel(BM, M):
                if t0 + i < TT:
                    mul[t0 + i, s, j] = (c_s[i, j] + c_s[i, M + j]) + c_s[i, 2 * M + j]
            for i in T.Parallel(BM):
                if t0 + i < TT:
                    sq[t0 + i, s] = sq_acc[i]

    return mhc_pre_norm_fn_products


products_op = TileOp(
    name="mhc_pre_norm_fn_products", operands=("x", "b"), results=("mul", "sq"), reference=products_reference,
    rows=Rows(("x",), ("mul", "sq")),
    launch=lambda x, b, *, rows, splits: Launch(kernel=products_kernel, params=dict(group=x.shape[1], rows=rows, splits=splits)),
)  # fmt: skip
