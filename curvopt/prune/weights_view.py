"""The prunable weights as one flat vector: the view the one pruning loop of :func:`prune` runs on.

:func:`curvopt.prune.prune` is one loop; what differs between a model on one process and an
FSDP2-sharded one is only *where* the flat vector ``w`` of the prunable weights (``d`` entries,
module order, then row-major) lives. A :class:`WeightsView` answers every question the loop asks
about it, on the entries this process holds (all ``d`` locally; ``d_r`` on rank ``r``):

* ``prepare()`` / ``current_sparsity()``: all-ones masks where none is attached (local only),
  and the sparsity each layer starts from;
* ``weights()``: effective weights ``w * mask``, flat;
* ``alive()``: the entries not pruned yet, flat boolean;
* ``count(flags)``: number of True entries over the whole vector;
* ``gradients(...)``: ``G`` (``m x d`` locally, the local columns ``m x d_r`` when sharded);
* ``relative_damping(G)``: ``mean(diag(G^T G / m))`` over all ``d`` coordinates;
* ``inverse(G, lam, ...)``: the inverse-Fisher provider for ``F = lam I + G^T G / m`` (M-FAC
  blocks or dense OBS; sharded M-FAC);
* ``groups(n, m)``: the flat indices of the held entries' N:M groups (a layer the pattern cannot
  tile is an error, raised before anything changes);
* ``layer_inverse(...)``: the per-layer inverse Hessians of layer-wise OBS (local only);
* ``select(...)``: which entries are pruned after this step (global or per-layer threshold);
* ``most_per_block(...)``: the largest number of removals in one M-FAC block (``update="auto"``);
* ``update_multi(...)``: the exact multi-weight OBS update;
* ``write(w, alive)``: store new weights and masks; ``layer_reports()``: the final sparsities;
* ``snapshot()``: an undo record; its ``restore()`` puts the model back exactly.

Two implementations: :class:`LocalWeights` (every weight on this process) and
:class:`~curvopt.prune.sharded.ShardedWeights` (FSDP2 ``Shard(0)`` DTensors, every rank its
local rows; collectives instead of gathers). :func:`weights_view` picks one.

Example:
    >>> from curvopt.prune.masks import prunable_weights
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> view = weights_view(model, prunable_weights(model), "magnitude", None)
    >>> type(view).__name__, view.dim, view.sizes
    ('LocalWeights', 8, [6, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .dense import DenseFisherInverse
from .gradients import collect_gradients
from .layerwise import LayerwiseInverse, layer_hessians
from .masks import PrunableWeight, set_mask
from .obs import obs_update_multi
from .patterns import flat_groups
from .report import LayerReport, layer_reports
from .schedule import one_shot_step
from .sharded import ShardedWeights, check_sharded_arguments, is_sharded
from .snapshot import ModelSnapshot


class WeightsView(Protocol):
    """What the pruning loop needs from the flat vector of prunable weights (module docs).

    Attributes:
        dim: ``d``, the number of prunable weights over all processes.
        sizes: Number of entries of each prunable weight (global shapes).
    """

    dim: int
    sizes: list[int]

    def prepare(self) -> None:
        """Attach all-ones masks where none is attached yet (before the first step)."""

    def current_sparsity(self) -> list[float]:
        """Fraction of each layer that counts as pruned before the first step."""

    def weights(self) -> Tensor:
        """Effective weights (mask applied), flat."""

    def alive(self) -> Tensor:
        """Entries not pruned yet, flat boolean."""

    def count(self, flags: Tensor) -> int:
        """Number of True entries of ``flags`` over all processes."""

    def gradients(
        self,
        model: nn.Module,
        loss_func: Callable[[Tensor, Tensor], Tensor],
        data: Iterable,
        num_grads: int,
        grad_batch_size: int | None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``num_grads`` flat gradients of the held entries, ``(m, d)`` or ``(m, d_r)``."""

    def relative_damping(self, G: Tensor) -> float:
        """``mean(diag(G^T G / m))`` over all ``d`` coordinates."""

    def inverse(self, G: Tensor, lam: float, method: str, block_size: int | None) -> Any:
        """The inverse-Fisher provider for ``F = lam I + G^T G / m``."""

    def groups(self, n: int, m: int) -> Tensor:
        """Flat indices ``(G, m)`` of the N:M groups of the held entries (module docs)."""

    def layer_inverse(
        self,
        model: nn.Module,
        loss_func: Callable[[Tensor, Tensor], Tensor] | None,
        data: Iterable,
        damp: float,
        relative: bool,
    ) -> LayerwiseInverse:
        """Per-layer ``(2 X X^T / N + lambda I)^{-1}`` from the calibration inputs."""

    def select(
        self,
        scores: Tensor,
        alive: Tensor,
        layer_targets: list[float],
        scope: str,
        normalize: bool,
        frac: float,
        start: list[float],
    ) -> Tensor:
        """Flat mask of the entries pruned after this step (old ones included)."""

    def most_per_block(self, idx: Tensor, block_size: int | None, total: int) -> int:
        """Largest number of removed entries in one M-FAC block, over all processes.

        Args:
            idx: Flat indices of this process's removed entries (non-empty over all processes).
            block_size: M-FAC block size (``None``: one block).
            total: Removed entries over all processes (``count`` of them, already known).
        """

    def update_multi(self, inverse: Any, w: Tensor, idx: Tensor, block_size: int | None) -> Tensor:
        """Exact multi-weight OBS update ``delta w`` for removing the entries ``idx``."""

    def write(self, w: Tensor, alive: Tensor) -> None:
        """Store new flat weights ``w`` and masks ``alive``."""

    def layer_reports(self) -> list[LayerReport]:
        """Per-layer sparsity (global shapes)."""

    def snapshot(self) -> ModelSnapshot:
        """An undo record of everything pruning may change."""


class LocalWeights:
    """Every prunable weight on this process: the flat vector is the concatenation of all of them.

    Args:
        model: The network (for the snapshot: its buffers and ``requires_grad`` flags).
        targets: Its prunable weights (:func:`~curvopt.prune.prunable_weights`).

    Example:
        >>> from curvopt.prune.masks import prunable_weights
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> view = LocalWeights(model, prunable_weights(model))
        >>> view.prepare()
        >>> view.alive().tolist()
        [True, True, True, True]
    """

    def __init__(self, model: nn.Module, targets: list[PrunableWeight]) -> None:
        self.model = model
        self.targets = targets
        self.sizes = [t.param.numel() for t in targets]
        self.dim = sum(self.sizes)

    def prepare(self) -> None:  # noqa: D102
        with torch.no_grad():
            for t in self.targets:  # start from the effective values (mask already applied)
                if t.mask is None:
                    set_mask(t, torch.ones_like(t.param))

    def current_sparsity(self) -> list[float]:  # noqa: D102
        out = []
        for t in self.targets:
            w = getattr(t.module, t.attr).detach()
            out.append(float((w == 0).sum()) / w.numel() if t.mask is not None else 0.0)
        return out

    def weights(self) -> Tensor:  # noqa: D102
        return torch.cat([t.param.detach().reshape(-1) * t.mask.reshape(-1) for t in self.targets])

    def alive(self) -> Tensor:  # noqa: D102
        return torch.cat([t.mask.reshape(-1) != 0 for t in self.targets])

    def count(self, flags: Tensor) -> int:  # noqa: D102
        return int(flags.sum())

    def gradients(self, model, loss_func, data, num_grads, grad_batch_size, dtype=None) -> Tensor:  # noqa: D102
        return collect_gradients(
            model, loss_func, data, self.targets, num_grads, grad_batch_size, dtype=dtype
        )

    def relative_damping(self, G: Tensor) -> float:  # noqa: D102
        return float(G.double().pow(2).sum(0).mean() / G.shape[0])

    def inverse(self, G: Tensor, lam: float, method: str, block_size: int | None) -> Any:  # noqa: D102
        if method == "mfac":
            from curvopt.mfac import StaticMFAC

            return StaticMFAC(G, lam, block_size=block_size)
        return DenseFisherInverse(G, lam, block_size=None)

    def groups(self, n: int, m: int) -> Tensor:  # noqa: D102
        layers = [(t.module, t.qualified_name, tuple(t.param.shape)) for t in self.targets]
        return flat_groups(layers, m, self.targets[0].param.device)

    def layer_inverse(self, model, loss_func, data, damp, relative) -> LayerwiseInverse:  # noqa: D102
        return layer_hessians(model, self.targets, data, loss_func, damp, relative)

    def select(self, scores, alive, layer_targets, scope, normalize, frac, start) -> Tensor:  # noqa: D102
        scores = scores.clone().to(torch.float64)
        scores[~alive] = -float("inf")  # already pruned: always counted first
        d = scores.numel()
        out = torch.zeros(d, dtype=torch.bool, device=scores.device)
        if scope == "global":
            if normalize:
                offset = 0
                for n in self.sizes:
                    seg = scores[offset : offset + n]
                    live = seg[torch.isfinite(seg)]
                    if live.numel() > 0 and float(live.mean()) > 0:
                        seg /= live.mean()
                    offset += n
            total_start = sum(s * n for s, n in zip(start, self.sizes)) / d
            s_j = one_shot_step(layer_targets[0], frac, total_start)
            k = min(int(round(s_j * d)), d)
            out[torch.argsort(scores, stable=True)[:k]] = True
            return out | ~alive
        offset = 0
        for n, s_t, s_0 in zip(self.sizes, layer_targets, start):
            s_j = one_shot_step(s_t, frac, min(s_0, s_t))
            k = min(int(round(s_j * n)), n)
            seg = scores[offset : offset + n]
            out[offset + torch.argsort(seg, stable=True)[:k]] = True
            offset += n
        return out | ~alive

    def most_per_block(self, idx: Tensor, block_size: int | None, total: int) -> int:  # noqa: D102
        B = self.dim if block_size is None else block_size
        return int(torch.bincount(torch.div(idx, B, rounding_mode="floor")).max())

    def update_multi(self, inverse, w: Tensor, idx: Tensor, block_size: int | None) -> Tensor:  # noqa: D102
        return obs_update_multi(inverse, w, idx, block_size)

    def write(self, w: Tensor, alive: Tensor) -> None:  # noqa: D102
        with torch.no_grad():
            offset = 0
            for t, n in zip(self.targets, self.sizes):
                mask = alive[offset : offset + n].reshape(t.param.shape)
                t.param.copy_(w[offset : offset + n].reshape(t.param.shape))
                set_mask(t, mask)
                offset += n

    def layer_reports(self) -> list[LayerReport]:  # noqa: D102
        return layer_reports(self.targets)

    def snapshot(self) -> ModelSnapshot:  # noqa: D102
        return ModelSnapshot(self.model, self.targets)


def weights_view(
    model: nn.Module, targets: list[PrunableWeight], method: str, block_size: int | None
) -> WeightsView:
    """The view of ``targets`` that fits the model: sharded if any weight is an FSDP2 DTensor.

    Args:
        model: The network.
        targets: Its prunable weights.
        method: The pruning method (the sharded view has no dense ``"obs"``).
        block_size: M-FAC block size (the sharded view needs ``None``: one block).

    Returns:
        A :class:`LocalWeights` or a :class:`~curvopt.prune.sharded.ShardedWeights`.

    Raises:
        ValueError: For what the sharded view cannot do (``method="obs"``, M-FAC blocks, plain
            and sharded weights mixed, several meshes, weights without masks).
    """
    if is_sharded(targets):
        check_sharded_arguments(method, block_size)
        return ShardedWeights(targets, model)
    return LocalWeights(model, targets)


__all__ = ["LocalWeights", "WeightsView", "weights_view"]
