r"""Natural policy gradient with a KL trust region (Kakade 2001; TRPO's step, Schulman 2015).

Per step, on one fresh batch sampled at ``θ``:

1. ``g``: the GPOMDP gradient (ascent);
2. solve ``(F + c I) x = g`` where ``F`` is the Fisher of the policy averaged over the batch's
   states,
   either

   - ``solver="cg"``: conjugate gradient on Fisher-vector products ``F v = ∇((∇KL̄)·v)``, the
     Hessian of
     the mean ``KL(π_old ‖ π_θ)`` at ``θ_old`` (double backward, ``F`` never formed); or
   - ``solver="mfac"``: the M-FAC Woodbury solve with ``F ≈ c I + GᵀG/m`` over the ``m``
     per-trajectory
     score gradients ``∇log p(τ_i) = Σ_t ψ_it``, each scaled by ``1/sqrt(mean trajectory length)``
     so
     that ``GᵀG/m`` estimates the same per-state Fisher (``E[∇L∇Lᵀ] = E[Σ_t F(s_t)]``);

3. step ``Δθ = β x`` with ``β = sqrt(2δ / xᵀFx)``, so the quadratic model of the mean KL,
   ``½ ΔθᵀFΔθ``, equals ``δ``;
4. optionally a backtracking line search: try ``θ + ρ^j Δθ`` (``j = 0..max_backtracks-1``) and
   accept
   the first whose realized mean KL is ``≤ kl_tolerance · δ`` and (with ``require_improvement``)
   whose
   importance-sampled surrogate improves; if none is accepted ``θ`` is kept.

After each step :attr:`NPG.last_step` holds ``predicted_kl`` (``½ΔθᵀFΔθ`` of the step taken) and
``realized_kl`` (mean KL between the old and new policy on the batch states) as 0-d tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from curvopt.optim._copying import WholeCopyOptimizer
from curvopt.optim._state_checks import check_optimizer_state
from curvopt.optim.linear_solve import fixed_iteration_cg
from curvopt.optim.pg_common import check_count, check_number
from curvopt.rl.sampler import PolicyGradientSampler
from curvopt.rl.surrogates import (
    fisher_vector_product,
    importance_surrogate,
    mean_kl,
    old_distribution,
    policy_gradient,
    trajectory_scores,
)
from curvopt.utils.params import flatten, unflatten


def _checked_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of an NPG group, validated and normalized (the constructor's rules).

    Used by the constructor and by :meth:`NPG.load_state_dict` on every saved group.

    Raises:
        ValueError: A value out of range (e.g. ``delta <= 0`` or NaN, an unknown solver).
        TypeError: A value of the wrong type (e.g. ``backtrack`` not a bool).
    """
    solver = group["solver"]
    if solver not in ("cg", "mfac"):
        raise ValueError(f"solver must be 'cg' or 'mfac', got {solver!r}")
    out = dict(
        delta=check_number("delta (the KL trust-region radius δ)", group["delta"]),
        damping=check_number(
            "damping (> 0 for solver='mfac')", group["damping"], low_open=solver == "mfac"
        ),
        solver=solver,
        cg_iters=check_count("cg_iters", group["cg_iters"]),
        cg_tol=check_number(
            "cg_tol (relative squared residual of CG)", group["cg_tol"], high=1.0, low_open=False
        ),
        max_backtracks=check_count("max_backtracks", group["max_backtracks"]),
        backtrack_ratio=check_number("backtrack_ratio", group["backtrack_ratio"], high=1.0),
        kl_tolerance=check_number("kl_tolerance", group["kl_tolerance"]),
    )
    for name in ("backtrack", "require_improvement"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{name} must be True or False, got {group[name]!r}")
        out[name] = group[name]
    return out


class NPG(WholeCopyOptimizer):
    """Natural policy gradient with a KL trust region (ascent on the expected return).

    Args:
        params: The policy's parameters.
        delta: Trust-region radius ``δ > 0`` on the mean KL.
        damping: ``c ≥ 0`` added to the Fisher (for ``"mfac"`` the M-FAC ``damp``, must be > 0).
        solver: ``"cg"`` (Fisher-vector products) or ``"mfac"`` (Woodbury over trajectory scores).
        cg_iters: Conjugate-gradient iterations.
        cg_tol: Stop CG when ``‖r‖² <= cg_tol · ‖g‖²`` (relative to the gradient, so the step
            does not depend on the scale of the rewards; an absolute floor at the dtype's
            smallest normal number). In ``[0, 1)``.
        backtrack: Run the line search on the realized KL (needs host syncs for the accept test).
        max_backtracks: Step fractions tried.
        backtrack_ratio: ``ρ`` in ``(0, 1)``.
        kl_tolerance: Accept a trial if its realized KL ``≤ kl_tolerance · δ``.
        require_improvement: Also require the importance-sampled surrogate to increase.

    Example:
        >>> from curvopt.rl import CategoricalMLPPolicy, GymRollout, PolicyGradientSampler
        >>> policy = CategoricalMLPPolicy(4, 2)
        >>> sampler = PolicyGradientSampler(policy, GymRollout("CartPole-v1", 50, seed=0), 4)
        >>> opt = NPG(policy.parameters(), delta=0.01)
        >>> _ = opt.step(sampler)
        >>> round(float(opt.last_step["predicted_kl"]), 6)  # the trust region: ½ βx·F βx = δ
        0.01
    """

    def __init__(
        self,
        params: ParamsT,
        delta: float = 0.01,
        damping: float = 0.1,
        solver: str = "cg",
        cg_iters: int = 10,
        cg_tol: float = 1e-10,
        backtrack: bool = False,
        max_backtracks: int = 10,
        backtrack_ratio: float = 0.5,
        kl_tolerance: float = 1.5,
        require_improvement: bool = True,
    ):
        defaults = _checked_hyperparameters(
            dict(
                delta=delta,
                damping=damping,
                solver=solver,
                cg_iters=cg_iters,
                cg_tol=cg_tol,
                backtrack=backtrack,
                max_backtracks=max_backtracks,
                backtrack_ratio=backtrack_ratio,
                kl_tolerance=kl_tolerance,
                require_improvement=require_improvement,
            )
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("NPG takes a single parameter group (the step is global)")
        self.last_step: dict[str, Tensor] = {}

    def _solve(self, policy, params, batch, old, grad: Tensor) -> Tensor:
        group = self.param_groups[0]
        if group["solver"] == "cg":

            def damped_fvp(v: Tensor) -> Tensor:
                fv = fisher_vector_product(policy, params, batch, old, v)
                return fv + group["damping"] * v

            return fixed_iteration_cg(damped_fvp, grad, group["cg_iters"], group["cg_tol"])
        if group["solver"] != "mfac":  # e.g. a param group edited after construction
            raise ValueError(f"solver must be 'cg' or 'mfac', got {group['solver']!r}")
        from curvopt.mfac import StaticMFAC

        scores = trajectory_scores(policy, params, batch)
        scale = batch.lengths().mean().clamp_min(1.0).rsqrt()
        with warnings.catch_warnings():  # many trajectories of a small policy: rows by design
            warnings.filterwarnings("ignore", "grads has shape", UserWarning)
            inverse = StaticMFAC(scores * scale, group["damping"])
        return inverse.ihvp(grad)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; validated first, so on error the optimizer is unchanged."""
        check_optimizer_state(self, state_dict, check_group=_checked_hyperparameters)
        super().load_state_dict(state_dict)

    @staticmethod
    @torch.no_grad()
    def _write(params, flat: Tensor) -> None:
        for p, v in zip(params, unflatten(flat, params)):
            p.copy_(v)

    def step(self, sampler: PolicyGradientSampler) -> Tensor:  # type: ignore[override]
        """One trust-region natural-gradient step on a fresh batch from ``sampler``.

        Args:
            sampler: A :class:`~curvopt.rl.PolicyGradientSampler` whose policy owns these
                parameters.

        Returns:
            The step ``Δθ`` actually taken (flat; zero if the line search rejected every trial).
        """
        if sampler is None or not hasattr(sampler, "sample") or not hasattr(sampler, "policy"):
            raise TypeError(
                "NPG.step needs a sampler with sample(), weights(batch) and policy, "
                "e.g. curvopt.rl.PolicyGradientSampler"
            )
        group = self.param_groups[0]
        params = list(group["params"])
        policy = sampler.policy
        batch = sampler.sample(kind="gradient")
        weights = sampler.weights(batch)
        old = old_distribution(policy, batch)
        with torch.no_grad():
            theta = flatten([p.detach() for p in params]).clone()
            old_logp = policy.log_prob(batch.obs, batch.actions)
        with torch.enable_grad():
            grad = policy_gradient(policy, params, batch, weights)
            x = self._solve(policy, params, batch, old, grad)
            fx = fisher_vector_product(policy, params, batch, old, x)
        xfx = (x @ fx).clamp_min(torch.finfo(x.dtype).tiny)
        beta = torch.sqrt(2 * group["delta"] / xfx)
        full_step = beta * x
        step = full_step
        if group["backtrack"]:
            step = torch.zeros_like(full_step)
            with torch.no_grad():
                base = importance_surrogate(policy, batch, weights, old_logp)
            for j in range(group["max_backtracks"]):
                trial = full_step * group["backtrack_ratio"] ** j
                self._write(params, theta + trial)
                with torch.no_grad():
                    kl = mean_kl(policy, batch, old)
                    gain = importance_surrogate(policy, batch, weights, old_logp) - base
                ok = bool(kl <= group["kl_tolerance"] * group["delta"])
                if group["require_improvement"]:
                    ok = ok and bool(gain > 0)
                if ok:
                    step = trial
                    break
        self._write(params, theta + step)
        with torch.no_grad():
            realized = mean_kl(policy, batch, old)
        ratio = step.norm() / full_step.norm().clamp_min(torch.finfo(x.dtype).tiny)
        self.last_step = {
            "predicted_kl": 0.5 * ratio**2 * beta**2 * xfx,
            "realized_kl": realized.detach(),
            "step_fraction": ratio,
        }
        for p in params:
            self.state[p]["step"] = self.state[p].get("step", 0) + 1
        return step
