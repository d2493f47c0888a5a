"""python -m jax_tilek: the user's toolbox (doctor, precompile, cache, bench, sanitize).

Each command is a module of this package with ``add_parser(subparsers)`` and ``run(args) -> int`` (the
exit status); modules are imported when their command runs, so ``doctor`` never imports matplotlib.
``-v`` shows jax_tilek's INFO log (which implementation each op took), ``-vv`` its DEBUG log (compile
and cache events with timings); by default only warnings are printed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS = {
    "doctor": "jax_tilek._cli.doctor",
    "precompile": "jax_tilek._cli.precompile",
    "cache": "jax_tilek._cli.cache_cmd",
    "bench": "jax_tilek._cli.bench",
    "sanitize": "jax_tilek._cli.sanitize",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each command module adds its own subparser)."""
    parser = argparse.ArgumentParser(prog="python -m jax_tilek", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: INFO log of jax_tilek, -vv: DEBUG")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(commands)
    return parser


def configure_logging(verbosity: int) -> None:
    """Sends the ``jax_tilek`` logger's records at the chosen level to stderr (warnings only by default)."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("jax_tilek")
    if verbosity > 0 and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the command; returns its exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
