r"""XTrace and XDiag: exchangeable trace and diagonal estimators (Epperly, Tropp, Webber 2024).

With a budget of ``m`` products, ``s = m // 2`` test vectors ``\Omega = [\omega_1 ... \omega_s]``
(Rademacher or normal), ``Y = A \Omega`` and, for each ``i``, the orthogonal projector ``P_i``
onto the span of ``Y`` without its column ``i``:

$$
\widehat{\operatorname{tr}} = \frac{1}{s} \sum_{i=1}^{s} \Big[
  \operatorname{tr}(P_i A) + \omega_i^\top (I - P_i) A (I - P_i) \omega_i \Big],
\qquad
\widehat{\operatorname{diag}} = \frac{1}{s} \sum_{i=1}^{s} \Big[
  \operatorname{diag}(P_i A) + \omega_i \odot (I - P_i) A \omega_i \Big].
$$

Each term is unbiased, since ``P_i`` does not depend on ``\omega_i`` and
``E[\omega \omega^\top] = I``; every test vector serves both as a sketch (for the other
terms) and as a Hutchinson vector (for its own), the exchangeability principle of the paper.
For symmetric ``A`` all ``P_i`` live in the span of ``Q``, an orthonormal basis of ``Y``: with
``Y = Q R`` and ``C_i`` an orthonormal basis of ``R`` without column ``i``, ``P_i = Q C_i
C_i^T Q^T``, so the ``s`` products ``Z = A Q`` give every term (``m = 2 s`` products in all)
and the small ``s x s`` algebra is batched over ``i``.

This is the plain exchangeable estimator of the paper (its section 2), without the optional
normalization of the test vectors. It is exact, up to rounding, when ``A`` has rank at most
``s - 1``; with ``num_matvecs >= d`` the exact value is returned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import check_budget, exact_diagonal, operand, orthonormal_basis, random_vectors


def _sketch(op: Any, num_matvecs: int, distribution: str, generator: Any):
    """``Omega, Y = A Omega, Q, R, Z = A Q`` and the projector cores ``M_i = C_i C_i^T``."""
    s = num_matvecs // 2
    Om = random_vectors(op, s, distribution, generator)
    Y = op @ Om
    Q, R = torch.linalg.qr(Y, mode="reduced")
    Z = op @ Q
    idx = torch.arange(s, device=R.device)
    keep = idx[None, :] != idx[:, None]  # (s, s): row i keeps the columns j != i
    if s == 1:  # no other column: P_1 = 0, plain Hutchinson
        return Om, Y, Q, R, Z, torch.zeros(1, 1, 1, dtype=R.dtype, device=R.device)
    C = orthonormal_basis(torch.stack([R[:, keep[i]] for i in range(s)]))  # (s, s, s - 1)
    M = C @ C.transpose(1, 2)  # (s, s, s): P_i = Q M_i Q^T
    return Om, Y, Q, R, Z, M


def xtrace(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate ``tr(A)`` of a symmetric ``A`` by XTrace (see the module docstring).

    Args:
        A: A symmetric square operator (curvature operator, `SquareOperator`, dense tensor).
        num_matvecs: Budget ``m >= 2`` of products; ``s = m // 2`` test vectors (an odd budget
            leaves one product unused).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Source of randomness.

    Returns:
        A 0-dim tensor in ``A``'s dtype.

    Raises:
        ValueError: If ``num_matvecs < 2`` or ``A`` is not square.

    Example:
        >>> B = torch.randn(40, 3, dtype=torch.float64)
        >>> A = B @ B.T  # rank 3 <= s - 1: exact
        >>> est = xtrace(A, 10, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.isclose(est, A.trace()))
        True
    """
    op = operand(A)
    num_matvecs = check_budget(num_matvecs, minimum=2)
    if num_matvecs >= op.shape[0]:
        return exact_diagonal(op).sum()
    Om, Y, Q, R, Z, M = _sketch(op, num_matvecs, distribution, generator)
    H = Q.T @ Z  # Q^T A Q
    top = (M * H[None]).sum((1, 2))  # tr(M_i H) = tr(P_i A)
    W = Q.T @ Om
    U = torch.einsum("iab,bi->ai", M, W)  # column i: M_i Q^T omega_i
    r = Om - Q @ U  # (I - P_i) omega_i
    Ar = Y - Z @ U  # A (I - P_i) omega_i
    return (top + (r * Ar).sum(0)).mean()


def xdiag(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate ``diag(A)`` of a symmetric ``A`` by XDiag (see the module docstring).

    Args:
        A: A symmetric square operator.
        num_matvecs: Budget ``m >= 2`` of products (``s = m // 2`` test vectors).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Source of randomness.

    Returns:
        ``(d,)`` in ``A``'s dtype.

    Example:
        >>> B = torch.randn(30, 2, dtype=torch.float64)
        >>> A = B @ B.T
        >>> est = xdiag(A, 8, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(est, A.diagonal())
        True
    """
    op = operand(A)
    num_matvecs = check_budget(num_matvecs, minimum=2)
    if num_matvecs >= op.shape[0]:
        return exact_diagonal(op)
    Om, Y, Q, R, Z, M = _sketch(op, num_matvecs, distribution, generator)
    top = ((Q @ M.mean(0)) * Z).sum(1)  # mean_i diag(Q M_i Q^T A), A symmetric
    U = torch.einsum("iab,bi->ai", M, R)  # column i: M_i Q^T A omega_i
    return top + (Om * (Y - Q @ U)).mean(1)
