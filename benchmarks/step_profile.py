"""Device time by kernel in a JAX profiler trace: where a step's time goes, and what a variant adds.

    python -m benchmarks.step_profile TRACE_DIR [--baseline DIR] [--steps N] [--top 25]

``TRACE_DIR`` is what ``jax.profiler.trace`` wrote (``examples/train_moe.py --profile DIR`` traces three
training steps there). Kernel names are grouped with numeric suffixes dropped (XLA's ``loop_fusion_12``
and ``loop_fusion_7`` are one row), times are per step. With ``--baseline`` (the same job without the
variant, e.g. without ``--mhc``) each row also shows what the variant adds, and the rows are ordered by it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

GPU_PLANE, STREAM_LINE = "/device:GPU:", "Stream"


def kernel_times(trace_dir: str, plane: str = GPU_PLANE, line: str = STREAM_LINE) -> collections.Counter:
    """Nanoseconds per event name, summed over the lines starting with ``line`` of the first plane
    starting with ``plane``, in the newest ``*.xplane.pb`` under ``trace_dir``."""
    from jax.profiler import ProfileData

    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(found[-1])
    planes = [p for p in data.planes if p.name.startswith(plane)]
    if not planes:
        raise ValueError(f"{found[-1]} has no plane starting with {plane!r}: {[p.name for p in data.planes]}")
    times = collections.Counter()
    for trace_line in planes[0].lines:
        if trace_line.name.startswith(line):
            for event in trace_line.events:
                times[event.name] += event.duration_ns
    return times


def group(name: str) -> str:
    """``loop_fusion_12`` -> ``loop_fusion``, ``fusion.3`` -> ``fusion``; long (C++ template) names cut to 80 characters."""
    return re.sub(r"([._]\d+)+$", "", name)[:80]


def grouped(times: collections.Counter) -> collections.Counter:
    out = collections.Counter()
    for name, ns in times.items():
        out[group(name)] += ns
    return out


def table(trace: collections.Counter, baseline: collections.Counter | None, steps: int, top: int) -> list[str]:
    """Rows of microseconds per step: by name, the variant's total, and (with a baseline) the difference."""
    us = {k: v / steps / 1e3 for k, v in grouped(trace).items()}
    base = {k: v / steps / 1e3 for k, v in grouped(baseline).items()} if baseline is not None else None
    total = sum(us.values())
    if base is None:
        rows = [f"{'kernel':80s} {'us/step':>10s} {'share':>6s}"]
        for name, t in sorted(us.items(), key=lambda kv: -kv[1])[:top]:
            rows.append(f"{name:80s} {t:10.1f} {t / total:6.1%}")
        rows.append(f"{'total device time':80s} {total:10.1f}")
        return rows
    base_total = sum(base.values())
    rows = [f"{'kernel':80s} {'us/step':>10s} {'baseline':>10s} {'added':>10s}"]
    names = sorted(set(us) | set(base), key=lambda k: -abs(us.get(k, 0.0) - base.get(k, 0.0)))
    for name in names[:top]:
        a, b = us.get(name, 0.0), base.get(name, 0.0)
        rows.append(f"{name:80s} {a:10.1f} {b:10.1f} {a - b:+10.1f}")
    rows.append(f"{'total device time':80s} {total:10.1f} {base_total:10.1f} {total - base_total:+10.1f} ({total / base_total - 1:+.1%})")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--baseline", help="a trace of the same job without the variant")
    parser.add_argument("--steps", type=int, default=3, help="steps in each trace (times are per step)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--plane", default=GPU_PLANE, help=argparse.SUPPRESS)
    parser.add_argument("--line", default=STREAM_LINE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    trace = kernel_times(args.trace_dir, args.plane, args.line)
    baseline = kernel_times(args.baseline, args.plane, args.line) if args.baseline else None
    print("\n".join(table(trace, baseline, args.steps, args.top)))


if __name__ == "__main__":
    main()
