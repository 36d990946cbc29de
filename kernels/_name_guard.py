"""Keep the source folder ``kernels/`` from shadowing the PyPI distribution named ``kernels``.

The folder ships as the subpackage ``curvopt.kernels``. When the source root is on ``sys.path``,
Python also finds it as a top-level package ``kernels``, a name that Hugging Face's ``kernels``
distribution owns (transformers imports it). :func:`hand_over` runs in that case: it loads the
real top-level ``kernels`` from the rest of ``sys.path`` in place of this folder, or raises an
``ImportError`` that says to import ``curvopt.kernels``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _same_folder(entry: str, root: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), root)
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` by the package ``name`` found outside this source tree.

    Args:
        name: the name this folder was imported under (``"kernels"``).
        init_file: the ``__init__.py`` of this folder.

    Raises:
        ImportError: when no other package of that name is installed.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [entry for entry in sys.path if not _same_folder(entry, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"the folder {os.path.dirname(init_file)} is curvopt's kernels: import it as "
            f"'curvopt.kernels', not as {name!r} (no other package named {name!r} is installed)",
            name=name,
        )
    # This guard itself was loaded as ``<name>._name_guard``; it must not stay behind as a
    # submodule of the other package.
    sys.modules.pop(f"{name}._name_guard", None)
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sits in sys.modules under ``name`` once this module's
    # code has run, so the real package takes this folder's place for every later import.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
