"""The ``curvopt`` console entry point.

Each subcommand lives in its own module, imported only when that subcommand runs, and provides
``add_arguments(parser)`` and ``run(args) -> int``. ``curvopt --help`` and ``curvopt --version``
import neither torch nor any subcommand, so they answer at once.

A subcommand whose optional dependencies are missing (a plain ``pip install curvopt`` has only
torch, numpy and scipy) exits with status 2 and one line naming the extra to install, e.g.
``pip install "curvopt[bench]"``; so does a run that needs another extra only for some options
(``curvopt bench --problem tinylm`` needs ``[lm]``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import dataclass

from . import __version__


@dataclass(frozen=True)
class Subcommand:
    """A ``curvopt`` subcommand: where it lives and what it needs.

    Attributes:
        module: the module with ``add_arguments`` and ``run``.
        help: the one-line help shown by ``curvopt --help``.
        extra: the optional-dependency group (``pip install "curvopt[extra]"``) it needs.
        needs: the import names of that extra which the subcommand uses.
    """

    module: str
    help: str
    extra: str
    needs: tuple[str, ...]


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand(
        "curvopt.demo", "run a short demonstration on built-in data", "bench", ("sklearn",)
    ),
    "bench": Subcommand(
        "curvopt.bench.cli",
        "compare curvature approximations on a built-in problem",
        "bench",
        ("sklearn", "rich", "matplotlib"),
    ),
    "prune": Subcommand(
        "curvopt.prune.cli",
        "prune a built-in model with M-FAC, magnitude or exact OBS",
        "bench",
        ("sklearn", "rich", "matplotlib"),
    ),
}

#: top-level import name of an optional dependency -> (distribution, extra that installs it)
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "bench"),
    "rich": ("rich", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "transformers": ("transformers", "lm"),
    "gymnasium": ("gymnasium", "rl"),
    "triton": ("triton", "gpu"),
    "trl": ("trl", "trl"),
    "datasets": ("datasets", "trl"),
}


def missing_extra_message(command: str, modules: list[str], extra: str) -> str:
    """The one line printed when ``command`` lacks the optional ``modules`` of ``extra``."""
    names = ", ".join(OPTIONAL_MODULES.get(m, (m, extra))[0] for m in modules)
    fix = f'pip install "curvopt[{extra}]"'
    return f"curvopt {command}: needs {names} (not installed); install with: {fix}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if not _importable(m)]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--help``, ``--version`` and the list of subcommands.

    The subcommands' own options are added only when one of them runs (see :func:`main`).
    """
    parser = argparse.ArgumentParser(
        prog="curvopt",
        description="Second-order optimization for PyTorch: curvature operators, M-FAC, pruning.",
        epilog=(
            'Each command has its own --help, e.g. "curvopt bench --help". The commands need the '
            'bench extra: pip install "curvopt[bench]".'
        ),
    )
    parser.add_argument("--version", action="version", version=f"curvopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub.add_parser(
            name, help=f"{command.help} [needs curvopt[{command.extra}]]", add_help=False
        )
    return parser


def build_subcommand_parser(name: str, module) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` whose module is ``module``."""
    from .cli_types import DefaultsHelpFormatter

    command = SUBCOMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"curvopt {name}", description=command.help, formatter_class=DefaultsHelpFormatter
    )
    module.add_arguments(parser)
    return parser


def _run_subcommand(name: str, argv: list[str]) -> int:
    command = SUBCOMMANDS[name]
    missing = _missing(command.needs)
    if missing:
        print(missing_extra_message(name, missing, command.extra), file=sys.stderr)
        return 2
    module = importlib.import_module(command.module)
    args = build_subcommand_parser(name, module).parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except ImportError as err:  # ModuleNotFoundError, or a library's own "needs X" ImportError
        top = (err.name or "").split(".")[0]
        if top not in OPTIONAL_MODULES:
            raise
        print(missing_extra_message(name, [top], OPTIONAL_MODULES[top][1]), file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _run_subcommand(argv[0], argv[1:])
    parser = build_parser()
    parser.parse_args(argv)  # --help, --version and unknown commands exit here
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
