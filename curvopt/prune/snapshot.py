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

FSDP2-sharded models (``structure=False``): every rank records and restores its local shards of
the prunable weights (no communication) and the replicated mask buffers. The structure is left
alone: the sharded path never attaches masks (they must be attached before ``fully_shard``), and
FSDP2 itself swaps the registered parameters between sharded and unsharded ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvopt.distributed import local_tensor

from .masks import PrunableWeight


class ModelSnapshot:
    """What :func:`~curvopt.prune.prune` may change in ``model``, recorded for an exact undo.

    Args:
        model: The network about to be pruned.
        targets: Its prunable weights (:func:`~curvopt.prune.prunable_weights`).
        structure: Also record the module classes and parameter / buffer / child dictionaries
            (``False`` for an FSDP2-sharded model, see the module docs).

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

    def __init__(
        self, model: nn.Module, targets: list[PrunableWeight], structure: bool = True
    ) -> None:
        modules: dict[int, nn.Module] = {}
        for t in targets:
            modules.setdefault(id(t.module), t.module)
        self._structure = (
            [
                (m, type(m), dict(m._parameters), dict(m._buffers), dict(m._modules))
                for m in modules.values()
            ]
            if structure
            else []
        )
        self._values: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        tensors = [x for t in targets for x in (t.param, t.mask)] + list(model.buffers())
        for tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                local = local_tensor(tensor)  # a DTensor's local shard (in-place writes through)
                self._values.append((local, local.detach().clone()))
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
