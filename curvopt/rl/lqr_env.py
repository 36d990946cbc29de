"""The discounted LQR as a gymnasium environment (``gymnasium.make("curvopt/LQR-v0", lqr=...)``).

Each step returns ``r = −(xᵀQx + uᵀRu)``, moves ``x ← Ax + Bu + w`` and ends the episode
(``terminated=True``) with probability ``1 − γ``, so the undiscounted episode return is an unbiased
sample of the discounted ``J`` that :class:`~curvopt.rl.lqr.LinearQuadraticRegulator` evaluates
exactly. Importing this module registers the id; it needs gymnasium (the ``rl`` extra).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from curvopt.rl.lqr import LinearQuadraticRegulator

ENV_ID = "curvopt/LQR-v0"


class LQREnv(gym.Env):
    """One LQR episode at a time: observations are states ``x`` (float64), actions are ``u``.

    Args:
        lqr: The system.

    Example:
        >>> from curvopt.rl.lqr import LinearQuadraticRegulator
        >>> env = gym.make(ENV_ID, lqr=LinearQuadraticRegulator.random(2, 1, seed=0))
        >>> obs, _ = env.reset(seed=0)
        >>> obs.shape, env.action_space.shape
        ((2,), (1,))
    """

    metadata = {"render_modes": []}

    def __init__(self, lqr: LinearQuadraticRegulator):
        if not isinstance(lqr, LinearQuadraticRegulator):
            raise TypeError(f"lqr must be a LinearQuadraticRegulator, got {type(lqr).__name__}")
        self.lqr = lqr
        n, m = lqr.n_states, lqr.n_actions
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n,), np.float64)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (m,), np.float64)
        self._state: torch.Tensor | None = None
        self._torch_gen = torch.Generator()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Draw ``x_0 ~ N(0, Σ_0)``; returns ``(x_0, {})``."""
        super().reset(seed=seed)
        self._torch_gen.manual_seed(int(self.np_random.integers(2**63 - 1)))
        self._state = self.lqr.initial_states(1, self._torch_gen)
        return self._state[0].numpy().copy(), {}

    def step(self, action):
        """Reward ``−(xᵀQx + uᵀRu)``, move the state, end the episode with probability ``1 − γ``."""
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        u = torch.as_tensor(np.asarray(action, dtype=np.float64)).reshape(1, -1)
        reward = float(self.lqr.reward(self._state, u)[0])
        self._state = self.lqr.step_state(self._state, u, self._torch_gen)
        terminated = bool(self.np_random.random() >= self.lqr.discount)
        return self._state[0].numpy().copy(), reward, terminated, False, {}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=LQREnv)
