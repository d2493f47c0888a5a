"""``python -m jax_tilek cache {list,verify,prune,export}``: the kernel cache (``JAX_TILEK_CACHE_DIR``).

- ``list``: entries per toolchain, architecture and kernel (``--entries``: one line per entry).
- ``verify``: reads every entry back with its checksums; a damaged entry is rebuilt when this machine
  can compile it (TileLang and nvcc of the entry's toolchain, and the kernel's source unchanged), else
  deleted (it would never be launched anyway). ``--check`` only reports. Exit 1 when damage remains.
- ``prune``: deletes entries older than ``--older-than DAYS``, of ``--toolchain NAME``, of every toolchain
  but this machine's (``--other-toolchains``), of an ``--arch``, or of an older cache format
  (``--old-formats``); and leftovers of interrupted writes.
- ``export DIR``: a minimal cache holding exactly the entries a program (or families' cases) uses, no
  ``.locks``; kernels missing from the cache are compiled first (where possible).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

from jax_tilek import cache, compiler, config
from jax_tilek._cli.report import table


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def current_toolchain() -> str | None:
    """This machine's toolchain directory name, or None when it cannot compile (no TileLang or nvcc)."""
    if config.offline():
        return None
    try:
        return cache.toolchain_id(compiler.toolchain())
    except compiler.CompileError:
        return None


# ---------------------------------------------------------------------------------------------
# list


def cmd_list(args: argparse.Namespace) -> int:
    root = config.cache_dir()
    entries = cache.scan(root)
    print(f"kernel cache {root}: {len(entries)} entries, {_size(sum(e.size for e in entries))}")
    if not entries:
        return 0
    if args.entries:
        rows = [
            {
                "toolchain": e.toolchain, "arch": (e.fields or {}).get("arch", "?"), "kernel": (e.fields or {}).get("kernel", "?"),
                "params": ", ".join(f"{k}={v}" for k, v in sorted(((e.fields or {}).get("params") or {}).items())),
                "size": _size(e.size), "age": f"{(time.time() - e.mtime) / 86400:.1f}d", "state": ("old format" if e.old_format else "ok") if e.ok else e.problem,
                "key": e.key[:12],
            }
            for e in entries
        ]  # fmt: skip
        columns = [(h, h, "s") for h in ("toolchain", "arch", "kernel", "params", "size", "age", "state", "key")]
    else:
        groups: dict[tuple, list[cache.EntryInfo]] = collections.defaultdict(list)
        for e in entries:
            groups[(e.toolchain, (e.fields or {}).get("arch", "?"), (e.fields or {}).get("kernel", "?"))].append(e)
        rows = [
            {"toolchain": t, "arch": a, "kernel": k, "entries": str(len(es)), "size": _size(sum(e.size for e in es)),
             "old format": str(sum(e.old_format for e in es)), "damaged": str(sum(not e.ok for e in es))}
            for (t, a, k), es in sorted(groups.items())
        ]  # fmt: skip
        columns = [(h, h, "s") for h in ("toolchain", "arch", "kernel", "entries", "size", "old format", "damaged")]
    print(table(rows, columns))
    return 0


# ---------------------------------------------------------------------------------------------
# verify


def _plain(value: Any) -> Any:
    """A canonical (JSON) parameter value back as the factory saw it: lists become tuples."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def find_kernel(name: str):
    """The :class:`~jax_tilek.TileKernel` named ``module.qualname``, or None when it cannot be imported."""
    import importlib

    from jax_tilek.kernel import TileKernel

    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj if isinstance(obj, TileKernel) else None
    return None


def rebuild(entry: cache.EntryInfo, root: str) -> str:
    """Deletes a damaged entry and compiles it again when possible; returns what was done."""
    fields: Mapping[str, Any] | None = entry.fields
    reason = None
    kernel = None
    if fields is None:
        reason = "its configuration cannot be read back"
    elif entry.toolchain != current_toolchain():
        reason = f"it belongs to toolchain {entry.toolchain}, and this machine cannot build with that one"
    else:
        kernel = find_kernel(str(fields.get("kernel")))
        if kernel is None:
            reason = f"kernel {fields.get('kernel')!r} cannot be imported here"
        elif cache.entry_key(kernel.cache_fields(_plain(fields["params"]), fields["arch"])) != entry.key:
            reason = "the kernel's source has changed since (the entry is stale)"
            kernel = None
    cache.remove_entry(entry.path)
    if kernel is None:
        return f"deleted ({reason})"
    from jax_tilek.kernel import clear_memory_cache

    clear_memory_cache()
    with config.use_cache_dir(root):
        kernel.artifact(_plain(fields["params"]), fields["arch"], record=False)
    after = cache.inspect_entry(entry.path)
    if not after.ok:
        return f"rebuild failed: {after.problem}"
    return "rebuilt"


def cmd_verify(args: argparse.Namespace) -> int:
    root = config.cache_dir()
    entries = cache.scan(root)
    damaged = [e for e in entries if not e.ok]
    strays = cache.stray_files(root)
    print(f"kernel cache {root}: {len(entries)} entries, {len(damaged)} damaged, {len(strays)} leftover temporary files")
    remaining = 0
    for e in damaged:
        what = (cache.describe(e.fields) if e.fields else f"entry {e.key[:12]}") + f" [{e.toolchain}]"
        if args.check:
            print(f"  DAMAGED {what}: {e.problem}\n    {e.path}")
            remaining += 1
            continue
        try:
            outcome = rebuild(e, root)
        except Exception as err:  # compiling failed: the entry is already gone
            outcome = f"deleted; rebuilding failed: {type(err).__name__}: {err}"
        remaining += outcome.startswith("rebuild failed")
        print(f"  DAMAGED {what}: {e.problem}\n    -> {outcome}")
    if not args.check:
        for path in strays:
            os.unlink(path)
    if args.check and damaged:
        print("fix: python -m jax_tilek cache verify (rebuilds or deletes them)")
    return 1 if remaining else 0


# ---------------------------------------------------------------------------------------------
# prune


def cmd_prune(args: argparse.Namespace) -> int:
    root = config.cache_dir()
    if not (args.older_than is not None or args.toolchain or args.other_toolchains or args.arch or args.old_formats):
        print("prune: say what to delete: --older-than DAYS, --toolchain NAME, --other-toolchains, --arch ARCH or --old-formats",
              file=sys.stderr)
        return 2
    keep_toolchain = None
    if args.other_toolchains:
        keep_toolchain = current_toolchain()
        if keep_toolchain is None:
            print("prune --other-toolchains: this machine has no TileLang/nvcc, so no toolchain of its own", file=sys.stderr)
            return 2
    now = time.time()
    chosen = []
    for e in cache.scan(root):
        reasons = []
        if args.older_than is not None and now - e.mtime > args.older_than * 86400:
            reasons.append(f"older than {args.older_than:g} days")
        if args.toolchain and e.toolchain == args.toolchain:
            reasons.append(f"toolchain {e.toolchain}")
        if keep_toolchain and e.toolchain != keep_toolchain:
            reasons.append(f"not this machine's toolchain ({keep_toolchain})")
        if args.arch and (e.fields or {}).get("arch") == args.arch:
            reasons.append(f"arch {args.arch}")
        if args.old_formats and e.old_format:
            reasons.append(f"cache format {e.cache_format}")
        if reasons:
            chosen.append((e, reasons))
    strays = cache.stray_files(root)
    freed = sum(e.size for e, _ in chosen)
    verb = "would delete" if args.dry_run else "deleted"
    for e, reasons in chosen:
        if args.verbose_list:
            print(f"  {verb} {cache.describe(e.fields) if e.fields else e.key[:12]} [{e.toolchain}]: {', '.join(reasons)}")
        if not args.dry_run:
            cache.remove_entry(e.path)
    if not args.dry_run:
        for path in strays:
            os.unlink(path)
        for name in cache.toolchain_dirs(root):
            directory = os.path.join(root, name)
            if not any(os.scandir(directory)):
                os.rmdir(directory)
    print(f"kernel cache {root}: {verb} {len(chosen)} entries ({_size(freed)}) and {len(strays)} leftover temporary files")
    return 0


# ---------------------------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    from jax_tilek._cli import precompile

    if not args.program and not args.family:
        print("export: name what the minimal cache is for: --program MODULE:FUNCTION [--args ...] and/or --family", file=sys.stderr)
        return 2
    root = config.cache_dir()
    destination = os.path.abspath(args.directory)
    if os.path.realpath(destination) == os.path.realpath(root):
        print("export: the destination is the cache itself", file=sys.stderr)
        return 2
    units = precompile.select_units(args)
    summary = precompile.precompile_units(units, args.arch, jobs=args.jobs, progress=not args.no_progress, verbosity=args.verbose)
    if summary.failed:
        print(summary.text())
        print("export: not written (some programs could not be lowered)", file=sys.stderr)
        return 1
    preferred = current_toolchain()
    copied, size, missing = 0, 0, []
    for key in sorted(summary.keys):
        path = cache.find_entry(key, root, preferred) or cache.find_entry(key, root)
        if path is None or not cache.inspect_entry(path).ok:
            missing.append(key)
            continue
        relative = os.path.relpath(path, root)
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(path, target)
        copied += 1
        size += os.path.getsize(target)
    print(f"exported {copied} kernel configurations ({_size(size)}) for {args.arch} to {destination}")
    if missing:
        print(f"export: {len(missing)} entries missing or damaged in {root}: {', '.join(k[:12] for k in missing)}", file=sys.stderr)
        return 1
    print(f"on the GPU machine: JAX_TILEK_CACHE_DIR={destination}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("cache", help="list, verify, prune or export the kernel cache", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    lister = sub.add_parser("list", help="what is cached, per toolchain, architecture and kernel")
    lister.add_argument("--entries", action="store_true", help="one line per entry")
    verify = sub.add_parser("verify", help="check every entry; rebuild or delete damaged ones")
    verify.add_argument("--check", action="store_true", help="only report (exit 1 when any entry is damaged)")
    prune = sub.add_parser("prune", help="delete entries by age, toolchain or architecture")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="written more than DAYS days ago")
    prune.add_argument("--toolchain", metavar="NAME", help="a toolchain directory (see cache list)")
    prune.add_argument("--other-toolchains", action="store_true", help="every toolchain but this machine's")
    prune.add_argument("--arch", help="entries compiled for this architecture")
    prune.add_argument("--old-formats", action="store_true", help="entries of an older cache format (never looked up)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    prune.add_argument("--list", dest="verbose_list", action="store_true", help="name every entry deleted")
    export = sub.add_parser("export", help="copy the entries a program (or families' cases) uses into DIR")
    export.add_argument("directory", metavar="DIR")
    export.add_argument("--arch", default=os.environ.get("JAX_TILEK_ARCH") or "sm_90a", choices=compiler.SUPPORTED_ARCHS)
    export.add_argument("--family", action="append", metavar="FAMILY", help="a kernel family's cases (repeatable)")
    export.add_argument("--program", metavar="MODULE:FUNCTION", help="the program (see precompile --help)")
    export.add_argument("--args", nargs="*", metavar="ARG", help="its arguments: dtype[shape] or Python literals")
    export.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    export.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    return {"list": cmd_list, "verify": cmd_verify, "prune": cmd_prune, "export": cmd_export}[args.cache_command](args)
