"""Stochastic policies as ordinary ``nn.Module`` s.

Every policy has the same small interface used by the rollouts and surrogates:

- ``log_prob(obs, actions) -> Tensor``: ``log π_θ(a|s)`` with the leading batch shape of ``obs``;
- ``sample(obs, generator=None) -> Tensor``: actions drawn from ``π_θ(·|s)`` (no gradient);
- ``kl_from(obs, old) -> Tensor``: ``KL(π_old(·|s) ‖ π_θ(·|s))`` per state, where ``old`` is what
  ``distribution_params(obs)`` returned (detached) before the parameters moved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """A plain MLP ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers."""
    if len(sizes) < 2 or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"mlp sizes must be >= 2 positive ints, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class CategoricalPolicy(nn.Module):
    """Softmax policy ``π_θ(a|s) = softmax(f_θ(s))_a`` over ``n`` discrete actions.

    Args:
        logits_net: Module mapping observations ``(..., *obs_shape)`` to logits ``(..., n)``.
    """

    def __init__(self, logits_net: nn.Module):
        super().__init__()
        self.logits_net = logits_net

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Same as :meth:`log_prob` (so ``torch.func.functional_call`` works on the policy)."""
        return self.log_prob(obs, actions)

    def distribution_params(self, obs: Tensor) -> Tensor:
        """Log-probabilities ``log π(·|s)``, shape ``(..., n)``."""
        return torch.log_softmax(self.logits_net(obs), dim=-1)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """``log π_θ(a|s)``, shape ``obs.shape[:-k]`` (the batch dims)."""
        logp = self.distribution_params(obs)
        return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one action per observation (int64)."""
        probs = self.distribution_params(obs).exp()
        flat = probs.reshape(-1, probs.shape[-1])
        a = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
        return a.reshape(probs.shape[:-1])

    def kl_from(self, obs: Tensor, old_logp: Tensor) -> Tensor:
        """``KL(π_old ‖ π_θ) = Σ_a π_old(a) (log π_old(a) − log π_θ(a))`` per state."""
        logp = self.distribution_params(obs)
        return (old_logp.exp() * (old_logp - logp)).sum(-1)


class CategoricalMLPPolicy(CategoricalPolicy):
    """Categorical policy with a tanh MLP: ``obs_dim -> hidden... -> n_actions`` logits.

    Example:
        >>> policy = CategoricalMLPPolicy(4, 2, hidden=(32, 32))
        >>> policy.sample(torch.zeros(5, 4)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        hidden: Sequence[int] = (32, 32),
        activation: type[nn.Module] = nn.Tanh,
    ):
        super().__init__(mlp([obs_dim, *hidden, n_actions], activation))


class TabularSoftmaxPolicy(CategoricalPolicy):
    """Direct softmax parameterization ``π(a|s) = softmax(θ_s)_a`` with integer states.

    Observations are state indices (any integer dtype); ``θ`` is an ``(S, A)`` table.
    """

    def __init__(self, n_states: int, n_actions: int, init_scale: float = 0.0):
        table = torch.randn(n_states, n_actions) * init_scale
        super().__init__(nn.Identity())
        self.logits = nn.Parameter(table)

    def distribution_params(self, obs: Tensor) -> Tensor:
        """Log-probabilities ``log π(·|s)``, shape ``(*obs.shape, A)``."""
        return torch.log_softmax(self.logits[obs.long()], dim=-1)


class GaussianMLPPolicy(nn.Module):
    """Diagonal Gaussian policy ``a ~ N(μ_θ(s), diag(σ²))`` with state-independent ``log σ``.

    Args:
        obs_dim: Observation size.
        act_dim: Action size.
        hidden: Hidden layer sizes of the mean network.
        log_std_init: Initial ``log σ`` (a learned parameter).

    Example:
        >>> policy = GaussianMLPPolicy(3, 1)
        >>> policy.log_prob(torch.zeros(5, 3), torch.zeros(5, 1)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.Tanh,
        log_std_init: float = 0.0,
    ):
        super().__init__()
        self.mean_net = mlp([obs_dim, *hidden, act_dim], activation)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Same as :meth:`log_prob` (so ``torch.func.functional_call`` works on the policy)."""
        return self.log_prob(obs, actions)

    def distribution_params(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ(s), log σ)`` broadcast to ``(..., act_dim)``."""
        mean = self.mean_net(obs)
        return mean, self.log_std.expand_as(mean)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """``log N(a; μ(s), σ²)`` summed over action dims."""
        mean, log_std = self.distribution_params(obs)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    @torch.no_grad()
    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one action per observation."""
        mean, log_std = self.distribution_params(obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + noise * log_std.exp()

    def kl_from(self, obs: Tensor, old: tuple[Tensor, Tensor]) -> Tensor:
        """``KL(N(μ_old, σ_old²) ‖ N(μ, σ²))`` per state, summed over action dims."""
        old_mean, old_log_std = old
        mean, log_std = self.distribution_params(obs)
        var_ratio = torch.exp(2 * (old_log_std - log_std))
        quad = ((old_mean - mean) * torch.exp(-log_std)) ** 2
        return 0.5 * (var_ratio + quad - 1.0 - 2 * (old_log_std - log_std)).sum(-1)


class LinearGaussianPolicy(GaussianMLPPolicy):
    """Linear Gaussian policy ``a ~ N(θ s, diag(σ²))`` with a fixed (not learned) ``σ``.

    The only parameter is the gain ``θ = mean_net.weight`` of shape ``(act_dim, obs_dim)``;
    ``log σ`` is a buffer in the model's dtype, rounded from the exact (float64) value whenever
    the dtype changes (``.double()`` after a float32 construction gives ``log σ`` to float64
    precision). With ``σ > 0`` fixed, the Fisher information ``E[s sᵀ] ⊗ diag(σ⁻²)``
    is positive definite whenever the state covariance is: the Fisher-non-degenerate class of
    N-HARPG's theory.

    Args:
        obs_dim: Observation size ``n``.
        act_dim: Action size ``m``.
        action_std: ``σ > 0`` (a scalar or one value per action dimension).

    Example:
        >>> policy = LinearGaussianPolicy(2, 1, action_std=0.5)
        >>> [tuple(p.shape) for p in policy.parameters()] == [(1, 2)]
        True
        >>> policy.sample(torch.zeros(4, 2)).shape
        torch.Size([4, 1])
    """

    def __init__(self, obs_dim: int, act_dim: int, action_std: float | Sequence[float] = 1.0):
        nn.Module.__init__(self)
        std = torch.as_tensor(action_std, dtype=torch.float64)
        if std.ndim > 1 or std.numel() not in (1, act_dim):
            raise ValueError(f"action_std must be a scalar or {act_dim} values, got {action_std!r}")
        std = std.expand(act_dim)
        if not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
            raise ValueError(f"action_std must be positive and finite, got {action_std!r}")
        self.mean_net = nn.Linear(obs_dim, act_dim, bias=False)
        nn.init.zeros_(self.mean_net.weight)
        # log σ exactly (float64) beside the buffer in the model's dtype: .double() after a
        # float32 construction must give log σ, not the float32 rounding of it
        self._log_std_exact = std.log().clone()
        self.register_buffer("log_std", self._log_std_exact.to(torch.get_default_dtype()))

    def _apply(self, fn, recurse=True):  # noqa: D102 - .to(), .double(), .cuda(), ...
        buf, exact = self.log_std, self._log_std_exact
        if buf.device.type != "meta":
            now = buf.detach().to("cpu")
            if not torch.equal(now, exact.to(now.dtype)):  # set or loaded since: keep that
                self._log_std_exact = exact = now.to(torch.float64)
        out = super()._apply(fn, recurse)
        if self.log_std.is_floating_point() and self.log_std.device.type != "meta":
            with torch.no_grad():
                self.log_std.copy_(exact)  # the new dtype's rounding of the exact value
        return out

    @property
    def action_std(self) -> Tensor:
        """``σ``, shape ``(act_dim,)``."""
        return self.log_std.exp()
