"""``python -m jax_tilek sanitize``: the kernels under NVIDIA compute-sanitizer, one summary line per kernel.

For each tool (``--tool memcheck,racecheck,initcheck,synccheck``, default all four) one process runs
under ``compute-sanitizer --tool T --target-processes all`` with ``XLA_PYTHON_CLIENT_ALLOCATOR=platform``
(XLA's pooling allocator would hide out-of-bounds accesses inside its pool, and leave memory the
kernels never wrote looking initialised) and without preallocation:

- by default the GPU tests of a checkout (``pytest -m gpu tests``; ``--pytest ARGS`` replaces the
  arguments), with a pytest plugin recording which kernels each test launched;
- with ``--family``/``--op``, the chosen ops' named cases (``ARG_SPECS``, benchmark sizes excluded) run
  with ``impl="tilelang"`` and compared with their references (:mod:`jax_tilek._cli.sanitize_child`),
  one process per family or op, one after the other.

The sanitizer's log is split into error records, and each record is attributed to the jax_tilek kernel
whose device entry it names (records naming no jax_tilek kernel are XLA's or JAX's own). Logs stay in
``--out`` (default ``./sanitize_logs``). Exit 1 on any error, a failing run, or a missing sanitizer.

initcheck does not see the bulk (TMA) stores of Hopper kernels as writes: a host copy of an output
written that way, or an XLA kernel reading one, reports uninitialised memory (H100, 2026-12-07: the
grouped wgrad's TMA-stored tiles, whose values the case's reference check had just confirmed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
MANIFEST_ENV = "JAX_TILEK_SANITIZE_MANIFEST"
_PREFIX = re.compile(r"^=+ ?")
_SUMMARY = re.compile(r"(ERROR|RACECHECK) SUMMARY: (\d+) (error|hazard)")


# ---------------------------------------------------------------------------------------------
# What ran: the manifest (written by the child or the pytest plugin).


def kernels_of(used: Sequence[tuple[str, Any, str, str]]) -> dict[str, dict[str, set[str]]]:
    """For ``record_kernels`` records: kernel name -> {"entries": device entry names, "configs": cache keys}."""
    from jax_tilek import config
    from jax_tilek.kernel import _memo, _memo_lock

    out: dict[str, dict[str, set[str]]] = {}
    for name, _params, _arch, key in used:
        item = out.setdefault(name, {"entries": set(), "configs": set()})
        item["configs"].add(key)
        with _memo_lock:
            artifact = _memo.get((config.cache_dir(), key))
        if artifact is not None:
            item["entries"] |= {k.entry for k in artifact.spec.kernels}
    return out


class Manifest:
    """Accumulates which kernels each test or case used, and failures; saved as JSON."""

    def __init__(self) -> None:
        self.kernels: dict[str, dict[str, set[str]]] = {}
        self.failures: list[str] = []
        self.ran: list[str] = []

    def add(self, label: str, used: Sequence[tuple[str, Any, str, str]]) -> None:
        self.ran.append(label)
        for name, item in kernels_of(used).items():
            mine = self.kernels.setdefault(name, {"entries": set(), "configs": set(), "users": set()})
            mine["entries"] |= item["entries"]
            mine["configs"] |= item["configs"]
            mine["users"].add(label)

    def save(self, path: str) -> None:
        data = {
            "kernels": {n: {k: sorted(v) for k, v in item.items()} for n, item in sorted(self.kernels.items())},
            "failures": self.failures,
            "ran": self.ran,
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Reading the sanitizer's log.


@dataclasses.dataclass
class Log:
    """A compute-sanitizer log: its error records and the error count of its summary line(s)."""

    records: list[str]
    summary_errors: int | None


def parse_log(text: str) -> Log:
    """Splits the ``=========``-prefixed output into records: a record starts at an unindented message
    and takes the indented lines (``at ...``, ``by thread ...``, the host backtrace) that follow."""
    records: list[list[str]] = []
    summary = None
    for line in text.splitlines():
        if not line.startswith("="):
            continue
        body = _PREFIX.sub("", line)
        found = _SUMMARY.search(body)
        if found:
            summary = (summary or 0) + int(found.group(2))
            continue
        if not body.strip() or body.startswith(("COMPUTE-SANITIZER", "Target application returned")):
            continue
        if body[:1].isspace():
            if records:
                records[-1].append(body.strip())
        else:
            records.append([body.strip()])
    errors = [r for r in records if not r[0].startswith(("Program hit", "Saved host backtrace", "Note:", "Warning:"))]
    return Log(["\n".join(r) for r in errors], summary)


def attribute(records: Sequence[str], kernels: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, list[str]]:
    """Each record under the jax_tilek kernel whose device entry it names (``""``: none of them)."""
    patterns = {name: [re.compile(rf"(?<![A-Za-z0-9_]){re.escape(e)}(?![A-Za-z0-9_])") for e in item.get("entries", ())]
                for name, item in kernels.items()}  # fmt: skip
    out: dict[str, list[str]] = {name: [] for name in kernels}
    out[""] = []
    for record in records:
        owners = [n for n, ps in patterns.items() if any(p.search(record) for p in ps)]
        for owner in owners or [""]:
            out[owner].append(record)
    return out


# ---------------------------------------------------------------------------------------------
# Running.


def sanitizer_path(explicit: str | None = None) -> str | None:
    """compute-sanitizer: ``--sanitizer``, PATH, beside the nvcc jax_tilek uses, or /usr/local/cuda."""
    if explicit:
        return explicit
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = ["/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    try:
        from jax_tilek import compiler

        bin_dir = os.path.dirname(compiler.nvcc_path())
        candidates[:0] = [os.path.join(bin_dir, "compute-sanitizer"), os.path.join(os.path.dirname(bin_dir), "compute-sanitizer", "compute-sanitizer")]
    except Exception:
        pass
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def targets(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The processes the sanitizer runs, named: one per ``--family`` and ``--op`` (two families' cases in
    one process have crashed the tools, exit -11, where each family alone ran clean: H100, 2026-12-07),
    or the GPU tests (named "")."""
    if args.family or args.op:
        extra = ["--cases-per-op", str(args.cases_per_op)] if args.cases_per_op else []
        chosen = [("--family", f) for f in args.family or ()] + [("--op", o) for o in args.op or ()]
        return [(name, [sys.executable, "-m", "jax_tilek._cli.sanitize_child", flag, name, *extra]) for flag, name in chosen]
    pytest_args = args.pytest if args.pytest else ["-m", "gpu", "tests"]
    return [("", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                  "-p", "jax_tilek._cli.sanitize_plugin", *pytest_args])]  # fmt: skip


def sanitizer_command(sanitizer: str, tool: str, log: str, target: Sequence[str]) -> list[str]:
    return [sanitizer, "--tool", tool, "--target-processes", "all", "--print-limit", "1000", "--log-file", log, *target]


def sanitizer_env(manifest: str) -> dict[str, str]:
    env = dict(os.environ, XLA_PYTHON_CLIENT_ALLOCATOR="platform", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    # No autotuning: under a tool it runs thousands of XLA's candidate kernels, for minutes (and has
    # crashed the process); the tools are here for jax_tilek's kernels.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    env[MANIFEST_ENV] = manifest
    return env


def run_tool(sanitizer: str, tool: str, target: Sequence[str], out: str, time_limit: float | None = None, name: str = "") -> tuple[list[str], int]:
    """Runs ``target`` under one tool, stopped (its process group killed) after ``time_limit`` seconds;
    returns its summary lines and the number of problems. Its files in ``out`` are ``TOOL[.NAME].*``."""
    stem = os.path.join(out, f"{tool}.{name}" if name else tool)
    log, manifest = f"{stem}.log", f"{stem}.manifest.json"
    for path in (log, manifest):
        if os.path.exists(path):
            os.unlink(path)
    with open(f"{stem}.stdout", "w") as stdout:
        process = subprocess.Popen(sanitizer_command(sanitizer, tool, log, target), env=sanitizer_env(manifest),
                                   stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            rc = process.wait(time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = f"stopped after {time_limit:g} s"
    text = ""
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            text = f.read()
    parsed = parse_log(text)
    try:
        with open(manifest) as f:
            ran = json.load(f)
    except (OSError, ValueError):
        ran = {"kernels": {}, "failures": [], "ran": []}
    if rc != 0:
        ran["failures"].append(f"the run did not finish cleanly (exit {rc})")
    by_kernel = attribute(parsed.records, ran["kernels"])
    lines = []
    for name, item in ran["kernels"].items():
        errors = by_kernel[name]
        first = f": {errors[0].splitlines()[0]}" if errors else ""
        lines.append(f"{tool:<9} {'FAIL' if errors else 'ok':<4}  {name}  [{', '.join(item['entries'])}; "
                     f"{len(item['configs'])} configs]: {len(errors)} errors{first}")  # fmt: skip
    problems = sum(len(v) for v in by_kernel.values()) + len(ran["failures"])
    if by_kernel[""]:
        lines.append(f"{tool:<9} FAIL  (not a jax_tilek kernel): {len(by_kernel[''])} errors: {by_kernel[''][0].splitlines()[0]}")
    for failure in ran["failures"]:
        lines.append(f"{tool:<9} FAIL  {failure}")
    total = parsed.summary_errors if parsed.summary_errors is not None else len(parsed.records)
    lines.append(f"{tool:<9} {'FAIL' if problems else 'ok':<4}  total: {len(ran['kernels'])} kernels, {len(ran['ran'])} "
                 f"tests/cases, {total} errors in the sanitizer's summary, exit {rc} (log {log})")  # fmt: skip
    return lines, problems


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sanitize", help="run the GPU tests or ops' cases under compute-sanitizer", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tool", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)} (default: all)")
    p.add_argument("--family", action="append", metavar="FAMILY", help="run this family's cases instead of the GPU tests")
    p.add_argument("--op", action="append", metavar="FAMILY.FUNCTION", help="run this function's cases (e.g. quant.per_token_cast)")
    p.add_argument("--cases-per-op", type=int, metavar="N", help="with --family/--op: each function's first N cases only")
    p.add_argument("--time-limit", type=float, metavar="S", help="stop each tool's run (of each family or op) after S seconds (what ran is still reported)")
    p.add_argument("--parallel", action="store_true", help="run the tools at the same time (one process each, on one GPU)")
    p.add_argument("--pytest", nargs=argparse.REMAINDER, help="pytest arguments instead of '-m gpu tests' (last option)")
    p.add_argument("--out", default="sanitize_logs", help="where the logs go (default ./sanitize_logs)")
    p.add_argument("--sanitizer", help="the compute-sanitizer executable")


def run(args: argparse.Namespace) -> int:
    tools = [t.strip() for t in args.tool.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        print(f"sanitize: unknown tools {unknown}; choose from {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    sanitizer = sanitizer_path(args.sanitizer)
    if sanitizer is None:
        print("sanitize: compute-sanitizer not found (it ships with the CUDA toolkit); put it on PATH or pass --sanitizer", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    chosen = targets(args)

    def run_all(tool: str) -> tuple[list[str], int]:
        runs = [run_tool(sanitizer, tool, target, args.out, args.time_limit, name if len(chosen) > 1 else "") for name, target in chosen]
        return [line for lines, _ in runs for line in lines], sum(found for _, found in runs)

    problems = 0
    with concurrent.futures.ThreadPoolExecutor(len(tools) if args.parallel else 1) as pool:
        for lines, found in pool.map(run_all, tools):
            problems += found
            print("\n".join(lines), flush=True)
    return 1 if problems else 0
