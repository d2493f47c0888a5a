"""Test helpers: lowering for "cuda" on any machine and reading the tilek_launch calls back."""

from __future__ import annotations

import re

import jax
import numpy as np

import jax_tilek

_CUBIN = re.compile(r'cubin = "(?:[^"\\]|\\.)*"')


def lower_for_cuda(fn, *args, arch: str = "sm_90a") -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for "cuda" (kernels compiled for ``arch``)."""
    with jax_tilek.target_arch(arch):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def tilek_calls(text: str) -> list[dict]:
    """Every tilek_launch custom call: its name, entries, cubin key and launch record."""
    calls = []
    for line in text.splitlines():
        if "stablehlo.custom_call @tilek_launch" not in line:
            continue
        has_cubin = 'cubin = "\\7FELF' in line
        config = _CUBIN.sub('cubin = "..."', line)
        launch = re.search(r"launch = (?:dense<\[?(?P<v>[-\d, ]*)\]?>|array<i64(?:: (?P<a>[-\d, ]*))?>)", config)
        values = launch.group("v") if launch.group("v") is not None else (launch.group("a") or "")
        calls.append(
            {
                "name": re.search(r'name = "([^"]*)"', config).group(1),
                "entries": re.search(r'entries = "([^"]*)"', config).group(1),
                "cubin_key": re.search(r'cubin_key = "([0-9a-f]{64})"', config).group(1),
                "has_cubin": has_cubin,
                "launch": [int(v) for v in values.split(",") if v.strip()],
            }
        )
    return calls


def decode_record(record: list[int]) -> dict:
    """Parses a launch record the way ffi/launcher.cc does (DecodeRecord), for assertions."""
    it = iter(record)
    version, num_buffers, num_zero, num_tma, num_kernels = (next(it) for _ in range(5))
    out = {"version": version, "num_buffers": num_buffers, "zero_fill": [next(it) for _ in range(num_zero)], "tma": [], "kernels": []}
    for _ in range(num_tma):
        buffer, offset, dtype, rank = (next(it) for _ in range(4))
        t = {"buffer": buffer, "byte_offset": offset, "dtype": dtype, "rank": rank}
        t["dims"] = [next(it) for _ in range(rank)]
        t["strides"] = [next(it) for _ in range(rank - 1)]
        t["box"] = [next(it) for _ in range(rank)]
        t["element_strides"] = [next(it) for _ in range(rank)]
        t["interleave"], t["swizzle"], t["l2"], t["oob"] = (next(it) for _ in range(4))
        out["tma"].append(t)
    for _ in range(num_kernels):
        k = {"grid": [next(it) for _ in range(3)], "block": [next(it) for _ in range(3)], "smem": next(it)}
        k["cluster"] = [next(it) for _ in range(3)]
        k["flags"] = next(it)
        k["args"] = [tuple(next(it) for _ in range(3)) for _ in range(next(it))]
        out["kernels"].append(k)
    assert next(it, None) is None, "record longer than its header says"
    return out


def random_array(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Fresh random values of any dtype: normal floats (cast), or uniform integers over the range."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    return (rng.standard_normal(shape, dtype=np.float32) * 4).astype(dtype)
