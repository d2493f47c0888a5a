"""Helpers for the quantization tests: error measures, the rounding-bias test, input generators."""

from __future__ import annotations

import numpy as np

from jax_tilek.testing import assert_bytes_equal  # noqa: F401  (re-exported for the quant tests)


def calc_diff(x, y) -> float:
    """``|x - y|^2 / (|x|^2 + |y|^2)`` in float64 (TileKernels' ``calc_diff``); 0 when both are zero."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denominator = (x * x + y * y).sum()
    return 0.0 if denominator == 0 else float(((x - y) ** 2).sum() / denominator)


def check_bias(rounded, exact) -> None:
    """Asserts that rounding is unbiased: the share of values rounded down (ties count half) lies
    within 0.5 ± 10/sqrt(n) (TileKernels' ``check_bias``)."""
    rounded, exact = np.asarray(rounded, np.float64).ravel(), np.asarray(exact, np.float64).ravel()
    n = rounded.size
    below = (rounded < exact).sum() + 0.5 * (rounded == exact).sum()
    share = below / n
    assert abs(share - 0.5) <= 10 / np.sqrt(n), f"biased rounding: {share:.4f} of {n} values rounded down"


def rand_float(rng: np.random.Generator, shape, scale_exp: tuple[int, int] = (-20, 20)) -> np.ndarray:
    """Normal values times 2^U[lo, hi] per row: wide dynamic range across rows, fp32."""
    rows = rng.integers(scale_exp[0], scale_exp[1] + 1, size=shape[:-1] + (1,)).astype(np.float32)
    return (rng.standard_normal(shape, np.float32) * np.exp2(rows)).astype(np.float32)


def _align(n: int, m: int) -> int:
    return -(-n // m) * m


def np_store_sf(sf: np.ndarray, layout: str) -> np.ndarray:
    """Logical scales ``[M_b, K_b]`` -> their storage in a TileKernels layout, written independently of
    ``jax_tilek.quant.formats``: "row" (or "row_round") as is; "col" the transpose ``[K_b, align(M_b, 16 /
    sf_bytes)]`` zero-padded (each column 16-byte aligned: 4 fp32 or 16 float8_e4m3fn scales, TileKernels
    2.1); "col_ue8m0" the exponent bytes, four consecutive k in one little-endian int32,
    ``[ceil(K_b/4), align(M_b, 4)]``."""
    m_b, k_b = sf.shape
    if layout in ("row", "row_round"):
        return sf
    if layout == "col":
        out = np.zeros((k_b, _align(m_b, 16 // sf.dtype.itemsize)), sf.dtype)
        out[:, :m_b] = sf.T
        return out
    assert layout == "col_ue8m0", layout
    exponents = ((sf.astype(np.float32).view(np.uint32) >> 23) & 0xFF).astype(np.uint8)
    b = np.zeros((_align(k_b, 4), _align(m_b, 4)), np.uint8)
    b[:k_b, :m_b] = exponents.T
    words = b.reshape(b.shape[0] // 4, 4, b.shape[1]).transpose(0, 2, 1)  # [word, m, byte]
    return np.ascontiguousarray(words).view(np.int32).reshape(b.shape[0] // 4, b.shape[1])


def np_load_sf(stored: np.ndarray, layout: str, num_blocks: tuple[int, int]) -> np.ndarray:
    """Storage -> logical fp32 scales ``[M_b, K_b]`` (the inverse of :func:`np_store_sf`)."""
    m_b, k_b = num_blocks
    if layout in ("row", "row_round"):
        return stored.astype(np.float32)
    if layout == "col":
        return stored[:, :m_b].T.astype(np.float32)
    assert layout == "col_ue8m0", layout
    words, m_4 = stored.shape
    b = np.ascontiguousarray(stored).view(np.uint8).reshape(words, m_4, 4).transpose(0, 2, 1).reshape(4 * words, m_4)  # [k, m]
    return (b[:k_b, :m_b].T.astype(np.uint32) << 23).view(np.float32)
