r"""Girard-Hutchinson estimators of the trace, the diagonal and the squared Frobenius norm.

With ``N`` test vectors ``v_n`` of i.i.d. Rademacher (or standard normal) entries, so that
``E[v v^T] = I``:

$$
\operatorname{tr}(A) \approx \frac{1}{N} \sum_n v_n^\top A v_n, \qquad
\operatorname{diag}(A) \approx \frac{1}{N} \sum_n v_n \odot A v_n, \qquad
\|A\|_F^2 \approx \frac{1}{N} \sum_n \|A v_n\|^2 .
$$

All three are unbiased, with standard deviations ``O(1 / \sqrt{N})``: for Rademacher vectors
and symmetric ``A`` the trace estimate has variance ``2 (\|A\|_F^2 - \sum_i A_{ii}^2) / N``.
References: Girard (1989), Hutchinson (1989); Bekas, Kokiopoulou, Saad (2007) for the
diagonal. With ``num_matvecs >= d`` the exact value is returned (see the package docstring).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import (
    check_budget,
    exact_diagonal,
    exact_squared_fro,
    operand,
    random_vectors,
)


def _products(A: Any, num_matvecs: int, distribution: str, generator: Any, chunk: int = 64):
    """Yield ``(V, A V)`` over chunks of the ``num_matvecs`` test vectors."""
    done = 0
    while done < num_matvecs:
        k = min(chunk, num_matvecs - done)
        V = random_vectors(A, k, distribution, generator)
        yield V, A @ V
        done += k


def hutchinson_trace(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate ``tr(A)`` by Girard-Hutchinson (see the module docstring).

    Args:
        A: A square operator (curvature operator, `SquareOperator`, dense tensor).
        num_matvecs: Number of test vectors ``N >= 1`` (one product each).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Source of randomness.

    Returns:
        A 0-dim tensor in ``A``'s dtype.

    Raises:
        ValueError: If ``num_matvecs < 1`` or ``A`` is not square.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> gen = torch.Generator().manual_seed(0)
        >>> float(hutchinson_trace(A, 10, generator=gen))  # diagonal A: exact for Rademacher
        5050.0
    """
    # the trace estimate is the sum of the diagonal one (same test vectors)
    return hutchinson_diag(A, num_matvecs, distribution, generator).sum()


def hutchinson_diag(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate ``diag(A)`` by ``mean_n v_n \odot A v_n`` (see the module docstring).

    Args:
        A: A square operator.
        num_matvecs: Number of test vectors ``N >= 1``.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Source of randomness.

    Returns:
        ``(d,)`` in ``A``'s dtype.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
        >>> hutchinson_diag(A, 1)  # budget >= d: exact
        tensor([2., 3.])
    """
    op = operand(A)
    num_matvecs = check_budget(num_matvecs)
    if num_matvecs >= op.shape[0]:
        return exact_diagonal(op)
    total = torch.zeros(op.shape[0], dtype=op.dtype, device=op.device)
    for V, AV in _products(op, num_matvecs, distribution, generator):
        total += (V * AV).sum(1)
    return total / num_matvecs


def hutchinson_squared_fro(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate ``||A||_F^2 = tr(A^T A)`` by ``mean_n ||A v_n||^2``.

    Unbiased for the squared norm; its square root is a (slightly low-biased) estimate of
    ``||A||_F``.

    Args:
        A: A square operator.
        num_matvecs: Number of test vectors ``N >= 1``.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Source of randomness.

    Returns:
        A 0-dim tensor in ``A``'s dtype.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        >>> float(hutchinson_squared_fro(A, 2))  # budget >= d: exact
        10.0
    """
    op = operand(A)
    num_matvecs = check_budget(num_matvecs)
    if num_matvecs >= op.shape[0]:
        return exact_squared_fro(op)
    total = torch.zeros((), dtype=op.dtype, device=op.device)
    for _, AV in _products(op, num_matvecs, distribution, generator):
        total = total + (AV * AV).sum()
    return total / num_matvecs
