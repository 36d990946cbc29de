"""Softmax cross-entropy curvature product ``(diag(p) - p p^T) u`` per row."""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_curvature_reference(logits: Tensor, u: Tensor) -> Tensor:
    """Hessian of softmax cross-entropy in logit space applied to ``u``, row by row.

    .. math::

        (\\mathrm{diag}(p) - p p^\\top) u = p \\odot u - p (p^\\top u),
        \\quad p = \\mathrm{softmax}(z)

    Args:
        logits: ``(..., C)`` logits ``z``.
        u: ``(..., C)`` directions, same shape as ``logits``.

    Returns:
        ``(..., C)`` tensor in the dtype of ``logits``.
    """
    p = torch.softmax(logits, dim=-1)
    pu = p * u
    return pu - p * pu.sum(-1, keepdim=True)
