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
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _jax_config  # a config state JAX's caches key on (no public API)
from jax._src import dispatch  # apply_primitive: the standard eager impl for a lowered primitive
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_tilek import _ffi, platform
from jax_tilek.checks import as_array
from jax_tilek.kernel import TileKernel
from jax_tilek.spec import LaunchSpec, TensorBinding, bits_of, compact_strides, size_in_bits

_log = logging.getLogger(__name__)


@functools.cache  # once per op, platform, choice and reason
def _tell(op: str, platform_name: str, choice: str, why: str) -> None:
    """Logs (INFO) which implementation an op took and why."""
    _log.info("%s on %s: %s (%s)", op, platform_name, choice, why)

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


Buffer = Union[str, int, None]  # a buffer's name, its index (operands, results, workspace), or unused


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
      buffers: kernel tensor parameter -> the buffer it takes: an operand, result or workspace name
        (or index into operands, results, workspace), or None for a parameter this call leaves unused
        (an empty binding). A parameter not listed takes the buffer of its own name; a parameter
        bound to an absent optional operand is unused. Without ``buffers``, unless every parameter is
        named after a buffer, the parameters in order take the operands, results and workspace.
      views: per tensor parameter, a :class:`View` of its buffer.
      workspace: extra buffers the kernel needs (name -> shape and dtype; a sequence is named
        ``workspace0``, ...), allocated by XLA and dropped after the call.
      zero_fill: results or workspace buffers the launcher zero-fills before the launch (names, or
        indices into results followed by workspace).
    """

    kernel: TileKernel
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scalars: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    buffers: Mapping[str, Buffer] | None = None
    views: Mapping[str, View] = dataclasses.field(default_factory=dict)
    workspace: Mapping[str, jax.ShapeDtypeStruct] | Sequence[jax.ShapeDtypeStruct] = ()
    zero_fill: Sequence[str | int] = ()

    def workspace_items(self) -> list[tuple[str, jax.ShapeDtypeStruct]]:
        named = self.workspace if isinstance(self.workspace, Mapping) else {f"workspace{i}": w for i, w in enumerate(self.workspace)}
        return list(named.items())


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """How an op partitions: a Shardy einsum-like rule over named factors, e.g. ``"b m n -> b n m"``
    (operands separated by commas, results after ``->``). Factors in ``replicated`` must not be
    sharded, e.g. an axis whose extent has a global meaning such as a column window."""

    rule: str
    replicated: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rows:
    """Declares a row-wise op: the named operands and results carry the token axis first, and each
    token's results depend only on that token's rows. vmap then folds its batch into the token axis
    (one launch), and a program sharded along tokens runs each device's kernel on its own rows.
    Other operands are shared by every token. An op whose rows depend on the call returns None from
    a ``rows`` callable where they are not row-wise."""

    operands: tuple[str, ...]
    results: tuple[str, ...]


def _parse_operands(spec: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    return tuple(n.rstrip("?") for n in spec), frozenset(n.rstrip("?") for n in spec if n.endswith("?"))


@dataclasses.dataclass(frozen=True, eq=False)
class TileOp:
    """A JAX op backed by a TileLang kernel, with a pure-JAX reference.

    ``check``, ``kernel_check``, ``reference``, ``out_shape``, ``launch``, ``config`` and ``rows``
    receive every declared operand positionally (arrays, or abstract values in ``launch``,
    ``out_shape``, ``config`` and ``rows``; None for an absent optional operand) and the op's static
    options as keywords; ``launch`` also receives ``config=`` when the op has a configuration.

    Attributes:
      name: the op's name, used in errors and as the custom call's label.
      launch: ``(*operands, **static) -> Launch``.
      operands: operand names in order, ``?`` marking one that may be None (``("x", "x_sf?")``);
        operands may also be passed by name. None: any number of positional arrays.
      results: names of the flattened results (or ``(*operands, **static) -> names``); default ``out0``, ...
      reference: the pure-JAX definition of the op; also gives output shapes unless ``out_shape``.
      check: raises ValueError naming the argument and the rule for inputs the op does not accept.
      out_shape: ``(*operands, **static) -> ShapeDtypeStruct pytree``, when there is no reference.
      config: ``(*operands, **static) -> config``: the kernel configuration (a frozen dataclass) that
        a heuristic picks from the shapes and the target GPU (:mod:`jax_tilek.platform`); override
        fields with :meth:`with_config`. Results never depend on it.
      rows: a :class:`Rows` (or a callable returning one or None): vmap folds into the token axis and
        a token-sharded program stays local.
      batch: ``(operands, dims, *, impl, **static) -> (flat outputs, out dims)``, a vmap rule of the
        op's own (operands in declared order, None where absent); the fallback maps sequentially.
      sharding: ``(*operands, **static) -> ShardingRule | None``, a sharding rule of the op's own;
        without one (nor ``rows``) a sharded program replicates the op's inputs.
      kernel_check: like ``check``, for the limits of the kernel path only (sizes its grid cannot
        cover): it runs at trace time unless ``impl="xla"``, so that whatever traces also lowers.
      max_extent: the largest extent of any operand or result the kernel path takes (at trace time,
        unless ``impl="xla"``); None for kernels that take 64-bit extents.
    """

    name: str
    launch: Callable[..., Launch]
    operands: tuple[str, ...] | None = None
    results: tuple[str, ...] | Callable[..., tuple[str, ...]] | None = None
    reference: Callable[..., Any] | None = None
    check: Callable[..., None] | None = None
    out_shape: Callable[..., Any] | None = None
    config: Callable[..., Any] | None = None
    rows: Rows | Callable[..., Rows | None] | None = None
    batch: Callable[..., tuple[Sequence[Any], Sequence[Any]]] | None = None
    sharding: Callable[..., ShardingRule | None] | None = None
    kernel_check: Callable[..., None] | None = None
    max_extent: int | None = MAX_EXTENT
    config_overrides: Any = None  # set by with_config: a config object, or ((field, value), ...)

    def __call__(self, *args: Any, impl: Impl = None, **kwargs: Any) -> Any:
        impl = resolve_impl(impl, self.name)
        full, static = self._operands(args, kwargs)
        if self.check is not None:
            self.check(*full, **static)
        if impl == "xla":
            _tell(self.name, "any platform", "the reference", "impl='xla'")
            return self.reference_or_raise()(*full, **static)
        frozen = freeze(static)
        try:
            hash(frozen)
        except TypeError:
            raise TypeError(f"{self.name}: static options must be hashable values, got {static!r}") from None
        outs, tree = _out_signature(self, _signature(full), frozen)
        self.check_extents([(n, a.shape) for n, a in zip(self.operand_names(len(full)), full) if a is not None])
        self.check_extents(list(zip(self.result_names(len(outs), full, static), (o.shape for o in outs))))
        if self.kernel_check is not None:
            try:
                self.kernel_check(*full, **static)
            except ValueError as e:
                if impl is not None:
                    raise
                # impl=None promises the kernel only where it can run: these operands it cannot.
                _tell(self.name, "any platform", "the reference", f"the kernel does not take these operands: {e}")
                return self.reference_or_raise()(*full, **static)
        present = tuple(i for i, a in enumerate(full) if a is not None)
        flat = tilek_call_p.bind(*(full[i] for i in present), op=self, static=frozen, present=present,
                                 arity=len(full), impl=impl, local=False)  # fmt: skip
        return jax.tree.unflatten(tree, flat)

    def with_config(self, config: Any = None, **fields: Any) -> TileOp:
        """This op with its kernel configuration fixed (``config``), or with some fields of the
        heuristic's choice replaced (``fields``). Checked against the config's fields at once."""
        if self.config is None:
            raise ValueError(f"{self.name} has no kernel configuration to set")
        if config is not None:
            if fields:
                raise ValueError(f"{self.name}.with_config: give a config or fields, not both")
            return dataclasses.replace(self, config_overrides=config)
        unknown = sorted(set(fields) - set(self.config_fields()))
        if unknown:
            raise ValueError(f"{self.name}.with_config: no config field(s) {unknown}; fields: {self.config_fields()}")
        earlier = dict(self.config_overrides) if isinstance(self.config_overrides, tuple) else {}
        return dataclasses.replace(self, config_overrides=freeze({**earlier, **fields}))

    def config_fields(self) -> tuple[str, ...]:
        """The names of this op's configuration fields (from the config class's annotations)."""
        kind = getattr(self.config, "config_class", None)
        return tuple(f.name for f in dataclasses.fields(kind)) if kind is not None else ()

    def config_for(self, *operands: Any, **static: Any) -> Any:
        """The kernel configuration for these operands: the heuristic's choice with any overrides."""
        if self.config is None:
            return None
        if self.config_overrides is not None and not isinstance(self.config_overrides, tuple):
            return self.config_overrides
        with named_errors(self.name):
            return dataclasses.replace(self.config(*operands, **static), **dict(self.config_overrides or ()))

    def reference_or_raise(self) -> Callable[..., Any]:
        if self.reference is None:
            raise ValueError(f"{self.name} has no reference implementation: it runs only as a GPU kernel")
        return self.reference

    def operand_names(self, count: int) -> tuple[str, ...]:
        if self.operands is None:
            return tuple(f"operand {i}" for i in range(count))
        return _parse_operands(self.operands)[0]

    def result_names(self, count: int, operands: Sequence[Any], static: Mapping[str, Any]) -> tuple[str, ...]:
        names = self.results(*operands, **static) if callable(self.results) else self.results
        names = tuple(f"out{i}" for i in range(count)) if names is None else tuple(names)
        if len(names) != count:
            raise ValueError(f"{self.name}: {count} results but {len(names)} result names {names}")
        return names

    def rows_for(self, *operands: Any, **static: Any) -> Rows | None:
        return self.rows(*operands, **static) if callable(self.rows) else self.rows

    def check_extents(self, shapes: Sequence[tuple[str, Sequence[int]]], op: str | None = None) -> None:
        """A ValueError naming the op (``op``, default this op's name) and the array for an extent beyond
        ``max_extent``."""
        limit = self.max_extent
        over = [(n, a, e) for n, shape in shapes for a, e in enumerate(shape) if limit is not None and e > limit]
        if over:
            name, axis, extent = over[0]
            raise ValueError(
                f"{op or self.name}: {name} has {extent} elements along axis {axis}; the kernel takes extents "
                f"up to {limit} (use impl='xla' for the reference)"
            )

    def _operands(self, args: tuple, kwargs: dict) -> tuple[list[Any], dict[str, Any]]:
        """(every operand in declared order as an array, None where absent; the static options)."""
        if self.operands is None:
            return [as_array(self.name, f"operand {i}", a) for i, a in enumerate(args)], kwargs
        names, optional = _parse_operands(self.operands)
        if len(args) > len(names):
            raise TypeError(f"{self.name} takes {len(names)} operands {names}, got {len(args)} positional arguments")
        given = dict(zip(names, args))
        static = {}
        for key, value in kwargs.items():
            if key not in names:
                static[key] = value
            elif key in given:
                raise TypeError(f"{self.name}: operand {key!r} given twice")
            else:
                given[key] = value
        missing = [n for n in names if given.get(n) is None and n not in optional]
        if missing:
            raise TypeError(f"{self.name}: operand {missing[0]!r} is required")
        return [None if given.get(n) is None else as_array(self.name, n, given[n]) for n in names], static


def config_class(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Marks a heuristic as choosing configurations of ``cls`` (a frozen dataclass), so that
    ``with_config`` can check field names before any shapes are known."""

    def mark(heuristic: Callable[..., Any]) -> Callable[..., Any]:
        heuristic.config_class = cls  # type: ignore[attr-defined]
        return heuristic

    return mark


def uses(*ops: TileOp, cases: Sequence[Any] = (), differentiable: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Makes a public function reconfigurable: the function receives ``ops=(op, ...)`` (the ops it
    launches) and gains ``.with_config(**fields)``, the same function with each field set on the ops
    whose configuration has it; ``.ops``; ``.cases``, its named calls
    (:class:`jax_tilek.testing.ArgSpec`) for the contract tests, benchmarks and cache preparation; and
    ``.differentiable``, whether it has a custom VJP (the cache preparation then compiles its gradient)."""

    def bind(fn: Callable[..., Any]) -> Callable[..., Any]:
        def with_config(**fields: Any) -> Callable[..., Any]:
            unknown = sorted(set(fields) - {f for op in ops for f in op.config_fields()})
            if unknown:
                fields_by_op = {op.name: op.config_fields() for op in ops}
                raise ValueError(f"{fn.__name__}.with_config: no config field(s) {unknown}; fields: {fields_by_op}")
            configured = [
                op.with_config(**{k: v for k, v in fields.items() if k in op.config_fields()}) if set(fields) & set(op.config_fields()) else op
                for op in ops
            ]  # fmt: skip
            return uses(*configured, cases=cases, differentiable=differentiable)(fn)

        @functools.wraps(fn)
        def public(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, ops=ops, **kwargs)

        public.differentiable = differentiable  # type: ignore[attr-defined]
        public.with_config = with_config  # type: ignore[attr-defined]
        public.ops = ops  # type: ignore[attr-defined]
        public.cases = tuple(cases)  # type: ignore[attr-defined]
        return public

    return bind


def freeze(value: Any) -> Any:
    """A hashable form of static options (dicts and lists become tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


def _signature(args: Sequence[Any]) -> tuple:
    return tuple(None if a is None else (tuple(a.shape), np.dtype(a.dtype)) for a in args)


def _expand(present: Sequence[int], arity: int, values: Sequence[Any]) -> list[Any]:
    """Operands in declared order, None where absent."""
    given = dict(zip(present, values))
    return [given.get(i) for i in range(arity)]


@functools.lru_cache(maxsize=4096)
def _out_signature(op: TileOp, in_sig, static) -> tuple[tuple[jax.core.ShapedArray, ...], Any]:
    structs = [None if s is None else jax.ShapeDtypeStruct(*s) for s in in_sig]
    kwargs = dict(static)
    if op.out_shape is not None:
        out = op.out_shape(*structs, **kwargs)
    else:
        present = [i for i, s in enumerate(structs) if s is not None]
        reference = op.reference_or_raise()
        out = jax.eval_shape(lambda *a: reference(*_expand(present, len(structs), a), **kwargs), *(structs[i] for i in present))
    leaves, tree = jax.tree.flatten(out)
    return tuple(jax.core.ShapedArray(tuple(l.shape), l.dtype) for l in leaves), tree


# ---------------------------------------------------------------------------------------------
# The primitive.

tilek_call_p = Primitive("tilek_call")
tilek_call_p.multiple_results = True
tilek_call_p.def_impl(functools.partial(dispatch.apply_primitive, tilek_call_p))


@tilek_call_p.def_abstract_eval
def _abstract_eval(*avals, op: TileOp, static, present, arity, impl, local):
    return _out_signature(op, _signature(_expand(present, arity, avals)), static)[0]


def _partitioned_lowering(ctx, operands, op: TileOp, static, present, arity, impl, local):
    """Lowers through custom_partitioning when the op has a sharding rule; None otherwise."""
    if local:
        return None
    full = _expand(present, arity, ctx.avals_in)
    rule = op.sharding(*full, **dict(static)) if op.sharding is not None else _row_rule(op, full, ctx.avals_out, static)
    if rule is None:
        return None
    fn = _partitioned(op, static, present, arity, impl, rule)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *operands)


def _reference_lowering(ctx, *operands, op: TileOp, static, present, arity, impl, local):
    partitioned = _partitioned_lowering(ctx, operands, op, static, present, arity, impl, local)
    if partitioned is not None:
        return partitioned
    if impl == "tilelang":
        raise ValueError(
            f"{op.name}: impl='tilelang' needs an NVIDIA Hopper or Blackwell GPU, but this program is "
            f"lowered for {ctx.module_context.platforms}; use impl=None to fall back to the reference"
        )
    platforms = "/".join(ctx.module_context.platforms)
    _tell(op.name, platforms, "the reference", f"lowered for {platforms}: kernels run only on CUDA")
    reference, kwargs = op.reference_or_raise(), dict(static)
    lowered = lambda *a: jax.tree.leaves(reference(*_expand(present, arity, a), **kwargs))  # noqa: E731
    return mlir.lower_fun(lowered, multiple_results=True)(ctx, *operands)


def _cuda_lowering(ctx, *operands, op: TileOp, static, present, arity, impl, local):
    partitioned = _partitioned_lowering(ctx, operands, op, static, present, arity, impl, local)
    if partitioned is not None:
        return partitioned
    arch = platform.lowering_arch()
    if arch is None:
        if impl == "tilelang":
            raise ValueError(f"{op.name}: impl='tilelang' but jax_tilek has no kernels for this GPU")
        _tell(op.name, "cuda", "the reference", "this GPU is not one jax_tilek has kernels for (Hopper or Blackwell)")
        return _reference_lowering(ctx, *operands, op=op, static=static, present=present, arity=arity, impl=impl, local=True)
    _tell(op.name, "cuda", f"the TileLang kernel for {arch}", "set by JAX_TILEK_ARCH or target_arch()" if platform.config.arch_override() else "the local GPU")
    full, kwargs = _expand(present, arity, ctx.avals_in), dict(static)
    operand_names = op.operand_names(arity)
    with named_errors(op.name):  # a shape the kernel cannot launch for: a ValueError naming the op
        with platform.lowering_target(arch):
            if op.config is not None:
                kwargs["config"] = op.config_for(*full, **dict(static))
            launch = op.launch(*full, **kwargs)
        artifact = launch.kernel.artifact(launch.params, arch)
        workspace = launch.workspace_items()
        names = [n for n, a in zip(operand_names, full) if a is not None]
        names += list(op.result_names(len(ctx.avals_out), full, dict(static))) + [n for n, _ in workspace]
        results = list(ctx.avals_out) + [jax.core.ShapedArray(tuple(w.shape), w.dtype) for _, w in workspace]
        buffers = list(ctx.avals_in) + results
        absent = {n for n, a in zip(operand_names, full) if a is None}
        tensors = bind_tensors(artifact.spec, launch, names, buffers, absent)
        env = artifact.spec.bind(tensors, dict(launch.scalars))
        zero_fill = [_buffer_index(z, names, len(operands), "zero_fill") for z in launch.zero_fill]
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


def _buffer_index(target: str | int, names: Sequence[str], offset: int, what: str) -> int:
    """A zero-fill target (a result or workspace name, or an index into results + workspace) as an
    index into operands + results + workspace."""
    if isinstance(target, str):
        if target not in names[offset:]:
            raise ValueError(f"{what} names {target!r}, which is not a result or workspace buffer {list(names[offset:])}")
        return names.index(target, offset)
    return offset + int(target)


def bind_tensors(
    spec: LaunchSpec, launch: Launch, names: Sequence[str], buffers: Sequence[Any], absent: set[str] | frozenset[str] = frozenset()
) -> dict[str, TensorBinding]:
    """Maps each tensor parameter of the kernel onto an XLA buffer (operands, results, workspace),
    named by ``names``; see :class:`Launch` for the rules."""
    params = spec.tensor_params
    param_names = {p.name for p in params}
    mapping = dict(launch.buffers or {})
    for what, given in (("buffers", mapping), ("views", launch.views)):
        unknown = sorted(set(given) - param_names)
        if unknown:
            raise ValueError(f"kernel {spec.name!r} has no tensor parameter(s) {unknown} (Launch.{what}); it has {sorted(param_names)}")
    positional = not mapping and not param_names <= set(names) | set(absent)
    if positional and len(params) != len(buffers):
        raise ValueError(
            f"kernel {spec.name!r} has {len(params)} tensor parameters {[p.name for p in params]} but the call "
            f"has {len(buffers)} buffers {list(names)} (operands, results, workspace); map them with Launch(buffers=...)"
        )
    bound = {}
    for k, p in enumerate(params):
        target = mapping.get(p.name, k if positional else p.name)
        if target is None or target in absent:
            bound[p.name] = TensorBinding(0, (0,) * len(p.shape), (0,) * len(p.shape), unused=True)
            continue
        if isinstance(target, str):
            if target not in names:
                raise ValueError(
                    f"kernel {spec.name!r}: tensor parameter {p.name!r} takes buffer {target!r}, but the call's "
                    f"buffers are {list(names)}; map it with Launch(buffers=...) (None if unused)"
                )
            target = names.index(target)
        if not 0 <= int(target) < len(buffers):
            raise ValueError(f"kernel {spec.name!r}: tensor parameter {p.name!r} maps to buffer {target}, out of range")
        bound[p.name] = _binding(spec, p, int(target), buffers[int(target)], launch.views.get(p.name))
    return bound


def _binding(spec: LaunchSpec, p: Any, index: int, aval: Any, view: View | None) -> TensorBinding:
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
    return TensorBinding(index, shape, strides, offset)


# ---------------------------------------------------------------------------------------------
# vmap.


def _batch(args, dims, *, op: TileOp, static, present, arity, impl, local):
    full, full_dims = _expand(present, arity, args), _expand(present, arity, dims)
    if op.batch is not None:
        return op.batch(full, full_dims, impl=impl, **dict(static))
    folded = _fold_rows(op, full, full_dims, static, impl)
    if folded is not None:
        return folded
    bind = lambda *xs: tilek_call_p.bind(*xs, op=op, static=static, present=present, arity=arity, impl=impl, local=local)  # noqa: E731
    return map_batch(args, dims, bind)


def _row_operands(op: TileOp, full, out_avals, static) -> set[str] | None:
    """The names of a row-wise call's token-axis operands, or None when the call is not row-wise
    (no ``rows``, a result off the token axis, a scalar)."""
    rows = op.rows_for(*full, **dict(static)) if op.rows is not None else None
    if rows is None or not set(op.result_names(len(out_avals), full, dict(static))) <= set(rows.results):
        return None
    row_args = [a for n, a in zip(op.operand_names(len(full)), full) if n in rows.operands and a is not None]
    return None if any(a.ndim == 0 for a in [*row_args, *out_avals]) else set(rows.operands)


def _fold_rows(op: TileOp, full, dims, static, impl):
    """vmap of a row-wise op: [V, T, ...] row operands -> [V*T, ...], one call; results unfolded."""
    names = op.operand_names(len(full))
    unbatched = [a if a is None or d is None else jax.ShapeDtypeStruct(a.shape[:d] + a.shape[d + 1 :], a.dtype) for a, d in zip(full, dims)]
    out_avals = _out_signature(op, _signature(unbatched), static)[0]
    row_operands = _row_operands(op, unbatched, out_avals, static)
    if row_operands is None or any(d is not None and n not in row_operands for n, d in zip(names, dims)):
        return None
    size = next(a.shape[d] for a, d in zip(full, dims) if d is not None)
    args = []
    for n, a, d in zip(names, full, dims):
        if a is not None and n in row_operands:
            a = jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
            a = a.reshape(size * a.shape[1], *a.shape[2:])
        args.append(a)
    if op.rows_for(*args, **dict(static)) is None:  # e.g. more tokens than the kernel takes once folded
        return None
    leaves = jax.tree.leaves(op(*args, impl=impl, **dict(static)))
    return [y.reshape(size, y.shape[0] // size if size else 0, *y.shape[1:]) for y in leaves], [0] * len(leaves)


def map_batch(args, dims, fn: Callable[..., Sequence[Any]]):
    """A vmap rule that runs ``fn`` once per batch element (``lax.map``)."""
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def body(xs):
        return fn(*(xs[mapped.index(i)] if i in mapped else a for i, a in enumerate(args)))

    outs = jax.lax.map(body, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped])
    return outs, [0] * len(outs)


def _jvp(primals, tangents, *, op: TileOp, **params):
    """Zero tangents where nothing differentiable flows (integer outputs only, or tangents only on
    integer operands, as an index computed under a custom VJP carries); otherwise an error."""
    outs = tilek_call_p.bind(*primals, op=op, **params)
    inexact = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)  # noqa: E731
    if not any(map(inexact, outs)) or all(type(t) is ad.Zero or not inexact(p) for p, t in zip(primals, tangents)):
        return outs, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in outs]
    raise TypeError(
        f"jax_tilek op {op.name!r} has no derivative rule on its kernel path; call it with impl='xla' to "
        "differentiate the reference"
    )


# ---------------------------------------------------------------------------------------------
# Sharding.


def _row_rule(op: TileOp, full, out_avals, static) -> ShardingRule | None:
    """A row-wise op's sharding rule: the token axis ("t") may be sharded, every other axis is replicated."""
    row_operands = _row_operands(op, full, out_avals, static)
    if row_operands is None:
        return None
    replicated: list[str] = []

    def factors(tag: str, rank: int, on_rows: bool) -> str:
        own = [f"{tag}{i}" for i in range(rank)]
        if on_rows:
            own[0] = "t"
        replicated.extend(f for f in own if f != "t")
        return " ".join(own)

    names = op.operand_names(len(full))
    ins = [factors(f"a{k}_", a.ndim, n in row_operands) for k, (n, a) in enumerate(zip(names, full)) if a is not None]
    outs = [factors(f"r{k}_", a.ndim, True) for k, a in enumerate(out_avals)]
    return ShardingRule(f"{', '.join(ins)} -> {', '.join(outs)}", replicated=tuple(replicated))


def propagate_specs(rule: ShardingRule, arg_specs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """PartitionSpecs of operands and results under ``rule``, given the operands' current specs.

    Each factor takes the mesh axes of its first sharded occurrence; replicated factors and axes
    already used by another factor get none.
    """
    from jax.sharding import PartitionSpec

    operands, results = ([part.split() for part in side.split(",")] for side in rule.rule.split("->"))
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
def _partitioned(op: TileOp, static, present, arity, impl, rule: ShardingRule) -> Callable[..., Any]:
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding

    def local(*args):
        return tilek_call_p.bind(*args, op=op, static=static, present=present, arity=arity, impl=impl, local=True)

    def shardings(mesh, arg_shapes):
        in_specs, out_specs = propagate_specs(rule, [a.sharding.spec for a in arg_shapes])
        # Arguments as a tuple, results in the structure the function returns (a list).
        return tuple(NamedSharding(mesh, s) for s in in_specs), [NamedSharding(mesh, s) for s in out_specs]

    fn = custom_partitioning(local)
    fn.def_partition(
        partition=lambda mesh, arg_shapes, _: (mesh, local, *reversed(shardings(mesh, arg_shapes))),
        infer_sharding_from_operands=lambda mesh, arg_shapes, _: shardings(mesh, arg_shapes)[1],
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
