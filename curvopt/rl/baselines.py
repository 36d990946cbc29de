"""State baselines ``b_t`` subtracted from the GPOMDP weights to reduce variance.

A baseline that depends only on ``(s_t, t)`` and on *earlier* batches keeps both the gradient and
the
Hessian estimator unbiased: ``E_a[ψ_t] = 0`` and ``E_a[ψ_t ψ_t^T + ∇²log π_t] = 0`` at every state.
So each baseline first *predicts* for the new batch and only then *updates* on it.

Protocol: ``predict(batch) -> (N, H)`` and ``update(batch, targets)``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from curvopt.rl.rollout import Batch


class Baseline(Protocol):
    """A state baseline: predicts ``b_t`` for a batch, then learns from the batch's targets."""

    def predict(self, batch: Batch) -> Tensor:
        """``b_t`` for every step, ``(N, H)``."""
        ...

    def update(self, batch: Batch, targets: Tensor) -> None:
        """Refit on ``targets`` (``(N, H)``)."""
        ...


class LinearFeatureBaseline:
    """Ridge regression of the reward-to-go on ``[s, s², t/H, (t/H)², (t/H)³, 1]`` (garage-style).

    Args:
        reg: Ridge coefficient, multiplied by 10 until the normal equations solve.

    Example:
        >>> from curvopt.rl import TabularMDP, TabularSoftmaxPolicy
        >>> b = LinearFeatureBaseline()
        >>> b.predict(TabularMDP.random(2, 2, 3).rollout(TabularSoftmaxPolicy(2, 2), 4)).abs().sum()
        tensor(0., dtype=torch.float64)
    """

    def __init__(self, reg: float = 1e-5):
        if reg <= 0:
            raise ValueError(f"reg must be positive, got {reg}")
        self.reg = reg
        self.coef: Tensor | None = None

    @staticmethod
    def features(batch: Batch) -> Tensor:
        """Features of every step, ``(N, H, k)``."""
        n, h = batch.mask.shape
        obs = batch.obs.reshape(n, h, -1).to(batch.rewards.dtype)
        t = torch.arange(h, dtype=obs.dtype, device=obs.device) / max(h, 1)
        t = t.expand(n, h).unsqueeze(-1)
        ones = torch.ones_like(t)
        return torch.cat([obs, obs**2, t, t**2, t**3, ones], dim=-1) * batch.mask.unsqueeze(-1)

    def predict(self, batch: Batch) -> Tensor:
        """``b_t`` for every step, ``(N, H)`` (zero before the first update)."""
        if self.coef is None:
            return torch.zeros_like(batch.rewards)
        return (self.features(batch) @ self.coef.to(batch.rewards.dtype)) * batch.mask

    def update(self, batch: Batch, targets: Tensor) -> None:
        """Refit the coefficients on ``targets`` ``(N, H)`` (the reward-to-go) on the real steps."""
        feats = self.features(batch)
        x = feats.reshape(-1, feats.shape[-1]).double()
        y = (targets * batch.mask).reshape(-1).double()
        gram, rhs = x.T @ x, x.T @ y
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        reg = self.reg
        for _ in range(5):
            coef = torch.linalg.solve(gram + reg * eye, rhs)
            if bool(torch.isfinite(coef).all()):
                self.coef = coef
                return
            reg *= 10
