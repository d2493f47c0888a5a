"""Launch overhead: a chain of 100 tiny calls inside one jit, time per call, beside a chain of 100
non-fusible XLA ops of the same size (kept apart with ``optimization_barrier``), with XLA command
buffers (CUDA graphs) on and off. The calls are a one-CTA elementwise TileLang kernel and the same
elementwise op in XLA, so the device work is alike and the difference is the launch path.

Each command-buffer setting runs in its own process (``python -m benchmarks.overhead --child``),
since XLA reads its flags once; the settings alternate over ``REPEATS`` fresh processes each, and the
medians are reported with their ranges (per-call host cost varies between processes).

Where the difference goes (``python -m benchmarks.overhead --explain``, issue 15's measurements):

- ``donated``: the chains run as ``x = f(x)`` with x donated, so the buffers' addresses repeat
  between executions (XLA updates a command buffer in place when they do, and must re-record a
  traced custom call when they do not);
- ``kernel_xla_grid``: our chain with the kernel in the CTA shape of XLA's own fusion (32 CTAs of 128
  threads, one value each, instead of 2 CTAs of 256 threads, a 16-byte vector each), so that the two
  chains differ only in how their kernels are launched (H100, 2026-12-07: no closer, 1.08-1.10 us a call
  replayed against XLA's 0.82, ours 1.02 in its own shape);
- ``execute_ns``: the launcher's own host time per execute (or record) call, ``launch_ns`` of it in the
  driver's launch call (``JAX_TILEK_LAUNCH_STATS=1``), and how many execute and record calls one run of the chain makes
  with command buffers on (0 when XLA replays the graph, 100 when it re-captures or re-records our
  calls); the settings ``on`` (stream capture, the default) and ``on_record`` (kernel nodes by the FFI
  record stage, ``JAX_TILEK_RECORD=1``, where the launcher has it) side by side;
- ``graph``: the same cubin in CUDA graphs built by hand with the driver API, outside XLA, timed by
  events: 100 kernel nodes in a chain (how XLA's own kernels enter a graph) against 100 child-graph
  nodes of one kernel each (how a traced FFI call enters one), and 100 kernel nodes whose functions
  come from 100 loads of the cubin (what a record-stage node gets if XLA loads the cubin per node);
  the same in XLA's CTA shape, for a plain nvcc-built kernel of the op in that shape (``PLAIN_CUDA``)
  and for XLA's own kernel of the op (its dumped PTX, built by nvcc), each also writing in place (as
  XLA's chain may: its buffers' reuse); and the host time of a plain ``cuLaunchKernel`` of the cubin.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_tilek

CHAIN = 100
REPEATS = int(os.environ.get("JAX_TILEK_OVERHEAD_REPEATS", "3"))  # processes per setting
SHAPE = (64, 64)
ON = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
# Command-buffer settings: XLA flags and environment. "on": our calls enter the graph by stream capture
# into child graphs (the default); "on_record": as kernel nodes where the launcher has the FFI record
# stage (JAX_TILEK_RECORD=1; a jaxlib whose XLA has it), else by stream capture too.
SETTINGS = {
    "on": (ON, {}),
    "on_record": (ON, {"JAX_TILEK_RECORD": "1"}),
    "off": ("--xla_gpu_enable_command_buffer=", {}),
}


@jax_tilek.kernel
def affine_kernel(n_cols: int, pdl: bool = False, threads: int = 256, vector: int = 8):
    """y = x * 2 + 1 on bf16 rows; CTAs of 256 threads, each thread one 16-byte vector (8 values), as
    XLA's own elementwise fusion of this size does it: no thread waits on a second load (an earlier
    version looped over two vectors per thread and measured ~0.3 us more per call on the device
    alone, in hand-built graphs too). M must be a multiple of threads * vector / n_cols rows. ``pdl``: a
    programmatic dependent launch (the next kernel may start as this one starts; each waits for its
    predecessor's completion before reading x), as XLA may launch its own kernels. ``threads`` and
    ``vector`` (values a thread) give other CTA shapes: 128 and 1 is the grid XLA's own fusion of this op
    takes at 64 x 64 (Nsight Compute, H100, 2026-12-07: 32 CTAs of 128 threads)."""
    import tilelang.language as T
    from tilelang.cuda.language import pdl_sync, pdl_trigger

    M = T.dynamic("M")
    rows = threads * vector // n_cols

    @T.prim_func
    def affine(x: T.Tensor((M, n_cols), "bfloat16"), y: T.Tensor((M, n_cols), "bfloat16")):
        with T.Kernel(M // rows, threads=threads) as bx:
            T.assume(M % rows == 0)
            if pdl:
                pdl_trigger()
                pdl_sync()
            for i, j in T.Parallel(rows, n_cols):
                y[bx * rows + i, j] = x[bx * rows + i, j] * T.bfloat16(2) + T.bfloat16(1)

    return affine


def affine(x, pdl: bool = False, **shape):
    params = dict(n_cols=x.shape[1], pdl=pdl, **shape)
    return jax_tilek.tilelang_call(affine_kernel, x, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), params=params)


XLA_GRID = dict(threads=128, vector=1)  # the CTA shape of XLA's own fusion of x * 2 + 1 at SHAPE

# The same op as a plain CUDA kernel in XLA's CTA shape (one value a thread, 128 threads), built by nvcc
# without TileLang's headers: in hand-built graphs beside TileLang's cubin, whether the per-node device
# time is the kernel's code (``--explain``; needs nvcc where it runs, the GPU image has one).
PLAIN_CUDA = r"""
#include <cuda_bf16.h>
extern "C" __global__ void __launch_bounds__(128) plain_affine(const __nv_bfloat16* x, __nv_bfloat16* y, int n) {
  int i = blockIdx.x * 128 + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16(__bfloat162float(x[i]) * 2.f + 1.f);
}
"""


def _chain(step, barrier: bool):
    def chain(x):
        for _ in range(CHAIN):
            x = step(x)
            if barrier:
                x = jax.lax.optimization_barrier(x)
        return x

    return chain


PAIRS = {
    "elementwise": (_chain(affine, False), _chain(lambda x: x * 2 + 1, True)),
    "elementwise_pdl": (_chain(lambda x: affine(x, pdl=True), False), _chain(lambda x: x * 2 + 1, True)),
    "elementwise_xla_grid": (_chain(lambda x: affine(x, **XLA_GRID), False), _chain(lambda x: x * 2 + 1, True)),
}


def _child() -> None:
    from benchmarks.harness import time_per_call

    x = jax.device_put(np.random.default_rng(0).standard_normal(SHAPE, np.float32).astype(jnp.bfloat16))
    out = {}
    for name, (ours, xla) in PAIRS.items():
        out[name] = {"kernel": time_per_call(ours, [(x,)]) / CHAIN * 1e6, "xla": time_per_call(xla, [(x,)]) / CHAIN * 1e6}
    print(json.dumps(out))


def _donated_child() -> None:
    """Per-call microseconds of the chains (ours in both CTA shapes, XLA's) run as ``x = f(x)`` with x donated, and with
    ``JAX_TILEK_LAUNCH_STATS=1`` set, the launcher's execute count and host time per timed run."""
    import time

    from jax_tilek import _ffi

    x = jax.device_put(np.random.default_rng(0).standard_normal(SHAPE, np.float32).astype(jnp.bfloat16))
    out = {}
    chains = {"kernel": PAIRS["elementwise"][0], "kernel_xla_grid": PAIRS["elementwise_xla_grid"][0], "xla": PAIRS["elementwise"][1]}
    for label, chain in chains.items():
        f = jax.jit(chain, donate_argnums=0)
        x = jax.block_until_ready(f(f(x)))
        before = _ffi.launch_stats()
        runs, samples = 200, []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(runs):
                x = f(x)
            jax.block_until_ready(x)
            samples.append((time.perf_counter() - start) / (runs * CHAIN) * 1e6)
        out[label] = statistics.median(samples)
        after = _ffi.launch_stats()
        if label == "kernel":
            executions = after["executions"] - before["executions"]
            out["executions_per_run"] = executions / (5 * runs)
            out["records_per_run"] = (after["records"] - before["records"]) / (5 * runs)
            out["execute_ns_per_call"] = (after["execute_ns"] - before["execute_ns"]) / max(executions, 1)
            out["launch_ns_per_call"] = (after["launch_ns"] - before["launch_ns"]) / max(executions, 1)
    print(json.dumps(out))


def _graph_child() -> None:
    """The affine cubin in hand-built CUDA graphs (driver API through ctypes, no XLA): microseconds
    per node, by events over a launch of each graph (median of 50), for a chain of ``CHAIN`` kernel
    nodes, a chain of ``CHAIN`` child-graph nodes of one kernel node each, kernel nodes of 100 loads
    of the cubin, kernel nodes writing in place, kernel and child-graph nodes of the cubin with XLA's
    CTA shape (``XLA_GRID``), kernel nodes of ``PLAIN_CUDA`` where nvcc runs and of XLA's own kernel
    of the op (:func:`_xla_cubin`), out of place and in place; and the host time of one plain
    ``cuLaunchKernel`` of the cubin on a stream (a ctypes call: an upper bound)."""
    import ctypes
    import time

    cuda = ctypes.CDLL("libcuda.so.1")

    def check(result, what):
        if result != 0:
            raise RuntimeError(f"{what} failed: CUresult {result}")

    p = ctypes.c_void_p
    ctx, dev, stream = p(), ctypes.c_int(), p()
    check(cuda.cuInit(0), "cuInit")
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    check(cuda.cuStreamCreate(ctypes.byref(stream), 0), "cuStreamCreate")
    arch = os.environ.get("JAX_TILEK_GRAPH_ARCH", "sm_90a")
    values = SHAPE[0] * SHAPE[1]
    # name -> (cubin image, entry, CTAs, threads, the int argument: TileLang's rows, the plain kernel's values)
    images = {}
    for name, shape in (("tilelang", {}), ("tilelang_xla_grid", XLA_GRID)):
        artifact = affine_kernel.artifact(dict(n_cols=SHAPE[1], **shape), arch, record=False)
        threads = shape.get("threads", 256)
        images[name] = (artifact.cubin, artifact.spec.kernels[0].entry, values // (threads * shape.get("vector", 8)), threads, SHAPE[0])
    plain = _plain_cubin(arch)
    if plain is not None:
        images["plain_nvcc"] = (plain, "plain_affine", values // 128, 128, values)
    xla = _xla_cubin(arch)
    if xla is not None:
        cubin, entry, threads = xla
        images["xla_ptx"] = (cubin, entry, -(-values // threads), threads, values)
    images = {name: (ctypes.create_string_buffer(c, len(c)), e.encode(), *rest) for name, (c, e, *rest) in images.items()}

    def load(name: str):
        """A fresh module of cubin ``name``: its entry function."""
        image, entry = images[name][:2]
        module, function = p(), p()
        check(cuda.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        check(cuda.cuModuleGetFunction(ctypes.byref(function), module, entry), "cuModuleGetFunction")
        return function

    fn = load("tilelang")
    buffers = [ctypes.c_uint64() for _ in range(2)]
    for b in buffers:  # 1 MiB: room past the 8 KB a kernel of another's grid might touch
        check(cuda.cuMemAlloc_v2(ctypes.byref(b), 1 << 20), "cuMemAlloc")

    class KernelNodeParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
        _fields_ = [("func", p), ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                    ("params", ctypes.POINTER(p)), ("extra", p), ("kern", p), ("ctx", p)]  # fmt: skip

    keep = []

    def kernel_args(i, extent: int, in_place: bool = False):
        """x, y (x itself ``in_place``) and the int the kernel takes (a kernel of fewer arguments ignores the rest)."""
        src, dst = buffers[i % 2], buffers[i % 2 if in_place else (i + 1) % 2]
        values = [ctypes.c_uint64(src.value), ctypes.c_uint64(dst.value), ctypes.c_int32(extent)]
        args = (p * 3)(*[ctypes.addressof(v) for v in values])
        keep.extend([values, args])
        return args

    def add_kernel(graph, deps, i, function, name, in_place):
        _, _, ctas, threads, extent = images[name]
        node_params = KernelNodeParams(function, (ctas, 1, 1), (threads, 1, 1), 0, kernel_args(i, extent, in_place), None, None, None)
        node = p()
        check(cuda.cuGraphAddKernelNode_v2(ctypes.byref(node), graph, deps, len(deps), ctypes.byref(node_params)), "cuGraphAddKernelNode")
        return node

    def build(child_nodes: bool, own_modules: bool, name: str, in_place: bool):
        graph = p()
        check(cuda.cuGraphCreate(ctypes.byref(graph), 0), "cuGraphCreate")
        previous, function = None, load(name)
        for i in range(CHAIN):
            deps = (p * 1)(previous) if previous is not None else (p * 0)()
            if child_nodes:
                child = p()
                check(cuda.cuGraphCreate(ctypes.byref(child), 0), "cuGraphCreate")
                add_kernel(child, (p * 0)(), i, function, name, in_place)
                node = p()
                check(cuda.cuGraphAddChildGraphNode(ctypes.byref(node), graph, deps, len(deps), child), "cuGraphAddChildGraphNode")
            else:
                node = add_kernel(graph, deps, i, load(name) if own_modules else function, name, in_place)
            previous = node
        executable = p()
        check(cuda.cuGraphInstantiateWithFlags(ctypes.byref(executable), graph, ctypes.c_ulonglong(0)), "cuGraphInstantiate")
        return executable

    start, stop = p(), p()
    check(cuda.cuEventCreate(ctypes.byref(start), 0), "cuEventCreate")
    check(cuda.cuEventCreate(ctypes.byref(stop), 0), "cuEventCreate")
    out = {}
    variants = {  # label -> (child-graph nodes, a module per node, cubin, in place)
        "kernel_nodes": (False, False, "tilelang", False), "child_graph_nodes": (True, False, "tilelang", False),
        "kernel_nodes_own_modules": (False, True, "tilelang", False), "kernel_nodes_in_place": (False, False, "tilelang", True),
        "kernel_nodes_xla_grid": (False, False, "tilelang_xla_grid", False), "child_graph_nodes_xla_grid": (True, False, "tilelang_xla_grid", False),
    }  # fmt: skip
    variants |= {f"kernel_nodes_{name}": (False, False, name, False) for name in ("plain_nvcc", "xla_ptx") if name in images}
    variants |= {"kernel_nodes_xla_ptx_in_place": (False, False, "xla_ptx", True)} if "xla_ptx" in images else {}
    for label, (child_nodes, own_modules, name, in_place) in variants.items():
        executable = build(child_nodes, own_modules, name, in_place)
        samples = []
        for _ in range(60):
            check(cuda.cuEventRecord(start, stream), "cuEventRecord")
            check(cuda.cuGraphLaunch(executable, stream), "cuGraphLaunch")
            check(cuda.cuEventRecord(stop, stream), "cuEventRecord")
            check(cuda.cuEventSynchronize(stop), "cuEventSynchronize")
            ms = ctypes.c_float()
            check(cuda.cuEventElapsedTime(ctypes.byref(ms), start, stop), "cuEventElapsedTime")
            samples.append(ms.value * 1e3 / CHAIN)
        out[label] = statistics.median(samples[10:])
    _, _, ctas, threads, extent = images["tilelang"]
    args = kernel_args(0, extent)
    launch = cuda.cuLaunchKernel
    samples = []
    for _ in range(7):
        begin = time.perf_counter()
        for _ in range(CHAIN):
            launch(fn, ctas, 1, 1, threads, 1, 1, 0, stream, args, None)
        samples.append((time.perf_counter() - begin) / CHAIN * 1e6)
        check(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")
    out["stream_launch_host_us"] = statistics.median(samples[2:])
    print(json.dumps(out))


def _nvcc_cubin(arch: str, source: str) -> bytes | None:
    """The cubin nvcc builds for ``arch`` from ``source`` (a .cu or .ptx file; None where no nvcc runs)."""
    from jax_tilek import compiler

    cubin = os.path.splitext(source)[0] + ".cubin"
    try:
        subprocess.run([compiler.nvcc_path(), f"-arch={arch}", "-cubin", "-O3", "-o", cubin, source], check=True, capture_output=True)
    except (OSError, compiler.CompileError, subprocess.CalledProcessError):
        return None
    with open(cubin, "rb") as f:
        return f.read()


def _plain_cubin(arch: str) -> bytes | None:
    """``PLAIN_CUDA`` built by nvcc for ``arch`` (None where no nvcc runs)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "plain.cu")
        with open(source, "w") as f:
            f.write(PLAIN_CUDA)
        return _nvcc_cubin(arch, source)


def _xla_cubin(arch: str) -> tuple[bytes, str, int] | None:
    """XLA's own kernel of ``x * 2 + 1`` at ``SHAPE`` (bf16): the PTX a JAX process dumps
    (``--xla_dump_to``), built by nvcc for ``arch``; ``(cubin, entry, threads a CTA)``, or None where
    no GPU JAX, dump or nvcc is at hand."""
    import glob
    import re
    import tempfile

    code = ("import jax, jax.numpy as jnp, numpy as np; "
            f"x = jax.device_put(np.ones({SHAPE}, jnp.bfloat16)); jax.jit(lambda x: x * 2 + 1)(x).block_until_ready()")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp}")
        try:
            subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
            ptx = sorted(f for f in glob.glob(os.path.join(tmp, "*.ptx")) if "lambda" in os.path.basename(f))[0]
            text = open(ptx).read()
            (entry,) = re.findall(r"\.entry\s+(\w+)\s*\(", text)
            threads = int(re.search(r"\.(?:reqntid|maxntid)\s+(\d+)", text).group(1))
        except (OSError, IndexError, ValueError, AttributeError, subprocess.CalledProcessError):
            return None
        cubin = _nvcc_cubin(arch, ptx)
        return None if cubin is None else (cubin, entry, threads)


def _run_child(mode: str, setting: str, **env_extra: str) -> dict:
    flags, env_setting = SETTINGS[setting]
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(), **env_setting, **env_extra)
    done = subprocess.run([sys.executable, "-m", "benchmarks.overhead", mode], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def explain() -> dict:
    """Issue 15's measurements (module docstring), each command-buffer setting in its own processes."""
    result = {"graph": _run_child("--graph", "off")}
    for setting in SETTINGS:
        result[f"donated_{setting}"] = [_run_child("--donated", setting) for _ in range(REPEATS)]
        result[f"stats_{setting}"] = _run_child("--donated", setting, JAX_TILEK_LAUNCH_STATS="1")
    print(json.dumps(result, indent=1), flush=True)
    return result


def measure() -> list[dict]:
    samples: dict[tuple[str, str], list[dict]] = {}
    for _ in range(REPEATS):
        for setting in SETTINGS:
            for pair, times in _run_child("--child", setting).items():
                samples.setdefault((pair, setting), []).append(times)
    results = []
    for (pair, setting), runs in samples.items():
        kernel, xla = sorted(r["kernel"] for r in runs), sorted(r["xla"] for r in runs)
        ratios = sorted(r["kernel"] / r["xla"] for r in runs)
        results.append({
            "family": "overhead", "case": f"{pair} x{CHAIN}", "command_buffers": setting,
            "kernel_us_per_call": statistics.median(kernel), "xla_us_per_call": statistics.median(xla),
            "ratio": statistics.median(ratios), "ratio_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
            "samples": runs,
        })  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    return results


def precompile(arch: str) -> None:
    for ours, _ in PAIRS.values():
        jax_tilek.precompile(ours, jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16), arch=arch)


if __name__ == "__main__":
    modes = {"--child": _child, "--donated": _donated_child, "--graph": _graph_child, "--explain": explain}
    modes.get(sys.argv[1] if sys.argv[1:] else "", measure)()
