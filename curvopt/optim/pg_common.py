"""Shared pieces of the momentum policy-gradient optimizers (:class:`NHARPG`, :class:`NPGIGT`).

Both keep, per parameter, the previous iterate ``θ_{t-1}`` and the direction ``d_{t-1}``, and
maximize ``J`` with steps ``θ_{t+1} = θ_t + γ_t d_t / ‖d_t‖`` (or ``γ_t d_t`` unnormalized), where
the
norm is the global L2 norm over all parameters of all groups.

Schedules (``t = 0, 1, ...`` counts steps taken):

- step size ``γ_t = lr · (2/(t+2))^lr_power`` — or ``lr · lr_schedule(t)`` if a callable is given;
- momentum ``η_t = momentum · (2/(t+2))^momentum_power`` — or ``momentum_schedule(t)``; must lie in
  ``(0, 1]``. The first direction is the first gradient, ``d_0 = g_0``, whatever ``η_0``
  (averaging it with the nonexistent ``d_{-1} = 0`` would start from ``η_0 g_0``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from curvopt.optim._copying import WholeCopyOptimizer
from curvopt.optim._state_checks import check_optimizer_state
from curvopt.rl.sampler import EstimateSampler
from curvopt.utils.params import flatten, unflatten


def power_schedule(scale: float, power: float, t: int) -> float:
    """``scale · (2/(t+2))^power`` — the paper's ``2/(t+2)`` family (``power=1``).

    Example:
        >>> power_schedule(0.1, 1.0, 0), power_schedule(0.1, 1.0, 2)
        (0.1, 0.05)
    """
    return scale * (2.0 / (t + 2.0)) ** power


def check_number(
    name: str,
    value: object,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = True,
    high_open: bool = True,
) -> float:
    """Return ``value`` as a float after checking that it is a finite real number in a range.

    The range is ``(low, high)``; ``low_open=False`` / ``high_open=False`` close either end.
    Bools, NaN and ±inf are rejected with a ``TypeError`` / ``ValueError`` naming the value.

    Example:
        >>> check_number("lr", 0.1)
        0.1
        >>> check_number("momentum", 1, high=1.0, high_open=False)
        1.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if too_low or too_high:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        hi = "inf" if math.isinf(high) else f"{high:g}"
        raise ValueError(f"{name} must lie in {left}{low:g}, {hi}{right}, got {value!r}")
    return x


def check_count(name: str, value: object) -> int:
    """Return ``value`` after checking that it is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def checked_group_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a momentum policy-gradient group, validated (the constructor's rules).

    Used by the constructor and by :meth:`MomentumPolicyGradient.load_state_dict` on every saved
    group, so a state with ``momentum=2`` or ``lr=nan`` is refused as the constructor refuses it.

    Raises:
        ValueError: A value out of range.
        TypeError: A value of the wrong type.
    """
    normalize = group["normalize"]
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    for name in ("lr_schedule", "momentum_schedule"):
        fn = group[name]
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable t -> float or None, got {fn!r}")
    return dict(
        lr=check_number("lr (the initial step size γ₀)", group["lr"]),
        lr_power=check_number("lr_power", group["lr_power"], low_open=False),
        momentum=check_number("momentum (η₀)", group["momentum"], high=1.0, high_open=False),
        momentum_power=check_number("momentum_power", group["momentum_power"], low_open=False),
        normalize=normalize,
        lr_schedule=group["lr_schedule"],
        momentum_schedule=group["momentum_schedule"],
    )


class MomentumPolicyGradient(WholeCopyOptimizer):
    """Base class: hyperparameter validation, schedules, flat views, the normalized ascent step.

    Subclasses implement :meth:`_direction` which returns the new ``d_t`` (flat) given the sampler.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        lr_power: float,
        momentum: float,
        momentum_power: float,
        normalize: bool,
        lr_schedule: Callable[[int], float] | None,
        momentum_schedule: Callable[[int], float] | None,
        generator: torch.Generator | None = None,
    ):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
        defaults = checked_group_hyperparameters(
            dict(
                lr=lr,
                lr_power=lr_power,
                momentum=momentum,
                momentum_power=momentum_power,
                normalize=normalize,
                lr_schedule=lr_schedule,
                momentum_schedule=momentum_schedule,
            )
        )
        super().__init__(params, defaults)
        self.generator = generator

    # ----- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state dict, plus the random generator's state when one was given."""
        state = super().state_dict()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore per-parameter state, hyperparameters and (if saved) the generator state.

        Everything is validated before anything is loaded: on error the optimizer is unchanged.

        Raises:
            ValueError: If the state does not fit these parameters, or holds a generator state
                but this optimizer has no generator.
        """
        id_map = check_optimizer_state(
            self, state_dict, ["prev", "momentum"], check_group=checked_group_hyperparameters
        )
        steps = set()
        for pid, entry in state_dict["state"].items():
            if pid in id_map and isinstance(entry, Mapping):
                step = entry.get("step", 0)
                if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                    raise ValueError(
                        f"state_dict['state'][{pid}]['step'] must be an int >= 0, got {step!r}"
                    )
                if step > 0 and not {"prev", "momentum"} <= set(entry):
                    raise ValueError(
                        f"state_dict['state'][{pid}] is at step {step} but lacks 'prev' or "
                        "'momentum': the saved state is incomplete"
                    )
                steps.add(step)
        if len(steps) > 1 or (steps - {0} and len(state_dict["state"]) < len(id_map)):
            raise ValueError(
                f"the parameters of the saved state are at different steps {sorted(steps)}: "
                "the state is corrupted (all parameters step together)"
            )
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        if generator_state is not None and self.generator is None:
            raise ValueError(
                "the state dict holds a random-generator state; construct the optimizer with "
                "generator=torch.Generator() to restore it"
            )
        if generator_state is not None:  # a bad state raises here, on a scratch generator
            try:
                torch.Generator(device=self.generator.device).set_state(generator_state)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"the saved generator state cannot be restored: {err}") from None
        super().load_state_dict(state_dict)
        if generator_state is not None:
            self.generator.set_state(generator_state)

    # ----- schedules --------------------------------------------------------------------------
    @staticmethod
    def step_size(group: dict, t: int) -> float:
        """``γ_t`` of a parameter group (checked to be finite and >= 0)."""
        if group["lr_schedule"] is not None:
            gamma = group["lr"] * float(group["lr_schedule"](t))
        else:
            gamma = power_schedule(group["lr"], group["lr_power"], t)
        if not (math.isfinite(gamma) and gamma >= 0.0):
            raise ValueError(f"step-size schedule gave γ_{t} = {gamma}; it must be finite and >= 0")
        return gamma

    @staticmethod
    def momentum_weight(group: dict, t: int) -> float:
        """``η_t`` of a parameter group (checked to lie in ``(0, 1]``)."""
        if group["momentum_schedule"] is not None:
            eta = float(group["momentum_schedule"](t))
        else:
            eta = power_schedule(group["momentum"], group["momentum_power"], t)
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"momentum schedule gave η_{t} = {eta}; it must lie in (0, 1]")
        return eta

    # ----- flat views -------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _per_param(self, t: int, fn) -> Tensor:
        """Flat vector holding ``fn(group, t)`` at the coordinates of each group's parameters."""
        parts = [
            torch.full((p.numel(),), fn(group, t), dtype=p.dtype, device=p.device)
            for group in self.param_groups
            for p in group["params"]
        ]
        return torch.cat(parts)

    @property
    def steps_taken(self) -> int:
        """Number of completed steps ``t``."""
        params = self._params()
        return self.state[params[0]].get("step", 0) if params else 0

    def _load_state(self, params: list[Tensor], theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(θ_{t-1}, d_{t-1})``; at ``t = 0`` these are ``θ_0`` and 0."""
        if self.steps_taken == 0:
            return theta.clone(), torch.zeros_like(theta)
        prev = flatten([self.state[p]["prev"] for p in params])
        mom = flatten([self.state[p]["momentum"] for p in params])
        return prev, mom

    @staticmethod
    @torch.no_grad()
    def _write(params: list[Tensor], flat: Tensor) -> None:
        for p, v in zip(params, unflatten(flat, params)):
            p.copy_(v)

    def _direction(self, sampler, params, theta, prev, mom, eta, t) -> Tensor:
        raise NotImplementedError

    def step(self, sampler: EstimateSampler) -> Tensor:  # type: ignore[override]
        """Take one ascent step; ``sampler`` provides gradients (and HVPs) at the points asked for.

        Args:
            sampler: A :class:`~curvopt.rl.PolicyGradientSampler` (or anything with the same
                ``gradient(params)`` / ``hvp(vector, params)`` methods) whose policy owns these
                parameters.

        Returns:
            The direction ``d_t`` (flat, detached).
        """
        if sampler is None or not hasattr(sampler, "gradient"):
            raise TypeError(
                f"{type(self).__name__}.step needs a sampler with gradient(params) (and hvp), "
                "e.g. curvopt.rl.PolicyGradientSampler; a loss closure is not enough"
            )
        params = self._params()
        t = self.steps_taken
        with torch.no_grad():
            theta = flatten([p.detach() for p in params]).clone()
        prev, mom = self._load_state(params, theta)
        eta = self._per_param(t, self.momentum_weight)  # validates the schedule at t = 0 too
        if t == 0:  # d_0 = g_0: nothing to average with yet
            eta = torch.ones_like(eta)
        direction = self._direction(sampler, params, theta, prev, mom, eta, t)
        with torch.no_grad():
            direction = direction.detach()
            gamma = self._per_param(t, self.step_size)
            update = gamma * direction
            if any(g["normalize"] for g in self.param_groups):
                norm = direction.norm().clamp_min(torch.finfo(direction.dtype).tiny)
                scale = torch.cat(
                    [
                        torch.full((p.numel(),), g["normalize"], dtype=torch.bool)
                        for g in self.param_groups
                        for p in g["params"]
                    ]
                ).to(direction.device)
                update = torch.where(scale, update / norm, update)
            self._write(params, theta + update)
            for p, th, d in zip(params, unflatten(theta, params), unflatten(direction, params)):
                st = self.state[p]
                st["prev"] = th.clone()
                st["momentum"] = d.clone()
                st["step"] = t + 1
        return direction
