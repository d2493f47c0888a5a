"""TileLang kernel factories, their identity, and where their compiled artifacts come from.

A factory is a Python function of static parameters that returns a TileLang ``T.prim_func``. Wrapping
it with :func:`kernel` gives it an identity for the cache: its name plus a digest of its module's
source (and of any modules listed in ``depends``), so editing a kernel recompiles it while token counts
and other runtime extents (TileLang dynamic symbols) never do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import marshal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from jax_tilek import cache, compiler, config
from jax_tilek.compiler import Artifact


def canonical_param(value: Any) -> Any:
    """A JSON-compatible canonical form of a static parameter value (dtypes become their names)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [canonical_param(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): canonical_param(v) for k, v in sorted(value.items())}
    try:
        return np.dtype(value).name
    except TypeError:
        pass
    raise TypeError(f"static kernel parameter {value!r} ({type(value).__name__}) is not a number, string, dtype or tuple")


def _source_of(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        if code is None:
            raise
        return marshal.dumps(code).hex()


@dataclasses.dataclass(frozen=True, eq=False)
class TileKernel:
    """A TileLang kernel factory with what jax_tilek needs to cache and launch it.

    Attributes:
      factory: ``factory(**params) -> T.prim_func``.
      name: a stable name (default: the factory's qualified name).
      pass_configs: TileLang pass configs used when lowering.
      depends: further modules whose source the kernel relies on (shared TileLang macros).
    """

    factory: Callable[..., Any]
    name: str
    pass_configs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    depends: tuple[ModuleType, ...] = ()

    def __call__(self, **params: Any) -> Any:
        """Builds the prim_func for ``params`` (needs TileLang)."""
        return self.factory(**params)

    @functools.cached_property
    def source_digest(self) -> str:
        h = hashlib.sha256()
        module = sys.modules.get(getattr(self.factory, "__module__", ""), None)
        try:
            h.update(_source_of(module).encode())
        except (OSError, TypeError):
            h.update(_source_of(self.factory).encode())
        h.update(getattr(self.factory, "__qualname__", "").encode())
        for dep in self.depends:
            h.update(_source_of(dep).encode())
        return h.hexdigest()

    def cache_fields(self, params: Mapping[str, Any], arch: str) -> dict[str, Any]:
        """What identifies one compiled configuration of this kernel."""
        return {
            "kernel": self.name,
            "source": self.source_digest,
            "params": canonical_param(dict(params)),
            "pass_configs": canonical_param(dict(self.pass_configs)),
            "arch": arch,
            "spec_format": compiler.SPEC_FORMAT,
        }

    def artifact(self, params: Mapping[str, Any], arch: str) -> Artifact:
        """The compiled kernel for ``params`` and ``arch``: from memory, the disk cache, or TileLang."""
        fields = self.cache_fields(params, arch)
        memo_key = (config.cache_dir(), cache.entry_key(fields))
        with _memo_lock:
            found = _memo.get(memo_key)
        if found is None:
            if config.offline():
                found = cache.lookup_offline(fields)
            else:
                found = cache.get_or_compile(
                    fields,
                    compiler.toolchain(),
                    lambda: compiler.compile_prim_func(
                        self.factory(**params), arch, pass_configs=self.pass_configs, name=self.name
                    ),
                )
            with _memo_lock:
                _memo[memo_key] = found
        for log in _usage_logs:
            log.append((self.name, fields["params"], arch, memo_key[1]))
        return found


_memo: dict[tuple[str, str], Artifact] = {}
_memo_lock = threading.Lock()
_usage_logs: list[list] = []


def clear_memory_cache() -> None:
    """Forgets artifacts held in memory (the disk cache is untouched)."""
    with _memo_lock:
        _memo.clear()


@contextlib.contextmanager
def record_kernels() -> Iterator[list[tuple[str, Any, str, str]]]:
    """Collects ``(kernel, params, arch, cache key)`` for every artifact requested inside the block."""
    log: list = []
    _usage_logs.append(log)
    try:
        yield log
    finally:
        _usage_logs.remove(log)


def kernel(
    factory: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    pass_configs: Mapping[str, Any] | None = None,
    depends: Sequence[ModuleType] = (),
):
    """Declares a TileLang kernel factory (usable bare or with arguments).

    Example::

        @jax_tilek.kernel(pass_configs={"tl.disable_warp_specialized": True})
        def scale_rows(n_cols: int, dtype: str):
            M = T.dynamic("M")

            @T.prim_func
            def main(x: T.Tensor((M, n_cols), dtype), y: T.Tensor((M, n_cols), dtype)): ...

            return main
    """

    def wrap(f: Callable[..., Any]) -> TileKernel:
        module = sys.modules.get(f.__module__)
        spec = getattr(module, "__spec__", None)  # under `python -m pkg.mod`, __module__ is "__main__"
        return TileKernel(
            factory=f,
            name=name or f"{spec.name if spec else f.__module__}.{f.__qualname__}",
            pass_configs=dict(pass_configs or {}),
            depends=tuple(depends),
        )

    return wrap(factory) if factory is not None else wrap
