"""The runnable example of docs/guide/curvature.md runs and prints what it claims."""

from guide_runner import run_guide_example


def test_guide_example_runs():
    text = run_guide_example("guide/curvature.md")
    assert "CG converged: True" in text
    assert "exact Fisher = GGN: True" in text
    assert "symmetric: True" in text
    assert "tensor([14.,  1.])" in text  # A e1 + 12 w^2 e1 at w = (1, 1)
