"""Runs every benchmark family and prints a short table; ``--json`` writes all numbers.

    python -m benchmarks.run [--json out.json] [--only transpose,overhead]
    python -m benchmarks.run --precompile sm_90a   # build machine: fill the kernel cache only

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--only", default="")
    parser.add_argument("--precompile", metavar="ARCH")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    cases = [c for family, cs in families().items() if not only or family in only for c in cs]
    if args.precompile:
        harness.run(cases, precompile_arch=args.precompile)
        if not only or "overhead" in only:
            overhead.precompile(args.precompile)
        return
    results = harness.run(cases)
    chains = overhead.measure() if not only or "overhead" in only else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "results": results, "overhead": chains}, f, indent=1)
    print(f"\n{jax.devices()[0].device_kind}")
    print(harness.table(results, [
        ("family", "family", "s"), ("case", "case", "s"), ("shape", "shape", "s"), ("dtype", "dtype", "s"),
        ("us", "time_us", ".1f"), ("GB/s", "gbps", ".0f"), ("copy GB/s", "copy_gbps", ".0f"),
        ("of copy", "frac_of_copy", ".1%"), ("xla us", "xla_time_us", ".1f"), ("vs xla", "speedup_vs_xla", ".2f"),
    ]))  # fmt: skip
    if chains:
        print(harness.table(chains, [
            ("chain", "case", "s"), ("cmd buffers", "command_buffers", "s"),
            ("kernel us/call", "kernel_us_per_call", ".2f"), ("xla us/call", "xla_us_per_call", ".2f"), ("ratio", "ratio", ".3f"),
            ("ratio range", "ratio_range", "s"),
        ]))  # fmt: skip


if __name__ == "__main__":
    main()
