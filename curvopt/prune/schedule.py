"""Sparsity schedules: the k-step one-shot schedule and gradual pruning during fine-tuning."""

from __future__ import annotations

import math


def one_shot_schedule(target: float, steps: int, start: float = 0.0) -> list[float]:
    """Intermediate sparsities for one-shot pruning in ``steps`` recomputation steps.

    Each step removes the same *fraction of the remaining* weights, so

    .. math::

        s_j = 1 - (1 - s_0) \\left(\\frac{1 - s}{1 - s_0}\\right)^{j/k}, \\quad j = 1..k,

    which for ``s_0 = 0`` is ``s_j = 1 - (1 - s)^{j/k}``; ``s_k = s`` exactly. Curvature and scores
    are recomputed before every step.

    Args:
        target: Final sparsity ``s`` in ``[0, 1)``.
        steps: Number of steps ``k >= 1``.
        start: Sparsity already present, ``s_0 <= s``.

    Example:
        >>> tuple(round(s, 4) for s in one_shot_schedule(0.9, 2))
        (0.6838, 0.9)
    """
    _check_sparsity(target, "target")
    _check_sparsity(start, "start")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if start > target:
        raise ValueError(f"start sparsity {start} exceeds the target {target}")
    ratio = (1 - target) / (1 - start)
    out = [1 - (1 - start) * ratio ** (j / steps) for j in range(1, steps + 1)]
    out[-1] = float(target)
    return out


class CubicSchedule:
    """Gradual pruning schedule (Zhu & Gupta, 2017): prune every ``frequency`` steps.

    .. math::

        s_t = s_f + (s_i - s_f) \\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^3,
        \\quad t \\in \\{t_0, t_0 + \\Delta, \\dots\\},\\ t \\le t_1,

    fast at first, when many redundant weights remain, and slow near the end. ``s_t = s_f`` from
    ``t_1`` on.

    Args:
        final_sparsity: ``s_f`` in ``[0, 1)``.
        start_step: ``t_0``, the first pruning step.
        end_step: ``t_1 > t_0``, the step that reaches ``s_f``.
        frequency: ``Delta``, steps between pruning events.
        initial_sparsity: ``s_i``, the sparsity of the first event at ``t_0`` (default 0: the
            first event that removes weights is then ``t_0 + Delta``).

    Example:
        >>> s = CubicSchedule(0.9, start_step=0, end_step=100, frequency=25)
        >>> tuple(s.prune_steps()), round(s.sparsity_at(50), 4)
        ((0, 25, 50, 75, 100), 0.7875)
    """

    def __init__(
        self,
        final_sparsity: float,
        start_step: int,
        end_step: int,
        frequency: int,
        initial_sparsity: float = 0.0,
    ) -> None:
        _check_sparsity(final_sparsity, "final_sparsity")
        _check_sparsity(initial_sparsity, "initial_sparsity")
        if initial_sparsity > final_sparsity:
            raise ValueError("initial_sparsity must not exceed final_sparsity")
        if start_step < 0 or end_step <= start_step:
            raise ValueError(f"need 0 <= start_step < end_step, got {start_step}, {end_step}")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step, self.end_step, self.frequency = int(start_step), int(end_step), frequency

    def sparsity_at(self, step: int) -> float:
        """Target sparsity at ``step`` (0 before ``t_0``)."""
        if step < self.start_step:
            return 0.0
        frac = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_f + (s_i - s_f) * (1 - frac) ** 3

    def is_prune_step(self, step: int) -> bool:
        """True at ``t_0, t_0 + Delta, ...`` up to ``t_1`` and at ``t_1`` itself."""
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def prune_steps(self) -> list[int]:
        """All steps at which pruning happens."""
        return [t for t in range(self.start_step, self.end_step + 1) if self.is_prune_step(t)]


def one_shot_step(target: float, frac: float, start: float) -> float:
    """Sparsity after a fraction ``frac = j/k`` of the schedule from ``start`` to ``target``.

    The ``j``-th entry of :func:`one_shot_schedule` for ``frac = j / k``,
    ``1 - (1 - s_0) ((1 - s) / (1 - s_0))^frac`` with ``s_0 = min(start, target)``; exactly
    ``target`` from ``frac = 1`` on. No validation: the pruning loop calls it with checked values.

    Example:
        >>> round(one_shot_step(0.9, 0.5, 0.0), 4)
        0.6838
    """
    start = min(start, target)
    if frac >= 1:
        return target
    return 1 - (1 - start) * ((1 - target) / (1 - start)) ** frac


def _check_sparsity(s: float, name: str) -> None:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"{name} must be a number in [0, 1), got {s!r}")
    if not 0 <= s < 1:
        raise ValueError(f"{name} must be in [0, 1), got {s}")
