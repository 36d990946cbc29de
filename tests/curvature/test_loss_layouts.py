"""Every loss layout and option against dense fp64 truth on the whole data set as one batch.

Cross-entropy with extra axes, ignore_index (including a batch with no valid target and an
empty batch), class weights and label smoothing; MSE of any shape; BCEWithLogits with 1 and k
outputs, weight and pos_weight; reductions 'mean' and 'sum'.
"""

import pytest
import torch
from dense_truth import ce_fisher_truth, ef_truth, flat_view, ggn_truth, hessian_truth
from torch import nn
from torch.func import functional_call

from curvopt.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

TOL = dict(rtol=1e-9, atol=1e-11)
SIZES = (4, 0, 3, 2)  # an empty batch on purpose


def _ce_data(seed, S=3, C=3):
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i, n in enumerate(SIZES):
        X = torch.randn(n, 2, S, generator=gen, dtype=torch.float64)
        y = torch.randint(0, C, (n, S), generator=gen)
        y[torch.rand(n, S, generator=gen) < 0.3] = -100
        if i == 3:
            y[:] = -100  # a batch whose targets are all ignored
        data.append((X, y))
    return data


def _regression_data(seed, x_shape, y_shape, binary=False):
    gen = torch.Generator().manual_seed(seed)
    data = []
    for n in SIZES:
        X = torch.randn(n, *x_shape, generator=gen, dtype=torch.float64)
        y = torch.randn(n, *y_shape, generator=gen, dtype=torch.float64)
        data.append((X, (y > 0).double() if binary else y))
    return data


def make_case(name, reduction):
    torch.manual_seed(0)
    if name.startswith("ce"):
        model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.Tanh(), nn.Conv1d(4, 3, 1))
        options = {
            "ce": {},
            "ce-weight": {"weight": torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)},
            "ce-smooth": {"label_smoothing": 0.2},
            "ce-weight-smooth": {
                "weight": torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64),
                "label_smoothing": 0.1,
            },
        }[name]
        return model.double(), nn.CrossEntropyLoss(reduction=reduction, **options), _ce_data(1)
    if name == "mse-seq":  # outputs (N, S, C)
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
        return model.double(), nn.MSELoss(reduction=reduction), _regression_data(2, (5, 2), (5, 3))
    if name == "mse-1d":  # outputs (N,)
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
        return model.double(), nn.MSELoss(reduction=reduction), _regression_data(3, (2,), ())
    k = 1 if name.startswith("bce1") else 3
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, k)).double()
    options = {}
    weight = {"weight": torch.linspace(0.5, 1.5, k, dtype=torch.float64)}
    pos_weight = {"pos_weight": torch.linspace(2.0, 0.7, k, dtype=torch.float64)}
    if name.endswith("-weights"):
        options = {**weight, **pos_weight}
    elif name.endswith("-posweight"):  # each option alone, too
        options = pos_weight
    elif name.endswith("-weight"):
        options = weight
    loss = nn.BCEWithLogitsLoss(reduction=reduction, **options)
    return model, loss, _regression_data(4, (2,), (k,), binary=True)


def whole(model, data):
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    theta, unflatten = flat_view(model)
    return (lambda t: functional_call(model, unflatten(t), (X,))), y, theta


CASES = [
    "ce", "ce-weight", "ce-smooth", "ce-weight-smooth", "mse-seq", "mse-1d",
    "bce1", "bcek", "bcek-weights", "bcek-posweight", "bcek-weight",
]  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", CASES)
def test_hessian_ggn_ef_match_truth(name, reduction):
    model, loss, data = make_case(name, reduction)
    forward, y, theta = whole(model, data)
    params = list(model.parameters())
    V = torch.randn(theta.numel(), 3, dtype=torch.float64)
    for cls, truth in (
        (HessianOperator, hessian_truth),
        (GGNOperator, ggn_truth),
        (EmpiricalFisherOperator, ef_truth),
    ):
        op = cls(model, loss, params, data)
        expected = truth(forward, loss, y, theta)
        torch.testing.assert_close(op @ V, expected @ V, **TOL, msg=cls.__name__)
        torch.testing.assert_close(op @ V[:, 0], expected @ V[:, 0], **TOL, msg=cls.__name__)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["ce", "mse-seq", "mse-1d", "bce1", "bcek"])
def test_exact_fisher_matches_truth(name, reduction):
    model, loss, data = make_case(name, reduction)
    forward, y, theta = whole(model, data)
    op = FisherOperator(model, loss, list(model.parameters()), data)
    # the categorical Fisher as an expectation over labels; for the Gaussian and Bernoulli
    # likelihoods the Fisher is the GGN (their loss Hessian does not depend on the target)
    truth = ce_fisher_truth if name == "ce" else ggn_truth
    torch.testing.assert_close(op.to_dense(), truth(forward, loss, y, theta), **TOL)


@pytest.mark.parametrize("name", ["ce", "bcek", "mse-seq"])
def test_mc_fisher_converges_to_the_exact_one(name):
    model, loss, data = make_case(name, "mean")
    args = (model, loss, list(model.parameters()), data)
    exact = FisherOperator(*args).to_dense()
    errors = []
    for m in (1, 3000):
        F = FisherOperator(*args, mc_samples=m, seed=3).to_dense()
        errors.append(float(torch.linalg.norm(F - exact) / torch.linalg.norm(exact)))
    assert errors[1] < 0.08 and errors[1] < errors[0] / 5, errors


@pytest.mark.parametrize("cls", [FisherOperator])
def test_fisher_refuses_what_is_no_likelihood(cls):
    model, _, data = make_case("bcek", "mean")
    with pytest.raises(ValueError, match="pos_weight.*GGNOperator"):
        cls(model, nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), list(model.parameters()), data)
    model, _, data = make_case("ce", "mean")
    with pytest.raises(ValueError, match="weight"):
        cls(model, nn.CrossEntropyLoss(weight=torch.ones(3)), list(model.parameters()), data)


def test_only_ignored_targets_everywhere_is_refused_for_mean():
    model, loss, data = make_case("ce", "mean")
    data = [(X, torch.full_like(y, -100)) for X, y in data]
    op = GGNOperator(model, loss, list(model.parameters()), data)
    with pytest.raises(ValueError, match="no loss terms"):
        op @ torch.randn(op.shape[1], dtype=torch.float64)
    summed = GGNOperator(model, nn.CrossEntropyLoss(reduction="sum"), op.params, data)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    assert torch.equal(summed @ v, torch.zeros_like(v))
