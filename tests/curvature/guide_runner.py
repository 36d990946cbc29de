"""Run the one ``python`` block of a guide page and return what it prints."""

import contextlib
import io
import pathlib
import re

DOCS = pathlib.Path(__file__).parents[2] / "docs"


def run_guide_example(relative_path: str) -> str:
    """Execute the single fenced ``python`` block of ``docs/<relative_path>``; return stdout."""
    guide = DOCS / relative_path
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    assert len(blocks) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], str(guide), "exec"), {})
    return out.getvalue()
