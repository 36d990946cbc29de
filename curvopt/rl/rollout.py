"""Trajectory batches and rollouts on gymnasium environments.

A batch of ``N`` trajectories of horizon (at most) ``H`` is stored padded to ``(N, H, ...)``, with a
``mask`` that is 1 on the steps that happened (before termination, truncation or the horizon) and 0
after. Everything downstream (returns, surrogates, KL) multiplies by this mask, so trajectories of
different lengths share one tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """``N`` padded trajectories of horizon ``H``.

    Attributes:
        obs: Observations ``s_t``, shape ``(N, H, *obs_shape)``.
        actions: Actions ``a_t``, shape ``(N, H, *act_shape)``.
        rewards: Rewards ``r_t``, shape ``(N, H)`` (0 on padded steps).
        mask: 1.0 where step ``t`` of trajectory ``i`` happened, else 0.0; shape ``(N, H)``.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        n, h = self.mask.shape
        for name in ("obs", "actions", "rewards"):
            t = getattr(self, name)
            if t.shape[:2] != (n, h):
                raise ValueError(
                    f"Batch.{name} must start with shape ({n}, {h}) like mask, got {tuple(t.shape)}"
                )
        if n == 0:
            raise ValueError("a Batch needs at least one trajectory")

    @property
    def num_trajectories(self) -> int:
        """Number of trajectories ``N``."""
        return self.mask.shape[0]

    @property
    def horizon(self) -> int:
        """Padded length ``H``."""
        return self.mask.shape[1]

    def lengths(self) -> Tensor:
        """Number of real steps of each trajectory, shape ``(N,)``."""
        return self.mask.sum(dim=1)

    def total_rewards(self) -> Tensor:
        """Undiscounted return ``Σ_t r_t`` of each trajectory, shape ``(N,)`` (what gym reports)."""
        return (self.rewards * self.mask).sum(dim=1)


def discounted_reward_to_go(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """GPOMDP weights ``R_t = Σ_{h≥t} γ^h r_h`` (discounted from time 0, not from ``t``).

    With these weights ``Σ_t R_t ∇log π(a_t|s_t)`` is an unbiased estimate of the gradient of
    ``J(θ) = E[Σ_h γ^h r_h]``.

    Args:
        rewards: ``(N, H)``.
        mask: ``(N, H)``, 0 on padded steps.
        discount: ``γ`` in ``(0, 1]``.

    Returns:
        ``(N, H)`` tensor, 0 on padded steps.

    Example:
        >>> r = torch.tensor([[1.0, 1.0, 1.0]])
        >>> discounted_reward_to_go(r, torch.ones(1, 3), 0.5)
        tensor([[1.7500, 0.7500, 0.2500]])
    """
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    h = rewards.shape[1]
    powers = discount ** torch.arange(h, dtype=rewards.dtype, device=rewards.device)
    weighted = rewards * mask * powers
    # reverse cumulative sum: R_t = Σ_{h>=t} γ^h r_h
    return weighted.flip(1).cumsum(1).flip(1) * mask


class GymRollout:
    """Collect trajectories from a gymnasium environment with a policy (one vector env per size).

    Each call resets ``n`` copies of the environment (``gym.make_vec``; CartPole has a
    NumPy-vectorized
    implementation, other environments fall back to a synchronous vector of copies) and steps them
    together for at most ``horizon`` steps; the policy is evaluated on all ``n`` observations at
    once.
    Each copy contributes its first episode; steps after it ends are masked out.

    Args:
        env_id: A registered gymnasium id, e.g. ``"CartPole-v1"``.
        horizon: Truncation horizon ``H``.
        seed: Seed for the environment resets and the action sampling.
        make_kwargs: Extra keyword arguments for ``gym.make_vec``.

    Example:
        >>> from curvopt.rl import CategoricalMLPPolicy, GymRollout
        >>> rollout = GymRollout("CartPole-v1", horizon=50, seed=0)
        >>> batch = rollout(CategoricalMLPPolicy(4, 2), 3)
        >>> batch.rewards.shape[0], batch.rewards.shape[1] <= 50  # padded to the longest episode
        (3, True)
    """

    def __init__(
        self, env_id: str, horizon: int, seed: int | None = None, make_kwargs: dict | None = None
    ):
        import gymnasium as gym

        if not isinstance(horizon, int) or horizon <= 0:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        self.env_id = env_id
        self.horizon = horizon
        self._gym = gym
        self._make_kwargs = dict(make_kwargs or {})
        self._envs: dict[int, object] = {}
        self._rng = np.random.default_rng(seed)
        # action sampling has its own generator (never the global one), seeded from ``seed``
        self.generator = torch.Generator().manual_seed(int(self._rng.integers(2**31)))

    def _vector_env(self, n: int):
        if n not in self._envs:
            gym = self._gym
            try:
                env = gym.make_vec(
                    self.env_id, num_envs=n, vectorization_mode="vector_entry", **self._make_kwargs
                )
            except Exception:  # no vectorized implementation registered for this environment
                env = gym.make_vec(
                    self.env_id, num_envs=n, vectorization_mode="sync", **self._make_kwargs
                )
            self._envs[n] = env
        return self._envs[n]

    def close(self) -> None:
        """Close the cached vector environments."""
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    @torch.no_grad()
    def __call__(self, policy: nn.Module, n: int) -> Batch:
        """Sample ``n`` trajectories with ``policy`` (it needs ``sample(obs, generator)``)."""
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"number of trajectories must be a positive int, got {n!r}")
        env = self._vector_env(n)
        obs_np, _ = env.reset(seed=int(self._rng.integers(2**31)))
        dtype = next(policy.parameters()).dtype
        obs_list, act_list, rew_list, mask_list = [], [], [], []
        alive = torch.ones(n, dtype=dtype)
        for _ in range(self.horizon):
            obs = torch.as_tensor(np.asarray(obs_np), dtype=dtype)
            action = policy.sample(obs, generator=self.generator)
            obs_np, reward, terminated, truncated, _ = env.step(action.numpy())
            obs_list.append(obs)
            act_list.append(action)
            rew_list.append(torch.as_tensor(np.asarray(reward), dtype=dtype) * alive)
            mask_list.append(alive.clone())
            done = torch.as_tensor(np.logical_or(terminated, truncated))
            alive = alive * (~done).to(dtype)
            if not bool(alive.any()):
                break
        return Batch(
            obs=torch.stack(obs_list, 1),
            actions=torch.stack(act_list, 1),
            rewards=torch.stack(rew_list, 1),
            mask=torch.stack(mask_list, 1),
        )


RolloutFn = Callable[[nn.Module, int], Batch]
"""Anything that maps ``(policy, n)`` to a :class:`Batch` of ``n`` fresh trajectories."""
