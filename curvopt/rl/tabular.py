"""A small finite-horizon tabular MDP whose expected return is exactly computable.

Used to check the Monte-Carlo estimators against exact derivatives: ``J(θ)`` is a differentiable
function of the policy table (forward recursion over state distributions), so ``torch.func`` /
``torch.autograd.functional`` give the exact gradient and Hessian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvopt.rl.rollout import Batch


class TabularMDP:
    r"""MDP with ``S`` states, ``A`` actions, transitions ``P[s, a, s']``, rewards ``R[s, a]``.

    Every trajectory lasts exactly ``horizon`` steps. The objective is
    ``J(π) = E[Σ_{h<H} γ^h r_h] = Σ_h γ^h Σ_s d_h(s) Σ_a π(a|s) R(s, a)`` with
    ``d_0 = μ`` and ``d_{h+1}(s') = Σ_{s,a} d_h(s) π(a|s) P(s, a, s')``.

    Args:
        transitions: ``(S, A, S)`` rows summing to 1.
        rewards: ``(S, A)``.
        initial: ``(S,)`` start distribution.
        horizon: Number of steps ``H``.
        discount: ``γ`` in ``(0, 1]``.
        seed: Seed of the sampling generator.
    """

    def __init__(
        self,
        transitions: Tensor,
        rewards: Tensor,
        initial: Tensor,
        horizon: int,
        discount: float = 1.0,
        seed: int = 0,
    ):
        s, a = rewards.shape
        if transitions.shape != (s, a, s) or initial.shape != (s,):
            raise ValueError(
                f"expected transitions ({s}, {a}, {s}) and initial ({s},), got "
                f"{tuple(transitions.shape)} and {tuple(initial.shape)}"
            )
        if horizon <= 0 or not 0.0 < discount <= 1.0:
            raise ValueError(f"need horizon > 0 and discount in (0, 1], got {horizon}, {discount}")
        self.transitions = transitions
        self.rewards = rewards
        self.initial = initial
        self.horizon = int(horizon)
        self.discount = float(discount)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def random(
        cls, n_states: int, n_actions: int, horizon: int, discount: float = 1.0, seed: int = 0
    ) -> TabularMDP:
        """A random MDP (Dirichlet-like transitions, uniform rewards in [0, 1]) in float64."""
        g = torch.Generator().manual_seed(seed)
        p = torch.rand(n_states, n_actions, n_states, generator=g, dtype=torch.float64) ** 2
        r = torch.rand(n_states, n_actions, generator=g, dtype=torch.float64)
        mu = torch.rand(n_states, generator=g, dtype=torch.float64)
        return cls(p / p.sum(-1, keepdim=True), r, mu / mu.sum(), horizon, discount, seed + 1)

    @classmethod
    def layered(
        cls,
        states_per_step: int,
        n_actions: int,
        horizon: int,
        discount: float = 1.0,
        seed: int = 0,
    ) -> TabularMDP:
        """A random MDP whose states are split into ``horizon`` layers, step ``h`` in layer ``h``.

        Every state is visited at one step only, so a stationary policy can act like a
        time-dependent one and :meth:`optimal_return` is the optimum over stationary policies.
        Transitions go from layer ``h`` to layer ``h + 1`` (the last layer returns to layer 0,
        never reached within the horizon); rewards are uniform in ``[0, 1]``; float64.

        Example:
            >>> mdp = TabularMDP.layered(2, 2, horizon=3, seed=0)
            >>> mdp.rewards.shape
            torch.Size([6, 2])
        """
        g = torch.Generator().manual_seed(seed)
        k, n = states_per_step, states_per_step * horizon
        p = torch.zeros(n, n_actions, n, dtype=torch.float64)
        for h in range(horizon):
            nxt = ((h + 1) % horizon) * k
            block = torch.rand(k, n_actions, k, generator=g, dtype=torch.float64) ** 2
            p[h * k : (h + 1) * k, :, nxt : nxt + k] = block / block.sum(-1, keepdim=True)
        r = torch.rand(n, n_actions, generator=g, dtype=torch.float64)
        mu = torch.zeros(n, dtype=torch.float64)
        mu[:k] = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
        return cls(p, r, mu / mu.sum(), horizon, discount, seed + 1)

    def optimal_return(self) -> Tensor:
        """``max J`` over time-dependent policies by backward induction (a 0-d tensor).

        ``V_H = 0``, ``V_h(s) = max_a [γ^h R(s, a) + Σ_s' P(s, a, s') V_{h+1}(s')]``,
        ``J* = Σ_s μ(s) V_0(s)``. An upper bound on ``J`` of every stationary policy; equal to
        the stationary optimum when each state is visited at a single step (:meth:`layered`).
        """
        value = torch.zeros_like(self.initial)
        for h in reversed(range(self.horizon)):
            q = self.discount**h * self.rewards + torch.einsum("sat,t->sa", self.transitions, value)
            value = q.max(-1).values
        return (self.initial * value).sum()

    def policy_table(self, policy: nn.Module) -> Tensor:
        """``π(a|s)`` for every state, ``(S, A)``, differentiable in the policy parameters."""
        states = torch.arange(self.rewards.shape[0])
        return policy.distribution_params(states).exp()

    def expected_return(self, pi: Tensor) -> Tensor:
        """Exact ``J`` for the policy table ``pi`` of shape ``(S, A)``, differentiable."""
        d = self.initial.to(pi.dtype)
        total = pi.new_zeros(())
        for h in range(self.horizon):
            joint = d[:, None] * pi  # (S, A) state-action occupancy at step h
            total = total + self.discount**h * (joint * self.rewards).sum()
            d = torch.einsum("sa,sat->t", joint, self.transitions)
        return total

    @torch.no_grad()
    def rollout(self, policy: nn.Module, n: int) -> Batch:
        """Sample ``n`` trajectories with ``policy`` (a :class:`RolloutFn`)."""
        g = self.generator
        state = torch.multinomial(self.initial, n, replacement=True, generator=g)
        obs, acts, rews = [], [], []
        for _ in range(self.horizon):
            action = policy.sample(state, generator=g)
            obs.append(state)
            acts.append(action)
            rews.append(self.rewards[state, action])
            state = torch.multinomial(self.transitions[state, action], 1, generator=g).squeeze(-1)
        rewards = torch.stack(rews, 1)
        return Batch(
            obs=torch.stack(obs, 1),
            actions=torch.stack(acts, 1),
            rewards=rewards,
            mask=torch.ones_like(rewards),
        )
