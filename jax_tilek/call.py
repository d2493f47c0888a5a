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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jax_tilek.kernel import TileKernel, kernel as as_kernel
from jax_tilek.op import Impl, Launch, TileOp, View, freeze


def _resolve(value: Any, avals: Sequence[Any], static: Mapping[str, Any]) -> Any:
    return value(*avals, **static) if callable(value) else value


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
      buffers, views, workspace, zero_fill: see :class:`jax_tilek.Launch`.
      reference: a pure-JAX implementation, used off-GPU and by ``impl="xla"``.
      check: raises ValueError for inputs the kernel does not accept.
    """
    tk = kernel if isinstance(kernel, TileKernel) else as_kernel(kernel)

    def launch(*avals: Any, **static: Any) -> Launch:
        return Launch(
            kernel=tk,
            params=_resolve(params, avals, static) or {},
            scalars=_resolve(scalars, avals, static) or {},
            buffers=buffers,
            views=_resolve(views, avals, static) or {},
            workspace=tuple(workspace),
            zero_fill=tuple(zero_fill),
        )

    return TileOp(
        name=name or tk.name.rsplit(".", 1)[-1],
        launch=launch,
        reference=reference,
        check=check,
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
