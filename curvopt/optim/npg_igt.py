r"""N-PG-IGT: normalized policy gradient with implicit gradient transport (Fatkhullin et al., 2023).

Maximizes ``J(θ)``. At step ``t``:

1. extrapolated point ``θ̃_t = θ_t + ((1 − η_t)/η_t)(θ_t − θ_{t-1})``;
2. ``g̃_t = g(τ_t, θ̃_t)``: GPOMDP gradient on fresh trajectories sampled at ``θ̃_t``;
3. ``d_t = (1 − η_t) d_{t-1} + η_t g̃_t`` (``d_0 = g_0`` whatever ``η_0``);
4. ``θ_{t+1} = θ_t + γ_t d_t / ‖d_t‖``.

The extrapolation transports the old gradients to ``θ_t`` to first order without any Hessian: one
batch per step, no importance sampling. Defaults follow the authors' code:
``η_t = (2/(t+2))^{4/5}``, ``γ_t = γ₀ · 2/(t+2)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from curvopt.optim.pg_common import MomentumPolicyGradient


class NPGIGT(MomentumPolicyGradient):
    """Normalized policy gradient with implicit gradient transport (ascent on the expected return).

    Args:
        params: The policy's parameters (iterable or param groups).
        lr: Initial step size ``γ₀ > 0``; ``γ_t = γ₀ (2/(t+2))^lr_power``.
        lr_power: Default 1.
        momentum: ``η₀`` in ``(0, 1]``; ``η_t = η₀ (2/(t+2))^momentum_power``.
        momentum_power: Default 0.8 (``η_t ∝ t^{-4/5}``).
        normalize: Normalized step (default) or plain ``γ_t d_t``.
        lr_schedule: Optional ``t -> factor``: ``γ_t = γ₀ · factor``.
        momentum_schedule: Optional ``t -> η_t``.

    Example:
        >>> from curvopt.rl import CategoricalMLPPolicy, GymRollout, PolicyGradientSampler
        >>> policy = CategoricalMLPPolicy(4, 2)
        >>> sampler = PolicyGradientSampler(policy, GymRollout("CartPole-v1", 50, seed=0), 4)
        >>> opt = NPGIGT(policy.parameters(), lr=0.1)
        >>> _ = opt.step(sampler); _ = opt.step(sampler)
        >>> sampler.num_trajectories
        8
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        lr_power: float = 1.0,
        momentum: float = 1.0,
        momentum_power: float = 0.8,
        normalize: bool = True,
        lr_schedule: Callable[[int], float] | None = None,
        momentum_schedule: Callable[[int], float] | None = None,
    ):
        super().__init__(
            params,
            lr,
            lr_power,
            momentum,
            momentum_power,
            normalize,
            lr_schedule,
            momentum_schedule,
        )

    @staticmethod
    def extrapolation_point(theta: Tensor, prev: Tensor, eta: Tensor | float) -> Tensor:
        """``θ̃ = θ_t + ((1 − η)/η)(θ_t − θ_{t-1})`` (elementwise ``η`` allowed)."""
        return theta + ((1 - eta) / eta) * (theta - prev)

    def _direction(self, sampler, params, theta, prev, mom, eta, t) -> Tensor:
        self._write(params, self.extrapolation_point(theta, prev, eta))
        try:
            with torch.enable_grad():
                grad = sampler.gradient(params)
        finally:
            self._write(params, theta)
        return (1 - eta) * mom + eta * grad
