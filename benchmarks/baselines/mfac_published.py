"""BASELINE, not part of curvopt: the published M-FAC algorithms, implemented straightforwardly.

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information" (NeurIPS 2021). Written from the paper's description (our words, our code) only so
that ``benchmarks/mfac.py`` can time curvopt's M-FAC against it side by side.

Curvature ``F = lam I + G^T G / m``. With ``v_1 = g_1 / lam``, ``q_i = m + g_i^T v_i`` and
``v_i = g_i / lam - sum_{j<i} (v_j^T g_i / q_j) v_j``:

* ``F^{-1} x = x / lam - sum_i (v_i^T x / q_i) v_i``,
* ``[F^{-1}]_jj = 1 / lam - sum_i v_ij^2 / q_i``.

Static: the vectors ``v_i`` are built explicitly by a sequential loop of ``m`` steps of ``O(d m)``.
Sliding window: ``v_i = sum_j B_ij g_j`` is kept as an ``m x m`` coefficient matrix ``B`` that is
recomputed from the Gram matrix ``K = G G^T`` after every new gradient by the same sequential
loop (``O(m^3)`` per step), then ``F^{-1} x = x / lam - G^T B^T ((B G x) / q)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PublishedStaticMFAC:
    """BASELINE: the published static algorithm (explicit ``v_i`` by a sequential loop)."""

    def __init__(self, G: Tensor, damp: float):
        """Build ``V = [v_1 ... v_m]`` and ``q``: ``m`` sequential steps of ``O(d m)`` each."""
        m, d = G.shape
        self.damp = damp
        self.V = torch.empty_like(G)
        self.q = torch.empty(m, dtype=G.dtype, device=G.device)
        for i in range(m):
            g = G[i]
            if i == 0:
                torch.div(g, damp, out=self.V[0])
            else:
                a = (self.V[:i] @ g) / self.q[:i]
                torch.sub(g / damp, a @ self.V[:i], out=self.V[i])
            self.q[i] = m + self.V[i] @ g

    def ihvp(self, x: Tensor) -> Tensor:
        """``F^{-1} x``."""
        return x / self.damp - self.V.T @ ((self.V @ x) / self.q)

    def inverse_diagonal(self) -> Tensor:
        """Diagonal of ``F^{-1}``."""
        return 1.0 / self.damp - (self.V.square() / self.q[:, None]).sum(0)


def sequential_coefficients(K: Tensor, m: int, damp: float) -> tuple[Tensor, Tensor]:
    """BASELINE: the published ``O(m^3)`` setup on the Gram matrix: ``B`` (lower) and ``q``.

    ``v_j^T g_i = (B K)_{ji}``, so row ``i`` of ``B`` follows from rows ``< i``.
    """
    n = K.shape[0]
    B = torch.zeros_like(K)
    q = torch.empty(n, dtype=K.dtype, device=K.device)
    for i in range(n):
        if i:
            a = (B[:i] @ K[:, i]) / q[:i]
            B[i] = -(a @ B[:i])
        B[i, i] += 1.0 / damp
        q[i] = m + B[i] @ K[:, i]
    return B, q


class PublishedWindowMFAC:
    """BASELINE: the published sliding window (ring buffer, ``O(m^3)`` setup every step)."""

    def __init__(self, dim: int, m: int, damp: float, dtype=torch.float32, G: Tensor | None = None):
        """Empty window (or one over an existing buffer ``G`` with its Gram matrix recomputed)."""
        self.m, self.damp = m, damp
        self.G = torch.zeros(m, dim, dtype=dtype) if G is None else G
        self.K = (self.G @ self.G.T).to(torch.float64)
        self.count = 0 if G is None else m
        self.B, self.q = sequential_coefficients(self.K, m, damp)

    def add(self, g: Tensor) -> None:
        """Write ``g`` into the ring, update one row/column of ``K``, redo the setup."""
        r = self.count % self.m
        self.G[r] = g
        k = (self.G @ g).to(torch.float64)  # pass over G
        self.K[r] = k
        self.K[:, r] = k
        self.count += 1
        self.B, self.q = sequential_coefficients(self.K, self.m, self.damp)

    def ihvp(self, x: Tensor) -> Tensor:
        """``F^{-1} x = x / lam - G^T B^T ((B G x) / q)``: two more passes over ``G``."""
        dots = (self.G @ x).to(torch.float64)
        coef = self.B.T @ ((self.B @ dots) / self.q)
        return x / self.damp - self.G.T @ coef.to(self.G.dtype)

    def add_and_ihvp(self, g: Tensor) -> Tensor:
        """One optimizer step: add ``g``, return ``F^{-1} g``."""
        self.add(g)
        return self.ihvp(g)
