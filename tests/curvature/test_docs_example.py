"""The runnable example of docs/guide/curvature.md runs and prints what it claims."""

import contextlib
import io
import pathlib
import re

GUIDE = pathlib.Path(__file__).parents[2] / "docs" / "guide" / "curvature.md"


def test_guide_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], str(GUIDE), "exec"), {})
    text = out.getvalue()
    assert "CG converged: True" in text
    assert "exact Fisher = GGN: True" in text
    assert "symmetric: True" in text
    assert "tensor([14.,  1.])" in text  # A e1 + 12 w^2 e1 at w = (1, 1)
