"""The small m x m algebra of M-FAC, always in float64.

With ``G`` the m x d gradient matrix, ``K = G G^T`` and damping ``lam``, Woodbury's identity gives

.. math::

    F^{-1} = (\\lambda I + G^\\top G / m)^{-1}
           = \\lambda^{-1} I - \\lambda^{-2} G^\\top A^{-1} G,
    \\qquad A = m I + K / \\lambda,

so every M-FAC quantity needs only ``A`` (SPD, eigenvalues >= m) and products with ``G``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def woodbury_matrix(K: Tensor, m: int, damp: float) -> Tensor:
    """``A = m I + K / damp`` for ``K`` ``(..., n, n)`` (float64)."""
    A = K / damp
    A.diagonal(dim1=-2, dim2=-1).add_(float(m))
    return A


def cholesky(K: Tensor, m: int, damp: float, check: bool = True) -> Tensor:
    """Lower Cholesky factor of ``A = m I + K / damp`` (batched over leading dimensions).

    Args:
        K: ``(..., n, n)`` float64 Gram matrices.
        m: Window size (the ``m`` in ``A``).
        damp: Damping ``lam > 0``.
        check: Raise if the factorization fails (costs a host synchronization).

    Raises:
        ValueError: If ``A`` is not numerically positive definite (``damp`` far too small for
            the scale of the gradients).
    """
    L, info = torch.linalg.cholesky_ex(woodbury_matrix(K, m, damp))
    if check and bool((info != 0).any()):
        raise ValueError(
            f"m*I + G G^T/damp is not numerically positive definite at damp={damp}; "
            "increase damp or rescale the gradients"
        )
    return L


def replace_row_inverse(
    Ainv: Tensor, r: int, row: Tensor, diag: float | Tensor, rhs: Tensor | None = None
) -> Tensor | None:
    r"""Update ``Ainv = A^{-1}`` in place when row and column ``r`` of SPD ``A`` are replaced.

    Bordering (block inverse) in two exact steps, fused into one rank-2 update: removing index
    ``r`` gives the inverse of the remaining principal submatrix (embedded with a zero row and
    column ``r``), ``E = A^{-1} - b b^T / beta`` with ``b = A^{-1} e_r``, ``beta = b_r > 0``;
    adding the new row ``a`` (zero at ``r``) with diagonal entry ``alpha`` gives

    .. math::

        A_+^{-1} = E + w w^\top / s,\quad z = E a,\quad s = \alpha - a^\top z,
        \quad w = z - e_r,

    where ``s`` (a Schur complement) is at least the smallest eigenvalue of ``A_+``. Both pivots
    are positive, unlike a generic indefinite rank-2 Woodbury update. Cost ``O(n^2)``: one pass
    over ``Ainv`` for ``A^{-1} [a, rhs]`` and one rank-2 in-place update.

    Args:
        Ainv: ``(n, n)`` float64 inverse, updated in place (may be a view).
        r: Index of the replaced row/column.
        row: ``(n,)`` float64 new off-diagonal entries of row ``r`` (entry ``r`` is ignored).
        diag: New diagonal entry ``A_+[r, r]``.
        rhs: Optional ``(n, k)`` float64 right-hand sides; then ``A_+^{-1} rhs`` is returned.

    Returns:
        ``A_+^{-1} rhs`` or None.
    """
    a = row.clone()
    a[r] = 0.0
    b = Ainv[:, r].clone()
    beta = b[r]
    cols = a[:, None] if rhs is None else torch.cat([a[:, None], rhs], dim=1)
    Z = Ainv @ cols  # the one pass over Ainv
    Zr = Z - b[:, None] * ((b @ cols) / beta)  # E @ [a, rhs]
    z = Zr[:, 0]
    s = diag - torch.dot(a, z)
    w = z.clone()
    w[r] -= 1.0
    U = torch.stack([b, w], dim=1)  # (n, 2)
    coef = torch.stack([-1.0 / beta, 1.0 / s])
    out = None
    if rhs is not None:
        out = Zr[:, 1:] + w[:, None] * ((w @ rhs) / s)
    Ainv.addmm_(U * coef, U.T)
    return out


def rank2_row_replace(
    Ainv: Tensor, r: int, delta: Tensor, rhs: Tensor | None = None
) -> Tensor | None:
    """Update ``Ainv = A^{-1}`` in place after row and column ``r`` of ``A`` change by ``delta``.

    The new matrix is ``A + e_r delta^T + delta e_r^T - delta_r e_r e_r^T``: a symmetric rank-2
    change ``U S U^T`` with ``U = [e_r, u]``, ``u = delta - delta_r e_r / 2`` and
    ``S = [[0, 1], [1, 0]]``. Woodbury's identity gives, in ``O(n^2)``,

    .. math:: A_+^{-1} = A^{-1} - W (S + U^\\top A^{-1} U)^{-1} W^\\top,\\quad W = A^{-1} U.

    Args:
        Ainv: ``(n, n)`` float64 inverse, updated in place (may be a view).
        r: Row that changed.
        delta: ``(n,)`` float64 change of row ``r`` of ``A`` (including the diagonal entry).
        rhs: Optional ``(n, k)`` float64 right-hand sides; if given, ``A_+^{-1} rhs`` is returned
            computed in the same pass over ``Ainv``.

    Returns:
        ``A_+^{-1} rhs`` or None.
    """
    u = delta.clone()
    u[r] = 0.5 * delta[r]
    cols = u[:, None] if rhs is None else torch.cat([u[:, None], rhs], dim=1)
    Z = Ainv @ cols  # one pass over Ainv for A^{-1} u and A^{-1} rhs
    W = torch.stack([Ainv[:, r], Z[:, 0]], dim=1)  # (n, 2) = A^{-1} U
    a = W[r, 0]  # e_r^T A^{-1} e_r
    b = W[r, 1] + 1.0  # S + U^T A^{-1} U, off-diagonal
    c = torch.dot(u, Z[:, 0])  # u^T A^{-1} u
    det = a * c - b * b
    Minv = torch.stack([torch.stack([c, -b]), torch.stack([-b, a])]) / det
    WM = W @ Minv
    out = None
    if rhs is not None:
        out = Z[:, 1:] - WM @ (W.T @ rhs)
    Ainv.addmm_(WM, W.T, alpha=-1.0)
    return out
