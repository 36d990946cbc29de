r"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Papyan 2020).

The spectral density of a symmetric ``d x d`` matrix ``A`` with eigenpairs
``(\lambda_i, u_i)`` is ``\phi(t) = \frac{1}{d} \sum_i \delta(t - \lambda_i)``. For a test
vector ``v`` with ``E[v v^T] = I`` and ``\|v\|^2 = d`` (Rademacher),

$$
\frac{v^\top f(A) v}{v^\top v} = \sum_i \frac{(u_i^\top v)^2}{\|v\|^2} f(\lambda_i)
  \approx \sum_{k=1}^{m} \tau_k f(\theta_k),
$$

where ``m`` Lanczos steps started at ``v`` give a tridiagonal ``T = S \Theta S^T`` with the
nodes ``\theta_k`` (Ritz values) and weights ``\tau_k = S_{1k}^2``: the Gauss quadrature,
exact for polynomials ``f`` of degree up to ``2m - 1``. Its expectation over ``v`` is
``\frac{1}{d} \operatorname{tr} f(A) = \int f \, d\phi``. Averaging the quadratures of
``n_v`` vectors and smoothing every node with a Gaussian of width ``\sigma`` gives the
density estimate

$$
\hat\phi_\sigma(t) = \frac{1}{n_v} \sum_{v} \sum_{k} \tau_k^{(v)}
  \mathcal{N}(t; \theta_k^{(v)}, \sigma^2).
$$

The Lanczos vectors are fully re-orthogonalized (memory ``m d n_v``), the ``n_v`` runs share
every product (one ``(d, n_v)`` product per step): ``m n_v`` matrix-vector products in all.
With ``m = d`` the nodes of every vector are the eigenvalues themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import check_budget, operand, random_vectors


@dataclass
class SpectralDensity:
    """Quadrature nodes and weights of stochastic Lanczos quadrature, and the smoothed density.

    Attributes:
        nodes: ``(n_v, m)`` Ritz values per start vector (padded with 0 after an early stop).
        weights: ``(n_v, m)`` quadrature weights, each row summing to 1 (0 on padding).
    """

    nodes: Tensor
    weights: Tensor

    def default_sigma(self) -> float:
        """A kernel width of 1 % of the range of the nodes (or 1e-3 for a single point)."""
        used = self.nodes[self.weights > 0]
        span = float(used.max() - used.min()) if used.numel() else 0.0
        return 0.01 * span if span > 0 else 1e-3

    def moment(self, p: int) -> Tensor:
        r"""The estimate of ``\int t^p d\phi = tr(A^p) / d`` (exact in expectation, p <= 2m-1)."""
        return (self.weights * self.nodes**p).sum(1).mean()

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """``phi_sigma`` on the points of ``grid`` (1-D), a Gaussian of width ``sigma`` per node."""
        if sigma is None:
            sigma = self.default_sigma()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = torch.as_tensor(grid, dtype=self.nodes.dtype, device=self.nodes.device)
        diff = grid[:, None, None] - self.nodes[None]
        kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights[None]).sum(2).mean(1)

    def plot(
        self,
        ax: Any = None,
        sigma: float | None = None,
        num_points: int = 1000,
        log: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Plot the smoothed density (matplotlib, an optional dependency).

        Args:
            ax: A matplotlib ``Axes``; a new figure's if None.
            sigma: Kernel width (`default_sigma` if None).
            num_points: Number of grid points between the extreme nodes (+-3 sigma).
            log: Logarithmic density axis (curvature spectra span many decades).
            **kwargs: Passed to ``ax.plot``.

        Returns:
            The ``Axes``.
        """
        try:
            import matplotlib.pyplot as plt  # noqa: PLC0415 - optional dependency
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SpectralDensity.plot needs matplotlib: pip install matplotlib"
            ) from err
        sigma = self.default_sigma() if sigma is None else sigma
        used = self.nodes[self.weights > 0]
        lo, hi = float(used.min()) - 3 * sigma, float(used.max()) + 3 * sigma
        grid = torch.linspace(lo, hi, num_points, dtype=self.nodes.dtype)
        values = self.density(grid.to(self.nodes.device), sigma).cpu()
        if ax is None:
            _, ax = plt.subplots()
        ax.plot(grid.numpy(), values.numpy(), **kwargs)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(float(values.max()) * 1e-8, 1e-300))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("spectral density")
        return ax


def slq_spectral_density(
    A: Any,
    num_steps: int,
    num_vectors: int = 1,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    start_vectors: Tensor | None = None,
) -> SpectralDensity:
    r"""Estimate the spectral density of a symmetric operator (see the module docstring).

    Args:
        A: A symmetric square operator (curvature operator, `SquareOperator`, dense tensor).
        num_steps: Lanczos steps ``m >= 1`` per vector (at most ``d``; larger values are cut).
        num_vectors: Number of start vectors ``n_v >= 1``.
        distribution: ``"rademacher"`` or ``"normal"`` for the start vectors.
        generator: Source of randomness.
        start_vectors: ``(d, n_v)`` start vectors instead of random ones.

    Returns:
        A `SpectralDensity` (``m n_v`` products were used).

    Raises:
        ValueError: If ``num_steps`` or ``num_vectors`` is below 1, or ``A`` is not square.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
        >>> sd = slq_spectral_density(A, num_steps=4, generator=torch.Generator().manual_seed(0))
        >>> sd.nodes.sort().values.round(decimals=8)
        tensor([[ 1.,  2.,  3., 10.]], dtype=torch.float64)
        >>> round(float(sd.moment(1)), 8)  # tr(A) / d: exact for Rademacher and a diagonal A
        4.0
    """
    op = operand(A)
    d = op.shape[0]
    num_steps = min(check_budget(num_steps, name="num_steps"), d)
    if start_vectors is None:
        num_vectors = check_budget(num_vectors, name="num_vectors")
        V = random_vectors(op, num_vectors, distribution, generator)
    else:
        if start_vectors.ndim != 2 or start_vectors.shape[0] != d or start_vectors.shape[1] < 1:
            raise ValueError(
                f"start_vectors must have shape ({d}, n_v), got {tuple(start_vectors.shape)}"
            )
        V = start_vectors.to(dtype=op.dtype, device=op.device)
    alphas, betas, length = _lanczos(op, V, num_steps)
    nodes, weights = [], []
    for j in range(V.shape[1]):
        n = int(length[j])
        T = (
            torch.diag(alphas[:n, j])
            + torch.diag(betas[: n - 1, j], 1)
            + torch.diag(betas[: n - 1, j], -1)
        )
        theta, S = torch.linalg.eigh(T)
        pad = num_steps - n
        nodes.append(torch.cat([theta, theta.new_zeros(pad)]))
        weights.append(torch.cat([S[0] ** 2, theta.new_zeros(pad)]))
    return SpectralDensity(torch.stack(nodes), torch.stack(weights))


def _lanczos(op: Any, V: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """``m`` Lanczos steps for every column of ``V`` at once, fully re-orthogonalized.

    Returns the diagonals ``(m, n_v)``, off-diagonals ``(m, n_v)`` and the number of steps
    each column ran (it stops at an invariant subspace: ``beta`` at rounding level).
    """
    d, nv = V.shape
    basis = torch.zeros(m, d, nv, dtype=V.dtype, device=V.device)
    alphas = torch.zeros(m, nv, dtype=V.dtype, device=V.device)
    betas = torch.zeros(m, nv, dtype=V.dtype, device=V.device)
    length = torch.full((nv,), m, dtype=torch.long)
    active = torch.ones(nv, dtype=torch.bool, device=V.device)
    q = V / V.norm(dim=0).clamp_min(torch.finfo(V.dtype).tiny)
    eps = torch.finfo(V.dtype).eps
    scale = torch.zeros(nv, dtype=V.dtype, device=V.device)
    for j in range(m):
        basis[j] = q
        w = op @ q
        alphas[j] = (q * w).sum(0) * active
        for _ in range(2):  # full re-orthogonalization, twice is enough
            coef = torch.einsum("jdn,dn->jn", basis[: j + 1], w)
            w = w - torch.einsum("jdn,jn->dn", basis[: j + 1], coef)
        beta = w.norm(dim=0)
        scale = torch.maximum(scale, alphas[j].abs() + beta)
        stopped = active & (beta <= 100 * eps * scale.clamp_min(torch.finfo(V.dtype).tiny))
        for c in torch.nonzero(stopped).flatten().tolist():
            length[c] = j + 1
        active = active & ~stopped
        if j == m - 1 or not bool(active.any()):
            break
        betas[j] = beta * active
        q = torch.where(active, w / beta.clamp_min(torch.finfo(V.dtype).tiny), 0.0)
    return alphas, betas, length
