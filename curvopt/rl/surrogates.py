r"""Surrogate objectives whose autograd derivatives are unbiased policy-gradient estimators.

For a trajectory ``τ = (s_0, a_0, r_0, ..., s_{H-1}, a_{H-1}, r_{H-1})`` sampled with ``π_θ`` let

- ``ψ_t = ∇ log π_θ(a_t|s_t)`` (the score), ``L(τ) = Σ_t log π_θ(a_t|s_t)`` so ``∇L = ∇log p(τ|θ)``
  (the dynamics do not depend on ``θ``);
- ``R_t = Σ_{h≥t} γ^h r_h − b_t`` the GPOMDP weights (optionally minus a state baseline ``b_t``);
- ``Φ(τ, θ) = Σ_t R_t log π_θ(a_t|s_t)`` with ``R_t`` held fixed.

Then for ``J(θ) = E_τ[Σ_h γ^h r_h]``:

- gradient (REINFORCE/GPOMDP): ``g(τ, θ) = ∇Φ = Σ_t R_t ψ_t``, ``E[g] = ∇J``;
- policy Hessian (Shen et al. 2019; Fatkhullin et al. 2023):
  ``B(τ, θ) = ∇Φ ∇L^T + ∇²Φ``, ``E[B] = ∇²J``, so
  ``B v = g · ⟨∇L, v⟩ + ∇²Φ v``.

Both terms enter with a plus sign: differentiate ``∇J = ∫ p(τ|θ) ∇Φ dτ`` once more; the derivative
of
``p`` gives ``p ∇L ∇Φ^T`` and the derivative of ``∇Φ`` gives ``p ∇²Φ``. A batch estimate averages
``B_i v`` over trajectories ``i`` — the product ``g_i ⟨∇L_i, v⟩`` is formed per trajectory, never as
the product of two batch means (that would be biased). The per-trajectory inner products
``c_i = ⟨∇L_i, v⟩`` come from one double backward through a dummy weight vector, so memory stays
``O(d)`` plus one autograd graph of the batch.

All functions return flat vectors over ``params`` (see :mod:`curvopt.utils.params`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvopt.rl.rollout import Batch
from curvopt.utils.params import check_vector, flatten, num_elements, unflatten


def _grad(output: Tensor, params: Sequence[Tensor], **kwargs) -> list[Tensor]:
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys))


def trajectory_terms(policy: nn.Module, batch: Batch, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per-trajectory ``Φ_i = Σ_t R_it log π(a_it|s_it)`` and ``L_i = Σ_t log π(a_it|s_it)``.

    Args:
        policy: Policy with ``log_prob(obs, actions)``.
        batch: ``N`` trajectories.
        weights: ``R`` of shape ``(N, H)``, treated as constants (detached).

    Returns:
        ``(Φ, L)``, each of shape ``(N,)``, differentiable in the policy parameters.
    """
    if weights.shape != batch.mask.shape:
        raise ValueError(
            f"weights must have the batch shape {tuple(batch.mask.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    logp = policy.log_prob(batch.obs, batch.actions) * batch.mask
    return (weights.detach() * logp).sum(1), logp.sum(1)


def policy_gradient(
    policy: nn.Module, params: Sequence[Tensor], batch: Batch, weights: Tensor
) -> Tensor:
    """Batch-mean GPOMDP gradient ``(1/N) Σ_i Σ_t R_it ψ_it`` (ascent direction), shape ``(d,)``.

    Example:
        >>> from curvopt.rl import TabularMDP, TabularSoftmaxPolicy, discounted_reward_to_go
        >>> mdp = TabularMDP.random(3, 2, horizon=4, seed=0)
        >>> pi = TabularSoftmaxPolicy(3, 2)
        >>> b = mdp.rollout(pi, 8)
        >>> R = discounted_reward_to_go(b.rewards, b.mask, 0.9)
        >>> policy_gradient(pi, list(pi.parameters()), b, R).shape
        torch.Size([6])
    """
    phi, _ = trajectory_terms(policy, batch, weights)
    return flatten(_grad(phi.mean(), params))


def policy_hvp(
    policy: nn.Module,
    params: Sequence[Tensor],
    batch: Batch,
    weights: Tensor,
    vector: Tensor,
    return_gradient: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Batch mean of the per-trajectory policy-Hessian-vector product ``B_i v``.

    ``(1/N) Σ_i [ g_i ⟨∇L_i, v⟩ + ∇²Φ_i v ]``, computed as the gradient of the scalar
    ``⟨∇Φ̄, v⟩ + (1/N) Σ_i Φ_i · c_i`` with ``c_i = ⟨∇L_i, v⟩`` detached (``g_i = ∇Φ_i``).

    Args:
        policy: Policy with ``log_prob``.
        params: Parameters the product is taken over (flat dimension ``d``).
        batch: ``N`` trajectories sampled at the current parameters.
        weights: GPOMDP weights ``R``, ``(N, H)``.
        vector: ``v`` of shape ``(d,)``.
        return_gradient: Also return the batch gradient ``(1/N) Σ_i g_i`` of the same batch.

    Returns:
        ``B v`` of shape ``(d,)`` (and the gradient if asked).
    """
    params = list(params)
    d = num_elements(params)
    first = params[0]
    check_vector(vector, d, name="vector", dtype=first.dtype, device=first.device)
    v = unflatten(vector, params)
    phi, loglik = trajectory_terms(policy, batch, weights)
    # c_i = <∇L_i, v> for every trajectory at once: differentiate <∇(Σ w_i L_i), v> in w.
    w = torch.ones_like(loglik, requires_grad=True)
    grad_w = _grad((w * loglik).sum(), params, create_graph=True)
    (c,) = torch.autograd.grad(_dot(grad_w, v), w, retain_graph=True)
    grad_phi = _grad(phi.mean(), params, create_graph=True)
    objective = _dot(grad_phi, v) + (phi * c.detach()).mean()
    hvp = flatten(_grad(objective, params))
    if return_gradient:
        return hvp, flatten([g.detach() for g in grad_phi])
    return hvp


def trajectory_scores(policy: nn.Module, params: Sequence[Tensor], batch: Batch) -> Tensor:
    """Per-trajectory score gradients ``∇log p(τ_i|θ) = Σ_t ψ_it`` as rows of an ``(N, d)`` matrix.

    Their outer products average to the trajectory Fisher: ``E[∇L ∇L^T] = E[Σ_t F(s_t)]``.
    """
    _, loglik = trajectory_terms(policy, batch, torch.zeros_like(batch.mask))
    rows = []
    for i in range(loglik.shape[0]):
        rows.append(flatten(_grad(loglik[i], params, retain_graph=True)))
    return torch.stack(rows)


def old_distribution(policy: nn.Module, batch: Batch):
    """Detached ``π_old(·|s)`` parameters at every batch state (input of :func:`mean_kl`)."""
    with torch.no_grad():
        out = policy.distribution_params(batch.obs)
    return out


def mean_kl(policy: nn.Module, batch: Batch, old) -> Tensor:
    """Mean over the batch's real states of ``KL(π_old(·|s) ‖ π_θ(·|s))`` (a scalar)."""
    kl = policy.kl_from(batch.obs, old)
    return (kl * batch.mask).sum() / batch.mask.sum()


def fisher_vector_product(
    policy: nn.Module, params: Sequence[Tensor], batch: Batch, old, vector: Tensor
) -> Tensor:
    """``F v`` with ``F = ∇²_θ KL̄(π_old ‖ π_θ)`` at ``θ = θ_old`` (double backward), shape ``(d,)``.

    At ``θ = θ_old`` this Hessian equals the Fisher information averaged over the batch's states,
    ``F = mean_s E_{a~π}[ψ ψ^T]``; it is positive semi-definite.
    """
    params = list(params)
    first = params[0]
    check_vector(
        vector, num_elements(params), name="vector", dtype=first.dtype, device=first.device
    )
    grads = _grad(mean_kl(policy, batch, old), params, create_graph=True)
    return flatten(_grad(_dot(grads, unflatten(vector, params)), params))


def importance_surrogate(
    policy: nn.Module, batch: Batch, weights: Tensor, old_logp: Tensor
) -> Tensor:
    """``(1/N) Σ_i Σ_t R_it π_θ(a_it|s_it) / π_old(a_it|s_it)``: its gradient at ``θ_old`` is ``g``.

    Used by the NPG line search to check that a step improves the (local) objective.
    """
    logp = policy.log_prob(batch.obs, batch.actions)
    ratio = torch.exp((logp - old_logp) * batch.mask)
    return (weights.detach() * ratio * batch.mask).sum(1).mean()
