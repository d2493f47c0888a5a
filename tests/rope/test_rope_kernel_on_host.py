"""The RoPE kernel's own code, run on the host: the CUDA C++ that TileLang generates for
``rotary_kernel`` is compiled with g++ against a few lines of stand-ins (bf16/fp16 conversions, 16-byte
vector types, ``blockIdx``/``threadIdx``, ``__fmaf_rn``) and executed block by block, thread by thread.
The kernel has no shared memory nor synchronisation, so a serial run is a faithful one: its indexing,
unit layout, tails, window copies, clamping and arithmetic are checked against the numpy mirror of its
arithmetic, bit for bit, with every output element written (outputs start poisoned). Skipped without
g++; the GPU tests check the same on the device."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from jax_tilek import compiler
from jax_tilek.rope import _apply_rotary as R
from rope_testing import BF16, F16, F32, I32, assert_near, np_kernel
from jax_tilek.testing import assert_bytes_equal

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to run the kernel's C++ on the host")

STANDINS = r"""
#include <cstdint>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
typedef _Float16 half_t;
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
static float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
struct Index3 { int x, y, z; };
static Index3 blockIdx, threadIdx;
template <class A, class B> static A max(A a, B b) { return a > A(b) ? a : A(b); }
template <class A, class B> static A min(A a, B b) { return a < A(b) ? a : A(b); }
static float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
static float __fmul_rn(float a, float b) { volatile float p = a * b; return p; }
#define __global__
#define __launch_bounds__(...)
#define __restrict__ __restrict
"""

DRIVER = r"""
static void* slurp(const char* path, size_t n) {
  void* p = std::malloc(n ? n : 1);
  FILE* f = std::fopen(path, "rb");
  if (n && std::fread(p, 1, n, f) != n) std::abort();
  std::fclose(f);
  return p;
}
int main(int argc, char** argv) {
  long long v[10];
  FILE* f = std::fopen(argv[1], "rb");
  if (std::fread(v, 8, 10, f) != 10) return 2;
  std::fclose(f);
  int N = int(v[0]), S = int(v[1]), seqlen = int(v[2]), seqlen_offset = int(v[3]), grid = int(v[4]), threads = int(v[5]);
  size_t qbytes = size_t(v[6]), kbytes = size_t(v[7]), cbytes = size_t(v[8]), pbytes = size_t(v[9]);
  void* query = slurp(argv[2], qbytes); void* key = slurp(argv[3], kbytes);
  void* cos_sin_cache = slurp(argv[4], cbytes); void* positions = slurp(argv[5], pbytes);
  void* query_out = std::malloc(qbytes ? qbytes : 1); void* key_out = std::malloc(kbytes ? kbytes : 1);
  std::memset(query_out, 0xFF, qbytes); std::memset(key_out, 0xFF, kbytes);
  (void)N; (void)S; (void)seqlen; (void)seqlen_offset; (void)query; (void)key; (void)positions; (void)cos_sin_cache;
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < threads; ++t) {
      blockIdx = Index3{b, 0, 0};
      threadIdx = Index3{t, 0, 0};
      apply_rotary_kernel(ARGS);
    }
  f = std::fopen(argv[6], "wb"); std::fwrite(query_out, 1, qbytes, f); std::fclose(f);
  f = std::fopen(argv[7], "wb"); std::fwrite(key_out, 1, kbytes, f); std::fclose(f);
  return 0;
}
"""


def _host_program(params: dict, directory) -> str:
    """The kernel for ``params`` as a host executable (built once per source)."""
    source = compiler.lower_prim_func(R.rotary_kernel(**params), "sm_90a", pass_configs=R.rotary_kernel.pass_configs, name="rope").source
    start = source.index('extern "C" __global__ void __launch_bounds__')
    kernel = source[start : source.index("\n}\n", start) + 3].replace('extern "C"', "")
    signature = re.search(r"apply_rotary_kernel\((.*?)\)\s*\{", kernel, re.S).group(1)
    params_ = [p.strip().rsplit(" ", 1) for p in signature.split(",")]
    args = ", ".join(f"({kind}){name}" for kind, name in params_)
    path = os.path.join(directory, f"rope_{abs(hash(kernel)) % 10**12}")
    if not os.path.exists(path):
        with open(path + ".cpp", "w") as f:
            f.write(STANDINS + kernel + DRIVER.replace("ARGS", args))
        subprocess.run(["g++", "-O1", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-w", path + ".cpp", "-o", path],
                       check=True, capture_output=True)  # fmt: skip
    return path


def _run_on_host(tmp_path, query, key, cache, positions, *, seqlen, seqlen_offset, q_start, k_start, interleaved, conjugate, config):
    launch = R._launch(query, key, cache, positions, seqlen=seqlen, seqlen_offset=seqlen_offset, q_start=q_start, k_start=k_start,
                       interleaved=interleaved, conjugate=conjugate, config=config)  # fmt: skip
    params = dict(launch.params)
    program = _host_program(params, str(tmp_path))
    n = query.shape[0]
    arrays = [query, key, cache, positions]
    files = []
    for i, a in enumerate(arrays):
        files.append(str(tmp_path / f"in{i}"))
        (np.zeros(0, np.uint8) if a is None else np.ascontiguousarray(a)).tofile(files[-1])
    header = [n, cache.shape[0], seqlen, seqlen_offset, -(-n // params["tokens_per_cta"]), params["threads"]]
    header += [0 if a is None else a.nbytes for a in arrays]
    np.asarray(header, np.int64).tofile(str(tmp_path / "header"))
    subprocess.run([program, str(tmp_path / "header"), *files, str(tmp_path / "q_out"), str(tmp_path / "k_out")], check=True)
    q_out = np.fromfile(str(tmp_path / "q_out"), query.dtype).reshape(query.shape)
    k_out = None if key is None else np.fromfile(str(tmp_path / "k_out"), key.dtype).reshape(key.shape)
    return q_out, k_out, params


# (tokens, query (heads, D, window start), key (heads, D, window start) or None, rot, dtype, positions,
#  interleaved, conjugate, seqlen (sequence length without positions), offset, config)
CONFIGS = {
    "neox_bf16_qk_gqa": (7, (4, 128, 0), (2, 128, 0), 128, BF16, True, False, False, 0, 0, {}),
    "gptj_bf16_mla_suffix": (9, (2, 192, 128), (1, 64, 0), 64, BF16, True, True, True, 0, 0, {}),
    "neox_f32_prefix_odd_outside": (6, (3, 136, 0), (2, 200, 136), 64, F32, True, False, False, 0, 0, {}),
    "gptj_f16_middle_nopos_offset": (10, (1, 96, 16), (2, 80, 8), 64, F16, False, True, False, 4, 3, {}),
    "neox_bf16_4d_nopos": (12, (3, 64, 0), None, 64, BF16, False, False, True, 5, 2, {}),
    "neox_bf16_threads256_tpc3": (41, (7, 128, 0), (3, 256, 128), 128, BF16, True, False, False, 0, 0, dict(threads=256, tokens_per_cta=3)),
    "gptj_f32_threads64_tpc1": (5, (2, 64, 0), (2, 64, 0), 64, F32, True, True, False, 0, 0, dict(threads=64, tokens_per_cta=1)),
    "one_token": (1, (1, 64, 0), None, 64, BF16, True, False, False, 0, 0, {}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generated_kernel_on_host(tmp_path, rng, name):
    n, (qh, qd, qs), kspec, rot, dtype, has_pos, interleaved, conjugate, seqlen, offset, config = CONFIGS[name]
    query = (rng.standard_normal((n, qh, qd)) * 4).astype(dtype)
    key = None if kspec is None else (rng.standard_normal((n, kspec[0], kspec[1])) * 4).astype(dtype)
    cache = (rng.standard_normal((50, rot)) * 2).astype(F32)
    positions = rng.integers(-3, 53, size=n).astype(I32) if has_pos else None  # some rows outside the table: clamped
    ks = 0 if kspec is None else kspec[2]
    q_out, k_out, params = _run_on_host(
        tmp_path, query, key, cache, positions, seqlen=seqlen or n, seqlen_offset=offset, q_start=qs, k_start=ks,
        interleaved=interleaved, conjugate=conjugate, config=R.RotaryConfig(**config),
    )  # fmt: skip
    assert params["tokens_per_cta"] == config.get("tokens_per_cta", params["tokens_per_cta"])
    rows = None if has_pos else (np.arange(n) % (seqlen or n)).astype(I32)  # the mirror with explicit rows
    for out, x, start in ((q_out, query, qs), (k_out, key, ks)):
        if x is None:
            continue
        want = np_kernel(x, cache, positions if has_pos else rows, offset, interleaved, conjugate, start)
        assert_bytes_equal(out, want, f"{name}: the kernel's arithmetic")
        reference = R.rotary_reference(query, key, cache, positions, seqlen=seqlen or n, seqlen_offset=offset, q_start=qs, k_start=ks,
                                       interleaved=interleaved, conjugate=conjugate)  # fmt: skip
        assert_near(out, np.asarray(reference[0 if x is query else 1]))
