"""Every operator against a dense float64 matrix built independently."""

import pytest
import torch
from problems import (
    cached_problem,
    cached_reference,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    make_problem,
)

from curvopt.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

NAMES = ["mlp-mse", "mlp-ce", "cnn-mse", "cnn-ce"]
REDUCTIONS = ["mean", "sum"]
CASES = {
    "hessian": (HessianOperator, "hessian"),
    "ggn": (GGNOperator, "ggn"),
    "fisher": (FisherOperator, "ggn"),  # exact Fisher = GGN for these likelihoods
    "ef": (EmpiricalFisherOperator, "ef"),
}
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_dense_matches_reference(case, name, reduction):
    problem = cached_problem(name, reduction)
    cls, kind = CASES[case]
    op = cls(problem.model, problem.loss, problem.params, problem.data)
    expected = cached_reference(kind, name, reduction)
    assert op.shape == expected.shape
    # chunked products (several columns at once) and single-column products (a separate path)
    torch.testing.assert_close(op.to_dense(chunk_size=40), expected, **TOL)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    torch.testing.assert_close(op @ v, expected @ v, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_frozen_parameters_are_left_out(case):
    problem = make_problem("mlp-ce", "mean", frozen=True)
    cls, kind = CASES[case]
    reference = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_empirical_fisher}[kind]
    all_params = list(problem.model.parameters())  # includes the frozen bias
    op = cls(problem.model, problem.loss, all_params, problem.data)
    d = sum(p.numel() for p in all_params if p.requires_grad)
    assert op.shape == (d, d) and d < sum(p.numel() for p in all_params)
    torch.testing.assert_close(op.to_dense(), reference(problem), **TOL)


def test_properties_follow_parameters():
    problem = make_problem("mlp-mse", "mean")
    op = GGNOperator(problem.model, problem.loss, problem.params, problem.data)
    assert op.dtype == torch.float64 and op.device == torch.device("cpu")
    assert op.num_data == 12 and len(op.params) == 6
    assert op.shape == (64, 64)
