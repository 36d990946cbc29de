"""Calling the model on a batch, as a module or as a function of some of its parameters."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

from .batches import BatchError, describe, model_inputs, output_tensor
from .dual_arithmetic import DualArithmeticMode, make_dual, unpack_dual
from .dual_modules import fast_modules


def call_model(
    model: nn.Module, X: Any, loss_func: nn.Module, params: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Run ``model`` on the batch input ``X`` and return the tensor the loss takes.

    Args:
        model: The network.
        X: A tensor, tuple or mapping of tensors (see `curvopt.curvature.batches`).
        loss_func: The loss (decides the layout of ``.logits`` outputs).
        params: Parameters to use instead of the model's own (``torch.func.functional_call``);
            the others keep their values.

    Raises:
        BatchError: If the model fails on ``X`` (wrong shapes, dtypes, ...), naming the shapes.
        NotImplementedError: Passed through unchanged (a missing derivative formula, which the
            operators answer with another autograd path).
    """
    args, kwargs = model_inputs(model, X)
    try:
        if params is None:
            output = model(*args, **kwargs)
        else:
            output = functional_call(model, dict(params), args, kwargs)
    except NotImplementedError:
        raise
    except BatchError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise BatchError(f"model_func failed on X {describe(X)}: {err}") from err
    return output_tensor(output, loss_func)


class _Slots:
    """Where each named parameter of a model sits, tied copies included (cached per model)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        # modules held weakly: one of them may be the model, the key of the weak cache below
        by_object: dict[int, list[tuple[weakref.ref[nn.Module], str]]] = {}
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    by_object.setdefault(id(p), []).append((weakref.ref(module), attr))
        self.names = tuple(names)
        self.slots = []
        for name in names:
            p = model.get_parameter(name)
            self.slots.append((p, by_object[id(p)]))

    def valid(self, names: Sequence[str]) -> bool:
        """Whether the model still holds the same parameter objects in the same places."""
        return tuple(names) == self.names and all(
            (module := ref()) is not None and module._parameters.get(attr) is p
            for p, places in self.slots
            for ref, attr in places
        )


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slots] = weakref.WeakKeyDictionary()


@contextmanager
def substituted(model: nn.Module, params: Mapping[str, Tensor]) -> Iterator[None]:
    r"""Run ``model`` with the named parameters replaced by ``params`` (restored on exit).

    What ``torch.func.functional_call`` does for this case (tied parameters follow their
    original), without its per-call traversal of the module tree, which costs about as much as
    15 % of the tiny GPT-2's forward pass; the parameters' places are found once per model and
    checked by identity on each call.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> with substituted(lin, {"bias": torch.zeros(1)}):
        ...     lin.bias.tolist()
        [0.0]
    """
    slots = _SLOTS.get(model)
    if slots is None or not slots.valid(params.keys()):
        slots = _SLOTS[model] = _Slots(model, list(params.keys()))
    done = []
    try:
        for (p, places), new in zip(slots.slots, params.values()):
            for ref, attr in places:
                module = ref()  # alive: valid() just checked
                module._parameters[attr] = new
                done.append((module, attr, p))
        yield
    finally:
        for module, attr, p in done:
            module._parameters[attr] = p


def dual_forward(
    model: nn.Module,
    X: Any,
    loss_func: nn.Module,
    params: Mapping[str, Tensor],
    tangents: Sequence[Tensor],
    *,
    first_order: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One forward pass carrying tangents: the output ``f`` and ``J v`` (None: no dependence).

    Autograd records the primal computation as usual (call it under ``torch.enable_grad()``
    to backpropagate through ``f`` or, for a Hessian, through ``J v``); the caller must run
    its backward pass after this returns, outside the dual level, so that the backward pass
    carries no tangents. Arithmetic with constants avoids torch's slow zero-tangent path
    (`curvopt.curvature.dual_arithmetic`), and plain layers run without that rewriting's
    per-call cost (`curvopt.curvature.dual_modules`).

    Args:
        model: The network.
        X: The batch input.
        loss_func: The loss (decides the layout of ``.logits`` outputs).
        params: The parameters to carry tangents, by name.
        tangents: One tangent per entry of ``params``, shaped like it.
        first_order: The caller backpropagates through ``f`` once and never through ``J v``
            (GGN, Fisher, empirical Fisher): known activation modules then run as fused
            functions (`curvopt.curvature.activation_rules`) whose tangents are not
            differentiable again.
    """
    with fwAD.dual_level() as level:
        duals = {
            name: make_dual(p, t.contiguous(), level)
            for (name, p), t in zip(params.items(), tangents)
        }
        modes = fast_modules(model, first_order=first_order)
        with DualArithmeticMode(level), substituted(model, duals), modes:
            output = call_model(model, X, loss_func)
        return unpack_dual(output, level)


def evaluate_loss(loss_func: Callable[[Tensor, Tensor], Tensor], output: Tensor, y: Tensor):
    """``loss_func(output, y)``, with torch's errors turned into a `BatchError` naming shapes."""
    try:
        return loss_func(output, y)
    except NotImplementedError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise BatchError(
            f"loss_func failed on the output {tuple(output.shape)} and y {tuple(y.shape)} "
            f"{str(y.dtype).removeprefix('torch.')}: {err}"
        ) from err


def make_forward(
    model: nn.Module, names: Sequence[str], X: Any, loss_func: nn.Module
) -> Callable[..., Tensor]:
    """Return ``f(*params) -> output`` with the named parameters replaced by ``params``.

    Parameters not in ``names`` (frozen ones) keep their values from ``model``.
    """
    names = tuple(names)

    def forward(*params: Tensor) -> Tensor:
        return call_model(model, X, loss_func, dict(zip(names, params)))

    return forward


def attention_hint(model: nn.Module) -> str:
    """A sentence naming a transformers attention module without the eager implementation."""
    for name, module in model.named_modules():
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if impl not in (None, "eager") and "Attention" in type(module).__name__:
            return (
                f" The attention module {name!r} ({type(module).__name__}) uses "
                f"attn_implementation={impl!r}, whose kernel has neither; build or load the "
                'model with attn_implementation="eager" (e.g. GPT2LMHeadModel(config) with '
                'GPT2Config(..., attn_implementation="eager"), or '
                'from_pretrained(..., attn_implementation="eager"))'
            )
    return (
        " Replace that operation with one torch can differentiate twice (for attention: "
        "the eager implementation instead of a fused kernel)"
    )


def no_autograd_path(model: nn.Module, owner: str, err: BaseException) -> RuntimeError:
    """The error for a model that has neither forward-mode AD nor a double backward."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RuntimeError(
        f"{owner} needs forward-mode AD or a second backward pass through model_func, and an "
        f"operation in it supports neither ({type(err).__name__}: {first})." + attention_hint(model)
    )
