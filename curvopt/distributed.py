"""The collectives of curvopt: the one module that calls ``torch.distributed``.

M-FAC shards its gradient window by coordinates: rank ``r`` of ``P`` stores ``G[:, shard_r]``.
Every product it needs is a sum over coordinates, ``G x = sum_r G_r x_r``, so one all-reduce of
``O(m)`` numbers per step serves all of them; the ``m x m`` float64 algebra is then replicated
on every rank from identical numbers. This module holds those collectives and the bookkeeping
around them:

* process-group checks (:func:`check_process_group`, :func:`world_size`, :func:`rank`);
* reductions (:func:`all_reduce_sum_`, :func:`all_reduce_any`, :func:`all_reduce_max_`) and
  :func:`all_gather_flat` for shards of unequal length;
* the even split of a flat coordinate range (:func:`shard_range`, ZeRO-1 style);
* DTensor helpers (:func:`is_dtensor`, :func:`local_tensor`, :func:`check_shard0`);
* :class:`CommCounter`, a context manager counting the calls and payload bytes of every
  collective issued through this module (for the benchmark).

With ``group=None`` every function is the single-process identity (no collective, no check), so
callers need no branches of their own.

Example:
    >>> shard_range(10, rank=3, world=4)  # 10 coordinates on 4 ranks: 3, 3, 2, 2
    (8, 10)
    >>> t = torch.ones(3)
    >>> all_reduce_sum_(t, None) is t  # no group: nothing happens
    True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CommCounter",
    "all_gather_flat",
    "all_gather_object",
    "all_reduce_any",
    "all_reduce_max_",
    "all_reduce_sum_",
    "check_process_group",
    "check_same_across_ranks",
    "check_shard0",
    "group_ranks",
    "is_dtensor",
    "local_columns",
    "local_tensor",
    "no_counting",
    "rank",
    "shard_range",
    "sharded_columns",
    "world_size",
]


# ---------------------------------------------------------------------------- groups
def check_process_group(group: object, name: str = "process_group") -> object:
    """Return ``group`` after checking that it can run collectives (None passes through).

    ``None`` is refused in one case: a launcher (``torchrun``) started several processes
    (``WORLD_SIZE > 1`` in the environment) and ``torch.distributed`` is not initialized yet.
    Then ``dist.group.WORLD`` is itself ``None``, and every rank would silently run alone.

    Raises:
        ValueError: If ``torch.distributed`` is unavailable or not initialized, or ``group`` is
            None under a multi-process launch before ``init_process_group``.
        TypeError: If ``group`` is not a ``torch.distributed.ProcessGroup``.
    """
    if group is None:
        _refuse_uninitialized_launch(name)
        return None
    if not dist.is_available():
        raise ValueError(f"{name} was given but this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise ValueError(
            f"{name} was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first (or pass process_group=None)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name} must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD), "
            f"got {type(group).__name__}"
        )
    return group


def _refuse_uninitialized_launch(name: str) -> None:
    """Raise if several processes were launched but ``torch.distributed`` is not initialized."""
    try:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if launched > 1 and dist.is_available() and not dist.is_initialized():
        raise ValueError(
            f"{name} is None while WORLD_SIZE={launched} processes were launched (torchrun) and "
            "torch.distributed is not initialized: dist.group.WORLD is None before "
            "init_process_group, so each rank would run alone. Call "
            "torch.distributed.init_process_group(...) before building curvopt objects (for "
            "ranks that are meant to run alone, set WORLD_SIZE=1)"
        )


def check_same_across_ranks(
    values: dict[str, float], group: object, owner: str, device: object = None
) -> None:
    """Raise ``ValueError`` if the ranks of ``group`` disagree on any of ``values``.

    One all-reduce (maximum) of ``2 k`` float64 numbers (each value and its negation); a no-op
    without a group. Collective: every rank must call it with the same keys.

    Args:
        values: Name -> number (ints and floats exactly representable in float64; encode
            dtypes as indices).
        group: The process group, or None.
        owner: Name for the message.
        device: Device of the reduced tensor (the group's backend must support it; CPU for
            gloo, the rank's GPU for NCCL). Default CPU.
    """
    if not _active(group):
        return
    names = list(values)
    v = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    both = all_reduce_max_(torch.cat([v, -v]), group)
    hi, lo = both[: len(names)], -both[len(names) :]
    bad = [
        f"{k} (this rank {values[k]!r}, between {lo[i].item():g} and {hi[i].item():g})"
        for i, k in enumerate(names)
        if hi[i] != lo[i]
    ]
    if bad:
        raise ValueError(
            f"{owner}: the ranks of the process group disagree on {', '.join(bad)}; every rank "
            "must construct it with the same arguments and model"
        )


def group_ranks(group: object) -> tuple[int, ...]:
    """Global ranks of ``group`` (``(0,)`` for None), to compare two groups."""
    return (0,) if group is None else tuple(dist.get_process_group_ranks(group))


def world_size(group: object) -> int:
    """Number of ranks in ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def rank(group: object) -> int:
    """This process's rank in ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def shard_range(d: int, rank: int, world: int) -> tuple[int, int]:
    """Coordinates ``[start, stop)`` of rank ``rank`` in an even split of ``d`` over ``world``.

    The first ``d mod P`` ranks get ``ceil(d / P)`` coordinates, the others ``floor(d / P)``.

    Example:
        >>> [shard_range(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
        True
    """
    if world < 1 or not 0 <= rank < world or d < 0:
        raise ValueError(
            f"need d >= 0 and 0 <= rank < world, got d={d}, rank={rank}, world={world}"
        )
    base, extra = divmod(d, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ---------------------------------------------------------------------------- counting
@dataclass
class CommCounter:
    """Counts the collectives issued through this module while active (a context manager).

    ``bytes`` is the payload of each call (the input tensor's bytes, once per call, as seen by
    this rank); the bytes a ring all-reduce actually sends are ``2 (P - 1) / P`` times that.

    Attributes:
        calls: Number of collectives, per kind (``"all_reduce"``, ``"all_gather"``).
        bytes: Payload bytes, per kind.

    Example:
        >>> with CommCounter() as c:
        ...     _ = all_reduce_sum_(torch.ones(4), None)  # no group: not counted
        >>> c.total_calls
        0
    """

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        """All calls of all kinds."""
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        """All payload bytes of all kinds."""
        return sum(self.bytes.values())

    def record(self, kind: str, nbytes: int) -> None:
        """Add one call of ``kind`` with ``nbytes`` of payload."""
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    def __enter__(self) -> CommCounter:
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _COUNTERS.remove(self)


_COUNTERS: list[CommCounter] = []
# all_gather_single replaces all_gather_into_tensor (deprecated) in recent torch
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _record(kind: str, t: Tensor) -> None:
    for c in _COUNTERS:
        c.record(kind, t.numel() * t.element_size())


# ---------------------------------------------------------------------------- collectives
def _active(group: object) -> bool:
    """Whether a collective over ``group`` communicates (a group of one rank does not)."""
    return group is not None and dist.get_world_size(group) > 1


def all_reduce_sum_(tensor: Tensor, group: object) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place and return it (None or 1 rank: no-op).

    Every rank receives the same result, bit for bit, so algebra that follows stays replicated.
    """
    if _active(group):
        _record("all_reduce", tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max_(tensor: Tensor, group: object) -> Tensor:
    """Element-wise maximum over the ranks of ``group``, in place (None: no-op)."""
    if _active(group):
        _record("all_reduce", tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_any(flag: Tensor, group: object) -> Tensor:
    """Whether ``flag`` (0-dim bool tensor) is True on any rank: a 0-dim bool tensor.

    Example:
        >>> bool(all_reduce_any(torch.tensor(True), None))
        True
    """
    if not _active(group):
        return flag
    t = flag.to(torch.int32).reshape(1)
    all_reduce_max_(t, group)
    return t[0] > 0


def all_gather_flat(local: Tensor, sizes: Sequence[int], group: object) -> Tensor:
    """Concatenate the 1-D shards of all ranks in rank order (shards may differ in length).

    Args:
        local: This rank's ``(sizes[rank],)`` shard.
        sizes: Length of every rank's shard (known on every rank, e.g. from
            :func:`shard_range`).
        group: Process group (None: returns ``local``).

    Returns:
        ``(sum(sizes),)`` tensor, the same on every rank.
    """
    if not _active(group):
        return local
    P, r = world_size(group), rank(group)
    if len(sizes) != P or local.shape != (sizes[r],):
        raise ValueError(
            f"all_gather_flat: expected this rank's shard of shape ({sizes[r]},) and {P} sizes, "
            f"got shape {tuple(local.shape)} and {len(sizes)} sizes"
        )
    width = max(sizes)
    padded = local.new_zeros(width)
    padded[: local.numel()] = local
    out = local.new_empty(P * width)
    _record("all_gather", padded)
    _all_gather_single(out, padded, group=group)
    if all(s == width for s in sizes):
        return out
    return torch.cat([out[i * width : i * width + s] for i, s in enumerate(sizes)])


def all_gather_object(obj: object, group: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order (setup and checkpoints, not hot paths)."""
    if group is None:
        return [obj]
    out: list[object] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------------------- DTensor
def _dtensor_types() -> tuple[type, type] | None:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor, Shard


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def local_tensor(t: Tensor) -> Tensor:
    """This rank's local shard of a DTensor (a view that in-place updates write through).

    A plain tensor is returned as is.
    """
    if is_dtensor(t):
        return t._local_tensor
    return t


def check_shard0(t: Tensor, name: str = "parameter") -> object:
    """Check that DTensor ``t`` lives on a 1-D mesh sharded ``Shard(0)``; return its group.

    Raises:
        ValueError: For other placements (``Replicate``, ``Partial``: tensor parallelism) or a
            mesh of more than one dimension.
    """
    types = _dtensor_types()
    assert types is not None and isinstance(t, types[0])
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"{name} lives on a {mesh.ndim}-D device mesh; only 1-D meshes with Shard(0) "
            "(FSDP2's fully_shard) are supported"
        )
    pl = placements[0]
    if not (isinstance(pl, types[1]) and pl.dim == 0):
        raise ValueError(
            f"{name} has placement {pl}; only Shard(0) (FSDP2's fully_shard) is supported, "
            "not tensor-parallel Replicate/Partial/Shard(d>0)"
        )
    return mesh.get_group()


@contextlib.contextmanager
def no_counting() -> Iterator[None]:
    """Suspend every active :class:`CommCounter` (for setup collectives a step does not pay)."""
    saved = list(_COUNTERS)
    _COUNTERS.clear()
    try:
        yield
    finally:
        _COUNTERS.extend(saved)


# ---------------------------------------------------------------------------- checkpoints
def sharded_columns(local: Tensor, total: int, offset: int, group: object) -> Tensor:
    """A checkpointable tensor whose last dimension is split over the ranks of ``group``.

    ``local`` (``(..., n)``) holds columns ``[offset, offset + n)`` of a ``(..., total)`` tensor;
    every rank passes its own range (ranges may be empty and of any lengths, but together
    cover ``[0, total)`` once). The result is a ``ShardedTensor`` that
    ``torch.distributed.checkpoint`` saves and loads into any other split of the columns (e.g.
    another world size). A collective (it exchanges the ranges). ``local`` is copied.
    """
    import warnings

    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    lead = list(local.shape[:-1])
    n = local.shape[-1]
    shards = []
    if n > 0:
        where = f"rank:{rank(group)}/{local.device}"
        meta = ShardMetadata([0] * len(lead) + [offset], lead + [n], where)
        shards.append(Shard(local.contiguous().clone(), meta))
    hide_sharded_tensor_deprecation()
    with warnings.catch_warnings():  # ShardedTensor is deprecated for DTensor, which cannot
        warnings.simplefilter("ignore", FutureWarning)  # express floor/ceil or FSDP2 splits
        return init_from_local_shards(shards, lead + [total], process_group=group)


# The deprecation notice torch.distributed.checkpoint prints (about 16 times) when a state dict
# holds ShardedTensors. DTensor, its replacement, only expresses torch.chunk's split of one
# dimension, not M-FAC's: ZeRO-1's floor/ceil split of the flat coordinates cuts parameters at
# arbitrary places, and under FSDP2 a parameter's flat columns follow its row split.
_SHARDED_TENSOR_NOTICE = "Please use DTensor instead and we are deprecating ShardedTensor"


def hide_sharded_tensor_deprecation() -> None:
    """Silence DCP's ShardedTensor ``FutureWarning`` for the checkpoints of :func:`sharded_columns`.

    The user calls ``dcp.save``/``dcp.load`` on the state dict, so the notice cannot be caught
    around a call of ours; instead one process-wide filter is installed (once; repeated calls do
    not stack) that matches only this message and only from ``torch.distributed.checkpoint``'s
    modules. Every other warning, and this one from elsewhere, still shows.
    """
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=_SHARDED_TENSOR_NOTICE,
        category=FutureWarning,
        module=r"torch\.distributed\.checkpoint(\.|$)",
    )


def local_columns(t: Tensor) -> Tensor | None:
    """This rank's data of a :func:`sharded_columns` tensor (None if it holds no columns)."""
    shards = t.local_shards()
    return shards[0].tensor if shards else None
