r"""How a model's modules run inside the forward pass with dual tensors.

`DualArithmeticMode` rewrites a few slow forward-mode calls, but as a ``TorchFunctionMode`` it
sees *every* torch call of the pass, shapes and views included: on the tiny GPT-2 of
``benchmarks/curvature_products.py`` about 250 calls per batch, which cost about as much as a
third of the primal forward pass. Most of them sit in layers that have no arithmetic with
constants at all. `fast_modules` therefore runs, for the duration of one pass:

* the layers of `PLAIN_LAYERS` (``nn.Linear``, the convolutions, the normalizations,
  ``nn.Embedding``, dropout) and transformers' ``Conv1D`` with torch-function handling off: they
  compute exactly what they compute under the mode, without its per-call cost;
* in a first-order pass (GGN, Fisher, empirical Fisher: one backward pass through the output),
  the activation modules that have a fused rule as one `torch.autograd.Function`
  (`curvopt.curvature.activation_rules`), also with torch-function handling off.

Only modules of exactly these classes, without a ``forward`` of their own on the instance and
whose parameters are plain tensors (no tensor subclass that could rely on ``__torch_function__``),
are changed; each is restored on exit. Like the parameter swap of the same pass
(`curvopt.curvature._functional.substituted`), this changes the model while the pass runs: two
products on one model must not run at the same time in different threads.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .activation_rules import fused_forward

#: Layers whose forward has no arithmetic between dual tensors and constants.
PLAIN_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.Dropout,
    nn.Identity,
)


#: Plain layers of optional packages, by defining module and name (a lookup that imports
#: nothing: a model holding one has imported its package already).
PLAIN_LAYERS_BY_NAME: frozenset[tuple[str, str]] = frozenset(
    {("transformers.pytorch_utils", "Conv1D")}
)


def is_plain_layer(cls: type) -> bool:
    """Whether ``cls`` is one of `PLAIN_LAYERS` (exactly) or `PLAIN_LAYERS_BY_NAME`."""
    return cls in PLAIN_LAYERS or (cls.__module__, cls.__qualname__) in PLAIN_LAYERS_BY_NAME


def _without_torch_function(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` with torch-function handling off, for plain-tensor inputs only.

    A tensor-subclass input keeps its ``__torch_function__`` (and the modes), as without us.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        if kwargs or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args):
            return forward(*args, **kwargs)
        with torch._C.DisableTorchFunction():
            return forward(*args)

    return run


def _replacement(module: nn.Module, first_order: bool) -> Callable[..., Any] | None:
    """The forward ``module`` runs with in the pass (None: its own, under the mode)."""
    if "forward" in module.__dict__ or any(
        type(t) not in (nn.Parameter, torch.Tensor)
        for t in (*module._parameters.values(), *module._buffers.values())
        if t is not None
    ):
        return None
    if first_order:
        fused = fused_forward(module)
        if fused is not None:
            return _without_torch_function(fused)
    if is_plain_layer(type(module)):
        return _without_torch_function(module.forward)
    return None


class _Sites:
    """Where the model holds modules to change (cached per model, checked on each use)."""

    def __init__(self, model: nn.Module, first_order: bool) -> None:
        # the parent held weakly: it may be the model, the key of the weak cache below; a
        # module registered in several places is changed (and restored) once
        self.sites = []
        seen: set[int] = set()
        for parent in model.modules():
            for name, child in parent._modules.items():
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    forward = _replacement(child, first_order)
                    if forward is not None:
                        self.sites.append((weakref.ref(parent), name, child, forward))

    def valid(self) -> bool:
        return all(
            (parent := ref()) is not None
            and parent._modules.get(name) is child
            and "forward" not in child.__dict__
            for ref, name, child, _ in self.sites
        )


_SITES: weakref.WeakKeyDictionary[nn.Module, dict[bool, _Sites]] = weakref.WeakKeyDictionary()


@contextmanager
def fast_modules(model: nn.Module, *, first_order: bool) -> Iterator[None]:
    """Run ``model``'s plain layers (and, first-order, fused activations) as described above.

    Args:
        model: The network; its modules are restored on exit.
        first_order: The pass is backpropagated through its output once and never through
            its tangents (GGN, Fisher, empirical Fisher), so fused activations may be used.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
        >>> with fast_modules(model, first_order=True):
        ...     "forward" in model[0].__dict__, "forward" in model[1].__dict__
        (True, False)
        >>> "forward" in model[0].__dict__
        False
    """
    by_kind = _SITES.get(model)
    if by_kind is None:
        by_kind = _SITES[model] = {}
    sites = by_kind.get(first_order)
    if sites is None or not sites.valid():
        sites = by_kind[first_order] = _Sites(model, first_order)
    patched = []
    try:
        for _, _, child, forward in sites.sites:
            child.__dict__["forward"] = forward
            patched.append(child)
        yield
    finally:
        for child in patched:
            del child.__dict__["forward"]
