"""Argument types shared by the ``curvopt`` subcommands: bad values become argparse errors.

An invalid value (``--num-grads 0``, ``--damp nan``) makes argparse print the usage line and a
message naming the option, and exit with status 2, instead of failing later with a traceback.
"""

from __future__ import annotations

import argparse
import math
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
