"""``python -m jax_tilek doctor``: will this machine run (or build) jax_tilek's kernels?

One line per check, OK / WARN / FAIL, each WARN or FAIL with the fix to apply: JAX and its backend, the
GPU (name, architecture, multiprocessors, driver), JAX's CUDA plugin, the launcher extension, TileLang
and nvcc (or why compiling is unavailable), the kernel cache (entries, size, toolchains, damaged
entries), XLA's command-buffer flags, and a smoke launch of one kernel checked against its reference.
Exit status 1 when any check FAILs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable

import jax

from jax_tilek import _ffi, cache, compiler, config, platform

OK, WARN, FAIL = "OK", "WARN", "FAIL"
SMOKE = ("jax_tilek.transpose", "transpose", "matrix_bfloat16_192x320")  # family, function, ArgSpec name


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def text(self) -> str:
        line = f"{self.status:<4}  {self.name:<10}  {self.detail}"
        return line + (f"\n{'':16}fix: {self.fix}" if self.fix and self.status != OK else "")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What JAX sees: whether a CUDA device exists and what it is."""

    present: bool
    kind: str = ""
    compute_capability: str = ""
    arch: str | None = None
    cores: int | None = None
    driver: str = ""


def _distribution(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> tuple[str, str] | None:
    """(GPU name, driver version) from nvidia-smi, or None when it is absent or sees no GPU."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    if out.returncode != 0 or not first or "," not in first[0]:
        return None
    name, driver = (p.strip() for p in first[0].rsplit(",", 1))
    return name, driver


def gpu_info() -> Gpu:
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return Gpu(False)
    d = devices[0]
    smi = _nvidia_smi()
    driver = smi[1] if smi else ""
    if not driver:
        try:
            driver = d.client.platform_version.replace("\n", " ")
        except Exception:
            driver = "unknown"
    cc = str(getattr(d, "compute_capability", ""))
    return Gpu(True, d.device_kind, cc, platform.device_arch(d), getattr(d, "core_count", None), driver)


def check_jax() -> Check:
    try:
        backend = jax.default_backend()
        devices = jax.devices()
    except RuntimeError as e:
        return Check("jax", FAIL, f"jax {jax.__version__}: no backend ({e})", "check JAX_PLATFORMS and the installed plugins")
    kinds = sorted({d.device_kind for d in devices})
    return Check("jax", OK, f"jax {jax.__version__}, jaxlib {_distribution('jaxlib')}, backend {backend} "
                 f"({len(devices)} device{'s' if len(devices) != 1 else ''}: {', '.join(kinds)})")  # fmt: skip


def check_gpu(gpu: Gpu) -> Check:
    if not gpu.present:
        smi = _nvidia_smi()
        if smi is not None:
            return Check("gpu", FAIL, f"nvidia-smi sees {smi[0]} (driver {smi[1]}), but JAX has no CUDA backend",
                         "install JAX's CUDA plugin: pip install 'jax_tilek[cuda]' (jax[cuda13]); check JAX_PLATFORMS")  # fmt: skip
        return Check("gpu", WARN, "no NVIDIA GPU: jax_tilek ops run their pure-JAX references here (correct, not fast); "
                     "kernels can still be compiled for a GPU elsewhere (precompile --arch sm_90a)",
                     "nothing to fix on a CPU or build machine; to run the kernels, use an H100/H200 (sm_90) or B200 (sm_100)")  # fmt: skip
    detail = (f"{gpu.kind}, compute capability {gpu.compute_capability}"
              f"{f' ({gpu.arch})' if gpu.arch else ''}, {gpu.cores or '?'} SMs, driver {gpu.driver}")  # fmt: skip
    if gpu.arch is None:
        return Check("gpu", WARN, detail + ": no jax_tilek kernels for it, ops run their pure-JAX references",
                     "the kernels need Hopper (sm_90) or Blackwell (sm_100/sm_103)")  # fmt: skip
    return Check("gpu", OK, detail)


def check_plugin(gpu: Gpu) -> Check:
    jaxlib = _distribution("jaxlib")
    found = {n: v for n in ("jax-cuda13-plugin", "jax-cuda12-plugin", "jax-cuda13-pjrt", "jax-cuda12-pjrt")
             if (v := _distribution(n))}  # fmt: skip
    if not found:
        status = FAIL if gpu.present else WARN
        return Check("cuda", status, "JAX's CUDA plugin is not installed" + ("" if gpu.present else " (needed only on a GPU machine)"),
                     "on a GPU machine: pip install 'jax_tilek[cuda]'")  # fmt: skip
    versions = ", ".join(f"{n} {v}" for n, v in found.items())
    plugins = [v for n, v in found.items() if n.endswith("plugin")]
    if any(v != jaxlib for v in plugins):
        return Check("cuda", FAIL, f"{versions} does not match jaxlib {jaxlib}", f"pip install 'jax[cuda13]=={jaxlib}'")
    if not gpu.present:
        return Check("cuda", WARN, f"{versions} installed, but JAX sees no CUDA device",
                     "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES / JAX_PLATFORMS")  # fmt: skip
    return Check("cuda", OK, versions)


def check_launcher(gpu: Gpu) -> Check:
    need = gpu.present and gpu.arch is not None
    try:
        launcher = _ffi._launcher()
        _ffi.register()
    except (_ffi.LauncherUnavailableError, Exception) as e:  # a broken extension raises other errors too
        return Check("launcher", FAIL if need else WARN, f"not loaded: {e}",
                     "pip install . from the checkout (builds ffi/ with CMake)")  # fmt: skip
    where = getattr(launcher, "__file__", "?")
    problem = _ffi.driver_problem()
    if problem and need:
        return Check("launcher", FAIL, f"loaded ({where}), but the CUDA driver cannot be used: {problem}",
                     "install the NVIDIA driver (libcuda.so.1) or fix LD_LIBRARY_PATH")  # fmt: skip
    note = f"; CUDA driver: {problem}" if problem else "; CUDA driver usable"
    return Check("launcher", OK, f"tilek_launch registered ({where}){note}")


def check_tilelang() -> Check:
    if not compiler.tilelang_available():
        return Check("tilelang", WARN, "not installed: this machine cannot compile; kernels come from the cache only (offline)",
                     "on a build machine: pip install 'jax_tilek[compile]'; on a GPU machine ship a precompiled cache")  # fmt: skip
    try:
        version = compiler._require_tilelang().__version__
    except compiler.CompileError as e:
        return Check("tilelang", FAIL, str(e), f"pip install tilelang=={compiler.TILELANG_VERSION}")
    forced = config.env_flag("JAX_TILEK_OFFLINE")
    return Check("tilelang", OK, f"tilelang {version}" + (" (JAX_TILEK_OFFLINE=1: not compiling)" if forced else ""))


def check_nvcc() -> Check:
    try:
        path = compiler.nvcc_path()
        version = compiler.nvcc_version()
    except compiler.CompileError as e:
        return Check("nvcc", WARN, f"unavailable, so kernels missing from the cache cannot be built here: {e}",
                     "pip install 'jax_tilek[compile]' (brings nvcc) or set CUDA_HOME / JAX_TILEK_NVCC")  # fmt: skip
    if version != compiler.NVCC_VERSION:
        return Check("nvcc", WARN, f"{path} is {version}; jax_tilek is tested with {compiler.NVCC_VERSION}",
                     f"pip install nvidia-cuda-nvcc=={compiler.NVCC_VERSION} and set JAX_TILEK_NVCC to its nvcc")  # fmt: skip
    return Check("nvcc", OK, f"{version} ({path})")


def check_cache() -> Check:
    root = config.cache_dir()
    entries = cache.scan(root)
    damaged = [e for e in entries if not e.ok]
    size = sum(e.size for e in entries) / 2**20
    toolchains = {}
    for e in entries:
        toolchains[e.toolchain] = toolchains.get(e.toolchain, 0) + 1
    by_toolchain = ", ".join(f"{t}: {n}" for t, n in toolchains.items()) or "no toolchain directories"
    old = sum(e.old_format for e in entries)
    detail = f"{root}: {len(entries)} entries, {size:.1f} MiB ({by_toolchain})"
    if old:
        detail += f"; {old} of an older cache format (never looked up; prune --old-formats deletes them)"
    if damaged:
        status = FAIL if config.offline() else WARN  # offline a damaged entry is an error; online it is rebuilt
        return Check("cache", status, f"{detail}; {len(damaged)} damaged (e.g. {damaged[0].path}: {damaged[0].problem})",
                     "python -m jax_tilek cache verify (rebuilds or deletes them)")  # fmt: skip
    writable = os.access(root if os.path.isdir(root) else os.path.dirname(root) or ".", os.W_OK)
    if not writable and not config.offline():
        return Check("cache", FAIL, detail + "; not writable, so compiled kernels cannot be kept",
                     "point JAX_TILEK_CACHE_DIR at a writable directory")  # fmt: skip
    if not entries and config.offline():
        return Check("cache", WARN, detail + "; empty, and this machine cannot compile: no kernel can run",
                     "precompile on a build machine (python -m jax_tilek precompile --arch sm_90a) and ship the cache")  # fmt: skip
    return Check("cache", OK, detail)


def check_xla_flags() -> Check:
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.findall(r"--xla_gpu_enable_command_buffer=(\S*)", flags)
    minimum = re.findall(r"--xla_gpu_graph_min_graph_size=(\S*)", flags)
    if not found:
        detail = "XLA command buffers (CUDA graphs): XLA's default; tilek_launch calls can be captured"
    elif found[-1] == "":
        detail = "XLA command buffers off (--xla_gpu_enable_command_buffer=): every launch goes through the host"
    else:
        captured = "captured" if "CUSTOM_CALL" in found[-1].split(",") else "not captured (no CUSTOM_CALL)"
        detail = f"XLA command buffers: {found[-1]}; tilek_launch calls {captured}"
    if minimum:
        detail += f", min graph size {minimum[-1]}"
    return Check("xla", OK, detail)


def check_smoke(gpu: Gpu, arch: str) -> Check:
    """Launches one kernel on a supported GPU and compares it with its reference; elsewhere lowers it for
    ``arch`` (from the cache, or compiling) and runs the reference path."""
    import importlib

    import numpy as np

    from jax_tilek.testing import (
        assert_bytes_equal,
        lower_for_cuda,
        over_arrays,
        tilek_calls,
    )

    family, name, case_name = SMOKE
    fn = getattr(importlib.import_module(family), name)
    case = next(c for c in fn.cases if c.name == case_name)
    what = f"{family.rsplit('.', 1)[-1]}.{name} {case_name}"
    args = case.arrays(np.random.default_rng(0))
    reference, arrays = over_arrays(case.call(fn, "xla"), args)
    start = time.perf_counter()
    if gpu.present and gpu.arch is not None:
        kernel, _ = over_arrays(case.call(fn, "tilelang"), args)
        try:
            got = jax.block_until_ready(jax.jit(kernel)(*arrays))
        except Exception as e:
            return Check("smoke", FAIL, f"{what}: launch failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                         "run precompile for this GPU's arch and check the launcher line above")  # fmt: skip
        try:
            assert_bytes_equal(got, jax.jit(reference)(*arrays), what)
        except AssertionError as e:
            return Check("smoke", FAIL, f"{what}: kernel result differs from the reference: {e}",
                         "report it (with this output) as a jax_tilek bug")  # fmt: skip
        return Check("smoke", OK, f"{what}: launched on {gpu.kind}, equal to the reference ({time.perf_counter() - start:.1f}s)")
    default, _ = over_arrays(case.call(fn), args)
    try:
        assert_bytes_equal(jax.jit(default)(*arrays), jax.jit(reference)(*arrays), what)
    except AssertionError as e:
        return Check("smoke", FAIL, f"{what}: the default path differs from the reference off the GPU: {e}", "report it as a bug")
    program, structs = over_arrays(case.call(fn), case.structs())
    try:
        calls = tilek_calls(lower_for_cuda(program, *structs, arch=arch))
    except Exception as e:
        return Check("smoke", WARN, f"{what}: not launched (no supported GPU); the reference path ran and matched, "
                     f"but lowering for {arch} failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                     f"python -m jax_tilek precompile --arch {arch} on a build machine, then ship the cache")  # fmt: skip
    return Check("smoke", WARN, f"{what}: not launched (no supported GPU); the reference path ran and matched, and "
                 f"it lowers for {arch} to {len(calls)} tilek_launch call with its cubin ({time.perf_counter() - start:.1f}s)",
                 "launching needs an H100/H200/B200: run doctor there")  # fmt: skip


def checks(arch: str, smoke: bool = True) -> list[Check]:
    """Every check, in report order (each guarded: a check that raises is a FAIL naming the error)."""
    gpu = gpu_info()
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("jax", check_jax), ("gpu", lambda: check_gpu(gpu)), ("cuda", lambda: check_plugin(gpu)),
        ("launcher", lambda: check_launcher(gpu)), ("tilelang", check_tilelang), ("nvcc", check_nvcc),
        ("cache", check_cache), ("xla", check_xla_flags),
    ]  # fmt: skip
    if smoke:
        steps.append(("smoke", lambda: check_smoke(gpu, gpu.arch or arch)))
    out = []
    for name, step in steps:
        try:
            out.append(step())
        except Exception as e:
            out.append(Check(name, FAIL, f"the check itself failed: {type(e).__name__}: {e}", "report it as a jax_tilek bug"))
    return out


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("doctor", help="check JAX, the GPU, the launcher, the compiler and the cache", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", default=os.environ.get("JAX_TILEK_ARCH") or "sm_90a", choices=compiler.SUPPORTED_ARCHS,
                   help="without a supported GPU: the architecture the smoke test lowers for")  # fmt: skip
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke launch")


def run(args: argparse.Namespace) -> int:
    results = checks(args.arch, smoke=not args.no_smoke)
    for c in results:
        print(c.text(), flush=True)
    failed = [c.name for c in results if c.status == FAIL]
    warned = [c.name for c in results if c.status == WARN]
    print(f"\n{len(results) - len(failed) - len(warned)} OK, {len(warned)} WARN, {len(failed)} FAIL"
          + (f" ({', '.join(failed)})" if failed else ""))  # fmt: skip
    return 1 if failed else 0
