"""What the curvature operators need to know about a batch: inputs, outputs, sizes, checks.

A batch is a pair ``(X, y)``, or a transformers dict with ``labels`` (see `split_batch`). ``X`` is
what the model takes:

* a tensor, called as ``model(X)``;
* a tuple or list of tensors, called as ``model(*X)``;
* a mapping of names to tensors (a tokenizer's ``input_ids`` and ``attention_mask``), called as
  ``model(**X)`` (transformers' convention), or as ``model(X)`` when the model's ``forward``
  takes one positional argument and not the mapping's keys.

The model returns a tensor, or an object with a ``.logits`` tensor (transformers' outputs).
``.logits`` follow transformers' layout, classes on the last axis (``(N, S, V)`` for a language
model); for ``nn.CrossEntropyLoss`` they are moved to torch's layout ``(N, V, S)``, so the labels
are ``(N, S)`` either way. Tensor outputs are passed to the loss as they are.

The first axis of every tensor in ``X``, of the outputs and of ``y`` is the batch axis.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

BatchSizeFn = Callable[[Any], int]


class BatchError(ValueError):
    """A batch does not fit the model or the loss; the data loop prefixes the batch index."""


def describe(X: Any) -> str:
    """Shapes and dtypes of a batch input, for error messages (``(5, 3) float32``, ...)."""
    if isinstance(X, Tensor):
        return f"{tuple(X.shape)} {str(X.dtype).removeprefix('torch.')}"
    if isinstance(X, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in X.items()) + "}"
    if isinstance(X, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in X) + ")"
    return type(X).__name__


def check_input(X: Any, index: int) -> None:
    """Raise TypeError unless ``X`` is a tensor, a tuple/list or a mapping of tensors."""
    if isinstance(X, Tensor):
        return
    values = list(X.values()) if isinstance(X, Mapping) else X
    if isinstance(X, (Mapping, tuple, list)) and values:
        if all(isinstance(v, Tensor) for v in values):
            return
    raise TypeError(
        f"batch {index}: X must be a tensor, a tuple of tensors or a mapping of names to "
        f"tensors (e.g. a tokenizer's output), got {describe(X)}"
    )


def split_batch(batch: Any, index: int, loss_func: nn.Module) -> tuple[Any, Any]:
    """``(X, y)`` of one element of ``data``: a pair, or a transformers dict with ``labels``.

    A mapping with a ``labels`` entry follows Hugging Face's convention for causal language
    models: ``labels`` are aligned with ``input_ids`` (usually a copy of them, ``-100`` where
    ignored) and the model shifts them. Here the loss sees the logits of every position, so
    ``y[:, t] = labels[:, t + 1]`` and the last position is ignored (``loss_func.ignore_index``);
    ``X`` is the mapping without ``labels``.

    For a pair whose ``X`` holds ``input_ids`` and whose ``y`` equals them at every valid
    position, a ``UserWarning`` says that the labels look unshifted (the curvature would be that
    of predicting the current token, not the next).

    Raises:
        ValueError: For a batch that is neither, or a ``labels`` dict with a loss other than
            ``nn.CrossEntropyLoss`` or labels that are not integer ``(N, S)`` tensors.
    """
    if isinstance(batch, Mapping) and "labels" in batch:
        return _shifted_labels_batch(batch, index, loss_func)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        hint = ""
        if isinstance(batch, Mapping):
            hint = (
                f" with keys {sorted(batch)}; a dict batch needs the next-token labels under "
                "'labels' (transformers' convention: labels aligned with input_ids, shifted "
                "inside), or pass the pair (inputs_dict, next_token_labels)"
            )
        raise ValueError(
            f"batch {index} of data must be a pair (X, y), got {type(batch).__name__}{hint}"
        )
    X, y = batch
    if (
        isinstance(X, Mapping)
        and isinstance(y, Tensor)
        and isinstance(loss_func, nn.CrossEntropyLoss)
    ):
        _warn_if_unshifted(X.get("input_ids"), y, index, loss_func.ignore_index)
    return X, y


def _shifted_labels_batch(batch: Mapping, index: int, loss_func: nn.Module) -> tuple[Any, Any]:
    labels = batch["labels"]
    if not isinstance(loss_func, nn.CrossEntropyLoss):
        raise ValueError(
            f"batch {index}: a dict with 'labels' is transformers' causal-LM convention, which "
            f"needs nn.CrossEntropyLoss, got {type(loss_func).__name__}; pass the pair (X, y)"
        )
    if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.is_floating_point():
        raise ValueError(
            f"batch {index}: 'labels' must be an integer tensor (N, S) aligned with input_ids, "
            f"got {describe(labels)}"
        )
    ignore = loss_func.ignore_index
    y = labels.new_full(labels.shape, ignore)
    nxt = labels[:, 1:]
    y[:, :-1] = nxt.masked_fill(nxt == -100, ignore)  # -100: transformers' ignored label
    return {k: v for k, v in batch.items() if k != "labels"}, y


def _warn_if_unshifted(ids: Any, y: Tensor, index: int, ignore_index: int) -> None:
    """Warn when ``y`` equals ``input_ids`` wherever it is valid (labels not shifted)."""
    if not isinstance(ids, Tensor) or ids.shape != y.shape or y.is_floating_point():
        return
    valid = y != ignore_index
    if bool(valid.any()) and bool((y == ids.to(y.device))[valid].all()):
        warnings.warn(
            f"batch {index}: y equals input_ids at every valid position. The labels of a "
            "language model must be the next tokens, y[:, t] = input_ids[:, t + 1] (the last "
            "position ignored); unshifted labels give the curvature of predicting the current "
            "token. Shift them, or pass the dict with 'labels' = input_ids (transformers' "
            "convention, shifted here)",
            UserWarning,
            stacklevel=4,
        )


def move_to(X: Any, device: Any) -> Any:
    """Move a tensor, tuple/list or mapping of tensors to ``device`` (same container type)."""
    if isinstance(X, Tensor):
        return X.to(device)
    if isinstance(X, Mapping):
        return {k: v.to(device) for k, v in X.items()}
    return type(X)(v.to(device) for v in X)


def default_batch_size(X: Any) -> int:
    """The length of the first axis of ``X`` (of its first tensor for tuples and mappings).

    Raises:
        BatchError: If that tensor has no axes, or the tensors of ``X`` disagree.
    """
    tensors = list(X.values()) if isinstance(X, Mapping) else [X] if isinstance(X, Tensor) else X
    if any(t.ndim == 0 for t in tensors):
        raise BatchError(
            f"X {describe(X)} has a tensor without a batch axis; give every tensor a leading "
            "batch axis (X.unsqueeze(0) for a single sample)"
        )
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise BatchError(
            f"the tensors of X {describe(X)} disagree on the batch size (first axis); pass "
            "batch_size_fn to say how to count the samples of a batch"
        )
    return tensors[0].shape[0]


def model_inputs(model: nn.Module, X: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments ``model`` is called with for the input ``X``."""
    if isinstance(X, Tensor):
        return (X,), {}
    if isinstance(X, Mapping):
        return ((X,), {}) if _takes_mapping_positionally(model, X) else ((), dict(X))
    _check_tuple_binding(model, X)
    return tuple(X), {}


def _check_tuple_binding(model: nn.Module, X: Any) -> None:
    """Refuse a tuple ``(input_ids, attention_mask)`` that ``model(*X)`` would misbind.

    transformers' models take ``input_ids`` first but not always the mask second (GPT-2's second
    parameter is ``past_key_values``), so a tuple passes the mask as something else.

    Raises:
        BatchError: If ``forward`` takes ``input_ids`` and ``attention_mask`` and the tensors of
            ``X`` after the first would not bind to ``attention_mask`` and the parameters after
            it in order.
    """
    if len(X) < 2:
        return
    params = _forward_parameters(model)
    if params is None:
        return
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if "input_ids" not in positional or "attention_mask" not in positional:
        return
    bound = positional[: len(X)]
    if bound[:2] != ["input_ids", "attention_mask"]:
        raise BatchError(
            f"X is a tuple {describe(X)}, so the model is called as model(*X), which binds its "
            f"tensors to {', '.join(bound)} of {type(model).__name__}.forward (the attention "
            "mask would be taken as another argument); pass X as a dict, e.g. "
            "{'input_ids': ids, 'attention_mask': mask} (a tokenizer's output), which is "
            "passed as model(**X)"
        )


# forward function -> its parameters as called (None: no signature); inspect.signature costs
# about as much as 2 % of a curvature product on a small transformers model, once per batch
_SIGNATURES: weakref.WeakKeyDictionary[Any, tuple[inspect.Parameter, ...] | None]
_SIGNATURES = weakref.WeakKeyDictionary()


def _forward_parameters(model: nn.Module) -> tuple[inspect.Parameter, ...] | None:
    """The parameters of ``model.forward`` as called (no ``self``), cached per method."""
    forward = model.forward
    func = getattr(forward, "__func__", None)  # a method: same signature for every instance
    if func is not None and func in _SIGNATURES:
        return _SIGNATURES[func]
    try:
        params = tuple(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = None
    if func is not None:
        try:
            _SIGNATURES[func] = params
        except TypeError:  # not weakly referenceable: no cache
            pass
    return params


def _takes_mapping_positionally(model: nn.Module, X: Mapping) -> bool:
    """Whether ``model.forward`` takes one positional argument and not the keys of ``X``."""
    params = _forward_parameters(model)
    if params is None:  # no introspectable signature: transformers' convention
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return False
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    if set(X) <= names:
        return False
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 1 and all(p.default is not p.empty for p in positional[1:])


def output_tensor(output: Any, loss_func: nn.Module) -> Tensor:
    """The tensor the loss takes from a model output (see the module docstring).

    Raises:
        BatchError: If ``output`` is neither a tensor nor has a ``.logits`` tensor.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise BatchError(
            "model_func must return a tensor or an object with a .logits tensor, got "
            f"{type(output).__name__}"
        )
    if isinstance(loss_func, nn.CrossEntropyLoss) and logits.ndim > 2:
        return logits.movedim(-1, 1)  # (N, S, V) -> torch's (N, V, S)
    return logits


def check_batch_axes(output: Tensor, X: Any, y: Tensor, batch_size: int) -> None:
    """Check that the output and the targets have the batch size counted from ``X``.

    Raises:
        BatchError: If the first axis of the output or of ``y`` is not ``batch_size`` (a sample
            without its batch axis, or a model that mixes samples into one output).
    """
    if output.ndim == 0 or output.shape[0] != batch_size:
        raise BatchError(
            f"the model output has shape {tuple(output.shape)}, but X {describe(X)} holds "
            f"{batch_size} samples; the output's first axis must be the batch axis (a single "
            "sample needs X.unsqueeze(0))"
        )
    if y.ndim == 0 or y.shape[0] != batch_size:
        raise BatchError(
            f"y has shape {tuple(y.shape)}, but X {describe(X)} holds {batch_size} samples; "
            "y's first axis must be the batch axis"
        )
