"""The curvature approximations the harness compares, behind one small interface.

Every approximation ``Ã`` of the ``d x d`` curvature answers three questions after a one-off
:meth:`Approximation.setup`: the damped inverse-Hessian-vector product ``(Ã + lam I)^{-1} V``
(:meth:`~Approximation.ihvp`), the undamped product ``Ã V`` (:meth:`~Approximation.matvec`) and its
largest eigenvalues (:meth:`~Approximation.top_eigenvalues`). ``V`` is ``(d, k)``.

Families (:func:`default_approximations` builds the standard set):

| name | what |
| --- | --- |
| ``hessian`` | exact Hessian, ``curvopt.curvature.HessianOperator`` |
| ``ggn`` | generalized Gauss-Newton, ``curvopt.curvature.GGNOperator`` |
| ``fisher`` | exact Fisher (expectation over the model's labels), ``FisherOperator`` |
| ``fisher_mc`` | Monte-Carlo Fisher, ``FisherOperator(mc_samples=1)`` |
| ``empirical_fisher`` | empirical Fisher ``(1/N) sum_n g_n g_n^T``, ``EmpiricalFisherOperator`` |
| ``hutchinson_diag`` | Hutchinson diagonal ``abs(mean_s z_s * (H z_s))`` (Rademacher ``z``) |
| ``sqgrad_diag`` | squared-gradient diagonal ``(1/N) sum_n g_n * g_n`` (diagonal of the EF) |
| ``kfac`` | native K-FAC, ``curvopt.curvature.KFACOperator`` (type-2: exact GGN factors) |
| ``ekfac`` | native EK-FAC, ``curvopt.curvature.EKFACOperator`` (type-2) |
| ``mfac_m{m}`` | M-FAC, ``F = lam I + G^T G / m`` on ``m`` per-sample gradients |

Exact operators are materialized (``to_dense``) and eigendecomposed when ``d`` is at most
``max_dense_dim``; beyond that they are used matrix-free (MINRES for the IHVP, Lanczos for the
eigenvalues).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh, minres
from torch import Tensor

from .problems import Problem


def _as_columns(V: Tensor) -> tuple[Tensor, bool]:
    return (V.unsqueeze(1), True) if V.ndim == 1 else (V, False)


def lanczos_top_eigenvalues(
    matvec: Callable[[Tensor], Tensor], dim: int, k: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The ``k`` largest (algebraic) eigenvalues of a symmetric operator by Lanczos (``eigsh``).

    Args:
        matvec: Maps a ``(d, j)`` tensor to the operator times it.
        dim: ``d``.
        k: Number of eigenvalues, ``1 <= k``; for ``k >= d - 1`` the operator is materialized.
        dtype: Dtype of the vectors passed to ``matvec``.
        device: Device of the vectors passed to ``matvec``.

    Returns:
        Tensor of shape ``(min(k, d),)`` in decreasing order (float64, CPU).
    """
    if k >= dim - 1:
        dense = matvec(torch.eye(dim, dtype=dtype, device=device)).double().cpu()
        return torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)[:k]

    def mv(x: np.ndarray) -> np.ndarray:
        X = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(dim, -1)).to(device, dtype)
        return matvec(X).double().cpu().numpy().reshape(x.shape)

    op = LinearOperator((dim, dim), matvec=mv, matmat=mv, dtype=np.float64)
    vals = eigsh(op, k=k, which="LA", return_eigenvectors=False, tol=1e-10, v0=np.ones(dim))
    return torch.from_numpy(np.sort(vals)[::-1].copy())


class Approximation(ABC):
    """One curvature approximation ``Ã``: set up once, then damped inverse products.

    Subclasses set :attr:`name` and :attr:`family` and implement :meth:`_setup`, :meth:`ihvp` and
    :meth:`matvec`; :meth:`top_eigenvalues` defaults to Lanczos on :meth:`matvec`.

    Attributes:
        name: Method name used in tables and as the JSON ``method`` field.
        family: ``exact``, ``diagonal``, ``kronecker`` or ``low-rank``.
        m: Number of gradients for M-FAC, else ``None``.
        solver: How :meth:`ihvp` solves: ``dense-eigh``, ``minres``, ``elementwise``, ``kronecker``
            or ``woodbury``.
    """

    name: str = "approximation"
    family: str = "exact"
    m: int | None = None
    solver: str = ""
    damping_after_setup: bool = True

    def __init__(self) -> None:
        self.damping: float = 0.0
        self.dim: int = 0
        self.dtype: torch.dtype = torch.float64
        self.device: torch.device = torch.device("cpu")

    def setup(self, problem: Problem, damping: float) -> None:
        """Build everything the products need (timed by the runner as the setup time).

        Args:
            problem: The problem at its current parameters.
            damping: ``lam > 0`` added to the approximation before inversion.

        Raises:
            ValueError: If ``damping`` is not positive and finite.
        """
        if not (damping > 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be positive and finite, got {damping}")
        self.damping = float(damping)
        self.dim, self.dtype, self.device = problem.num_params, problem.dtype, problem.device
        self._setup(problem)

    @abstractmethod
    def _setup(self, problem: Problem) -> None:
        """Subclass hook of :meth:`setup`."""

    @abstractmethod
    def ihvp(self, V: Tensor) -> Tensor:
        """Return ``(Ã + lam I)^{-1} V`` for ``V`` of shape ``(d,)`` or ``(d, k)`` (same shape)."""

    @abstractmethod
    def matvec(self, V: Tensor) -> Tensor:
        """Return the undamped product ``Ã V`` for ``V`` of shape ``(d,)`` or ``(d, k)``."""

    def top_eigenvalues(self, k: int) -> Tensor:
        """The ``k`` largest eigenvalues of the undamped ``Ã``, decreasing, shape ``(k,)``."""
        return lanczos_top_eigenvalues(self.matvec, self.dim, k, self.dtype, self.device)

    def set_damping(self, damping: float) -> None:
        """Change ``lam`` after setup (only where the products read it at call time).

        Raises:
            NotImplementedError: If the setup depends on the damping (K-FAC, M-FAC).
        """
        if not self.damping_after_setup:
            raise NotImplementedError(f"{self.name} fixes its damping at setup")
        self.damping = float(damping)

    def state_bytes(self) -> int:
        """Bytes of the tensors the approximation keeps between products."""
        return 0

    def release(self) -> None:  # noqa: B027 - optional hook, nothing to drop by default
        """Drop the state built by :meth:`setup` (the runner calls this after measuring)."""


class _EigenSolver:
    """Damped solves and eigenvalues of a dense symmetric ``(d, d)`` matrix via one ``eigh``."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square (d, d), got {tuple(matrix.shape)}")
        sym = (matrix + matrix.T) / 2
        self.matrix = sym
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(sym)

    def solve(self, V: Tensor, damping: float) -> Tensor:
        Q = self.eigenvectors
        return Q @ ((Q.T @ V) / (self.eigenvalues + damping).unsqueeze(1))

    def top(self, k: int) -> Tensor:
        return self.eigenvalues.flip(0)[:k].double().cpu()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.matrix, self.eigenvectors))


class DenseApproximation(Approximation):
    """An approximation given as an explicit symmetric ``(d, d)`` matrix (for tests and users).

    Args:
        matrix: The undamped approximation ``Ã``.
        name: Method name.
        family: Family label.

    Example:
        >>> approx = DenseApproximation(2.0 * torch.eye(3, dtype=torch.float64), name="2I")
    """

    solver = "dense-eigh"

    def __init__(self, matrix: Tensor, name: str = "dense", family: str = "exact") -> None:
        super().__init__()
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError("matrix must be a square (d, d) tensor")
        self.matrix, self.name, self.family = matrix, name, family
        self._eig: _EigenSolver | None = None

    def _setup(self, problem: Problem) -> None:
        if self.matrix.shape[0] != self.dim:
            raise ValueError(
                f"matrix is {tuple(self.matrix.shape)} but the problem has d = {self.dim} "
                "parameters"
            )
        self._eig = _EigenSolver(self.matrix.to(self.device, self.dtype))

    def ihvp(self, V: Tensor) -> Tensor:  # noqa: D102
        X, vec = _as_columns(V)
        out = self._eig.solve(X, self.damping)
        return out.squeeze(1) if vec else out

    def matvec(self, V: Tensor) -> Tensor:  # noqa: D102
        return self._eig.matrix @ V

    def top_eigenvalues(self, k: int) -> Tensor:  # noqa: D102
        return self._eig.top(k)

    def state_bytes(self) -> int:  # noqa: D102
        return self._eig.nbytes() if self._eig is not None else 0

    def release(self) -> None:  # noqa: D102
        self._eig = None


class OperatorApproximation(Approximation):
    """An exact operator from :mod:`curvopt.curvature`: dense when small, else matrix-free.

    Args:
        name: Method name.
        factory: ``problem -> operator`` with ``op @ V`` and ``op.to_dense()``.
        max_dense_dim: Largest ``d`` for which the operator is materialized and eigendecomposed.
        minres_rtol: Relative residual tolerance of the matrix-free solve.
        chunk_size: Identity columns per product when materializing: fewer passes over the data
            for more memory (on the digits MLP, 256 columns cost about 3x the peak memory of 64
            and a third less time).
    """

    family = "exact"

    def __init__(
        self,
        name: str,
        factory: Callable[[Problem], Any],
        *,
        max_dense_dim: int = 20_000,
        minres_rtol: float = 1e-10,
        chunk_size: int = 256,
    ) -> None:
        super().__init__()
        self.name, self.factory = name, factory
        self.max_dense_dim, self.minres_rtol = max_dense_dim, minres_rtol
        self.chunk_size = chunk_size
        self.op: Any = None
        self._eig: _EigenSolver | None = None

    @property
    def dense(self) -> bool:
        """Whether the operator is materialized (``d <= max_dense_dim``)."""
        return self.dim <= self.max_dense_dim

    def _setup(self, problem: Problem) -> None:
        self.op = self.factory(problem)
        if self.dense:
            self.solver = "dense-eigh"
            self._eig = _EigenSolver(
                self.op.to_dense(chunk_size=self.chunk_size, max_dim=self.max_dense_dim).to(
                    self.dtype
                )
            )
        else:
            self.solver = "minres"

    def ihvp(self, V: Tensor) -> Tensor:  # noqa: D102
        X, vec = _as_columns(V)
        if self._eig is not None:
            out = self._eig.solve(X, self.damping)
        else:
            out = torch.stack([self._minres(X[:, j]) for j in range(X.shape[1])], dim=1)
        return out.squeeze(1) if vec else out

    def _minres(self, b: Tensor) -> Tensor:
        d, lam = self.dim, self.damping

        def mv(x: np.ndarray) -> np.ndarray:
            xt = torch.from_numpy(np.asarray(x, dtype=np.float64).ravel()).to(
                self.device, self.dtype
            )
            return (self.op @ xt + lam * xt).double().cpu().numpy()

        A = LinearOperator((d, d), matvec=mv, dtype=np.float64)
        x, _ = minres(A, b.double().cpu().numpy(), rtol=self.minres_rtol, maxiter=10 * d)
        return torch.from_numpy(x).to(self.device, self.dtype)

    def matvec(self, V: Tensor) -> Tensor:  # noqa: D102
        return self._eig.matrix @ V if self._eig is not None else self.op @ V

    def top_eigenvalues(self, k: int) -> Tensor:  # noqa: D102
        if self._eig is not None:
            return self._eig.top(k)
        return super().top_eigenvalues(k)

    def smallest_eigenvalue(self) -> float | None:
        """The smallest eigenvalue when materialized (to check the damped matrix is definite)."""
        return float(self._eig.eigenvalues[0]) if self._eig is not None else None

    def state_bytes(self) -> int:  # noqa: D102
        return self._eig.nbytes() if self._eig is not None else 0

    def release(self) -> None:  # noqa: D102
        self.op, self._eig = None, None


class DiagonalApproximation(Approximation):
    """A diagonal approximation ``diag(a)``; IHVP ``V / (a + lam)``. Subclasses compute ``a``."""

    family = "diagonal"
    solver = "elementwise"

    def __init__(self) -> None:
        super().__init__()
        self.diagonal: Tensor | None = None

    def ihvp(self, V: Tensor) -> Tensor:  # noqa: D102
        a = self.diagonal + self.damping
        return V / (a if V.ndim == 1 else a.unsqueeze(1))

    def matvec(self, V: Tensor) -> Tensor:  # noqa: D102
        return V * (self.diagonal if V.ndim == 1 else self.diagonal.unsqueeze(1))

    def top_eigenvalues(self, k: int) -> Tensor:  # noqa: D102
        return torch.sort(self.diagonal, descending=True).values[:k].double().cpu()

    def state_bytes(self) -> int:  # noqa: D102
        return (
            self.diagonal.numel() * self.diagonal.element_size() if self.diagonal is not None else 0
        )

    def release(self) -> None:  # noqa: D102
        self.diagonal = None


class HutchinsonDiagonal(DiagonalApproximation):
    """Hutchinson's Hessian diagonal ``|mean_s z_s * (H z_s)|`` with Rademacher probes ``z_s``.

    The absolute value keeps the damped diagonal positive (as in AdaHessian); ``samples`` Hessian-
    vector products are the setup cost.

    Args:
        samples: Number of probe vectors ``z_s``.
        seed: Seed of the probes.
    """

    name = "hutchinson_diag"

    def __init__(self, samples: int = 64, seed: int = 0) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples, self.seed = samples, seed

    def _setup(self, problem: Problem) -> None:
        from curvopt.curvature import HessianOperator

        op = HessianOperator(problem.model, problem.loss_func, problem.params, problem.data)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        Z = torch.randint(0, 2, (self.dim, self.samples), generator=gen).to(self.device, self.dtype)
        Z = 2 * Z - 1
        self.diagonal = (Z * (op @ Z)).mean(dim=1).abs()


class SquaredGradientDiagonal(DiagonalApproximation):
    """Squared-gradient diagonal ``(1/N) sum_n g_n * g_n`` over all per-sample gradients.

    This is the exact diagonal of the empirical Fisher (and the quantity Adam's second moment
    tracks); the per-sample gradients are computed in chunks of ``chunk`` samples.
    """

    name = "sqgrad_diag"

    def __init__(self, chunk: int = 256) -> None:
        super().__init__()
        self.chunk = chunk

    def _setup(self, problem: Problem) -> None:
        n = problem.num_samples
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for start in range(0, n, self.chunk):
            G = problem.per_sample_gradients(range(start, min(n, start + self.chunk)))
            total += (G * G).sum(dim=0)
        self.diagonal = total / n


class KFACApproximation(Approximation):
    """Native K-FAC / EK-FAC (`curvopt.curvature.KFACOperator`, `EKFACOperator`).

    The damped inverse is exact through the factors' eigendecompositions
    (``(A ⊗ B + lam I)^{-1}``, ``KFACOperator.inverse``), so the damping matches the other
    methods. Layers: ``Linear``, ``Conv1d``, ``Conv2d`` and transformers' ``Conv1D``; the
    parameters of other layers (embeddings, normalizations, tied weights) get a zero block, so
    their inverse is ``1 / lam`` (the layers K-FAC leaves out).

    Args:
        fisher_type: ``type-2`` (exact GGN factors), ``mc`` or ``empirical``.
        name: Method name (default ``kfac``, or ``ekfac`` with ``eigenvalue_corrected``).
        seed: Seed of the label sampler (``mc``).
        eigenvalue_corrected: EK-FAC instead of K-FAC.
    """

    family = "kronecker"
    solver = "kronecker"
    damping_after_setup = False

    def __init__(
        self,
        fisher_type: str = "type-2",
        name: str | None = None,
        seed: int = 0,
        eigenvalue_corrected: bool = False,
    ) -> None:
        super().__init__()
        self.name = name or ("ekfac" if eigenvalue_corrected else "kfac")
        self.fisher_type, self.seed, self.corrected = fisher_type, seed, eigenvalue_corrected
        self.op: Any = None
        self.inv: Any = None
        self.index: Tensor | None = None  # positions of the operator's entries in the problem

    def _setup(self, problem: Problem) -> None:
        from curvopt.curvature import EKFACOperator, KFACOperator

        cls = EKFACOperator if self.corrected else KFACOperator
        self.op = cls(
            problem.model,
            problem.loss_func,
            problem.params,
            problem.data,
            fisher_type=self.fisher_type,
            seed=self.seed,
            allow_unsupported=True,
        )
        kept = {id(p) for p in self.op.params}
        index, start = [], 0
        for p in problem.params:
            if id(p) in kept:
                index.append(torch.arange(start, start + p.numel(), device=self.device))
            start += p.numel()
        self.index = torch.cat(index)
        self.inv = self.op.inverse(damping=self.damping)
        self.op.compute_kronecker_factors()
        zero = torch.zeros(self.op.shape[0], 1, dtype=self.dtype, device=self.device)
        self.inv @ zero  # eigendecompositions now, in the setup time

    def _embedded(self, V: Tensor, fn: Callable[[Tensor], Tensor], rest: float) -> Tensor:
        X, single = _as_columns(V)
        out = X * rest
        out[self.index] = fn(X[self.index])
        return out[:, 0] if single else out

    def ihvp(self, V: Tensor) -> Tensor:  # noqa: D102
        return self._embedded(V, lambda X: self.inv @ X, 1.0 / self.damping)

    def matvec(self, V: Tensor) -> Tensor:  # noqa: D102
        return self._embedded(V, lambda X: self.op @ X, 0.0)

    def state_bytes(self) -> int:  # noqa: D102
        if self.op is None:
            return 0
        total = 0
        for b in self.op._blocks:
            for t in [b.A, b.B, *b.eig.values()]:
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total

    def release(self) -> None:  # noqa: D102
        self.op, self.inv = None, None


class MFACApproximation(Approximation):
    """M-FAC (:class:`curvopt.mfac.StaticMFAC`) on ``m`` per-sample gradients (no replacement).

    ``F = lam I + G^T G / m``; as ``m`` grows it approaches the damped empirical Fisher. The setup
    time includes computing the ``m`` per-sample gradients.

    Args:
        m: Number of gradients, at most the number of samples.
        block_size: Optional block width (block-diagonal M-FAC).
        seed: Seed of the sample draw.
    """

    family = "low-rank"
    solver = "woodbury"
    damping_after_setup = False

    def __init__(self, m: int, block_size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        self.m, self.block_size, self.seed = m, block_size, seed
        self.name = f"mfac_m{m}" if block_size is None else f"mfac_m{m}_b{block_size}"
        self.mfac: Any = None

    def _setup(self, problem: Problem) -> None:
        from curvopt.mfac import StaticMFAC

        n = problem.num_samples
        if self.m > n:
            raise ValueError(f"m = {self.m} exceeds the number of samples N = {n}")
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        idx = torch.randperm(n, generator=gen)[: self.m]
        grads = problem.per_sample_gradients(idx)
        self.mfac = StaticMFAC(grads, self.damping, block_size=self.block_size)

    def ihvp(self, V: Tensor) -> Tensor:  # noqa: D102
        return self.mfac.ihvp(V)

    def matvec(self, V: Tensor) -> Tensor:  # noqa: D102
        return self.mfac.mul(V) - self.damping * V

    def state_bytes(self) -> int:  # noqa: D102
        return int(self.mfac.memory_bytes()) if self.mfac is not None else 0

    def release(self) -> None:  # noqa: D102
        self.mfac = None


def _curvature_factory(kind: str, mc_samples: int = 1, seed: int = 0) -> Callable[[Problem], Any]:
    def build(problem: Problem) -> Any:
        import curvopt.curvature as cv

        args = (problem.model, problem.loss_func, problem.params, problem.data)
        if kind == "hessian":
            return cv.HessianOperator(*args)
        if kind == "ggn":
            return cv.GGNOperator(*args)
        if kind == "fisher":
            return cv.FisherOperator(*args)
        if kind == "fisher_mc":
            return cv.FisherOperator(*args, mc_samples=mc_samples, seed=seed)
        if kind == "empirical_fisher":
            return cv.EmpiricalFisherOperator(*args)
        raise ValueError(f"unknown curvature operator {kind!r}")

    return build


#: Names accepted by :func:`make_approximation` besides ``mfac_m{m}``.
METHOD_NAMES = (
    "hessian",
    "ggn",
    "fisher",
    "fisher_mc",
    "empirical_fisher",
    "hutchinson_diag",
    "sqgrad_diag",
    "kfac",
    "ekfac",
)

#: The M-FAC sizes of the default set.
DEFAULT_MFAC_M = (8, 32, 128, 512)


def make_approximation(
    name: str,
    *,
    max_dense_dim: int = 20_000,
    seed: int = 0,
    mc_samples: int = 1,
    hutchinson_samples: int = 64,
) -> Approximation:
    """Build one approximation by name (``hessian``, ..., ``kfac``, or ``mfac_m{m}``).

    Raises:
        ValueError: For an unknown name or a malformed ``mfac_m{m}``.
    """
    if name.startswith("mfac_m"):
        digits = name[len("mfac_m") :]
        if not digits.isdigit() or int(digits) < 1:
            raise ValueError(
                f"M-FAC methods are named mfac_m<m> with an integer m >= 1, got {name!r}"
            )
        return MFACApproximation(int(digits), seed=seed)
    if name in ("hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher"):
        factory = _curvature_factory(name, mc_samples=mc_samples, seed=seed)
        return OperatorApproximation(name, factory, max_dense_dim=max_dense_dim)
    if name == "hutchinson_diag":
        return HutchinsonDiagonal(samples=hutchinson_samples, seed=seed)
    if name == "sqgrad_diag":
        return SquaredGradientDiagonal()
    if name in ("kfac", "ekfac"):
        return KFACApproximation(seed=seed, eigenvalue_corrected=name == "ekfac")
    raise ValueError(
        f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)} "
        "or mfac_m<m> (e.g. mfac_m64)"
    )


def default_method_names(mfac_m: Sequence[int] = DEFAULT_MFAC_M) -> list[str]:
    """The default method list: every family plus M-FAC for each ``m`` in ``mfac_m``."""
    return list(METHOD_NAMES) + [f"mfac_m{m}" for m in mfac_m]


def default_approximations(
    mfac_m: Sequence[int] = DEFAULT_MFAC_M, **kwargs: Any
) -> list[Approximation]:
    """Every approximation of the standard set (see the module table), M-FAC for each ``m``."""
    return [make_approximation(n, **kwargs) for n in default_method_names(mfac_m)]
