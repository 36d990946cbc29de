"""Shared pieces of the estimators: operand conversion, budgets, random test vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..linear_operator import SquareOperator, as_operator

DISTRIBUTIONS = ("rademacher", "normal")


def operand(A: Any) -> SquareOperator:
    """``A`` as a square operator (ValueError if it is not square, TypeError if no operator)."""
    return as_operator(A)


def check_budget(num_matvecs: Any, minimum: int = 1, name: str = "num_matvecs") -> int:
    """Return the budget of products, or raise ValueError below ``minimum``."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int):
        raise TypeError(f"{name} must be an integer, got {type(num_matvecs).__name__}")
    if num_matvecs < minimum:
        raise ValueError(
            f"{name} must be at least {minimum} (matrix-vector products the estimate may "
            f"use), got {num_matvecs}"
        )
    return num_matvecs


def random_vectors(
    A: SquareOperator,
    k: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(d, k)`` test vectors with ``E[v v^T] = I`` in ``A``'s dtype and on its device.

    Args:
        A: The operator (dimension, dtype, device).
        k: Number of vectors.
        distribution: ``"rademacher"`` (entries +-1) or ``"normal"`` (standard normal).
        generator: Source of randomness (its device is used for sampling); torch's global
            generator if None.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    device = generator.device if generator is not None else A.device
    shape = (A.shape[0], k)
    if distribution == "normal":
        V = torch.randn(shape, generator=generator, dtype=A.dtype, device=device)
    else:
        V = torch.randint(0, 2, shape, generator=generator, device=device).to(A.dtype)
        V = V.mul_(2).sub_(1)
    return V.to(A.device)


def identity_columns(A: SquareOperator, chunk: int = 64):
    """Yield ``(start, stop, A[:, start:stop])`` over chunks of identity columns."""
    d = A.shape[0]
    for start in range(0, d, chunk):
        stop = min(start + chunk, d)
        E = torch.zeros(d, stop - start, dtype=A.dtype, device=A.device)
        E[start:stop] = torch.eye(stop - start, dtype=A.dtype, device=A.device)
        yield start, stop, A @ E


def exact_diagonal(A: SquareOperator) -> Tensor:
    """``diag(A)`` from ``d`` products with identity columns."""
    out = torch.empty(A.shape[0], dtype=A.dtype, device=A.device)
    for start, stop, cols in identity_columns(A):
        out[start:stop] = cols[start:stop].diagonal()
    return out


def exact_squared_fro(A: SquareOperator) -> Tensor:
    """``||A||_F^2`` from ``d`` products with identity columns."""
    total = torch.zeros((), dtype=A.dtype, device=A.device)
    for _, _, cols in identity_columns(A):
        total = total + (cols * cols).sum()
    return total


def orthonormal_basis(Y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``Y`` (reduced QR)."""
    return torch.linalg.qr(Y, mode="reduced").Q
