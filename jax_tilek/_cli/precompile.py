"""``python -m jax_tilek precompile``: fill the kernel cache for a GPU architecture, in parallel.

The work is split into units -- one named case (``ARG_SPECS``) of a family's public function, with its
vmapped and differentiated programs (:func:`jax_tilek.testing.case_programs`), or one ``--program`` --
and the units run in worker processes (``--jobs``, default: one per CPU), because TileLang's lowering
and above all nvcc are the slow part and run in the lowering process. Units are interleaved across
functions, so that workers seldom wait on the compile lock of a kernel another worker is building (the
cache's per-entry lock makes that safe anyway). A progress bar (tqdm) counts units; the summary counts
kernel configurations (cache keys): compiled here, found in the cache, and the units that failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Iterable, Sequence

from jax_tilek import compiler, config


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: a case of a family's function, or (index of) a program named on the command line."""

    label: str
    family: str = ""
    function: str = ""
    case: str = ""
    program: str = ""
    args: tuple[str, ...] | None = None
    index: int = 0


@dataclasses.dataclass
class UnitResult:
    """What a unit lowered: the cache keys it used, those it compiled, its programs, time, error."""

    label: str
    keys: list[str]
    compiled: list[str]
    programs: int
    seconds: float
    error: str | None = None


@dataclasses.dataclass
class Summary:
    """The outcome of a precompile run."""

    arch: str
    jobs: int
    results: list[UnitResult]
    seconds: float

    @property
    def keys(self) -> set[str]:
        return {k for r in self.results for k in r.keys}

    @property
    def compiled(self) -> set[str]:
        return {k for r in self.results for k in r.compiled}

    @property
    def failed(self) -> list[UnitResult]:
        return [r for r in self.results if r.error is not None]

    def text(self) -> str:
        """A few lines: units, programs, kernel configurations compiled / cached, failures, time."""
        programs = sum(r.programs for r in self.results)
        compiled = len(self.compiled)
        lines = [
            f"precompile {self.arch}: {len(self.results)} units ({programs} programs lowered) in "
            f"{self.seconds:.1f}s with {self.jobs} worker{'s' if self.jobs != 1 else ''}",
            f"  kernel configurations: {len(self.keys | self.compiled)} ({compiled} compiled, "
            f"{len(self.keys - self.compiled)} from the cache {config.cache_dir()})",
            f"  failed: {len(self.failed)}",
        ]
        for r in self.failed:
            lines.append(f"    {r.label}: {r.error.splitlines()[0] if r.error else ''}")
        return "\n".join(lines)


def family_module(name: str) -> str:
    """A family named on the command line: ``quant`` or ``jax_tilek.quant`` (or a module of one's own)."""
    from jax_tilek.testing import FAMILIES

    return f"jax_tilek.{name}" if "." not in name and f"jax_tilek.{name}" in FAMILIES else name


def case_units(families: Iterable[str]) -> list[Unit]:
    """One unit per named case of every public function of ``families``, interleaved across functions."""
    from jax_tilek.testing import public_cases

    by_function: dict[str, list[Unit]] = {}
    for family in families:
        for qualified, _, case in public_cases([family]):
            unit = Unit(label=f"{qualified}/{case.name}", family=family, function=qualified, case=case.name)
            by_function.setdefault(qualified, []).append(unit)
    queues = list(by_function.values())
    units = []
    while queues:  # round robin: neighbours in the queue are different functions (different kernels)
        units += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return units


def program_units(spec: str, args: Sequence[str] | None) -> list[Unit]:
    """The units of ``--program spec [--args ...]`` (a factory may give several programs)."""
    from jax_tilek._cli import programs

    count = len(programs.programs(spec, args))
    frozen = tuple(args) if args is not None else None
    return [Unit(label=spec if count == 1 else f"{spec}[{i}]", program=spec, args=frozen, index=i) for i in range(count)]


def _unit_programs(unit: Unit) -> list:
    from jax_tilek import testing

    if unit.program:
        from jax_tilek._cli import programs

        return [programs.programs(unit.program, unit.args)[unit.index]]
    for qualified, fn, case in testing.public_cases([unit.family]):
        if qualified == unit.function and case.name == unit.case:
            return testing.case_programs(fn, case)
    raise LookupError(f"no case {unit.case!r} of {unit.function}")


def run_unit(unit: Unit, arch: str) -> UnitResult:
    """Lowers the unit's programs for ``arch`` (compiling what the cache lacks); never raises."""
    import jax_tilek
    from jax_tilek import cache

    start = time.perf_counter()
    keys: list[str] = []
    count = 0
    error = None
    with cache.record_events() as events:
        try:
            for program, args in _unit_programs(unit):
                keys += [key for *_, key in jax_tilek.precompile(program, *args, arch=arch)]
                count += 1
        except Exception as e:  # reported in the summary; the other units go on
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
    compiled = sorted({e.key for e in events if e.kind in ("compiled", "rebuilt")})
    return UnitResult(unit.label, sorted(set(keys)), compiled, count, time.perf_counter() - start, error)


def _init_worker(cache_dir: str, verbosity: int) -> None:
    """A worker lowers for "cuda" without using any GPU, into the parent's cache directory."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    os.environ["JAX_TILEK_CACHE_DIR"] = cache_dir
    from jax_tilek._cli import configure_logging

    configure_logging(verbosity)


def precompile_units(units: Sequence[Unit], arch: str, *, jobs: int, progress: bool = True, verbosity: int = 0) -> Summary:
    """Runs ``units`` in ``jobs`` worker processes (in this process for one job or one unit)."""
    from tqdm import tqdm

    start = time.perf_counter()
    results: list[UnitResult] = []
    jobs = max(1, min(jobs, len(units)))
    bar = tqdm(total=len(units), desc=f"precompile {arch}", unit="case", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0)  # fmt: skip

    def done(result: UnitResult) -> None:
        results.append(result)
        if result.error is not None:
            bar.write(f"FAILED {result.label}: {result.error.splitlines()[0]}", file=sys.stderr)
        compiled = {k for r in results for k in r.compiled}
        cached = {k for r in results for k in r.keys} - compiled
        bar.set_postfix(compiled=len(compiled), cached=len(cached), failed=sum(r.error is not None for r in results), refresh=False)
        bar.update(1)

    try:
        if jobs == 1:
            for unit in units:
                done(run_unit(unit, arch))
        else:
            context = multiprocessing.get_context("spawn")  # JAX and TileLang are not fork-safe
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                                        initargs=(config.cache_dir(), verbosity)) as pool:  # fmt: skip
                futures = {pool.submit(run_unit, unit, arch): unit for unit in units}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        try:
                            done(future.result())
                        except Exception as e:  # a worker died (killed, out of memory)
                            done(UnitResult(futures[future].label, [], [], 0, 0.0, f"{type(e).__name__}: {e}"))
                except KeyboardInterrupt:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    order = {u.label: i for i, u in enumerate(units)}
    results.sort(key=lambda r: order.get(r.label, len(order)))
    return Summary(arch, jobs, results, time.perf_counter() - start)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "precompile",
        help="compile every kernel configuration the op cases (or a program) need, in parallel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", default=os.environ.get("JAX_TILEK_ARCH") or "sm_90a", choices=compiler.SUPPORTED_ARCHS)
    p.add_argument("--family", action="append", metavar="FAMILY",
                   help="a kernel family (quant or jax_tilek.quant; repeatable); default: all, unless --program is given")  # fmt: skip
    p.add_argument("--program", metavar="MODULE:FUNCTION", help="a program to precompile (see --args)")
    p.add_argument("--args", nargs="*", metavar="ARG",
                   help="the program's arguments: dtype[shape] arrays (bf16[8,1024,2048]) or Python literals; "
                        "without --args, MODULE:FUNCTION() returns (fn, args) or a list of them")  # fmt: skip
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def select_units(args: argparse.Namespace) -> list[Unit]:
    """The units ``--family``/``--program`` name (all families when neither is given)."""
    from jax_tilek.testing import FAMILIES

    units: list[Unit] = []
    if args.program:
        units += program_units(args.program, args.args)
    elif args.args is not None:
        raise SystemExit("--args needs --program")
    if args.family or not args.program:
        units += case_units([family_module(f) for f in (args.family or FAMILIES)])
    return units


def run(args: argparse.Namespace) -> int:
    units = select_units(args)
    if config.offline():
        print("offline (no TileLang, or JAX_TILEK_OFFLINE=1): kernels missing from the cache fail", file=sys.stderr)
    summary = precompile_units(units, args.arch, jobs=args.jobs, progress=not args.no_progress, verbosity=args.verbose)
    print(summary.text())
    return 1 if summary.failed else 0
