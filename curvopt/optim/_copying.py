"""Optimizers that survive ``copy.deepcopy`` and pickling whole.

``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``:
an optimizer with attributes of its own (M-FAC's window, a policy-gradient sampler's generator)
would come back from ``copy.deepcopy`` or ``pickle`` without them and fail at its next step.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer


class WholeCopyOptimizer(Optimizer):
    """An ``Optimizer`` whose copies and pickles keep every attribute.

    Example:
        >>> import copy, torch
        >>> from curvopt.optim import MFAC
        >>> opt = MFAC([torch.zeros(3, requires_grad=True)], lr=0.1, m=2)
        >>> copy.deepcopy(opt).window.m
        2
    """

    def __getstate__(self) -> dict[str, Any]:  # noqa: D105
        return dict(self.__dict__)
