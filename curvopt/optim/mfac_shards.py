"""Which coordinates of each parameter this rank keeps in MFAC's window (one rank or sharded).

Three layouts, chosen from the parameters and ``process_group``:

* ``"local"`` (plain parameters, no group): every coordinate, as before.
* ``"fsdp"`` (DTensor parameters from FSDP2's ``fully_shard``, ``Shard(0)`` on a 1-D mesh): this
  rank's local shard of each parameter (uneven shards included; FSDP2's padding is not part of
  the local tensor, so it never enters the window). The group is the mesh's.
* ``"zero1"`` (plain, replicated parameters, e.g. under DDP, with ``process_group``): the
  flattened coordinates of all parameters, in order, split evenly by
  :func:`curvopt.distributed.shard_range`; each parameter contributes the contiguous part of its
  flat range that falls in this rank's shard. :meth:`ParamShards.gather_` all-gathers the
  updated coordinates once per step.

In every layout a parameter's share is a contiguous range ``[offset, offset + length)`` of its
flattened coordinates (for FSDP2: rows ``[r0, r1)`` of ``Shard(0)``), which is what sharded
checkpoints record.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvopt import distributed as D
from curvopt.mfac._validation import finite_flag


class ParamShards:
    """The layout of MFAC's window over the ranks (see the module docstring).

    Args:
        params: The optimizer's parameters, in window order.
        process_group: Group for the ZeRO-1 layout of plain parameters, or None. With DTensor
            parameters it may be None or a group with the same ranks as their mesh.

    Attributes:
        mode: ``"local"``, ``"fsdp"`` or ``"zero1"``.
        group: The process group of the collectives (None for ``"local"``).
        ranges: Per parameter, ``(offset, length)`` of its flattened coordinates held here.
        local_dim: Coordinates held here (the window's ``dim``).

    Example:
        >>> shards = ParamShards([torch.zeros(2, 3), torch.zeros(4)])  # one process
        >>> shards.mode, shards.local_dim, shards.ranges
        ('local', 10, [(0, 6), (0, 4)])
    """

    def __init__(self, params: Sequence[Tensor], process_group: object = None) -> None:
        group = D.check_process_group(process_group)
        self.params = list(params)
        dt = [D.is_dtensor(p) for p in self.params]
        if any(dt):
            self.mode, self.group = "fsdp", self._mesh_group(group, dt)
        elif group is not None:
            self.mode, self.group = "zero1", group
            bad = [i for i, p in enumerate(self.params) if not p.is_contiguous()]
            if bad:
                raise ValueError(
                    f"parameters {bad} are not contiguous; sharding MFAC over a process_group "
                    "updates slices of flattened parameters in place (call .contiguous())"
                )
        else:
            self.mode, self.group = "local", None
        self.ranges = self._ranges()
        self.local_dim = sum(n for _, n in self.ranges)

    def _mesh_group(self, group: object, dt: list[bool]) -> object:
        if not all(dt):
            raise ValueError(
                "MFAC got both DTensor (FSDP2-sharded) and plain parameters; shard every "
                "parameter with fully_shard, or none"
            )
        groups = [D.check_shard0(p, f"parameter {i}") for i, p in enumerate(self.params)]
        mesh = self.params[0].device_mesh
        for i, p in enumerate(self.params):
            if p.device_mesh != mesh:
                raise ValueError(
                    f"parameter {i} lives on a different device mesh than parameter 0; MFAC "
                    "needs all parameters sharded over one mesh"
                )
        if group is not None and D.group_ranks(group) != D.group_ranks(groups[0]):
            raise ValueError(
                f"process_group has ranks {D.group_ranks(group)} but the parameters are "
                f"sharded over the mesh ranks {D.group_ranks(groups[0])}; pass the mesh's "
                "group or None"
            )
        return groups[0]

    def _ranges(self) -> list[tuple[int, int]]:
        if self.mode == "local":
            return [(0, p.numel()) for p in self.params]
        if self.mode == "fsdp":
            out = []
            P, r = D.world_size(self.group), D.rank(self.group)
            for p in self.params:
                local = D.local_tensor(p)
                rows = p.shape[0]
                per_row = p.numel() // rows if rows else 0
                first = min(r * -(-rows // P), rows)  # torch.chunk's split, as FSDP2 uses
                out.append((first * per_row, local.numel()))
            return out
        P, r = D.world_size(self.group), D.rank(self.group)
        start, stop = D.shard_range(sum(p.numel() for p in self.params), r, P)
        out, base = [], 0
        for p in self.params:
            lo, hi = max(start, base), min(stop, base + p.numel())
            out.append((lo - base, max(0, hi - lo)))
            base += p.numel()
        return out

    def param(self, i: int) -> Tensor:
        """The part of parameter ``i`` held here, a view that in-place updates write through."""
        p = self.params[i]
        if self.mode == "local":
            return p
        if self.mode == "fsdp":
            return D.local_tensor(p)
        off, n = self.ranges[i]
        return p.view(-1)[off : off + n]

    def grad(self, i: int) -> Tensor | None:
        """The part of parameter ``i``'s gradient held here, flat (None if no gradient)."""
        p = self.params[i]
        if p.grad is None:
            return None
        if p.grad.is_sparse:
            raise TypeError("MFAC does not support sparse gradients")
        if self.mode == "local":
            return p.grad.reshape(-1)
        if self.mode == "fsdp":
            return D.local_tensor(p.grad).reshape(-1)
        off, n = self.ranges[i]
        return p.grad.reshape(-1)[off : off + n]

    def nonfinite_anywhere(self) -> Tensor:
        """ZeRO-1: 0-dim bool, a NaN/Inf anywhere in the (whole, replicated) gradient.

        Every rank holds the whole gradient; a non-finite entry anywhere in it must stop the
        step on every rank, not only on the rank that owns the coordinate.
        """
        dev = self.params[0].device
        if self.mode != "zero1":
            return torch.zeros((), dtype=torch.bool, device=dev)
        flags = [~finite_flag(p.grad) for p in self.params if p.grad is not None]
        return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=dev)

    def check_replicated_grads(self) -> None:
        """ZeRO-1: raise ValueError if the ranks' gradients differ (one all-reduce of 4 numbers).

        Compares the sum and the sum of squares of all gradients (float64, non-finite entries
        counted as 0) across the ranks; cheap, and catches a missing DDP all-reduce.
        """
        if self.mode != "zero1":
            return
        parts = [p.grad.reshape(-1) for p in self.params if p.grad is not None]
        flat = torch.cat(parts).to(torch.float64) if parts else torch.zeros(1, dtype=torch.float64)
        flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
        stats = torch.stack([flat.sum(), flat.square().sum()])
        both = D.all_reduce_max_(torch.cat([stats, -stats]), self.group)
        if not torch.equal(both[:2], -both[2:]):
            raise ValueError(
                "MFAC: the gradients differ across the ranks of process_group (ZeRO-1 mode "
                "expects replicated gradients, e.g. after DDP's all-reduce); nothing was changed"
            )

    def gather_(self) -> None:
        """ZeRO-1: all-gather the updated coordinates into every rank's full parameters."""
        if self.mode != "zero1" or D.world_size(self.group) == 1:
            return  # one rank updated its parameters in place already
        P = D.world_size(self.group)
        d = sum(p.numel() for p in self.params)
        sizes = [b - a for a, b in (D.shard_range(d, r, P) for r in range(P))]
        local = torch.cat([self.param(i) for i in range(len(self.params))])
        full = D.all_gather_flat(local, sizes, self.group)
        base = 0
        for p in self.params:
            p.view(-1).copy_(full[base : base + p.numel()])
            base += p.numel()
