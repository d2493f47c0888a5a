"""Runs every benchmark family and prints a short table; ``--json`` writes all numbers.

    python -m benchmarks.run [--json out.json] [--only transpose,overhead] [--case expand_to_fused/]
    python -m benchmarks.run --precompile sm_90a   # build machine: fill the kernel cache only
    python -m jax_tilek bench [--family ...] [--json out.json] [--plot DIR]   # the same, with plots

A family is a module ``benchmarks/bench_<family>.py`` with a list ``CASES`` of harness cases (and
optionally ``VARIANTS``, run as family ``<family>_variants``); ``overhead`` is the launch-overhead chain.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil

import jax

import benchmarks
from benchmarks import harness, overhead
from jax_tilek._cli import report


def families() -> dict[str, list]:
    found = {}
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda i: i.name):
        if info.name.startswith("bench_"):
            module = importlib.import_module(f"benchmarks.{info.name}")
            family = info.name.removeprefix("bench_")
            found[family] = list(module.CASES)
            if getattr(module, "VARIANTS", None):
                found[family + "_variants"] = list(module.VARIANTS)
    return found


def chosen(only: set[str], prefixes: tuple[str, ...] = ()) -> list:
    """The cases of the families in ``only`` (all when empty) whose names start with one of ``prefixes`` (any when empty)."""
    return [c for family, cs in families().items() if not only or family in only for c in cs if c.name.startswith(prefixes or "")]


def collect(only: set[str], prefixes: tuple[str, ...] = ()) -> tuple[str, list[dict], list[dict]]:
    """Runs the chosen cases (:func:`chosen`) and the overhead chain (when chosen): (device, results, chains)."""
    cases = chosen(only, prefixes)
    results = harness.run(cases)
    chains = overhead.measure() if not only or "overhead" in only else []
    return str(jax.devices()[0].device_kind), results, chains


def save(path: str, device: str, results: list[dict], chains: list[dict]) -> None:
    """Writes a run as JSON (what ``benchmarks.compare`` and ``python -m jax_tilek bench --from-json`` read)."""
    with open(path, "w") as f:
        json.dump({"device": device, "results": results, "overhead": chains}, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--only", default="")
    parser.add_argument("--case", default="", help="comma-separated case name prefixes (default: every case)")
    parser.add_argument("--precompile", metavar="ARCH")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    prefixes = tuple(filter(None, args.case.split(",")))
    if args.precompile:
        harness.run(chosen(only, prefixes), precompile_arch=args.precompile)
        if not only or "overhead" in only:
            overhead.precompile(args.precompile)
        return
    device, results, chains = collect(only, prefixes)
    if args.json:
        save(args.json, device, results, chains)
    print()
    print(report.bench_report(device, results, chains))


if __name__ == "__main__":
    main()
