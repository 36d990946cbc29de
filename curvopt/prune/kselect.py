"""The ``k`` smallest entries of a vector sharded over ranks, without gathering the vector.

Pruning a sharded model must remove the ``k`` lowest-scoring weights of the whole model while
each rank holds only its own scores. :func:`smallest_k` finds them with bisection on counts:
for a candidate threshold ``t`` every rank counts its entries ``<= t``, one all-reduce sums the
counts, and halving the interval over the 64-bit keys of the values finds the ``k``-th smallest
value ``v`` exactly in at most 64 rounds. Everything below ``v`` is selected; among the entries
equal to ``v`` (ties) a second bisection over their ``order`` keys (e.g. global indices) selects
the ``k - count(< v)`` first ones, so the count is exact and the choice is the one of a stable
sort. Each round all-reduces one integer per segment: ``O(64 S)`` numbers in all, independent
of the vector's length.

Several independent selections (segments, e.g. one per layer) run in the same rounds.

Without a process group the same code selects on one process, identical to
``torch.argsort(values, stable=True)[:k]`` per segment (with ``order`` the position).

Example:
    >>> values = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    >>> smallest_k(values, torch.arange(5), torch.zeros(5, dtype=torch.long), [3], None)
    tensor([False,  True,  True,  True, False])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvopt.distributed import all_reduce_sum_

# INT64_MIN is below every key (only a NaN maps to it); INT64_MAX is the largest key
_LOW, _HIGH = -(2**63), 2**63 - 1


def ordered_keys(values: Tensor) -> Tensor:
    """Map float64 values to int64 keys in the same order (``-0.0 < 0.0``; NaN not allowed).

    The bits of a non-negative double already sort as integers; for negative ones flipping all
    bits but the sign reverses their order below zero.
    """
    bits = values.to(torch.float64).view(torch.int64)
    return torch.where(bits < 0, bits ^ (2**63 - 1), bits)


def smallest_k(
    values: Tensor,
    order: Tensor,
    segment: Tensor,
    k: Sequence[int],
    group: object,
) -> Tensor:
    """Select, in each segment, the ``k[s]`` entries with the smallest ``(value, order)``.

    Args:
        values: This rank's values ``(n,)``, any float dtype, no NaN.
        order: Distinct non-negative int64 tie-breaking keys ``(n,)`` (distinct over all
            ranks), e.g. the entries' global indices.
        segment: Segment of each entry ``(n,)``, integers in ``[0, len(k))``.
        k: How many entries to select in each segment over all ranks (at most its size).
        group: Process group the vector is sharded over, or None.

    Returns:
        Boolean mask ``(n,)`` of this rank's selected entries. All ranks must call together.

    Raises:
        ValueError: If shapes differ or ``values`` holds NaN.
    """
    if not (values.shape == order.shape == segment.shape and values.ndim == 1):
        raise ValueError(
            f"values, order and segment must be 1-D of one length, got {tuple(values.shape)}, "
            f"{tuple(order.shape)} and {tuple(segment.shape)}"
        )
    if bool(torch.isnan(values).any()):
        raise ValueError("values contains NaN: the k smallest are undefined")
    keys = ordered_keys(values)
    everything = torch.ones_like(keys, dtype=torch.bool)
    want = [int(x) for x in k]
    threshold, below = _kth_key(keys, everything, segment, want, group)
    chosen = keys < threshold[segment]
    ties = keys == threshold[segment]
    need = [w - b for w, b in zip(want, below)]
    tie_cut, _ = _kth_key(order, ties, segment, need, group)
    return chosen | (ties & (order <= tie_cut[segment]))


def _kth_key(
    keys: Tensor, active: Tensor, segment: Tensor, k: list[int], group: object
) -> tuple[Tensor, list[int]]:
    """Per segment the smallest key ``t`` with ``count(active & keys <= t) >= k``, by bisection.

    Returns the thresholds (int64, ``_LOW`` where ``k == 0``: nothing is ``<=`` it) and the
    global count of active keys strictly below each threshold.
    """
    S, dev = len(k), keys.device
    lo, hi = [_LOW] * S, [_HIGH] * S  # invariant: count(<= lo) < k <= count(<= hi)
    below = [0] * S  # count(<= lo)
    for s in range(S):
        if k[s] <= 0:
            hi[s] = _LOW
    seg = segment.to(torch.long)
    while any(h - lo_ > 1 for lo_, h in zip(lo, hi)):
        mid = [(lo_ + h) // 2 if h - lo_ > 1 else h for lo_, h in zip(lo, hi)]
        mids = torch.tensor(mid, dtype=torch.int64, device=dev)
        hits = (active & (keys <= mids[seg])).to(torch.int64)
        counts = torch.zeros(S, dtype=torch.int64, device=dev).scatter_add_(0, seg, hits)
        counts = all_reduce_sum_(counts, group).tolist()
        for s in range(S):
            if hi[s] - lo[s] > 1:
                if counts[s] >= k[s]:
                    hi[s] = mid[s]
                else:
                    lo[s], below[s] = mid[s], counts[s]
    return torch.tensor(hi, dtype=torch.int64, device=dev), below
