"""Old import paths kept alive for one release, each with one ``DeprecationWarning``.

A module that moved leaves a two-line shim at its old path that calls :func:`alias_module`: the
old name then *is* the new module in ``sys.modules`` (same object, so every public and private
name, ``isinstance`` check and monkeypatch is shared), and the warning is emitted once, when the
old path is first imported. A package attribute that moved goes through :func:`moved_name` from
the package's ``__getattr__``.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     value = moved_name("old.pkg.pi", "math", "pi")
    >>> round(value, 2), caught[0].category.__name__
    (3.14, 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Any

#: the release in which the old paths disappear
REMOVED_IN = "0.2.0"


def _message(old: str, new: str) -> str:
    return f"{old} is deprecated and will be removed in curvopt {REMOVED_IN}; import {new} instead"


def alias_module(old: str, new: str) -> ModuleType:
    """Make the module being imported under ``old`` an alias of ``new``, with a warning.

    Call it from the shim module at the old path as ``alias_module(__name__, "new.path")``.

    Args:
        old: The deprecated dotted module path (the shim's ``__name__``).
        new: The dotted path of the module that replaced it.

    Returns:
        The new module, now also ``sys.modules[old]``.

    Raises:
        TypeError: If either path is not a string.
    """
    if not isinstance(old, str) or not isinstance(new, str):
        raise TypeError(f"module paths must be strings, got {old!r} and {new!r}")
    module = importlib.import_module(new)
    # stacklevel 3: past this function and the shim, to the code that imported the old path
    # (the import machinery's own frames are skipped by the warnings module)
    warnings.warn(_message(old, new), DeprecationWarning, stacklevel=3)
    sys.modules[old] = module
    return module


def moved_name(old: str, new_module: str, name: str) -> Any:
    """Return ``name`` from ``new_module``, warning that it was reached through ``old``.

    Args:
        old: The deprecated dotted path of the attribute (``"curvopt.rl.CAPOLoss"``).
        new_module: The module that now defines it (``"curvopt.capo"``).
        name: The attribute's name in ``new_module``.

    Returns:
        The attribute (the same object as ``getattr(import_module(new_module), name)``).
    """
    value = getattr(importlib.import_module(new_module), name)
    warnings.warn(_message(old, f"{new_module}.{name}"), DeprecationWarning, stacklevel=3)
    return value


__all__ = ["REMOVED_IN", "alias_module", "moved_name"]
