"""Cross-check against curvlinops' operators on the same model and data."""

import pytest
import torch
from problems import cached_problem

from curvopt.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

curvlinops = pytest.importorskip("curvlinops")

PAIRS = {
    "hessian": (HessianOperator, "HessianLinearOperator", {}),
    "ggn": (GGNOperator, "GGNLinearOperator", {}),
    "ef": (EmpiricalFisherOperator, "EFLinearOperator", {}),
    "fisher-mc": (FisherOperator, "FisherMCLinearOperator", {"mc_samples": 2, "seed": 5}),
}


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(PAIRS))
def test_matches_curvlinops(kind, name, reduction):
    problem = cached_problem(name, reduction)
    ours_cls, theirs_name, kwargs = PAIRS[kind]
    args = (problem.model, problem.loss, problem.params, problem.data)
    ours = ours_cls(*args, **kwargs)
    theirs = getattr(curvlinops, theirs_name)(*args, check_deterministic=False, **kwargs)
    V = torch.randn(ours.shape[1], 4, dtype=torch.float64)
    # curvlinops draws the MSE noise with a float32 standard deviation (sqrt(0.5) as a float32
    # tensor), a relative difference of 3e-8; the labels drawn for cross-entropy are identical
    rtol = 1e-7 if kind == "fisher-mc" and "mse" in name else 1e-10
    torch.testing.assert_close(ours @ V, theirs @ V, rtol=rtol, atol=1e-12)
