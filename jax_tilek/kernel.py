"""TileLang kernel factories, their identity, and where their compiled artifacts come from.

A factory is a Python function of static parameters that returns a TileLang ``T.prim_func``. Wrapping
it with :func:`kernel` gives it an identity for the cache: its name plus a digest of the source of its
module and of every module that module imports, transitively, that is kernel code -- the modules of
jax_tilek's kernel families (``jax_tilek.quant.formats`` ...) and any module of the user's own that is
not installed in site-packages or the standard library -- so editing a kernel or a helper it shares
recompiles it, while token counts and other runtime extents (TileLang dynamic symbols) never do.

Imports are read from the modules' source (``import``, ``from ... import`` resolved to the module that
defines the name, ``importlib.import_module("...")``), not from what happens to be loaded, so the
digest is the same in every process and on every machine with the same sources. jax_tilek's framework
modules (``jax_tilek.op``, ``.kernel``, ``.compiler`` ...) are not followed: they do not generate kernel
code, and what they do to compiled artifacts is versioned by ``compiler.SPEC_FORMAT`` and the
toolchain. ``jax_tilek.device``, the library of device code that kernels' preludes are built from, is
followed. ``depends=`` still adds modules, but is no longer needed.

The generated CUDA source is the identity of the nvcc build (see :mod:`jax_tilek.cache`): an edit that
re-keys a kernel without changing its code costs a TileLang lowering, not an nvcc run.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import marshal
import os
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from jax_tilek import cache, compiler, config
from jax_tilek.compiler import Artifact

PACKAGE = "jax_tilek"


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


# ---------------------------------------------------------------------------------------------
# The modules a kernel's code comes from.


def _spec(name: str):
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is not None:
        return spec
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None


def _origin(name: str) -> str | None:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        spec = _spec(name)
        path = getattr(spec, "origin", None) if spec is not None else None
    return path if isinstance(path, str) and path.endswith(".py") else None


def _is_package(name: str) -> bool:
    module = sys.modules.get(name)
    if module is not None:
        return hasattr(module, "__path__")
    spec = _spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _exists(name: str) -> bool:
    return name in sys.modules or _spec(name) is not None


@functools.cache
def _external_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    return tuple(sorted(dirs))


# Top-level jax_tilek modules that are kernel code all the same: they generate device code.
_KERNEL_CODE_MODULES = frozenset({PACKAGE + ".device"})


def _is_framework(name: str) -> bool:
    """jax_tilek itself and its top-level modules (op, kernel, compiler, ...): not kernel code, except
    those of ``_KERNEL_CODE_MODULES``."""
    if name in _KERNEL_CODE_MODULES:
        return False
    return name == PACKAGE or (name.startswith(PACKAGE + ".") and name.count(".") == 1 and not _is_package(name))


def _installed(path: str) -> bool:
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(real.startswith(d + os.sep) for d in _external_dirs())


def _ours(name: str) -> bool:
    """Whether ``name`` is in jax_tilek or in a top-level package (or module) of the user's own, judged
    by where the top level lives, without importing anything: not installed in site-packages, not in
    the standard library, not built in."""
    top = name.partition(".")[0]
    if top == PACKAGE:
        return True
    module = sys.modules.get(top)
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is None and module is None:
        try:
            spec = importlib.util.find_spec(top)  # a top-level name: searches sys.path, imports nothing
        except (ImportError, ValueError):
            return False
    if module is not None and getattr(module, "__file__", None):
        location = module.__file__
    elif spec is not None and spec.origin and spec.origin.endswith(".py"):
        location = spec.origin
    elif spec is not None and spec.submodule_search_locations:
        location = os.path.join(list(spec.submodule_search_locations)[0], "__init__.py")
    else:
        return False  # built in, an extension module, or not found
    return not _installed(location)


def _followed(name: str) -> bool:
    """Whether a module imported by kernel code is kernel code too (its source goes into the digest)."""
    return _ours(name) and not _is_framework(name)


def _module_source(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is not None:
        try:
            return inspect.getsource(module)
        except (OSError, TypeError):
            pass
    origin = _origin(name)
    if origin is not None and os.path.isfile(origin):
        with open(origin, encoding="utf-8") as f:
            return f.read()
    return None


@functools.lru_cache(maxsize=4096)
def _import_statements(name: str, is_package: bool, source: str) -> tuple[tuple[str, ...], ...]:
    """``("module", m)`` and ``("from", m, attribute)`` for every import in ``source``, absolute."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ()
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, ...]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [("module", alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found += [("from", base, alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(("module", node.args[0].value))
    return tuple(found)


def _top_level_names(source: str) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """Names ``source`` defines at top level, and those it imports: alias -> (module or '', name)."""
    defined: set[str] = set()
    imported: dict[str, tuple[str, str]] = {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return defined, imported
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                defined |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module or "", alias.name)
    return defined, imported


def _defining_module(module: str, name: str, depth: int = 0) -> str:
    """The module that defines ``name`` imported ``from module``: follows re-exports (``from x import
    name`` in a package's ``__init__``), so importing one function of a package does not make the
    kernel depend on every module the package imports."""
    if _exists(f"{module}.{name}"):
        return f"{module}.{name}"
    source = _module_source(module)
    if source is None or depth > 8:
        return module
    defined, imported = _top_level_names(source)
    if name not in defined and name in imported and imported[name][0]:
        return _defining_module(imported[name][0], imported[name][1], depth + 1)
    return module


def _dependencies(name: str, source: str) -> set[str]:
    deps: set[str] = set()
    for statement in _import_statements(name, _is_package(name), source):
        if not statement[1] or not _ours(statement[1]):
            continue  # a third-party or standard module: never resolved (that could import it)
        if statement[0] == "module":
            deps.add(statement[1])
        elif statement[2] == "*":
            deps.add(statement[1])
        else:
            deps.add(_defining_module(statement[1], statement[2]))
    return deps


def module_closure(roots: Sequence[str]) -> dict[str, str]:
    """The source of each root module and of every kernel-code module they import, transitively."""
    sources: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        source = _module_source(name)
        if source is None:
            continue
        sources[name] = source
        todo += [dep for dep in _dependencies(name, source) if dep not in sources and _followed(dep)]
    return sources


def _import_name(f: Callable[..., Any]) -> str:
    """``f``'s module as it is imported: under ``python -m pkg.mod`` its ``__module__`` is "__main__"."""
    name = getattr(f, "__module__", "") or ""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return spec.name if spec else name


@dataclasses.dataclass(frozen=True, eq=False)
class TileKernel:
    """A TileLang kernel factory with what jax_tilek needs to cache and launch it.

    Attributes:
      factory: ``factory(**params) -> T.prim_func``.
      name: a stable name (default: the factory's qualified name).
      pass_configs: TileLang pass configs used when lowering.
      depends: further modules whose source goes into the kernel's identity. Not needed: the modules
        the factory's module imports are found from its source (see the module docstring).
    """

    factory: Callable[..., Any]
    name: str
    pass_configs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    depends: tuple[ModuleType, ...] = ()

    @functools.cached_property
    def module(self) -> str:
        """The factory's module by import name."""
        return _import_name(self.factory)

    def __call__(self, **params: Any) -> Any:
        """Builds the prim_func for ``params`` (needs TileLang)."""
        return self.factory(**params)

    @functools.cached_property
    def source_digest(self) -> str:
        """A digest of the factory's code: its module and the kernel-code modules it imports, transitively."""
        h = hashlib.sha256()
        name = self.module
        roots = [d.__name__ for d in self.depends]
        own = _module_source(name) if name else None
        if own is not None:
            h.update(own.encode())
            roots.insert(0, name)
        else:  # defined where there is no source file (python -c, a notebook cell): its code and globals
            h.update(_source_of(self.factory).encode())
            for value in list(getattr(self.factory, "__globals__", {}).values()):
                dep = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
                if isinstance(dep, str) and dep != name and _followed(dep):
                    roots.append(dep)
        h.update(getattr(self.factory, "__qualname__", "").encode())
        for dep, source in sorted(module_closure(roots).items()):
            if dep != name:
                h.update(f"\0{dep}\0".encode())
                h.update(source.encode())
        return h.hexdigest()

    def dependencies(self) -> list[str]:
        """The modules whose source is in :attr:`source_digest`, besides the factory's own."""
        name = self.module
        return sorted(m for m in module_closure([name, *(d.__name__ for d in self.depends)]) if m != name)

    @functools.cached_property
    def _defaults(self) -> dict[str, Any]:
        return {
            name: p.default
            for name, p in inspect.signature(self.factory).parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def cache_fields(self, params: Mapping[str, Any], arch: str) -> dict[str, Any]:
        """What identifies one compiled configuration of this kernel: the factory's defaults fill the
        parameters ``params`` leaves out, so ``dict(n=64)`` and ``dict(n=64, pdl=False)`` are one entry."""
        return {
            "kernel": self.name,
            "source": self.source_digest,
            "params": canonical_param({**self._defaults, **params}),
            "pass_configs": canonical_param(dict(self.pass_configs)),
            "arch": arch,
            "spec_format": compiler.SPEC_FORMAT,
        }

    def artifact(self, params: Mapping[str, Any], arch: str, *, record: bool = True) -> Artifact:
        """The compiled kernel for ``params`` and ``arch``: from memory, the disk cache, or TileLang.

        ``record=False`` keeps the request out of :func:`record_kernels` logs.
        """
        fields = self.cache_fields(params, arch)
        memo_key = (config.cache_dir(), cache.entry_key(fields))
        with _memo_lock:
            found = _memo.get(memo_key)
        if found is None:
            found = self._load_or_compile(params, arch, fields, memo_key[0])
            with _memo_lock:
                _memo[memo_key] = found
        if record:
            for log in _usage_logs:
                log.append((self.name, fields["params"], arch, memo_key[1]))
        return found

    def _load_or_compile(self, params: Mapping[str, Any], arch: str, fields: Mapping[str, Any], root: str) -> Artifact:
        if config.offline():
            return cache.lookup_offline(fields, root=root)
        try:
            toolchain = compiler.toolchain()
        except compiler.NvccNotFoundError as e:  # TileLang but no nvcc: what is compiled is still usable
            try:
                return cache.lookup_offline(fields, root=root)
            except cache.KernelNotCompiledError:
                raise compiler.NvccNotFoundError(f"{cache.describe(fields)} is not in the kernel cache {root}; {e}") from None

        def build() -> Artifact:
            lowered = compiler.lower_prim_func(
                self.factory(**params), arch, pass_configs=self.pass_configs, name=self.name
            )
            cubin = cache.find_cubin(fields, toolchain, lowered.source, root=root)
            if cubin is None:
                cubin = compiler.build_cubin(lowered.source, arch, pass_configs=self.pass_configs, name=self.name)
            return Artifact(cubin=cubin, spec=lowered.spec, source=lowered.source)

        return cache.get_or_compile(fields, toolchain, build, root=root)


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
        del _usage_logs[next(i for i, l in enumerate(_usage_logs) if l is log)]  # by identity: logs compare by value


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
        return TileKernel(
            factory=f,
            name=name or f"{_import_name(f)}.{f.__qualname__}",
            pass_configs=dict(pass_configs or {}),
            depends=tuple(depends),
        )

    return wrap(factory) if factory is not None else wrap
