r"""N-HARPG: normalized Hessian-aided recursive policy gradient (Fatkhullin et al., ICML 2023).

Maximizes ``J(θ) = E_τ[Σ_h γ^h r_h]``. At step ``t`` with iterates ``θ_t, θ_{t-1}``:

1. ``g_t = g(τ_t, θ_t)``: GPOMDP gradient on fresh trajectories at ``θ_t``;
2. ``q_t ~ U[0, 1]``, ``θ̂_t = θ_{t-1} + q_t (θ_t − θ_{t-1})``; a second, independent batch
   ``τ̂_t`` is
   sampled at ``θ̂_t`` and ``v_t = B(τ̂_t, θ̂_t)(θ_t − θ_{t-1})``. Since
   ``∫_0^1 ∇²J(θ_{t-1} + q(θ_t − θ_{t-1})) dq · (θ_t − θ_{t-1}) = ∇J(θ_t) − ∇J(θ_{t-1})``,
   ``v_t`` is an unbiased estimate of the gradient difference;
3. ``d_t = (1 − η_t)(d_{t-1} + v_t) + η_t g_t`` (``d_0 = g_0`` whatever ``η_0``: there is no
   ``d_{-1}`` to average with);
4. ``θ_{t+1} = θ_t + γ_t d_t / ‖d_t‖`` (N-HARPG) or ``θ_t + γ_t d_t`` (HARPG, ``normalize=False``).

Defaults follow the paper: ``η_t = 2/(t+2)``, ``γ_t = γ₀ · 2/(t+2)``; for the unnormalized
:class:`HARPG` ``γ_t = γ₀ · sqrt(2/(t+2))``. The Hessian batch is skipped when ``η_t = 1`` (its
weight
``1 − η_t`` is then zero), in particular at ``t = 0``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from curvopt.optim.pg_common import MomentumPolicyGradient


class NHARPG(MomentumPolicyGradient):
    """Normalized Hessian-aided recursive policy gradient (ascent on the expected return).

    Args:
        params: The policy's parameters (iterable or param groups).
        lr: Initial step size ``γ₀ > 0``.
        lr_power: ``γ_t = γ₀ (2/(t+2))^lr_power`` (default 1).
        momentum: ``η₀`` in ``(0, 1]``; ``η_t = η₀ (2/(t+2))^momentum_power``.
        momentum_power: Default 1 (the paper's ``η_t = 2/(t+2)``).
        normalize: Normalized step (N-HARPG, default) or plain step (HARPG).
        lr_schedule: Optional ``t -> factor``, overriding the power law: ``γ_t = γ₀ · factor``.
        momentum_schedule: Optional ``t -> η_t`` overriding the power law.
        generator: Random generator for the point ``q_t`` on the segment; its state is saved in
            ``state_dict()`` so a resumed run draws the same points. With None, the global
            generator is used and nothing about it is saved.

    Example:
        >>> from curvopt.rl import CategoricalMLPPolicy, GymRollout, PolicyGradientSampler
        >>> policy = CategoricalMLPPolicy(4, 2)
        >>> sampler = PolicyGradientSampler(policy, GymRollout("CartPole-v1", 50, seed=0), 4)
        >>> opt = NHARPG(policy.parameters(), lr=0.1)
        >>> for _ in range(3):
        ...     _ = opt.step(sampler)
        >>> sampler.num_trajectories  # 3 gradient batches + 2 Hessian batches (none at t = 0)
        20
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        lr_power: float = 1.0,
        momentum: float = 1.0,
        momentum_power: float = 1.0,
        normalize: bool = True,
        lr_schedule: Callable[[int], float] | None = None,
        momentum_schedule: Callable[[int], float] | None = None,
        generator: torch.Generator | None = None,
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
            generator,
        )

    def _direction(self, sampler, params, theta, prev, mom, eta, t) -> Tensor:
        with torch.enable_grad():
            grad = sampler.gradient(params)
        if t == 0 or all(self.momentum_weight(g, t) == 1.0 for g in self.param_groups):
            correction = torch.zeros_like(theta)
        else:
            q = torch.rand((), generator=self.generator, dtype=theta.dtype).to(theta.device)
            diff = theta - prev
            self._write(params, prev + q * diff)
            try:
                with torch.enable_grad():
                    correction = sampler.hvp(diff, params)
            finally:
                self._write(params, theta)
        return (1 - eta) * (mom + correction) + eta * grad


class HARPG(NHARPG):
    """Unnormalized HARPG: ``θ_{t+1} = θ_t + γ_t d_t`` with ``γ_t = γ₀ sqrt(2/(t+2))`` by default.

    Same arguments as :class:`NHARPG` (``normalize`` is fixed to False; ``lr_power`` defaults to
    0.5).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.01,
        lr_power: float = 0.5,
        momentum: float = 1.0,
        momentum_power: float = 1.0,
        lr_schedule: Callable[[int], float] | None = None,
        momentum_schedule: Callable[[int], float] | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(
            params,
            lr=lr,
            lr_power=lr_power,
            momentum=momentum,
            momentum_power=momentum_power,
            normalize=False,
            lr_schedule=lr_schedule,
            momentum_schedule=momentum_schedule,
            generator=generator,
        )
