"""Text tables (shared with ``benchmarks/``) and the column sets of a benchmark report."""

from __future__ import annotations

from collections.abc import Sequence

# (header, key, format) of the benchmark results and of the launch-overhead chains.
RESULT_COLUMNS = (
    ("family", "family", "s"), ("case", "case", "s"), ("shape", "shape", "s"), ("dtype", "dtype", "s"),
    ("us", "time_us", ".1f"), ("GB/s", "gbps", ".0f"), ("copy GB/s", "copy_gbps", ".0f"),
    ("of copy", "frac_of_copy", ".1%"), ("xla us", "xla_time_us", ".1f"), ("vs xla", "speedup_vs_xla", ".2f"),
)  # fmt: skip
OVERHEAD_COLUMNS = (
    ("chain", "case", "s"), ("cmd buffers", "command_buffers", "s"),
    ("kernel us/call", "kernel_us_per_call", ".2f"), ("xla us/call", "xla_us_per_call", ".2f"), ("ratio", "ratio", ".3f"),
    ("ratio range", "ratio_range", "s"),
)  # fmt: skip


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (header, key, format); a missing key prints ``-``."""
    cells = [[header for header, _, _ in columns]]
    for r in rows:
        cells.append([format(r[key], fmt) if r.get(key) is not None else "-" for _, key, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells)


def bench_report(device: str, results: Sequence[dict], chains: Sequence[dict]) -> str:
    """The benchmark tables: every case, then the launch-overhead chains (when measured)."""
    parts = [device, table([r for r in results if "error" not in r], RESULT_COLUMNS)]
    parts += [f"not measured: {r['family']}/{r['case']}: {r['error']}" for r in results if "error" in r]
    if chains:
        parts.append(table(chains, OVERHEAD_COLUMNS))
    return "\n".join(parts)
