"""Undo for :func:`curvopt.prune.prune`: a failed prune leaves the model exactly as it was.

Pruning changes a model in four ways: it attaches :class:`~curvopt.prune.masks.WeightMask`
parametrizations (which swaps the module's class for torch's parametrized subclass and moves the
``weight`` parameter under ``module.parametrizations``), overwrites the prunable weights and their
masks, and - if the model is in training mode - updates buffers such as BatchNorm's running
statistics during the forward passes that collect gradients. :class:`ModelSnapshot` records all of
that before the first change and puts it back on :meth:`ModelSnapshot.restore`:

* the class and the ``_parameters`` / ``_buffers`` / ``_modules`` dictionaries of every module that
  owns a prunable weight (same objects, same key order, so ``model.parameters()`` and an
  optimizer built on them are unaffected);
* the values of the prunable weights and of their existing masks, ``requires_grad`` of every
  parameter, and the values of every buffer of the model.

Memory: one copy of the prunable weights and of the model's buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masks import PrunableWeight


class ModelSnapshot:
    """What :func:`~curvopt.prune.prune` may change in ``model``, recorded for an exact undo.

    Args:
        model: The network about to be pruned.
        targets: Its prunable weights (:func:`~curvopt.prune.prunable_weights`).

    Example:
        >>> from curvopt.prune.masks import prunable_weights, set_mask
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> before = {k: v.clone() for k, v in model.state_dict().items()}
        >>> targets = prunable_weights(model)
        >>> snap = ModelSnapshot(model, targets)
        >>> set_mask(targets[0], torch.zeros(2, 3))
        >>> snap.restore()
        >>> type(model[0]) is nn.Linear, list(model.state_dict()) == list(before)
        (True, True)
        >>> all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        True
    """

    def __init__(self, model: nn.Module, targets: list[PrunableWeight]) -> None:
        modules: dict[int, nn.Module] = {}
        for t in targets:
            modules.setdefault(id(t.module), t.module)
        self._structure = [
            (m, type(m), dict(m._parameters), dict(m._buffers), dict(m._modules))
            for m in modules.values()
        ]
        self._values: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        for t in targets:
            for tensor in (t.param, t.mask):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    self._values.append((tensor, tensor.detach().clone()))
        for buf in model.buffers():
            if id(buf) not in seen:
                seen.add(id(buf))
                self._values.append((buf, buf.detach().clone()))
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        """Put the recorded structure, values and ``requires_grad`` flags back."""
        for module, cls, params, buffers, children in self._structure:
            module.__class__ = cls
            for current, saved in (
                (module._parameters, params),
                (module._buffers, buffers),
                (module._modules, children),
            ):
                current.clear()
                current.update(saved)
        with torch.no_grad():
            for tensor, saved in self._values:
                tensor.copy_(saved)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
