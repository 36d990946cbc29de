"""Exact (dense) inverse of the damped empirical Fisher, the reference for OBS pruning.

The matrix is the same one M-FAC represents,

.. math::

    F = \\lambda I + \\frac{1}{m} G^\\top G, \\qquad G \\in \\mathbb{R}^{m \\times d},

but here the inverse of each diagonal block of ``F`` (or of all of it, ``block_size=None``) is
formed explicitly in float64. Memory is ``d * block_size`` (``d**2`` without blocks) and time
``d * block_size * min(block_size, m)``, so this is for small models only: it is the
"exact OBS" baseline of :func:`curvopt.prune.prune` and the dense reference in the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DenseFisherInverse:
    """Dense block-wise inverse of ``damp * I + G^T G / m`` with the interface of ``StaticMFAC``.

    Args:
        grads: Gradients ``G`` of shape ``(m, d)``, ``m >= 1``.
        damp: Damping ``lambda > 0``.
        block_size: Size of the diagonal blocks (the last one may be smaller); ``None`` means
            one block of size ``d`` (the full matrix).

    Example:
        >>> G = torch.randn(8, 20, dtype=torch.float64)
        >>> inv = DenseFisherInverse(G, damp=1e-2, block_size=5)
        >>> inv.inverse_diagonal().shape
        torch.Size([20])
    """

    def __init__(self, grads: Tensor, damp: float, block_size: int | None = None) -> None:
        if not isinstance(grads, Tensor) or grads.ndim != 2 or grads.shape[0] < 1:
            raise ValueError("grads must be a tensor of shape (m, d) with m >= 1")
        if not bool(torch.isfinite(grads).all()):
            raise ValueError("grads contains NaN or Inf values")
        if not damp > 0:
            raise ValueError(f"damp must be > 0, got {damp}")
        m, d = grads.shape
        if block_size is None:
            block_size = d
        if int(block_size) < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {block_size}")
        self.m, self.d, self.damp = m, d, float(damp)
        self.block_size = int(block_size)
        self.dtype, self.device = grads.dtype, grads.device
        G = grads.to(torch.float64)
        self.blocks: list[Tensor] = []  # F_b^{-1}, float64
        for start in range(0, d, self.block_size):
            self.blocks.append(_damped_gram_inverse(G[:, start : start + self.block_size], damp))

    def _starts(self) -> range:
        return range(0, self.d, self.block_size)

    def ihvp(self, x: Tensor) -> Tensor:
        """``F^{-1} x`` for ``x`` of shape ``(d,)`` or ``(d, k)``."""
        x64 = x.to(torch.float64)
        out = torch.cat(
            [Fi @ x64[s : s + Fi.shape[0]] for s, Fi in zip(self._starts(), self.blocks)]
        )
        return out.to(x.dtype)

    def mul(self, x: Tensor) -> Tensor:
        """``F x`` for ``x`` of shape ``(d,)`` or ``(d, k)`` (via the block inverses)."""
        x64 = x.to(torch.float64)
        parts = [
            torch.linalg.solve(Fi, x64[s : s + Fi.shape[0]])
            for s, Fi in zip(self._starts(), self.blocks)
        ]
        return torch.cat(parts).to(x.dtype)

    def inverse_diagonal(self) -> Tensor:
        """``diag(F^{-1})`` of shape ``(d,)``."""
        return torch.cat([Fi.diagonal() for Fi in self.blocks]).to(self.dtype)

    def inverse_entries(self, idx: Tensor) -> Tensor:
        """``[F^{-1}]_{qq}`` for the indices ``idx``."""
        return self.inverse_diagonal()[idx]

    def inverse_rows(self, idx: Tensor) -> Tensor:
        """Rows ``F^{-1}[idx, :]`` of shape ``(len(idx), d)``, zero outside each row's block."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        out = torch.zeros(idx.numel(), self.d, dtype=torch.float64, device=self.device)
        block_of = torch.div(idx, self.block_size, rounding_mode="floor")
        for b in torch.unique(block_of).tolist():
            rows = (block_of == b).nonzero().squeeze(1)
            s = b * self.block_size
            Fi = self.blocks[b]
            out[rows, s : s + Fi.shape[0]] = Fi[idx[rows] - s]
        return out.to(self.dtype)


def _damped_gram_inverse(Gb: Tensor, damp: float) -> Tensor:
    """Dense ``(damp I + Gb^T Gb / m)^{-1}`` in float64, ``Gb`` of shape ``(m, b)``.

    A Cholesky factorization of the ``b x b`` matrix when ``b <= m``; otherwise the same matrix
    through the Woodbury identity ``(1/damp) (I - Gb^T (m damp I + Gb Gb^T)^{-1} Gb)``, which
    costs ``O(b^2 m)`` instead of ``O(b^3)``.
    """
    m, b = Gb.shape
    if b <= m:
        Fb = Gb.T @ Gb / m
        Fb.diagonal().add_(damp)
        return torch.cholesky_inverse(torch.linalg.cholesky(Fb))
    A = Gb @ Gb.T
    A.diagonal().add_(m * damp)
    X = torch.cholesky_solve(Gb, torch.linalg.cholesky(A))  # (m, b)
    Finv = -(Gb.T @ X)
    Finv.diagonal().add_(1.0)
    return Finv / damp
