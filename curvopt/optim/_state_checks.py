"""Checks run before an optimizer loads a state dict, so that a failed load changes nothing.

``torch.optim.Optimizer.load_state_dict`` checks the number of groups and of parameters per
group, but not the shapes of the per-parameter state: a state from another model with the same
number of tensors loads, and the next step fails. Our optimizers call
:func:`check_optimizer_state` first and then validate their own extra entries, all before the
first assignment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

#: Entries that torch itself puts into ``optimizer.defaults`` (``Optimizer.__setstate__``, run by
#: ``copy.deepcopy`` or unpickling, e.g. inside Hugging Face's Trainer, adds ``differentiable``)
#: without adding them to the saved groups; the step never reads them from a group.
TORCH_MANAGED_DEFAULTS = frozenset({"differentiable"})

#: Entry of ``state_dict()["state"]`` in which an optimizer whose state holds no per-parameter
#: tensor (e.g. only a radius and counters) records :func:`group_sizes`: without it a state saved
#: for a problem of another dimension, but with as many parameter tensors, would load silently.
GROUP_SIZES_KEY = "param_group_numel"


def group_sizes(optimizer: Optimizer) -> list[int]:
    """Number of parameter entries ``sum_p p.numel()`` of each parameter group, in order.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(2, 3, requires_grad=True)], lr=0.1)
        >>> group_sizes(opt)
        [6]
    """
    return [sum(p.numel() for p in group["params"]) for group in optimizer.param_groups]


def check_optimizer_state(
    optimizer: Optimizer,
    state_dict: Any,
    shaped_keys: Iterable[str] = (),
    state_shape: Callable[[Tensor], torch.Size] | None = None,
    check_group: Callable[[Mapping[str, Any]], object] | None = None,
) -> dict[int, Tensor]:
    """Raise ``TypeError``/``ValueError`` if ``state_dict`` does not fit ``optimizer``.

    Checks the structure (``state`` and ``param_groups``), the number of groups, the number of
    parameters of each group, that every saved group has the keys of the optimizer's defaults
    (a group without ``lr`` would load and fail at the next step), that every per-parameter entry
    named in ``shaped_keys`` (e.g. a momentum buffer) is a finite tensor of exactly the
    parameter's shape (a transposed buffer with the same number of elements is refused), that
    the group sizes recorded under :data:`GROUP_SIZES_KEY`, if the state has them, equal
    :func:`group_sizes` of ``optimizer`` (states saved without them are not checked for it), and,
    with ``check_group``, the hyperparameters of every saved group by the constructor's own rules.
    Changes nothing.

    Args:
        optimizer: The optimizer that will load the state.
        state_dict: The candidate, as returned by ``optimizer.state_dict()``.
        shaped_keys: Per-parameter state entries that must have the parameter's shape.
        state_shape: The shape those entries must have for a parameter, when it is not the
            parameter's own (e.g. an optimizer that keeps only this rank's shard of it).
        check_group: Called on every saved parameter group (after the check for missing keys);
            raises ``ValueError``/``TypeError`` for a hyperparameter the constructor would refuse.

    Returns:
        The map from the saved parameter ids to this optimizer's parameters.

    Example:
        >>> w = torch.zeros(3, requires_grad=True)
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> sd = {"state": {0: {"momentum_buffer": torch.zeros(5)}},
        ...       "param_groups": [dict(opt.state_dict()["param_groups"][0])]}
        >>> check_optimizer_state(opt, sd, ["momentum_buffer"])
        Traceback (most recent call last):
        ...
        ValueError: state_dict['state'][0]['momentum_buffer'] has shape (5,) but ... needs ...
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise TypeError(
            "state_dict must be a dict with 'state' and 'param_groups', as returned by "
            f"state_dict(); got {type(state_dict).__name__}"
        )
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} parameter groups but the optimizer has "
            f"{len(groups)}"
        )
    id_map: dict[int, Tensor] = {}
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise TypeError(f"state_dict['param_groups'][{i}] must be a dict with 'params'")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {i} of state_dict has {len(saved['params'])} parameters but "
                f"the optimizer's has {len(group['params'])}"
            )
        missing = set(optimizer.defaults) - set(saved) - TORCH_MANAGED_DEFAULTS
        if missing:
            raise ValueError(
                f"parameter group {i} of state_dict lacks the hyperparameters {sorted(missing)}: "
                f"it was not saved by {type(optimizer).__name__}.state_dict()"
            )
        if check_group is not None:
            try:
                check_group(saved)
            except (ValueError, TypeError) as err:
                raise type(err)(f"parameter group {i} of state_dict: {err}") from None
        id_map.update(zip(saved["params"], group["params"]))
    state = state_dict["state"]
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
    if GROUP_SIZES_KEY in state:
        saved_sizes, sizes = state[GROUP_SIZES_KEY], group_sizes(optimizer)
        if not (
            isinstance(saved_sizes, (list, tuple))
            and all(isinstance(n, int) and not isinstance(n, bool) for n in saved_sizes)
        ):
            raise ValueError(
                f"state_dict['state'][{GROUP_SIZES_KEY!r}] must be a list of integers (the "
                f"parameter entries of each group), got {saved_sizes!r}: the state is corrupted"
            )
        if list(saved_sizes) != sizes:
            raise ValueError(
                f"state_dict was saved for parameter groups of {list(saved_sizes)} entries but "
                f"this {type(optimizer).__name__}'s groups have {sizes}: the state is from a "
                "problem of another dimension"
            )
    keys = tuple(shaped_keys)
    for pid, entry in state.items():
        if pid not in id_map or not keys:
            continue
        p = id_map[pid]
        shape = p.shape if state_shape is None else state_shape(p)
        for key in keys:
            if key not in entry:
                continue
            t = entry[key]
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"state_dict['state'][{pid}][{key!r}] has shape {got} but parameter {pid} "
                    f"needs shape {tuple(shape)}: the state is from another model"
                )
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"state_dict['state'][{pid}][{key!r}] contains NaN or Inf: the saved state "
                    "is corrupted (loading it would write NaN into the parameters)"
                )
    return id_map
