r"""A discounted linear-quadratic regulator with exact return, gradient and optimum.

Dynamics ``x_{t+1} = A x_t + B u_t + w_t`` (``w_t ~ N(0, W)``), ``x_0 ~ N(0, Σ_0)``, reward
``r_t = −(x_tᵀQ x_t + u_tᵀR u_t)`` and a linear Gaussian policy ``u_t = θ x_t + σ ε_t``
(``θ`` is ``(m, n)``, ``ε_t ~ N(0, I)``, ``σ`` fixed: a Fisher-non-degenerate policy class).
The objective is the infinite-horizon discounted return

``J(θ) = E[Σ_{t≥0} γ^t r_t]``.

Sampling it exactly: an episode ends after each step with probability ``1 − γ`` (so step ``t`` is
reached with probability ``γ^t``), which makes ``J = E[Σ_{t<T} r_t]`` an undiscounted sum over a
finite, random length ``T`` (mean ``1/(1−γ)``). Policy-gradient samplers therefore use discount 1
on these episodes (:meth:`LinearQuadraticRegulator.rollout`, or the gymnasium environment in
:mod:`curvopt.rl.lqr_env`).

Exact quantities, with ``M = A + Bθ``, ``Q_θ = Q + θᵀRθ``, ``Σ_a = diag(σ²)``,
``N = B Σ_a Bᵀ + W``:

- value matrix ``P_θ = Q_θ + γ MᵀP_θ M`` (discrete Lyapunov);
- discounted state covariance ``S_θ = Σ_t γ^t E[x_t x_tᵀ] = Σ_0 + γ/(1−γ) N + γ M S_θ Mᵀ``;
- ``J(θ) = −tr(Q_θ S_θ) − tr(R Σ_a)/(1−γ)`` (finite iff ``ρ(√γ M) < 1``);
- ``∇_θ J = −2 [(R + γBᵀP_θB) θ + γ BᵀP_θ A] S_θ`` (Fazel et al. 2018, discounted, ``θ = −K``);
- the optimum over all ``θ`` from the discounted Riccati equation
  ``P* = Q + γAᵀP*A − γ²AᵀP*B(R + γBᵀP*B)⁻¹BᵀP*A``, ``θ* = −γ(R + γBᵀP*B)⁻¹BᵀP*A``
  (the additive noise does not change the optimal gain: certainty equivalence).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn

from curvopt.rl.rollout import Batch


def _real(name: str, value) -> np.ndarray:
    """``value`` as a float64 array; complex input is refused (NumPy drops imaginary parts)."""
    arr = np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value)
    if np.iscomplexobj(arr):
        raise TypeError(
            f"{name} must be real, got a complex array ({arr.dtype}); the LQR is defined over "
            f"real matrices: pass {name}.real if the imaginary part is zero"
        )
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _matrix(name: str, value, shape: tuple[int, int]) -> np.ndarray:
    arr = _real(name, value)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries")
    return arr


def _check_psd(name: str, mat: np.ndarray, strict: bool) -> None:
    if not np.allclose(mat, mat.T, atol=1e-12 * max(1.0, np.abs(mat).max())):
        raise ValueError(f"{name} must be symmetric")
    low = np.linalg.eigvalsh(mat).min()
    if low < 0 or (strict and low <= 0):
        kind = "positive definite" if strict else "positive semi-definite"
        raise ValueError(f"{name} must be {kind}; its smallest eigenvalue is {low:.3g}")


class LinearQuadraticRegulator:
    r"""Discounted LQR ``(A, B, Q, R, Σ_0, W, γ)`` for linear Gaussian policies ``u = θx + σε``.

    Args:
        A: ``(n, n)`` state transition.
        B: ``(n, m)`` control matrix.
        Q: ``(n, n)`` symmetric PSD state cost.
        R: ``(m, m)`` symmetric positive definite control cost.
        initial_cov: ``(n, n)`` covariance ``Σ_0`` of ``x_0`` (mean 0), symmetric PSD.
        discount: ``γ`` in ``(0, 1)``; also the per-step continuation probability of the sampler.
        noise_cov: ``(n, n)`` process-noise covariance ``W`` (default 0).
        seed: Seed of the sampling generator of :meth:`rollout`.

    Example:
        >>> lqr = LinearQuadraticRegulator.random(2, 1, discount=0.9, seed=0)
        >>> theta_star = lqr.optimal_gain()
        >>> j_star = lqr.expected_return(theta_star, action_std=0.5)
        >>> bool(lqr.expected_return(torch.zeros(1, 2), 0.5) < j_star)
        True
        >>> float(abs(lqr.gradient(theta_star, 0.5)).max()) < 1e-8  # stationary at the optimum
        True
    """

    def __init__(
        self,
        A: ArrayLike,
        B: ArrayLike,
        Q: ArrayLike,
        R: ArrayLike,
        initial_cov: ArrayLike,
        discount: float,
        noise_cov: ArrayLike | None = None,
        seed: int = 0,
    ):
        a, b = _real("A", A), _real("B", B)
        if a.ndim != 2 or a.shape[0] != a.shape[1] or b.ndim != 2 or b.shape[0] != a.shape[0]:
            raise ValueError(
                f"A must be (n, n) and B (n, m) with the same n, got {a.shape} and {b.shape}"
            )
        n, m = b.shape
        self.A = _matrix("A", a, (n, n))
        self.B = _matrix("B", b, (n, m))
        self.Q = _matrix("Q", Q, (n, n))
        self.R = _matrix("R", R, (m, m))
        self.initial_cov = _matrix("initial_cov", initial_cov, (n, n))
        self.noise_cov = (
            np.zeros((n, n)) if noise_cov is None else _matrix("noise_cov", noise_cov, (n, n))
        )
        _check_psd("Q", self.Q, strict=False)
        _check_psd("R", self.R, strict=True)
        _check_psd("initial_cov", self.initial_cov, strict=False)
        _check_psd("noise_cov", self.noise_cov, strict=False)
        if not isinstance(discount, (int, float)) or not 0.0 < discount < 1.0:
            raise ValueError(
                f"discount must lie in (0, 1) (the continuation probability), got {discount!r}"
            )
        self.discount = float(discount)
        self.n_states, self.n_actions = n, m
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def random(
        cls,
        n_states: int,
        n_actions: int,
        discount: float = 0.9,
        spectral_radius: float = 1.0,
        seed: int = 0,
    ) -> LinearQuadraticRegulator:
        """A random system with ``Q = R = I``, ``Σ_0 = I`` and no process noise.

        ``A`` is Gaussian rescaled to ``spectral_radius``, ``B`` Gaussian; ``θ = 0`` is stable iff
        ``spectral_radius < 1/sqrt(γ)``.
        """
        g = np.random.default_rng(seed)
        a = g.standard_normal((n_states, n_states))
        a *= spectral_radius / np.abs(np.linalg.eigvals(a)).max()
        b = g.standard_normal((n_states, n_actions))
        eye_n, eye_m = np.eye(n_states), np.eye(n_actions)
        return cls(a, b, eye_n, eye_m, eye_n, discount, seed=seed + 1)

    # ----- exact quantities ---------------------------------------------------------------------
    def _gain(self, theta) -> np.ndarray:
        return _matrix("theta", theta, (self.n_actions, self.n_states))

    def _action_cov(self, action_std) -> np.ndarray:
        std = np.broadcast_to(
            np.asarray(
                action_std.detach().cpu() if isinstance(action_std, Tensor) else action_std,
                dtype=np.float64,
            ),
            (self.n_actions,),
        )
        if not np.all(std >= 0) or not np.all(np.isfinite(std)):
            raise ValueError(f"action_std must be finite and >= 0, got {std}")
        return np.diag(std**2)

    def closed_loop(self, theta) -> np.ndarray:
        """``M = A + Bθ``."""
        return self.A + self.B @ self._gain(theta)

    def is_stable(self, theta) -> bool:
        """Whether ``J(θ)`` is finite: spectral radius of ``√γ (A + Bθ)`` below 1."""
        rho = np.abs(np.linalg.eigvals(self.closed_loop(theta))).max()
        return bool(np.sqrt(self.discount) * rho < 1.0)

    def _require_stable(self, theta) -> None:
        if not self.is_stable(theta):
            raise ValueError("the closed loop sqrt(γ)(A + Bθ) is unstable: J(θ) = −∞")

    def value_matrix(self, theta) -> np.ndarray:
        """``P_θ`` with ``P_θ = Q + θᵀRθ + γ (A+Bθ)ᵀ P_θ (A+Bθ)``, ``(n, n)``."""
        self._require_stable(theta)
        th = self._gain(theta)
        m = self.closed_loop(th)
        return scipy.linalg.solve_discrete_lyapunov(
            np.sqrt(self.discount) * m.T, self.Q + th.T @ self.R @ th
        )

    def state_covariance(self, theta, action_std) -> np.ndarray:
        """Discounted occupancy ``S_θ = Σ_t γ^t E[x_t x_tᵀ]``, ``(n, n)``."""
        self._require_stable(theta)
        g = self.discount
        noise = self.B @ self._action_cov(action_std) @ self.B.T + self.noise_cov
        return scipy.linalg.solve_discrete_lyapunov(
            np.sqrt(g) * self.closed_loop(theta), self.initial_cov + g / (1 - g) * noise
        )

    def expected_return(self, theta, action_std) -> float:
        """Exact ``J(θ)`` (``−inf`` when the closed loop is unstable)."""
        if not self.is_stable(theta):
            return float("-inf")
        th = self._gain(theta)
        s = self.state_covariance(th, action_std)
        cost = np.trace((self.Q + th.T @ self.R @ th) @ s)
        cost += np.trace(self.R @ self._action_cov(action_std)) / (1 - self.discount)
        return float(-cost)

    def gradient(self, theta, action_std) -> np.ndarray:
        """Exact ``∇_θ J``, ``(m, n)`` (raises ValueError if the closed loop is unstable)."""
        th = self._gain(theta)
        p = self.value_matrix(th)
        s = self.state_covariance(th, action_std)
        g, b = self.discount, self.B
        return -2.0 * ((self.R + g * b.T @ p @ b) @ th + g * b.T @ p @ self.A) @ s

    def optimal_gain(self) -> np.ndarray:
        """``θ*`` from the discounted Riccati equation, ``(m, n)`` (independent of ``σ``)."""
        g = self.discount
        a, b = np.sqrt(g) * self.A, np.sqrt(g) * self.B
        p = scipy.linalg.solve_discrete_are(a, b, self.Q, self.R)
        return -np.linalg.solve(self.R + b.T @ p @ b, b.T @ p @ a)

    def optimal_return(self, action_std) -> float:
        """``J* = J(θ*)`` for exploration noise ``action_std``."""
        return self.expected_return(self.optimal_gain(), action_std)

    # ----- sampling -----------------------------------------------------------------------------
    def _tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The system matrices as CPU tensors of ``dtype`` (cached: the hot loop reuses them)."""
        cache = self.__dict__.setdefault("_tensor_cache", {})
        if dtype not in cache:
            cache[dtype] = {
                name: torch.as_tensor(value, dtype=dtype)
                for name, value in (
                    ("A", self.A),
                    ("B", self.B),
                    ("Q", self.Q),
                    ("R", self.R),
                    ("initial_factor", _psd_factor(self.initial_cov)),
                    ("noise_factor", _psd_factor(self.noise_cov)),
                )
            }
        return cache[dtype]

    def reward(self, state: Tensor, action: Tensor) -> Tensor:
        """``−(xᵀQx + uᵀRu)`` over the leading batch dimensions."""
        m = self._tensors(state.dtype)
        q, r = m["Q"].to(state.device), m["R"].to(state.device)
        return -(((state @ q) * state).sum(-1) + ((action @ r) * action).sum(-1))

    def step_state(self, state: Tensor, action: Tensor, generator: torch.Generator) -> Tensor:
        """``A x + B u + w`` for a batch of states ``(N, n)`` and actions ``(N, m)``."""
        m = self._tensors(state.dtype)
        nxt = state @ m["A"].T.to(state.device) + action @ m["B"].T.to(state.device)
        if np.any(self.noise_cov):
            noise = torch.randn(state.shape, generator=generator, dtype=state.dtype)
            nxt = nxt + noise.to(state.device) @ m["noise_factor"].T.to(state.device)
        return nxt

    def initial_states(self, n: int, generator: torch.Generator, dtype=torch.float64) -> Tensor:
        """``n`` draws of ``x_0 ~ N(0, Σ_0)``, ``(n, n_states)``."""
        factor = self._tensors(dtype)["initial_factor"]
        return torch.randn(n, self.n_states, generator=generator, dtype=dtype) @ factor.T

    def episode_lengths(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` draws of ``T`` with ``P(T > t) = γ^t`` (geometric on ``{1, 2, ...}``), int64."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        # inverse CDF: T = 1 + floor(log(1 - u) / log γ)
        return 1 + torch.floor(torch.log1p(-u) / np.log(self.discount)).long()

    @torch.no_grad()
    def rollout(self, policy: nn.Module, n: int, max_steps: int = 10_000) -> Batch:
        """``n`` episodes with geometric length (continue w.p. ``γ``), padded; a :class:`RolloutFn`.

        ``Σ_t r_t`` of an episode is an unbiased sample of ``J``; use discount 1 in the sampler.
        The lengths are drawn first (``P(T > t) = γ^t``), then all episodes are stepped together.
        ``max_steps`` caps ``T`` (reached with probability ``γ^max_steps``).
        """
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"number of trajectories must be a positive int, got {n!r}")
        g = self.generator
        dtype = next(policy.parameters()).dtype
        lengths = self.episode_lengths(n, g).clamp_max(max_steps)
        state = self.initial_states(n, g, dtype)
        obs, acts = [], []
        for _ in range(int(lengths.max())):
            action = policy.sample(state, generator=g)
            obs.append(state)
            acts.append(action)
            state = self.step_state(state, action, g)
        obs_t, acts_t = torch.stack(obs, 1), torch.stack(acts, 1)
        steps = torch.arange(obs_t.shape[1])
        mask = (steps[None, :] < lengths[:, None]).to(dtype)
        return Batch(
            obs=obs_t, actions=acts_t, rewards=self.reward(obs_t, acts_t) * mask, mask=mask
        )


def _psd_factor(mat: np.ndarray) -> np.ndarray:
    """``L`` with ``L Lᵀ = mat`` for a symmetric PSD matrix (eigen-decomposition; PSD allowed)."""
    w, v = np.linalg.eigh(mat)
    return v * np.sqrt(np.clip(w, 0.0, None))
