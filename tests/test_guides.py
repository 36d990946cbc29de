"""Every ``python`` block of the guides runs, or is marked as a sketch.

A block fenced as plain ```` ```python ```` is runnable: the blocks of a page run in order in one
namespace (a page reads as one session), in a fresh interpreter. A block that needs the reader's
own model, data or a ``torchrun`` launch is fenced with a title that starts with ``sketch``
(```` ```python title="sketch: ..." ````, shown above the block on the site); it must still be
valid Python. curvature.md and language-models.md also check what their examples print
(tests/curvature/test_docs_example.py, test_lm_guide_example.py).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDES = Path(__file__).resolve().parents[1] / "docs" / "guide"
FENCE = re.compile(r'^```python(?: title="([^"]*)")?\n(.*?)^```', re.S | re.M)
#: pages whose runnable blocks take minutes (run by `make test-all`)
SLOW = {"policy-gradient.md"}
#: pages whose one example runs in a test of its own that also checks what it prints
RUN_ELSEWHERE = {"curvature.md", "language-models.md"}


def _blocks(page):
    return [(title or "", code) for title, code in FENCE.findall(page.read_text())]


def _page_params():
    return [
        pytest.param(page, id=page.name, marks=[pytest.mark.slow] if page.name in SLOW else [])
        for page in sorted(GUIDES.glob("*.md"))
    ]


def test_every_python_fence_is_plain_or_a_sketch():
    for page in GUIDES.glob("*.md"):
        opened = re.findall(r"^```python(.*)$", page.read_text(), re.M)
        for info in opened:
            assert info == "" or info.startswith(' title="sketch'), (page.name, info)


@pytest.mark.parametrize("page", _page_params())
def test_guide_blocks_run(page, tmp_path):
    blocks = _blocks(page)
    for i, (title, code) in enumerate(blocks):
        if title:
            compile(code, f"{page.name} block {i}", "exec")  # a sketch: valid Python at least
    runnable = [code for title, code in blocks if not title]
    if page.name in RUN_ELSEWHERE:
        pytest.skip(f"{page.name} runs in tests/curvature (with checks of its output)")
    if not runnable:
        pytest.skip(f"{page.name} has only sketches")
    script = "\n".join(
        f"exec(compile({code!r}, {f'{page.name} block {i}'!r}, 'exec'), ns)"
        for i, code in enumerate(runnable)
    )
    proc = subprocess.run(
        [sys.executable, "-c", "ns = {}\n" + script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
