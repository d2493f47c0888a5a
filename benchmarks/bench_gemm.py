"""Grouped GEMM benchmarks (family "gemm"): grouped_matmul forward and forward + backward at
DeepSeek-V3 expert shapes (E = 256 experts over 8 or 32 expert-parallel ranks: G = 32 or 8 local
experts; hidden 7168, expert intermediate 2048: the gate+up projection [T, 7168] x [G, 7168, 4096] and
the down projection [T, 2048] x [G, 2048, 7168]; T = 4K-64K routed rows; balanced and skewed group
sizes), in TFLOP/s (useful flops, 2·M·K·N forward, 3x that forward + backward) beside
``jax.lax.ragged_dot``, a dense einsum over groups padded to the largest, and a dense bf16 ``jnp.dot``
of the same M, K, N (the peak to compare with). At the same shapes, FP8: ``grouped_matmul_fp8`` of
operands quantized beforehand (e4m3, x per token 1 × 128 with column-major scales, weights per
128 × 128 block stored ``[G, N, K]``: the kernel's layouts, as DeepGEMM takes them), its ratio to the
bf16 kernel, and ``grouped_matmul_quantized`` (bf16 in, the two casts and the FP8 product; its
backward FP8 too: dy cast per token for dx, x and dy cast per channel and transposed for dw). The
weight-gradient products alone: ``grouped_matmul_wgrad`` (bf16) and ``grouped_matmul_wgrad_fp8`` of
operands quantized beforehand (per channel, transposed: DeepSeek-V3's wgrad inputs).

``python -m benchmarks.bench_gemm`` prints the table (``--json`` writes it); ``CASES`` (the bf16
forward against ragged_dot, the FP8 forward against plain JAX's dequantize-to-bf16-then-ragged_dot,
timed by the shared harness) run with ``python -m benchmarks.run --only gemm``. Group sizes are drawn
on the host once per shape (``random_sizes``: multinomial over ``rank^-skew``).
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import gemm, quant
from jax_tilek.gemm._grouped_wgrad import random_sizes

from benchmarks.harness import Case, random_on_device, time_per_call

FAMILY = "gemm"
PROJECTIONS = {"up": (7168, 4096), "down": (2048, 7168)}
SHAPES = [(t, g, proj, skew) for g in (8, 32) for t in (4096, 16384, 65536) for proj in ("up", "down") for skew in (0.0, 1.5)]
MAX_PADDED_BYTES = 24 * 2**30  # the padded einsum is skipped where its operands pass this


@functools.cache
def sizes_for(t: int, g: int, skew: float) -> np.ndarray:
    return random_sizes(np.random.default_rng(t * 1000 + g), t, g, skew)


def _inputs(key, t, k, n, g):
    kx, kw = jax.random.split(key)
    return random_on_device(kx, jax.ShapeDtypeStruct((t, k), jnp.bfloat16)), random_on_device(kw, jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16))


def _name(t, g, proj, skew):
    return f"{proj}_T{t}_G{g}" + (f"_skew{skew:g}" if skew else "")


def _case(t, g, proj, skew) -> Case:
    k, n = PROJECTIONS[proj]
    sizes = sizes_for(t, g, skew)
    make = lambda key: (*_inputs(key, t, k, n, g), jnp.asarray(sizes))  # noqa: E731
    kernel = lambda x, w, s: gemm.grouped_matmul(x, w, s, impl="tilelang")  # noqa: E731
    xla = lambda x, w, s: jax.lax.ragged_dot(x, w, s)  # noqa: E731
    min_bytes = 2 * (t * k + g * k * n + t * n)
    params = {"shape": f"{t}x{k}x{n}", "dtype": "bfloat16", "groups": g, "skew": skew}
    return Case(FAMILY, _name(t, g, proj, skew), make, kernel, xla, min_bytes, params)


def _fp8_inputs(key, t, k, n, g):
    """e4m3 operands as jax_tilek.quant's casts make them (their references, run on the device): x per
    token with column-major scales, each w[g] per 128 x 128 block, stored [G, N, K]."""
    return _fp8_inputs_of(*_inputs(key, t, k, n, g))


def _fp8_inputs_of(x, w):
    g, k, n = w.shape
    x8, x_sf = quant.per_token_cast(x, "e4m3", 128, use_tma_aligned_col_major_sf=True, impl="xla")
    w8, w_sf = quant.per_block_cast(jnp.swapaxes(w, 1, 2).reshape(g * n, k), "e4m3", (128, 128), impl="xla")
    return x8, x_sf, w8.reshape(g, n, k), w_sf.reshape(g, n // 128, k // 128)


def _dequantized_ragged_dot(x8, x_sf, w8, w_sf, sizes):
    """FP8 in plain JAX: the operands dequantized to bf16, then ``jax.lax.ragged_dot``."""
    t, (g, n, k) = x8.shape[0], w8.shape
    x = (x8.astype(jnp.float32) * jnp.repeat(x_sf[:, :t].T, 128, axis=1)).astype(jnp.bfloat16)
    w = (w8.astype(jnp.float32) * jnp.repeat(jnp.repeat(w_sf, 128, axis=1), 128, axis=2)).astype(jnp.bfloat16)
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), sizes)


def _fp8_case(t, g, proj, skew, sf_load: str | None = None, overlap: bool = False, persistent: bool = False, multicast: int = 1,
              pingpong: bool = False, stages: int | None = None, blocks_per_stage: int = 1) -> Case:  # fmt: skip
    """The FP8 forward; given ``sf_load`` or ``overlap``, with those GroupedMatmulFp8Config fields
    set (and named in the case's name); ``persistent`` with a 5-stage ring (6 and the bf16 output
    tile's own 32 KB do not fit) or two K blocks a stage in 2, ``pingpong`` (the consumer warpgroups'
    wgmmas in turn); ``multicast`` (2: x tiles shared by clusters of two CTAs, persistent or on a CTA
    a tile); ``stages``: another ring depth;
    ``blocks_per_stage``: K blocks a ring stage (a named variant has one unless told; the plain case,
    the default: two where K allows)."""
    k, n = PROJECTIONS[proj]
    sizes = sizes_for(t, g, skew)
    make = lambda key: (*_fp8_inputs(key, t, k, n, g), jnp.asarray(sizes))  # noqa: E731
    config = {"sf_load": sf_load, "overlap": overlap} if sf_load else {}
    if persistent:
        config.update(persistent=True, pingpong=pingpong, **({"stages": 5} if blocks_per_stage == 1 else {}))
    if multicast > 1:
        config["multicast"] = multicast
    if stages is not None:
        config["stages"] = stages
    if config:
        config["blocks_per_stage"] = blocks_per_stage  # named variants: one K block a stage unless asked
    fp8 = gemm.grouped_matmul_fp8.with_config(**config) if config else gemm.grouped_matmul_fp8
    kernel = lambda x8, x_sf, w8, w_sf, s: fp8(x8, x_sf, w8, w_sf, s, transpose_w=True, impl="tilelang")  # noqa: E731
    min_bytes = t * k + g * k * n + 2 * t * n + 4 * (t * k // 128 + g * k * n // 128**2)
    params = {"shape": f"{t}x{k}x{n}", "dtype": "float8_e4m3fn", "groups": g, "skew": skew}
    name = "fp8_" + _name(t, g, proj, skew) + (f"_sf_{sf_load}" if sf_load else "") + ("_overlap" if overlap else "") + ("_persistent" if persistent else "")
    name += (f"_multicast{multicast}" if multicast > 1 else "") + ("_pingpong" if pingpong else "") + (f"_stages{stages}" if stages else "")
    name += "_pairs" if blocks_per_stage == 2 else ""
    return Case(FAMILY, name, make, kernel, _dequantized_ragged_dot, min_bytes, params)


CASES = [_case(*s) for s in SHAPES] + [_fp8_case(*s) for s in SHAPES]
# x's scales through the TMA ring instead of global loads (GroupedMatmulFp8Config.sf_load), beside the default;
# each also with the promotion under the next K block's wgmma (GroupedMatmulFp8Config.overlap); and the default
# (tma, overlap) on a persistent grid (GroupedMatmulFp8Config.persistent, 5 stages), without and with the x tile
# multicast across clusters of two CTAs (GroupedMatmulFp8Config.multicast); and (tma, no overlap) persistent with
# the consumer warpgroups taking turns (GroupedMatmulFp8Config.pingpong); the default with a 4-stage ring, whose
# stage index and phase are a mask and a shift instead of a division by 6; two K blocks a stage
# (GroupedMatmulFp8Config.blocks_per_stage) in rings of 3 and 2 stages; and two K blocks a stage in the hand-split
# kernels: with the x tile multicast on a CTA a tile (3 stages, the output tile over the ring), persistent (2
# stages beside the output tile) without and with the multicast.
VARIANT_SHAPES = [(16384, 8, "up", 0.0), (16384, 32, "down", 1.5)]
VARIANTS = [_fp8_case(*s, sf_load=v, overlap=o) for s in VARIANT_SHAPES for o in (False, True) for v in ("ldg", "tma")] + [
    _fp8_case(*s, sf_load="tma", overlap=True, persistent=True, multicast=mc) for s in VARIANT_SHAPES for mc in (1, 2)
] + [_fp8_case(*s, sf_load="tma", overlap=False, persistent=True, pingpong=True) for s in VARIANT_SHAPES] + [
    _fp8_case(*s, sf_load="tma", overlap=True, stages=st, blocks_per_stage=bps) for s in VARIANT_SHAPES for st, bps in ((4, 1), (3, 2), (2, 2))
] + [
    _fp8_case(*s, sf_load="tma", overlap=True, persistent=p, multicast=mc, blocks_per_stage=2)
    for s in VARIANT_SHAPES for p, mc in ((False, 2), (True, 1), (True, 2))
]


def _padded(x, w, sizes: np.ndarray):
    """The dense einsum over groups padded to the largest (a static capacity from the host's sizes)."""
    cap = int(sizes.max())
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = np.minimum(offsets[:, None] + np.arange(cap)[None], x.shape[0] - 1)  # [G, cap] gather rows
    valid = np.arange(cap)[None] < sizes[:, None]
    xg = jnp.where(jnp.asarray(valid)[..., None], x[jnp.asarray(rows)], 0)
    return jnp.einsum("gck,gkn->gcn", xg, w, preferred_element_type=jnp.float32).astype(x.dtype)


def precompile(arch: str, shapes) -> None:
    """Compiles every kernel :func:`measure` launches at ``shapes`` into the kernel cache."""
    from jax_tilek import deploy

    for t, g, proj, skew in shapes:
        k, n = PROJECTIONS[proj]
        s = jax.ShapeDtypeStruct((g,), jnp.int32)
        x, w = jax.ShapeDtypeStruct((t, k), jnp.bfloat16), jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16)
        fp8 = jax.eval_shape(lambda x, w: _fp8_inputs_of(x, w), x, w)
        for fn in (gemm.grouped_matmul, gemm.grouped_matmul_quantized):
            deploy.precompile(lambda x, w, s: fn(x, w, s, impl="tilelang"), x, w, s, arch=arch)
            deploy.precompile(jax.grad(lambda x, w, s: jnp.sum(fn(x, w, s, impl="tilelang").astype(jnp.float32)), argnums=(0, 1)), x, w, s, arch=arch)
        deploy.precompile(lambda *a: gemm.grouped_matmul_fp8(*a[:4], a[4], transpose_w=True, impl="tilelang"), *fp8, s, arch=arch)
        dy = jax.ShapeDtypeStruct((t, n), jnp.bfloat16)
        deploy.precompile(lambda x, dy, s: gemm.grouped_matmul_wgrad(x, dy, s, impl="tilelang"), x, dy, s, arch=arch)
        wgrad_fp8 = jax.eval_shape(_wgrad_fp8_inputs_of, x, dy)
        deploy.precompile(lambda *a: gemm.grouped_matmul_wgrad_fp8(*a, impl="tilelang"), *wgrad_fp8, s, arch=arch)


def _wgrad_fp8_inputs_of(x, dy):
    """x and dy cast per channel (128 rows a block) and transposed, as DeepSeek-V3's wgrad takes them."""
    return (*quant.per_channel_cast_and_transpose(x, "e4m3", impl="xla"), *quant.per_channel_cast_and_transpose(dy, "e4m3", impl="xla"))


def measure(t, g, proj, skew, sets: int = 2) -> dict:
    k, n = PROJECTIONS[proj]
    sizes = sizes_for(t, g, skew)
    s = jnp.asarray(sizes)
    inputs = [_inputs(key, t, k, n, g) for key in jax.random.split(jax.random.key(0), sets)]
    flops = 2 * t * k * n
    row = {"case": _name(t, g, proj, skew), "M": t, "K": k, "N": n, "G": g, "skew": skew, "max_group": int(sizes.max())}

    def measure_into(name, fn, arg_sets, scale=1):
        """``row[name]``: TFLOP/s of ``fn``; where it fails (XLA's ragged_dot out of memory, say),
        ``row[name + "_error"]`` instead, and the other measurements go on."""
        try:
            row[name] = scale * flops / time_per_call(fn, arg_sets) / 1e12
        except Exception as e:  # noqa: BLE001
            row[name + "_error"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            jax.clear_caches()

    def grad_of(f):
        return jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), argnums=(0, 1))

    measure_into("kernel_fwd", lambda x, w: gemm.grouped_matmul(x, w, s, impl="tilelang"), inputs)
    measure_into("kernel_fwd_bwd", grad_of(lambda x, w: gemm.grouped_matmul(x, w, s, impl="tilelang")), inputs, 3)
    fp8_inputs = [_fp8_inputs(key, t, k, n, g) for key in jax.random.split(jax.random.key(0), sets)]
    measure_into("fp8_fwd", lambda *a: gemm.grouped_matmul_fp8(*a, s, transpose_w=True, impl="tilelang"), fp8_inputs)
    del fp8_inputs
    measure_into("quantized_fwd", lambda x, w: gemm.grouped_matmul_quantized(x, w, s, impl="tilelang"), inputs)
    measure_into("quantized_fwd_bwd", grad_of(lambda x, w: gemm.grouped_matmul_quantized(x, w, s, impl="tilelang")), inputs, 3)
    dys = [random_on_device(key, jax.ShapeDtypeStruct((t, n), jnp.bfloat16)) for key in jax.random.split(jax.random.key(2), sets)]
    measure_into("wgrad_bf16", lambda x, dy: gemm.grouped_matmul_wgrad(x, dy, s, impl="tilelang"), [(x, dy) for (x, _), dy in zip(inputs, dys)])
    wgrad_inputs = [jax.jit(_wgrad_fp8_inputs_of)(x, dy) for (x, _), dy in zip(inputs, dys)]
    del dys
    measure_into("wgrad_fp8", lambda *a: gemm.grouped_matmul_wgrad_fp8(*a, s, impl="tilelang"), wgrad_inputs)
    del wgrad_inputs
    measure_into("dense_dot", lambda x, w: jnp.dot(x, w), [(x, w[0]) for x, w in inputs])
    measure_into("ragged_dot_fwd", lambda x, w: jax.lax.ragged_dot(x, w, s), inputs)
    measure_into("ragged_dot_fwd_bwd", grad_of(lambda x, w: jax.lax.ragged_dot(x, w, s)), inputs, 3)
    if 2 * g * int(sizes.max()) * (k + n) <= MAX_PADDED_BYTES:
        measure_into("padded_einsum_fwd", lambda x, w: _padded(x, w, sizes), inputs)
    if "fp8_fwd" in row and "kernel_fwd" in row:
        row["fp8_of_bf16"] = row["fp8_fwd"] / row["kernel_fwd"]
    if "quantized_fwd_bwd" in row and "kernel_fwd_bwd" in row:
        row["fp8_fwd_bwd_of_bf16"] = row["quantized_fwd_bwd"] / row["kernel_fwd_bwd"]
    if "dense_dot" in row and "kernel_fwd" in row:
        row["kernel_of_dense"] = row["kernel_fwd"] / row["dense_dot"]
    return row


@functools.cache
def dense_peak() -> float:
    """TFLOP/s of a large dense bf16 jnp.dot (8192³)."""
    sets = [tuple(random_on_device(k, jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)) for k in jax.random.split(key)) for key in jax.random.split(jax.random.key(1), 4)]
    return 2 * 8192**3 / time_per_call(jnp.dot, sets) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--only", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--precompile", metavar="ARCH", help="compile the kernels the chosen cases launch, and exit")
    options = parser.parse_args()
    only = set(filter(None, options.only.split(",")))
    if options.precompile:
        return precompile(options.precompile, [s for s in SHAPES if not only or _name(*s) in only])
    rows = []
    peak = dense_peak()
    print(f"{jax.devices()[0].device_kind}: dense bf16 8192^3 jnp.dot {peak:.0f} TFLOP/s", flush=True)
    for shape in SHAPES:
        if only and _name(*shape) not in only:
            continue
        row = measure(*shape)
        if "kernel_fwd" in row:
            row["kernel_of_peak"] = row["kernel_fwd"] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = ["kernel_fwd", "ragged_dot_fwd", "padded_einsum_fwd", "kernel_fwd_bwd", "ragged_dot_fwd_bwd", "dense_dot", "kernel_of_peak",
            "fp8_fwd", "fp8_of_bf16", "quantized_fwd", "quantized_fwd_bwd", "fp8_fwd_bwd_of_bf16", "wgrad_bf16", "wgrad_fp8"]
    print("case".ljust(24) + "".join(k.rjust(20) for k in keys))
    for r in rows:
        print(r["case"].ljust(24) + "".join((f"{r[k]:.2f}" if k in r else "-").rjust(20) for k in keys))
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "dense_peak_tflops": peak, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
