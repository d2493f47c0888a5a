"""E5M6: per-token cast of whole rows to the 12-bit 1-5-6 float, and the element decoder that
:func:`jax_tilek.quant._cast_back` uses for ``x_special_fmt="e5m6"`` (TileKernels v1 §2.3-2.4).

An E5M6 value is the top 12 bits of an fp16. Eight values pack big-endian into three little-endian
uint32 words (``formats.pack_e5m6``), so a row of H values is ``3H/2`` bytes.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure, so they must be evaluated when the kernel is built.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, View, uses
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec

PRELUDE = device.prelude(device.F16_RZ_BITS)

ROW_ALIGN = 64  # H must be a multiple of this (TileKernels' per-token rule)
MAX_HIDDEN = 32768  # the packed row is staged in shared memory (48 KB)


# ---------------------------------------------------------------------------------------------
# TIR helpers (build expressions while a prim_func is parsed; TileLang is imported lazily).


def code_at_top(w0, w1, w2, i: int):
    """The i-th (0..7) 12-bit code of the words ``w0, w1, w2``, in bits 31..20 of a uint32 (the bits
    below it are garbage)."""
    import tilelang.language as T

    return [
        w0,
        w0 << T.uint32(12),
        (w0 << T.uint32(24)) | (w1 >> T.uint32(8)),
        w1 << T.uint32(4),
        w1 << T.uint32(16),
        (w1 << T.uint32(28)) | (w2 >> T.uint32(4)),
        w2 << T.uint32(8),
        w2 << T.uint32(20),
    ][i]


def top_code_to_f32(top):
    """Exact fp32 value of an E5M6 code held in bits 31..20 (as ``formats.decode_e5m6``).

    The sign goes to bit 31 and the 11 magnitude bits to bits 27..17 of an fp32, whose value is then
    2^-112 times the fp16's (fp16 subnormals become fp32 subnormals, exactly); exponent 31 (fp16
    inf/NaN) becomes fp32 exponent 255. Multiplying by 2^112 is exact.
    """
    import tilelang.language as T

    bits = T.reinterpret(T.reinterpret(top, "int32") >> 3, "uint32") & T.uint32(0x8FFE0000)
    special = (bits & T.uint32(0x0F800000)) == T.uint32(0x0F800000)
    bits = T.if_then_else(special, bits | T.uint32(0x70000000), bits)
    return T.reinterpret(bits, "float32") * T.float32(2.0**112)


# ---------------------------------------------------------------------------------------------
# The cast.


def cast_plan(hidden: int) -> tuple[int, int]:
    """(threads, units per thread) of the cast: a row per CTA, at most 4 units of 8 values per thread."""
    units = hidden // 8
    threads = min(1024, F.align(F.ceil_div(units, 4), 32))
    return threads, F.ceil_div(units, threads)


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def per_token_cast_to_e5m6_kernel(hidden: int, in_dtype: str, sf_layout: str, round_sf: bool):
    """One CTA per row, in units of 8 values (16 or 32 bytes in, 12 out); lane l of a warp owns unit
    ``k * threads + l``, so loads are coalesced. The row's absolute maximum (unsigned maxima of the
    sign-cleared bits) is reduced over the CTA with warp shuffles and shared memory; every thread derives
    the scale and encodes its units (``cvt.rz.f16.f32``, then the 17-bit round-to-nearest-even carry)
    into a shared-memory copy of the packed row, which the CTA then writes with coalesced 16-byte
    stores. Thread 0 stores the scale.
    """
    import tilelang.language as T

    esize = np.dtype(in_dtype).itemsize
    in_words = 8 * esize // 4  # 4 (bf16) or 8 (fp32)
    units = hidden // 8
    out_words = units * 3  # the packed row
    threads, per_thread = cast_plan(hidden)
    warps = threads // 32
    pieces = out_words // 4  # 16-byte stores per row
    N = T.dynamic("N")
    sf_dtype = "int32" if sf_layout == "col_ue8m0" else "float32"
    pad = F.tma_alignment(sf_dtype)  # column-major storage: [1, align(N, 16 / 4)] (formats.sf_storage_shape)
    sf_shape = {"row": (N, 1), "col": (1, T.ceildiv(N, pad) * pad), "col_ue8m0": (1, T.ceildiv(N, pad) * pad)}[sf_layout]
    zero_bits = T.uint32(0x7FFF7FFF) if esize == 2 else T.uint32(0x7FFFFFFF)

    def element(w, k, j):
        """Value j of unit k as fp32."""
        if esize == 4:
            return T.reinterpret(w[k, j], "float32")
        word = w[k, j // 2]
        return T.reinterpret(T.if_then_else(j % 2 == 0, word << T.uint32(16), word & T.uint32(0xFFFF0000)), "float32")

    @T.prim_func
    def per_token_cast_to_e5m6(
        x: T.Tensor((N, hidden * esize // 4), "uint32"),
        y: T.Tensor((N, out_words), "uint32"),
        sf: T.Tensor(sf_shape, sf_dtype),
    ):
        with T.Kernel(N, threads=threads, prelude=PRELUDE) as row:
            T.annotate_min_blocks_per_sm(max(1, min(2048 // threads, 65536 // 64 // threads)))  # <= ~64 registers
            w = T.alloc_local((per_thread, in_words), "uint32")
            codes = T.alloc_local((8,), "uint32")
            red = T.alloc_shared((warps,), "uint32")
            packed = T.alloc_shared((out_words,), "uint32")
            m = T.alloc_var("uint32")
            scale = T.alloc_var("float32")
            inv = T.alloc_var("float32")
            t = T.get_thread_binding(0)
            m = T.uint32(0)
            for k in T.unroll(per_thread):
                c = k * threads + t
                if c < units:
                    for l in T.unroll(in_words // 4):
                        for v in T.vectorized(4):
                            w[k, l * 4 + v] = x[row, c * in_words + l * 4 + v]
                else:
                    for v in T.unroll(in_words):
                        w[k, v] = T.uint32(0)
                for v in T.unroll(in_words):
                    if esize == 2:
                        m = T.call_extern("uint32", "__vmaxu2", m, w[k, v] & zero_bits)
                    else:
                        m = T.max(m, w[k, v] & zero_bits)
            if esize == 2:
                m = T.max(m >> T.uint32(16), m & T.uint32(0xFFFF)) << T.uint32(16)
            for s in T.unroll(5):
                m = T.max(m, T.call_extern("uint32", "__shfl_xor_sync", T.uint32(0xFFFFFFFF), m, 16 >> s))
            if t % 32 == 0:
                red[t // 32] = m
            T.sync_threads()
            for i in T.unroll(warps):
                m = T.max(m, red[i])
            a = T.max(T.reinterpret(m, "float32"), T.float32(F.E5M6.amax_floor))
            if round_sf:
                e = ((T.reinterpret(a / T.float32(F.E5M6.max_value), "int32") - 1) >> 23) + 1 - 127
                scale = T.reinterpret((e + 127) << 23, "float32")
                inv = T.reinterpret((127 - e) << 23, "float32")
            else:
                scale = a / T.float32(F.E5M6.max_value)
                inv = T.float32(F.E5M6.max_value) / a
            if t == 0:
                if sf_layout == "row":
                    sf[row, 0] = scale
                elif sf_layout == "col":
                    sf[0, row] = scale
                else:
                    sf[0, row] = T.reinterpret(T.reinterpret(scale, "uint32") >> T.uint32(23), "int32")
            for k in T.unroll(per_thread):
                c = k * threads + t
                if c < units:
                    for i in T.unroll(8):
                        v = element(w, k, i) * inv
                        h = T.call_extern("uint32", "tilek_f16_rz_bits", v) >> T.uint32(4)
                        rest = T.reinterpret(v, "uint32") & T.uint32(0x1FFFF)
                        codes[i] = h + T.Cast("uint32", (h & T.uint32(1)) + rest > T.uint32(0x10000))
                    # lanes write words 3l + j: distinct banks
                    packed[c * 3] = (codes[0] << T.uint32(20)) | (codes[1] << T.uint32(8)) | (codes[2] >> T.uint32(4))
                    packed[c * 3 + 1] = (
                        (codes[2] << T.uint32(28)) | (codes[3] << T.uint32(16)) | (codes[4] << T.uint32(4)) | (codes[5] >> T.uint32(8))
                    )
                    packed[c * 3 + 2] = (codes[5] << T.uint32(24)) | (codes[6] << T.uint32(12)) | codes[7]
            T.sync_threads()
            for k in T.unroll(F.ceil_div(pieces, threads)):
                p = k * threads + t
                if p < pieces:
                    for v in T.vectorized(4):
                        y[row, p * 4 + v] = packed[p * 4 + v]

    return per_token_cast_to_e5m6


def _reference(x, *, num_per_channels, sf_layout, round_sf):
    data, sf = F.quantize_blocks(x, "e5m6", (1, x.shape[1]), round_sf=round_sf)
    return data, F.store_sf(sf, sf_layout)


def _check(x, *, num_per_channels, sf_layout, round_sf):
    name = "per_token_cast_to_e5m6"
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [T, H], got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"{name}: x must be bfloat16 or float32, got {x.dtype}")
    t, h = x.shape
    if num_per_channels != h:
        raise ValueError(f"{name}: num_per_channels must equal the hidden size {h} of x (whole-row scaling), got {num_per_channels}")
    if h == 0 or h % ROW_ALIGN:
        raise ValueError(f"{name}: the hidden size of x must be a positive multiple of {ROW_ALIGN}, got {h}")
    if h > MAX_HIDDEN:
        raise ValueError(f"{name}: the hidden size of x must be at most {MAX_HIDDEN}, got {h}")
    if t > F.MAX_TOKENS:
        raise ValueError(f"{name}: x may have at most {F.MAX_TOKENS} rows (one CTA per row, int32 row indices), got {t}")


def _launch(x, *, num_per_channels, sf_layout, round_sf) -> Launch:
    t, h = x.shape
    esize = np.dtype(x.dtype).itemsize
    shape = F.sf_storage_shape(sf_layout, (t, 1))[0]
    return Launch(
        kernel=per_token_cast_to_e5m6_kernel,
        params=dict(hidden=h, in_dtype=np.dtype(x.dtype).name, sf_layout=sf_layout, round_sf=round_sf),
        buffers={"y": "data"},
        views={
            "x": View((t, h * esize // 4), dtype=np.uint32),
            "y": View((t, h * 3 // 8), dtype=np.uint32),
            "sf": View(shape, (shape[1], 1)),  # explicit strides: also right for empty storage (T = 0)
        },
        zero_fill=("sf",) if sf_layout != "row" else (),  # the padding columns of column-major scale storage
    )


def _rows(x, *, sf_layout, **static) -> Rows | None:
    """Row-major scales are per token; column-major ones are one row for all tokens."""
    return Rows(("x",), ("data", "sf")) if sf_layout == "row" else None


_per_token_cast_to_e5m6_op = TileOp(
    name="per_token_cast_to_e5m6", launch=_launch, operands=("x",), results=("data", "sf"), reference=_reference, check=_check,
    rows=_rows,
)  # fmt: skip

# The scale layouts as the public flags (use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0).
LAYOUT_FLAGS = {"row": (False, False, False), "row_round": (False, True, False), "col": (True, False, False), "col_ue8m0": (True, True, True)}


def _case(dtype, hidden: int, layout: str, tokens: int = 8, prefix: str = "", **options) -> ArgSpec:
    col, round_sf, packed = LAYOUT_FLAGS[layout]
    kwargs = dict(num_per_channels=hidden, use_tma_aligned_col_major_sf=col, round_sf=round_sf, use_packed_ue8m0=packed)
    return ArgSpec(f"{prefix}{np.dtype(dtype).name}_{layout}_{tokens}x{hidden}", (jax.ShapeDtypeStruct((tokens, hidden), dtype),), kwargs, **options)


# Named calls: both input dtypes, every scale layout and rounding; the benchmark's size ("bench_").
ARG_SPECS = (
    _case(jnp.bfloat16, 7168, "row"),
    _case(jnp.float32, 4096, "col"),
    _case(jnp.bfloat16, 4096, "col_ue8m0"),
    _case(jnp.float32, 7168, "row_round"),
    _case(jnp.bfloat16, 7168, "row", tokens=16384, prefix="bench_", bench=True),
)


@uses(_per_token_cast_to_e5m6_op, cases=ARG_SPECS)
def per_token_cast_to_e5m6(
    x: jax.Array,
    num_per_channels: int,
    use_tma_aligned_col_major_sf: bool = False,
    round_sf: bool = False,
    use_packed_ue8m0: bool = False,
    *,
    impl=None,
    ops,
) -> tuple[jax.Array, jax.Array]:
    """Casts each row to E5M6 with one scale per row (TileKernels' ``per_token_cast(fmt='e5m6')``).

    Args:
      x: ``[T, H]`` bfloat16 or float32, H a multiple of 64 (at most 32768), T < ``formats.MAX_TOKENS``.
      num_per_channels: must equal H (whole-row scaling only).
      use_tma_aligned_col_major_sf, round_sf, use_packed_ue8m0: the scale layout and rounding
        (``formats.sf_layout``); packed UE8M0 needs the other two.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``(data, sf)``: data uint8 ``[T, 3H/2]`` (``formats.pack_e5m6`` of ``formats.encode_e5m6(x · sf_inv)``);
      sf with ``amax = max(max|row|, 1e-4)``, ``sf = amax / 65024``, ``sf_inv = 65024 / amax`` (or the
      power-of-two ceiling with ``round_sf``) in the chosen layout: fp32 ``[T, 1]``, fp32 ``[1, align(T, 4)]``
      or int32 ``[1, align(T, 4)]`` (UE8M0 in byte 0); padding is zero. Bit-exact with
      ``formats.quantize_blocks(x, "e5m6", (1, H))``.
    """
    name = "per_token_cast_to_e5m6"
    x = checks.as_array(name, "x", x)
    num_per_channels = checks.static_int(name, "num_per_channels", num_per_channels)
    col = checks.static_bool(name, "use_tma_aligned_col_major_sf", use_tma_aligned_col_major_sf)
    round_sf = checks.static_bool(name, "round_sf", round_sf)
    packed = checks.static_bool(name, "use_packed_ue8m0", use_packed_ue8m0)
    sf_layout = F.sf_layout(col, packed, round_sf, op=name)
    return ops[0](x, impl=impl, num_per_channels=num_per_channels, sf_layout=sf_layout, round_sf=round_sf)
