"""Bring your own kernel: any TileLang kernel factory as a JAX function.

::

    @jax_tilek.kernel
    def scale_rows(n_cols: int, dtype: str):
        M = T.dynamic("M")

        @T.prim_func
        def main(x: T.Tensor((M, n_cols), dtype), s: T.Tensor((M,), "float32"), y: T.Tensor((M, n_cols), dtype)):
            ...

        return main

    y = jax_tilek.tilelang_call(
        scale_rows, x, s,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        params=dict(n_cols=x.shape[1], dtype="bfloat16"),
    )

The kernel's tensor parameters take the operands, then the outputs, in order (override with
``buffers=``). Dynamic symbols (``T.dynamic``) are solved from the shapes at lowering time, so one cubin
serves every size. Give a ``reference`` to run on machines without a supported GPU.

``buffers``, ``views`` and ``zero_fill`` are checked when the call is traced: each buffer is bound to
at most one kernel parameter, every output is bound (or zero-filled), indices are in range, and view
names are bound parameters; when lowered for "cuda", that every name in ``buffers`` and ``views`` is a
tensor parameter of the kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jax_tilek import platform
from jax_tilek.kernel import TileKernel, kernel as as_kernel
from jax_tilek.op import Impl, Launch, TileOp, View, freeze


def _resolve(value: Any, avals: Sequence[Any], static: Mapping[str, Any]) -> Any:
    return value(*avals, **static) if callable(value) else value


def _buffer_name(index: int, n_in: int, n_out: int) -> str:
    if index < n_in:
        return f"operand {index}"
    if index < n_in + n_out:
        return f"output {index - n_in}"
    return f"workspace {index - n_in - n_out}"


def check_bindings(
    name: str,
    n_in: int,
    n_out: int,
    n_workspace: int,
    buffers: Mapping[str, int] | None,
    views: Mapping[str, Any],
    zero_fill: Sequence[int],
) -> None:
    """Raises ValueError for a ``buffers``/``views``/``zero_fill`` that would bind the kernel wrongly.

    Buffers are numbered operands, then outputs, then workspace; ``zero_fill`` numbers outputs, then
    workspace.
    """
    n_buffers = n_in + n_out + n_workspace
    layout = f"{n_in} operand(s) = buffers 0..{n_in - 1}, {n_out} output(s), {n_workspace} workspace buffer(s)"
    for index in zero_fill:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n_out + n_workspace:
            raise ValueError(
                f"{name}: zero_fill index {index!r} is out of range: it numbers the outputs, then the workspace "
                f"buffers (0..{n_out + n_workspace - 1}) -- {layout}"
            )
    if len(set(zero_fill)) != len(tuple(zero_fill)):
        raise ValueError(f"{name}: zero_fill {tuple(zero_fill)} lists a buffer twice")
    for param, view in views.items():
        if not isinstance(view, View):
            raise ValueError(f"{name}: views[{param!r}] must be a jax_tilek.View, got {type(view).__name__}")
    if buffers is None:
        return
    owner: dict[int, str] = {}
    for param, index in buffers.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n_buffers:
            raise ValueError(f"{name}: buffers[{param!r}] = {index!r} is not a buffer index 0..{n_buffers - 1} ({layout})")
        if index in owner:
            raise ValueError(
                f"{name}: buffers binds both {owner[index]!r} and {param!r} to buffer {index} "
                f"({_buffer_name(index, n_in, n_out)}); each buffer can back one kernel parameter ({layout})"
            )
        owner[index] = param
    for i in range(n_out):
        if n_in + i not in owner and i not in zero_fill:
            raise ValueError(
                f"{name}: output {i} (buffer {n_in + i}) is bound to no kernel parameter in buffers={dict(buffers)}, "
                f"so nothing would write it ({layout}); bind it, or list {i} in zero_fill"
            )
    unknown = sorted(set(views) - set(buffers))
    if unknown:
        raise ValueError(f"{name}: views names {unknown}, which buffers does not bind (it binds {sorted(buffers)})")


def _check_names(name: str, kernel: TileKernel, params: Mapping[str, Any], buffers, views) -> None:
    """At lowering: every name in ``buffers`` and ``views`` is a tensor parameter of the kernel."""
    spec = kernel.artifact(params, platform.target_arch(), record=False).spec
    names = [p.name for p in spec.tensor_params]
    for what, given in (("buffers", buffers or {}), ("views", views)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{name}: {what} names {unknown}, which are not tensor parameters of the kernel {names}")


def _missing_reference(name: str) -> Callable[..., Any]:
    def reference(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(
            f"{name}: no reference was given, so this kernel runs only as a CUDA kernel on an NVIDIA "
            "Hopper/Blackwell GPU, not here. Pass reference=<a pure-JAX function of the same arguments "
            "returning the same outputs> to tilelang_call/tilelang_op to run it on other platforms "
            "(CPU, TPU, older GPUs) and with impl='xla'"
        )

    reference.jax_tilek_missing = True  # type: ignore[attr-defined]
    return reference


def tilelang_op(
    kernel: TileKernel | Callable[..., Any],
    *,
    out_shape: Any,
    params: Mapping[str, Any] | Callable[..., Mapping[str, Any]] | None = None,
    scalars: Mapping[str, Any] | Callable[..., Mapping[str, Any]] | None = None,
    buffers: Mapping[str, int] | None = None,
    views: Mapping[str, View] | Callable[..., Mapping[str, View]] | None = None,
    workspace: Sequence[jax.ShapeDtypeStruct] = (),
    zero_fill: Sequence[int] = (),
    reference: Callable[..., Any] | None = None,
    check: Callable[..., None] | None = None,
    name: str | None = None,
) -> TileOp:
    """Wraps a TileLang kernel factory as a reusable JAX op.

    Args:
      kernel: a :func:`jax_tilek.kernel` or a bare factory ``(**params) -> T.prim_func``.
      out_shape: a ``jax.ShapeDtypeStruct`` pytree, or ``(*avals, **static) ->`` one.
      params: static factory parameters, or a function of the abstract inputs returning them.
      scalars: values for the prim_func's scalar parameters (or a function returning them).
      buffers, views, workspace, zero_fill: see :class:`jax_tilek.Launch`; checked when traced.
      reference: a pure-JAX implementation, used off-GPU and by ``impl="xla"``. Without one, the op
        runs only as a kernel on a supported GPU (elsewhere it raises an error saying so).
      check: raises ValueError for inputs the kernel does not accept.
    """
    tk = kernel if isinstance(kernel, TileKernel) else as_kernel(kernel)
    op_name = name or tk.name.rsplit(".", 1)[-1]
    buffers = dict(buffers) if buffers is not None else None
    workspace = tuple(workspace)
    zero_fill = tuple(zero_fill)

    def launch(*avals: Any, **static: Any) -> Launch:
        p = _resolve(params, avals, static) or {}
        v = _resolve(views, avals, static) or {}
        _check_names(op_name, tk, p, buffers, v)
        return Launch(
            kernel=tk,
            params=p,
            scalars=_resolve(scalars, avals, static) or {},
            buffers=buffers,
            views=v,
            workspace=workspace,
            zero_fill=zero_fill,
        )

    def check_call(*args: Any, **static: Any) -> None:
        outs = jax.tree.leaves(_resolve(out_shape, args, static))
        v = _resolve(views, args, static) or {}
        check_bindings(op_name, len(args), len(outs), len(workspace), buffers, v, zero_fill)
        if check is not None:
            check(*args, **static)

    return TileOp(
        name=op_name,
        launch=launch,
        reference=reference if reference is not None else _missing_reference(op_name),
        check=check_call,
        out_shape=lambda *avals, **static: _resolve(out_shape, avals, static),
    )


@functools.lru_cache(maxsize=1024)
def _cached_op(kernel, out_shape, params, scalars, buffers, views, workspace, zero_fill, reference) -> TileOp:
    return tilelang_op(
        kernel,
        out_shape=out_shape,
        params=dict(params),
        scalars=dict(scalars),
        buffers=dict(buffers) if buffers is not None else None,
        views=dict(views),
        workspace=workspace,
        zero_fill=zero_fill,
        reference=reference,
    )


_kernels_by_factory: dict[Callable[..., Any], TileKernel] = {}


def tilelang_call(
    kernel: TileKernel | Callable[..., Any],
    *args: Any,
    out_shape: Any,
    params: Mapping[str, Any] | None = None,
    scalars: Mapping[str, Any] | None = None,
    buffers: Mapping[str, int] | None = None,
    views: Mapping[str, View] | None = None,
    workspace: Sequence[jax.ShapeDtypeStruct] = (),
    zero_fill: Sequence[int] = (),
    reference: Callable[..., Any] | None = None,
    impl: Impl = None,
) -> Any:
    """Calls a TileLang kernel on JAX arrays once; see :func:`tilelang_op` for the arguments.

    Calls with equal arguments share one op, so eager calls are compiled once.
    """
    if not isinstance(kernel, TileKernel):
        kernel = _kernels_by_factory.setdefault(kernel, as_kernel(kernel))
    op = _cached_op(
        kernel,
        jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), out_shape),
        freeze(params or {}),
        freeze(scalars or {}),
        freeze(buffers) if buffers is not None else None,
        tuple(sorted((views or {}).items())),
        tuple(workspace),
        tuple(zero_fill),
        reference,
    )
    return op(*args, impl=impl)
