"""Batch formats, transposes, train-mode safety, autograd fallbacks and batch-indexed errors."""

import copy
import types

import pytest
import torch
from dense_truth import flat_view, ggn_truth, hessian_truth
from problems import cached_problem, cached_reference
from torch import nn
from torch.func import functional_call

from curvopt.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from curvopt.curvature.train_mode import unsafe_training_modules

OPERATORS = [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator]
KIND = {HessianOperator: "hessian", GGNOperator: "ggn", FisherOperator: "ggn"}
TOL = dict(rtol=1e-10, atol=1e-12)


def _op(cls, problem=None, **kwargs):
    problem = problem or cached_problem("mlp-ce", "mean")
    return cls(problem.model, problem.loss, problem.params, problem.data, **kwargs)


@pytest.mark.parametrize("cls", OPERATORS)
def test_transposes_and_products_from_the_left(cls):
    op = _op(cls)
    dense = cached_reference(KIND.get(cls, "ef"), "mlp-ce", "mean")
    assert op.T is op and op.H is op and op.adjoint() is op
    x, X = torch.randn(op.shape[0], dtype=torch.float64), torch.randn(3, op.shape[0]).double()
    torch.testing.assert_close(x @ op, x @ dense, **TOL)
    torch.testing.assert_close(X @ op, X @ dense, **TOL)
    torch.testing.assert_close(op.T @ x, dense.T @ x, **TOL)
    rows = [torch.randn(p.shape, dtype=torch.float64) for p in op.params]
    flat = torch.cat([r.reshape(-1) for r in rows])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in rows @ op]), flat @ dense, **TOL)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) + self.b(z)


class DictInput(TwoInputs):
    def forward(self, batch):  # one positional argument: gets the mapping itself
        return super().forward(batch["x"], batch["z"])


class LogitsOutput(TwoInputs):
    def forward(self, x, z):  # keyword call model(**X); an object with .logits
        return types.SimpleNamespace(logits=super().forward(x, z), loss=None)


@pytest.mark.parametrize("cls", OPERATORS)
@pytest.mark.parametrize("fmt", ["tuple", "dict-positional", "dict-keywords"])
def test_tuple_and_mapping_batches(cls, fmt):
    torch.manual_seed(0)
    model = {"tuple": TwoInputs, "dict-positional": DictInput, "dict-keywords": LogitsOutput}[fmt]
    model = model().double()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for n in (3, 5):
        x, z = torch.randn(n, 4, generator=gen).double(), torch.randn(n, 2, generator=gen).double()
        y = torch.randint(0, 3, (n,), generator=gen)
        batches.append(((x, z) if fmt == "tuple" else {"x": x, "z": z}, y))
    loss = nn.CrossEntropyLoss()
    op = cls(model, loss, list(model.parameters()), batches)
    assert op.num_data == 8
    # the same matrix from the tensor path: a model taking one tensor [x, z]
    flat = TwoInputs().double()
    flat.load_state_dict(model.state_dict())
    joined = nn.Sequential()
    joined.forward = lambda xz: flat(xz[:, :4], xz[:, 4:])  # noqa: E731
    joined.add_module("inner", flat)
    tensor_batches = [
        (torch.cat(list(X.values() if isinstance(X, dict) else X), 1), y) for X, y in batches
    ]
    ref = cls(joined, loss, list(joined.parameters()), tensor_batches)
    V = torch.randn(op.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(op @ V, ref @ V, **TOL)


def test_batch_size_fn_counts_samples_and_is_checked():
    problem = cached_problem("mlp-ce", "mean")
    op = _op(GGNOperator, batch_size_fn=lambda X: 2 * X.shape[0])
    assert op.num_data == 24
    with pytest.raises(TypeError, match="batch_size_fn must be callable"):
        _op(GGNOperator, batch_size_fn=3)
    with pytest.raises(ValueError, match="batch 0: batch_size_fn must return an integer"):
        _op(GGNOperator, batch_size_fn=lambda X: -1)
    assert problem.data  # the shared problem is untouched


@pytest.mark.parametrize("cls", OPERATORS)
def test_empty_batches_are_skipped(cls):
    problem = cached_problem("mlp-ce", "mean")
    X0, y0 = problem.data[0]
    data = [(X0[:0], y0[:0]), *problem.data, (X0[:0], y0[:0])]
    op = cls(problem.model, problem.loss, problem.params, data)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    torch.testing.assert_close(op @ v, _op(cls) @ v, **TOL)


@pytest.mark.parametrize("cls", OPERATORS)
def test_samples_without_batch_axis_are_refused(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    x, y = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    params = list(model.parameters())
    # scalar targets or inputs have no batch axis; an output whose first axis is not the batch
    # size counted from X gives a sample without its batch axis away at the first product
    with pytest.raises(ValueError, match="batch 0: y has shape \\(\\)"):
        cls(model, nn.MSELoss(), params, [(x, y.sum())])
    with pytest.raises(ValueError, match="without a batch axis"):
        cls(model, nn.MSELoss(), params, [(x.sum(), y)])
    small = nn.Linear(4, 3).double()
    op = cls(small, nn.MSELoss(), list(small.parameters()), [(x, y[:3])], num_data=1)
    with pytest.raises(ValueError, match="batch 0: the model output has shape \\(3,\\).*4 samples"):
        op @ torch.randn(op.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("cls", OPERATORS)
def test_user_mistakes_inside_torch_name_the_batch_and_shapes(cls):
    problem = cached_problem("mlp-ce", "mean")
    (X0, y0), (X1, y1), rest = problem.data[0], problem.data[1], problem.data[2:]
    bad_label = [(X0, y0), (X1, torch.full_like(y1, 7)), *rest]
    op = cls(problem.model, problem.loss, problem.params, bad_label)
    with pytest.raises(ValueError, match=r"batch 1: label 7 is outside the 3 classes"):
        op @ torch.randn(op.shape[1], dtype=torch.float64)
    bad_features = [(X0, y0), (torch.randn(3, 5, dtype=torch.float64), y1[:3])]
    op = cls(problem.model, problem.loss, problem.params, bad_features)
    with pytest.raises(ValueError, match=r"batch 1: model_func failed on X \(3, 5\) float64: "):
        op @ torch.randn(op.shape[1], dtype=torch.float64)


@pytest.mark.parametrize("cls", OPERATORS)
def test_train_mode_is_refused_and_buffers_never_change(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.double().train()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    args = (model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d: updates its running statistics\)"):
        cls(*args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = cls(*args, allow_train_mode=True)
    op @ torch.randn(op.shape[1], dtype=torch.float64)
    op.to_dense()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    eval_op = cls(*[model.eval(), *args[1:]])
    model.train()  # switched back after construction: refused at the product
    with pytest.raises(ValueError, match="model_func.eval()"):
        eval_op @ torch.randn(op.shape[1], dtype=torch.float64)


class NoForwardAD(torch.autograd.Function):
    """tanh with a (twice differentiable) backward formula and no forward-mode formula."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class Act(nn.Module):
    def forward(self, x):
        return NoForwardAD.apply(x)


@pytest.mark.parametrize("mode", ["auto", "reverse-over-forward", "forward-over-reverse"])
def test_hessian_falls_back_without_forward_mode_ad(mode):
    problem = cached_problem("mlp-ce", "mean")
    model = nn.Sequential(problem.model[0], Act(), *problem.model[2:])
    op = HessianOperator(model, problem.loss, problem.params, problem.data, mode=mode)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    expected = cached_reference("hessian", "mlp-ce", "mean")
    torch.testing.assert_close(op @ v, expected @ v, **TOL)
    torch.testing.assert_close(op.to_dense(), expected, **TOL)


@pytest.mark.parametrize("cls", [GGNOperator, FisherOperator, EmpiricalFisherOperator])
def test_output_space_operators_fall_back_without_forward_mode_ad(cls):
    problem = cached_problem("mlp-ce", "mean")
    model = nn.Sequential(problem.model[0], Act(), *problem.model[2:])
    op = cls(model, problem.loss, problem.params, problem.data)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    reference = _op(cls)
    torch.testing.assert_close(op @ v, reference @ v, **TOL)
    torch.testing.assert_close(op.to_dense(), reference.to_dense(), **TOL)


def test_hessian_with_layer_norm_matches_truth():
    # PyTorch 2.13 gets reverse-over-forward wrong through nn.LayerNorm; the operator avoids it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    theta, unflatten = flat_view(model)
    loss = nn.CrossEntropyLoss()
    expected = hessian_truth(lambda t: functional_call(model, unflatten(t), (X,)), loss, y, theta)
    for mode in ("auto", "reverse-over-forward", "reverse-over-reverse", "forward-over-reverse"):
        op = HessianOperator(model, loss, list(model.parameters()), [(X, y)], mode=mode)
        torch.testing.assert_close(op.to_dense(chunk_size=1), expected, **TOL)
    ggn = GGNOperator(model, loss, list(model.parameters()), [(X, y)])
    forward = lambda t: functional_call(model, unflatten(t), (X,))  # noqa: E731
    torch.testing.assert_close(
        ggn.to_dense(chunk_size=1), ggn_truth(forward, loss, y, theta), **TOL
    )


@pytest.mark.parametrize(
    "cls", [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator]
)
def test_progressbar_reports_every_pass_and_changes_nothing(cls, capsys):
    problem = cached_problem("mlp-ce", "mean")
    op = cls(problem.model, problem.loss, problem.params, problem.data, progressbar=True)
    quiet = cls(problem.model, problem.loss, problem.params, problem.data)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    torch.testing.assert_close(op @ v, quiet @ v)
    err = capsys.readouterr().err
    assert "counting samples" in err and f"{cls.__name__} product" in err
    with pytest.raises(TypeError, match="progressbar must be a bool"):
        cls(problem.model, problem.loss, problem.params, problem.data, progressbar=1)


def test_train_mode_products_of_several_columns_match_dense_truth():
    """allow_train_mode (batch statistics, no torch.func): each column gets its own product."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.double().train()
    X, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss = nn.CrossEntropyLoss()
    # the truth: the same batch-statistics forward from a copy that tracks no running statistics
    plain = copy.deepcopy(model)
    plain[1].track_running_stats = False
    plain[1].running_mean = plain[1].running_var = plain[1].num_batches_tracked = None
    theta, unflatten = flat_view(plain)
    truth = ggn_truth(lambda t: functional_call(plain, unflatten(t), (X,)), loss, y, theta)
    op = GGNOperator(model, loss, list(model.parameters()), [(X, y)], allow_train_mode=True)
    V = torch.randn(theta.numel(), 4, dtype=torch.float64)
    torch.testing.assert_close(op @ V, truth @ V, rtol=1e-9, atol=1e-11)


def test_dropout_with_p_zero_is_not_random():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), nn.Tanh(), nn.Linear(3, 2))
    model = model.double().train()
    assert unsafe_training_modules(model) == []
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    op = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)  # accepted
    theta, unflatten = flat_view(model)
    truth = ggn_truth(
        lambda t: functional_call(model, unflatten(t), (data[0][0],)),
        nn.CrossEntropyLoss(),
        data[0][1],
        theta,
    )
    V = torch.randn(theta.numel(), 2, dtype=torch.float64)
    torch.testing.assert_close(op @ V, truth @ V, rtol=1e-9, atol=1e-11)
