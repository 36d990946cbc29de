"""Collect the ``m`` gradients that define the empirical Fisher used for pruning.

Each gradient is ``grad_w loss_func(model(X_c), y_c)`` over the prunable weights for one chunk
``(X_c, y_c)`` of the user's data: a whole mini-batch (``grad_batch_size=None``) or pieces of
``grad_batch_size`` samples (``1`` gives per-sample gradients). Pruned entries (masked weights)
get zero gradient, which makes the OBS algebra act on the remaining weights only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .masks import PrunableWeight


def collect_gradients(
    model: nn.Module,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    targets: list[PrunableWeight],
    num_grads: int,
    grad_batch_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Stack ``num_grads`` flat gradients of the prunable weights into ``G`` ``(m, d)``.

    The data is read once, in order; if it ends early the gradients collected so far are used
    (with a warning).

    Args:
        model: The network (its mode is left unchanged; use ``model.eval()`` for pruning).
        loss_func: ``loss_func(outputs, y) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        data: Iterable of ``(X, y)`` batches.
        targets: The prunable weights (define the column order of ``G``).
        num_grads: ``m``, the number of gradients wanted.
        grad_batch_size: Samples per gradient; ``None`` means one gradient per batch.
        dtype: Dtype of ``G`` (default: that of the weights).

    Raises:
        ValueError: If ``num_grads < 1``, the data yields nothing, a batch is not ``(X, y)``, is
            empty or fails in the model or loss (the message names the batch and the shapes), or
            a gradient is not finite.
    """
    if int(num_grads) < 1:
        raise ValueError(f"num_grads must be >= 1, got {num_grads}")
    if grad_batch_size is not None and int(grad_batch_size) < 1:
        raise ValueError(f"grad_batch_size must be >= 1 or None, got {grad_batch_size}")
    params = [t.param for t in targets]
    masks = [t.mask for t in targets]
    dtype = dtype or params[0].dtype
    rows: list[Tensor] = []
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"data must yield (X, y) pairs; batch {i} is {type(batch).__name__}")
        X, y = batch
        n = len(X)
        if n == 0:
            raise ValueError(f"batch {i} of data has 0 samples: leave empty batches out")
        step = n if grad_batch_size is None else int(grad_batch_size)
        for s in range(0, n, step):
            Xs, ys = X[s : s + step], y[s : s + step]
            try:
                loss = loss_func(model(Xs), ys)
            except (RuntimeError, IndexError, ValueError, TypeError) as err:
                raise ValueError(
                    f"batch {i} of data (X {_shape(Xs)}, y {_shape(ys)}, samples {s}:{s + len(Xs)})"
                    f" failed in the model or loss_func: {err}"
                ) from err
            if not bool(torch.isfinite(loss.detach()).all()):
                raise ValueError(
                    f"the loss of batch {i} (samples {s}:{s + len(Xs)}) is {float(loss)} (not "
                    "finite): does the calibration data have any valid target (e.g. a language-"
                    "model batch whose labels are all ignore_index)?"
                )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            parts = []
            for p, g, mk in zip(params, grads, masks):
                g = torch.zeros_like(p) if g is None else g
                parts.append((g if mk is None else g * mk).reshape(-1))
            row = torch.cat(parts).to(dtype)
            if not bool(torch.isfinite(row).all()):
                raise ValueError(
                    f"the gradient of batch {i} (samples {s}:{s + len(Xs)}) is not finite "
                    "(NaN or inf): check the calibration data and the loss"
                )
            rows.append(row)
            if len(rows) == num_grads:
                return torch.stack(rows)
    if not rows:
        raise ValueError("the data loader yielded no batches: cannot collect gradients")
    warnings.warn(
        f"the data gave only {len(rows)} of the {num_grads} gradients asked for; using those",
        stacklevel=2,
    )
    return torch.stack(rows)


def _shape(x: object) -> str:
    return f"of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
