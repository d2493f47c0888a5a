"""PNG charts of a benchmark run (``benchmarks.run --json`` / ``bench --json`` output), with matplotlib.

- ``bandwidth.png``: each memory-bound kernel's bandwidth (fewest bytes it must move / time) as a
  fraction of the run's measured device copy -- a roofline for memory-bound ops: the copy is the roof,
  a bar reaching the dashed line is as fast as moving its bytes can be.
- ``speedup.png``: each case's speed-up over the same op in plain JAX under ``jax.jit`` (log scale).
- ``overhead.png``: the launch-overhead chain (100 tiny calls in one jit), microseconds per call for
  the kernel and for XLA, with XLA command buffers on and off (the ranges over processes as error bars).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

COMPUTE_BOUND_FAMILIES = ("gemm",)  # families whose roof is the tensor cores, not the memory


def _label(r: Mapping[str, Any]) -> str:
    """A row's label: the case name (without ``bench_``), its shape and dtype where the name lacks them."""
    case = str(r["case"]).removeprefix("bench_")
    extra = [str(r[k]) for k in ("shape", "dtype") if r.get(k) and str(r[k]) not in case]
    return " ".join([case, *extra])


def _memory_bound(r: Mapping[str, Any]) -> bool:
    return not any(r["family"] == f or r["family"].startswith(f + "_") for f in COMPUTE_BOUND_FAMILIES)


def _ordered(results: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """Results with ``key``, grouped by family (families in first-seen order), best first within a family."""
    families: dict[str, list] = {}
    for r in results:
        if r.get(key) is not None:
            families.setdefault(r["family"], []).append(r)
    return [r for rs in families.values() for r in sorted(rs, key=lambda r: -r[key])]


def _family_colors(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    return {f: cmap(i % 10) for i, f in enumerate(families)}


def _bars(rows: Sequence[Mapping[str, Any]], title: str, notes: Sequence[str], notes_title: str):
    """A horizontal bar chart's frame: one row per result (labels left, ``notes`` right), first on top."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 2.2 + 0.24 * len(rows)), layout="constrained")
    fig.suptitle(title, fontsize=11)
    positions = range(len(rows))
    ax.set_yticks(positions, [_label(r) for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.4, -0.6)  # first row on top
    right = ax.twinx()  # the numbers of each row, as tick labels on the right
    right.set_ylim(ax.get_ylim())
    right.set_yticks(positions, notes, fontsize=7.5, family="monospace")
    right.tick_params(length=0)
    right.set_ylabel(notes_title)
    colors = _family_colors(rows)
    for label, family in zip(ax.get_yticklabels(), (r["family"] for r in rows)):
        label.set_color(colors[family])
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylabel("benchmark case (label colour: family)")
    return fig, ax, colors


def _family_legend(fig, colors: Mapping[str, Any], extra: Sequence[Any] = ()) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=f) for f, c in colors.items()] + list(extra)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)


def plot_bandwidth(data: Mapping[str, Any], path: str) -> str | None:
    """Bandwidth as a fraction of the measured copy, per memory-bound case; None when there is none."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = _ordered([r for r in data["results"] if _memory_bound(r)], "frac_of_copy")
    if not rows:
        return None
    copy = sorted(r["copy_gbps"] for r in rows if r.get("copy_gbps"))
    copy_text = f"{copy[len(copy) // 2]:.0f} GB/s" if copy else "?"
    values = [100 * r["frac_of_copy"] for r in rows]
    notes = [f"{v:4.0f}% {r['gbps']:5.0f} GB/s {r['time_us']:6.0f} us" for v, r in zip(values, rows)]
    fig, ax, colors = _bars(rows, f"{data.get('device', '?')}: memory-bound kernels, bandwidth as % of a device copy", notes,
                             "% of copy, bandwidth, kernel time")
    top = max(110.0, max(values) + 5)
    ax.axvspan(90, top, color="tab:green", alpha=0.10, lw=0)
    ax.barh(range(len(rows)), values, color=[colors[r["family"]] for r in rows], height=0.7)
    ax.axvline(100, color="black", ls="--", lw=1.3)
    ax.set_xlim(0, top)
    ax.set_xlabel("bandwidth (fewest bytes the op must move / time), % of the measured device-to-device copy")
    _family_legend(fig, colors, [Line2D([], [], color="black", ls="--", label=f"copy = 100% ({copy_text})"),
                                 Patch(color="tab:green", alpha=0.25, label="within 10% of the copy")])  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedup(data: Mapping[str, Any], path: str) -> str | None:
    """Speed-up over plain JAX per case (log scale); None when no case has a plain-JAX time."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows = _ordered(data["results"], "speedup_vs_xla")
    if not rows:
        return None
    values = [r["speedup_vs_xla"] for r in rows]
    notes = [f"{v:5.2f}x {r['time_us']:6.0f} vs {r['xla_time_us']:6.0f} us" for v, r in zip(values, rows)]
    fig, ax, colors = _bars(rows, f"{data.get('device', '?')}: speed-up of each kernel over the same op in plain JAX (jax.jit)", notes,
                             "speed-up, kernel vs plain-JAX time")
    ax.barh(range(len(rows)), values, color=[colors[r["family"]] for r in rows], height=0.7)
    ax.set_xscale("log")
    low, high = min([*values, 1.0]) / 1.3, max([*values, 1.0]) * 1.3
    ax.set_xlim(low, high)
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32) if low <= t <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.axvline(1, color="black", ls="--", lw=1.3)
    ax.set_xlabel("speed-up = plain-JAX time / kernel time (log scale; left of the dashed line the kernel is slower)")
    _family_legend(fig, colors, [Line2D([], [], color="black", ls="--", label="plain JAX = 1x")])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overhead(data: Mapping[str, Any], path: str) -> str | None:
    """The launch-overhead chain, per command-buffer setting; None when the run did not measure it."""
    import matplotlib.pyplot as plt
    import numpy as np

    chains = list(data.get("overhead") or [])
    if not chains:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    x = np.arange(len(chains))
    width = 0.38
    for offset, (key, sample, label, color) in enumerate((
        ("kernel_us_per_call", "kernel", "tilek_launch (TileLang kernel)", "tab:blue"),
        ("xla_us_per_call", "xla", "XLA op (optimization_barrier between)", "tab:gray"),
    )):  # fmt: skip
        values = [c[key] for c in chains]
        spread = [[s[sample] for s in c.get("samples", [])] or [c[key]] for c in chains]
        errors = np.array([[v - min(s) for v, s in zip(values, spread)], [max(s) - v for v, s in zip(values, spread)]])
        bars = ax.bar(x + (offset - 0.5) * width, values, width, yerr=errors, capsize=4, label=label, color=color)
        ax.bar_label(bars, [f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set_xticks(x, [f"{c['case']}\ncommand buffers {c['command_buffers']}\nratio {c['ratio']:.2f} ({c.get('ratio_range', '')})" for c in chains], fontsize=8)
    ax.set_ylabel("microseconds per call (median over processes; bars: range)")
    ax.set_xlabel("chain of tiny calls in one jit, XLA command buffers (CUDA graphs) on / off")
    ax.set_title(f"{data.get('device', '?')}: launch overhead per call, kernel vs XLA", fontsize=11, loc="left")
    ax.set_ylim(0, max(max(c["kernel_us_per_call"], c["xla_us_per_call"]) for c in chains) * 1.35)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(data: Mapping[str, Any], directory: str) -> tuple[list[str], list[str]]:
    """Writes every chart the data allows into ``directory``; returns (paths written, charts skipped with why)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'jax_tilek[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    os.makedirs(directory, exist_ok=True)
    written, skipped = [], []
    for name, plot, why in (
        ("bandwidth.png", plot_bandwidth, "no memory-bound case with a bandwidth"),
        ("speedup.png", plot_speedup, "no case with a plain-JAX time"),
        ("overhead.png", plot_overhead, "the run has no launch-overhead chain (family 'overhead' not run)"),
    ):  # fmt: skip
        path = plot(data, os.path.join(directory, name))
        (written.append(path) if path else skipped.append(f"{name}: {why}"))
    return written, skipped
