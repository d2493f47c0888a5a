"""Content-addressed disk cache of compiled kernels.

An entry is one JSON file holding the launch spec, the cubin and the CUDA source (zlib-compressed,
base64), and sha256 checksums of the spec and the raw cubin. Its address is ``<root>/<toolchain>/<key[:2]>/<key>.json`` where ``toolchain`` names the
TileLang and nvcc versions and ``key`` hashes the kernel's identity (name, source digest, static
parameters, pass configs, architecture, cache format).

- Writes are atomic (temporary file + ``os.replace``), so readers never see a partial entry.
- Compiling is serialised per entry with an exclusive ``flock``: when several processes miss the same
  kernel at once, one compiles and the others wait and then read its entry.
- A corrupted entry (bad JSON, checksum mismatch) is never launched: it is rebuilt, or, offline, it is
  reported as an error.
- Offline (no TileLang on this machine, or ``JAX_TILEK_OFFLINE=1``) the toolchain is unknown, so every
  toolchain directory under the root is searched, newest first; a miss raises
  :class:`KernelNotCompiledError` naming the kernel and its configuration.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jax_tilek import config
from jax_tilek.compiler import Artifact
from jax_tilek.spec import LaunchSpec

CACHE_FORMAT = 2


class CacheError(RuntimeError):
    """A cache entry is unusable and cannot be rebuilt here."""


class KernelNotCompiledError(RuntimeError):
    """Offline, and the kernel configuration is not in the cache."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def entry_key(fields: Mapping[str, Any]) -> str:
    """The content address of a kernel configuration."""
    return hashlib.sha256(canonical_json({"cache_format": CACHE_FORMAT, **fields}).encode()).hexdigest()


def toolchain_id(toolchain: Mapping[str, str]) -> str:
    return "-".join(f"{k}{toolchain[k]}" for k in sorted(toolchain))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 9)).decode()


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text, validate=True))


def _encode(artifact: Artifact, key: str, fields: Mapping[str, Any], toolchain: Mapping[str, str]) -> bytes:
    spec = artifact.spec.dumps()
    return canonical_json(
        {
            "cache_format": CACHE_FORMAT,
            "key": key,
            "fields": fields,
            "toolchain": toolchain,
            "spec": spec,
            "spec_sha256": _sha256(spec.encode()),
            "cubin_z": _pack(artifact.cubin),
            "cubin_sha256": _sha256(artifact.cubin),
            "source_z": _pack(artifact.source.encode()),
        }
    ).encode()


def _decode(data: bytes, key: str) -> Artifact:
    """Parses and verifies an entry; raises ValueError when it is corrupt."""
    try:
        entry = json.loads(data)
        cubin = _unpack(entry["cubin_z"])
        spec = entry["spec"]
        ok = (
            entry["cache_format"] == CACHE_FORMAT
            and entry["key"] == key
            and _sha256(cubin) == entry["cubin_sha256"]
            and _sha256(spec.encode()) == entry["spec_sha256"]
        )
    except Exception as e:
        raise ValueError(f"unreadable entry: {e}") from None
    if not ok:
        raise ValueError("checksum or key mismatch")
    source = _unpack(entry["source_z"]).decode()
    return Artifact(cubin=cubin, spec=LaunchSpec.from_json(json.loads(spec)), source=source)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


def _entry_path(root: str, toolchain: str, key: str) -> str:
    return os.path.join(root, toolchain, key[:2], key + ".json")


def _read(path: str, key: str) -> Artifact | None:
    """The verified entry at ``path``, None when absent; ValueError when corrupt."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return _decode(data, key)


def describe(fields: Mapping[str, Any]) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in sorted(fields.get("params", {}).items()))
    return f"kernel {fields.get('kernel')!r} ({params}) for {fields.get('arch')}"


def lookup_offline(fields: Mapping[str, Any], root: str | None = None) -> Artifact:
    """Finds a compiled entry under any toolchain; raises when there is none."""
    root = root or config.cache_dir()
    key = entry_key(fields)
    try:
        toolchains = sorted(
            (d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))),
            key=lambda d: os.path.getmtime(os.path.join(root, d)),
            reverse=True,
        )
    except FileNotFoundError:
        toolchains = []
    for toolchain in toolchains:
        path = _entry_path(root, toolchain, key)
        try:
            artifact = _read(path, key)
        except ValueError as e:
            raise CacheError(f"corrupted cache entry {path} for {describe(fields)}: {e}; rebuild it where TileLang is installed") from None
        if artifact is not None:
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
    """Returns the cached entry for ``fields``, compiling (once, across processes) on a miss."""
    root = root or config.cache_dir()
    key = entry_key(fields)
    path = _entry_path(root, toolchain_id(toolchain), key)
    try:
        artifact = _read(path, key)
        if artifact is not None:
            return artifact
    except ValueError:
        pass  # corrupted: rebuilt below, under the lock
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path):
        try:
            artifact = _read(path, key)
            if artifact is not None:
                return artifact
        except ValueError as e:
            warnings.warn(f"rebuilding corrupted kernel cache entry {path}: {e}", stacklevel=2)
        artifact = compile_fn()
        _write_atomic(path, _encode(artifact, key, fields, toolchain))
    return artifact
