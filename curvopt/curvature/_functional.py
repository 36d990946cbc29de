"""Functional views of a model over a subset of its parameters (for ``torch.func``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.func import functional_call


def make_forward(model: nn.Module, names: Sequence[str], X: Tensor) -> Callable[..., Tensor]:
    """Return ``f(*params) -> model(X)`` with the named parameters replaced by ``params``.

    Parameters not in ``names`` (frozen ones) keep their values from ``model``.
    """
    names = tuple(names)

    def forward(*params: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, params)), (X,))

    return forward
