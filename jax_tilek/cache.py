"""Content-addressed disk cache of compiled kernels.

An entry is one JSON file holding the launch spec, the cubin and the CUDA source (zlib-compressed,
base64), sha256 checksums of the spec, the raw cubin and the source, and a checksum of the whole entry.
Its address is ``<root>/<toolchain>/<key[:2]>/<key>.json`` where ``toolchain`` names the TileLang and
nvcc versions and ``key`` hashes the kernel's identity (name, source digest, static parameters, pass
configs, architecture, cache format) -- everything that can be known without TileLang, so that a GPU
machine without it finds the entry (offline).

The generated CUDA source is the identity of the nvcc build: an entry records the ``build_id`` of its
cubin (a hash of the source, the architecture, the pass configs that set nvcc's flags and the spec
format), and on a miss the kernel is lowered (cheap) and an existing cubin with the same build id
under the same toolchain is reused instead of running nvcc again. So an edit that re-keys a kernel
without changing its generated code (a comment in a shared helper module) costs a TileLang lowering,
and an edit that changes the generated code always gets its own cubin.

- Writes are atomic (temporary file + ``os.replace``), so readers never see a partial entry.
- Compiling is serialised per entry with an exclusive ``flock`` on ``<root>/.locks/<key>.lock``
  (outside the entries' tree, removed when released): when several processes miss the same kernel at
  once, one compiles and the others wait and then read its entry. A wait longer than
  ``JAX_TILEK_LOCK_TIMEOUT`` seconds (600) is a :class:`CacheError` naming the kernel and the lock.
- A damaged entry (unreadable, bad JSON, a missing field, any checksum mismatch, a directory in its
  place) is never launched: it is rebuilt, or, offline, reported as a :class:`CacheError` naming the
  kernel and its configuration.
- Offline (no TileLang on this machine, or ``JAX_TILEK_OFFLINE=1``) the toolchain is unknown, so every
  toolchain directory under the root is searched, newest first; a miss raises
  :class:`KernelNotCompiledError` naming the kernel and its configuration.

Shipping a cache means copying the root; its ``.locks`` directory (empty when no one compiles) is not
needed on the GPU machine.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jax_tilek import config
from jax_tilek.compiler import Artifact
from jax_tilek.spec import LaunchSpec

CACHE_FORMAT = 3
LOCK_DIR = ".locks"

_log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """A cache entry is unusable and cannot be rebuilt here, or the cache cannot be written."""


class KernelNotCompiledError(RuntimeError):
    """Offline, and the kernel configuration is not in the cache."""


class _Damaged(ValueError):
    """An entry that exists but cannot be used."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def entry_key(fields: Mapping[str, Any]) -> str:
    """The content address of a kernel configuration."""
    return hashlib.sha256(canonical_json({"cache_format": CACHE_FORMAT, **fields}).encode()).hexdigest()


def toolchain_id(toolchain: Mapping[str, str]) -> str:
    return "-".join(f"{k}{toolchain[k]}" for k in sorted(toolchain))


def build_id(fields: Mapping[str, Any], source: str) -> str:
    """The identity of an nvcc build: the CUDA source and what sets nvcc's target and flags."""
    return _sha256(
        canonical_json(
            {
                "source": _sha256(source.encode()),
                "arch": fields.get("arch"),
                "pass_configs": fields.get("pass_configs"),
                "spec_format": fields.get("spec_format"),
            }
        ).encode()
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 9)).decode()


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text, validate=True))


def _encode(artifact: Artifact, key: str, fields: Mapping[str, Any], toolchain: Mapping[str, str]) -> bytes:
    spec = artifact.spec.dumps()
    entry = {
        "cache_format": CACHE_FORMAT,
        "key": key,
        "fields": fields,
        "toolchain": toolchain,
        "spec": spec,
        "spec_sha256": _sha256(spec.encode()),
        "cubin_z": _pack(artifact.cubin),
        "cubin_sha256": _sha256(artifact.cubin),
        "source_z": _pack(artifact.source.encode()),
        "source_sha256": _sha256(artifact.source.encode()),
        "build_id": build_id(fields, artifact.source),
    }
    entry = json.loads(canonical_json(entry))  # exactly what a reader parses back
    entry["entry_sha256"] = _sha256(canonical_json(entry).encode())
    return canonical_json(entry).encode()


def _parse(data: bytes, key: str) -> dict:
    """The verified JSON of an entry; raises _Damaged."""
    try:
        entry = json.loads(data)
        if not isinstance(entry, dict):
            raise _Damaged("not a JSON object")
        stored = entry.pop("entry_sha256")
        if stored != _sha256(canonical_json(entry).encode()):
            raise _Damaged("entry checksum mismatch")
        if entry["cache_format"] != CACHE_FORMAT or entry["key"] != key:
            raise _Damaged("cache format or key mismatch")
    except _Damaged:
        raise
    except Exception as e:
        raise _Damaged(f"unreadable entry: {type(e).__name__}: {e}") from None
    return entry


def _decode(data: bytes, key: str) -> Artifact:
    """Parses and verifies an entry; raises _Damaged (a ValueError) when it is damaged."""
    entry = _parse(data, key)
    try:
        cubin = _unpack(entry["cubin_z"])
        source = _unpack(entry["source_z"])
        spec = entry["spec"]
        if (
            _sha256(cubin) != entry["cubin_sha256"]
            or _sha256(source) != entry["source_sha256"]
            or _sha256(spec.encode()) != entry["spec_sha256"]
        ):
            raise _Damaged("checksum mismatch")
        return Artifact(cubin=cubin, spec=LaunchSpec.from_json(json.loads(spec)), source=source.decode())
    except _Damaged:
        raise
    except Exception as e:
        raise _Damaged(f"unreadable entry: {type(e).__name__}: {e}") from None


def _entry_path(root: str, toolchain: str, key: str) -> str:
    return os.path.join(root, toolchain, key[:2], key + ".json")


def _read(path: str, key: str) -> Artifact | None:
    """The verified entry at ``path``; None when absent; _Damaged when damaged; OSError when unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError) as e:
        raise _Damaged(f"not a file: {e}") from None
    return _decode(data, key)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def describe(fields: Mapping[str, Any]) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in sorted(fields.get("params", {}).items()))
    return f"kernel {fields.get('kernel')!r} ({params}) for {fields.get('arch')}"


def _cannot_write(root: str, fields: Mapping[str, Any], error: OSError) -> CacheError:
    return CacheError(
        f"cannot write {describe(fields)} into the kernel cache {root}: {error}. Point JAX_TILEK_CACHE_DIR "
        "at a writable directory (or precompile the kernel into this one where it is writable)"
    )


@contextlib.contextmanager
def _locked(root: str, key: str, fields: Mapping[str, Any], timeout: float | None = None) -> Iterator[None]:
    """Holds the compile lock of one entry: ``<root>/.locks/<key>.lock``, removed on release.

    A waiter that gets the lock of a file the previous holder has just removed tries again, so two
    processes never hold the lock of one entry at once.
    """
    timeout = config.lock_timeout() if timeout is None else timeout
    path = os.path.join(root, LOCK_DIR, key + ".lock")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise _cannot_write(root, fields, e) from e
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a releaser removed the empty lock directory just now
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as e:
                raise _cannot_write(root, fields, e) from e
            continue
        except OSError as e:
            raise _cannot_write(root, fields, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                try:
                    with open(path) as f:
                        holder = f.read().strip() or "an unknown process"
                except OSError:
                    holder = "an unknown process"
                raise CacheError(
                    f"waited {timeout:g}s for {describe(fields)}: another process ({holder}) holds its compile "
                    f"lock {path} and has not finished. If that process is stopped or hung, end it; "
                    "JAX_TILEK_LOCK_TIMEOUT sets how long to wait"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
            continue
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this lock file as it released it; lock the new one
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))  # only when empty


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Events: what each request for an entry did (for precompile's summary and DEBUG logging).


@dataclasses.dataclass(frozen=True)
class CacheEvent:
    """One cache outcome: ``kind`` is "hit" (read from disk), "compiled" (built and written),
    "rebuilt" (a damaged entry replaced) or "cubin_reused" (nvcc skipped: same generated source)."""

    kind: str
    key: str
    kernel: str
    seconds: float


_event_logs: list[list[CacheEvent]] = []


@contextlib.contextmanager
def record_events() -> Iterator[list[CacheEvent]]:
    """Collects the :class:`CacheEvent` of every entry read, compiled or rebuilt inside the block."""
    log: list[CacheEvent] = []
    _event_logs.append(log)
    try:
        yield log
    finally:
        del _event_logs[next(i for i, l in enumerate(_event_logs) if l is log)]


def _event(kind: str, key: str, fields: Mapping[str, Any], seconds: float, path: str) -> None:
    _log.debug("cache %s: %s in %.3fs (%s)", kind, describe(fields), seconds, path)
    event = CacheEvent(kind, key, str(fields.get("kernel")), seconds)
    for log in _event_logs:
        log.append(event)


def lookup_offline(fields: Mapping[str, Any], root: str | None = None) -> Artifact:
    """Finds a compiled entry under any toolchain; raises when there is none."""
    root = root or config.cache_dir()
    key = entry_key(fields)
    try:
        toolchains = sorted(
            (d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))),
            key=lambda d: os.path.getmtime(os.path.join(root, d)),
            reverse=True,
        )
    except FileNotFoundError:
        toolchains = []
    for toolchain in toolchains:
        path = _entry_path(root, toolchain, key)
        start = time.perf_counter()
        try:
            artifact = _read(path, key)
        except _Damaged as e:
            raise CacheError(
                f"corrupted cache entry {path} for {describe(fields)}: {e}; rebuild it where TileLang is installed "
                "(a machine that can compile replaces it on first use)"
            ) from None
        except OSError as e:
            raise CacheError(f"cannot read cache entry {path} for {describe(fields)}: {e}") from e
        if artifact is not None:
            _event("hit", key, fields, time.perf_counter() - start, path)
            return artifact
    raise KernelNotCompiledError(
        f"{describe(fields)} is not in the kernel cache {root} and this machine cannot compile "
        f"(offline: TileLang missing or JAX_TILEK_OFFLINE=1). Precompile it on a build machine with "
        f"jax_tilek.precompile(...) or by lowering the program for 'cuda' there, then ship the cache "
        f"directory and point JAX_TILEK_CACHE_DIR at it. (cache key {key})"
    )


def get_or_compile(
    fields: Mapping[str, Any],
    toolchain: Mapping[str, str],
    compile_fn: Callable[[], Artifact],
    root: str | None = None,
) -> Artifact:
    """Returns the cached entry for ``fields``, compiling (once, across processes) on a miss.

    A damaged entry is rebuilt (with a warning); failing to write the cache is a CacheError.
    """
    root = root or config.cache_dir()
    key = entry_key(fields)
    path = _entry_path(root, toolchain_id(toolchain), key)
    start = time.perf_counter()
    try:
        artifact = _read(path, key)
        if artifact is not None:
            _event("hit", key, fields, time.perf_counter() - start, path)
            return artifact
    except _Damaged:
        pass  # rebuilt below, under the lock
    except OSError as e:
        raise CacheError(f"cannot read cache entry {path} for {describe(fields)}: {e}") from e
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise _cannot_write(root, fields, e) from e
    with _locked(root, key, fields):
        kind = "compiled"
        try:
            artifact = _read(path, key)
            if artifact is not None:
                _event("hit", key, fields, time.perf_counter() - start, path)
                return artifact
        except _Damaged as e:
            kind = "rebuilt"
            warnings.warn(f"rebuilding corrupted kernel cache entry {path} for {describe(fields)}: {e}", stacklevel=2)
            try:
                _remove(path)
            except OSError as e:
                raise _cannot_write(root, fields, e) from e
        except OSError as e:
            raise CacheError(f"cannot read cache entry {path} for {describe(fields)}: {e}") from e
        compiling = time.perf_counter()
        artifact = compile_fn()
        data = _encode(artifact, key, fields, toolchain)
        try:
            _write_atomic(path, data)
        except OSError as e:
            raise _cannot_write(root, fields, e) from e
        _note_build(root, toolchain_id(toolchain), json.loads(data)["build_id"], path)
        _event(kind, key, fields, time.perf_counter() - compiling, path)
    return artifact


# ---------------------------------------------------------------------------------------------
# Reusing cubins by build id.

_builds: dict[tuple[str, str], dict[str, str]] = {}
_builds_lock = threading.Lock()


def _entry_build_id(path: str) -> str | None:
    """The build id of the entry at ``path`` (any cache format that records its source), or None."""
    try:
        with open(path, "rb") as f:
            entry = json.loads(f.read())
        if "build_id" in entry:
            return entry["build_id"]
        return build_id(entry["fields"], _unpack(entry["source_z"]).decode())
    except Exception:
        return None


def _build_index(root: str, toolchain: str) -> dict[str, str]:
    with _builds_lock:
        index = _builds.get((root, toolchain))
        if index is None:
            index = {}
            for path in sorted(glob.glob(os.path.join(glob.escape(root), glob.escape(toolchain), "??", "*.json"))):
                found = _entry_build_id(path)
                if found:
                    index.setdefault(found, path)
            _builds[(root, toolchain)] = index
        return index


def _note_build(root: str, toolchain: str, build: str, path: str) -> None:
    with _builds_lock:
        index = _builds.get((root, toolchain))
        if index is not None:
            index[build] = path


def find_cubin(fields: Mapping[str, Any], toolchain: Mapping[str, str], source: str, root: str | None = None) -> bytes | None:
    """A cubin already built from ``source`` with the same target and flags under this toolchain.

    Entries of any cache format that record their source are considered; the cubin must match its
    recorded checksum.
    """
    root = root or config.cache_dir()
    wanted = build_id(fields, source)
    path = _build_index(root, toolchain_id(toolchain)).get(wanted)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            entry = json.loads(f.read())
        cubin = _unpack(entry["cubin_z"])
        recorded = entry.get("build_id") or build_id(entry["fields"], _unpack(entry["source_z"]).decode())
        if recorded == wanted and _sha256(cubin) == entry["cubin_sha256"]:
            _event("cubin_reused", entry_key(fields), fields, 0.0, path)
            return cubin
    except Exception:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Inspecting a cache directory (``python -m jax_tilek cache ...``, ``doctor``).


@dataclasses.dataclass(frozen=True)
class EntryInfo:
    """One file where an entry lives: its toolchain directory, key, size and age, the configuration
    it holds (``fields``, None when it cannot be read back), why it cannot be used (``problem``, None
    for an entry that verifies) and its ``cache_format``. An entry of an older cache format is not
    damaged, only never looked up again (its key hashed another format); its cubin may still be reused
    (:func:`find_cubin`), and ``cache prune --old-formats`` deletes such entries."""

    path: str
    toolchain: str
    key: str
    size: int
    mtime: float
    fields: Mapping[str, Any] | None
    problem: str | None
    cache_format: int | None = CACHE_FORMAT

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def old_format(self) -> bool:
        return self.problem is None and self.cache_format != CACHE_FORMAT


def toolchain_dirs(root: str) -> list[str]:
    """The toolchain directories under ``root`` (names), newest first."""
    try:
        names = [d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names, key=lambda d: os.path.getmtime(os.path.join(root, d)), reverse=True)


def entry_paths(root: str) -> list[str]:
    """Every entry file of every toolchain under ``root`` (``<toolchain>/<xx>/<key>.json``)."""
    found = []
    for toolchain in toolchain_dirs(root):
        found += glob.glob(os.path.join(glob.escape(root), glob.escape(toolchain), "??", "*.json"))
    return sorted(p for p in found if not os.path.basename(p).startswith("."))


def stray_files(root: str) -> list[str]:
    """Leftovers that are not entries: temporary files of interrupted writes (``.tmp-*``)."""
    found = []
    for toolchain in toolchain_dirs(root):
        found += glob.glob(os.path.join(glob.escape(root), glob.escape(toolchain), "??", ".tmp-*"))
    return sorted(found)


def _recover_fields(data: bytes, key: str) -> Mapping[str, Any] | None:
    """The configuration a damaged entry recorded, when its JSON still parses and matches its address."""
    try:
        fields = json.loads(data)["fields"]
        return fields if isinstance(fields, dict) and entry_key(fields) == key else None
    except Exception:
        return None


def inspect_entry(path: str) -> EntryInfo:
    """Reads and fully verifies the entry at ``path`` (checksums, spec, cubin); never raises for damage."""
    toolchain = os.path.basename(os.path.dirname(os.path.dirname(path)))
    key = os.path.basename(path).removesuffix(".json")
    try:
        stat = os.stat(path)
    except OSError as e:
        return EntryInfo(path, toolchain, key, 0, 0.0, None, f"cannot stat: {e}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (IsADirectoryError, NotADirectoryError) as e:
        return EntryInfo(path, toolchain, key, 0, stat.st_mtime, None, f"not a file: {e}")
    except OSError as e:
        return EntryInfo(path, toolchain, key, stat.st_size, stat.st_mtime, None, f"unreadable: {e}")
    try:
        entry = json.loads(data)
        version = entry.get("cache_format") if isinstance(entry, dict) else None
    except Exception:
        version = None
    if isinstance(version, int) and version < CACHE_FORMAT:
        fields = entry.get("fields") if isinstance(entry.get("fields"), dict) else None
        return EntryInfo(path, toolchain, key, stat.st_size, stat.st_mtime, fields, None, version)
    try:
        _decode(data, key)
    except _Damaged as e:
        return EntryInfo(path, toolchain, key, stat.st_size, stat.st_mtime, _recover_fields(data, key), str(e))
    return EntryInfo(path, toolchain, key, stat.st_size, stat.st_mtime, json.loads(data)["fields"], None)


def scan(root: str | None = None) -> list[EntryInfo]:
    """Every entry under ``root`` (default: the cache directory), verified."""
    return [inspect_entry(p) for p in entry_paths(root or config.cache_dir())]


def find_entry(key: str, root: str | None = None, toolchain: str | None = None) -> str | None:
    """The path of the entry ``key``: under ``toolchain`` when given, else under the newest toolchain
    directory that has it."""
    root = root or config.cache_dir()
    for name in [toolchain] if toolchain else toolchain_dirs(root):
        path = _entry_path(root, name, key)
        if os.path.isfile(path):
            return path
    return None


def remove_entry(path: str) -> None:
    """Deletes an entry (a file or whatever sits in its place) and its directory when left empty."""
    _remove(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
