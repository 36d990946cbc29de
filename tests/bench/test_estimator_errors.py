"""Estimator error against the budget: decays, and vanishes at a budget of d."""

import pytest
import torch

from curvopt.bench.estimators import estimator_errors, format_table


def test_errors_decay_with_the_budget_and_vanish_at_d():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(0.8 ** torch.arange(40, dtype=torch.float64)) @ Q.T
    recs = estimator_errors(A, budgets=[4, 16, 40], num_seeds=8)
    err = {(r["estimator"], r["budget"]): r["rel_error"] for r in recs}
    for name in ("hutchinson", "hutchpp", "xtrace", "hutchinson_diag", "xdiag"):
        assert err[(name, 16)] < err[(name, 4)]
        assert err[(name, 40)] < 1e-12  # budget d: exact
    assert err[("xtrace", 16)] < err[("hutchinson", 16)]
    table = format_table(recs)
    assert table.splitlines()[0] == "| estimator | m=4 | m=16 | m=40 |"


def test_bad_input():
    with pytest.raises(ValueError, match="unknown estimators"):
        estimator_errors(torch.eye(3), [2], estimators=["lanczos"])
    with pytest.raises(ValueError, match="at least one budget"):
        estimator_errors(torch.eye(3), [])


def test_plot_has_one_log_log_line_per_estimator_with_labels():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from curvopt.bench.estimators import PLOT_FLOOR, plot_figure

    A = torch.diag(torch.linspace(0.1, 2.0, 12, dtype=torch.float64))
    recs = estimator_errors(A, budgets=[2, 4, 12], num_seeds=2)
    fig = plot_figure(recs, "diag test")
    try:
        (ax,) = fig.axes
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert ax.get_title() == "diag test"
        assert "matrix-vector products" in ax.get_xlabel() and "error" in ax.get_ylabel()
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == [
            "hutchinson (trace)", "hutchpp (trace)", "xtrace (trace)",
            "hutchinson_diag (diagonal)", "xdiag (diagonal)",
        ]  # fmt: skip
        xtrace = ax.get_lines()[2]
        assert list(xtrace.get_xdata()) == [2, 4, 12]
        assert xtrace.get_ydata()[-1] == PLOT_FLOOR  # exact at m = d: drawn at the floor
    finally:
        plt.close(fig)
