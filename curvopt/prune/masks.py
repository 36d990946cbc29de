"""Which weights are prunable, and binary masks that stay applied through training.

A mask is attached to a weight with :mod:`torch.nn.utils.parametrize`: the module's ``weight``
becomes ``original * mask``, so optimizer steps on ``original`` can never bring a pruned entry
back (its gradient is zero and its effective value is ``0 * original``). :func:`pruned_state_dict`
exports the model as an ordinary ``state_dict`` (plain ``weight`` keys, zeros where pruned).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: Layer types pruned by default (their ``weight`` only; biases and norms are left alone).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask`` with a fixed binary mask (a buffer)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, original: Tensor) -> Tensor:
        """Return ``original * mask``."""
        return original * self.mask


@dataclass
class PrunableWeight:
    """One prunable tensor: ``getattr(module, attr)`` of the module called ``name``.

    ``param`` is the leaf tensor the optimizer updates (the parametrization's ``original`` when a
    mask is attached), ``mask`` the attached mask or ``None``.
    """

    name: str
    module: nn.Module
    attr: str = "weight"

    @property
    def masked(self) -> bool:
        """True when a :class:`WeightMask` is attached."""
        return _mask_module(self.module, self.attr) is not None

    @property
    def param(self) -> nn.Parameter:
        """The leaf parameter holding the values."""
        if parametrize.is_parametrized(self.module, self.attr):
            return self.module.parametrizations[self.attr].original
        return getattr(self.module, self.attr)

    @property
    def mask(self) -> Tensor | None:
        """The attached mask (a view of the buffer) or ``None``."""
        m = _mask_module(self.module, self.attr)
        return None if m is None else m.mask

    @property
    def qualified_name(self) -> str:
        """``"<module name>.<attr>"`` as in an unmasked ``state_dict``."""
        return f"{self.name}.{self.attr}" if self.name else self.attr


def _mask_module(module: nn.Module, attr: str) -> WeightMask | None:
    if not parametrize.is_parametrized(module, attr):
        return None
    for p in module.parametrizations[attr]:
        if isinstance(p, WeightMask):
            return p
    return None


def prunable_weights(
    model: nn.Module,
    layer_types: Iterable[type[nn.Module]] | None = None,
    names: Iterable[str] | None = None,
) -> list[PrunableWeight]:
    """The weights to prune, in module order.

    Args:
        model: The network.
        layer_types: Module classes whose ``weight`` is prunable (default
            :data:`DEFAULT_LAYER_TYPES`: Linear and Conv layers).
        names: If given, only these modules (names as in ``model.named_modules()``, or with the
            ``.weight`` suffix) are pruned, and each must exist and have a weight.

    Raises:
        ValueError: If nothing is prunable or a named module is missing.
    """
    types = tuple(layer_types) if layer_types is not None else DEFAULT_LAYER_TYPES
    modules = dict(model.named_modules())
    if names is not None:
        out = []
        for n in names:
            key = n[: -len(".weight")] if n.endswith(".weight") and n not in modules else n
            if key not in modules or not _has_weight(modules[key]):
                raise ValueError(f"no module with a weight called {n!r} in the model")
            out.append(PrunableWeight(key, modules[key]))
    else:
        out = [
            PrunableWeight(n, m)
            for n, m in modules.items()
            if isinstance(m, types) and _has_weight(m)
        ]
    if not out:
        raise ValueError(
            "the model has no prunable layers: pass layer_types (module classes) or names"
        )
    return out


def _has_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is a tensor, without running a parametrization to find out.

    (On an FSDP2 model a parametrized weight can only be computed inside the forward pass.)
    """
    if parametrize.is_parametrized(module, "weight"):
        return True
    return isinstance(getattr(module, "weight", None), Tensor)


def set_mask(target: PrunableWeight, mask: Tensor) -> None:
    """Attach (or replace) the mask of ``target`` and zero the pruned entries of its values."""
    mask = mask.to(dtype=target.param.dtype, device=target.param.device)
    if mask.shape != target.param.shape:
        raise ValueError(
            f"mask for {target.qualified_name} has shape {tuple(mask.shape)}, "
            f"expected {tuple(target.param.shape)}"
        )
    existing = _mask_module(target.module, target.attr)
    if existing is None:
        parametrize.register_parametrization(target.module, target.attr, WeightMask(mask))
    else:
        existing.mask.copy_(mask)
    with torch.no_grad():
        target.param.mul_(mask)


def attach_masks(
    model: nn.Module,
    layer_types: Iterable[type[nn.Module]] | None = None,
    names: Iterable[str] | None = None,
) -> list[PrunableWeight]:
    """Attach an all-ones mask to every prunable weight that has none; return the weights.

    :func:`curvopt.prune.prune` does this itself, except on an FSDP2 model: a parametrization
    cannot be added to a parameter ``fully_shard`` already manages, so call this before
    ``fully_shard`` (FSDP2 then shards the parametrization's ``original``).

    Args:
        model: The network (changed in place).
        layer_types: See :func:`prunable_weights`.
        names: See :func:`prunable_weights`.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> all(t.masked for t in attach_masks(model))
        True
    """
    targets = prunable_weights(model, layer_types, names)
    for t in targets:
        if t.mask is None:
            set_mask(t, torch.ones_like(t.param))
    return targets


def remove_masks(model: nn.Module) -> None:
    """Bake the masks into the weights and remove the parametrizations (in place)."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                if _mask_module(module, attr) is not None:
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def pruned_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """An ordinary ``state_dict`` of the model with masks applied (the model is not changed).

    Keys are those of the unmasked model (``layer.weight``, not
    ``layer.parametrizations.weight.original``); pruned entries are exactly zero.
    """
    out: dict[str, Tensor] = {}
    effective = {}
    for mname, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr in module.parametrizations.keys():
                key = f"{mname}.{attr}" if mname else attr
                effective[key] = getattr(module, attr).detach().clone()
    for key, value in model.state_dict().items():
        if ".parametrizations." in key or key.startswith("parametrizations."):
            continue
        out[key] = value.detach().clone()
    out.update(effective)
    return out


def sparsity_of(tensor: Tensor) -> float:
    """Fraction of exact zeros in ``tensor``."""
    return float((tensor == 0).sum()) / max(tensor.numel(), 1)
