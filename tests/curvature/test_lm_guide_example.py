"""The runnable example of docs/guide/language-models.md runs and prints what it claims."""

import re

import pytest
from guide_runner import run_guide_example


def test_language_model_guide_example_runs():
    pytest.importorskip("transformers")
    text = run_guide_example("guide/language-models.md")
    assert "sequences: 5" in text
    assert "eigsh matches dense: True" in text
    values = re.search(r"top GGN eigenvalues: +\[([^\]]*)\]", text).group(1).split()
    assert len(values) == 3 and all(float(v) > 0 for v in values)  # a GGN is positive semidefinite
