"""Gradual pruning during fine-tuning: prune on a :class:`CubicSchedule`, keep masks applied."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from .pruner import prune
from .report import PruneReport
from .schedule import CubicSchedule


class GradualPruner:
    """Prune ``model`` at the steps of a schedule while it is being trained.

    Call :meth:`step` once after every optimizer step. At each pruning step the model is pruned
    (in place, by :func:`curvopt.prune.prune` with a fresh curvature estimate from ``data``) to
    ``schedule.sparsity_at(step)``; between pruning steps the masks attached through
    ``torch.nn.utils.parametrize`` keep the pruned weights at zero whatever the optimizer does.

    Args:
        model: The network being trained.
        loss_func: Loss for the pruning gradients (see :func:`prune`).
        data: Re-iterable of ``(X, y)`` batches for the pruning gradients.
        schedule: When and how much to prune.
        **prune_kwargs: Passed to :func:`prune` (``method``, ``scope``, ``num_grads``, ...);
            ``steps`` defaults to 1 here (the schedule itself spreads the pruning out).

    Example:
        >>> import torch
        >>> model = nn.Linear(8, 2)
        >>> X, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        >>> pruner = GradualPruner(model, nn.CrossEntropyLoss(), [(X, y)],
        ...                        CubicSchedule(0.5, 0, 4, 2), method="magnitude")
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(5):
        ...     opt.zero_grad(); nn.CrossEntropyLoss()(model(X), y).backward()
        ...     opt.step(); _ = pruner.step()
        >>> round(float((model.weight == 0).float().mean()), 2)
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: Callable[[Tensor, Tensor], Tensor] | None,
        data: Iterable | None,
        schedule: CubicSchedule,
        **prune_kwargs: Any,
    ) -> None:
        if not isinstance(schedule, CubicSchedule):
            raise TypeError(f"schedule must be a CubicSchedule, got {type(schedule).__name__}")
        if "sparsity" in prune_kwargs:
            raise ValueError("the sparsity comes from the schedule; do not pass sparsity")
        prune_kwargs.setdefault("steps", 1)  # one recomputation per event: training moves w
        self.model, self.loss_func, self.data = model, loss_func, data
        self.schedule = schedule
        self.prune_kwargs = prune_kwargs
        self.step_count = 0
        self.reports: list[PruneReport] = []

    def step(self) -> PruneReport | None:
        """Advance one training step; prune if the schedule says so and return the report."""
        t = self.step_count
        self.step_count += 1
        if not self.schedule.is_prune_step(t):
            return None
        target = self.schedule.sparsity_at(t)
        report = prune(self.model, self.loss_func, self.data, target, **self.prune_kwargs)
        self.reports.append(report)
        return report

    def state_dict(self) -> dict:
        """The step counter (masks live in the model's own ``state_dict``)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step counter."""
        self.step_count = int(state["step_count"])
