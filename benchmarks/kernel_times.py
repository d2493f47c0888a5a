"""Where a benchmark case's device time goes: every kernel one call launches, timed by Nsight Compute.

    python -m benchmarks.kernel_times FAMILY CASE [--side kernel|xla] [--top N] [--csv PATH]
    python -m benchmarks.kernel_times FAMILY CASE --details "-k regex:NAME -c 1"

runs ``ncu`` (``--clock-control none``, metric ``gpu__time_duration.sum``) over one call of the case's
jitted kernel side (or its plain-JAX side), after two warm-up calls outside the profiled range, with
XLA's command buffers off so that each kernel is its own launch; prints the kernels grouped by name,
the largest first, and their total. The same child runs once without ncu first, filling a JAX
compilation cache that the profiled run reads: compiling (and XLA's autotuning) under ncu's
interception took minutes for plain JAX's larger programs. ``FAMILY`` is a ``benchmarks.run`` family (``nnx_variants`` ...),
``CASE`` a case name or a prefix that names one case. ``--details ARGS`` prints ncu's full report
(``--set full``) of the kernels ``ARGS`` choose instead (ncu's own filter options).
"""

import argparse
import collections
import csv
import io
import os
import subprocess
import sys
import tempfile

METRIC = "gpu__time_duration.sum"


def _child(family: str, case_name: str, side: str) -> None:
    import ctypes

    import jax

    from benchmarks import run

    if os.environ.get("KERNEL_TIMES_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["KERNEL_TIMES_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    cases = [c for c in run.families()[family] if c.name == case_name or c.name.startswith(case_name)]
    if len(cases) != 1:
        sys.exit(f"kernel_times: {case_name!r} names {len(cases)} cases of {family}: {[c.name for c in cases]}")
    case = cases[0]
    inputs = jax.jit(case.make_inputs)(jax.random.key(0))
    fn = jax.jit(case.kernel if side == "kernel" else case.xla)
    for _ in range(2):
        jax.block_until_ready(fn(*inputs))
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    jax.block_until_ready(fn(*inputs))
    cuda.cuProfilerStop()
    print(f"kernel_times: profiled {family}/{case.name} ({side})", file=sys.stderr)


def kernel_table(ncu_csv: str) -> list[tuple[str, int, float]]:
    """``(kernel name, launches, total µs)`` per name from ncu's CSV, the largest total first."""
    rows = csv.DictReader(io.StringIO("\n".join(line for line in ncu_csv.splitlines() if line.startswith('"'))))
    total, count = collections.Counter(), collections.Counter()
    for row in rows:
        if row.get("Metric Name") != METRIC:
            continue
        value = float(row["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(row.get("Metric Unit", "ns"), 1e-3)
        name = row["Kernel Name"].split("(")[0][:90]
        total[name] += value * scale
        count[name] += 1
    return [(name, count[name], us) for name, us in total.most_common()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family")
    parser.add_argument("case")
    parser.add_argument("--side", choices=("kernel", "xla"), default="kernel")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--csv", help="also save ncu's raw CSV here")
    parser.add_argument("--details", metavar="NCU_ARGS", help="ncu's full report of the kernels these ncu options choose")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.family, args.case, args.side)
    child = [sys.executable, "-m", "benchmarks.kernel_times", args.family, args.case, "--side", args.side, "--child"]
    what = ["--set", "full", *args.details.split()] if args.details else ["--metrics", METRIC, "--csv", "--print-units", "base"]
    with tempfile.TemporaryDirectory(prefix="kernel_times_jax_cache_") as cache:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip(),
                   KERNEL_TIMES_JAX_CACHE=cache)  # fmt: skip
        warm = subprocess.run(child, env=env, capture_output=True, text=True)  # compiles into the cache, no ncu
        if warm.returncode:
            sys.exit(f"kernel_times: the unprofiled run exited {warm.returncode}\n{warm.stderr[-3000:]}")
        done = subprocess.run(["ncu", "--clock-control", "none", "--profile-from-start", "off", *what, *child], env=env, capture_output=True, text=True)
    if args.details:
        print(done.stdout[-60000:], done.stderr[-2000:] if done.returncode else "")
        sys.exit(done.returncode)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write(done.stdout)
    table = kernel_table(done.stdout)
    if done.returncode or not table:
        sys.exit(f"kernel_times: ncu exited {done.returncode} with {len(table)} kernels\n{done.stderr[-3000:]}")
    whole = sum(us for _, _, us in table)
    print(f"{args.family}/{args.case} ({args.side}): {sum(n for _, n, _ in table)} launches, {whole:.1f} µs of kernels")
    for name, n, us in table[: args.top]:
        print(f"{us:10.1f} µs {100 * us / whole:5.1f}%  x{n:<3d} {name}")


if __name__ == "__main__":
    main()
