"""Layer-wise OBS: the curvature of each layer's reconstruction error, ``H = 2 X X^T``.

For a layer with weight rows ``w_r`` (``in`` inputs each) and calibration inputs ``X``
(``in x N``, every position of every sample), the reconstruction objective

.. math::

    E(\\hat W) = \\sum_r \\lVert \\hat w_r^\\top X - w_r^\\top X \\rVert^2
    = \\sum_r (\\hat w_r - w_r)^\\top H (\\hat w_r - w_r), \\qquad H = 2 X X^\\top / N,

is exactly quadratic with the same ``in x in`` Hessian for every row (the objective that
SparseGPT solves approximately). OBS is then exact per row: removing the set ``Q_r`` of row
``r`` costs ``w_{Q_r}^T (H^{-1}[Q_r, Q_r])^{-1} w_{Q_r} / 2`` and is optimally compensated by

.. math::

    \\delta w_r = -H^{-1}[:, Q_r] \\, (H^{-1}[Q_r, Q_r])^{-1} \\, w_{Q_r}.

:class:`LayerwiseInverse` holds ``(H + lambda I)^{-1}`` per layer (``lambda`` relative to
``mean(diag H)``, as SparseGPT's ``percdamp``) and offers the flat ``inverse_diagonal()`` the
scores need and :meth:`LayerwiseInverse.update_multi`, the exact per-row update, solved for all
rows of a layer at once (padded batch, float64). Layers with a 2-D weight only (``nn.Linear`` and
transformers' ``Conv1D``; :func:`curvopt.prune.patterns.input_dim` says which dimension is the
input).

Example:
    >>> lin = nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.zeros(8))]
    >>> from curvopt.prune.masks import prunable_weights
    >>> inv = layer_hessians(lin, prunable_weights(lin), data, None, damp=0.01)
    >>> inv.inverse_diagonal().shape
    torch.Size([12])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .masks import PrunableWeight
from .patterns import input_dim


def check_layerwise_targets(targets: list[PrunableWeight]) -> None:
    """Layer-wise OBS needs 2-D weights whose module gets the inputs as ``(..., in)``."""
    for t in targets:
        if t.param.dim() != 2:
            raise ValueError(
                f"method='layerwise' supports layers with a 2-D weight (Linear, transformers' "
                f"Conv1D); {t.qualified_name} has shape {tuple(t.param.shape)}: leave it out with "
                "names= or use method='mfac'"
            )


class LayerwiseInverse:
    """Per-layer ``(H_l + lambda_l I)^{-1}`` over the flat vector of prunable weights.

    On FSDP2-sharded weights (:mod:`curvopt.prune.sharded`) each rank holds rows
    ``first_rows[l] : first_rows[l] + shapes[l][0]`` of dimension 0 of every weight and the whole
    (all-reduced) ``H_l``. For Linear weights dimension 0 is the output, so every weight row's
    problem is local. For a ``Conv1D`` (weight ``(in, out)``) it is the input: a row's removed
    set spans the ranks, so :meth:`update_multi` all-gathers that layer (``gather``) and keeps
    its own rows of the update.

    Args:
        targets: The prunable weights (2-D), in flat order.
        inverses: One ``(in_l, in_l)`` float64 inverse per layer.
        damps: The absolute damping ``lambda_l`` used per layer.
        shapes: The shapes of the held part of each weight (default: the whole weights).
        first_rows: Index of the first held row of dimension 0 of each weight (default 0).
        gather: ``gather(l, x)``: the whole ``l``-th weight's tensor from every rank's
            ``shapes[l]``-shaped piece ``x`` (needed only for a sharded ``Conv1D``).
    """

    def __init__(
        self,
        targets: list[PrunableWeight],
        inverses: list[Tensor],
        damps: list[float],
        shapes: list[tuple[int, ...]] | None = None,
        first_rows: list[int] | None = None,
        gather: Callable[[int, Tensor], Tensor] | None = None,
    ):
        self.targets = targets
        self.inverses = inverses
        self.damps = damps
        self.dims = [input_dim(t.module) for t in targets]
        self.shapes = shapes or [tuple(t.param.shape) for t in targets]
        self.first_rows = first_rows or [0] * len(targets)
        self.gather = gather
        self.sizes = [math.prod(s) for s in self.shapes]

    def _rows(self, flat: Tensor, i: int, shape: tuple[int, ...] | None = None) -> Tensor:
        """The layer's entries of ``flat`` as ``(out, in)`` rows (a transposed view for Conv1D)."""
        x = flat.reshape(shape or self.shapes[i])
        return x.T if self.dims[i] == 0 else x

    def _split(self, i: int) -> bool:
        """Whether layer ``i``'s input dimension is split over ranks (a sharded Conv1D)."""
        return self.dims[i] == 0 and tuple(self.shapes[i]) != tuple(self.targets[i].param.shape)

    def inverse_diagonal(self) -> Tensor:
        """``diag(H_l^{-1})`` broadcast to every held row, flat ``(d,)`` (``d_r`` when sharded)."""
        parts = []
        for i, inv in enumerate(self.inverses):
            diag = torch.diagonal(inv)
            shape = self.shapes[i]
            if self.dims[i] == 0:  # rows of the weight are inputs: this rank's inputs
                r0 = self.first_rows[i]
                full = diag[r0 : r0 + shape[0], None].expand(shape)
            else:
                full = diag.expand(shape)
            parts.append(full.reshape(-1))
        return torch.cat(parts)

    def update_multi(self, w: Tensor, idx: Tensor) -> Tensor:
        """Exact per-row OBS update for removing the flat entries ``idx`` (module docs).

        Returns:
            ``delta w``, flat ``(d,)``, ``w``'s dtype; ``(w + delta w)[idx]`` is zero up to
            round-off.
        """
        removed = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        removed[idx] = True
        out = []
        offset = 0
        for i, (n, inv) in enumerate(zip(self.sizes, self.inverses)):
            W = w[offset : offset + n].to(torch.float64)
            R = removed[offset : offset + n]
            split = self._split(i)
            if split:  # a sharded Conv1D: each row's problem spans the ranks' inputs
                shape = tuple(self.targets[i].param.shape)
                both = self.gather(i, torch.stack([W, R.to(torch.float64)]).reshape(2, -1))
                W, R = both[0].reshape(shape), both[1].reshape(shape) != 0
                W, R = W.T, R.T
            else:
                W, R = self._rows(W, i), self._rows(R, i)  # (out, in)
            delta = torch.zeros_like(W)
            counts = R.sum(1)
            rows = (counts > 0).nonzero().squeeze(1)
            if rows.numel():
                k = int(counts.max())
                inv = inv.to(W.device)
                # padded indices: each row's removed inputs first (stable), then filler
                order = torch.argsort((~R[rows]).to(torch.int8), dim=1, stable=True)[:, :k]
                valid = torch.arange(k, device=W.device)[None, :] < counts[rows, None]
                S = inv[order[:, :, None], order[:, None, :]]  # (r, k, k)
                eye = torch.eye(k, dtype=S.dtype, device=S.device)
                pair = valid[:, :, None] & valid[:, None, :]
                S = torch.where(pair, S, eye.expand_as(S))
                rhs = torch.where(valid, W[rows].gather(1, order), 0.0)
                coef = torch.linalg.solve(S, rhs)  # (r, k), zero on the filler
                cols = inv[order]  # (r, k, in): rows of H^{-1} (symmetric: its columns)
                delta[rows] = -(coef[:, :, None] * cols).sum(1)
            delta = delta.T if self.dims[i] == 0 else delta
            if split:  # this rank's input rows of the whole update
                delta = delta[self.first_rows[i] : self.first_rows[i] + self.shapes[i][0]]
            out.append(delta.reshape(-1))
            offset += n
        return torch.cat(out).to(w.dtype)


def layer_hessians(
    model: nn.Module,
    targets: list[PrunableWeight],
    data: Iterable,
    loss_func: Callable[[Tensor, Tensor], Tensor] | None,
    damp: float,
    relative: bool = True,
) -> LayerwiseInverse:
    """Run ``data`` through ``model`` and build each layer's damped inverse ``(H + lambda I)^{-1}``.

    ``H = 2 X X^T / N`` from the inputs of every prunable layer (all positions of all batches),
    ``lambda = damp * mean(diag H)`` (``damp`` itself where that mean is zero). When
    ``loss_func`` is given it is evaluated on every batch as a check that the calibration data is
    usable (e.g. a language-model batch with no valid target).

    Args:
        model: The network (unchanged; runs under ``torch.no_grad``).
        targets: Its prunable weights (2-D).
        data: Iterable of ``(X, y)`` batches.
        loss_func: Optional ``loss_func(model(X), y)``; a non-finite value is an error.
        damp: Damping ``> 0``.
        relative: ``lambda = damp * mean(diag H)`` if True, else ``lambda = damp``.

    Raises:
        ValueError: No batches, a batch that is not an ``(X, y)`` pair, an empty batch, or a
            non-finite loss or input.
    """
    hs, counts = input_moments(model, targets, data, loss_func)
    inverses, damps = damped_inverses(targets, hs, counts, damp, relative)
    return LayerwiseInverse(targets, inverses, damps)


def input_moments(
    model: nn.Module,
    targets: list[PrunableWeight],
    data: Iterable,
    loss_func: Callable[[Tensor, Tensor], Tensor] | None,
    group: object = None,
) -> tuple[list[Tensor | None], list[int]]:
    """``sum X^T X`` (float64, ``(in, in)``) and the row count ``N`` of every layer's inputs.

    With a process ``group`` (FSDP2: every rank runs its own ``data`` through the sharded model)
    every rank stops when any rank runs out of batches (the forward passes are collective), a
    bad batch or loss on any rank raises on every rank, and the sums and counts are all-reduced:
    the result is that of one process on the concatenation of the ranks' batches.

    Raises:
        ValueError: As :func:`layer_hessians`.
    """
    from curvopt.distributed import all_reduce_any, all_reduce_sum_

    hs: list[Tensor | None] = [None] * len(targets)
    counts = [0] * len(targets)

    def hook(i):
        def fn(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            hs[i] = x.T @ x if hs[i] is None else hs[i] + x.T @ x
            counts[i] += x.shape[0]

        return fn

    def agree(problem: str | None, device) -> None:  # raise on every rank, or on none
        flag = torch.tensor(problem is not None, device=device)
        if bool(all_reduce_any(flag, group)):
            raise ValueError(problem or "a calibration batch failed on another rank (see there)")

    device = targets[0].param.device
    handles = [t.module.register_forward_hook(hook(i)) for i, t in enumerate(targets)]
    seen = 0
    batches = iter(data)
    try:
        with torch.no_grad():
            for j in itertools.count():
                batch = next(batches, None)
                if bool(all_reduce_any(torch.tensor(batch is None, device=device), group)):
                    break  # some rank has no data left: every rank stops here
                problem = None
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    problem = f"data must yield (X, y) pairs; batch {j} is {type(batch).__name__}"
                elif len(batch[0]) == 0:
                    problem = f"batch {j} of data has 0 samples: leave empty batches out"
                agree(problem, device)
                X, y = batch
                out = model(X)
                if loss_func is not None:
                    loss = loss_func(out, y)
                    problem = None
                    if not bool(torch.isfinite(loss).all()):
                        problem = (
                            f"the loss of calibration batch {j} is {float(loss)} (not finite): "
                            "does the batch have any valid target (e.g. every label ignored)?"
                        )
                    agree(problem, device)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("the data loader yielded no batches: cannot build layer Hessians")
    if group is not None:
        for i, h in enumerate(hs):
            hs[i] = None if h is None else all_reduce_sum_(h, group)
        counts = [int(c) for c in all_reduce_sum_(torch.tensor(counts, device=device), group)]
    return hs, counts


def damped_inverses(
    targets: list[PrunableWeight],
    hs: list[Tensor | None],
    counts: list[int],
    damp: float,
    relative: bool,
) -> tuple[list[Tensor], list[float]]:
    """``(2 h / N + lambda I)^{-1}`` per layer (Cholesky) and the ``lambda`` used (module docs).

    Raises:
        ValueError: A layer never called, or non-finite inputs.
    """
    inverses, damps = [], []
    for t, h, c in zip(targets, hs, counts):
        if h is None:
            raise ValueError(f"{t.qualified_name} was never called on the calibration data")
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"the calibration inputs of {t.qualified_name} are not finite")
        H = 2 * h / c
        mean = float(torch.diagonal(H).mean())
        lam = damp * mean if relative and mean > 0 else float(damp)
        H.diagonal().add_(lam)
        inverses.append(torch.cholesky_inverse(torch.linalg.cholesky(H)))
        damps.append(lam)
    return inverses, damps


__all__ = [
    "LayerwiseInverse",
    "check_layerwise_targets",
    "damped_inverses",
    "input_moments",
    "layer_hessians",
]
