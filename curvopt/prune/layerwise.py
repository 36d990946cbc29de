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

    Args:
        targets: The prunable weights (2-D), in flat order.
        inverses: One ``(in_l, in_l)`` float64 inverse per layer.
        damps: The absolute damping ``lambda_l`` used per layer.
    """

    def __init__(self, targets: list[PrunableWeight], inverses: list[Tensor], damps: list[float]):
        self.targets = targets
        self.inverses = inverses
        self.damps = damps
        self.dims = [input_dim(t.module) for t in targets]
        self.sizes = [t.param.numel() for t in targets]

    def _rows(self, flat: Tensor, i: int) -> Tensor:
        """The layer's entries of ``flat`` as ``(out, in)`` rows (a transposed view for Conv1D)."""
        x = flat.reshape(self.targets[i].param.shape)
        return x.T if self.dims[i] == 0 else x

    def inverse_diagonal(self) -> Tensor:
        """``diag(H_l^{-1})`` broadcast to every row, flat ``(d,)``."""
        parts = []
        for i, (t, inv) in enumerate(zip(self.targets, self.inverses)):
            diag = torch.diagonal(inv)
            shape = t.param.shape
            full = diag[:, None].expand(shape) if self.dims[i] == 0 else diag.expand(shape)
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
            W = self._rows(w[offset : offset + n].to(torch.float64), i)  # (out, in)
            R = self._rows(removed[offset : offset + n], i)
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
            out.append((delta.T if self.dims[i] == 0 else delta).reshape(-1))
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
    hs: list[Tensor | None] = [None] * len(targets)
    counts = [0] * len(targets)

    def hook(i):
        def fn(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            hs[i] = x.T @ x if hs[i] is None else hs[i] + x.T @ x
            counts[i] += x.shape[0]

        return fn

    handles = [t.module.register_forward_hook(hook(i)) for i, t in enumerate(targets)]
    seen = 0
    try:
        with torch.no_grad():
            for j, batch in enumerate(data):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError(
                        f"data must yield (X, y) pairs; batch {j} is {type(batch).__name__}"
                    )
                X, y = batch
                if len(X) == 0:
                    raise ValueError(f"batch {j} of data has 0 samples: leave empty batches out")
                out = model(X)
                if loss_func is not None:
                    loss = loss_func(out, y)
                    if not bool(torch.isfinite(loss).all()):
                        raise ValueError(
                            f"the loss of calibration batch {j} is {float(loss)} (not finite): "
                            "does the batch have any valid target (e.g. every label ignored)?"
                        )
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("the data loader yielded no batches: cannot build layer Hessians")
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
    return LayerwiseInverse(targets, inverses, damps)


__all__ = ["LayerwiseInverse", "check_layerwise_targets", "layer_hessians"]
