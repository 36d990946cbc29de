"""Argument types and checks shared by the ``curvopt`` subcommands: bad values are usage errors.

An invalid value (``--num-grads 0``, ``--damp nan``, ``--seed 2**70``, an output path in a
missing folder) makes argparse print the usage line and a message naming the option, and exit
with status 2 before any work is done, instead of failing later with a traceback.
:class:`DefaultsHelpFormatter` makes ``--help`` show every default.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def _parse(text: str, convert: Callable[[str], T], ok: Callable[[T], bool], what: str) -> T:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """Parse an integer ``>= 1``."""
    return _parse(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """Parse an integer ``>= 0``."""
    return _parse(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """Parse a finite number ``> 0``."""
    return _parse(text, float, lambda v: v > 0 and math.isfinite(v), "a finite positive number")


def seed(text: str) -> int:
    """Parse a random seed: an integer in ``[0, 2**64)`` (what ``torch.manual_seed`` takes)."""
    return _parse(text, int, lambda v: 0 <= v < 2**64, "an integer seed in [0, 2**64)")


def fraction(text: str) -> float:
    """Parse a number in ``[0, 1)`` (a sparsity)."""
    return _parse(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help formatter that appends ``(default: X)`` to every option with a default.

    Options whose help already names the default, and options without one (``None``,
    ``False``), are left as they are.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or not action.option_strings
        ):
            return text
        value = action.default
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        return f"{text} (default: {value})".replace("%", "%%")


def check_output_file(
    parser: argparse.ArgumentParser, flag: str, path: pathlib.Path | None, suffix: str | None = None
) -> None:
    """Exit with a usage error now, not after the run, if ``path`` cannot be written.

    The path must not be a folder, its folder must exist, the file must open for writing (an
    existing file is not truncated, a new one is removed again), and the name must end in
    ``suffix`` when one is given.
    """
    if path is None:
        return
    if suffix is not None and path.suffix.lower() != suffix:
        parser.error(f"{flag} {path}: the file is a {suffix[1:].upper()}; use a {suffix} name")
    if path.is_dir():
        parser.error(f"{flag} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        parser.error(f"{flag} {path}: folder {folder} does not exist")
    existed = path.exists()
    try:  # a trial open answers for permissions, read-only file systems and odd names alike
        with open(path, "a"):
            pass
    except OSError as err:
        parser.error(f"{flag} {path}: cannot write there ({err.strerror})")
    if not existed:
        path.unlink()


def check_output_dir(parser: argparse.ArgumentParser, flag: str, path: pathlib.Path) -> None:
    """Create the folder ``path`` now (if missing), or exit with a usage error if that fails."""
    if path.exists() and not path.is_dir():
        parser.error(f"{flag} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"{flag} {path}: cannot create the folder ({err.strerror})")
    if not os.access(path, os.W_OK):
        parser.error(f"{flag} {path}: the folder is not writable")
