"""``python -m jax_tilek bench``: the benchmark harness of a checkout as a command.

Runs the benchmark families (``benchmarks/bench_<family>.py``, and ``overhead``, the launch-overhead
chain) on the GPU, prints the table, writes ``--json`` and ``--plot DIR`` (PNG charts, see
:mod:`jax_tilek._cli.plots`). ``--from-json FILE`` reads a saved run instead (any machine, no GPU):
table and plots only.

``benchmarks/`` is a folder of the repository, not part of the installed package (its cases pull in
test-only helpers and it is edited with the kernels), so running benchmarks needs a checkout: the
command imports ``benchmarks`` from the current directory (the repository root). Tables and plots of
saved JSON need only this package and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import ModuleType
from typing import Any

from jax_tilek._cli.report import bench_report


def benchmarks_run_module() -> ModuleType:
    """``benchmarks.run`` of the checkout in the current directory; SystemExit saying why when absent."""
    root = os.getcwd()
    if not os.path.isfile(os.path.join(root, "benchmarks", "harness.py")):
        raise SystemExit(
            f"bench: no benchmarks/ here ({root}). The benchmark harness is part of the jax_tilek repository, "
            "not of the installed package: run `python -m jax_tilek bench` from the root of a checkout "
            "(or use --from-json FILE to tabulate and plot a saved run)"
        )
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import run as bench_run

    where = os.path.dirname(os.path.abspath(bench_run.__file__))
    if os.path.realpath(where) != os.path.realpath(os.path.join(root, "benchmarks")):
        raise SystemExit(f"bench: imported benchmarks from {where}, not from {root}/benchmarks (another package named benchmarks?)")
    return bench_run


def _names(values: list[str] | None) -> set[str]:
    """The names in repeatable, comma-separated option values."""
    return {f.strip() for v in values or () for f in v.split(",") if f.strip()}


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="run the benchmarks (a checkout, a GPU): table, JSON, PNG plots",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--family", action="append", metavar="FAMILY",
                   help="benchmark families to run (transpose, quant_per_token, ..., overhead; repeatable or comma-separated)")  # fmt: skip
    p.add_argument("--case", action="append", metavar="PREFIX",
                   help="only the cases whose name starts with PREFIX (e.g. expand_to_fused/; repeatable or comma-separated)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    p.add_argument("--plot", metavar="DIR", help="write the PNG charts into DIR")
    p.add_argument("--from-json", metavar="FILE", help="a saved run to tabulate and plot, instead of running")
    p.add_argument("--list", action="store_true", help="list the benchmark families and exit")


def run(args: argparse.Namespace) -> int:
    only = _names(args.family)
    prefixes = tuple(_names(args.case))
    if args.from_json:
        with open(args.from_json) as f:
            data: dict[str, Any] = json.load(f)
        if only:
            data["results"] = [r for r in data["results"] if r["family"] in only]
            data["overhead"] = data.get("overhead") if "overhead" in only else []
        data["results"] = [r for r in data["results"] if r["case"].startswith(prefixes or "")]
    else:
        bench_run = benchmarks_run_module()
        if args.list:
            print("\n".join([*bench_run.families(), "overhead"]))
            return 0
        known = set(bench_run.families()) | {"overhead"}
        if only - known:
            print(f"bench: unknown families {sorted(only - known)}; known: {sorted(known)}", file=sys.stderr)
            return 2
        import jax_tilek

        if not jax_tilek.kernels_available():
            print("bench: the benchmarks time the kernels, which need a Hopper/Blackwell GPU (see python -m jax_tilek doctor); "
                  "to tabulate or plot a saved run use --from-json FILE", file=sys.stderr)  # fmt: skip
            return 2
        device, results, chains = bench_run.collect(only, prefixes)
        data = {"device": device, "results": results, "overhead": chains}
        if args.json:
            bench_run.save(args.json, device, results, chains)
    print(bench_report(data.get("device", "?"), data["results"], data.get("overhead") or []))
    if args.plot:
        from jax_tilek._cli.plots import plot_all

        written, skipped = plot_all(data, args.plot)
        for path in written:
            print(f"wrote {path}")
        for note in skipped:
            print(f"no plot {note}")
    return 0
