"""Doctest namespace: docstring examples may use ``torch`` and ``nn`` without importing them."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["nn"] = nn
