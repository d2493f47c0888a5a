"""Weight scale factors -> DeepGEMM's packed UE8M0 layouts: ``batched_transpose_weight_sf`` (TileKernels v2.1 §2.3).

A weight ``[n, k]`` (or ``[G, n, k]``) quantized in ``bs x bs`` blocks has fp32 power-of-two scales
``sf[(G,) n/bs, k/bs]``. With ``E = (bits >> 23) & 0xFF`` each scale's exponent byte (UE8M0; the sign
and mantissa bits are ignored — TileKernels device-asserts that they are zero, a JAX op cannot trap):

  ``sf0``: for every weight row r, the exponents of its K-direction blocks, four per int32 (block 4p+j
  in byte j, missing blocks 0). TileKernels returns the logical ``(n, ceil(k_sf/4))`` with strides
  ``(1, n)``; here its storage, int32 ``[(G,) ceil(k_sf/4), n]``: ``sf0[p, r]`` packs ``E[r // bs, 4p..4p+3]``.
  ``sf1``: for every weight column c, the exponents of its N-direction blocks: storage int32
  ``[(G,) ceil(n_sf/4), k]``, ``sf1[p, c]`` packs ``E[4p..4p+3, c // bs]``. TileKernels shows it as the
  column-major ``(k, ceil(n_sf/4))`` view, or with ``transpose_sf1`` as ``(ceil(n_sf/4), k)`` itself;
  both are views of this one array, so ``transpose_sf1s`` is validated and changes nothing here.

Rules: ``bs in {32, 128}``; n and k multiples of 128; ``G >= 1``; every input and output array has at
most 2^28 elements (the kernel is generated for the shapes and indexes them with int32; real weight
scales are far smaller: 256 experts of 7168 x 2048 give 7.3M words).

One launch serves a whole list of weights (up to ``MAX_WEIGHTS_PER_LAUNCH``; longer lists take one
launch per that many): each warp owns up to 512 consecutive words of one output row, and finds its weight
by comparing its index with the weights' first-warp offsets (constants of the kernel, which is
generated for the list of shapes; TileKernels binary-searches the same offsets at run time).

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure.)
"""

import linecache
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks
from jax_tilek.kernel import kernel
from jax_tilek.op import Impl, Launch, TileOp, View, uses
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec

BLOCK_SIZES = (32, 128)
ALIGN = 128  # n and k must be multiples of this
THREADS = 256
WORDS_PER_STEP = 128  # a warp stores 4 words (16 bytes) per lane and step
STEPS = 4
STEP_LIST = list(range(STEPS))
SPAN = WORDS_PER_STEP * STEPS  # words of one output row per warp
MAX_WEIGHTS_PER_LAUNCH = 32

# The prim_func's signature depends on the number of weights, so its source is generated (TileLang
# parses a prim_func from its source text, found through linecache).
_SOURCE = '''
def build(T, body, bounds, num_ctas):
    @T.prim_func
    def batched_transpose_weight_sf({params}):
        with T.Kernel(num_ctas, threads={threads}) as bx:
            task = bx * {warps} + T.get_thread_binding(0) // 32
{dispatch}
    return batched_transpose_weight_sf
'''


def warp_tasks(shape: tuple[int, int, int], block_size: int) -> tuple[int, int]:
    """Warps for sf0 and for sf1 of one weight's scales ``(G, n_sf, k_sf)``."""
    g, n_sf, k_sf = shape
    n, k = n_sf * block_size, k_sf * block_size
    return g * F.ceil_div(k_sf, 4) * F.ceil_div(n, SPAN), g * F.ceil_div(n_sf, 4) * F.ceil_div(k, SPAN)


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def weight_sf_kernel(shapes: tuple, block_size: int):
    """sf0 and sf1 of every weight in ``shapes`` (``(G, n_sf, k_sf)`` each) in one launch.

    A warp writes up to 512 consecutive words of one output row in 4 steps of 128: in each, lane l
    packs the 4 exponents of the word at 4l (the 4 words it stores share one scale row or column,
    as bs >= 32) and stores it 4 times with one 16-byte store. The loads of all steps come first.
    """
    import tilelang.language as T

    bs = block_size
    counts = [sum(warp_tasks(s, bs)) for s in shapes]
    bounds = [int(b) for b in np.cumsum([0] + counts)]
    warps = THREADS // 32

    def exponent(value, byte):
        return ((T.reinterpret(value, "uint32") >> T.uint32(23)) & T.uint32(0xFF)) << T.uint32(8 * byte)

    @T.macro
    def body(sf, sf0, sf1, wt):
        groups, n_sf, k_sf = int(sf.shape[0]), int(sf.shape[1]), int(sf.shape[2])
        n, k = n_sf * bs, k_sf * bs
        p0, p1 = F.ceil_div(k_sf, 4), F.ceil_div(n_sf, 4)
        lane = T.get_thread_binding(0) % 32
        words = T.alloc_local((STEPS,), "uint32")
        tasks0 = groups * p0 * F.ceil_div(n, SPAN)
        if wt < tasks0:  # sf0[g, p, r] packs E[g, r // bs, 4p .. 4p + 3]
            per_row = F.ceil_div(n, SPAN)
            g, p = wt // (p0 * per_row), wt // per_row % p0
            base = wt % per_row * SPAN + lane * 4
            for q in STEP_LIST:
                words[q] = T.uint32(0)
                if base + q * WORDS_PER_STEP < n:
                    for j in [0, 1, 2, 3]:
                        if p * 4 + j < k_sf:
                            words[q] = words[q] | exponent(sf[g, (base + q * WORDS_PER_STEP) // bs, p * 4 + j], j)
            for q in STEP_LIST:
                if base + q * WORDS_PER_STEP < n:
                    for v in T.vectorized(4):
                        sf0[g, p, base + q * WORDS_PER_STEP + v] = T.reinterpret(words[q], "int32")
        else:  # sf1[g, p, c] packs E[g, 4p .. 4p + 3, c // bs]
            u = wt - tasks0
            per_row = F.ceil_div(k, SPAN)
            g, p = u // (p1 * per_row), u // per_row % p1
            base = u % per_row * SPAN + lane * 4
            for q in STEP_LIST:
                words[q] = T.uint32(0)
                if base + q * WORDS_PER_STEP < k:
                    for i in [0, 1, 2, 3]:
                        if p * 4 + i < n_sf:
                            words[q] = words[q] | exponent(sf[g, p * 4 + i, (base + q * WORDS_PER_STEP) // bs], i)
            for q in STEP_LIST:
                if base + q * WORDS_PER_STEP < k:
                    for v in T.vectorized(4):
                        sf1[g, p, base + q * WORDS_PER_STEP + v] = T.reinterpret(words[q], "int32")

    tensors = {}
    for i, (g, n_sf, k_sf) in enumerate(shapes):
        tensors[f"sf_{i}"] = ((g, n_sf, k_sf), "float32")
    for i, (g, n_sf, k_sf) in enumerate(shapes):
        tensors[f"sf0_{i}"] = ((g, F.ceil_div(k_sf, 4), n_sf * bs), "int32")
        tensors[f"sf1_{i}"] = ((g, F.ceil_div(n_sf, 4), k_sf * bs), "int32")
    params = ", ".join(f"{name}: T.Tensor({shape}, {dtype!r})" for name, (shape, dtype) in tensors.items())
    dispatch = "\n".join(
        f"            if bounds[{i}] <= task and task < bounds[{i + 1}]:\n"
        f"                body(sf_{i}, sf0_{i}, sf1_{i}, task - bounds[{i}])"
        for i in range(len(shapes))
    )
    source = _SOURCE.format(params=params, threads=THREADS, warps=warps, dispatch=dispatch)
    filename = f"<jax_tilek.quant._weight_sf {len(shapes)} weights {abs(hash(source)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["build"](T, body, bounds, F.ceil_div(bounds[-1], warps))


# ---------------------------------------------------------------------------------------------
# Reference, rules, launch.


def transpose_weight_sf(sf: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """One weight's ``(sf0, sf1)`` storage (pure JAX; TileKernels' ``torch.transpose_weight_sf``)."""
    sf0 = jnp.repeat(F.pack_ue8m0(sf), block_size, axis=-2)  # [..., n, ceil(k_sf/4)]
    sf1 = jnp.repeat(F.pack_ue8m0(jnp.swapaxes(sf, -1, -2)), block_size, axis=-2)  # [..., k, ceil(n_sf/4)]
    return jnp.swapaxes(sf0, -1, -2), jnp.swapaxes(sf1, -1, -2)


def _reference(*sfs, block_size):
    return [transpose_weight_sf(sf, block_size) for sf in sfs]


def _shape3(sf) -> tuple[int, int, int]:
    return tuple(sf.shape) if sf.ndim == 3 else (1, *sf.shape)


MAX_ELEMENTS = 2**28  # per array: the kernel indexes its static shapes with int32, whose folded
# intermediate offsets reach a few times an array's size


def _check(*sfs, block_size):
    name = "batched_transpose_weight_sf"
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{name}: block_size must be one of {BLOCK_SIZES}, got {block_size}")
    for i, sf in enumerate(sfs):
        if sf.dtype != jnp.float32 or sf.ndim not in (2, 3):
            raise ValueError(f"{name}: sf[{i}] must be float32 (n/bs, k/bs) or (G, n/bs, k/bs), got {sf.dtype} {list(sf.shape)}")
        g, n_sf, k_sf = _shape3(sf)
        if g < 1 or n_sf * block_size % ALIGN or k_sf * block_size % ALIGN or n_sf < 1 or k_sf < 1:
            raise ValueError(
                f"{name}: sf[{i}] of shape {list(sf.shape)} with block_size {block_size} means n = {n_sf * block_size}, "
                f"k = {k_sf * block_size}, G = {g}: n and k must be positive multiples of {ALIGN} and G >= 1"
            )
        sizes = (g * n_sf * k_sf, g * F.ceil_div(k_sf, 4) * n_sf * block_size, g * F.ceil_div(n_sf, 4) * k_sf * block_size)
        if max(sizes) > MAX_ELEMENTS:
            raise ValueError(
                f"{name}: sf[{i}] of shape {list(sf.shape)} with block_size {block_size} gives outputs of "
                f"{sizes[1]} and {sizes[2]} words; each array may have at most 2^28 elements (int32 indices)"
            )


def _launch(*sfs, block_size):
    shapes = tuple(_shape3(sf) for sf in sfs)
    views = {f"sf_{i}": View(s) for i, s in enumerate(shapes)}
    for i, (g, n_sf, k_sf) in enumerate(shapes):
        views[f"sf0_{i}"] = View((g, F.ceil_div(k_sf, 4), n_sf * block_size))
        views[f"sf1_{i}"] = View((g, F.ceil_div(n_sf, 4), k_sf * block_size))
    return Launch(weight_sf_kernel, dict(shapes=shapes, block_size=block_size), views=views)


_weight_sf_op = TileOp(name="batched_transpose_weight_sf", launch=_launch, reference=_reference, check=_check)


def _weights(shapes, block_size: int, **options) -> ArgSpec:
    name = ("bench_" if options.get("bench") else "") + f"bs{block_size}_" + "_".join("x".join(map(str, shape)) for shape in shapes)
    structs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return ArgSpec(name, (structs,), dict(block_size=block_size, transpose_sf1s=[i % 2 == 0 for i in range(len(shapes))]), **options)


# Named calls: lists of 2-D and grouped scales, k_sf and n_sf multiples of 4 or not (partial words),
# both block sizes, MoE experts (256 groups of a 7168 x 2048 weight). Scales of any value: the kernel
# reads their exponent bytes only.
ARG_SPECS = (
    _weights([(12, 36), (3, 4, 20)], 32),
    _weights([(56, 16), (4, 7, 3), (2, 8, 40), (1, 1), (256, 56, 16)], 128),
    _weights([(256, 32, 56), (256, 56, 16)], 128, bench=True),  # one DeepSeek-V3 MoE layer: w13 and w2 of 256 experts
)


@uses(_weight_sf_op, cases=ARG_SPECS)
def batched_transpose_weight_sf(
    sf: Sequence[jax.Array], block_size: int, transpose_sf1s: Sequence[bool], *, impl: Impl = None, ops
) -> list[tuple[jax.Array, jax.Array]]:
    """fp32 power-of-two weight scales -> DeepGEMM's packed UE8M0 ``(sf0, sf1)``, one pair per weight.

    Args:
      sf: float32 ``(n/bs, k/bs)`` or ``(G, n/bs, k/bs)`` arrays; n and k multiples of 128.
      block_size: the weights' block size ``bs``, 32 or 128.
      transpose_sf1s: one bool per weight (TileKernels' layout choice for sf1; see the module docstring:
        the storage returned here is the same either way).
      impl: None, ``"tilelang"`` or ``"xla"``.

    Returns:
      ``[(sf0, sf1)]``: int32 ``[(G,) ceil(k_sf/4), n]`` and ``[(G,) ceil(n_sf/4), k]``, bit-exact with
      TileKernels' reference (its outputs' storage).
    """
    name = "batched_transpose_weight_sf"
    if not isinstance(sf, (list, tuple)):
        raise TypeError(f"{name}: sf must be a list or tuple of arrays (one per weight), got {type(sf).__name__}")
    if not isinstance(transpose_sf1s, (list, tuple)):
        raise TypeError(f"{name}: transpose_sf1s must be a list or tuple of bools (one per weight), got {type(transpose_sf1s).__name__}")
    sf = [checks.as_array(name, f"sf[{i}]", s) for i, s in enumerate(sf)]
    flags = tuple(checks.static_bool(name, f"transpose_sf1s[{i}]", t) for i, t in enumerate(transpose_sf1s))
    if len(flags) != len(sf):
        raise ValueError(f"{name}: {len(sf)} scale arrays but {len(flags)} transpose_sf1s flags")
    block_size = checks.static_int(name, "block_size", block_size)
    out = []
    for start in range(0, len(sf), MAX_WEIGHTS_PER_LAUNCH):
        out += ops[0](*sf[start : start + MAX_WEIGHTS_PER_LAUNCH], impl=impl, block_size=block_size)
    return [tuple(pair) for pair in out]
