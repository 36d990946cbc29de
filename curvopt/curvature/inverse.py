r"""Inverses of damped curvature operators, as operators: CG, Neumann series, M-FAC.

For a symmetric operator ``A`` (any curvature operator, a `SquareOperator`, a dense tensor)
and a damping ``\delta > 0`` these represent

$$
(A + \delta I)^{-1},
$$

multiplied onto vectors without forming a matrix:

* `CGInverseOperator` solves ``(A + \delta I) x = b`` by conjugate gradients, all columns of a
  ``(d, k)`` right-hand side at once (one product with ``k`` columns per iteration). Exact up to
  its tolerance for a positive definite ``A + \delta I``; negative curvature (an indefinite
  Hessian with too little damping) raises instead of returning a wrong answer, and so does a
  solve that did not reach its tolerance.
* `NeumannInverseOperator` sums the truncated series
  ``\alpha \sum_{j<K} (I - \alpha (A + \delta I))^j b``, which converges for
  ``0 < \alpha < 2 / \lambda_{max}(A + \delta I)`` and a positive definite ``A + \delta I``
  (default ``\alpha`` from a power-iteration estimate of ``\lambda_{max}``). It is an
  approximation with a fixed cost of ``K`` products; growing terms raise.
* `MFACOperator` makes the M-FAC objects of `curvopt.mfac` operators:
  ``F = \lambda I + G^\top G / m`` with ``@``, and ``F.inverse(damping=)`` their exact
  Woodbury inverse (``damping`` replaces ``\lambda``).

`inverse` (also ``op.inverse(...)`` on every operator) picks one by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .linear_operator import SquareOperator, as_operator, register_inverse

METHODS = ("cg", "neumann")


def check_damping(damping: Any, name: str = "damping") -> float:
    """Return ``damping`` as a float, or raise for a non-positive or non-finite value.

    Example:
        >>> check_damping(1e-3)
        0.001
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(damping).__name__}")
    if not math.isfinite(damping) or damping <= 0:
        raise ValueError(
            f"{name} must be a positive finite number, got {damping!r}; the damped matrix "
            "A + damping * I needs damping > 0 to be invertible for a merely semi-definite A"
        )
    return float(damping)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _DampedInverse(SquareOperator):
    """Common part: the wrapped operator and its damping."""

    def __init__(self, A: Any, damping: float) -> None:
        op = as_operator(A)
        self._damping = check_damping(damping)
        super().__init__(op.shape[0], op.dtype, op.device, op._shapes)
        self._A = op

    @property
    def damping(self) -> float:
        """The damping ``delta`` added to the diagonal."""
        return self._damping

    def _damped(self, X: Tensor) -> Tensor:
        """``(A + delta I) X``."""
        return (self._A @ X).add_(X, alpha=self._damping)


class CGInverseOperator(_DampedInverse):
    r"""``(A + \delta I)^{-1}`` by conjugate gradients (see the module docstring).

    Every column ``b`` is solved until ``||r|| <= max(rtol ||b||, atol)`` (``r`` the residual
    ``b - (A + \delta I) x``), with the columns of one ``(d, k)`` input in lockstep (converged
    ones are frozen). In exact arithmetic CG ends after at most ``d`` iterations.

    Args:
        A: A symmetric operator (curvature operator, `SquareOperator` or dense tensor).
        damping: ``\delta > 0``.
        rtol: Relative tolerance on the residual norm.
        atol: Absolute tolerance on the residual norm.
        maxiter: Maximum number of iterations (products); default ``10 d``.

    Raises:
        ValueError: For a non-square ``A``, ``damping <= 0``, or (in products) when
            ``A + \delta I`` shows non-positive curvature ``p^T (A + \delta I) p <= 0``.
        RuntimeError: In products, when a column did not converge within ``maxiter``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> inv = CGInverseOperator(A, damping=1.0)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> torch.allclose(inv @ b, torch.linalg.solve(A + torch.eye(2), b))
        True
    """

    def __init__(
        self,
        A: Any,
        damping: float,
        *,
        rtol: float = 1e-6,
        atol: float = 0.0,
        maxiter: int | None = None,
    ) -> None:
        super().__init__(A, damping)
        if not (rtol >= 0 and atol >= 0) or (rtol == 0 and atol == 0):
            raise ValueError(f"need rtol >= 0 and atol >= 0, not both 0; got {rtol}, {atol}")
        self._rtol, self._atol = float(rtol), float(atol)
        self._maxiter = 10 * self._dim if maxiter is None else _positive_int(maxiter, "maxiter")
        self.last_iterations = 0

    def _matmat(self, B: Tensor) -> Tensor:
        X = torch.zeros_like(B)
        R = B.clone()
        P = R.clone()
        rr = (R * R).sum(0)
        stop = torch.clamp(self._rtol * rr.sqrt(), min=self._atol) ** 2
        active = rr > stop
        it = 0
        while bool(active.any()):
            if it == self._maxiter:
                worst = float((rr.sqrt() / B.norm(dim=0).clamp_min(1e-300)).max())
                raise RuntimeError(
                    f"CG did not converge in maxiter={self._maxiter} iterations (relative "
                    f"residual {worst:.2e} > rtol={self._rtol:g}); raise maxiter or damping"
                )
            AP = self._damped(P)
            pAp = (P * AP).sum(0)
            if bool((pAp[active] <= 0).any()):
                raise ValueError(
                    "CG met non-positive curvature p^T (A + damping I) p <= 0: the damped "
                    f"operator is not positive definite at damping={self._damping:g}. Increase "
                    "damping (above -lambda_min(A)) or use a positive semi-definite curvature "
                    "(GGN, Fisher) instead of an indefinite Hessian"
                )
            alpha = torch.where(active, rr / torch.where(active, pAp, 1.0), 0.0)
            X.add_(P * alpha)
            R.sub_(AP * alpha)
            rr_new = (R * R).sum(0)
            beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
            P = R + P * beta
            rr = rr_new
            active = active & (rr > stop)
            it += 1
        self.last_iterations = it
        return X


class NeumannInverseOperator(_DampedInverse):
    r"""``(A + \delta I)^{-1}`` by a truncated Neumann series (see the module docstring).

    $$
    (A + \delta I)^{-1} b \approx \alpha \sum_{j=0}^{K-1} \big(I - \alpha (A + \delta I)\big)^j b,
    $$

    whose error is ``(I - \alpha M)^K M^{-1} b`` (``M = A + \delta I``): it shrinks like
    ``(1 - \alpha \lambda_{min}(M))^K``, so it is accurate only when ``K`` is large against
    the condition number. Costs exactly ``K - 1`` products.

    Args:
        A: A symmetric positive semi-definite operator.
        damping: ``\delta > 0``.
        num_terms: ``K >= 1``.
        scale: ``\alpha``; by default ``1 / \lambda_{max}(M)`` estimated with 30 power
            iterations (one product of one column each, at construction, seeded).

    Raises:
        ValueError: For ``damping <= 0``, ``num_terms < 1``, ``scale <= 0``, a non-square
            ``A``, or (in products) a diverging series (``M`` indefinite or ``scale`` above
            ``2 / \lambda_{max}``).

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> inv = NeumannInverseOperator(A, damping=1.0, num_terms=200)
        >>> torch.allclose(inv @ torch.ones(3, dtype=torch.float64),
        ...                1 / torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64))
        True
    """

    def __init__(
        self, A: Any, damping: float, *, num_terms: int = 100, scale: float | None = None
    ) -> None:
        super().__init__(A, damping)
        self._num_terms = _positive_int(num_terms, "num_terms")
        if scale is None:
            scale = 1.0 / self._largest_eigenvalue()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive float, got {scale!r}")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        """The scale ``alpha`` of the series."""
        return self._scale

    def _largest_eigenvalue(self, iterations: int = 30) -> float:
        gen = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(self._dim, 1, generator=gen, dtype=self.dtype, device=self.device)
        x /= x.norm()
        lam = self._damping
        for _ in range(iterations):
            y = self._damped(x)
            lam = float(y.norm())
            if lam == 0.0 or not math.isfinite(lam):
                break
            x = y / lam
        # power iteration approaches lambda_max from below: 1/lam is safe up to a factor 2
        return max(lam, self._damping)

    def _matmat(self, B: Tensor) -> Tensor:
        term = B.clone()
        out = B.clone()
        first = B.norm(dim=0)
        for _ in range(self._num_terms - 1):
            term = term - self._scale * self._damped(term)
            out.add_(term)
            norm = term.norm(dim=0)
            if not bool(torch.isfinite(norm).all()) or bool((norm > 1.5 * first + 1e-300).any()):
                raise ValueError(
                    f"the Neumann series diverges (terms grow) with scale={self._scale:g}: the "
                    "damped operator A + damping I is indefinite, or scale exceeds "
                    "2 / lambda_max; increase damping or lower scale"
                )
        return out.mul_(self._scale)


class MFACOperator(SquareOperator):
    r"""An M-FAC object (`curvopt.mfac.StaticMFAC` or `SlidingWindowMFAC`) as an operator.

    Represents its curvature ``F = \lambda I + G^\top G / m`` (``@`` calls ``mul``);
    ``inverse(damping=None)`` is its exact Woodbury inverse (``ihvp``) at ``\lambda`` or at
    another damping, which then replaces ``\lambda``.

    Args:
        mfac: The M-FAC object (one process; sharded ones are not wrapped).
        dtype: Dtype of the products; default that of ``mfac.G``.

    Example:
        >>> from curvopt.mfac import StaticMFAC
        >>> G = torch.randn(4, 10, dtype=torch.float64)
        >>> F = MFACOperator(StaticMFAC(G, damp=0.1))
        >>> x = torch.randn(10, dtype=torch.float64)
        >>> torch.allclose(F.inverse() @ (F @ x), x)
        True
    """

    def __init__(self, mfac: Any, dtype: torch.dtype | None = None) -> None:
        if not all(hasattr(mfac, a) for a in ("G", "mul", "ihvp", "damp")):
            raise TypeError(
                f"mfac must be a StaticMFAC or SlidingWindowMFAC, got {type(mfac).__name__}"
            )
        if getattr(mfac, "process_group", None) is not None:
            raise ValueError("sharded M-FAC objects (with a process_group) are not wrapped")
        G = mfac.G
        super().__init__(G.shape[1], dtype or G.dtype, G.device)
        self._mfac = mfac

    @property
    def mfac(self) -> Any:
        """The wrapped M-FAC object."""
        return self._mfac

    def _matmat(self, X: Tensor) -> Tensor:
        return self._mfac.mul(X).to(self.dtype)

    def inverse(
        self, method: str = "exact", *, damping: float | None = None, **kwargs: Any
    ) -> SquareOperator:
        """``F^{-1}`` at damping ``damping`` (default: the object's own) by Woodbury."""
        if method != "exact":
            if damping is None:
                raise ValueError(f"method={method!r} needs a damping")
            return super().inverse(method, damping=damping, **kwargs)
        if kwargs:
            raise TypeError(f"unexpected arguments for the exact M-FAC inverse: {sorted(kwargs)}")
        return _MFACInverse(self, None if damping is None else check_damping(damping))


class _MFACInverse(SquareOperator):
    """``F^{-1}`` of an `MFACOperator` by the M-FAC object's ``ihvp``."""

    def __init__(self, F: MFACOperator, damping: float | None) -> None:
        super().__init__(F.shape[0], F.dtype, F.device)
        self._F, self._damping = F, damping

    def _matmat(self, X: Tensor) -> Tensor:
        return self._F.mfac.ihvp(X, damp=self._damping).to(self.dtype)


def inverse(A: Any, method: str = "cg", *, damping: float, **kwargs: Any) -> SquareOperator:
    r"""``(A + \delta I)^{-1}`` of an operator as an operator.

    Args:
        A: A symmetric operator: a curvature operator, a `SquareOperator` or a dense tensor.
        method: ``"cg"`` (`CGInverseOperator`) or ``"neumann"`` (`NeumannInverseOperator`).
        damping: ``\delta > 0``.
        **kwargs: Passed on to the method's class (``rtol``, ``maxiter``, ``num_terms``, ...).

    Raises:
        ValueError: For an unknown method, ``damping <= 0`` or a non-square ``A``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> inv = inverse(A, "cg", damping=0.5)
        >>> torch.allclose(inv.to_dense(), torch.linalg.inv(A + 0.5 * torch.eye(2)))
        True
    """
    if method == "cg":
        return CGInverseOperator(A, damping, **kwargs)
    if method == "neumann":
        return NeumannInverseOperator(A, damping, **kwargs)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


register_inverse(inverse)
