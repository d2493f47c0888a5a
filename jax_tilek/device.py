"""jax_tilek's device-code library: the CUDA/PTX helpers that kernels inject with ``T.Kernel(..., prelude=...)``.

Each helper is a :class:`Snippet`: a named, documented piece of CUDA defining one or a few
``__device__ __forceinline__`` functions, all named ``tilek_*``, which may call the functions of the
snippets it ``requires`` and needs the headers in ``includes``. A kernel's prelude lists the snippets
its code calls::

    PRELUDE = device.prelude(device.STORE16, device.BF16X2, device.E4M3X4)

:func:`prelude` adds what they require, emits every snippet once, its headers first, in the order of
this module (not of the arguments: the same set always gives the same text, hence the same cubin),
and refuses two snippets that define the same function.

Snippets are written out so that every rounding, every access width and every cache policy is explicit
(inline PTX where CUDA's own intrinsics would leave a choice to the compiler). Sections:

- memory: 16- and 8-byte global stores the compiler cannot split (:func:`store16`, :func:`store8`,
  with optional cache operators), 16-byte loads into shared memory (:func:`copy16_to_shared`),
  ``cp.async`` (``CP_ASYNC``), bulk stores from shared memory (``BULK_STORE``);
- conversions and packers: bf16x2, e4m3x2/x4 (also of scaled products), FP4 e2m1 x4/x8, FP4 -> e4m3,
  fp16 <-> fp32, UE8M0;
- exact fp32 arithmetic: ``RCP`` / ``DIV`` (IEEE division without the slow path);
- stochastic rounding: the random-bit hash (``QUAD_HASH``, constants ``HASH_*``, mirrored in JAX by
  :func:`jax_tilek.quant._cast.quad_hash`) and the rounding rules of :mod:`jax_tilek.quant._cast`;
- XLA-compatible e4m3 conversions.

Plus the Python-side helper :func:`static_range` (a loop TileLang unrolls while parsing).

This module generates kernel code, so the kernel cache follows it: editing a snippet re-keys every
kernel whose module imports it (see :mod:`jax_tilek.kernel`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

PREFIX = "tilek_"

_DEFINITION = re.compile(r"__device__\s+__forceinline__\s+[\w\s\*&]+?\b(\w+)\s*\(")
_CACHE_OPERATORS = re.compile(r"(\.[A-Za-z][A-Za-z0-9_]*(::[A-Za-z0-9_]+)*)*")
_ranks = itertools.count()


@dataclasses.dataclass(frozen=True, eq=False)
class Snippet:
    """A named piece of device code (build one with :func:`snippet`).

    Attributes:
      name: the snippet's name (that of its module constant, with a suffix for a variant).
      code: CUDA source; its leading ``//`` comment documents it.
      functions: the ``tilek_*`` functions it defines.
      requires: snippets whose functions it calls.
      includes: headers it needs (``cuda_fp16.h`` ...), emitted once at the top of a prelude.
      rank: its place in a prelude (the order of definition in this module; variants of one family share it).
    """

    name: str
    code: str
    functions: tuple[str, ...]
    requires: tuple[Snippet, ...]
    includes: tuple[str, ...]
    rank: int

    @property
    def doc(self) -> str:
        """The snippet's leading comment, without the ``//``."""
        lines = []
        for line in self.code.strip().splitlines():
            if not line.startswith("//"):
                break
            lines.append(line[2:].strip())
        return " ".join(lines)

    def __repr__(self) -> str:
        return f"<device.Snippet {self.name}: {', '.join(self.functions)}>"


def snippet(name: str, code: str, requires=(), includes=(), rank: int | None = None) -> Snippet:
    """A :class:`Snippet`; its functions are read from ``code`` and must be named ``tilek_*``."""
    functions = tuple(_DEFINITION.findall(code))
    if not functions:
        raise ValueError(f"snippet {name}: defines no __device__ __forceinline__ function")
    bad = [f for f in functions if not f.startswith(PREFIX)]
    if bad:
        raise ValueError(f"snippet {name}: device functions must be named {PREFIX}*, got {bad}")
    requires = tuple(requires)
    rank = next(_ranks) if rank is None else rank
    for r in requires:
        if not isinstance(r, Snippet) or r.rank >= rank:
            raise ValueError(f"snippet {name}: requires {r!r}, which must be a snippet defined before it")
    return Snippet(name, "\n" + code.strip("\n") + "\n", functions, requires, tuple(includes), rank)


def prelude(*snippets: Snippet) -> str:
    """The CUDA text of ``snippets`` and of what they require, each once, headers first, in library order."""
    chosen: dict[str, Snippet] = {}
    todo = list(snippets)
    while todo:
        s = todo.pop()
        if not isinstance(s, Snippet):
            raise TypeError(f"device.prelude takes device snippets, got {type(s).__name__}: {s!r}")
        if s.name in chosen:
            if chosen[s.name].code != s.code:
                raise ValueError(f"device.prelude: two different snippets are named {s.name}")
            continue
        chosen[s.name] = s
        todo += s.requires
    ordered = sorted(chosen.values(), key=lambda s: (s.rank, s.name))
    owner: dict[str, Snippet] = {}
    for s in ordered:
        for f in s.functions:
            if f in owner:
                raise ValueError(f"device.prelude: {f} is defined by both {owner[f].name} and {s.name} (one variant per kernel)")
            owner[f] = s
    headers = sorted({h for s in ordered for h in s.includes})
    head = "".join(f"#include <{h}>\n" for h in headers)
    return "\n// jax_tilek.device: " + ", ".join(s.name for s in ordered) + "\n" + head + "".join(s.code.lstrip("\n") for s in ordered)


def _hint(cache: str) -> str:
    return f"; cache operator {cache}" if cache else ""


def _cache_operator(kind: str, cache: str) -> str:
    if not isinstance(cache, str) or not _CACHE_OPERATORS.fullmatch(cache):
        raise ValueError(f"device.{kind}: cache must be PTX qualifiers such as '.cs' or '.L1::no_allocate', got {cache!r}")
    return cache


def _variant(kind: str, cache: str, pointer: str) -> str:
    if pointer not in ("unsigned", "void"):
        raise ValueError(f"device.{kind}: pointer must be 'unsigned' or 'void', got {pointer!r}")
    return _cache_operator(kind, cache) + ("" if pointer == "unsigned" else f"({pointer}*)")


# ---------------------------------------------------------------------------------------------
# Memory.

_STORE16_RANK = next(_ranks)


@functools.cache
def store16(cache: str = "", pointer: str = "unsigned") -> Snippet:
    """``tilek_store16(p, a, b, c, d)``: one ``st.global{cache}.v4.u32`` of four words at ``p`` (16-byte
    aligned), which nvcc cannot split as it splits ``uint4`` stores to 4-byte-aligned arrays.

    ``cache`` is the store's cache operator (``""``, ``".cs"`` streaming, ...) and ``pointer`` the type
    ``p`` points to (``"unsigned"``, or ``"void"`` to take any pointer). Both select a variant of the one
    function ``tilek_store16``, so a kernel uses one of them. (nvcc's code around the store can depend on
    ``pointer``: kernels keep the variant they were tuned with.)"""
    return snippet(
        "STORE16" + _variant("store16", cache, pointer),
        f"""
// 16-byte global store of four words (p 16-byte aligned) that the compiler cannot split{_hint(cache)}.
__device__ __forceinline__ void tilek_store16({pointer}* p, unsigned a, unsigned b, unsigned c, unsigned d) {{
  asm volatile("st.global{cache}.v4.u32 [%0], {{%1, %2, %3, %4}};" :: "l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}}
""",
        rank=_STORE16_RANK,
    )


_STORE8_RANK = next(_ranks)


@functools.cache
def store8(cache: str = "", pointer: str = "unsigned") -> Snippet:
    """``tilek_store8(p, a, b)``: one ``st.global{cache}.v2.u32`` of two words at ``p`` (8-byte aligned);
    ``cache`` and ``pointer`` as for :func:`store16`."""
    return snippet(
        "STORE8" + _variant("store8", cache, pointer),
        f"""
// 8-byte global store of two words (p 8-byte aligned) that the compiler cannot split{_hint(cache)}.
__device__ __forceinline__ void tilek_store8({pointer}* p, unsigned a, unsigned b) {{
  asm volatile("st.global{cache}.v2.u32 [%0], {{%1, %2}};" :: "l"(p), "r"(a), "r"(b) : "memory");
}}
""",
        rank=_STORE8_RANK,
    )


_COPY16_RANK = next(_ranks)


@functools.cache
def copy16_to_shared(cache: str = "") -> Snippet:
    """``tilek_copy16_to_shared(dst, src)``: a 16-byte read-only global load (``ld.global.nc{cache}.v4.u32``)
    stored to shared memory as one 16-byte vector. ``cache`` qualifies the load, e.g.
    ``".L1::no_allocate.L2::256B"`` (skip L1, prefetch 256 bytes into L2)."""
    return snippet(
        "COPY16_TO_SHARED" + _cache_operator("copy16_to_shared", cache),
        f"""
// 16-byte read-only global load (src 16-byte aligned) stored to shared memory (dst){_hint(cache)}.
__device__ __forceinline__ void tilek_copy16_to_shared(unsigned* dst, const unsigned* src) {{
  unsigned a, b, c, d;
  asm volatile("ld.global.nc{cache}.v4.u32 {{%0, %1, %2, %3}}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(src));
  *reinterpret_cast<uint4*>(dst) = make_uint4(a, b, c, d);
}}
""",
        rank=_COPY16_RANK,
    )


STORE16 = store16()
STORE8 = store8()
COPY16_TO_SHARED = copy16_to_shared()

CP_ASYNC = snippet("CP_ASYNC", r"""
// cp.async global -> shared, 16 bytes (.cg, past L1) or 4 bytes (.ca), zero-filling when pred is false;
// tilek_cp_async_commit closes a group, tilek_cp_async_wait<N> waits until at most N groups are pending.
__device__ __forceinline__ void tilek_cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(s), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void tilek_cp_async4(void* smem, const void* gmem, bool pred) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(s), "l"(gmem), "r"(pred ? 4 : 0) : "memory");
}
__device__ __forceinline__ void tilek_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void tilek_cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
""")

BULK_STORE = snippet("BULK_STORE", r"""
// The bulk-copy engine: shared -> global, `bytes` (a multiple of 16, both addresses 16-byte aligned) in
// the current bulk group. Before it, each thread that wrote the shared source with ordinary stores runs
// fence.proxy.async.shared::cta, then a barrier; before the shared memory is reused or the CTA exits,
// the issuing thread commits the group and waits for its reads (cp.async.bulk.commit_group,
// cp.async.bulk.wait_group.read).
__device__ __forceinline__ void tilek_bulk_store(void* gmem, const void* smem, unsigned bytes) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(gmem), "r"(s), "r"(bytes) : "memory");
}
""")

# ---------------------------------------------------------------------------------------------
# Conversions and packers (element 0 in the low bits).

BF16X2 = snippet("BF16X2", r"""
// Two fp32 -> two bf16 (round to nearest even) in a word, lo in the low half.
__device__ __forceinline__ unsigned tilek_bf16x2(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
""")

BF16_UNPACK = snippet("BF16_UNPACK", r"""
// The low / high bf16 of a word as fp32 (exact).
__device__ __forceinline__ float tilek_bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float tilek_bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
""")

F16_TO_F32 = snippet("F16_TO_F32", r"""
// fp16 bits (the low 16 bits of bits) -> fp32, exactly.
__device__ __forceinline__ float tilek_f16_to_f32(unsigned bits) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)bits));
  return f;
}
""")

F16_RZ_BITS = snippet("F16_RZ_BITS", r"""
// fp32 -> fp16 bits, rounded toward zero.
__device__ __forceinline__ unsigned tilek_f16_rz_bits(float v) {
  unsigned short h;
  asm("cvt.rz.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
""")

E4M3X2 = snippet("E4M3X2", r"""
// Two fp32 -> two float8_e4m3fn codes (round to nearest even, saturating at +-448), lo in the low byte.
__device__ __forceinline__ unsigned short tilek_e4m3x2(float lo, float hi) {
  unsigned short q;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(q) : "f"(hi), "f"(lo));
  return q;
}
""")

E4M3X2_TO_F16X2 = snippet("E4M3X2_TO_F16X2", r"""
// Two e4m3 codes (lo in the low byte) -> two fp16 (lo in the low half), exactly.
__device__ __forceinline__ unsigned tilek_e4m3x2_to_f16x2(unsigned short q) {
  unsigned r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(q));
  return r;
}
""")

E4M3X4 = snippet("E4M3X4", r"""
// Four fp32 -> four e4m3 codes (round to nearest even, saturating at +-448), a in the low byte.
__device__ __forceinline__ unsigned tilek_e4m3x4(float a, float b, float c, float d) {
  return (unsigned)tilek_e4m3x2(a, b) | ((unsigned)tilek_e4m3x2(c, d) << 16);
}
""", requires=[E4M3X2])

E4M3X4_SCALED = snippet("E4M3X4_SCALED", r"""
// Four products x * s (each rounded to fp32) -> four e4m3 codes (nearest even, saturating), a in the low byte.
// The products are issued pairwise, b before a (the instruction order the per-block cast was tuned with).
__device__ __forceinline__ unsigned tilek_e4m3x4_scaled(float a, float b, float c, float d, float s) {
  float sb = __fmul_rn(b, s), sa = __fmul_rn(a, s);
  unsigned lo = tilek_e4m3x2(sa, sb);
  float sd = __fmul_rn(d, s), sc = __fmul_rn(c, s);
  return lo | ((unsigned)tilek_e4m3x2(sc, sd) << 16);
}
""", requires=[E4M3X2])

E4M3X2_F16X2 = snippet("E4M3X2_F16X2", r"""
// Two fp32 rounded to e4m3 (nearest even, saturating) and back, as two fp16 (lo in the low half).
__device__ __forceinline__ unsigned tilek_e4m3x2_f16x2(float lo, float hi) {
  return tilek_e4m3x2_to_f16x2(tilek_e4m3x2(lo, hi));
}
""", requires=[E4M3X2, E4M3X2_TO_F16X2])

E4M3_AT = snippet("E4M3_AT", r"""
// Element j (0..3) of four e4m3 codes packed in a word (element 0 in the low byte), exactly, as fp32.
__device__ __forceinline__ float tilek_e4m3_at(unsigned w, int j) {
  unsigned h2 = tilek_e4m3x2_to_f16x2((unsigned short)(w >> (16 * (j >> 1))));
  return tilek_f16_to_f32(h2 >> (16 * (j & 1)));
}
""", requires=[F16_TO_F32, E4M3X2_TO_F16X2])

UE8M0 = snippet("UE8M0", r"""
// A UE8M0 scale byte -> fp32 2^(e - 127) (e = 0 gives 0.0).
__device__ __forceinline__ float tilek_ue8m0(unsigned char e) { return __uint_as_float(((unsigned)e) << 23); }
""")

E2M1_ADD = snippet("E2M1_ADD", r"""
// FP4 e2m1 codes by FMAs: tilek_e2m1_biased(p) is 1.5 * 2^23 + the e2m1 magnitude code of p as fp32
// bits (formats.encode_e2m1: nearest even, saturating at 6; NaN -> 6); tilek_e2m1_add(r, p, k) adds it,
// shifted to nibble k, and p's sign bit (the caller subtracts 0x4B400000 per nibble).
__device__ __forceinline__ unsigned tilek_e2m1_biased(float p) {
  // With a = min(|p|, 6) the code is min(rint(2a), rint(a + 2), rint(a / 2 + 4)), and each rint is
  // one exact FMA onto 1.5 * 2^23 (whose ulp is 1): mostly full-rate FP32 work.
  const float M = 12582912.0f;
  float a = fminf(fabsf(p), 6.0f);
  return __float_as_uint(fminf(fminf(__fmaf_rn(a, 2.0f, M), __fmaf_rn(a, 1.0f, M + 2.0f)), __fmaf_rn(a, 0.5f, M + 4.0f)));
}
__device__ __forceinline__ unsigned tilek_e2m1_add(unsigned r, float p, int k) {
  return r + tilek_e2m1_biased(p) * (1u << (4 * k)) + (__float_as_uint(p) >> 31) * (8u << (4 * k));
}
""")

E2M1X4_SCALED = snippet("E2M1X4_SCALED", r"""
// Four products x * s -> four e2m1 codes in 16 bits (nearest even, saturating at 6), a in the lowest nibble.
__device__ __forceinline__ unsigned tilek_e2m1x4_scaled(float a, float b, float c, float d, float s) {
  unsigned r = tilek_e2m1_add(0u, __fmul_rn(a, s), 0);
  r = tilek_e2m1_add(r, __fmul_rn(b, s), 1);
  r = tilek_e2m1_add(r, __fmul_rn(c, s), 2);
  r = tilek_e2m1_add(r, __fmul_rn(d, s), 3);
  return r - 0x4B400000u * 0x1111u;
}
""", requires=[E2M1_ADD])

E2M1X8_SCALED = snippet("E2M1X8_SCALED", r"""
// Eight products x * s -> eight e2m1 codes in 32 bits (nearest even, saturating at 6), a in the lowest nibble.
__device__ __forceinline__ unsigned tilek_e2m1x8_scaled(float a, float b, float c, float d, float e, float f, float g, float h, float s) {
  unsigned r = tilek_e2m1_add(0u, __fmul_rn(a, s), 0);
  r = tilek_e2m1_add(r, __fmul_rn(b, s), 1);
  r = tilek_e2m1_add(r, __fmul_rn(c, s), 2);
  r = tilek_e2m1_add(r, __fmul_rn(d, s), 3);
  r = tilek_e2m1_add(r, __fmul_rn(e, s), 4);
  r = tilek_e2m1_add(r, __fmul_rn(f, s), 5);
  r = tilek_e2m1_add(r, __fmul_rn(g, s), 6);
  r = tilek_e2m1_add(r, __fmul_rn(h, s), 7);
  return r - 0x4B400000u * 0x11111111u;
}
""", requires=[E2M1_ADD])

EXP2_F16X2 = snippet("EXP2_F16X2", r"""
// 2^k (-24 <= k <= 15) as fp16, in both halves of a word.
__device__ __forceinline__ unsigned tilek_exp2_f16x2(int k) {
  unsigned h = k >= -14 ? (unsigned)(k + 15) << 10 : 1u << (k + 24);
  return h | (h << 16);
}
""")

FP4_E4M3 = snippet("FP4_E4M3", r"""
// FP4 e2m1 codes times a power of two (scale: fp16x2, e.g. tilek_exp2_f16x2) -> e4m3 codes (nearest even,
// saturating): tilek_fp4x2_e4m3x2 converts the two codes of byte `byte` of w (the low nibble's in the
// low byte), tilek_fp4x4_e4m3x4 the four codes of bytes byte, byte + 1.
__device__ __forceinline__ unsigned tilek_fp4x2_e4m3x2(unsigned w, int byte, unsigned scale) {
  unsigned b = __byte_perm(w, 0u, 0x4440u | byte);
  unsigned x = b | (b << 12);  // the low code at bits 0..3, the high code at bits 16..19
  // As fp16 bits, magnitude at [11:9] and sign at 15 of each half: the fp16 is fp4 * 2^-14, exactly
  // (subnormal for the code 0.5); * 2^14 restores fp4, * scale (2^k) applies the shift.
  unsigned h = ((x & 0x70007u) << 9) | ((x & 0x80008u) << 12);
  const unsigned two14 = 0x74007400u;
  __half2 v = __hmul2(__hmul2(*reinterpret_cast<__half2*>(&h), *reinterpret_cast<const __half2*>(&two14)),
                      *reinterpret_cast<__half2*>(&scale));
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(r) : "r"(*reinterpret_cast<unsigned*>(&v)));
  return r;
}
__device__ __forceinline__ unsigned tilek_fp4x4_e4m3x4(unsigned w, int byte, unsigned scale) {
  return tilek_fp4x2_e4m3x2(w, byte, scale) | (tilek_fp4x2_e4m3x2(w, byte + 1, scale) << 16);
}
""", includes=["cuda_fp16.h"])

# ---------------------------------------------------------------------------------------------
# Exact fp32 arithmetic.

RCP = snippet("RCP", r"""
// 1 / d for tilek_div: MUFU.RCP and one Newton step (the start of CUDA's div.rn.f32 fast path).
__device__ __forceinline__ float tilek_rcp(float d) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return __fmaf_rn(r, __fmaf_rn(-d, r, 1.0f), r);
}
""")

DIV = snippet("DIV", r"""
// IEEE division a / d without the slow path, r = tilek_rcp(d): the fast path of CUDA's div.rn.f32
// (MUFU.RCP, one Newton step, one Markstein correction), exact when 1 <= d < 2^126 and a / d is normal
// or d is a power of two (e.g. SwiGLU's d = 1 + exp(-l) with l >= -87); the sign of a fixes zero quotients.
__device__ __forceinline__ float tilek_div(float a, float d, float r) {
  float q = __fmul_rn(a, r);
  q = __fmaf_rn(r, __fmaf_rn(-d, q, a), q);
  return __int_as_float(__float_as_int(q) | (__float_as_int(a) & 0x80000000));
}
""", requires=[RCP])

# ---------------------------------------------------------------------------------------------
# Stochastic rounding (the rules of jax_tilek.quant._cast, which mirrors them in JAX).
# quant/test_cast.py compiles the part of cast's prelude above E4M3_NOSAT for the host: keep these
# snippets free of PTX and above the XLA-compatible conversions.

# The random-bit hash of one quad of fp32 bit patterns: one table of constants, written out for CUDA
# here and for JAX by jax_tilek.quant._cast.quad_hash.
HASH_INDEX, HASH_SEED = 0x9E3779B1, 0x2C1B3C6D
HASH_ROUNDS = ((0x85EBCA6B, 0), (0xC2B2AE35, 13), (0x27D4EB2F, 16), (0x165667B1, 15))  # (multiplier, shift)
HASH_FINAL = ((0x7FEB352D, 15), (0x846CA68B, 16))


def _hash_cuda() -> str:
    lines = [f"  unsigned h = (index * {HASH_INDEX:#x}u) ^ (seed * {HASH_SEED:#x}u);"]
    for k, (mul, shift) in enumerate(HASH_ROUNDS):
        mix = f"h ^ (h >> {shift}) ^ w{k}" if shift else f"h ^ w{k}"
        lines.append(f"  h = ({mix}) * {mul:#x}u;")
    (m0, s0), (m1, s1) = HASH_FINAL
    lines += [
        "  h ^= h >> 16;",
        f"  unsigned r0 = h * {m0:#x}u; r0 ^= r0 >> {s0};",
        f"  unsigned r1 = r0 * {m1:#x}u; r1 ^= r1 >> {s1};",
    ]
    return "\n".join(lines)


QUAD_HASH = snippet("QUAD_HASH", """
// Random words (r1 << 32 | r0) of one quad of fp32 bit patterns w0..w3 (constants: HASH_* of jax_tilek/device.py).
__device__ __forceinline__ unsigned long long tilek_quad_hash(unsigned w0, unsigned w1, unsigned w2, unsigned w3,
                                                              unsigned index, unsigned seed) {
""" + _hash_cuda() + """
  return ((unsigned long long)r1 << 32) | r0;
}
""")

RBITS = snippet("RBITS", r"""
// The 16 random bits of element j (0..3) of a quad.
__device__ __forceinline__ unsigned tilek_rbits(unsigned long long h, int j) {
  return (unsigned)(h >> (16 * j)) & 0xFFFFu;
}
""")

SR_BF16 = snippet("SR_BF16", r"""
// fp32 -> a bf16-representable fp32, stochastically rounded, saturated; NaN stays NaN.
__device__ __forceinline__ float tilek_sr_bf16(float x, unsigned r) {
  float y = __uint_as_float((__float_as_uint(x) + r) & 0xFFFF0000u);
  y = fminf(fmaxf(y, -0x1.fep127f), 0x1.fep127f);
  return isnan(x) ? x : y;
}
""")

SR_E4M3 = snippet("SR_E4M3", r"""
// fp32 -> an e4m3-representable fp32, stochastically rounded (before saturation, which the satfinite
// conversion that follows does). tilek_sr_e4m3_fast is exact for |x| >= 2^-6, zero and infinities;
// tilek_sr_e4m3_slow(x) says when tilek_sr_e4m3 is needed (e4m3 subnormals, spacing 2^-9, and NaN).
__device__ __forceinline__ float tilek_sr_e4m3_fast(float x, unsigned r) {
  return __uint_as_float((__float_as_uint(x) + (r << 4)) & 0xFFF00000u);
}
__device__ __forceinline__ unsigned tilek_sr_e4m3_slow(float x) {
  return (unsigned)(!(fabsf(x) >= 0x1p-6f)) & (unsigned)(x != 0.0f);
}
__device__ __forceinline__ float tilek_sr_e4m3(float x, unsigned r) {
  if (!tilek_sr_e4m3_slow(x)) return tilek_sr_e4m3_fast(x, r);
  if (isnan(x)) return x;
  unsigned q = (__float2uint_rz(fabsf(x) * 0x1p25f) + r) >> 16;
  return copysignf(__uint2float_rn(q) * 0x1p-9f, x);
}
""")

E2M1_RN = snippet("E2M1_RN", r"""
// fp32 -> FP4 e2m1 code (0..15), round to nearest even, saturating at 6. The code of |x| is
// rint(|x| * s) + o with (s, o) = (2, 0) below 2, (1, 2) in [2, 4), (1/2, 4) above; it is also the
// least of the three candidates, each computed exactly as 2^23 + o + rint(|x| * s) by one fma.
__device__ __forceinline__ unsigned tilek_e2m1_rn(float x) {
  float a = fminf(fabsf(x), 6.0f);
  float t = fminf(fminf(__fmaf_rn(a, 2.0f, 0x1p23f), __fadd_rn(a, 0x1p23f + 2.0f)), __fmaf_rn(a, 0.5f, 0x1p23f + 4.0f));
  return (__float_as_uint(t) & 7u) | ((__float_as_uint(x) >> 28) & 8u);  // t = 2^23 + code
}
""")

E2M1_SR = snippet("E2M1_SR", r"""
// fp32 -> FP4 e2m1 code, stochastically rounded, saturating at 6: the least of the candidates
// floor(floor16(|x| * s) + r / 2^16) + o, each computed exactly on the 2^-16 grid of [128, 256) by
// one fma rounding down (128 + r / 2^16 has the bits 0x43000000 + r).
__device__ __forceinline__ unsigned tilek_e2m1_sr(float x, unsigned r) {
  float a = fminf(fabsf(x), 6.0f);
  float base = __uint_as_float(0x43000000u | r);
  float t = fminf(fminf(__fmaf_rd(a, 2.0f, base), __fmaf_rd(a, 1.0f, base + 2.0f)), __fmaf_rd(a, 0.5f, base + 4.0f));
  return ((__float_as_uint(t) - 0x43000000u) >> 16) | ((__float_as_uint(x) >> 28) & 8u);
}
""")

E2M1_TO_FLOAT = snippet("E2M1_TO_FLOAT", r"""
// FP4 e2m1 code (low 4 bits) -> fp32, exactly: place the code in an fp32 and scale by 2^126.
__device__ __forceinline__ float tilek_e2m1_to_float(unsigned c) {
  return __uint_as_float(((c & 7u) << 22) | ((c & 8u) << 28)) * 0x1p126f;
}
""")

# ---------------------------------------------------------------------------------------------
# XLA-compatible e4m3 conversions (CUDA's fp8 intrinsics).

E4M3_NOSAT = snippet("E4M3_NOSAT", r"""
// fp32 -> float8_e4m3fn bits without saturation (overflow -> NaN), as XLA converts.
__device__ __forceinline__ unsigned char tilek_e4m3_nosat(float x) {
  return (unsigned char)__nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E4M3);
}
""", includes=["cuda_fp8.h"])

E4M3_TO_FLOAT = snippet("E4M3_TO_FLOAT", r"""
// float8_e4m3fn bits -> fp32.
__device__ __forceinline__ float tilek_e4m3_to_float(unsigned char b) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(b, __NV_E4M3);
  return __half2float(*reinterpret_cast<__half *>(&h));
}
""", includes=["cuda_fp16.h", "cuda_fp8.h"])

# Every snippet of the library (the cache-operator variants of the memory snippets aside), in prelude order.
SNIPPETS: tuple[Snippet, ...] = tuple(sorted((v for v in globals().values() if isinstance(v, Snippet)), key=lambda s: s.rank))


# ---------------------------------------------------------------------------------------------
# Python-side helpers for kernel factories.


def static_range(n: int) -> tuple[int, ...]:
    """``0 .. n-1`` as a tuple, for a loop that TileLang expands while parsing a prim_func: its variable is
    a Python int (it can pick code, index Python lists), unlike ``range`` (a TIR loop) or ``T.unroll``
    (a TIR loop that nvcc unrolls)."""
    return tuple(range(n))
