"""Launch specs: what a compiled TileLang kernel needs at launch, in a form that needs no TileLang.

A :class:`LaunchSpec` is extracted from TileLang's lowered modules by :mod:`jax_tilek.compiler` and
stored as JSON beside the cubin. At JAX lowering time the concrete shapes are known, so
:meth:`LaunchSpec.bind` solves the kernel's dynamic symbols from them and :meth:`LaunchSpec.record`
evaluates grids, scalars and TMA recipes into the flat int64 launch record that the C++ launcher
(``ffi/launcher.cc``, ``DecodeRecord``) reads. Keep the record layout in step with that function.

Expressions are JSON values: an ``int`` or ``float`` literal, a ``str`` naming a symbol, or a list
``[op, *operands]`` (see ``_OPS``). Integer division follows TIR: ``floordiv``/``floormod`` round
toward negative infinity, ``div``/``mod`` toward zero.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

Expr = Union[int, float, str, list]

RECORD_VERSION = 1  # ffi/launcher.cc: kRecordVersion


def _truncdiv(a, b):
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _truncmod(a, b):
    return a - b * _truncdiv(a, b)


_OPS = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": lambda a, b: a // b if isinstance(a, int) and isinstance(b, int) else math.floor(a / b),
    "floormod": lambda a, b: a % b,
    "div": lambda a, b: _truncdiv(a, b) if isinstance(a, int) and isinstance(b, int) else a / b,
    "mod": _truncmod,
    "min": min,
    "max": max,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "and": lambda a, b: bool(a) and bool(b),
    "or": lambda a, b: bool(a) or bool(b),
    "not": lambda a: not a,
    "select": lambda c, a, b: a if c else b,
}


def evaluate(expr: Expr, env: Mapping[str, Any]) -> Any:
    """Evaluates an expression with the symbol values in ``env``."""
    if isinstance(expr, bool):
        return int(expr)
    if isinstance(expr, (int, float)):
        return expr
    if isinstance(expr, str):
        if expr not in env:
            raise KeyError(expr)
        return env[expr]
    op, *args = expr
    if op == "cast":
        dtype, value = args
        value = evaluate(value, env)
        if dtype == "bool":
            return bool(value)
        if np.issubdtype(np.dtype(_np_dtype(dtype)), np.integer):
            return int(value)
        return float(value)
    return _OPS[op](*(evaluate(a, env) for a in args))


def symbols(expr: Expr) -> set[str]:
    """The symbol names an expression refers to."""
    if isinstance(expr, str):
        return {expr}
    if isinstance(expr, list):
        operands = expr[2:] if expr[0] == "cast" else expr[1:]
        return set().union(*(symbols(a) for a in operands)) if operands else set()
    return set()


def render(expr: Expr) -> str:
    """A readable form of an expression, for error messages."""
    if isinstance(expr, list):
        op, *args = expr
        return f"{op}({', '.join(render(a) for a in args)})"
    return str(expr)


def _np_dtype(name: str) -> Any:
    if name.startswith(("float8", "float6", "float4", "int4", "uint4", "int2", "uint2")) or name == "bfloat16":
        import ml_dtypes

        return getattr(ml_dtypes, name)
    return np.dtype(name)


# Element types that XLA (and TileLang) store packed, several to a byte; numpy's itemsize says 1 byte.
PACKED_BITS = {"int1": 1, "uint1": 1, "int2": 2, "uint2": 2, "int4": 4, "uint4": 4, "float4_e2m1fn": 4}


def bits_of(dtype: Any) -> int:
    """Storage bits per element, as XLA lays a buffer out: sub-byte types (``int4``, ``uint4``,
    ``int2``, ``uint2``, ``float4_e2m1fn``) are packed, every other type takes its itemsize.

    ``dtype`` is a dtype name (TileLang's names are numpy's) or anything ``np.dtype`` accepts.
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name in PACKED_BITS:
        return PACKED_BITS[name]
    if name.startswith("float4"):
        return 4
    return np.dtype(_np_dtype(name)).itemsize * 8


def size_in_bits(shape: Sequence[int], dtype: Any) -> int:
    """The storage size of a compact array of ``shape`` and ``dtype`` in bits (packed sub-byte types
    included: an ``int4[128, 128]`` buffer holds 65,536 bits, not 131,072)."""
    return math.prod(int(d) for d in shape) * bits_of(dtype)


def compact_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides, in elements (products of the later dimensions, as TileLang declares them)."""
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= int(dim)
    return tuple(reversed(strides))


# ---------------------------------------------------------------------------------------------
# The spec.


@dataclasses.dataclass(frozen=True)
class TensorParam:
    """A tensor parameter of the TileLang kernel. ``strides`` is None for a compact tensor."""

    name: str
    dtype: str
    shape: tuple[Expr, ...]
    strides: tuple[Expr, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ScalarParam:
    """A scalar parameter of the TileLang kernel (a value fixed when the JAX program is lowered)."""

    name: str
    dtype: str


@dataclasses.dataclass(frozen=True)
class KernelArg:
    """One parameter of a device kernel: a tensor's pointer, a TMA descriptor, or a scalar value."""

    kind: str  # "buffer" | "tma" | "scalar"
    ref: str = ""  # tensor param name (buffer) or descriptor name (tma)
    dtype: str = ""  # scalar dtype
    value: Expr = 0  # scalar value


@dataclasses.dataclass(frozen=True)
class TmaDescriptor:
    """The arguments of ``cuTensorMapEncodeTiled``, except the global address."""

    name: str
    tensor: str
    dtype: int  # CUtensorMapDataType
    dims: tuple[Expr, ...]  # innermost first
    strides: tuple[Expr, ...]  # bytes, dims 1.. (rank - 1 entries)
    box: tuple[Expr, ...]
    element_strides: tuple[Expr, ...]
    interleave: int
    swizzle: int
    l2_promotion: int
    oob_fill: int


@dataclasses.dataclass(frozen=True)
class DeviceKernel:
    """One ``__global__`` function and how to launch it."""

    entry: str
    grid: tuple[Expr, Expr, Expr]
    block: tuple[Expr, Expr, Expr]
    smem: Expr
    cluster: tuple[int, int, int]
    pdl: bool
    cooperative: bool
    args: tuple[KernelArg, ...]


GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's limits on gridDim.x, .y, .z
_INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}


@dataclasses.dataclass(frozen=True)
class TensorBinding:
    """How a tensor parameter sees its XLA buffer: shape and strides in elements, plus an offset.

    ``buffer`` indexes the custom call's operands followed by its results. An ``unused`` parameter
    (an optional input the call does not have, an output it does not want) gets no buffer of its
    own: it is neither checked nor used to solve symbols, its unsolved size symbols are 0, and its
    pointer is buffer ``buffer``'s (the kernel must not touch it).
    """

    buffer: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0
    unused: bool = False


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to launch one compiled TileLang kernel (one or more device kernels)."""

    name: str
    params: tuple[TensorParam | ScalarParam, ...]
    kernels: tuple[DeviceKernel, ...]
    tma: tuple[TmaDescriptor, ...] = ()

    @property
    def tensor_params(self) -> tuple[TensorParam, ...]:
        return tuple(p for p in self.params if isinstance(p, TensorParam))

    @property
    def scalar_params(self) -> tuple[ScalarParam, ...]:
        return tuple(p for p in self.params if isinstance(p, ScalarParam))

    # -- (de)serialisation -------------------------------------------------------------------

    def to_json(self) -> dict:
        def encode(obj):
            if dataclasses.is_dataclass(obj):
                out = {"type": type(obj).__name__}
                out.update({f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
                return out
            if isinstance(obj, tuple):
                return [encode(o) for o in obj]
            return obj

        return encode(self)

    @classmethod
    def from_json(cls, data: dict) -> "LaunchSpec":
        def param(p: dict) -> TensorParam | ScalarParam:
            if p["type"] == "ScalarParam":
                return ScalarParam(p["name"], p["dtype"])
            strides = None if p["strides"] is None else tuple(p["strides"])
            return TensorParam(p["name"], p["dtype"], tuple(p["shape"]), strides)

        def kernel(k: dict) -> DeviceKernel:
            args = tuple(KernelArg(a["kind"], a["ref"], a["dtype"], a["value"]) for a in k["args"])
            return DeviceKernel(
                k["entry"], tuple(k["grid"]), tuple(k["block"]), k["smem"], tuple(k["cluster"]),
                k["pdl"], k["cooperative"], args,
            )

        def tma(t: dict) -> TmaDescriptor:
            return TmaDescriptor(
                t["name"], t["tensor"], t["dtype"], tuple(t["dims"]), tuple(t["strides"]), tuple(t["box"]),
                tuple(t["element_strides"]), t["interleave"], t["swizzle"], t["l2_promotion"], t["oob_fill"],
            )

        return cls(
            data["name"],
            tuple(param(p) for p in data["params"]),
            tuple(kernel(k) for k in data["kernels"]),
            tuple(tma(t) for t in data["tma"]),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    # -- binding to concrete shapes ------------------------------------------------------------

    def _check_names(self, kind: str, given: Mapping[str, Any], params: Sequence[Any]) -> None:
        missing = [p.name for p in params if p.name not in given]
        if missing:
            raise ValueError(f"kernel {self.name!r}: {kind} parameter(s) {missing} need values")
        unknown = set(given) - {p.name for p in params}
        if unknown:
            raise ValueError(f"kernel {self.name!r} has no {kind} parameter(s) {sorted(unknown)}")

    def bind(self, tensors: Mapping[str, TensorBinding], scalars: Mapping[str, Any]) -> dict[str, Any]:
        """Solves every dynamic symbol from concrete shapes and checks each tensor against the kernel.

        Raises ValueError naming the tensor, dimension and rule on any mismatch.
        """
        self._check_names("tensor", tensors, self.tensor_params)
        self._check_names("scalar", scalars, self.scalar_params)

        env: dict[str, Any] = {p.name: scalars[p.name] for p in self.scalar_params}
        checks = []
        for p in self.tensor_params:
            t = tensors[p.name]
            if t.unused:
                continue
            if len(t.shape) != len(p.shape):
                raise ValueError(
                    f"kernel {self.name!r}: tensor {p.name!r} must have rank {len(p.shape)}, got shape {t.shape}"
                )
            empty = math.prod(t.shape) == 0  # an empty tensor's strides mean nothing: bind, don't check
            declared = [("dimension", i, e, v) for i, (e, v) in enumerate(zip(p.shape, t.shape))]
            if p.strides is None:
                if t.strides != compact_strides(t.shape) and not empty:
                    raise ValueError(
                        f"kernel {self.name!r}: tensor {p.name!r} must be contiguous, got strides {t.strides}"
                    )
            else:
                declared += [("stride", i, e, v) for i, (e, v) in enumerate(zip(p.strides, t.strides))]
            for what, i, expr, value in declared:
                if isinstance(expr, str) and expr not in env:
                    env[expr] = int(value)
                if not (empty and what == "stride"):
                    checks.append((p.name, what, i, expr, int(value)))
        for p in self.tensor_params:
            if tensors[p.name].unused:
                for expr in (*p.shape, *(p.strides or ())):
                    if isinstance(expr, str) and expr not in env:
                        env[expr] = 0
        for tensor, what, i, expr, value in checks:
            try:
                want = evaluate(expr, env)
            except KeyError as e:
                raise ValueError(f"kernel {self.name!r}: symbol {e.args[0]!r} cannot be solved from the shapes") from None
            if want != value:
                raise ValueError(
                    f"kernel {self.name!r}: {what} {i} of tensor {tensor!r} is {value}, "
                    f"but the kernel requires {render(expr)} = {want}"
                )
        return env

    # -- the launch record ---------------------------------------------------------------------

    def record(
        self,
        env: Mapping[str, Any],
        tensors: Mapping[str, TensorBinding],
        num_buffers: int,
        zero_fill: Sequence[int] = (),
    ) -> tuple[np.ndarray, str]:
        """Evaluates the spec for one set of shapes: (int64 launch record, ';'-joined entry names).

        Device kernels whose grid is empty are dropped, with the TMA descriptors only they use.
        """
        element_bits = {p.name: bits_of(p.dtype) for p in self.tensor_params}

        def byte_offset(name: str) -> int:
            offset_bits = tensors[name].offset * element_bits[name]
            if offset_bits % 8:
                raise ValueError(f"kernel {self.name!r}: tensor {name!r} starts inside a byte (offset {tensors[name].offset})")
            return offset_bits // 8

        kernels = []
        for k in self.kernels:
            grid = [int(evaluate(g, env)) for g in k.grid]
            if min(grid) <= 0:
                continue
            block = [int(evaluate(b, env)) for b in k.block]
            for axis, (g, limit) in enumerate(zip(grid, GRID_LIMITS)):
                if g > limit:
                    raise ValueError(
                        f"kernel {self.name!r} ({k.entry}): grid dimension {'xyz'[axis]} = {g} exceeds CUDA's limit "
                        f"of {limit} blocks for these shapes"
                    )
            if math.prod(block) > 1024 or min(block) < 1:
                raise ValueError(f"kernel {self.name!r} ({k.entry}): invalid block {block}")
            kernels.append((k, grid, block))

        used_tma = sorted({a.ref for k, _, _ in kernels for a in k.args if a.kind == "tma"})
        tma_index = {name: i for i, name in enumerate(used_tma)}
        tma_by_name = {t.name: t for t in self.tma}

        rec: list[int] = [RECORD_VERSION, num_buffers, len(zero_fill), len(used_tma), len(kernels)]
        rec += [int(z) for z in zero_fill]
        for name in used_tma:
            t = tma_by_name[name]
            rank = len(t.dims)
            rec += [tensors[t.tensor].buffer, byte_offset(t.tensor), t.dtype, rank]
            rec += [int(evaluate(d, env)) for d in t.dims]
            rec += [int(evaluate(s, env)) for s in t.strides]
            rec += [int(evaluate(b, env)) for b in t.box]
            rec += [int(evaluate(e, env)) for e in t.element_strides]
            rec += [t.interleave, t.swizzle, t.l2_promotion, t.oob_fill]
        for k, grid, block in kernels:
            flags = (1 if k.pdl else 0) | (2 if k.cooperative else 0)
            rec += grid + block + [int(evaluate(k.smem, env))] + list(k.cluster) + [flags, len(k.args)]
            for a in k.args:
                if a.kind == "buffer":
                    rec += [0, tensors[a.ref].buffer, byte_offset(a.ref)]
                elif a.kind == "tma":
                    rec += [1, tma_index[a.ref], 0]
                else:
                    size, bits = _scalar_bits(a.dtype, evaluate(a.value, env), self.name, k.entry)
                    rec += [2, size, bits]
        return np.asarray(rec, dtype=np.int64), ";".join(k.entry for k, _, _ in kernels)


def _scalar_bits(dtype: str, value: Any, kernel: str, entry: str) -> tuple[int, int]:
    """A scalar's size in bytes and its bit pattern as a signed int64 (little-endian low bytes)."""
    if dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        if not lo <= int(value) <= hi:
            raise ValueError(f"kernel {kernel!r} ({entry}): scalar value {value} does not fit {dtype}")
    np_dtype = np.dtype(_np_dtype(dtype) if dtype != "bool" else np.bool_)
    raw = np.zeros(8, np.uint8)
    raw[: np_dtype.itemsize] = np.frombuffer(np.asarray(value, np_dtype).tobytes(), np.uint8)
    return np_dtype.itemsize, int(raw.view(np.int64)[0])
