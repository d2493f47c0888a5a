"""The op helper: a TileLang kernel + a pure-JAX reference + shape rules -> a JAX function.

Every op binds one generic primitive, ``tilek_call``, whose

- abstract eval gives exact output shapes and dtypes (``eval_shape`` of the reference, or an
  explicit ``out_shape`` rule);
- lowering for platform "cuda" compiles (or loads from the cache) the kernel for the target GPU and
  emits one ``tilek_launch`` custom call whose attributes carry the cubin and a launch record already
  evaluated for the concrete shapes; on GPUs without jax_tilek kernels, and on every other platform,
  it lowers the reference instead;
- batching rule folds the vmapped axis into the op (when the op provides a rule) or maps the op over
  it sequentially;
- sharding: an op with a :class:`ShardingRule` lowers through ``custom_partitioning`` when the
  program is partitioned over several devices, so each device launches the kernel on its local
  shard (no gathers for the factors the rule lets stay sharded); the per-shard function binds the
  primitive again with ``local=True`` and its launch record is evaluated for the local shapes.

``impl=None`` takes the kernel where it can run and the reference elsewhere; ``impl="tilelang"``
insists on the kernel (an error where it cannot run); ``impl="xla"`` calls the reference directly,
so JAX differentiates and fuses it like any other code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _jax_config  # a config state JAX's caches key on (no public API)
from jax._src import dispatch  # apply_primitive: the standard eager impl for a lowered primitive
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_tilek import _ffi, platform
from jax_tilek.kernel import TileKernel
from jax_tilek.spec import LaunchSpec, TensorBinding, bits_of, compact_strides, size_in_bits

Impl = Optional[Literal["tilelang", "xla"]]
IMPLS = (None, "tilelang", "xla")

# The largest extent (one dimension of an operand or result) a kernel takes by default: kernels see
# extents as 32-bit TileLang symbols.
MAX_EXTENT = 2**31 - 1


def check_impl(impl: Any, op: str) -> None:
    """A ValueError naming ``op`` unless ``impl`` is None, "tilelang" or "xla"."""
    if not (impl is None or (isinstance(impl, str) and impl in IMPLS)):
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")


_default_impl = _jax_config.optional_enum_state(
    "jax_tilek_impl",
    ["tilelang", "xla"],
    None,
    "What impl=None means for every jax_tilek op: unset (kernels where they can run, references elsewhere), "
    "'tilelang' (kernels, an error where they cannot run) or 'xla' (the pure-JAX references).",
    include_in_jit_key=True,
    include_in_trace_context=True,
)


def set_default_impl(impl: Impl) -> None:
    """Sets what ``impl=None`` means for every jax_tilek op, process-wide: None (kernels where they can
    run, references elsewhere), ``"tilelang"`` or ``"xla"``. The environment variable
    ``JAX_TILEK_IMPL`` sets it at import. It is part of JAX's jit key, so jitted functions retrace."""
    check_impl(impl, "set_default_impl")
    jax.config.update("jax_tilek_impl", impl)


def default_impl(impl: Impl):
    """A context manager: inside it, ``impl=None`` means ``impl`` (see :func:`set_default_impl`)."""
    check_impl(impl, "default_impl")
    return _default_impl(impl)


def resolve_impl(impl: Any, op: str) -> Impl:
    """``impl`` checked (a ValueError naming ``op``), or the global default when it is None."""
    check_impl(impl, op)
    return impl if impl is not None else _default_impl.value


def static_int(value: Any, op: str, name: str) -> int:
    """A static integer option as a Python int; a TypeError naming ``op`` and ``name`` for anything
    else (floats, bools, strings, arrays, traced values)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise TypeError(f"{op}: {name} must be an integer, got {value!r}")


def static_flag(value: Any, op: str, name: str) -> bool:
    """A static boolean option as a Python bool (True, False, or NumPy booleans); a TypeError naming
    ``op`` and ``name`` otherwise (a traced value cannot choose a kernel)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{op}: {name} must be True or False, got {value!r}")


def as_array(value: Any, op: str, name: str) -> jax.Array:
    """``value`` as a JAX array (a traced value stays traced), or a TypeError naming ``op`` and the
    argument ``name`` for what is not an array: lists, tuples, None, strings, other Python objects,
    object arrays, and Python numbers out of JAX's range. Arrays, NumPy scalars, Python numbers and
    objects with ``__jax_array__`` are accepted."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)) or hasattr(value, "__jax_array__"):
        try:
            return jnp.asarray(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"{op}: {name} cannot be a JAX array: {e}") from None
    raise TypeError(f"{op}: {name} must be an array, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class View:
    """How a kernel tensor parameter sees its XLA buffer, when not as the whole compact buffer.

    ``shape`` and ``strides`` are in elements of ``dtype`` (default: the buffer's dtype); ``offset`` is
    the first element's index. Use it for strided rows, column windows, or reinterpreted bytes.
    """

    shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    offset: int = 0
    dtype: Any = None


@dataclasses.dataclass(frozen=True)
class Launch:
    """How one call maps onto a TileLang kernel.

    Attributes:
      kernel: the kernel factory.
      params: static parameters passed to the factory (one cubin per distinct set).
      scalars: values for the prim_func's scalar parameters, fixed at lowering.
      buffers: prim_func tensor parameter -> index into (operands, results, workspace). Default: the
        tensor parameters in order are the operands, then the results, then the workspace.
      views: per tensor parameter, a :class:`View` of its buffer.
      workspace: extra buffers the kernel needs, allocated by XLA and dropped after the call.
      zero_fill: indices into (results, workspace) that the launcher zero-fills before the launch.
    """

    kernel: TileKernel
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scalars: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    buffers: Mapping[str, int] | None = None
    views: Mapping[str, View] = dataclasses.field(default_factory=dict)
    workspace: tuple[jax.ShapeDtypeStruct, ...] = ()
    zero_fill: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """How an op partitions: a Shardy einsum-like rule over named factors, e.g. ``"b m n -> b n m"``
    (operands separated by commas, results after ``->``). Factors in ``replicated`` must not be
    sharded, e.g. an axis whose extent has a global meaning such as a column window."""

    rule: str
    replicated: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class TileOp:
    """A JAX op backed by a TileLang kernel, with a pure-JAX reference.

    Each callable receives the arrays (``check``, ``reference``) or their abstract values (``launch``,
    ``out_shape``) positionally and the op's static options as keywords.

    Attributes:
      name: the op's name, used in errors and as the custom call's label.
      launch: ``(*avals, **static) -> Launch``.
      reference: the pure-JAX definition of the op; also gives output shapes unless ``out_shape``.
      check: raises ValueError naming the argument and the rule for inputs the op does not accept.
      out_shape: ``(*avals, **static) -> ShapeDtypeStruct pytree``, when there is no reference.
      batch: ``(args, dims, *, impl, **static) -> (flat outputs, out dims)``, a vmap rule; without
        one, vmap maps the op over the batch sequentially.
      sharding: ``(*avals, **static) -> ShardingRule | None``; without one (or for None) a sharded
        program replicates the op's inputs.
      kernel_check: like ``check``, for the limits of the kernel path only (sizes its grid cannot
        cover): it runs at trace time unless ``impl="xla"``, so that whatever traces also lowers for
        "cuda".
      max_extent: the largest extent of any operand or result the kernel path takes (at trace time,
        unless ``impl="xla"``); None for kernels that take 64-bit extents.
      operands: names of the operands, for error messages (default: "operand 0", ...).
      results: names of the results, for error messages (default: "result 0", ...).
    """

    name: str
    launch: Callable[..., Launch]
    reference: Callable[..., Any] | None = None
    check: Callable[..., None] | None = None
    out_shape: Callable[..., Any] | None = None
    batch: Callable[..., tuple[Sequence[Any], Sequence[Any]]] | None = None
    sharding: Callable[..., ShardingRule | None] | None = None
    kernel_check: Callable[..., None] | None = None
    max_extent: int | None = MAX_EXTENT
    operands: tuple[str, ...] = ()
    results: tuple[str, ...] = ()

    def __call__(self, *args: Any, impl: Impl = None, **static: Any) -> Any:
        impl = resolve_impl(impl, self.name)
        args = tuple(as_array(a, self.name, self.operand_name(i)) for i, a in enumerate(args))
        if self.check is not None:
            self.check(*args, **static)
        if impl == "xla":
            return self.reference_or_raise()(*args, **static)
        frozen = freeze(static)
        try:
            hash(frozen)
        except TypeError:
            raise TypeError(f"{self.name}: static options must be hashable values, got {static!r}") from None
        outs, tree = _out_signature(self, _signature(args), frozen)
        self.check_extents([(self.operand_name(i), a.shape) for i, a in enumerate(args)])
        self.check_extents([(self.results[i] if i < len(self.results) else f"result {i}", o.shape) for i, o in enumerate(outs)])
        if self.kernel_check is not None:
            self.kernel_check(*args, **static)
        flat = tilek_call_p.bind(*args, op=self, static=frozen, impl=impl, local=False)
        return jax.tree.unflatten(tree, flat)

    def operand_name(self, index: int) -> str:
        return self.operands[index] if index < len(self.operands) else f"operand {index}"

    def check_extents(self, shapes: Sequence[tuple[str, Sequence[int]]], op: str | None = None) -> None:
        """A ValueError naming the op (``op``, default this op's name) and the array for an extent beyond
        ``max_extent``."""
        if self.max_extent is None:
            return
        for name, shape in shapes:
            for axis, extent in enumerate(shape):
                if extent > self.max_extent:
                    raise ValueError(
                        f"{op or self.name}: {name} has {extent} elements along axis {axis}; the kernel takes extents "
                        f"up to {self.max_extent} (use impl='xla' for the reference)"
                    )

    def reference_or_raise(self) -> Callable[..., Any]:
        if self.reference is None:
            raise ValueError(f"{self.name} has no reference implementation: it runs only as a GPU kernel")
        return self.reference


def freeze(value: Any) -> Any:
    """A hashable form of static options (dicts and lists become tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


def _signature(args: Sequence[Any]) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
    return tuple((tuple(a.shape), np.dtype(a.dtype)) for a in args)


@functools.lru_cache(maxsize=4096)
def _out_signature(op: TileOp, in_sig, static) -> tuple[tuple[jax.core.ShapedArray, ...], Any]:
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in in_sig]
    kwargs = dict(static)
    if op.out_shape is not None:
        out = op.out_shape(*structs, **kwargs)
    else:
        out = jax.eval_shape(functools.partial(op.reference_or_raise(), **kwargs), *structs)
    leaves, tree = jax.tree.flatten(out)
    return tuple(jax.core.ShapedArray(tuple(l.shape), l.dtype) for l in leaves), tree


# ---------------------------------------------------------------------------------------------
# The primitive.

tilek_call_p = Primitive("tilek_call")
tilek_call_p.multiple_results = True
tilek_call_p.def_impl(functools.partial(dispatch.apply_primitive, tilek_call_p))


@tilek_call_p.def_abstract_eval
def _abstract_eval(*avals, op: TileOp, static, impl, local):
    return _out_signature(op, _signature(avals), static)[0]


def _partitioned_lowering(ctx, operands, op: TileOp, static, impl, local):
    """Lowers through custom_partitioning when the op has a sharding rule; None otherwise."""
    if local or op.sharding is None:
        return None
    rule = op.sharding(*ctx.avals_in, **dict(static))
    if rule is None:
        return None
    return mlir.lower_fun(_partitioned(op, static, impl, rule), multiple_results=True)(ctx, *operands)


def _reference_lowering(ctx, *operands, op: TileOp, static, impl, local):
    partitioned = _partitioned_lowering(ctx, operands, op, static, impl, local)
    if partitioned is not None:
        return partitioned
    if impl == "tilelang":
        raise ValueError(
            f"{op.name}: impl='tilelang' needs an NVIDIA Hopper or Blackwell GPU, but this program is "
            f"lowered for {ctx.module_context.platforms}; use impl=None to fall back to the reference"
        )
    reference = op.reference_or_raise()
    kwargs = dict(static)
    return mlir.lower_fun(lambda *a: jax.tree.leaves(reference(*a, **kwargs)), multiple_results=True)(ctx, *operands)


def _cuda_lowering(ctx, *operands, op: TileOp, static, impl, local):
    partitioned = _partitioned_lowering(ctx, operands, op, static, impl, local)
    if partitioned is not None:
        return partitioned
    arch = platform.lowering_arch()
    if arch is None:
        if impl == "tilelang":
            raise ValueError(f"{op.name}: impl='tilelang' but jax_tilek has no kernels for this GPU")
        return _reference_lowering(ctx, *operands, op=op, static=static, impl=impl, local=True)
    with named_errors(op.name):  # a shape the kernel cannot launch for: a ValueError naming the op
        with platform.lowering_target(arch):
            launch = op.launch(*ctx.avals_in, **dict(static))
        artifact = launch.kernel.artifact(launch.params, arch)
        workspace = [jax.core.ShapedArray(tuple(w.shape), w.dtype) for w in launch.workspace]
        results = list(ctx.avals_out) + workspace
        buffers = list(ctx.avals_in) + results
        tensors = bind_tensors(artifact.spec, launch, buffers)
        env = artifact.spec.bind(tensors, dict(launch.scalars))
        zero_fill = [len(operands) + i for i in launch.zero_fill]
        record, entries = artifact.spec.record(env, tensors, len(buffers), zero_fill)
        if not entries:  # no device kernel has work (e.g. zero tokens): define every result as zeros
            record, entries = artifact.spec.record(env, tensors, len(buffers), range(len(operands), len(buffers)))
    out = _ffi.emit(ctx, operands, results, name=op.name, artifact=artifact, record=record, entries=entries)
    return out[: len(ctx.avals_out)]


@contextlib.contextmanager
def named_errors(op: str) -> Iterator[None]:
    """Prefixes the op's name to a plain ValueError raised inside (from binding a kernel to the shapes,
    evaluating its launch record: grids beyond CUDA's limits, extents that do not fit a kernel's
    32-bit parameters, ...), so the error says which op of a program cannot be lowered."""
    try:
        yield
    except ValueError as e:
        if type(e) is not ValueError or str(e).startswith(f"{op}:"):
            raise
        raise ValueError(f"{op}: {e}") from e


def bind_tensors(spec: LaunchSpec, launch: Launch, buffers: Sequence[Any]) -> dict[str, TensorBinding]:
    """Maps each tensor parameter of the kernel onto an XLA buffer (operands, results, workspace)."""
    params = spec.tensor_params
    if launch.buffers is not None:
        mapping = dict(launch.buffers)
    elif len(params) == len(buffers):
        mapping = {p.name: i for i, p in enumerate(params)}
    else:
        raise ValueError(
            f"kernel {spec.name!r} has {len(params)} tensor parameters {[p.name for p in params]} but the call "
            f"has {len(buffers)} buffers (operands, results, workspace); map them with Launch(buffers=...)"
        )
    bound = {}
    for p in params:
        if p.name not in mapping:
            raise ValueError(f"kernel {spec.name!r}: tensor parameter {p.name!r} is not mapped to a buffer")
        index = mapping[p.name]
        aval = buffers[index]
        view = launch.views.get(p.name)
        shape = tuple(view.shape) if view else tuple(aval.shape)
        strides = tuple(view.strides) if view and view.strides is not None else compact_strides(shape)
        offset = view.offset if view else 0
        dtype = np.dtype(view.dtype if view and view.dtype is not None else aval.dtype)
        if dtype.name != p.dtype:
            raise ValueError(f"kernel {spec.name!r}: tensor {p.name!r} must be {p.dtype}, got {dtype.name}")
        if math.prod(shape) > 0:  # sizes in bits: XLA packs sub-byte types (int4, float4_e2m1fn, ...)
            last = offset + sum((d - 1) * s for d, s in zip(shape, strides))
            reach, capacity = (last + 1) * bits_of(dtype), size_in_bits(aval.shape, aval.dtype)
            if offset < 0 or min(strides) < 0 or reach > capacity:
                raise ValueError(
                    f"kernel {spec.name!r}: the view of {p.name!r} reaches outside its buffer ({reach} bits of "
                    f"{dtype.name} elements; the buffer, {np.dtype(aval.dtype).name}{list(aval.shape)}, holds {capacity} bits)"
                )
        bound[p.name] = TensorBinding(index, shape, strides, offset)
    return bound


def _batch(args, dims, *, op: TileOp, static, impl, local):
    if op.batch is not None:
        return op.batch(args, dims, impl=impl, **dict(static))
    return map_batch(args, dims, lambda *xs: tilek_call_p.bind(*xs, op=op, static=static, impl=impl, local=local))


def map_batch(args, dims, fn: Callable[..., Sequence[Any]]):
    """A vmap rule that runs ``fn`` once per batch element (``lax.map``)."""
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def body(xs):
        full = list(moved)
        for i, x in zip(mapped, xs):
            full[i] = x
        return fn(*full)

    outs = jax.lax.map(body, [moved[i] for i in mapped])
    return outs, [0] * len(outs)


def _jvp(primals, tangents, *, op: TileOp, static, impl, local):
    raise TypeError(
        f"jax_tilek op {op.name!r} has no derivative rule on its kernel path; call it with impl='xla' to "
        "differentiate the reference"
    )


# ---------------------------------------------------------------------------------------------
# Sharding.


def _parse_rule(rule: str) -> tuple[list[list[str]], list[list[str]]]:
    operands, results = rule.split("->")

    def side(text: str) -> list[list[str]]:
        return [part.split() for part in text.split(",")]

    return side(operands), side(results)


def propagate_specs(rule: ShardingRule, arg_specs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """PartitionSpecs of operands and results under ``rule``, given the operands' current specs.

    Each factor takes the mesh axes of its first sharded occurrence; replicated factors and axes
    already used by another factor get none.
    """
    from jax.sharding import PartitionSpec

    operands, results = _parse_rule(rule.rule)
    axes: dict[str, Any] = {}
    used: set = set()
    for factors, spec in zip(operands, arg_specs):
        spec = tuple(spec) + (None,) * (len(factors) - len(tuple(spec)))
        for factor, axis in zip(factors, spec):
            names = {axis} if isinstance(axis, str) else set(axis or ())
            if axis is None or factor in rule.replicated or factor in axes or names & used:
                continue
            axes[factor] = axis
            used |= names
    specs = lambda groups: [PartitionSpec(*(axes.get(f) for f in factors)) for factors in groups]  # noqa: E731
    return specs(operands), specs(results)


@functools.lru_cache(maxsize=512)
def _partitioned(op: TileOp, static, impl, rule: ShardingRule) -> Callable[..., Any]:
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding

    def local(*args):
        return tilek_call_p.bind(*args, op=op, static=static, impl=impl, local=True)

    def shardings(mesh, arg_shapes):
        in_specs, out_specs = propagate_specs(rule, [a.sharding.spec for a in arg_shapes])
        # Arguments as a tuple, results in the structure the function returns (a list).
        return tuple(NamedSharding(mesh, s) for s in in_specs), [NamedSharding(mesh, s) for s in out_specs]

    def partition(mesh, arg_shapes, result_shape):
        arg_shardings, result_shardings = shardings(mesh, arg_shapes)
        return mesh, local, result_shardings, arg_shardings

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    fn = custom_partitioning(local)
    fn.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=rule.rule,
        need_replication_factors=rule.replicated,
    )
    return fn


# Ops with a sharding rule lower through custom_partitioning, which needs the device assignment.
dispatch.prim_requires_devices_during_lowering.add(tilek_call_p)
mlir.register_lowering(tilek_call_p, _reference_lowering)
mlir.register_lowering(tilek_call_p, _cuda_lowering, platform="cuda")
batching.primitive_batchers[tilek_call_p] = _batch
ad.primitive_jvps[tilek_call_p] = _jvp


# ---------------------------------------------------------------------------------------------
# Gradients.


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
    """Wraps non-array data (shapes, dtypes) so it can ride in custom_vjp residuals."""

    value: Any


def with_vjp(
    primal: Callable[..., Any],
    fwd: Callable[..., tuple[Any, Any]],
    bwd: Callable[..., tuple[Any, ...]],
) -> Callable[..., Any]:
    """Makes ``primal(*arrays, impl=None, **static)`` differentiable with a custom VJP.

    ``fwd(*arrays, impl, **static)`` returns ``(output, residuals)``; ``bwd(residuals, cotangent, impl,
    **static)`` returns one cotangent (or None) per array. Residuals are arrays, or :class:`Static`
    for shapes and dtypes. With ``impl="xla"`` the primal (the
    reference) is differentiated by JAX directly.
    """

    @functools.lru_cache(maxsize=256)
    def differentiable(impl: Impl, static) -> Callable[..., Any]:
        kwargs = dict(static)
        f = jax.custom_vjp(lambda *arrays: primal(*arrays, impl=impl, **kwargs))
        f.defvjp(
            lambda *arrays: fwd(*arrays, impl=impl, **kwargs),
            lambda residuals, g: tuple(bwd(residuals, g, impl=impl, **kwargs)),
        )
        return f

    @functools.wraps(primal)
    def wrapped(*arrays: Any, impl: Impl = None, **static: Any) -> Any:
        impl = resolve_impl(impl, getattr(primal, "__name__", "op"))
        if impl == "xla":
            return primal(*arrays, impl=impl, **static)
        return differentiable(impl, freeze(static))(*arrays)

    return wrapped
