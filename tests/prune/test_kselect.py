"""Exact k smallest by bisection on counts (one process) against a stable sort."""

import pytest
import torch

from curvopt.prune.kselect import ordered_keys, smallest_k


def test_ordered_keys_keep_the_order_of_doubles():
    v = torch.tensor(
        [-float("inf"), -1e300, -1.0, -1e-300, -0.0, 0.0, 1e-300, 1.0, 1e300, float("inf")],
        dtype=torch.float64,
    )
    keys = ordered_keys(v)
    assert bool((keys[1:] > keys[:-1]).all())


@pytest.mark.parametrize("seed", range(4))
def test_smallest_k_equals_a_stable_sort_per_segment(seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(40):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        # few distinct values: many ties, also across segments; some -inf (pruned weights)
        values = torch.randint(-2, 4, (n,), generator=gen).double() * 0.37
        values[torch.rand(n, generator=gen) < 0.15] = -float("inf")
        S = int(torch.randint(1, 4, (1,), generator=gen))
        segment = torch.sort(torch.randint(0, S, (n,), generator=gen)).values
        order = torch.randperm(n, generator=gen) * 3 + 5  # distinct, not the positions
        k = [int(torch.randint(0, int((segment == s).sum()) + 1, (1,), generator=gen))
             for s in range(S)]  # fmt: skip
        got = smallest_k(values, order, segment, k, None)
        expected = torch.zeros(n, dtype=torch.bool)
        for s in range(S):
            idx = (segment == s).nonzero().squeeze(1)
            idx = idx[torch.argsort(order[idx])]  # ties go in the order of `order`
            expected[idx[torch.argsort(values[idx], stable=True)[: k[s]]]] = True
        assert torch.equal(got, expected)
        assert [int(got[segment == s].sum()) for s in range(S)] == k


def test_smallest_k_rejects_nan_and_mismatched_shapes():
    with pytest.raises(ValueError, match="NaN"):
        smallest_k(torch.tensor([1.0, float("nan")]), torch.arange(2), torch.zeros(2), [1], None)
    with pytest.raises(ValueError, match="one length"):
        smallest_k(torch.ones(3), torch.arange(2), torch.zeros(3), [1], None)
