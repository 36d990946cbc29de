"""Damped linear solves ``(H + lam I) x = b`` used by the second-order optimizers.

Two ways to solve with a symmetric positive semi-definite ``H``:

* :func:`damped_cholesky_solve` factorizes the dense ``(d, d)`` matrix ``H + lam I`` (small ``d``).
* :func:`fixed_iteration_cg` runs plain CG for a fixed number of iterations without host syncs
  (natural policy gradient's solve).
* :func:`conjugate_gradient` runs preconditioned CG on a matrix-free product ``v -> (H + lam I) v``
  (large ``d``); each iteration costs one product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def damped_cholesky_solve(H: Tensor, lam: float | Tensor, b: Tensor) -> Tensor | None:
    """Solve ``(H + lam I) x = b`` by a Cholesky factorization.

    Args:
        H: Dense symmetric ``(d, d)`` matrix.
        lam: Damping added to the diagonal.
        b: Right-hand side ``(d,)``.

    Returns:
        The solution ``x`` of shape ``(d,)``, or ``None`` when ``H + lam I`` is not positive
        definite (the factorization failed), so the caller can increase ``lam`` and try again.

    Example:
        >>> H = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> x = damped_cholesky_solve(H, 1.0, torch.tensor([3.0, 2.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64))
        True
    """
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return None
    return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    precond: Callable[[Tensor], Tensor] | None = None,
    x0: Tensor | None = None,
    rtol: float = 1e-10,
    maxiter: int | None = None,
) -> tuple[Tensor | None, int]:
    """Preconditioned conjugate gradient for ``A x = b`` with symmetric positive definite ``A``.

    Stops when ``||A x - b|| <= rtol * ||b||`` or after ``maxiter`` iterations (default ``2 d``).
    A search direction ``p`` with ``p^T A p <= 0`` proves that ``A`` is not positive definite;
    the solver then returns ``None`` as the solution (like a failed Cholesky factorization).

    Args:
        matvec: ``v -> A v`` on ``(d,)`` tensors.
        b: Right-hand side ``(d,)``.
        precond: ``r -> M^{-1} r`` for a symmetric positive definite ``M ~ A``; identity if None.
        x0: Starting point (zeros if None), e.g. the previous solution for a nearby system.
        rtol: Relative residual tolerance.
        maxiter: Iteration limit.

    Returns:
        ``(x, iterations)``, with ``x = None`` if ``A`` was found not to be positive definite.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, _ = conjugate_gradient(lambda v: A @ v, b)
        >>> torch.allclose(A @ x, b)
        True
    """
    if maxiter is None:
        maxiter = 2 * b.numel()
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    b_norm = torch.linalg.vector_norm(b)
    if float(b_norm) == 0.0:
        return torch.zeros_like(b), 0
    target = rtol * float(b_norm)
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    it = 0
    while it < maxiter and float(torch.linalg.vector_norm(r)) > target:
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if float(pAp) <= 0.0:  # A is not positive definite along p
            return None, it
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        z = precond(r) if precond is not None else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
    return x, it


def fixed_iteration_cg(
    matvec: Callable[[Tensor], Tensor], b: Tensor, max_iter: int = 10, tol: float = 1e-10
) -> Tensor:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given only ``v -> A v``.

    Starts at ``x = 0`` and stops after ``max_iter`` iterations or when ``‖r‖² <= tol · ‖b‖²``
    (relative, so the iterates scale with ``b``: ``x(c b) = c x(b)``), or when ``‖r‖²`` falls
    below the smallest normal number of the dtype (the absolute floor). The stopping test is
    evaluated without a host sync by freezing the iterate once converged (so the
    loop always runs ``max_iter`` products). This is the TRPO/NPG recipe (10 iterations); unlike
    :func:`conjugate_gradient` it never reads a value on the host, so it can run inside CUDA graphs,
    but it neither preconditions nor detects an indefinite ``A``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> fixed_iteration_cg(lambda v: A @ v, torch.tensor([1.0, 2.0]), max_iter=2)
        tensor([0.0909, 0.6364])
    """
    if max_iter <= 0:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    threshold = torch.clamp_min(tol * rr, torch.finfo(b.dtype).tiny)
    for _ in range(max_iter):
        active = rr > threshold
        ap = matvec(p)
        pap = p @ ap
        alpha = torch.where(active, rr / torch.where(pap > 0, pap, torch.ones_like(pap)), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        beta = torch.where(active, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), 0.0)
        p = torch.where(active, r + beta * p, p)
        rr = torch.where(active, rr_new, rr)
    return x
