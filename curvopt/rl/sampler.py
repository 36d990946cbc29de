"""The sampler: how a policy-gradient optimizer asks for estimates at the points it chooses.

The policy-gradient optimizers in :mod:`curvopt.optim` (``NHARPG``, ``NPGIGT``, ``NPG``) take a
:class:`PolicyGradientSampler` in ``step(sampler)``. To get an estimate at a point ``θ'`` of its
choice (the current iterate, a random point on the last segment, an extrapolated point) the
optimizer
writes ``θ'`` into the policy's parameters, calls one of

- ``sampler.gradient(params)``: fresh trajectories, GPOMDP gradient estimate ``g`` (ascent, flat);
- ``sampler.hvp(vector, params)``: fresh trajectories, policy-Hessian-vector estimate ``B v``;
- ``sampler.sample()`` + ``sampler.weights(batch)``: a batch to build its own products on (NPG),

and restores ``θ``. Every trajectory it draws is counted in ``sampler.num_trajectories`` and
logged in
``sampler.history``, so learning curves against sampled trajectories include the Hessian batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from curvopt.rl.baselines import Baseline
from curvopt.rl.rollout import Batch, RolloutFn, discounted_reward_to_go
from curvopt.rl.surrogates import policy_gradient, policy_hvp
from curvopt.utils.params import trainable


class EstimateSampler(Protocol):
    """What :class:`~curvopt.optim.NHARPG` and :class:`~curvopt.optim.NPGIGT` need from a sampler.

    Both methods draw fresh trajectories at the policy's *current* parameters (the optimizer has
    written the point it wants into them) and return flat vectors over ``params``.
    """

    def gradient(self, params: Sequence[Tensor] | None = None) -> Tensor:
        """GPOMDP gradient estimate ``g`` (ascent direction), shape ``(d,)``."""
        ...

    def hvp(self, vector: Tensor, params: Sequence[Tensor] | None = None) -> Tensor:
        """Policy-Hessian-vector estimate ``B v``, shape ``(d,)``."""
        ...


@dataclass
class SampleRecord:
    """One sampled batch: purpose (``"gradient"``, ``"hvp"``), size, running count, mean return."""

    kind: str
    size: int
    num_trajectories: int
    mean_return: Tensor


class PolicyGradientSampler:
    """Draws trajectories with ``policy`` and turns them into unbiased estimates.

    Args:
        policy: The policy ``nn.Module`` (``log_prob``, ``sample``, ``distribution_params``,
            ``kl_from``); its parameters are what the optimizer moves.
        rollout: ``rollout(policy, n) -> Batch``, e.g. :class:`~curvopt.rl.GymRollout` or
            ``TabularMDP.rollout``.
        batch_size: Trajectories per gradient estimate.
        discount: ``γ`` of the objective ``J = E[Σ_h γ^h r_h]``.
        hvp_batch_size: Trajectories per Hessian-vector estimate (default: ``batch_size``).
        baseline: Optional state baseline with ``predict(batch)`` / ``update(batch, targets)``.

    Example:
        >>> from curvopt.rl import CategoricalMLPPolicy, GymRollout, PolicyGradientSampler
        >>> policy = CategoricalMLPPolicy(4, 2)
        >>> sampler = PolicyGradientSampler(policy, GymRollout("CartPole-v1", 100, seed=0), 4)
        >>> g = sampler.gradient()
        >>> g.shape, sampler.num_trajectories
        (torch.Size([1282]), 4)
    """

    def __init__(
        self,
        policy: nn.Module,
        rollout: RolloutFn,
        batch_size: int,
        discount: float = 0.99,
        hvp_batch_size: int | None = None,
        baseline: Baseline | None = None,
    ):
        if not isinstance(policy, nn.Module):
            raise TypeError(f"policy must be an nn.Module, got {type(policy).__name__}")
        self.params = trainable(policy.parameters())
        if not self.params:
            raise ValueError("the policy has no trainable parameters (requires_grad=True)")
        for name, val in (("batch_size", batch_size), ("hvp_batch_size", hvp_batch_size)):
            if val is not None and (not isinstance(val, int) or val <= 0):
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        if not callable(rollout):
            raise TypeError("rollout must be callable as rollout(policy, n) -> Batch")
        self.policy = policy
        self.rollout = rollout
        self.batch_size = batch_size
        self.hvp_batch_size = hvp_batch_size or batch_size
        self.discount = float(discount)
        self.baseline = baseline
        self.num_trajectories = 0
        self.history: list[SampleRecord] = []

    def _params(self, params: Sequence[Tensor] | None) -> list[Tensor]:
        return self.params if params is None else list(params)

    def sample(self, n: int | None = None, kind: str = "gradient") -> Batch:
        """Draw ``n`` (default ``batch_size``) fresh trajectories at the current parameters."""
        n = self.batch_size if n is None else n
        batch = self.rollout(self.policy, n)
        self.num_trajectories += batch.num_trajectories
        self.history.append(
            SampleRecord(
                kind, batch.num_trajectories, self.num_trajectories, batch.total_rewards().mean()
            )
        )
        return batch

    def weights(self, batch: Batch) -> Tensor:
        """GPOMDP weights ``R_t = Σ_{h≥t} γ^h r_h − b_t`` (the baseline then learns from it)."""
        targets = discounted_reward_to_go(batch.rewards, batch.mask, self.discount)
        if self.baseline is None:
            return targets
        base = self.baseline.predict(batch)
        self.baseline.update(batch, targets)
        return targets - base

    def gradient(self, params: Sequence[Tensor] | None = None) -> Tensor:
        """GPOMDP gradient estimate (ascent direction) on a fresh batch, flat over ``params``."""
        batch = self.sample(kind="gradient")
        return policy_gradient(self.policy, self._params(params), batch, self.weights(batch))

    def hvp(self, vector: Tensor, params: Sequence[Tensor] | None = None) -> Tensor:
        """Policy-Hessian-vector estimate ``B v`` on ``hvp_batch_size`` fresh trajectories."""
        batch = self.sample(self.hvp_batch_size, kind="hvp")
        return policy_hvp(self.policy, self._params(params), batch, self.weights(batch), vector)

    def returns(self, kind: str | None = "gradient") -> tuple[list[int], list[float]]:
        """``(trajectories so far, mean return)`` per logged batch of ``kind`` (None: all)."""
        recs = [r for r in self.history if kind is None or r.kind == kind]
        return [r.num_trajectories for r in recs], [float(r.mean_return) for r in recs]
