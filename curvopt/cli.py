"""The ``curvopt`` console entry point.

Each subcommand lives in its own module, imported only when it runs, and provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .cli_types import DefaultsHelpFormatter

#: subcommand name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("curvopt.demo", "run a short demonstration on built-in data"),
    "bench": ("curvopt.bench.cli", "compare curvature approximations on a built-in problem"),
    "prune": ("curvopt.prune.cli", "prune a built-in model with M-FAC, magnitude or exact OBS"),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-parser per available subcommand."""
    parser = argparse.ArgumentParser(
        prog="curvopt",
        description="Second-order optimization for PyTorch: curvature operators, M-FAC, pruning.",
    )
    parser.add_argument("--version", action="version", version=f"curvopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # subcommand not part of this build
            raise
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
