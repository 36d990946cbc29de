"""Flat-vector view of a list of parameters: the one place that flattens and unflattens.

Every part of curvopt that treats the trainable parameters of a model as one vector
(curvature operators, M-FAC, optimizers, the pruner) goes through this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def trainable(params: Iterable[Tensor]) -> list[Tensor]:
    """Return the parameters that require gradients, in order.

    Args:
        params: Tensors, for example ``model.parameters()``.

    Returns:
        The list of tensors with ``requires_grad=True``.

    Raises:
        TypeError: If an element is not a tensor.
    """
    out = []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
        if p.requires_grad:
            out.append(p)
    return out


def num_elements(tensors: Sequence[Tensor]) -> int:
    """Total number of entries of a list of tensors (the flat dimension ``d``)."""
    return sum(t.numel() for t in tensors)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector of shape ``(d,)``.

    Example:
        >>> flatten([torch.ones(2, 2), torch.zeros(3)]).shape
        torch.Size([7])
    """
    if len(tensors) == 0:
        raise ValueError("cannot flatten an empty list of tensors")
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector (or the rows of a ``(d, k)`` matrix) into tensors shaped like ``like``.

    Args:
        vec: Tensor of shape ``(d,)`` or ``(d, k)``.
        like: Tensors whose shapes define the split; ``d`` must equal their total size.

    Returns:
        Tensors of shapes ``p.shape`` (or ``(*p.shape, k)`` for a matrix input).

    Example:
        >>> a, b = unflatten(torch.arange(7.0), [torch.empty(2, 2), torch.empty(3)])
        >>> a.shape, b.tolist()
        (torch.Size([2, 2]), [4.0, 5.0, 6.0])
    """
    d = num_elements(like)
    if vec.shape[0] != d:
        raise ValueError(
            f"expected a vector of length {d} (the number of parameters), got {vec.shape[0]}"
        )
    trailing = tuple(vec.shape[1:])
    out, start = [], 0
    for p in like:
        n = p.numel()
        out.append(vec[start : start + n].reshape(*p.shape, *trailing))
        start += n
    return out


def flat_grad(params: Sequence[Tensor], none_as_zero: bool = True) -> Tensor:
    """Flatten the ``.grad`` of each parameter into one vector.

    Args:
        params: Parameters.
        none_as_zero: Use zeros where ``.grad`` is None; otherwise raise.

    Raises:
        ValueError: If a gradient is None and ``none_as_zero`` is False.
    """
    parts = []
    for i, p in enumerate(params):
        if p.grad is None:
            if not none_as_zero:
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) has no gradient")
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
        else:
            parts.append(p.grad.reshape(-1))
    return torch.cat(parts)


def check_vector(
    v: Tensor,
    dim: int,
    *,
    name: str = "vector",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_matrix: bool = False,
    finite: bool = False,
) -> None:
    """Validate a flat vector (or a ``(dim, k)`` matrix) and raise a clear error otherwise.

    Raises:
        TypeError: If ``v`` is not a tensor, or has the wrong dtype.
        ValueError: If the shape or device is wrong, or it holds NaN/Inf when ``finite``.
    """
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    ok_ndim = v.ndim == 1 or (allow_matrix and v.ndim == 2)
    if not ok_ndim or v.shape[0] != dim:
        want = f"({dim},)" + (f" or ({dim}, k)" if allow_matrix else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")
    if dtype is not None and v.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype}, got {v.dtype}; convert it with .to({dtype})"
        )
    if device is not None and v.device != torch.device(device):
        raise ValueError(
            f"{name} is on {v.device} but must be on {torch.device(device)}; move it with .to()"
        )
    if finite and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
