"""curvopt: cheap, drop-in second-order optimization for PyTorch."""

import os as _os

__version__ = "0.1.0"

# The top-level folder ``kernels/`` ships as the subpackage ``curvopt.kernels`` (pyproject maps it).
# Run straight from a source tree (``PYTHONPATH=.``, no install, e.g. on a GPU machine without
# registry access), that mapping is absent: let ``curvopt.kernels`` resolve to the source folder.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)
