"""Accuracy metrics of a curvature approximation against a reference.

All functions take tensors and return Python floats; they are pure (no timing, no state) so they can
be checked on constructed cases.

With damping ``lam`` the same for both, the reference ``A`` and the approximation ``Ã``:

- IHVP relative error on probe vectors ``v``: ``||(Ã + lam I)^{-1} v - (A + lam I)^{-1} v|| /
  ||(A + lam I)^{-1} v||``, averaged over the probes;
- Newton cosine: the cosine between ``(Ã + lam I)^{-1} g`` and the exact damped Newton direction
  ``(A + lam I)^{-1} g`` for the gradient ``g``;
- top-eigenvalue error: ``||λ̃_{1:k} - λ_{1:k}|| / ||λ_{1:k}||`` over the ``k`` largest
  eigenvalues of the undamped matrices, each sorted in decreasing order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _columns(x: Tensor, name: str) -> Tensor:
    if x.ndim == 1:
        return x.unsqueeze(1)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (d,) or (d, k), got {tuple(x.shape)}")
    return x


def column_relative_errors(approx: Tensor, exact: Tensor) -> Tensor:
    """Per-column relative errors ``||a_j - e_j|| / ||e_j||``.

    Args:
        approx: Shape ``(d,)`` or ``(d, k)``.
        exact: Same shape as ``approx``; no column may be zero.

    Returns:
        Tensor of shape ``(k,)`` (``(1,)`` for vectors).

    Raises:
        ValueError: On a shape mismatch or a zero reference column.
    """
    a, e = _columns(approx, "approx"), _columns(exact, "exact")
    if a.shape != e.shape:
        raise ValueError(f"approx has shape {tuple(a.shape)} but exact has {tuple(e.shape)}")
    norms = torch.linalg.vector_norm(e, dim=0)
    if bool((norms == 0).any()):
        raise ValueError("a reference column is zero; its relative error is undefined")
    return torch.linalg.vector_norm(a.to(e.dtype) - e, dim=0) / norms


def ihvp_relative_error(approx: Tensor, exact: Tensor) -> float:
    """Mean over the probe columns of ``||Ã⁻¹v - A⁻¹v|| / ||A⁻¹v||`` (solutions already damped).

    Example:
        >>> round(ihvp_relative_error(torch.tensor([1.1, 0.0]), torch.tensor([1.0, 0.0])), 6)
        0.1
    """
    return float(column_relative_errors(approx, exact).mean())


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of the angle between two vectors of shape ``(d,)``.

    Raises:
        ValueError: On a shape mismatch or a zero vector.
    """
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"expected two vectors of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        raise ValueError("the cosine with a zero vector is undefined")
    return float(torch.dot(a.to(b.dtype), b) / (na * nb))


def top_eigenvalue_error(approx: Tensor, exact: Tensor) -> float:
    """Relative error ``||λ̃ - λ|| / ||λ||`` of the top eigenvalues (both sorted decreasingly).

    Args:
        approx: The approximation's ``k`` largest eigenvalues, shape ``(k,)``, any order.
        exact: The reference's ``k`` largest eigenvalues, shape ``(k,)``, any order.

    Raises:
        ValueError: If the lengths differ or the reference eigenvalues are all zero.
    """
    if approx.shape != exact.shape or approx.ndim != 1:
        raise ValueError(
            f"expected two (k,) eigenvalue vectors, got {tuple(approx.shape)}, {tuple(exact.shape)}"
        )
    a = torch.sort(approx.to(exact.dtype), descending=True).values
    e = torch.sort(exact, descending=True).values
    ne = torch.linalg.vector_norm(e)
    if ne == 0:
        raise ValueError("the reference eigenvalues are all zero; relative error undefined")
    return float(torch.linalg.vector_norm(a - e) / ne)
