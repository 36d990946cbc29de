"""Dense float64 truths for any model/loss pair, from the whole data set as one batch.

Everything here is built from the loss as torch defines it (``torch.func.hessian`` of the loss,
``jacrev`` of the outputs, per-data-point gradients one row at a time), independent of the
operators' output-space formulas and batch weighting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev


def flat_view(model: nn.Module) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """The trainable parameters as one vector and ``theta -> {name: tensor}``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflatten(t: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, p in named:
            out[name] = t[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out

    return theta, unflatten


def hessian_truth(forward: Callable[[Tensor], Tensor], loss: nn.Module, y: Tensor, theta):
    """The Hessian of ``loss(forward(theta), y)``, one double-backward row at a time.

    Not ``torch.func.hessian``: in PyTorch 2.13 it is wrong (and asymmetric) for models with
    ``nn.LayerNorm``, while row-by-row autograd agrees with finite differences.
    """
    return torch.autograd.functional.hessian(lambda t: loss(forward(t), y), theta)


def ggn_truth(forward: Callable[[Tensor], Tensor], loss: nn.Module, y: Tensor, theta):
    """``J^T (d^2 loss / d f^2) J`` with both factors explicit."""
    out = forward(theta).detach()
    J = jacrev(forward)(theta).reshape(out.numel(), -1)
    H = hessian(lambda f: loss(f, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def point_losses(loss: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """Unreduced loss of every data point: CE positions; MSE/BCE rows of the last axis."""
    none = type(loss)(**{**_options(loss), "reduction": "none"})
    values = none(out, y)
    if isinstance(loss, nn.CrossEntropyLoss) or out.ndim == 1:
        return values.reshape(-1)
    return values.sum(-1).reshape(-1)


def ef_truth(forward: Callable[[Tensor], Tensor], loss: nn.Module, y: Tensor, theta):
    """``c sum_t g_t g_t^T`` with ``g_t`` the gradient of data point ``t``'s loss (rows of a
    Jacobian) and ``c = loss(mean) / loss(sum)``, torch's own normalization."""
    G = jacrev(lambda t: point_losses(loss, forward(t), y))(theta)
    with torch.no_grad():
        out = forward(theta)
        c = 1.0
        if loss.reduction == "mean":
            summed = type(loss)(**{**_options(loss), "reduction": "sum"})
            c = float(loss(out, y) / summed(out, y))
    return c * G.T @ G


def ce_fisher_truth(forward: Callable[[Tensor], Tensor], loss: nn.Module, y: Tensor, theta):
    """``c sum_t [y_t valid] sum_k p_tk grad log p_tk grad log p_tk^T`` (the expectation over
    labels drawn from the model), for ``nn.CrossEntropyLoss`` with classes on axis 1."""
    out = forward(theta).detach()
    C = out.shape[1]
    logp = lambda t: torch.log_softmax(forward(t), dim=1).movedim(1, -1).reshape(-1, C)  # noqa: E731
    G = jacrev(logp)(theta)  # (T, C, d)
    p = torch.softmax(out, dim=1).movedim(1, -1).reshape(-1, C)
    valid = (y != loss.ignore_index).reshape(-1).to(out.dtype)
    c = 1.0 / float(valid.sum()) if loss.reduction == "mean" else 1.0
    return c * torch.einsum("t,tk,tki,tkj->ij", valid, p, G, G)


def _options(loss: nn.Module) -> dict:
    if isinstance(loss, nn.CrossEntropyLoss):
        return dict(
            weight=loss.weight, ignore_index=loss.ignore_index,
            label_smoothing=loss.label_smoothing, reduction=loss.reduction,
        )  # fmt: skip
    if isinstance(loss, nn.BCEWithLogitsLoss):
        return dict(weight=loss.weight, pos_weight=loss.pos_weight, reduction=loss.reduction)
    return dict(reduction=loss.reduction)
