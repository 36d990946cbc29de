"""BASELINE, not part of curvopt: SparseGPT and Wanda, written from the papers for the LM study.

Straightforward re-implementations of the papers' algorithms (our words, our code), checked in
``tests/prune/test_lm_baselines.py`` against slow dense references of the same algorithms.
llmcompressor's own implementations run beside them in the study through
``llmcompressor_run.py`` (its own venv); on one layer with the same inputs they agree with these
(``llmcompressor_run.py --check``: Wanda identical, SparseGPT 2:4 to float32 round-off, SparseGPT
unstructured on 99.95 % of the mask, since llmcompressor's threshold prunes one extra weight per
block).

Both prune one 2-D layer at a time from its calibration inputs ``X`` (``N x in``, all tokens);
weights are handled as ``(out, in)`` rows (transformers' ``Conv1D`` is transposed first).

* **Wanda** (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models", 2023): score ``S_ij = |W_ij| * ||X_j||_2``; the lowest scores of each output row
  (unstructured) or of each group of ``m`` inputs (N:M) are zeroed. No weight update.
* **SparseGPT** (Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", 2023): ``H = 2 X^T X / N + lambda I`` with ``lambda = 0.01 mean(diag H)``;
  ``U`` = upper Cholesky factor of ``H^{-1}``; columns are processed left to right in blocks of
  ``B = 128``: at the start of a block the mask of the block is chosen (unstructured: the lowest
  ``w^2 / U_jj^2`` over the whole block at the target sparsity; N:M: every ``m`` columns, the
  ``m - n`` lowest of each group), then each column ``j`` is quantized to ``q_j = w_j * keep_j``
  and the error ``(w_j - q_j) / U_jj`` is spread over the later columns of the block with row
  ``U_j`` (lazy batched updates to the later blocks). This is the OBS update with the
  inverse Hessian of the not-yet-processed columns, computed once by the Cholesky factor.

:func:`prune_sequentially` applies either to every prunable layer of a model in module order,
each with the inputs of the model pruned so far (SparseGPT's and Wanda's sequential scheme, here
per layer rather than per transformer block), and attaches curvopt masks so fine-tuning keeps
the sparsity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _rows(module: nn.Module, weight: Tensor) -> tuple[Tensor, bool]:
    """The weight as ``(out, in)`` rows, and whether it was transposed (``Conv1D``)."""
    conv1d = any(c.__name__ == "Conv1D" for c in type(module).__mro__)
    return (weight.T if conv1d else weight), conv1d


def wanda_prune(W: Tensor, X: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Wanda on rows ``W`` (``out x in``) with inputs ``X`` (``N x in``); returns the new ``W``."""
    score = W.abs() * X.double().norm(dim=0).to(W.dtype)[None, :]
    mask = torch.zeros_like(W, dtype=torch.bool)  # True: pruned
    if nm is not None:
        n, m = nm
        s = score.reshape(W.shape[0], -1, m)
        low = torch.argsort(s, dim=2, stable=True)[:, :, : m - n]
        mask = mask.reshape(W.shape[0], -1, m).scatter(2, low, True).reshape(W.shape)
    else:
        k = int(W.shape[1] * sparsity)
        low = torch.argsort(score, dim=1, stable=True)[:, :k]
        mask.scatter_(1, low, True)
    return W.masked_fill(mask, 0.0)


def sparsegpt_prune(
    W: Tensor,
    X: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tensor:
    """SparseGPT on rows ``W`` (``out x in``) with inputs ``X`` (``N x in``); returns the new ``W``.

    Computed in float64 (the small layers of the study afford it); the result has ``W``'s dtype.

    Raises:
        ValueError: With ``nm``, a ``blocksize`` that ``m`` does not divide (groups would
            straddle blocks, as in the original code).
    """
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={nm[1]}")
    W = W.detach().clone().to(torch.float64)
    X = X.to(torch.float64)
    cols = W.shape[1]
    H = 2 * X.T @ X / X.shape[0]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            tmp = W1**2 / torch.diagonal(U1)[None, :] ** 2
            k = int(tmp.numel() * sparsity)
            if k > 0:
                thresh = torch.sort(tmp.flatten()).values[k - 1]
                pruned = tmp <= thresh
        for i in range(i2 - i1):
            w = W1[:, i]
            d = U1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = W1[:, i : i + m] ** 2 / torch.diagonal(U1)[i : i + m][None, :] ** 2
                low = torch.argsort(tmp, dim=1, stable=True)[:, : m - n]
                pruned.scatter_(1, i + low, True)
            q = w.clone()
            q[pruned[:, i]] = 0
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


def layer_inputs(model: nn.Module, module: nn.Module, data) -> Tensor:
    """All calibration inputs of ``module`` (``N x in``), from ``model`` run on ``data``'s ``X``."""
    xs: list[Tensor] = []

    def hook(mod, inputs, output):
        x = inputs[0].detach()
        xs.append(x.reshape(-1, x.shape[-1]))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for X, _ in data:
                model(X)
    finally:
        handle.remove()
    return torch.cat(xs)


def prune_sequentially(
    model: nn.Module,
    targets,
    data,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None = None,
) -> None:
    """Prune every target layer in order with ``"wanda"`` or ``"sparsegpt"`` (module docs).

    Args:
        model: The network (changed in place; curvopt masks are attached).
        targets: ``curvopt.prune.prunable_weights(model, ...)``.
        data: ``(X, y)`` calibration batches (only ``X`` is used).
        method: ``"wanda"`` or ``"sparsegpt"``.
        sparsity: Per-row (wanda) / per-block (sparsegpt) fraction of zeros.
        nm: ``(n, m)`` for an N:M pattern, or ``None``.
    """
    from curvopt.prune import set_mask

    fn = {"wanda": wanda_prune, "sparsegpt": sparsegpt_prune}[method]
    for t in targets:
        X = layer_inputs(model, t.module, data)
        with torch.no_grad():
            current = getattr(t.module, t.attr).detach()
            rows, transposed = _rows(t.module, current)
            new = fn(rows, X, sparsity, nm).to(current.dtype)
            new = new.T if transposed else new
            t.param.copy_(new)
            set_mask(t, (new != 0).to(current.dtype))


__all__ = ["layer_inputs", "prune_sequentially", "sparsegpt_prune", "wanda_prune"]
