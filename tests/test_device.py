"""jax_tilek.device: prelude assembly, the library's naming rules, the op modules' preludes, and every
snippet compiled by nvcc for sm_90a (CPU only: nvcc builds the cubin, nothing runs)."""

import importlib
import os
import re
import subprocess

import pytest

from jax_tilek import compiler, device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFINED = re.compile(r"__device__\s+__forceinline__\s+[\w\s\*&]+?\b(\w+)\s*\(")


def defined(text: str) -> list[str]:
    return DEFINED.findall(text)


# ---------------------------------------------------------------------------------------------
# Assembly.


def test_each_snippet_once_with_what_it_requires_in_library_order():
    text = device.prelude(device.E4M3X4_SCALED, device.E4M3X4, device.E4M3X4_SCALED)
    assert defined(text) == ["tilek_e4m3x2", "tilek_e4m3x4", "tilek_e4m3x4_scaled"]  # E4M3X2 comes with E4M3X4
    assert text == device.prelude(device.E4M3X4, device.E4M3X4_SCALED)
    a = device.prelude(device.DIV, device.STORE16, device.BF16X2, device.E4M3_AT)
    assert a == device.prelude(device.E4M3_AT, device.BF16X2, device.STORE16, device.DIV)  # argument order is irrelevant
    assert defined(a) == [
        "tilek_store16", "tilek_bf16x2", "tilek_f16_to_f32", "tilek_e4m3x2_to_f16x2", "tilek_e4m3_at", "tilek_rcp", "tilek_div"
    ]  # fmt: skip
    assert device.prelude() == "\n// jax_tilek.device: \n"


def test_headers_come_first_once():
    text = device.prelude(device.E4M3_TO_FLOAT, device.FP4_E4M3, device.E4M3_NOSAT, device.STORE16)
    assert text.count("#include <cuda_fp16.h>") == 1 and text.count("#include <cuda_fp8.h>") == 1
    assert text.index("#include") < text.index("__device__")
    assert "#include" not in device.prelude(device.STORE16, device.E4M3X4)


def test_cache_operator_variants():
    assert device.store16() is device.STORE16 and device.store16(".cs") is device.store16(".cs")
    streaming = device.prelude(device.store16(".cs"), device.store8(".cs"), device.copy16_to_shared(".L1::no_allocate.L2::256B"))
    assert "st.global.cs.v4.u32" in streaming and "st.global.cs.v2.u32" in streaming
    assert "ld.global.nc.L1::no_allocate.L2::256B.v4.u32" in streaming
    assert "st.global.v4.u32" in device.prelude(device.STORE16)
    with pytest.raises(ValueError, match="tilek_store16 is defined by both STORE16 and STORE16.cs"):
        device.prelude(device.STORE16, device.store16(".cs"))  # one variant of a function per kernel
    for bad in ("cs", '.cs"; asm("trap', ".cs ", None):
        with pytest.raises(ValueError, match="cache must be PTX qualifiers"):
            device.store16(bad)
    assert "void tilek_store16(unsigned* p" in device.prelude(device.STORE16)
    assert "void tilek_store8(void* p" in device.prelude(device.store8(pointer="void"))
    assert device.store16(".cs", "void").name == "STORE16.cs(void*)"
    with pytest.raises(ValueError, match="tilek_store16 is defined by both STORE16 and STORE16\\(void\\*\\)"):
        device.prelude(device.STORE16, device.store16(pointer="void"))
    with pytest.raises(ValueError, match="pointer must be 'unsigned' or 'void'"):
        device.store8(pointer="float")


def test_misuse():
    with pytest.raises(TypeError, match="device.prelude takes device snippets, got str"):
        device.prelude("__device__ void f() {}")
    with pytest.raises(ValueError, match="must be named tilek_"):
        device.snippet("BAD", "__device__ __forceinline__ void tk_f() {}")
    with pytest.raises(ValueError, match="defines no"):
        device.snippet("EMPTY", "// nothing")
    with pytest.raises(ValueError, match="defined before it"):
        device.snippet("X", "__device__ __forceinline__ void tilek_x() {}", requires=[device.STORE16], rank=0)


def test_library_names():
    functions = [f for s in device.SNIPPETS for f in s.functions]
    assert all(f.startswith("tilek_") for f in functions)
    assert len(functions) == len(set(functions)), "two snippets of the library define the same function"
    assert len({s.name for s in device.SNIPPETS}) == len(device.SNIPPETS)
    for s in device.SNIPPETS:
        assert s.doc, f"{s.name} has no leading comment"
        assert defined(s.code) == list(s.functions)
    assert [s.rank for s in device.SNIPPETS] == sorted(s.rank for s in device.SNIPPETS)


def test_static_range():
    assert device.static_range(3) == (0, 1, 2) and device.static_range(0) == ()


# ---------------------------------------------------------------------------------------------
# The op modules: every prelude comes from jax_tilek.device and defines what the module calls.


CALLED = re.compile(r"call_extern\(\s*[\"'][^\"']*[\"']\s*,\s*f?[\"'](tilek_\w+)")


def _kernel_modules() -> dict[str, set[str]]:
    """The jax_tilek modules whose kernels call device functions (``T.call_extern``), and what they call."""
    found = {}
    for top, _, files in os.walk(os.path.join(ROOT, "jax_tilek")):
        for file in sorted(files):
            path = os.path.join(top, file)
            if not file.endswith(".py") or path == device.__file__:
                continue
            with open(path) as f:
                called = set(CALLED.findall(f.read()))
            if called:
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[name] = called
    return found


def _preludes(module) -> list[str]:
    """The preludes a module's kernels use: its prelude strings, or what its ``_access_prelude`` builds."""
    texts = [v for v in vars(module).values() if isinstance(v, str) and v.startswith("\n// jax_tilek.device: ")]
    if hasattr(module, "_access_prelude"):
        texts += [module._access_prelude(False), module._access_prelude(True)]
    return texts


def test_kernel_modules_are_found():
    assert len(_kernel_modules()) >= 10


@pytest.mark.parametrize("name", sorted(_kernel_modules()))
def test_op_preludes_come_from_the_library_and_define_what_the_module_calls(name):
    called = _kernel_modules()[name]
    texts = _preludes(importlib.import_module(name))
    assert texts, f"{name} calls {sorted(called)} but has no prelude built by device.prelude"
    for text in texts:
        functions = defined(text)
        assert len(functions) == len(set(functions))
        assert called <= set(functions), sorted(called - set(functions))


def test_device_code_lives_in_the_device_module():
    found = []
    for top, _, files in os.walk(os.path.join(ROOT, "jax_tilek")):
        for file in files:
            path = os.path.join(top, file)
            if file.endswith(".py") and path != device.__file__:
                with open(path) as f:
                    if "__device__" in f.read():
                        found.append(os.path.relpath(path, ROOT))
    assert not found, f"CUDA outside jax_tilek/device.py: {found}"


# ---------------------------------------------------------------------------------------------
# nvcc: every snippet compiles for sm_90a, each function called once by a dummy kernel.

CALLS = r"""
extern "C" __global__ void tilek_device_test(unsigned* out, const unsigned* in, const float* f, int k) {
  __shared__ __align__(16) unsigned smem[64];
  unsigned w = in[threadIdx.x], acc = 0;
  float x = f[threadIdx.x], y = f[threadIdx.x + 32], facc = 0.0f;
  tilek_store16(out, w, w + 1, w + 2, w + 3);
  tilek_store8(out + 4, w, w + 1);
  tilek_copy16_to_shared(smem, in);
  tilek_cp_async16(smem + 4, in + 4, k > 0);
  tilek_cp_async4(smem + 8, in + 8, k > 1);
  tilek_cp_async_commit();
  tilek_cp_async_wait<0>();
  __syncthreads();
  if (threadIdx.x == 0) {
    tilek_bulk_store(out + 64, smem, 64);
    asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group.read 0;" ::: "memory");
  }
  acc += tilek_bf16x2(x, y);
  facc += tilek_bf16_lo(w) + tilek_bf16_hi(w) + tilek_f16_to_f32(w);
  acc += tilek_f16_rz_bits(x) + tilek_e4m3x2(x, y) + tilek_e4m3x2_to_f16x2((unsigned short)w);
  acc += tilek_e4m3x4(x, y, x, y) + tilek_e4m3x4_scaled(x, y, y, x, 3.0f) + tilek_e4m3x2_f16x2(x, y);
  facc += tilek_e4m3_at(w, k & 3) + tilek_ue8m0((unsigned char)w);
  acc += tilek_e2m1_biased(x) + tilek_e2m1_add(acc, y, 1);
  acc += tilek_e2m1x4_scaled(x, y, x, y, 0.5f) + tilek_e2m1x8_scaled(x, y, x, y, y, x, y, x, 0.25f);
  acc += tilek_fp4x2_e4m3x2(w, k & 3, tilek_exp2_f16x2(k)) + tilek_fp4x4_e4m3x4(w, 0, tilek_exp2_f16x2(-k));
  facc += tilek_div(x, y, tilek_rcp(y));
  unsigned long long h = tilek_quad_hash(w, w + 1, w + 2, w + 3, threadIdx.x, (unsigned)k);
  unsigned r = tilek_rbits(h, k & 3);
  facc += tilek_sr_bf16(x, r) + tilek_sr_e4m3_fast(x, r) + tilek_sr_e4m3(x, r) + tilek_e2m1_to_float(r & 15u);
  acc += tilek_sr_e4m3_slow(x) + tilek_e2m1_rn(x) + tilek_e2m1_sr(x, r) + tilek_e4m3_nosat(y);
  facc += tilek_e4m3_to_float((unsigned char)w);
  out[8 + threadIdx.x] = acc + __float_as_uint(facc) + smem[threadIdx.x & 63];
}
"""

VARIANT_CALLS = r"""
extern "C" __global__ void tilek_device_variants(unsigned* out, const unsigned* in) {
  __shared__ __align__(16) unsigned smem[4];
  tilek_copy16_to_shared(smem, in);
  __syncthreads();
  tilek_store16(out, smem[0], smem[1], smem[2], smem[3]);
  tilek_store8(out + 4, smem[0], smem[1]);
}
"""


def _nvcc(tmp_path, name: str, source: str, *flags: str) -> str:
    cu = tmp_path / f"{name}.cu"
    cu.write_text(source)
    target = tmp_path / name
    result = subprocess.run(
        [compiler.nvcc_path(), "-arch=sm_90a", *flags, "-o", str(target), str(cu)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return target.read_bytes().decode(errors="replace")


def test_every_snippet_compiles_with_nvcc(tmp_path):
    functions = [f for s in device.SNIPPETS for f in s.functions]
    missing = [f for f in functions if not re.search(rf"\b{f}\s*[(<]", CALLS)]
    assert not missing, f"the dummy kernel calls no {missing}"
    source = device.prelude(*device.SNIPPETS) + CALLS
    _nvcc(tmp_path, "all.cubin", source, "-cubin")
    assert "tilek_device_test" in _nvcc(tmp_path, "all.ptx", source, "-ptx")


@pytest.mark.parametrize(
    "store, load, pointer",
    [(".cs", ".L1::no_allocate.L2::256B", "unsigned"), (".wt", ".L1::no_allocate", "void"), (".cg", ".L2::128B", "unsigned")],
)
def test_variants_compile_with_nvcc(tmp_path, store, load, pointer):
    snippets = device.store16(store, pointer), device.store8(store, pointer), device.copy16_to_shared(load)
    source = device.prelude(*snippets) + VARIANT_CALLS
    ptx = _nvcc(tmp_path, "variants.ptx", source, "-ptx")
    assert f"st.global{store}.v4.u32" in ptx and f"st.global{store}.v2.u32" in ptx
    assert f"ld.global.nc{load}.v4.u32" in ptx
    _nvcc(tmp_path, "variants.cubin", source, "-cubin")
