"""Bad input raises ValueError/TypeError with a message that says what to fix."""

import pytest
import torch
from problems import cached_problem
from torch import nn

from curvopt.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

OPERATORS = [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator]


@pytest.fixture(scope="module")
def problem():
    return cached_problem("mlp-ce", "mean")


@pytest.mark.parametrize("cls", OPERATORS)
def test_bad_vectors(cls, problem):
    op = cls(problem.model, problem.loss, problem.params, problem.data)
    d = op.shape[1]
    with pytest.raises(ValueError, match=f"shape \\({d},\\)"):
        op @ torch.randn(d + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        op @ torch.randn(d, 2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.randn(d, dtype=torch.float32)
    with pytest.raises(ValueError, match="on meta"):
        op @ torch.empty(d, dtype=torch.float64, device="meta")
    with pytest.raises(TypeError, match="list of tensors"):
        op @ d
    with pytest.raises(ValueError, match="6 tensors"):
        op @ [torch.zeros_like(p) for p in problem.params[:-1]]
    with pytest.raises(ValueError, match="parameter shapes"):
        op @ [torch.zeros(3, dtype=torch.float64) for _ in problem.params]
    with pytest.raises(TypeError, match="dtype"):
        op @ [torch.zeros_like(p, dtype=torch.float32) for p in problem.params]


def test_empty_and_one_shot_data(problem):
    with pytest.raises(ValueError, match="at least one sample"):
        GGNOperator(problem.model, problem.loss, problem.params, [])
    with pytest.raises(TypeError, match="re-iterable"):
        GGNOperator(problem.model, problem.loss, problem.params, iter(problem.data))
    with pytest.raises(ValueError, match="pair"):
        GGNOperator(problem.model, problem.loss, problem.params, [problem.data[0][0]])


@pytest.mark.parametrize("cls", [GGNOperator, FisherOperator, EmpiricalFisherOperator])
def test_unsupported_losses(cls, problem):
    args = (problem.model, problem.params, problem.data)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        cls(args[0], nn.CrossEntropyLoss(reduction="none"), *args[1:])
    with pytest.raises(TypeError, match="nn.MSELoss, nn.CrossEntropyLoss"):
        cls(args[0], nn.L1Loss(), *args[1:])
    if cls is FisherOperator:  # GGN and EF are exact for these options (tests/curvature/...)
        with pytest.raises(ValueError, match="label_smoothing"):
            cls(args[0], nn.CrossEntropyLoss(label_smoothing=0.1), *args[1:])
        with pytest.raises(ValueError, match="pos_weight"):
            cls(args[0], nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), *args[1:])


def test_hessian_accepts_other_losses_but_not_none_reduction(problem):
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(problem.model, nn.MSELoss(reduction="none"), problem.params, problem.data)
    with pytest.raises(TypeError, match="nn.Module"):
        HessianOperator(problem.model, torch.nn.functional.mse_loss, problem.params, problem.data)


def test_hessian_mode_is_checked(problem):
    with pytest.raises(ValueError, match="mode must be one of"):
        HessianOperator(*_args(problem), mode="double")


def test_bad_model_and_params(problem):
    with pytest.raises(TypeError, match="nn.Module"):
        GGNOperator(lambda x: x, problem.loss, problem.params, problem.data)
    frozen = [p.detach() for p in problem.params]
    with pytest.raises(ValueError, match="requires_grad"):
        GGNOperator(problem.model, problem.loss, frozen, problem.data)
    stranger = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a parameter of model_func"):
        GGNOperator(problem.model, problem.loss, [*problem.params, stranger], problem.data)


@pytest.mark.parametrize("cls", OPERATORS)
def test_ce_logits_and_labels_must_fit(cls):
    model = nn.Sequential(nn.Conv2d(1, 3, 1)).double()  # logits (N, 3, H, W)
    X = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    for y, match in [
        (torch.randint(0, 3, (2, 3)), r"batch 0: .*need labels \(2, 2, 2\), got y \(2, 3\)"),
        (torch.full((2, 2, 2), 3), r"batch 0: label 3 is outside the 3 classes"),
    ]:
        op = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
        with pytest.raises(ValueError, match=match):
            op @ torch.randn(op.shape[1], dtype=torch.float64)


def test_fisher_hyperparameters(problem):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="mc_samples"):
            FisherOperator(*_args(problem), mc_samples=bad)
    with pytest.raises(TypeError, match="seed"):
        FisherOperator(*_args(problem), mc_samples=1, seed="x")


def test_to_dense_guards(problem):
    op = GGNOperator(*_args(problem))
    with pytest.raises(ValueError, match="max_dim"):
        op.to_dense(max_dim=10)
    with pytest.raises(ValueError, match="chunk_size"):
        op.to_dense(chunk_size=0)


def test_check_deterministic_catches_dropout(problem):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="not deterministic"):
        GGNOperator(
            model, problem.loss, params, data, check_deterministic=True, allow_train_mode=True
        )
    model.eval()
    GGNOperator(model, problem.loss, params, data, check_deterministic=True)


def _args(problem):
    return problem.model, problem.loss, problem.params, problem.data


@pytest.mark.parametrize("cls", [GGNOperator, EmpiricalFisherOperator, HessianOperator])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_bce_with_integer_or_bool_targets_says_to_convert(cls, dtype):
    model = nn.Linear(2, 3).double()
    y = torch.randint(0, 2, (4, 3)).to(dtype)
    op = cls(
        model, nn.BCEWithLogitsLoss(), list(model.parameters()), [(torch.ones(4, 2).double(), y)]
    )
    with pytest.raises(ValueError, match=r"batch 0: BCEWithLogitsLoss needs floating-point.*y\.to"):
        op @ torch.ones(op.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("cls", [GGNOperator, EmpiricalFisherOperator])
@pytest.mark.parametrize(
    ("option", "shape"), [("pos_weight", (2,)), ("pos_weight", (4, 1, 3)), ("weight", (4, 1, 1))]
)
def test_bce_options_of_the_wrong_shape_are_named(cls, option, shape):
    model = nn.Linear(2, 3).double()
    loss = nn.BCEWithLogitsLoss(**{option: torch.ones(shape, dtype=torch.float64)})
    data = [(torch.ones(4, 2).double(), torch.ones(4, 3).double())]
    op = cls(model, loss, list(model.parameters()), data)
    with pytest.raises(ValueError, match=rf"batch 0: BCEWithLogitsLoss's {option} has shape"):
        op @ torch.ones(op.shape[1], dtype=torch.float64)
