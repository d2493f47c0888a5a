"""TileLang prim_func -> cubin + :class:`~jax_tilek.spec.LaunchSpec`, on any machine with TileLang and nvcc.

No GPU is needed: the target architecture is given explicitly. This is the only module that imports
TileLang, and it reads TileLang internals (the lowered host and device modules), so it is tested
against exactly ``TILELANG_VERSION``.

What is read from the lowered modules:
- the host entry function's ``call_packed`` calls give the device kernels in launch order, the
  argument expression of every device parameter, and the launch parameters named by the device
  function's ``tirx.kernel_launch_params`` (grid, block, dynamic shared memory, cluster dims);
- each device function's parameter types tell pointers, TMA descriptors (``grid_constant``) and
  scalars apart; its attributes carry PDL (``has_cuda_pdl_sync``) and cooperative launch;
- the host attribute ``tma_descriptor_args`` gives every ``cuTensorMapEncodeTiled`` argument;
- the prim_func's ``buffer_map`` gives each tensor's shape and strides over the dynamic symbols.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from jax_tilek.spec import (
    DeviceKernel,
    Expr,
    KernelArg,
    LaunchSpec,
    ScalarParam,
    TensorParam,
    TmaDescriptor,
    symbols,
)

TILELANG_VERSION = "0.1.15"
SPEC_FORMAT = 1  # bump when extraction or the build flags change: it is part of every cache key
SUPPORTED_ARCHS = ("sm_90a", "sm_100a", "sm_103a")

_log = logging.getLogger(__name__)


class CompileError(RuntimeError):
    """A kernel could not be lowered by TileLang or built by nvcc."""


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
    """A compiled kernel: the module image, how to launch it, and its CUDA source (for reading)."""

    cubin: bytes
    spec: LaunchSpec
    source: str = ""


def tilelang_available() -> bool:
    try:
        import tilelang  # noqa: F401
    except Exception:
        return False
    return True


def _require_tilelang():
    try:
        import tilelang
    except Exception as e:  # ImportError, or torch missing underneath
        raise CompileError(
            f"compiling a kernel needs TileLang {TILELANG_VERSION} (pip install 'jax_tilek[compile]'): {e}"
        ) from e
    if tilelang.__version__ != TILELANG_VERSION:
        raise CompileError(
            f"jax_tilek's compiler is tested with TileLang {TILELANG_VERSION}, found {tilelang.__version__}"
        )
    return tilelang


class NvccNotFoundError(CompileError):
    """No nvcc on this machine, so a kernel missing from the cache cannot be built here."""


NVCC_VERSION = "13.0.88"  # the nvcc the compiler is tested with; the [compile] extra installs it
_SYSTEM_CUDA_HOMES = ("/usr/local/cuda", "/usr/local/cuda-13.0", "/opt/cuda")


def _executable(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def wheel_nvcc() -> str | None:
    """The nvcc inside an installed ``nvidia-cuda-nvcc`` wheel (``nvidia/cu13/bin/nvcc``), if any.

    The CUDA 13 wheels share one tree (``nvidia/cu13``), so nvcc finds the headers, ``cicc`` and
    libdevice that ``nvidia-cuda-runtime``, ``-crt``, ``-cccl`` and ``nvidia-nvvm`` put beside it.
    """
    import importlib.metadata

    try:
        files = importlib.metadata.files("nvidia-cuda-nvcc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "nvcc" and f.parent.name == "bin":
            path = os.path.abspath(str(f.locate()))
            if _executable(path):
                return path
    return None


@functools.cache
def nvcc_path() -> str:
    """The nvcc that builds cubins, first found of: ``$JAX_TILEK_NVCC``; ``$CUDA_HOME/bin/nvcc`` (or
    ``$CUDA_PATH``); ``nvcc`` on ``PATH``; ``/usr/local/cuda``; the ``nvidia-cuda-nvcc`` wheel that the
    ``[compile]`` extra installs. A system CUDA thus wins over the wheel when both are present."""
    explicit = os.environ.get("JAX_TILEK_NVCC")
    if explicit:
        if not _executable(explicit):
            raise NvccNotFoundError(f"JAX_TILEK_NVCC={explicit!r} is not an executable nvcc")
        return explicit
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and _executable(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    for home in _SYSTEM_CUDA_HOMES:
        if _executable(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = wheel_nvcc()
    if found:
        return found
    raise NvccNotFoundError(
        "nvcc not found, so kernels missing from the cache cannot be built: install jax_tilek[compile] "
        f"(it brings nvidia-cuda-nvcc {NVCC_VERSION} from the package index), or point CUDA_HOME or "
        "JAX_TILEK_NVCC at a CUDA toolkit, or put nvcc on PATH"
    )


def nvcc_available() -> bool:
    try:
        nvcc_path()
    except NvccNotFoundError:
        return False
    return True


@functools.cache
def nvcc_version() -> str:
    out = _nvcc_version_text(nvcc_path())
    match = re.search(r"V(\d+\.\d+\.\d+)", out)
    if not match:
        raise CompileError(f"cannot read the nvcc version from: {out!r}")
    return match.group(1)


@functools.cache
def _nvcc_version_text(path: str) -> str:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NvccNotFoundError(f"{path} --version failed: {e}") from e


def toolchain() -> dict[str, str]:
    """Versions that determine the generated code; part of every cache entry's address."""
    return {"tilelang": _require_tilelang().__version__, "nvcc": nvcc_version()}


# ---------------------------------------------------------------------------------------------
# TIR expressions -> spec expressions.

_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "FloorDiv": "floordiv", "FloorMod": "floormod",
    "Div": "div", "Mod": "mod", "Min": "min", "Max": "max", "EQ": "eq", "NE": "ne", "LT": "lt",
    "LE": "le", "GT": "gt", "GE": "ge", "And": "and", "Or": "or",
}  # fmt: skip


def to_expr(node: Any) -> Expr:
    """Converts a TIR PrimExpr over symbols into a spec expression."""
    from tvm import tirx

    if isinstance(node, (int, float)):
        return node
    kind = type(node).__name__
    if isinstance(node, tirx.IntImm):
        return bool(node.value) if str(node.dtype) == "bool" else int(node.value)
    if isinstance(node, tirx.FloatImm):
        return float(node.value)
    if isinstance(node, tirx.Var):
        return node.name
    if kind in _BINARY:
        return [_BINARY[kind], to_expr(node.a), to_expr(node.b)]
    if isinstance(node, tirx.Not):
        return ["not", to_expr(node.a)]
    if isinstance(node, tirx.Cast):
        return ["cast", str(node.dtype), to_expr(node.value)]
    if isinstance(node, tirx.Select):
        return ["select", to_expr(node.condition), to_expr(node.true_value), to_expr(node.false_value)]
    if isinstance(node, tirx.Call) and getattr(node.op, "name", "") == "tirx.if_then_else":
        return ["select", *(to_expr(a) for a in node.args)]
    raise CompileError(f"unsupported expression in the launch parameters: {node} ({kind})")


# ---------------------------------------------------------------------------------------------
# Extraction.


def _host_entry(host_mod):
    funcs = [f for _, f in host_mod.functions.items() if f.attrs is not None and f.attrs.get("tirx.is_entry_func")]
    if len(funcs) != 1:
        raise CompileError(f"expected one host entry function, found {len(funcs)}")
    return funcs[0]


def _packed_calls(host_func, device_names: set[str]):
    """The host's call_packed calls in program order; launches must not sit under a branch or loop."""
    from tvm import tirx

    calls = []

    def is_packed(n):
        return isinstance(n, tirx.Call) and "call_packed" in str(getattr(n.op, "name", ""))

    def visit(n):
        if isinstance(n, (tirx.IfThenElse, tirx.For, tirx.While)):
            nested = []
            tirx.stmt_functor.post_order_visit(n, lambda m: nested.append(m) if is_packed(m) else None)
            if any(str(m.args[0].value) in device_names for m in nested):
                raise CompileError("a device kernel launch is under a host-side branch or loop; not supported")
        if is_packed(n):
            calls.append(n)

    tirx.stmt_functor.post_order_visit(host_func.body, visit)
    return calls


_LAUNCH_TAGS = {
    "blockIdx.x": ("grid", 0), "blockIdx.y": ("grid", 1), "blockIdx.z": ("grid", 2),
    "threadIdx.x": ("block", 0), "threadIdx.y": ("block", 1), "threadIdx.z": ("block", 2),
    "tir.cluster_dim_x": ("cluster", 0), "tir.cluster_dim_y": ("cluster", 1), "tir.cluster_dim_z": ("cluster", 2),
    "tirx.use_dyn_shared_memory": ("smem", 0),
}  # fmt: skip


def extract_spec(func, artifact, name: str) -> LaunchSpec:
    """Builds the launch spec from the prim_func and TileLang's lowered modules."""
    from tvm import tirx

    params: list[TensorParam | ScalarParam] = []
    data_to_tensor: dict[str, str] = {}
    for p in func.params:
        if p in func.buffer_map:
            buf = func.buffer_map[p]
            strides = tuple(to_expr(s) for s in buf.strides) if len(buf.strides) else None
            params.append(TensorParam(buf.name, str(buf.dtype), tuple(to_expr(d) for d in buf.shape), strides))
            data_to_tensor[buf.data.name] = buf.name
        else:
            params.append(ScalarParam(p.name, str(p.dtype)))
    known = {p.name for p in params if isinstance(p, ScalarParam)}
    for p in params:
        if isinstance(p, TensorParam):
            for e in p.shape + (p.strides or ()):
                known |= symbols(e)

    def check_symbols(e: Expr, what: str) -> Expr:
        unknown = symbols(e) - known
        if unknown:
            raise CompileError(f"{what} uses {sorted(unknown)}, which are not kernel parameters or shape symbols")
        return e

    host = _host_entry(artifact.host_mod)
    tma_args = host.attrs.get("tma_descriptor_args") or {}
    tma: dict[str, TmaDescriptor] = {}
    for var, a in tma_args.items():
        call = [x for x in a]
        if str(call[0].value if hasattr(call[0], "value") else call[0]) != "__tvm_tensormap_create_tiled":
            raise CompileError(f"TMA descriptor {var.name}: only tiled tensor maps are supported, got {call[0]}")
        rank = int(call[3])
        rest = call[5:]
        dims, strides = rest[:rank], rest[rank : 2 * rank]
        box, elem = rest[2 * rank : 3 * rank], rest[3 * rank : 4 * rank]
        interleave, swizzle, l2, oob = (int(x) for x in rest[4 * rank : 4 * rank + 4])
        address = call[4]
        if not isinstance(address, tirx.Var) or address.name not in data_to_tensor:
            raise CompileError(f"TMA descriptor {var.name}: global address {address} is not a kernel tensor")
        tma[var.name] = TmaDescriptor(
            name=var.name,
            tensor=data_to_tensor[address.name],
            dtype=int(call[2]),
            dims=tuple(check_symbols(to_expr(d), "a TMA dimension") for d in dims),
            strides=tuple(check_symbols(to_expr(s), "a TMA stride") for s in strides[1:]),
            box=tuple(to_expr(b) for b in box),
            element_strides=tuple(to_expr(e) for e in elem),
            interleave=interleave,
            swizzle=swizzle,
            l2_promotion=l2,
            oob_fill=oob,
        )

    device = {gv.name_hint: f for gv, f in artifact.device_mod.functions.items()}
    kernels = []
    for call in _packed_calls(host, set(device)):
        callee = str(call.args[0].value)
        if callee == "__tvm_set_device" or callee == "__tvm_tensormap_create_tiled":
            continue
        if callee not in device:
            raise CompileError(f"the host calls {callee!r}, which jax_tilek cannot launch (L2 persistence, im2col, ...)")
        dev = device[callee]
        attrs = dev.attrs
        n = len(dev.params)
        call_args, launch_args = list(call.args[1 : 1 + n]), list(call.args[1 + n :])
        tags = [str(t) for t in attrs["tirx.kernel_launch_params"]]
        if len(tags) != len(launch_args):
            raise CompileError(f"{callee}: launch parameters {tags} do not match the call {call}")
        launch = {"grid": [1, 1, 1], "block": [1, 1, 1], "cluster": [1, 1, 1], "smem": [0]}
        for tag, value in zip(tags, launch_args):
            if tag not in _LAUNCH_TAGS:
                raise CompileError(f"{callee}: unknown launch parameter {tag}")
            field, axis = _LAUNCH_TAGS[tag]
            launch[field][axis] = check_symbols(to_expr(value), f"{callee}'s {field}")
        args = []
        for param, value in zip(dev.params, call_args):
            annotation = param.type_annotation
            scope = getattr(annotation, "storage_scope", None)
            if str(param.dtype) == "handle" and scope == "grid_constant":
                if value.name not in tma:
                    raise CompileError(f"{callee}: TMA descriptor {value.name} has no recipe")
                args.append(KernelArg("tma", ref=value.name))
            elif str(param.dtype) == "handle":
                if not isinstance(value, tirx.Var) or value.name not in data_to_tensor:
                    raise CompileError(f"{callee}: pointer argument {value} is not a kernel tensor")
                args.append(KernelArg("buffer", ref=data_to_tensor[value.name]))
            else:
                expr = check_symbols(to_expr(value), f"{callee}'s argument {param.name}")
                args.append(KernelArg("scalar", dtype=str(param.dtype), value=expr))
        cluster = tuple(int(c) for c in launch["cluster"])
        kernels.append(
            DeviceKernel(
                entry=callee,
                grid=tuple(launch["grid"]),
                block=tuple(launch["block"]),
                smem=launch["smem"][0],
                cluster=cluster,
                pdl=bool(attrs.get("has_cuda_pdl_sync") is not None),
                cooperative=bool(attrs.get("use_cooperative_groups", False)),
                args=tuple(args),
            )
        )
    if not kernels:
        raise CompileError("the lowered host function launches no device kernel")
    return LaunchSpec(name=name, params=tuple(params), kernels=tuple(kernels), tma=tuple(tma.values()))


# ---------------------------------------------------------------------------------------------
# nvcc.


def nvcc_command(arch: str, pass_configs: Mapping[str, Any], source: str, output: str) -> list[str]:
    """The nvcc command TileLang itself would use for this target, writing a cubin."""
    import tilelang.env as tl_env

    number = arch.removeprefix("sm_")
    cmd = [
        nvcc_path(), "--cubin", "-O3", "-lineinfo", "-std=c++20", "-w",
        "-gencode", f"arch=compute_{number},code={arch}",
        f"-I{tl_env.TILELANG_TEMPLATE_PATH}", f"-I{tl_env.CUTLASS_INCLUDE_DIR}",
    ]  # fmt: skip
    if pass_configs.get("tl.enable_fast_math"):
        cmd.append("--use_fast_math")
    level = pass_configs.get("tl.ptxas_register_usage_level")
    if level is not None:
        cmd.append(f"--ptxas-options=--register-usage-level={int(level)}")
    extra = pass_configs.get("tl.device_compile_flags")
    if extra:
        cmd += shlex.split(extra) if isinstance(extra, str) else [str(f) for f in extra]
    return cmd + [source, "-o", output]


@dataclasses.dataclass(frozen=True, eq=False)
class Lowered:
    """A prim_func lowered by TileLang: the CUDA source nvcc builds, and how to launch it."""

    source: str
    spec: LaunchSpec


def lower_prim_func(func, arch: str, *, pass_configs: Mapping[str, Any] | None = None, name: str = "") -> Lowered:
    """Lowers a TileLang prim_func for ``arch`` to CUDA source and a launch spec (no nvcc, no GPU)."""
    tilelang = _require_tilelang()
    import tvm
    from tvm.target import Target

    if arch not in SUPPORTED_ARCHS:
        raise CompileError(f"unsupported architecture {arch!r}; expected one of {SUPPORTED_ARCHS}")
    if not isinstance(func, tvm.tirx.PrimFunc):
        raise CompileError(f"the kernel factory must return a TileLang prim_func, got {type(func).__name__}")
    pass_configs = dict(pass_configs or {})
    name = name or "kernel"
    target = Target({"kind": "cuda", "arch": arch})
    start = time.perf_counter()
    try:
        with tvm.transform.PassContext(opt_level=3, config=pass_configs), target:
            lowered = tilelang.lower(func, target=target)
    except Exception as e:
        raise CompileError(f"TileLang could not lower kernel {name!r}: {e}") from e
    result = Lowered(source=lowered.kernel_source, spec=extract_spec(func, lowered, name))
    _log.debug("TileLang lowered %s for %s in %.2fs", name, arch, time.perf_counter() - start)
    return result


def build_cubin(source: str, arch: str, *, pass_configs: Mapping[str, Any] | None = None, name: str = "") -> bytes:
    """nvcc: CUDA source -> cubin for ``arch``."""
    pass_configs = dict(pass_configs or {})
    name = name or "kernel"
    with tempfile.TemporaryDirectory(prefix="jax_tilek_") as tmp:
        cu, cubin = os.path.join(tmp, "kernel.cu"), os.path.join(tmp, "kernel.cubin")
        with open(cu, "w") as f:
            f.write(source)
        start = time.perf_counter()
        result = subprocess.run(nvcc_command(arch, pass_configs, cu, cubin), capture_output=True, text=True)
        if result.returncode != 0:
            raise CompileError(f"nvcc failed for kernel {name!r} ({arch}):\n{result.stderr[-4000:]}")
        _log.debug("nvcc built %s for %s in %.2fs", name, arch, time.perf_counter() - start)
        with open(cubin, "rb") as f:
            return f.read()


def compile_prim_func(func, arch: str, *, pass_configs: Mapping[str, Any] | None = None, name: str = "") -> Artifact:
    """Lowers a TileLang prim_func for ``arch`` and builds its cubin. Needs no GPU."""
    lowered = lower_prim_func(func, arch, pass_configs=pass_configs, name=name)
    cubin = build_cubin(lowered.source, arch, pass_configs=pass_configs, name=name)
    return Artifact(cubin=cubin, spec=lowered.spec, source=lowered.source)
