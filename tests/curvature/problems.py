"""Small float64 problems and independent dense references for the curvature operator tests."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

BATCH_SIZES = (5, 3, 4)  # unequal on purpose


@dataclass
class Problem:
    name: str
    model: nn.Module
    loss: nn.Module
    data: list[tuple[Tensor, Tensor]]

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def all_data(self) -> tuple[Tensor, Tensor]:
        return torch.cat([X for X, _ in self.data]), torch.cat([y for _, y in self.data])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, p in zip(self.names, self.params):
            out[name] = theta[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out

    def theta(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def make_problem(name: str, reduction: str, seed: int = 0, frozen: bool = False) -> Problem:
    """Build a float64 model, loss and data set of three unequal batches."""
    torch.manual_seed(seed)
    arch, loss_name = name.split("-")
    if arch == "mlp":
        model = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
        )
        xs = [torch.randn(n, 4) for n in BATCH_SIZES]
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
        xs = [torch.randn(n, 1, 4, 4) for n in BATCH_SIZES]
    model = model.double()
    if frozen:
        model[0].bias.requires_grad_(False)
    if loss_name == "ce":
        loss = nn.CrossEntropyLoss(reduction=reduction)
        ys = [torch.randint(0, 3, (n,)) for n in BATCH_SIZES]
    else:
        loss = nn.MSELoss(reduction=reduction)
        ys = [torch.randn(n, 3) for n in BATCH_SIZES]
    data = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in zip(xs, ys)]
    return Problem(f"{name}-{reduction}", model, loss, data)


def risk_constant(problem: Problem) -> float:
    """``c`` of the whole-data risk ``c * sum_n ell_n``."""
    X, y = problem.all_data()
    if problem.loss.reduction == "sum":
        return 1.0
    if isinstance(problem.loss, nn.CrossEntropyLoss):
        return 1.0 / X.shape[0]
    return 1.0 / y.numel()


@functools.cache
def cached_problem(name: str, reduction: str) -> Problem:
    """One problem per (name, reduction) for the whole session (treat as read-only)."""
    return make_problem(name, reduction)


@functools.cache
def cached_reference(kind: str, name: str, reduction: str) -> Tensor:
    """Dense reference of ``kind`` ('hessian', 'ggn', 'ef') for a cached problem."""
    builder = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_empirical_fisher}[kind]
    return builder(cached_problem(name, reduction))


def dense_hessian(problem: Problem) -> Tensor:
    """``torch.func.hessian`` of the loss of all data in one batch."""
    X, y = problem.all_data()

    def risk(theta: Tensor) -> Tensor:
        return problem.loss(functional_call(problem.model, problem.unflatten(theta), (X,)), y)

    return hessian(risk)(problem.theta())


def output_jacobian(problem: Problem) -> tuple[Tensor, Tensor]:
    """Outputs ``(N, C)`` and the explicit Jacobian ``(N, C, d)`` (``jacrev``)."""
    X, _ = problem.all_data()

    def f(theta: Tensor) -> Tensor:
        return functional_call(problem.model, problem.unflatten(theta), (X,))

    theta = problem.theta()
    return f(theta).detach(), jacrev(f)(theta)


def output_hessians(problem: Problem, output: Tensor) -> Tensor:
    """Per-sample Hessians of the unreduced loss w.r.t. the outputs, ``(N, C, C)``, written out."""
    N, C = output.shape
    if isinstance(problem.loss, nn.MSELoss):
        return 2.0 * torch.eye(C, dtype=output.dtype).expand(N, C, C)
    p = torch.softmax(output, dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def dense_ggn(problem: Problem) -> Tensor:
    output, J = output_jacobian(problem)
    H = output_hessians(problem, output)
    return risk_constant(problem) * torch.einsum("nci,ncd,ndj->ij", J, H, J)


def dense_empirical_fisher(problem: Problem) -> Tensor:
    """Sum of outer products of per-sample gradients, one sample at a time with autograd."""
    X, y = problem.all_data()
    params = problem.params
    d = sum(p.numel() for p in params)
    E = torch.zeros(d, d, dtype=torch.float64)
    per_sample = type(problem.loss)(reduction="sum")
    for n in range(X.shape[0]):
        loss = per_sample(problem.model(X[n : n + 1]), y[n : n + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        E += torch.outer(g, g)
    return risk_constant(problem) * E
