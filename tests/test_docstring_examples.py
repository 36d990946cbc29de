"""Run every docstring example of the package as a doctest (curvlinops-style doctested examples).

Collected per module from the installed package (including ``curvopt.kernels``, which lives in the
top-level ``kernels/`` folder), so test folders' conftest modules are never imported as doctests.
"""

import doctest
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import curvopt
import curvopt.kernels


def _modules():
    names = ["curvopt", "curvopt.kernels"]
    for pkg in (curvopt, curvopt.kernels):
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    if name.startswith(("curvopt.integrations.trl", "curvopt.bench.tasks.trl")):
        pytest.importorskip("trl")  # the optional extra curvopt[trl]
    module = importlib.import_module(name)
    if module.__name__ != name:  # a deprecated old path, an alias of the module it names
        pytest.skip(f"{name} is a deprecated alias of {module.__name__}, doctested there")
    finder = doctest.DocTestFinder(exclude_empty=True)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {**vars(module), "torch": torch, "nn": nn}
    for test in finder.find(module, name, globs=globs):  # objects defined in this module only
        torch.manual_seed(0)
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
