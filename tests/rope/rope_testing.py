"""Numpy helpers of the RoPE tests: TileKernels' rotary math in float64, and a mirror of the kernel's
fp32 FMA arithmetic."""

import ml_dtypes
import numpy as np

BF16, F16, F32, I32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int32)




def np_rows(lead, cache_len, positions, offset):
    """Cache rows of ``lead``-shaped tokens (TileKernels: offset + positions, else offset + index in
    the sequence), clamped to the table."""
    if positions is None:
        rows = np.broadcast_to(np.arange(lead[-1]), lead) + offset
    else:
        rows = positions.astype(np.int64) + offset
    return np.clip(rows, 0, cache_len - 1)


def pairs(rot, interleaved):
    """Column indices (first, second) of each pair within the window."""
    i = np.arange(rot // 2)
    return (2 * i, 2 * i + 1) if interleaved else (i, i + rot // 2)


def np_rope(x, cache, positions=None, offset=0, interleaved=False, conjugate=False, start=0):
    """float64: ``a' = a cos - b sin``, ``b' = a sin + b cos`` (sin negated when conjugate)."""
    rot = cache.shape[1]
    rows = np_rows(x.shape[:-2], cache.shape[0], positions, offset)
    cos = cache[rows, : rot // 2].astype(np.float64)[..., None, :]
    sin = cache[rows, rot // 2 :].astype(np.float64)[..., None, :] * (-1 if conjugate else 1)
    out = x.astype(np.float64).copy()
    fi, si = pairs(rot, interleaved)
    a, b = x[..., start + fi].astype(np.float64), x[..., start + si].astype(np.float64)
    out[..., start + fi] = a * cos - b * sin
    out[..., start + si] = a * sin + b * cos
    bound = np.zeros_like(out)  # sum of the products' magnitudes: the fp32 rounding errors' scale
    bound[..., start + fi] = np.abs(a * cos) + np.abs(b * sin)
    bound[..., start + si] = np.abs(a * sin) + np.abs(b * cos)
    return out, bound


def np_kernel(x, cache, positions=None, offset=0, interleaved=False, conjugate=False, start=0):
    """The kernel's arithmetic: ``fma(a, cos, -round(b sin))`` and ``fma(a, sin, round(b cos))`` in fp32
    (the fp32 product is exact in float64, the fma is rounded once from there), rounded to x's dtype."""
    f32, f64 = np.float32, np.float64
    rot = cache.shape[1]
    rows = np_rows(x.shape[:-2], cache.shape[0], positions, offset)
    cos = cache[rows, : rot // 2][..., None, :].astype(f64)
    sin = cache[rows, rot // 2 :][..., None, :].astype(f64)
    fi, si = pairs(rot, interleaved)
    a, b = x[..., start + fi].astype(f32).astype(f64), x[..., start + si].astype(f32).astype(f64)
    if conjugate:
        first = (a * cos + (b * sin).astype(f32)).astype(f32)
        second = (a * -sin + (b * cos).astype(f32)).astype(f32)
    else:
        first = (a * cos - (b * sin).astype(f32)).astype(f32)
        second = (a * sin + (b * cos).astype(f32)).astype(f32)
    out = x.copy()
    out[..., start + fi] = first.astype(x.dtype)
    out[..., start + si] = second.astype(x.dtype)
    return out


def ulps(a, b) -> int:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    bits = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    ia, ib = a.view(bits).astype(np.int64), b.view(bits).astype(np.int64)
    ia, ib = np.where(ia < 0, np.iinfo(bits).min - ia, ia), np.where(ib < 0, np.iinfo(bits).min - ib, ib)
    return int(np.abs(ia - ib).max()) if a.size else 0


def assert_near(a, b):
    """Equal up to one bf16 place (2^-7 relative at most) after an fp32 FMA contraction (of products of
    magnitude < 256) moved the value across a rounding boundary."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.abs(a - b) <= 2.0**-7 * np.abs(b) + 2.0**-15), np.abs(a - b).max()


def inputs(rng, lead, q, k, rot, cache_len, dtype=BF16, positions=True, offset=0):
    x = (rng.standard_normal((*lead, *q)) * 4).astype(dtype)
    y = None if k is None else (rng.standard_normal((*lead, *k)) * 4).astype(dtype)
    cache = (rng.standard_normal((cache_len, rot)) * 2).astype(F32)
    pos = rng.integers(0, cache_len - offset, size=lead).astype(I32) if positions else None
    return x, y, cache, pos


def window_start(dim, columns, rot):
    return 0 if columns is None else slice(*columns).indices(dim)[0]
