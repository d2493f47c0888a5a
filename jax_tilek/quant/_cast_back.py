"""Dequantization: ``cast_back`` / ``per_token_cast_back`` (TileKernels v1 §2.2, §2.4; v2.1 §1.4), the
quantize-dequantize round trip ``per_token_cast_and_cast_back`` (v2.1, made functional), and the FP4
debug decoder ``unpack_from_e2m1fn_x2``.

A QuantTensor is ``(data, sf)``: data is float8_e4m3fn ``[T, H]``, packed FP4 uint8 ``[T, H/2]`` or packed
E5M6 uint8 ``[T, 3H/2]``; sf holds one scale per ``(bm, bk)`` block in one of ``formats.SF_LAYOUTS``.

(No ``from __future__ import annotations`` here: TileLang resolves a prim_func's annotations through
its closure, so they must be evaluated when the kernel is built.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks, device
from jax_tilek.device import static_range as _static
from jax_tilek.kernel import kernel
from jax_tilek.op import Launch, Rows, TileOp, View, check_impl, config_class, uses
from jax_tilek.quant import _e5m6 as e5m6
from jax_tilek.quant import formats as F
from jax_tilek.testing import ArgSpec

PRELUDE = device.prelude(device.STORE16, device.BF16X2, device.E4M3X2_F16X2, device.F16_TO_F32)

OUT_DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
ROW_ALIGN = 64  # the logical hidden size must be a multiple of this (TileKernels)
SF_DTYPES = {"row": ("float32", "float8_e4m3fn"), "col": ("float32", "float8_e4m3fn"), "col_ue8m0": ("int32",), "ue8m0_along_m": ("int32",)}




# ---------------------------------------------------------------------------------------------
# TIR helpers: each builds expressions while a prim_func is parsed.


def _e4m3_top_to_f32(top):
    """Exact fp32 value of an e4m3 byte held in bits 31..24 (NaN codes stay NaN)."""
    import tilelang.language as T

    bits = T.reinterpret(T.reinterpret(top, "int32") >> 4, "uint32") & T.uint32(0x87F00000)
    nan = (bits & T.uint32(0x07F00000)) == T.uint32(0x07F00000)
    return T.reinterpret(T.if_then_else(nan, bits | T.uint32(0x78000000), bits), "float32") * T.float32(2.0**120)


def _e2m1_top_to_f32(top):
    """Exact fp32 value of an FP4 nibble held in bits 31..28."""
    import tilelang.language as T

    bits = T.reinterpret(T.reinterpret(top, "int32") >> 6, "uint32") & T.uint32(0x81C00000)
    return T.reinterpret(bits, "float32") * T.float32(2.0**126)


def _load_scale(sf, layout: str, sf_dtype: str, mb, kb):
    """Scale of block (mb, kb) as fp32, from its storage in ``layout``."""
    import tilelang.language as T

    if layout in ("row", "col"):
        raw = sf[mb, kb] if layout == "row" else sf[kb, mb]
        if sf_dtype == "float32":
            return raw
        return _e4m3_top_to_f32(T.Cast("uint32", raw) << T.uint32(24))  # float8 scales seen as bytes
    word, byte = (sf[kb // 4, mb], kb % 4) if layout == "col_ue8m0" else (sf[mb // 4, kb], mb % 4)
    exponent = (T.reinterpret(word, "uint32") >> T.Cast("uint32", byte * 8)) & T.uint32(0xFF)
    return T.reinterpret(exponent << T.uint32(23), "float32")


def _sf_shape(layout: str, n, bm: int, k_b: int, sf_dtype: str):
    """The kernel's view of the scale storage for ``n`` tokens (``formats.sf_storage_shape``: the token
    axis of column-major storage is padded to 16 bytes, 4 fp32 / int32 or 16 float8_e4m3fn scales)."""
    import tilelang.language as T

    m_b = T.ceildiv(n, bm)
    pad = F.tma_alignment(sf_dtype)
    m_pad = T.ceildiv(m_b, pad) * pad
    return {"row": (m_b, k_b), "col": (k_b, m_pad), "col_ue8m0": (F.ceil_div(k_b, 4), m_pad), "ue8m0_along_m": (T.ceildiv(m_b, 4), k_b)}[layout]


def flat_units(wide: bool, n, per_row: int, threads: int, unroll: int):
    """Index helpers of a flat sequence of ``n * per_row`` thread units, unit ``(bx * unroll + u) *
    threads + t`` in CTA ``bx``: ``(total, unit(bx, u, t), row(c), col(c))``. In int32, or with ``wide``
    in int64 (2^31 units and more); rows and columns are int32 either way."""
    import tilelang.language as T

    if not wide:
        return n * per_row, (lambda bx, u, t: (bx * unroll + u) * threads + t), (lambda c: c // per_row), (lambda c: c % per_row)
    total = T.cast(n, "int64") * T.int64(per_row)
    unit = lambda bx, u, t: T.cast(bx, "int64") * T.int64(unroll * threads) + T.cast(u * threads + t, "int64")  # noqa: E731
    return total, unit, (lambda c: T.cast(c // T.int64(per_row), "int32")), (lambda c: T.cast(c % T.int64(per_row), "int32"))


def needs_wide(units: int, threads: int, unroll: int) -> bool:
    """Whether a flat sequence of ``units`` thread units (plus a grid's overhang) overflows int32."""
    return units + threads * unroll > 2**31 - 1


# ---------------------------------------------------------------------------------------------
# cast_back.

# One thread unit: (values, input words, units in flight per thread). Its output is one 16-byte store
# (two for fp32 from FP4 / E5M6), and the 32 lanes of a warp store 32 consecutive units: coalesced.
UNITS = {
    ("e4m3", "bfloat16"): (8, 2, 8),
    ("e4m3", "float32"): (4, 1, 16),
    ("e2m1", "bfloat16"): (8, 1, 16),
    ("e2m1", "float32"): (8, 1, 16),
    ("e5m6", "bfloat16"): (8, 3, 6),
    ("e5m6", "float32"): (8, 3, 6),
}


def unit_plan(fmt: str, out_dtype: str, bk: int) -> tuple[int, int, int]:
    """(values, input words, unroll) for a thread unit; fewer units in flight when each needs several scales."""
    per_unit, in_words, unroll = UNITS[(fmt, out_dtype)]
    scales = per_unit // bk if bk < per_unit else 1
    return per_unit, in_words, max(2, unroll // scales)


@kernel(pass_configs={"tl.disable_warp_specialized": True}, depends=(e5m6,))
def cast_back_kernel(
    hidden: int, fmt: str, out_dtype: str, block: tuple, sf_layout: str, sf_dtype: str, threads: int = 256, unroll: int = 8,
    wide: bool = False,
):
    """``y = data · sf`` over a flat sequence of thread units (8 values of a row; 4 for e4m3 -> fp32).

    A thread first loads ``unroll`` units and their scales (all loads in flight together), then for each
    unit decodes every value to fp32 with integer bit moves (exact; the format's exponent bias is
    restored by one exact power-of-two product), multiplies by the scale in fp32 (``__fmul_rn``), rounds
    pairs to bf16 with ``cvt.rn.bf16x2.f32`` (or keeps fp32) and writes 16 bytes. Consecutive lanes own
    consecutive units, so every load and store instruction of a warp covers one contiguous span.
    Scale blocks may be partial at the edges (``ceil`` block counts). Unit indices are int32, or int64
    with ``wide`` (2^31 units and more); element offsets are int64 (TileLang).
    """
    import tilelang.language as T

    bm, bk = block
    per_unit, in_words, _ = UNITS[(fmt, out_dtype)]
    out_words = per_unit * np.dtype(out_dtype).itemsize // 4
    units = hidden // per_unit  # per row
    k_b = F.ceil_div(hidden, bk)
    scales = per_unit // bk if bk < per_unit else 1  # distinct scales in one unit
    N = T.dynamic("N")
    total, unit, unit_row, unit_col = flat_units(wide, N, units, threads, unroll)

    def value(w, u, j: int):
        """Value j of unit u as exact fp32."""
        if fmt == "e4m3":
            return _e4m3_top_to_f32(w[u, j // 4] << T.uint32(24 - 8 * (j % 4)))
        if fmt == "e2m1":
            return _e2m1_top_to_f32(w[u, 0] << T.uint32(28 - 4 * j))
        return e5m6.top_code_to_f32(e5m6.code_at_top(w[u, 0], w[u, 1], w[u, 2], j))

    def scaled(w, s, u, j: int):
        return T.call_extern("float32", "__fmul_rn", value(w, u, j), s[u, j // bk if bk < per_unit else 0])

    @T.prim_func
    def cast_back(
        x: T.Tensor((N, units * in_words), "uint32"),
        sf: T.Tensor(_sf_shape(sf_layout, N, bm, k_b, sf_dtype), "uint8" if sf_dtype == "float8_e4m3fn" else sf_dtype),
        y: T.Tensor((N, units * out_words), "uint32"),
    ):
        with T.Kernel(T.ceildiv(total, threads * unroll), threads=threads, prelude=PRELUDE) as bx:
            w = T.alloc_local((unroll, in_words), "uint32")
            s = T.alloc_local((unroll, scales), "float32")
            o = T.alloc_local((4,), "uint32")
            row = T.alloc_var("int32")  # int32 variables keep the index arithmetic of the scales in 32 bits
            col = T.alloc_var("int32")
            t = T.get_thread_binding(0)
            for u in T.unroll(unroll):
                c = unit(bx, u, t)
                if c < total:
                    if in_words == 2:
                        for v in T.vectorized(2):
                            w[u, v] = x[unit_row(c), unit_col(c) * 2 + v]
                    else:
                        for v in T.unroll(in_words):
                            w[u, v] = x[unit_row(c), unit_col(c) * in_words + v]
                    row = unit_row(c)
                    col = unit_col(c) * per_unit
                    for i in T.unroll(scales):
                        s[u, i] = _load_scale(sf, sf_layout, sf_dtype, row // bm, (col + i * bk) // bk)
            for u in T.unroll(unroll):
                c = unit(bx, u, t)
                if c < total:
                    for q in _static(out_words // 4):  # Python loops: j is a constant
                        for p in _static(4):
                            if out_dtype == "bfloat16":
                                o[p] = T.call_extern("uint32", "tilek_bf16x2", scaled(w, s, u, q * 8 + p * 2), scaled(w, s, u, q * 8 + p * 2 + 1))
                            else:
                                o[p] = T.reinterpret(scaled(w, s, u, q * 4 + p), "uint32")
                        T.evaluate(
                            T.call_extern(
                                "handle", "tilek_store16", T.address_of(y[unit_row(c), unit_col(c) * out_words + q * 4]), o[0], o[1], o[2], o[3]
                            )
                        )

    return cast_back


@dataclasses.dataclass(frozen=True)
class _QuantTensor:
    """What a QuantTensor is, as worked out (and checked) from its arrays."""

    fmt: str  # element format
    tokens: int
    hidden: int
    block: tuple[int, int]
    layout: str
    num_blocks: tuple[int, int]


def _resolve(data, sf, *, x_block_size, x_special_fmt=None, sf_layout=None, name="cast_back", **_) -> _QuantTensor:
    """Checks a QuantTensor and infers its element format, logical shape and scale layout (from the
    cast_back op's static options; ``name`` is the public function the errors name)."""
    if x_special_fmt not in (None, "e5m6"):
        raise ValueError(f"{name}: x_special_fmt must be None or 'e5m6', got {x_special_fmt!r}")
    if data.ndim != 2:
        raise ValueError(f"{name}: the data of x must be 2-D [T, ...], got shape {data.shape}")
    if x_special_fmt == "e5m6":
        if data.dtype != jnp.uint8:
            raise ValueError(f"{name}: the data of x: E5M6 data (x_special_fmt='e5m6') must be uint8 [T, 3H/2], got {data.dtype}")
        if data.shape[1] % 3:
            raise ValueError(f"{name}: the data of x: E5M6 data must be uint8 [T, 3H/2]; its width {data.shape[1]} is not a multiple of 3")
        fmt = "e5m6"
    elif data.dtype == jnp.float8_e4m3fn:
        fmt = "e4m3"
    elif data.dtype == jnp.uint8:
        fmt = "e2m1"
    else:
        raise ValueError(f"{name}: the data of x must be float8_e4m3fn, or uint8 (packed FP4, or E5M6 with x_special_fmt='e5m6'), got {data.dtype}")
    tokens, hidden = data.shape[0], F.logical_width(data, fmt)
    if hidden == 0 or hidden % ROW_ALIGN:
        raise ValueError(f"{name}: the logical hidden size of the data of x must be a positive multiple of {ROW_ALIGN}, got {hidden}")
    if hidden >= 2**31 or data.shape[1] >= 2**31:
        raise ValueError(f"{name}: the rows of the data of x must be shorter than 2^31 elements and values (int32 extents), got {data.shape[1]} bytes for {hidden} values")
    if tokens > F.MAX_TOKENS:
        raise ValueError(f"{name}: the data of x may have at most {F.MAX_TOKENS} rows (int32 row indices), got {tokens}")
    if (
        not isinstance(x_block_size, (tuple, list))
        or len(x_block_size) != 2
        or not all(isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)) and b > 0 for b in x_block_size)
    ):
        raise ValueError(f"{name}: x_block_size must be two positive ints (num_per_tokens, num_per_channels), got {x_block_size!r}")
    bm, bk = int(x_block_size[0]), int(x_block_size[1])
    if not (64 % bk == 0 or bk % 64 == 0):
        raise ValueError(f"{name}: num_per_channels (x_block_size[1]) must divide 64 or be a multiple of 64, got {bk}")
    num_blocks = F.num_blocks((tokens, hidden), (bm, bk))
    if sf.ndim != 2:
        raise ValueError(f"{name}: the scales of x must be 2-D, got shape {sf.shape}")
    candidates = [layout for layout, dtypes in SF_DTYPES.items() if np.dtype(sf.dtype).name in dtypes]
    if not candidates:
        raise ValueError(f"{name}: the scales of x must be float32, float8_e4m3fn or int32 (packed UE8M0), got {sf.dtype}")
    if sf_layout is not None:
        if sf_layout not in candidates:
            raise ValueError(f"{name}: sf_layout={sf_layout!r} does not hold {sf.dtype} scales; for them it must be one of {candidates}")
        candidates = [sf_layout]
    elif sf.dtype == jnp.int32:  # packed UE8M0 packs along M for one-column blocks (v2.1), else along K
        candidates = ["ue8m0_along_m" if bk == 1 else "col_ue8m0"]
    shapes = {layout: F.sf_storage_shape(layout, num_blocks, sf.dtype)[0] for layout in candidates}
    matches = [layout for layout in candidates if tuple(sf.shape) == shapes[layout]]
    if not matches:
        expected = ", ".join(f"{shape} ({layout})" for layout, shape in shapes.items())
        raise ValueError(
            f"{name}: the scales of x, of shape {tuple(sf.shape)}, do not fit {fmt} data [{tokens}, {hidden}] with block {(bm, bk)}; "
            f"expected {expected}"
        )
    if len(matches) > 1:
        raise ValueError(
            f"{name}: the scales of x, of shape {tuple(sf.shape)}, fit both layouts {matches} for this data and block; say which with sf_layout"
        )
    return _QuantTensor(fmt, tokens, hidden, (bm, bk), matches[0], num_blocks)


def _cast_back_check(data, sf, *, fmt, **static) -> None:
    if not isinstance(fmt, str) or fmt not in OUT_DTYPES:
        raise ValueError(f"{static.get('name', 'cast_back')}: fmt (the output type) must be 'bf16' or 'fp32', got {fmt!r}")
    _resolve(data, sf, **static)


def _cast_back_reference(data, sf, *, fmt, **static) -> jax.Array:
    q = _resolve(data, sf, **static)
    if q.tokens == 0:  # (formats.load_sf cannot unpack empty UE8M0 storage)
        return jnp.zeros((0, q.hidden), OUT_DTYPES[fmt])
    scales = F.load_sf(sf, q.layout, q.num_blocks)
    return F.dequantize_blocks(data, scales, q.fmt, q.block, out_dtype=OUT_DTYPES[fmt])


@dataclasses.dataclass(frozen=True)
class CastBackConfig:
    """``unroll`` thread units in flight per thread; ``wide``: int64 unit indices (needed from 2^31
    units on; taken there whatever this says)."""

    unroll: int
    wide: bool = False


def _units(data, sf, *, fmt, **static) -> tuple[_QuantTensor, int, int]:
    """(the QuantTensor, values per thread unit, thread units in all)."""
    q = _resolve(data, sf, **static)
    per_unit = UNITS[(q.fmt, np.dtype(OUT_DTYPES[fmt]).name)][0]
    return q, per_unit, q.tokens * (q.hidden // per_unit)


@config_class(CastBackConfig)
def _cast_back_config(data, sf, *, fmt, **static) -> CastBackConfig:
    """:func:`unit_plan`'s unroll; int64 indices only where int32 ones would overflow."""
    q, _, units = _units(data, sf, fmt=fmt, **static)
    unroll = unit_plan(q.fmt, np.dtype(OUT_DTYPES[fmt]).name, q.block[1])[2]
    return CastBackConfig(unroll=unroll, wide=needs_wide(units, 256, unroll))


def _cast_back_launch(data, sf, *, config: CastBackConfig, fmt, **static) -> Launch:
    q, _, units = _units(data, sf, fmt=fmt, **static)
    out_dtype = np.dtype(OUT_DTYPES[fmt])
    t, h = q.tokens, q.hidden
    params = dict(
        hidden=h, fmt=q.fmt, out_dtype=out_dtype.name, block=q.block, sf_layout=q.layout, sf_dtype=np.dtype(sf.dtype).name,
        unroll=config.unroll, wide=config.wide or needs_wide(units, 256, config.unroll),
    )  # fmt: skip
    return Launch(
        kernel=cast_back_kernel,
        params=params,
        buffers={"x": "data"},
        views={
            "x": View((t, h * F.FORMATS[q.fmt].bits // 32), dtype=np.uint32),
            "y": View((t, h * out_dtype.itemsize // 4), dtype=np.uint32),
            # explicit row-major strides: also right for empty storage (T = 0), which the kernel expects
            "sf": View(tuple(sf.shape), (sf.shape[1], 1), dtype=np.uint8 if sf.dtype == jnp.float8_e4m3fn else None),
        },
    )


def _cast_back_rows(data, sf, **static) -> Rows | None:
    """Per-token blocks with row-major scales: a token's data and scales are its own rows."""
    q = _resolve(data, sf, **static)
    return Rows(("data", "sf"), ("y",)) if q.block[0] == 1 and q.layout == "row" else None


_cast_back_op = TileOp(
    name="cast_back", launch=_cast_back_launch, operands=("data", "sf"), results=("y",), reference=_cast_back_reference,
    check=_cast_back_check, config=_cast_back_config, rows=_cast_back_rows,
)  # fmt: skip


def _quant_case(fmt: str, block: tuple[int, int], layout: str, out: str, hidden: int, tokens: int = 8, e4m3_sf: bool = False,
                prefix: str = "", **options) -> ArgSpec:  # fmt: skip
    """A cast_back call on ``tokens`` rows of normal values quantized by ``formats`` (times 64 for e4m3
    data with e4m3 scales, which then stay normal)."""
    shape, sf_dtype = F.sf_storage_shape(layout, F.num_blocks((tokens, hidden), block), jnp.float8_e4m3fn if e4m3_sf else jnp.float32)
    width = {"e4m3": hidden, "e2m1": hidden // 2, "e5m6": hidden * 3 // 2}[fmt]
    data = jax.ShapeDtypeStruct((tokens, width), jnp.float8_e4m3fn if fmt == "e4m3" else jnp.uint8)

    def make(rng, x):
        v = rng.standard_normal((x[0].shape[0], hidden), np.float32) * (64 if e4m3_sf and fmt == "e4m3" else 1)
        values, sf = F.quantize_blocks(jnp.asarray(v), fmt, block, round_sf="ue8m0" in layout, use_e4m3_sf=e4m3_sf)
        return ((values, F.store_sf(sf, layout)),)

    name = f"{prefix}{fmt}_{block[0]}x{block[1]}_{layout}{'_e4m3sf' if e4m3_sf else ''}_{tokens}x{hidden}_{out}"
    kwargs = dict(fmt=out, x_block_size=block, x_special_fmt="e5m6" if fmt == "e5m6" else None, sf_layout=layout)
    return ArgSpec(name, ((data, jax.ShapeDtypeStruct(shape, sf_dtype)),), kwargs, make=make, **options)


# (fmt, block, layout, out, hidden, e4m3 scales): every format, block shape and scale layout, both outputs.
CAST_BACK_CONFIGS = (
    ("e4m3", (1, 128), "row", "bf16", 7168, False),
    ("e4m3", (1, 128), "col", "fp32", 4096, False),
    ("e4m3", (1, 128), "col_ue8m0", "bf16", 7168, False),
    ("e4m3", (1, 7168), "row", "fp32", 7168, False),
    ("e4m3", (1, 32), "row", "bf16", 4096, True),
    ("e4m3", (128, 128), "row", "bf16", 7168, False),
    ("e4m3", (128, 128), "col_ue8m0", "fp32", 4096, False),
    ("e4m3", (128, 1), "row", "bf16", 4096, False),
    ("e4m3", (128, 1), "ue8m0_along_m", "fp32", 4096, False),
    ("e4m3", (32, 32), "col", "fp32", 7168, False),
    ("e2m1", (1, 32), "row", "bf16", 7168, False),
    ("e2m1", (1, 16), "col_ue8m0", "fp32", 4096, False),
    ("e2m1", (1, 16), "row", "bf16", 7168, True),
    ("e2m1", (1, 4096), "col", "bf16", 4096, False),
    ("e2m1", (32, 32), "col_ue8m0", "fp32", 7168, False),
    ("e5m6", (1, 7168), "row", "bf16", 7168, False),
    ("e5m6", (1, 4096), "col", "fp32", 4096, False),
    ("e5m6", (1, 4096), "col_ue8m0", "fp32", 4096, False),
    ("e4m3", (1, 128), "col", "bf16", 4096, True),  # e4m3 scales in 16-byte aligned columns (tokens padded to 16)
    # a partial last channel block (H % bk != 0; TileKernels tests H = 576): every format and layout
    ("e4m3", (1, 128), "row", "bf16", 576, False),
    ("e4m3", (1, 128), "col", "fp32", 576, True),
    ("e4m3", (1, 128), "col_ue8m0", "bf16", 576, False),
    ("e4m3", (128, 128), "col", "fp32", 576, False),
    ("e2m1", (1, 128), "row", "fp32", 192, True),
    ("e2m1", (1, 128), "col_ue8m0", "bf16", 576, False),
    ("e5m6", (1, 128), "row", "bf16", 576, False),
    ("e5m6", (1, 128), "col", "fp32", 192, False),
)

# Named calls: each configuration on 8 tokens; int64 unit indices on ordinary sizes ("wide_", traced
# only here, run on the GPU) and past 2^31 units (4096 wide rows); the benchmarks' sizes ("bench_").
CAST_BACK_SPECS = (
    *(_quant_case(f, b, l, o, h, e4m3_sf=e) for f, b, l, o, h, e in CAST_BACK_CONFIGS),
    *(_quant_case(f, b, l, o, h, e4m3_sf=e, prefix="wide_", config=dict(wide=True), bench=True)
      for f, b, l, o, h, e in (CAST_BACK_CONFIGS[i] for i in (19, 24, 25, 6))),  # fmt: skip
    _quant_case("e4m3", (1, 128), "row", "bf16", 4096, tokens=2**22 + 3, prefix="wide_", bench=True),
    _quant_case("e4m3", (1, 128), "col_ue8m0", "bf16", 7168, tokens=16384, prefix="bench_", bench=True),
    _quant_case("e4m3", (1, 128), "row", "bf16", 4096, tokens=65536, prefix="bench_", bench=True),
    _quant_case("e4m3", (128, 128), "row", "bf16", 7168, tokens=16384, prefix="bench_", bench=True),
    _quant_case("e4m3", (1, 128), "col", "fp32", 4096, tokens=4096, prefix="bench_", bench=True),
    _quant_case("e4m3", (1, 128), "col", "bf16", 7168, tokens=16384, e4m3_sf=True, prefix="bench_", bench=True),
    _quant_case("e4m3", (1, 128), "col_ue8m0", "bf16", 576, tokens=65536, prefix="bench_", bench=True),
    _quant_case("e2m1", (1, 32), "col_ue8m0", "bf16", 7168, tokens=16384, prefix="bench_", bench=True),
    _quant_case("e5m6", (1, 7168), "row", "bf16", 7168, tokens=16384, prefix="bench_", bench=True),
)
PER_TOKEN_CAST_BACK_SPECS = (  # the scale layout inferred
    dataclasses.replace(_quant_case("e2m1", (1, 64), "col", "fp32", 192), kwargs=dict(fmt="fp32", num_per_channels=64)),
)


@uses(_cast_back_op, cases=CAST_BACK_SPECS)
def cast_back(x, fmt: str, x_block_size, x_special_fmt: str | None = None, *, sf_layout: str | None = None, impl=None, ops) -> jax.Array:
    """Dequantizes a QuantTensor: ``out = data · sf`` per ``x_block_size`` block, in fp32, rounded to ``fmt``.

    Args:
      x: ``(data, sf)``. data: float8_e4m3fn ``[T, H]``; uint8 ``[T, H/2]`` packed FP4 (even column in
        the low nibble); or, with ``x_special_fmt="e5m6"``, uint8 ``[T, 3H/2]`` packed E5M6. H is a
        multiple of 64. sf: the scales of ``[ceil(T/bm), ceil(H/bk)]`` blocks as stored in a
        ``formats`` layout: fp32 or float8_e4m3fn row-major ``[M_b, K_b]`` or TMA-aligned column-major
        storage ``[K_b, align(M_b, 16 / sf_bytes)]`` (4 fp32 / 16 e4m3 scales: 16-byte aligned columns,
        TileKernels 2.1); int32 packed UE8M0 column-major ``[ceil(K_b/4), align(M_b, 4)]`` (for
        ``bk == 1``: packed along M, ``[ceil(M_b/4), K_b]``). Edge blocks may be partial (e.g. H = 576
        with bk = 128: 5 blocks, the last of 64 columns). The layout is inferred from dtype and shape
        (sf_layout overrides).
      fmt: the output type, ``"bf16"`` or ``"fp32"`` (TileKernels' naming).
      x_block_size: ``(bm, bk)``, e.g. ``(1, 128)``, ``(128, 128)``, ``(128, 1)``; bk divides 64 or is a
        multiple of 64.
      x_special_fmt: None, or ``"e5m6"`` for E5M6 data.
      sf_layout: one of ``formats.SF_LAYOUTS``; needed only where fp32 / e4m3 storage fits both "row" and
        "col" (``M_b == K_b``, a multiple of 4).
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``[T, H]`` bfloat16 or float32, bit-exact with ``formats.dequantize_blocks``. T < ``formats.MAX_TOKENS``;
      T * H is not limited (the kernel switches to 64-bit unit indices past 2^31 units).
    """
    return _cast_back_call(ops[0], x, fmt, x_block_size, x_special_fmt, sf_layout, impl, "cast_back")


@uses(_cast_back_op, cases=PER_TOKEN_CAST_BACK_SPECS)
def per_token_cast_back(
    x, fmt: str, num_per_channels: int, x_special_fmt: str | None = None, *, sf_layout: str | None = None, impl=None, ops
) -> jax.Array:
    """:func:`cast_back` with per-token blocks ``(1, num_per_channels)`` (npc divides 64 or is a multiple
    of 64; it need not divide H: the last block is partial)."""
    name = "per_token_cast_back"
    npc = checks.static_int(name, "num_per_channels", num_per_channels)
    if npc < 1:
        raise ValueError(f"{name}: num_per_channels must be positive, got {npc}")
    return _cast_back_call(ops[0], x, fmt, (1, npc), x_special_fmt, sf_layout, impl, name)


def _quant_tensor(x, name: str):
    """``(data, sf)`` arrays of a QuantTensor argument, or TypeError / ValueError naming ``name``."""
    if not isinstance(x, (tuple, list)):
        raise TypeError(f"{name}: x must be a QuantTensor (data, sf), got {type(x).__name__}")
    if len(x) != 2:
        raise ValueError(f"{name}: x must be a QuantTensor (data, sf), got {len(x)} items")
    return checks.as_array(name, "the data of x", x[0]), checks.as_array(name, "the scales of x", x[1])


def _cast_back_call(op: TileOp, x, fmt, x_block_size, x_special_fmt, sf_layout, impl, name):
    """Checks the arguments and calls the op with the QuantTensor's block and scale layout resolved
    (so that a vmap folded into the tokens never meets an ambiguous layout)."""
    check_impl(impl, name)
    data, sf = _quant_tensor(x, name)
    if isinstance(x_block_size, list):
        x_block_size = tuple(x_block_size)
    if not isinstance(x_block_size, tuple):
        raise TypeError(f"{name}: x_block_size must be two positive ints (num_per_tokens, num_per_channels), got {x_block_size!r}")
    if sf_layout is not None and not isinstance(sf_layout, str):
        raise TypeError(f"{name}: sf_layout must be None or one of {F.SF_LAYOUTS}, got {sf_layout!r}")
    if x_special_fmt is not None and not isinstance(x_special_fmt, str):
        raise TypeError(f"{name}: x_special_fmt must be None or 'e5m6', got {x_special_fmt!r}")
    if not isinstance(fmt, str):
        raise TypeError(f"{name}: fmt (the output type) must be 'bf16' or 'fp32', got {fmt!r}")
    static = dict(x_block_size=x_block_size, x_special_fmt=x_special_fmt, sf_layout=sf_layout, name=name)
    _cast_back_check(data, sf, fmt=fmt, **static)
    q = _resolve(data, sf, **static)
    return op(data, sf, impl=impl, fmt=fmt, x_block_size=q.block, x_special_fmt=x_special_fmt, sf_layout=q.layout, name=name)


# ---------------------------------------------------------------------------------------------
# per_token_cast_and_cast_back.

ROUND_TRIP_NPC = (16, 32, 64, 128)


@kernel(pass_configs={"tl.disable_warp_specialized": True})
def cast_round_trip_kernel(
    hidden: int, in_dtype: str, fmt: str, num_per_channels: int, round_sf: bool, use_e4m3_sf: bool, threads: int = 256, unroll: int = 2,
    wide: bool = False,
):
    """``y = cast_x(q · sf)`` with ``q = cast_fmt(x · sf_inv)`` per 1 x npc group.

    A thread owns 32 bytes of a row (16 bf16 or 8 fp32 values, two 16-byte loads); a group spans
    ``npc / values`` neighbouring lanes, whose absolute maxima (unsigned integer maxima of the
    sign-cleared bits) meet through ``__shfl_xor_sync``. Rounding to e4m3 uses ``cvt.rn.satfinite``
    (= clamp to ±448, then round to nearest even); to FP4, ``(|v| + M) - M`` with ``M = 1.5 · 2^23 · step``
    rounds to the nearest even multiple of the grid step (0.5 below 2, 1 below 4, else 2) after clamping
    to 6, which is round-to-nearest-even on the e2m1 grid.

    Threads take the chunks of the rows in order, each row padded to ``slots = align(chunks, lanes)``
    chunk slots so that no group straddles two rows: when npc does not divide H, the slots past the
    row's end hold zeros and store nothing, and the partial last group's amax is that of its columns
    (as TileKernels). Slot indices are int32, or int64 with ``wide`` (2^31 slots and more).
    """
    import tilelang.language as T

    esize = np.dtype(in_dtype).itemsize
    per_chunk = 32 // esize  # values per thread chunk (8 words)
    chunks = hidden // per_chunk
    lanes = num_per_channels // per_chunk  # threads per group
    slots = F.align(chunks, lanes)  # chunk slots per row
    f = F.get_format(fmt)
    N, S = T.dynamic("N, S")  # tokens; row stride of x in words
    total, unit, unit_row, unit_col = flat_units(wide, N, slots, threads, unroll)

    def valid(c):
        return c < total if slots == chunks else (c < total) & (unit_col(c) < chunks)

    def element(w, u, j):
        if esize == 4:
            return T.reinterpret(w[u, j], "float32")
        word = w[u, j // 2]
        return T.reinterpret(T.if_then_else(j % 2 == 0, word << T.uint32(16), word & T.uint32(0xFFFF0000)), "float32")

    def round_e2m1(v):
        a = T.min(T.abs(v), T.float32(6.0))
        magic = T.if_then_else(
            a < T.float32(2.0), T.float32(1.5 * 2**22), T.if_then_else(a < T.float32(4.0), T.float32(1.5 * 2**23), T.float32(1.5 * 2**24))
        )
        r = T.call_extern("float32", "__fsub_rn", T.call_extern("float32", "__fadd_rn", a, magic), magic)
        return T.reinterpret(T.reinterpret(r, "uint32") | (T.reinterpret(v, "uint32") & T.uint32(0x80000000)), "float32")

    @T.macro
    def round_pair(r, i):
        """Rounds ``r[i]``, ``r[i + 1]`` to ``fmt`` in place (they stay fp32)."""
        if fmt == "e4m3":
            hh = T.call_extern("uint32", "tilek_e4m3x2_f16x2", r[i], r[i + 1])
            r[i] = T.call_extern("float32", "tilek_f16_to_f32", hh)
            r[i + 1] = T.call_extern("float32", "tilek_f16_to_f32", hh >> T.uint32(16))
        else:
            r[i] = round_e2m1(r[i])
            r[i + 1] = round_e2m1(r[i + 1])

    @T.prim_func
    def cast_round_trip(
        x: T.StridedTensor((N, chunks * 8), (S, 1), "uint32"),
        y: T.Tensor((N, chunks * 8), "uint32"),
    ):
        with T.Kernel(T.ceildiv(total, threads * unroll), threads=threads, prelude=PRELUDE) as bx:
            T.assume(S % 4 == 0)
            w = T.alloc_local((unroll, 8), "uint32")
            r = T.alloc_local((8,), "float32")
            m = T.alloc_var("uint32")
            scale = T.alloc_var("float32")
            inv = T.alloc_var("float32")
            t = T.get_thread_binding(0)
            for u in T.unroll(unroll):
                c = unit(bx, u, t)
                if valid(c):
                    for l in T.unroll(2):
                        for v in T.vectorized(4):
                            w[u, l * 4 + v] = x[unit_row(c), unit_col(c) * 8 + l * 4 + v]
                else:
                    for v in T.unroll(8):
                        w[u, v] = T.uint32(0)
            for u in T.unroll(unroll):
                c = unit(bx, u, t)
                m = T.uint32(0)
                for v in T.unroll(8):
                    if esize == 2:
                        m = T.call_extern("uint32", "__vmaxu2", m, w[u, v] & T.uint32(0x7FFF7FFF))
                    else:
                        m = T.max(m, w[u, v] & T.uint32(0x7FFFFFFF))
                if esize == 2:
                    m = T.max(m >> T.uint32(16), m & T.uint32(0xFFFF)) << T.uint32(16)
                if lanes > 1:
                    for s in T.unroll(lanes.bit_length() - 1):
                        m = T.max(m, T.call_extern("uint32", "__shfl_xor_sync", T.uint32(0xFFFFFFFF), m, lanes >> (s + 1)))
                a = T.max(T.reinterpret(m, "float32"), T.float32(f.amax_floor))
                if round_sf:
                    e = ((T.reinterpret(a / T.float32(f.max_value), "int32") - 1) >> 23) + 1 - 127
                    scale = T.reinterpret((e + 127) << 23, "float32")
                    inv = T.reinterpret((127 - e) << 23, "float32")
                elif use_e4m3_sf:
                    scale = T.call_extern("float32", "tilek_f16_to_f32", T.call_extern("uint32", "tilek_e4m3x2_f16x2", a / T.float32(f.max_value), T.float32(0.0)))
                    inv = T.float32(1.0) / scale
                else:
                    scale = a / T.float32(f.max_value)
                    inv = T.float32(f.max_value) / a
                if valid(c):
                    for q in T.unroll(per_chunk // 4 if esize == 4 else per_chunk // 8):
                        # one 16-byte store: 8 bf16 or 4 fp32 values
                        if esize == 2:
                            for p in T.unroll(4):
                                for h in T.unroll(2):
                                    r[p * 2 + h] = T.call_extern(
                                        "float32", "__fmul_rn", element(w, u, q * 8 + p * 2 + h), inv
                                    )
                                round_pair(r, p * 2)
                            T.evaluate(
                                T.call_extern(
                                    "handle", "tilek_store16", T.address_of(y[unit_row(c), unit_col(c) * 8 + q * 4]),
                                    T.call_extern("uint32", "tilek_bf16x2", T.call_extern("float32", "__fmul_rn", r[0], scale), T.call_extern("float32", "__fmul_rn", r[1], scale)),
                                    T.call_extern("uint32", "tilek_bf16x2", T.call_extern("float32", "__fmul_rn", r[2], scale), T.call_extern("float32", "__fmul_rn", r[3], scale)),
                                    T.call_extern("uint32", "tilek_bf16x2", T.call_extern("float32", "__fmul_rn", r[4], scale), T.call_extern("float32", "__fmul_rn", r[5], scale)),
                                    T.call_extern("uint32", "tilek_bf16x2", T.call_extern("float32", "__fmul_rn", r[6], scale), T.call_extern("float32", "__fmul_rn", r[7], scale)),
                                )
                            )  # fmt: skip
                        else:
                            for p in T.unroll(4):
                                r[p] = T.call_extern("float32", "__fmul_rn", element(w, u, q * 4 + p), inv)
                            for p in T.unroll(2):
                                round_pair(r, p * 2)
                            T.evaluate(
                                T.call_extern(
                                    "handle", "tilek_store16", T.address_of(y[unit_row(c), unit_col(c) * 8 + q * 4]),
                                    T.reinterpret(T.call_extern("float32", "__fmul_rn", r[0], scale), "uint32"),
                                    T.reinterpret(T.call_extern("float32", "__fmul_rn", r[1], scale), "uint32"),
                                    T.reinterpret(T.call_extern("float32", "__fmul_rn", r[2], scale), "uint32"),
                                    T.reinterpret(T.call_extern("float32", "__fmul_rn", r[3], scale), "uint32"),
                                )
                            )  # fmt: skip

    return cast_round_trip


def _window(x, columns) -> tuple[int, int]:
    return (0, x.shape[-1]) if columns is None else (int(columns[0]), int(columns[1]))


def _round_trip_check(x, *, fmt, num_per_channels, round_sf=False, use_e4m3_sf=False, columns=None):
    name = "per_token_cast_and_cast_back"
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [T, S], got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"{name}: x must be bfloat16 or float32, got {x.dtype}")
    if fmt not in ("e4m3", "e2m1"):
        raise ValueError(f"{name}: fmt must be 'e4m3' or 'e2m1', got {fmt!r}")
    if num_per_channels not in ROUND_TRIP_NPC:
        raise ValueError(f"{name}: num_per_channels must be one of {ROUND_TRIP_NPC}, got {num_per_channels!r}")
    if round_sf and use_e4m3_sf:
        raise ValueError(f"{name}: round_sf and use_e4m3_sf are exclusive")
    start, stop = _window(x, columns)
    if columns is not None and not 0 <= start < stop <= x.shape[1]:
        raise ValueError(f"{name}: columns={columns} is not a window of x's last axis ({x.shape[1]})")
    h = stop - start
    if h <= 0 or h % ROW_ALIGN:
        raise ValueError(f"{name}: the hidden size (window width) {h} of x must be a multiple of {ROW_ALIGN} and positive")
    vec = 16 // np.dtype(x.dtype).itemsize
    if start % vec or x.shape[1] % vec:
        raise ValueError(
            f"{name}: rows must stay 16-byte aligned: columns start ({start}) and the row length ({x.shape[1]}) must be multiples of {vec} for {x.dtype}"
        )
    if x.shape[0] > F.MAX_TOKENS:
        raise ValueError(f"{name}: x may have at most {F.MAX_TOKENS} rows (int32 row indices), got {x.shape[0]}")
    if x.shape[1] >= 2**31:
        raise ValueError(f"{name}: x's rows must be shorter than 2^31 elements (int32 extents), got {x.shape[1]}")


def _round_trip_reference(x, *, fmt, num_per_channels, round_sf=False, use_e4m3_sf=False, columns=None):
    start, stop = _window(x, columns)
    xs = x[:, start:stop]
    block = (1, num_per_channels)
    data, sf = F.quantize_blocks(xs, fmt, block, round_sf=round_sf, use_e4m3_sf=use_e4m3_sf)
    return F.dequantize_blocks(data, sf, fmt, block, out_dtype=x.dtype)


def _slots(x, *, num_per_channels, columns=None, **_) -> int:
    """Chunk slots per row (see the kernel)."""
    start, stop = _window(x, columns)
    per_chunk = 32 // np.dtype(x.dtype).itemsize
    return F.align((stop - start) // per_chunk, num_per_channels // per_chunk)


@dataclasses.dataclass(frozen=True)
class RoundTripConfig:
    """``wide``: int64 slot indices (needed from 2^31 slots on; taken there whatever this says)."""

    wide: bool = False


@config_class(RoundTripConfig)
def _round_trip_config(x, **static) -> RoundTripConfig:
    """int64 indices only where int32 ones would overflow."""
    return RoundTripConfig(wide=needs_wide(x.shape[0] * _slots(x, **static), 256, 2))


def _round_trip_launch(x, *, config: RoundTripConfig, fmt, num_per_channels, round_sf=False, use_e4m3_sf=False, columns=None) -> Launch:
    t, width = x.shape
    start, stop = _window(x, columns)
    per_word = 4 // np.dtype(x.dtype).itemsize
    h = stop - start
    wide = config.wide or needs_wide(t * _slots(x, num_per_channels=num_per_channels, columns=columns), 256, 2)
    return Launch(
        kernel=cast_round_trip_kernel,
        params=dict(
            hidden=h, in_dtype=np.dtype(x.dtype).name, fmt=fmt, num_per_channels=num_per_channels,
            round_sf=round_sf, use_e4m3_sf=use_e4m3_sf, wide=wide,
        ),  # fmt: skip
        views={
            "x": View((t, h // per_word), (width // per_word, 1), start // per_word, np.uint32),
            "y": View((t, h // per_word), dtype=np.uint32),
        },
    )


_round_trip_op = TileOp(
    name="per_token_cast_and_cast_back", launch=_round_trip_launch, operands=("x",), results=("y",), reference=_round_trip_reference,
    check=_round_trip_check, config=_round_trip_config, rows=Rows(("x",), ("y",)),
)  # fmt: skip


def _round_trip_case(dtype, fmt: str, npc: int, hidden: int, columns=None, tokens: int = 8, round_sf: bool = False,
                     use_e4m3_sf: bool = False, prefix: str = "", **options) -> ArgSpec:  # fmt: skip
    """A round trip of ``[tokens, hidden]`` (with ``columns``: of that window of rows 512 longer)."""
    width = hidden if columns is None else columns[1] + 512
    flags = "".join(f"_{k}" for k, v in (("round_sf", round_sf), ("e4m3_sf", use_e4m3_sf), ("window", columns)) if v)
    name = f"{prefix}{np.dtype(dtype).name}_{fmt}_1x{npc}{flags}_{tokens}x{hidden}"
    kwargs = dict(fmt=fmt, num_per_channels=npc, round_sf=round_sf, use_e4m3_sf=use_e4m3_sf, columns=columns)
    return ArgSpec(name, (jax.ShapeDtypeStruct((tokens, width), dtype),), kwargs, **options)


# (dtype, fmt, npc, hidden, columns, round_sf, use_e4m3_sf): both formats and input dtypes, every group
# size and scale rule, column windows, partial last groups (H % npc != 0).
ROUND_TRIP_CONFIGS = (
    (jnp.bfloat16, "e4m3", 128, 7168, None, False, False),
    (jnp.bfloat16, "e4m3", 32, 4096, None, True, False),
    (jnp.float32, "e4m3", 64, 4096, None, False, True),
    (jnp.bfloat16, "e2m1", 16, 7168, None, False, True),
    (jnp.float32, "e2m1", 32, 7168, None, True, False),
    (jnp.bfloat16, "e2m1", 128, 4096, (512, 4608), False, False),
    (jnp.float32, "e4m3", 16, 7168, (1024, 8192), False, False),
    (jnp.bfloat16, "e4m3", 128, 576, None, False, False),
    (jnp.float32, "e2m1", 128, 192, None, True, False),
    (jnp.bfloat16, "e2m1", 128, 576, (64, 640), False, True),
    (jnp.float32, "e4m3", 128, 576, None, False, True),
    (jnp.bfloat16, "e4m3", 128, 64, None, True, False),
)

# Named calls: each configuration on 8 tokens; int64 slot indices on ordinary sizes ("wide_", traced
# only here, run on the GPU) and past 2^31 elements (8192 wide rows); the benchmarks' sizes ("bench_").
ROUND_TRIP_SPECS = (
    *(_round_trip_case(d, f, n, h, c, round_sf=r, use_e4m3_sf=e) for d, f, n, h, c, r, e in ROUND_TRIP_CONFIGS),
    *(_round_trip_case(d, f, n, h, c, round_sf=r, use_e4m3_sf=e, prefix="wide_", config=dict(wide=True), bench=True)
      for d, f, n, h, c, r, e in (ROUND_TRIP_CONFIGS[i] for i in (0, 8, 9))),  # fmt: skip
    _round_trip_case(jnp.bfloat16, "e4m3", 128, 8192, tokens=2**18 + 5, prefix="wide_", bench=True),
    _round_trip_case(jnp.bfloat16, "e4m3", 128, 7168, tokens=16384, prefix="bench_", bench=True),
    _round_trip_case(jnp.bfloat16, "e2m1", 16, 4096, tokens=16384, use_e4m3_sf=True, prefix="bench_", bench=True),
    _round_trip_case(jnp.bfloat16, "e4m3", 128, 576, tokens=65536, prefix="bench_", bench=True),
)


@uses(_round_trip_op, cases=ROUND_TRIP_SPECS)



def per_token_cast_and_cast_back(
    x: jax.Array,
    fmt: str,
    num_per_channels: int,
    round_sf: bool = False,
    use_e4m3_sf: bool = False,
    columns: tuple[int, int] | None = None,
    *,
    impl=None,
    ops,
) -> jax.Array:
    """Quantizes and dequantizes per 1 x npc group: TileKernels v2.1's in-place op, made functional.

    Per group: ``amax = max(max|x|, floor)``, ``sf, sf_inv = formats.scale_factors(amax, fmt, round_sf=...,
    use_e4m3_sf=...)``, ``q = cast_fmt(x · sf_inv)``, result ``= cast_x(q · sf)`` (products in fp32).

    Args:
      x: ``[T, S]`` bfloat16 or float32.
      fmt: ``"e4m3"`` or ``"e2m1"``.
      num_per_channels: 16, 32, 64 or 128. It need not divide the hidden size (TileKernels 2.1 asks
        that it does): the last group of a row is then partial, with the semantics of
        :func:`per_token_cast` (its amax over the columns it has).
      round_sf: power-of-two scales. use_e4m3_sf: scales rounded to float8_e4m3fn (exclusive).
      columns: ``(start, stop)``: use only ``x[:, start:stop]`` (read in place; strided rows). The
        hidden size ``stop - start`` is a multiple of 64; start and S keep rows 16-byte aligned.
      impl: None (kernel on Hopper/Blackwell, reference elsewhere), ``"tilelang"`` or ``"xla"``.

    Returns:
      ``[T, stop - start]`` in x's dtype, bit-exact with ``formats.quantize_blocks`` followed by
      ``formats.dequantize_blocks``. T < ``formats.MAX_TOKENS``; T * S is not limited.
    """
    name = "per_token_cast_and_cast_back"
    x = checks.as_array(name, "x", x)
    return ops[0](
        x, impl=impl, fmt=fmt, num_per_channels=checks.static_int(name, "num_per_channels", num_per_channels),
        round_sf=checks.static_bool(name, "round_sf", round_sf), use_e4m3_sf=checks.static_bool(name, "use_e4m3_sf", use_e4m3_sf),
        columns=None if columns is None else _columns(name, columns),
    )  # fmt: skip


def _columns(name: str, columns) -> tuple[int, int]:
    if not isinstance(columns, (tuple, list)) or len(columns) != 2:
        raise TypeError(f"{name}: columns must be a pair of ints (start, stop), got {columns!r}")
    return checks.static_int(name, "columns", columns[0]), checks.static_int(name, "columns", columns[1])


# ---------------------------------------------------------------------------------------------
# unpack_from_e2m1fn_x2.


def unpack_from_e2m1fn_x2(x: jax.Array, out_dtype=jnp.float32, *, impl=None) -> jax.Array:
    """Decodes packed FP4: uint8 (or int8) ``[..., K]`` -> ``[..., 2K]`` of ``out_dtype`` (a debug helper).

    Byte k holds values 2k (low nibble) and 2k+1 (high nibble), each sign · e2m1 (bias 1). Pure JAX on
    every path (``impl`` is accepted, and checked, for uniformity with the other ops).
    """
    name = "unpack_from_e2m1fn_x2"
    check_impl(impl, name)
    x = checks.as_array(name, "x", x)
    if x.dtype not in (jnp.uint8, jnp.int8):
        raise ValueError(f"{name}: x must be uint8 or int8, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have at least 1 dimension so the last dim can be doubled")
    try:
        out_dtype = jnp.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"{name}: out_dtype must be a floating dtype, got {out_dtype!r}") from None
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"{name}: out_dtype must be a floating dtype, got {out_dtype}")
    codes = F.unpack_e2m1(jax.lax.bitcast_convert_type(x, jnp.uint8))
    return F.decode_e2m1(codes).astype(out_dtype)
