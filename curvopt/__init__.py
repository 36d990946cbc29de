"""curvopt: cheap, drop-in second-order optimization for PyTorch."""

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

__version__ = "0.1.0"


class _SourceKernelsFinder(_abc.MetaPathFinder):
    """Finds ``curvopt.kernels`` in the top-level source folder ``kernels/``.

    An install maps that folder to the subpackage (pyproject's ``package-dir``). Run straight from a
    source tree (``PYTHONPATH=.``, no install, e.g. on a GPU machine without registry access), the
    mapping is absent; this finder supplies it, for that one name only.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):  # noqa: D102
        if name != "curvopt.kernels":
            return None
        init = _os.path.join(self.folder, "__init__.py")
        return _util.spec_from_file_location(name, init, submodule_search_locations=[self.folder])


_source_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_kernels_src = _os.path.join(_source_root, "kernels")
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_kernels_src, "__init__.py")
):
    _sys.meta_path.insert(0, _SourceKernelsFinder(_kernels_src))


def __getattr__(name: str):
    """Load a submodule on first attribute access (``curvopt.kernels``, ``curvopt.optim``, ...).

    So ``import curvopt`` (and ``curvopt --help``) stays free of torch, and no list of
    subpackages has to be kept in step with the tree.
    """
    if not name.startswith("_"):
        import importlib

        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":  # the submodule exists but lacks a dependency
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
