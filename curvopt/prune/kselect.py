"""The ``k`` smallest entries of a vector sharded over ranks, without gathering the vector.

Pruning a sharded model must remove the ``k`` lowest-scoring weights of the whole model while
each rank holds only its own scores. :func:`smallest_k` finds them from counts alone: for
candidate thresholds ``t`` every rank counts its entries ``<= t``, one all-reduce sums the
counts, and narrowing the interval over the 64-bit keys of the values (255 candidates per
round: 8 bits) finds the ``k``-th smallest value ``v`` exactly in about 8 rounds. Everything
below ``v`` is selected; among the entries equal to ``v`` (ties) a second search over their
``order`` keys (e.g. global indices) selects the ``k - count(< v)`` first ones, so the count is
exact and the choice is the one of a stable sort. About 16 all-reduces of ``255 S`` integers
per selection, independent of the vector's length; no value leaves its rank.

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
PIVOTS = 255  # candidates per segment and round: 8 bits of the threshold per all-reduce


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
    """Per segment the smallest key ``t`` with ``count(active & keys <= t) >= k``.

    Each round counts the keys below ``PIVOTS`` evenly spaced candidates per segment (binary
    search in this rank's sorted keys) and all-reduces the ``S x PIVOTS`` counts once; the
    interval shrinks ``PIVOTS + 1``-fold, so 64-bit keys need at most 8 rounds.

    Returns the thresholds (int64, ``_LOW`` where ``k == 0``: nothing is ``<=`` it) and the
    global count of active keys strictly below each threshold.
    """
    S, dev = len(k), keys.device
    seg = segment.to(torch.long)
    ranked = [torch.sort(keys[active & (seg == s)]).values for s in range(S)]
    lo, hi = [_LOW] * S, [_HIGH] * S  # invariant: count(<= lo) < k <= count(<= hi)
    below = [0] * S  # count(<= lo)
    for s in range(S):
        if k[s] <= 0:
            hi[s] = _LOW
    while any(h - lo_ > 1 for lo_, h in zip(lo, hi)):
        pivots = [
            [lo[s] + (hi[s] - lo[s]) * j // (PIVOTS + 1) for j in range(1, PIVOTS + 1)]
            if hi[s] - lo[s] > 1
            else [hi[s]] * PIVOTS
            for s in range(S)
        ]  # non-decreasing, inside [lo, hi], and the last one strictly between when open
        piv = torch.tensor(pivots, dtype=torch.int64, device=dev)
        counts = torch.stack(
            [torch.searchsorted(ranked[s], piv[s], right=True) for s in range(S)]
        ).to(torch.int64)
        counts = all_reduce_sum_(counts, group).tolist()
        for s in range(S):
            if hi[s] - lo[s] <= 1:
                continue
            j = next((j for j, c in enumerate(counts[s]) if c >= k[s]), PIVOTS)
            if j < PIVOTS:
                hi[s] = pivots[s][j]
            if j > 0:
                lo[s], below[s] = pivots[s][j - 1], counts[s][j - 1]
    return torch.tensor(hi, dtype=torch.int64, device=dev), below
