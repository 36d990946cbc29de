"""The runnable example of docs/guide/language-models.md runs and prints what it claims."""

import contextlib
import io
import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).parents[2] / "docs" / "guide" / "language-models.md"


def test_language_model_guide_example_runs():
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], str(GUIDE), "exec"), {})
    text = out.getvalue()
    assert "sequences: 5" in text
    assert "eigsh matches dense: True" in text
    values = re.search(r"top GGN eigenvalues: +\[([^\]]*)\]", text).group(1).split()
    assert len(values) == 3 and all(float(v) > 0 for v in values)  # a GGN is positive semidefinite
