"""Quantization formats, scale factors and scale-factor layouts: the reference semantics.

Pure JAX, bit-exact by construction; every kernel in ``jax_tilek.quant`` is tested against these
functions. The rules follow DeepSeek's TileKernels (v1 and v2.1; ``../shared/reference``):

Formats (``fmt``):
  ``e4m3``  float8_e4m3fn, max 448, amax floor 1e-4; stored as ``jnp.float8_e4m3fn``.
  ``e2m1``  FP4, values ±{0, .5, 1, 1.5, 2, 3, 4, 6}, amax floor 6·2^-126; stored two per byte as
            ``uint8`` ``[..., H/2]``, the even column in the low nibble.
  ``e5m6``  12-bit 1-5-6 float (the top 12 bits of an fp16), max 65024, amax floor 1e-4; stored as
            ``uint8`` ``[..., 3H/2]``: eight values per three little-endian uint32 words.

Scale factors: ``sf`` dequantizes (``x ≈ q · sf``), ``sf_inv`` quantizes (``q = cast(x · sf_inv)``).
  ``a = max(amax, floor)``, ``sf = a / max``, ``sf_inv = max / a`` (not ``1 / sf``);
  ``round_sf``: ``sf = 2^ceil(log2(a / max))`` (exponent bit trick), ``sf_inv = 2^-e``, both exact;
  ``use_e4m3_sf``: ``sf`` is rounded to float8_e4m3fn and ``sf_inv = 1 / float(sf)``.

Scale-factor layouts for a logical ``sf[M_b, K_b]`` (``M_b`` row blocks, ``K_b`` column blocks):
  ``"row"``         ``[M_b, K_b]``, fp32 (or float8_e4m3fn with ``use_e4m3_sf``).
  ``"col"``         the TMA-aligned column-major storage ``[K_b, align(M_b, 16 / sf_bytes)]``: element
                    ``(m, k)`` at ``[k, m]``; every column starts 16-byte aligned, so the token axis is
                    padded to a multiple of 4 for fp32 scales and of 16 for float8_e4m3fn scales
                    (TileKernels 2.1); the padding columns are zero.
  ``"col_ue8m0"``   packed UE8M0 in column-major storage: int32 ``[ceil(K_b/4), align(M_b, 4)]``; word
                    ``[i, m]`` holds the biased exponents of blocks ``(m, 4i..4i+3)``, block ``4i+j`` in
                    byte ``j``; unused bytes are zero. Needs power-of-two scales (``round_sf``).
  ``"ue8m0_along_m"`` packed UE8M0 along M (per-channel scales, v2.1): int32 ``[ceil(M_b/4), K_b]``;
                    word ``[i, k]`` holds blocks ``(4i..4i+3, k)``.
:func:`sf_storage_shape` and :func:`tma_aligned` are the single source of these shapes.

Blocks at the edges may be partial (TileKernels: ``M_b = ceil(T/bm)``, ``K_b = ceil(H/bk)``; e.g.
H = 576 with 128-column blocks has 5 blocks, the last of 64 columns). A partial block's amax is taken
over the elements it has, as TileKernels' reference ``torch.cast`` does (it pads the input and masks the
padding out of the maximum); its scale covers those elements only.

In JAX there are no strided views, so the column-major layouts are returned as their storage arrays
(the transposes of TileKernels' logical views) — exactly the bytes DeepGEMM reads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_tilek import checks

SF_LAYOUTS = ("row", "col", "col_ue8m0", "ue8m0_along_m")


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    max_value: float  # largest finite magnitude
    amax_floor: float  # amax is raised to at least this before the scale is computed
    bits: int  # storage bits per element


E4M3 = Format("e4m3", 448.0, 1e-4, 8)
E2M1 = Format("e2m1", 6.0, 6 * 2.0**-126, 4)
E5M6 = Format("e5m6", 65024.0, 1e-4, 12)
FORMATS = {f.name: f for f in (E4M3, E2M1, E5M6)}

E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def align(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def exact_div(a, b) -> jax.Array:
    """IEEE fp32 ``a / b``, elementwise.

    XLA rewrites a division by a broadcast value into a multiplication by its reciprocal, which is
    not correctly rounded; the kernels divide exactly, so the reference must too. Hiding the
    full-size divisor behind an optimization barrier keeps XLA's ``divide``.
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return a / jax.lax.optimization_barrier(b)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _from_bits(b: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(b.astype(jnp.uint32), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Scale factors.


def scale_factors(
    amax: jax.Array,
    fmt: str,
    *,
    round_sf: bool = False,
    use_e4m3_sf: bool = False,
    amax_floor: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(sf, sf_inv)`` for block maxima ``amax`` (fp32, >= 0).

    ``sf`` is fp32, or float8_e4m3fn with ``use_e4m3_sf``; ``sf_inv`` is fp32.
    """
    f = get_format(fmt)
    if round_sf and use_e4m3_sf:
        raise ValueError("round_sf and use_e4m3_sf are exclusive")
    a = jnp.maximum(amax.astype(jnp.float32), np.float32(f.amax_floor if amax_floor is None else amax_floor))
    sf = exact_div(a, np.float32(f.max_value))
    if round_sf:
        exponent = power_of_two_exponent(sf)
        return exp2_exact(exponent), exp2_exact(-exponent)
    if use_e4m3_sf:
        sf8 = sf.astype(jnp.float8_e4m3fn)
        return sf8, exact_div(np.float32(1.0), sf8.astype(jnp.float32))
    return sf, exact_div(np.float32(f.max_value), a)


def power_of_two_exponent(sf: jax.Array) -> jax.Array:
    """``ceil(log2(sf))`` for positive normal fp32 ``sf``, as TileKernels computes it (int32)."""
    b = _bits(sf).astype(jnp.int32)
    return ((b - 1) >> 23) + 1 - 127


def exp2_exact(e: jax.Array) -> jax.Array:
    """``2^e`` in fp32 for normal exponents (-126 <= e <= 127)."""
    return _from_bits(((e.astype(jnp.int32) + 127) << 23).astype(jnp.uint32))


def ue8m0_bytes(sf_pow2: jax.Array) -> jax.Array:
    """The biased exponent byte (UE8M0) of positive power-of-two fp32 scales."""
    return ((_bits(sf_pow2) >> 23) & 0xFF).astype(jnp.uint8)


def ue8m0_to_float(byte: jax.Array) -> jax.Array:
    return _from_bits(byte.astype(jnp.uint32) << 23)


# ---------------------------------------------------------------------------------------------
# Element codecs.


def encode_e2m1(v: jax.Array) -> jax.Array:
    """fp32 -> FP4 e2m1 codes (uint8 0..15): round to nearest even, saturate at 6, sign from the sign bit.
    NaN saturates too (to 6 with its sign bit), as the kernels' conversion does: it arises where a
    scale overflows (an e4m3 scale past 448 is NaN)."""
    a = jnp.abs(v.astype(jnp.float32))
    a = jnp.where(jnp.isnan(a), np.float32(6.0), a)
    # Midpoints of the value grid; a tie goes to the neighbour with the even code.
    code = (
        (a > 0.25).astype(jnp.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).astype(jnp.uint8)
    return code | (jnp.signbit(v).astype(jnp.uint8) << 3)


def decode_e2m1(code: jax.Array) -> jax.Array:
    magnitude = jnp.asarray(E2M1_VALUES)[(code & 7).astype(jnp.int32)]
    return jnp.where((code & 8) != 0, -magnitude, magnitude)


def pack_e2m1(codes: jax.Array) -> jax.Array:
    """``[..., H]`` codes -> ``[..., H/2]`` bytes, the even column in the low nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2).astype(jnp.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_e2m1(packed: jax.Array) -> jax.Array:
    """``[..., H/2]`` bytes -> ``[..., H]`` codes."""
    packed = packed.astype(jnp.uint8)
    return jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def f32_to_f16_bits_rz(v: jax.Array) -> jax.Array:
    """fp32 -> fp16 bits, rounding toward zero (``__float2half_rz``); finite inputs, overflow to 65504."""
    b = _bits(v)
    sign = ((b >> 16) & 0x8000).astype(jnp.uint32)
    exp = ((b >> 23) & 0xFF).astype(jnp.int32)
    mant = b & 0x7FFFFF
    e16 = exp - 112
    normal = (e16.astype(jnp.uint32) << 10) | (mant >> 13)
    shift = jnp.clip(126 - exp, 0, 31).astype(jnp.uint32)
    subnormal = jnp.where(126 - exp > 31, 0, (mant | 0x800000) >> shift)
    magnitude = jnp.where(e16 >= 31, 0x7BFF, jnp.where(e16 >= 1, normal, jnp.where(exp == 0, 0, subnormal)))
    return (sign | magnitude.astype(jnp.uint32)).astype(jnp.uint16)


def encode_e5m6(v: jax.Array) -> jax.Array:
    """fp32 -> 12-bit e5m6 codes (uint16): fp16 round-toward-zero, then round-to-nearest-even decided
    on the 17 fp32 mantissa bits below the 6 kept ones (exact in the normal range)."""
    code = (f32_to_f16_bits_rz(v) >> 4).astype(jnp.uint32)
    carry = ((code & 1) + (_bits(v) & 0x1FFFF)) > 0x10000
    return (code + carry).astype(jnp.uint16)


def decode_e5m6(code: jax.Array) -> jax.Array:
    half = jax.lax.bitcast_convert_type((code.astype(jnp.uint16) << 4).astype(jnp.uint16), jnp.float16)
    return half.astype(jnp.float32)


def pack_e5m6(codes: jax.Array) -> jax.Array:
    """``[..., H]`` 12-bit codes (H % 8 == 0) -> ``[..., 3H/2]`` bytes: per 8 values, 3 uint32 words
    ``v0<<20|v1<<8|v2>>4``, ``v2<<28|v3<<16|v4<<4|v5>>8``, ``v5<<24|v6<<12|v7``, little-endian."""
    v = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    v = [v[..., i] for i in range(8)]
    w0 = (v[0] << 20) | (v[1] << 8) | (v[2] >> 4)
    w1 = (v[2] << 28) | (v[3] << 16) | (v[4] << 4) | (v[5] >> 8)
    w2 = (v[5] << 24) | (v[6] << 12) | v[7]
    words = jnp.stack([w0, w1, w2], axis=-1)
    raw = jax.lax.bitcast_convert_type(words, jnp.uint8)  # [..., H/8, 3, 4], little-endian bytes
    return raw.reshape(*codes.shape[:-1], codes.shape[-1] * 3 // 2)


def unpack_e5m6(packed: jax.Array) -> jax.Array:
    """``[..., 3H/2]`` bytes -> ``[..., H]`` 12-bit codes."""
    n = packed.shape[-1] // 12
    words = jax.lax.bitcast_convert_type(packed.reshape(*packed.shape[:-1], n, 3, 4).astype(jnp.uint8), jnp.uint32)
    w0, w1, w2 = words[..., 0], words[..., 1], words[..., 2]
    m = 0xFFF
    v = [
        w0 >> 20, (w0 >> 8) & m, ((w0 & 0xFF) << 4) | (w1 >> 28), (w1 >> 16) & m,
        (w1 >> 4) & m, ((w1 & 0xF) << 8) | (w2 >> 24), (w2 >> 12) & m, w2 & m,
    ]  # fmt: skip
    return jnp.stack(v, axis=-1).reshape(*packed.shape[:-1], n * 8).astype(jnp.uint16)


def quantize_values(v: jax.Array, fmt: str) -> jax.Array:
    """Scaled fp32 values -> stored data: float8_e4m3fn, packed e2m1 bytes or packed e5m6 bytes.

    e4m3 clamps to ±448 first (the cast itself rounds to nearest even).
    """
    get_format(fmt)
    if fmt == "e4m3":
        return jnp.clip(v.astype(jnp.float32), -448.0, 448.0).astype(jnp.float8_e4m3fn)
    if fmt == "e2m1":
        return pack_e2m1(encode_e2m1(v))
    return pack_e5m6(encode_e5m6(v))


def dequantize_values(data: jax.Array, fmt: str) -> jax.Array:
    """Stored data -> fp32 values (exact)."""
    get_format(fmt)
    if fmt == "e4m3":
        return data.astype(jnp.float32)
    if fmt == "e2m1":
        return decode_e2m1(unpack_e2m1(data))
    return decode_e5m6(unpack_e5m6(data))


def logical_width(data: jax.Array, fmt: str) -> int:
    """Elements per row of stored data."""
    return {"e4m3": data.shape[-1], "e2m1": data.shape[-1] * 2, "e5m6": data.shape[-1] * 2 // 3}[fmt]


# ---------------------------------------------------------------------------------------------
# Scale-factor layouts.


def pack_ue8m0(sf_pow2: jax.Array) -> jax.Array:
    """``[..., K]`` power-of-two fp32 scales -> int32 ``[..., ceil(K/4)]``: 4 exponent bytes per word,
    the first in the low byte; missing tail bytes are zero."""
    k = sf_pow2.shape[-1]
    b = ue8m0_bytes(sf_pow2)
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, align(k, 4) - k)])
    b = b.reshape(*b.shape[:-1], b.shape[-1] // 4, 4)
    return jax.lax.bitcast_convert_type(b, jnp.int32)


def unpack_ue8m0(words: jax.Array, k: int) -> jax.Array:
    """int32 ``[..., W]`` -> fp32 ``[..., k]`` power-of-two scales."""
    b = jax.lax.bitcast_convert_type(words.astype(jnp.int32), jnp.uint8)
    b = b.reshape(*words.shape[:-1], words.shape[-1] * 4)
    return ue8m0_to_float(b[..., :k])


TMA_ALIGNMENT_BYTES = 16  # a TMA-aligned column-major scale column starts on this boundary


def tma_alignment(dtype=np.float32) -> int:
    """Elements of ``dtype`` per 16 bytes: the multiple the token axis of column-major scale storage
    is padded to (4 for fp32 / packed int32 scales, 16 for float8_e4m3fn scales)."""
    return TMA_ALIGNMENT_BYTES // np.dtype(dtype).itemsize


def tma_aligned(m_b: int, dtype=np.float32) -> int:
    """``align(m_b, 16 / sf_bytes)``: the padded token extent of column-major scale storage."""
    return align(m_b, tma_alignment(dtype))


def store_sf(sf: jax.Array, layout: str) -> jax.Array:
    """Logical ``sf[M_b, K_b]`` -> its storage in ``layout`` (see the module docstring).

    The dtype of ``sf`` (fp32, or float8_e4m3fn for "row" / "col") is kept; "col" pads the token axis
    for it (:func:`tma_aligned`)."""
    if layout not in SF_LAYOUTS:
        raise ValueError(f"sf layout must be one of {SF_LAYOUTS}, got {layout!r}")
    m_b = sf.shape[0]
    if layout == "row":
        return sf
    if layout == "col":
        return jnp.pad(sf.T, ((0, 0), (0, tma_aligned(m_b, sf.dtype) - m_b)))
    if layout == "col_ue8m0":
        return jnp.pad(pack_ue8m0(sf).T, ((0, 0), (0, tma_aligned(m_b, np.int32) - m_b)))
    return pack_ue8m0(sf.T).T  # ue8m0_along_m


def sf_layout(
    use_tma_aligned_col_major_sf: bool = False, use_packed_ue8m0: bool = False, round_sf: bool = False, *, op: str | None = None
) -> str:
    """The layout named by TileKernels' flags, checking the combination (ValueError otherwise, prefixed
    with ``op`` when given)."""
    prefix = f"{op}: " if op else ""
    if use_packed_ue8m0:
        if not use_tma_aligned_col_major_sf:
            raise ValueError(f"{prefix}use_packed_ue8m0 needs use_tma_aligned_col_major_sf=True (packed UE8M0 is column-major)")
        if not round_sf:
            raise ValueError(f"{prefix}use_packed_ue8m0 needs round_sf=True (UE8M0 holds powers of two only)")
        return "col_ue8m0"
    return "col" if use_tma_aligned_col_major_sf else "row"


def load_sf(stored: jax.Array, layout: str, num_blocks: tuple[int, int]) -> jax.Array:
    """Storage in ``layout`` -> logical fp32 ``sf[M_b, K_b]``."""
    m_b, k_b = num_blocks
    if layout == "row":
        return stored.astype(jnp.float32)
    if layout == "col":
        return stored[:, :m_b].T.astype(jnp.float32)
    if layout == "col_ue8m0":
        return unpack_ue8m0(stored[:, :m_b].T, k_b)
    if layout == "ue8m0_along_m":
        return unpack_ue8m0(stored.T, m_b).T
    raise ValueError(f"sf layout must be one of {SF_LAYOUTS}, got {layout!r}")


def sf_storage_shape(layout: str, num_blocks: tuple[int, int], dtype=np.float32) -> tuple[tuple[int, int], np.dtype]:
    """Shape and dtype of the storage of ``sf[M_b, K_b]`` in ``layout``.

    ``dtype`` is the scales' dtype for "row" and "col" (fp32, or float8_e4m3fn with ``use_e4m3_sf``;
    it sets the column-major padding); the packed UE8M0 layouts are always int32.
    """
    if layout not in SF_LAYOUTS:
        raise ValueError(f"sf layout must be one of {SF_LAYOUTS}, got {layout!r}")
    m_b, k_b = num_blocks
    dtype = np.dtype(dtype)
    return {
        "row": ((m_b, k_b), dtype),
        "col": ((k_b, tma_aligned(m_b, dtype)), dtype),
        "col_ue8m0": ((ceil_div(k_b, 4), tma_aligned(m_b, np.int32)), np.dtype(np.int32)),
        "ue8m0_along_m": ((ceil_div(m_b, 4), k_b), np.dtype(np.int32)),
    }[layout]


# ---------------------------------------------------------------------------------------------
# Block quantization (the reference every cast is checked against; TileKernels' ``torch.cast``).


def block_amax(x: jax.Array, block: tuple[int, int]) -> jax.Array:
    """``max |x|`` over ``block``-sized tiles of a 2-D array (partial tiles at the edges), fp32."""
    t, h = x.shape
    bm, bk = block
    a = jnp.abs(x.astype(jnp.float32))
    a = jnp.pad(a, ((0, align(t, bm) - t), (0, align(h, bk) - h)))
    return a.reshape(ceil_div(t, bm), bm, ceil_div(h, bk), bk).max(axis=(1, 3))


def expand_blocks(sf: jax.Array, block: tuple[int, int], shape: tuple[int, int]) -> jax.Array:
    """Broadcasts per-block values ``[M_b, K_b]`` back to ``shape``."""
    bm, bk = block
    return jnp.repeat(jnp.repeat(sf, bm, axis=0), bk, axis=1)[: shape[0], : shape[1]]


def quantize_blocks(
    x: jax.Array,
    fmt: str,
    block: tuple[int, int],
    *,
    round_sf: bool = False,
    use_e4m3_sf: bool = False,
    amax_floor: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Quantizes a 2-D array in ``block`` tiles: ``(data, sf[M_b, K_b])`` with logical (row) scales.

    ``data = quantize_values(x · sf_inv)`` with the product taken in fp32.
    """
    sf, sf_inv = scale_factors(block_amax(x, block), fmt, round_sf=round_sf, use_e4m3_sf=use_e4m3_sf, amax_floor=amax_floor)
    scaled = x.astype(jnp.float32) * expand_blocks(sf_inv, block, x.shape)
    return quantize_values(scaled, fmt), sf


def dequantize_blocks(data: jax.Array, sf: jax.Array, fmt: str, block: tuple[int, int], out_dtype=jnp.float32) -> jax.Array:
    """``data · sf`` per ``block`` tile (fp32 product), rounded to ``out_dtype``."""
    values = dequantize_values(data, fmt)
    return (values * expand_blocks(sf.astype(jnp.float32), block, values.shape)).astype(out_dtype)


def num_blocks(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return ceil_div(shape[0], block[0]), ceil_div(shape[1], block[1])


PER_TOKEN_BLOCKS = (16, 32, 64, 128)


def check_num_per_channels(op: str, num_per_channels, hidden: int, allowed=PER_TOKEN_BLOCKS) -> int:
    """The rule for 1 x npc blocks shared by the per-token casts (TileKernels): ``npc`` is one of
    ``allowed`` or the hidden size (whole-row scaling). It need not divide H: the last block is then
    partial (``K_b = ceil(H / npc)``). Returns npc as an int; TypeError / ValueError name ``op``."""
    npc = checks.static_int(op, "num_per_channels", num_per_channels)
    if npc != hidden and npc not in allowed:
        raise ValueError(f"{op}: num_per_channels must be one of {allowed} or the hidden size {hidden}, got {npc}")
    return npc


MAX_TOKENS = 2**31 - 2**10
"""Rows (tokens) a per-token kernel takes: int32 row indices, with headroom for a CTA's rows and the
padding of column-major scale storage (2^31 rows of 64 values would need 128 GiB anyway)."""
