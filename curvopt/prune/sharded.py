"""The FSDP2-sharded weights view: the steps of :func:`curvopt.prune.prune` on local shards.

:class:`ShardedWeights` is the sharded implementation of
:class:`~curvopt.prune.weights_view.WeightsView`; the loop itself is the one of
:func:`~curvopt.prune.prune` (nothing here runs the steps).

With ``torch.distributed.fsdp.fully_shard`` every prunable weight is a DTensor split by rows
(``Shard(0)``, uneven splits included) over a 1-D device mesh. Rank ``r`` then treats the
concatenation of its local rows of all prunable weights as its coordinate shard of the flat
weight vector (``d_r`` entries of ``d``), and one recomputation step is:

1. ``m`` gradients: ``loss_func(model(X_c), y_c).backward()`` per chunk; FSDP2 averages each
   gradient over the ranks (reduce-scatter), so gradient ``i`` is the gradient on the union of
   the ranks' ``i``-th chunks (equal chunk sizes and a ``'mean'`` loss: the gradient of their
   concatenation; identical data on every rank: the single-process gradient). The local rows
   of the gradients form ``G_r`` (``m x d_r``); a rank that runs out of data stops every rank.
2. ``StaticMFAC(G_r, lam, process_group=...)``: coordinate-sharded M-FAC, one all-reduce of
   ``m^2`` numbers; the inverse diagonal of the local coordinates needs no communication.
3. Scores on the local coordinates; the ``k`` lowest over all ranks are found by bisection on
   all-reduced counts (:func:`curvopt.prune.kselect.smallest_k`), never gathering the scores.
   Ties are broken by the global flat index, as a stable sort does in the single-process run.
4. The OBS update: the diagonal one is one sharded IHVP; the exact multi-weight one fetches
   the rows of ``F^{-1}`` for all removed weights restricted to the local columns
   (:meth:`StaticMFAC.inverse_rows`, collective) and solves the small system, replicated.
5. The local shards of the weights are updated in place.

Masks: ``torch.nn.utils.parametrize`` cannot be attached to a parameter FSDP2 already manages
(FSDP2 swaps the module's parameter, not the parametrization's ``original``), so the masks must
be attached BEFORE ``fully_shard`` (:func:`curvopt.prune.attach_masks`). FSDP2 then shards
``parametrizations.weight.original`` and keeps the mask buffer whole on every rank; pruning
writes the local rows and all-gathers the new masks (one byte per weight per step).

Layer-wise OBS (``method="layerwise"``) replaces steps 1-2 by each layer's ``H_l = 2 X X^T / N``:
every rank runs its own data, ``X X^T`` and ``N`` are all-reduced and each rank inverts ``H_l``
(replicated, ``in x in``). The rows of a Linear weight are its outputs, each an independent
OBS problem, so scores and the exact update need only the local rows; a ``Conv1D`` is sharded by
its inputs, so its update all-gathers that layer's weights and removal flags and keeps the local
rows (:meth:`ShardedWeights.layer_inverse`).

Same masks as the single-process run with ``block_size=None`` on the same gradients, up to
ties decided by round-off (scores are computed with sums in another order). A failed prune is
undone on every rank, as on one process (:meth:`ShardedWeights.snapshot`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from curvopt.distributed import (
    all_gather_flat,
    all_gather_object,
    all_reduce_any,
    all_reduce_sum_,
    check_shard0,
    group_ranks,
    is_dtensor,
    local_tensor,
    rank,
)

from .kselect import smallest_k
from .layerwise import LayerwiseInverse, damped_inverses, input_moments
from .masks import PrunableWeight
from .patterns import flat_groups, group_index, input_dim
from .report import LayerReport
from .schedule import one_shot_step
from .snapshot import ModelSnapshot


def is_sharded(targets: list[PrunableWeight]) -> bool:
    """Whether any prunable weight is a DTensor (an FSDP2-sharded model)."""
    return any(is_dtensor(t.param) for t in targets)


class ShardedWeights:
    """This rank's shard of the flat vector of prunable weights of an FSDP2 model.

    Args:
        targets: The prunable weights, all DTensors ``Shard(0)`` on one 1-D mesh, masks attached.
        model: The network they belong to (its buffers go into :meth:`snapshot`); optional.

    Attributes:
        group: The mesh's process group.
        dim: ``d``, the number of prunable weights over all ranks.
        sizes: Global number of entries per weight.

    Raises:
        ValueError: Plain and sharded weights mixed, weights on different meshes, placements
            other than ``Shard(0)``, or a weight without a mask.
    """

    def __init__(self, targets: list[PrunableWeight], model: nn.Module | None = None) -> None:
        plain = [t.qualified_name for t in targets if not is_dtensor(t.param)]
        if plain:
            raise ValueError(
                f"some prunable weights are FSDP2-sharded DTensors and others are not ({plain}); "
                "shard the whole model with fully_shard, or leave those layers out with names="
            )
        groups = [check_shard0(t.param, t.qualified_name) for t in targets]
        if any(group_ranks(g) != group_ranks(groups[0]) for g in groups):
            raise ValueError(
                "the prunable weights live on different device meshes / process groups; prune "
                "needs one mesh for all of them (or prune each mesh's layers with names=)"
            )
        unmasked = [t.qualified_name for t in targets if t.mask is None]
        if unmasked:
            raise ValueError(
                f"FSDP2-sharded weights {unmasked} carry no mask. Masks (parametrizations) must "
                "be attached before fully_shard: call curvopt.prune.attach_masks(model) first"
            )
        self.model = model
        self.targets = targets
        self.group = groups[0]
        self.local = [local_tensor(t.param) for t in targets]
        self.sizes = [t.param.numel() for t in targets]
        self.dim = sum(self.sizes)
        rows_by_rank = all_gather_object([x.shape[0] for x in self.local], self.group)
        me = rank(self.group)
        self._rank_sizes = [  # flat entries each rank holds (its coordinate shard)
            sum(rows[i] * self._row_numel(i) for i in range(len(targets))) for rows in rows_by_rank
        ]
        self._rows_by_rank = rows_by_rank
        first_rows = [sum(rows[i] for rows in rows_by_rank[:me]) for i in range(len(targets))]
        self.masks = [  # this rank's rows of the (whole, replicated) mask buffers
            t.mask[r0 : r0 + x.shape[0]] for t, r0, x in zip(targets, first_rows, self.local)
        ]
        offsets = [sum(self.sizes[:i]) for i in range(len(targets))]
        self.index = torch.cat(  # global flat index of every local entry
            [
                off + r0 * self._row_numel(i) + torch.arange(x.numel(), device=x.device)
                for i, (off, r0, x) in enumerate(zip(offsets, first_rows, self.local))
            ]
        )
        self.layer = torch.cat(
            [torch.full((x.numel(),), i, device=x.device) for i, x in enumerate(self.local)]
        )

    def _row_numel(self, i: int) -> int:
        shape = self.targets[i].param.shape
        return self.sizes[i] // shape[0] if shape[0] else 0

    # ------------------------------------------------------------------------- state
    def prepare(self) -> None:
        """Nothing to do: the masks were attached before ``fully_shard`` (checked in init)."""

    def snapshot(self) -> ModelSnapshot:
        """Undo record of this rank's shards, the mask buffers and the model's buffers."""
        model = self.model if self.model is not None else nn.Module()
        return ModelSnapshot(model, self.targets, structure=False)

    def weights(self) -> Tensor:
        """Effective local weights (mask applied), flat ``(d_r,)``."""
        return torch.cat([(x.detach() * m).reshape(-1) for x, m in zip(self.local, self.masks)])

    def alive(self) -> Tensor:
        """Local weights not pruned yet, flat boolean ``(d_r,)``."""
        return torch.cat([(m != 0).reshape(-1) for m in self.masks])

    def count(self, flags: Tensor) -> int:
        """Number of True entries over all ranks."""
        n = flags.sum().to(torch.int64).reshape(1)
        return int(all_reduce_sum_(n, self.group))

    def zeros_per_layer(self) -> list[int]:
        """Zeros of the effective weights of each layer, over all ranks."""
        w = self.weights()
        z = torch.zeros(len(self.targets), dtype=torch.int64, device=w.device)
        z.scatter_add_(0, self.layer, (w == 0).to(torch.int64))
        return all_reduce_sum_(z, self.group).tolist()

    def current_sparsity(self) -> list[float]:
        """Fraction of zeros of each layer before pruning (masks are always attached here)."""
        return [z / n for z, n in zip(self.zeros_per_layer(), self.sizes)]

    def layer_reports(self) -> list[LayerReport]:
        """Per-layer sparsity over all ranks (global shapes)."""
        return [
            LayerReport(t.qualified_name, tuple(t.param.shape), n, z)
            for t, n, z in zip(self.targets, self.sizes, self.zeros_per_layer())
        ]

    def write(self, w: Tensor, alive: Tensor) -> None:
        """Store new local weights and masks; the masks are all-gathered into the buffers."""
        gathered = all_gather_flat(alive.to(torch.uint8), self._rank_sizes, self.group)
        by_rank = gathered.split(self._rank_sizes)
        per_rank = [  # split each rank's shard into its rows of every layer
            part.split([rows[i] * self._row_numel(i) for i in range(len(self.targets))])
            for part, rows in zip(by_rank, self._rows_by_rank)
        ]
        start = 0
        with torch.no_grad():
            for i, (t, x) in enumerate(zip(self.targets, self.local)):
                full = torch.cat([pieces[i] for pieces in per_rank]).reshape(t.param.shape)
                t.mask.copy_(full.to(t.mask.dtype))
                x.copy_(w[start : start + x.numel()].reshape(x.shape))
                x.mul_(self.masks[i])
                start += x.numel()

    # ------------------------------------------------------------------------- gradients
    def gradients(
        self,
        model: nn.Module,
        loss_func: Callable[[Tensor, Tensor], Tensor],
        data: Iterable,
        num_grads: int,
        grad_batch_size: int | None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``G_r``: the local rows of ``num_grads`` gradients, ``(m, d_r)`` (see the module doc).

        The model's ``.grad`` fields are restored afterwards.
        """
        params = list(model.parameters())
        saved = [p.grad for p in params]
        rows: list[Tensor] = []
        device = self.local[0].device
        chunks = _chunks(data, grad_batch_size)
        try:
            for p in params:
                p.grad = None
            while len(rows) < num_grads:
                chunk = next(chunks, None)
                if bool(all_reduce_any(torch.tensor(chunk is None, device=device), self.group)):
                    break  # some rank has no data left: every rank stops here
                X, y = chunk
                loss = loss_func(model(X), y)
                bad = torch.tensor(not bool(torch.isfinite(loss.detach()).all()), device=device)
                if bool(all_reduce_any(bad, self.group)):  # every rank raises, none hangs
                    raise ValueError(
                        f"the loss of gradient {len(rows)} is not finite on some rank: does the "
                        "calibration data have any valid target (e.g. labels all ignore_index)?"
                    )
                loss.backward()
                parts = []
                for t, x, m in zip(self.targets, self.local, self.masks):
                    g = t.param.grad
                    g = torch.zeros_like(x) if g is None else local_tensor(g)
                    parts.append((g * m).reshape(-1))
                rows.append(torch.cat(parts).to(dtype or parts[0].dtype))
                for p in params:
                    p.grad = None
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        if not rows:
            raise ValueError("the data loader yielded no batches: cannot collect gradients")
        if len(rows) < num_grads:
            warnings.warn(
                f"the data gave only {len(rows)} of the {num_grads} gradients asked for (on "
                "the rank with the fewest); using those",
                stacklevel=3,
            )
        return torch.stack(rows)

    def relative_damping(self, G: Tensor) -> float:
        """``mean(diag(G^T G / m))`` over all ``d`` coordinates."""
        sq = all_reduce_sum_(G.double().pow(2).sum(0).sum().reshape(1), self.group)
        return float(sq) / (self.dim * G.shape[0])

    def inverse(self, G: Tensor, lam: float, method: str, block_size: int | None):
        """Coordinate-sharded M-FAC over the ranks' columns ``G_r`` (one block; ``"mfac"`` only)."""
        from curvopt.mfac import StaticMFAC

        return StaticMFAC(G, lam, process_group=self.group)

    # ------------------------------------------------------------------------- selection
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
        """Local mask of the entries pruned after this step (k lowest, globally or per layer)."""
        scores = scores.clone().to(torch.float64)
        scores[~alive] = -float("inf")  # already pruned: always counted first
        L = len(self.targets)
        if scope == "global":
            if normalize:
                live = torch.isfinite(scores)
                stats = torch.zeros(2, L, dtype=torch.float64, device=scores.device)
                stats[0].scatter_add_(0, self.layer, torch.where(live, scores, 0.0))
                stats[1].scatter_add_(0, self.layer, live.to(torch.float64))
                stats = all_reduce_sum_(stats, self.group)
                mean = stats[0] / stats[1].clamp_min(1)
                ok = (stats[1] > 0) & (mean > 0)
                scale = torch.where(ok, mean, 1.0)[self.layer]
                scores = torch.where(live, scores / scale, scores)
            total_start = sum(s * n for s, n in zip(start, self.sizes)) / self.dim
            s_j = one_shot_step(layer_targets[0], frac, total_start)
            k = [min(int(round(s_j * self.dim)), self.dim)]
            segment = torch.zeros_like(self.layer)
        else:
            k = []
            for n, s_t, s_0 in zip(self.sizes, layer_targets, start):
                s_j = one_shot_step(s_t, frac, min(s_0, s_t))
                k.append(min(int(round(s_j * n)), n))
            segment = self.layer
        return smallest_k(scores, self.index, segment, k, self.group) | ~alive

    def groups(self, n: int, m: int) -> Tensor:
        """N:M groups of the local rows: local, because a group never crosses a shard boundary.

        FSDP2 shards dimension 0. For Linear/Conv weights that is the output dimension, so every
        group lies in one rank's rows; for a ``Conv1D`` (weight ``(in, out)``) it is the input
        dimension, and each rank's row count must then be a multiple of ``m``.

        Raises:
            ValueError: A layer the pattern cannot tile, or a ``Conv1D`` shard boundary inside a
                group.
        """
        for t, rows in zip(self.targets, zip(*self._rows_by_rank)):
            if input_dim(t.module) == 0 and any(r % m for r in rows):
                raise ValueError(
                    f"{t.qualified_name} is sharded by its input dimension into {list(rows)} "
                    f"rows per rank, which splits groups of m={m}: shard it so that every rank "
                    "holds a multiple of m rows, or leave it out with names="
                )
        for t in self.targets:  # the whole layer must be tileable (same message as locally)
            group_index(tuple(t.param.shape), input_dim(t.module), m, t.qualified_name)
        layers = [
            (t.module, t.qualified_name, tuple(x.shape)) for t, x in zip(self.targets, self.local)
        ]
        return flat_groups(layers, m, self.local[0].device)

    def layer_inverse(self, model, loss_func, data, damp, relative) -> LayerwiseInverse:
        """Layer-wise OBS on the local rows: every rank holds the whole ``(H_l + lambda I)^{-1}``.

        Each rank runs its own ``data``; ``sum X^T X`` and the counts are all-reduced (``in^2``
        numbers per layer), so ``H_l = 2 X X^T / N`` is that of the concatenated data on every
        rank, and the inverse is computed, replicated, on each. A Linear's rows are its outputs,
        whose OBS problems are independent: scores and updates need only the local rows. A
        ``Conv1D`` is sharded by inputs; its update all-gathers the layer's weights and removal
        flags (:class:`~curvopt.prune.layerwise.LayerwiseInverse`).
        """
        try:
            hs, counts = input_moments(model, self.targets, data, loss_func, self.group)
        finally:
            _reshard(model)
        inverses, damps = damped_inverses(self.targets, hs, counts, damp, relative)
        me = rank(self.group)
        first = [sum(rows[i] for rows in self._rows_by_rank[:me]) for i in range(len(self.targets))]
        return LayerwiseInverse(
            self.targets, inverses, damps, shapes=[tuple(x.shape) for x in self.local],
            first_rows=first, gather=self._gather_layer,
        )  # fmt: skip

    def _gather_layer(self, i: int, x: Tensor) -> Tensor:
        """The whole ``i``-th weight from every rank's rows: ``x`` is ``(k, rows_r * row)``.

        Returns ``(k, numel)``: each of the ``k`` stacked fields in the global row-major order.
        """
        k = x.shape[0]
        sizes = [k * rows[i] * self._row_numel(i) for rows in self._rows_by_rank]
        parts = all_gather_flat(x.reshape(-1), sizes, self.group).split(sizes)
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1)

    def most_per_block(self, idx: Tensor, block_size: int | None, total: int) -> int:
        """``total``, the removals over all ranks: the sharded M-FAC is one block."""
        return total

    def update_multi(
        self, inverse, w: Tensor, idx: Tensor, block_size: int | None = None
    ) -> Tensor:
        """Exact multi-weight OBS update for removing ``idx`` (local) over all ranks.

        ``delta w = -F^{-1}[:, Q] (F^{-1}[Q, Q])^{-1} w_Q``: the rows of ``F^{-1}`` for every
        rank's removed weights, restricted to the local columns, come from one collective
        ``inverse_rows``; each rank fills the columns of ``F^{-1}[Q, Q]`` it owns and one
        all-reduce assembles it (``|Q|^2`` numbers), so the solve is replicated.
        """
        R = inverse.inverse_rows(idx)  # (|Q|, d_r), every rank's removed weights in rank order
        counts = all_gather_object(idx.numel(), self.group)
        first = sum(counts[: rank(self.group)])
        n = R.shape[0]
        S = torch.zeros(n, n, dtype=torch.float64, device=w.device)
        rhs = torch.zeros(n, dtype=torch.float64, device=w.device)
        local = first + torch.arange(idx.numel(), device=w.device)
        S[:, local] = R[:, idx].to(torch.float64)
        rhs[local] = w[idx].to(torch.float64)
        packed = all_reduce_sum_(torch.cat([S.reshape(-1), rhs]), self.group)
        S, rhs = packed[: n * n].reshape(n, n), packed[n * n :]
        coef = torch.linalg.solve(S, rhs)
        return -(R.T @ coef.to(R.dtype)).to(w.dtype)


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back on its shards after forward passes without a backward.

    FSDP2 keeps the root's parameters unsharded after a forward (the backward would need them);
    after ``no_grad`` forwards nothing reshards them, so the module would go on computing with,
    and report, the unsharded copies while pruning writes the shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _chunks(data: Iterable, grad_batch_size: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(X, y)`` pieces that give one gradient each (see ``collect_gradients``)."""
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"data must yield (X, y) pairs; batch {i} is {type(batch).__name__}")
        X, y = batch
        step = len(X) if grad_batch_size is None else int(grad_batch_size)
        for s in range(0, len(X), max(step, 1)):
            yield X[s : s + step], y[s : s + step]


def check_sharded_arguments(method: str, block_size: int | None) -> None:
    """What the sharded path does not support, checked before the model is touched."""
    if method == "obs":
        raise ValueError(
            "method='obs' (the dense exact inverse) needs every weight on one process; for an "
            "FSDP2-sharded model use method='mfac' or 'magnitude'"
        )
    if method == "mfac" and block_size is not None:
        raise ValueError(
            "an FSDP2-sharded model is pruned with one M-FAC block over all weights (blocks "
            "would cross the ranks' shards): pass block_size=None"
        )


__all__ = ["ShardedWeights", "check_sharded_arguments", "is_sharded"]
