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
