"""`DualArithmeticMode` changes only the speed of forward-mode passes, never their values.

The rewritten calls (arithmetic with Python numbers and constant tensors) must give bitwise the
primal and tangent torch gives without the mode; softmax / log_softmax (tangent from the result)
must agree with torch's formula to rounding and with finite differences in float64; and the
operators that run their forward passes under the mode must still equal a plain double-backward
truth on a model built from exactly these calls.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from curvopt.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator
from curvopt.curvature.dual_arithmetic import DualArithmeticMode

MASK = torch.randn(1, 5)
CALLS = {
    "0.5 * x": lambda x: 0.5 * x,
    "x * 3": lambda x: x * 3,
    "x + 1.5": lambda x: x + 1.5,
    "2 + x": lambda x: 2 + x,
    "x - 0.25": lambda x: x - 0.25,
    "1 - x": lambda x: 1 - x,
    "x / 7.0": lambda x: x / 7.0,
    "torch.add alpha": lambda x: torch.add(x, 0.5, alpha=3),
    "Tensor.sub alpha": lambda x: x.sub(2.0, alpha=0.5),
    "torch.mul": lambda x: torch.mul(x, -1.5),
    "x.div": lambda x: x.div(3.0),
    "x + mask": lambda x: x + MASK,
    "mask + x": lambda x: MASK + x,
    "x - mask": lambda x: x - MASK,
    "mask - x": lambda x: torch.sub(MASK, x, alpha=2),
    "gelu_new": lambda x: (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    ),
    "x * x (both dual)": lambda x: x * x,
    "x * int tensor": lambda x: x * torch.arange(5),
}


def _dual_call(fn, x: Tensor, t: Tensor, mode: bool) -> tuple[Tensor, Tensor]:
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        if mode:
            with DualArithmeticMode():
                out = fn(dual)
        else:
            out = fn(dual)
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CALLS))
def test_rewritten_calls_are_bitwise_equal(name, dtype):
    x, t = torch.randn(4, 5, dtype=dtype), torch.randn(4, 5, dtype=dtype)
    p0, t0 = _dual_call(CALLS[name], x, t, mode=False)
    p1, t1 = _dual_call(CALLS[name], x, t, mode=True)
    assert p1.dtype == p0.dtype and t1.dtype == t0.dtype
    assert torch.equal(p1, p0) and torch.equal(t1, t0)


SOFTMAXES = {
    "torch.softmax": lambda x: torch.softmax(x, -1),
    "F.softmax dim kw": lambda x: F.softmax(x, dim=1),
    "Tensor.softmax": lambda x: x.softmax(0),
    "F.log_softmax": lambda x: F.log_softmax(x, -1),
    "Tensor.log_softmax dtype": lambda x: x.log_softmax(-1, dtype=torch.float64),
    "masked attention": lambda x: torch.softmax(
        x + torch.full((4, 5), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1), -1
    ),
}


@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_tangent_matches_torch_and_finite_differences(name):
    fn = SOFTMAXES[name]
    x, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    p0, t0 = _dual_call(fn, x, t, mode=False)
    p1, t1 = _dual_call(fn, x, t, mode=True)
    assert torch.equal(p1, p0)  # the primal is the original call's
    torch.testing.assert_close(t1, t0, rtol=1e-12, atol=1e-14)
    h = 1e-6  # central differences, O(h^2) error
    fd = (fn(x + h * t) - fn(x - h * t)) / (2 * h)
    torch.testing.assert_close(t1, fd, rtol=1e-7, atol=1e-8)


class ScalarHeavy(nn.Module):
    """Python-number arithmetic, a constant mask, softmax and log_softmax: every rewritten path."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.register_buffer("mask", torch.randn(1, 5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = 0.5 * h * (1.0 + torch.tanh(0.79 * (h + 0.044715 * torch.pow(h, 3.0))))
        att = torch.softmax(self.mix(h) * 0.5 + self.mask, dim=-1)
        h = 1.0 - att * h / 3.0 + F.log_softmax(h - 2.0, -1)
        return self.out(h)


def _dense_hessian(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    params = list(model.parameters())
    loss = nn.CrossEntropyLoss()(model(X), y)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.autograd.grad(g, params, retain_graph=True) for g in grads]
    return torch.stack([torch.cat([r.reshape(-1) for r in row]) for row in rows])


def _dense_ggn(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    params = list(model.parameters())
    out = model(X)
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
            for o in out.reshape(-1)
        ]
    )
    p = out.detach().softmax(-1)
    blocks = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p]) / len(y)
    return J.T @ blocks @ J


@pytest.mark.parametrize("seed", [0, 1])
def test_operators_on_a_scalar_heavy_model_match_double_backward(seed):
    torch.manual_seed(seed)
    model = ScalarHeavy().double()
    X, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    params, data, loss = list(model.parameters()), [(X, y)], nn.CrossEntropyLoss()
    H = HessianOperator(model, loss, params, data, mode="reverse-over-forward")
    G = GGNOperator(model, loss, params, data)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, _dense_hessian(model, X, y) @ v, rtol=1e-9, atol=1e-11)
    # the product really ran through the dual pass (allow-listed, no fallback after a failure)
    assert H.forward_ad_safe == (True, []) and not H._forward_ad_failed
    torch.testing.assert_close(G @ v, _dense_ggn(model, X, y) @ v, rtol=1e-9, atol=1e-11)
    assert not G._forward_ad_failed
    # the empirical Fisher takes the same dual pass: sum of g_t g_t^T / N
    g = [
        torch.cat(
            [
                r.reshape(-1)
                for r in torch.autograd.grad(loss(model(X[i : i + 1]), y[i : i + 1]), params)
            ]
        )
        for i in range(7)
    ]
    E = torch.stack(g).T @ torch.stack(g) / 7
    op = EmpiricalFisherOperator(model, loss, params, data)
    torch.testing.assert_close(op @ v, E @ v, rtol=1e-9, atol=1e-11)


class Tied(nn.Module):
    """An embedding whose weight is also the output layer's (as GPT-2's ``lm_head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight
        self.mid = nn.Linear(3, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_substituted_matches_functional_call_and_restores():
    from torch.func import functional_call

    from curvopt.curvature._functional import substituted

    torch.manual_seed(0)
    model, ids = Tied().double(), torch.randint(0, 5, (4, 2))
    originals = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    for names in (["emb.weight", "mid.bias"], ["mid.weight"]):  # a subset; tied copies follow
        new = {n: torch.randn_like(model.get_parameter(n)) for n in names}
        with substituted(model, new):
            ours = model(ids)
            if "emb.weight" in names:
                assert model.head.weight is new["emb.weight"]
        torch.testing.assert_close(ours, functional_call(model, new, (ids,)), rtol=0, atol=0)
        assert all(p is originals[n] for n, p in model.named_parameters(remove_duplicate=False))
    # restored after an error, and a parameter replaced since the last call is picked up
    with pytest.raises(RuntimeError, match="inside"):
        with substituted(model, {"mid.bias": torch.zeros(3, dtype=torch.float64)}):
            raise RuntimeError("inside")
    assert model.mid.bias is originals["mid.bias"]
    model.mid.bias = nn.Parameter(torch.ones(3, dtype=torch.float64))
    with substituted(model, {"mid.weight": torch.eye(3, dtype=torch.float64)}):
        assert torch.equal(model.mid.bias, torch.ones(3, dtype=torch.float64))
        out = model(ids)
    with torch.no_grad():
        model.mid.weight.copy_(torch.eye(3))
    torch.testing.assert_close(out, model(ids), rtol=0, atol=0)
