"""Helpers for the quantization tests: error measures, the rounding-bias test, input generators."""

from __future__ import annotations

import numpy as np


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


def assert_bytes_equal(actual, expected) -> None:
    """Bit-exact comparison (raw bytes; NaN payloads and signed zeros count), with a useful message."""
    a, e = np.ascontiguousarray(np.asarray(actual)), np.ascontiguousarray(np.asarray(expected))
    assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
    if a.size == 0:
        return
    itemsize = a.dtype.itemsize
    differ = (a.view(np.uint8).reshape(-1, itemsize) != e.view(np.uint8).reshape(-1, itemsize)).any(axis=1)
    where = np.argwhere(differ.reshape(a.shape))
    assert where.size == 0, f"{len(where)} of {a.size} elements differ, first at {where[:5].tolist()}"


def rand_float(rng: np.random.Generator, shape, scale_exp: tuple[int, int] = (-20, 20)) -> np.ndarray:
    """Normal values times 2^U[lo, hi] per row: wide dynamic range across rows, fp32."""
    rows = rng.integers(scale_exp[0], scale_exp[1] + 1, size=shape[:-1] + (1,)).astype(np.float32)
    return (rng.standard_normal(shape, np.float32) * np.exp2(rows)).astype(np.float32)
