"""Training-mode safety: modules whose forward pass is random or changes the model's buffers.

In training mode, dropout draws a new mask on every forward pass (every product would use
another random network) and batch norm updates its running statistics (a product would
change the model). The curvature operators refuse such a model at construction unless the
caller opts in, and with the opt-in restore every buffer after each product.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd


def unsafe_training_modules(model: nn.Module) -> list[str]:
    """Name the modules in training mode whose forward is random or updates buffers.

    Returns:
        Entries ``"name (Type: why)"``: dropout with ``p > 0``, ``nn.RReLU``, and normalization
        layers that track running statistics.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.BatchNorm1d(3))
        >>> unsafe_training_modules(model)  # doctest: +NORMALIZE_WHITESPACE
        ['1 (Dropout: draws a random mask)', '2 (BatchNorm1d: updates its running statistics)']
        >>> unsafe_training_modules(model.eval())
        []
    """
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        why = None
        if isinstance(module, _DropoutNd) and module.p > 0:
            why = "draws a random mask"
        elif isinstance(module, nn.RReLU):
            why = "draws random slopes"
        elif isinstance(module, _NormBase) and module.track_running_stats:
            why = "updates its running statistics"
        if why is not None:
            found.append(f"{name or '<model>'} ({type(module).__name__}: {why})")
    return found


def check_train_mode(model: nn.Module, owner: str) -> None:
    """Raise ValueError naming the unsafe training-mode modules of ``model`` (if any)."""
    found = unsafe_training_modules(model)
    if found:
        listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ValueError(
            f"{owner}: model_func has modules in training mode whose forward pass is random or "
            f"changes buffers: {listed}. Products would be random or change the model. Call "
            "model_func.eval() first, or pass allow_train_mode=True to use training-mode "
            "forward passes anyway (buffers are restored after every product)"
        )


@contextmanager
def preserved_buffers(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Restore every buffer of ``model`` (values, in place) when the block ends."""
    if not active:
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
