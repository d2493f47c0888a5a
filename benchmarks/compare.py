"""Compares two ``benchmarks.run --json`` files by their ratios (fraction of a copy's bandwidth, speed
against plain JAX), which carry across runs on the same kind of GPU better than absolute times:

    python -m benchmarks.compare new.json baseline.json

Cases match by (family, case name), else by (family, shape, dtype) where that is unique in both files
(case names changed when the benchmarks moved onto the ops' named calls)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter

from benchmarks import harness


def _key(r: dict) -> tuple:
    return r["family"], r["shape"], r["dtype"]


def match(new: list[dict], old: list[dict]) -> list[tuple[dict, dict]]:
    """(new, old) result pairs of the same benchmark."""
    by_name = {(r["family"], r["case"]): r for r in old}
    unique_new, unique_old = Counter(map(_key, new)), Counter(map(_key, old))
    by_shape = {_key(r): r for r in old if unique_old[_key(r)] == 1}
    pairs = []
    for r in new:
        found = by_name.get((r["family"], r["case"]))
        if found is None and unique_new[_key(r)] == 1:
            found = by_shape.get(_key(r))
        if found is not None:
            pairs.append((r, found))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("new")
    parser.add_argument("baseline")
    args = parser.parse_args()
    new, old = (json.load(open(p)) for p in (args.new, args.baseline))
    measured = lambda data: [r for r in data["results"] if "error" not in r]  # noqa: E731
    pairs = match(measured(new), measured(old))
    rows = [
        {
            "family": n["family"], "case": n["case"], "shape": n["shape"], "dtype": n["dtype"],
            "copy_new": n["frac_of_copy"], "copy_old": o["frac_of_copy"], "xla_new": n["speedup_vs_xla"], "xla_old": o["speedup_vs_xla"],
            "change": (n["speedup_vs_xla"] / o["speedup_vs_xla"]) - 1,
        }
        for n, o in pairs
    ]  # fmt: skip
    print(f"{new['device']} vs {old['device']}: {len(pairs)} of {len(new['results'])} cases matched")
    print(harness.table(rows, [
        ("family", "family", "s"), ("case", "case", "s"), ("shape", "shape", "s"), ("dtype", "dtype", "s"),
        ("of copy", "copy_new", ".1%"), ("was", "copy_old", ".1%"), ("vs xla", "xla_new", ".2f"), ("was", "xla_old", ".2f"),
        ("change", "change", "+.1%"),
    ]))  # fmt: skip
    if rows:
        changes = [r["change"] for r in rows]
        print(f"speed vs plain JAX, new/old - 1: median {statistics.median(changes):+.1%}, min {min(changes):+.1%}, max {max(changes):+.1%}")


if __name__ == "__main__":
    main()
