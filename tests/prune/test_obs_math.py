"""OBS scores and updates against dense float64 references (explicit F, KKT solves)."""

import pytest
import torch

from curvopt.prune import DenseFisherInverse, obs_scores, obs_update_diagonal, obs_update_multi


def dense_F(G, damp, block_size=None):
    m, d = G.shape
    B = d if block_size is None else block_size
    blocks = []
    for s in range(0, d, B):
        Gb = G[:, s : s + B]
        blocks.append(damp * torch.eye(Gb.shape[1], dtype=G.dtype) + Gb.T @ Gb / m)
    return torch.block_diag(*blocks)


def kkt_update(F, w, Q):
    """argmin 1/2 dw^T F dw  s.t. dw_Q = -w_Q, solved as one KKT system."""
    d, q = F.shape[0], len(Q)
    E = torch.zeros(q, d, dtype=F.dtype)
    E[torch.arange(q), Q] = 1.0
    K = torch.zeros(d + q, d + q, dtype=F.dtype)
    K[:d, :d], K[:d, d:], K[d:, :d] = F, E.T, E
    rhs = torch.cat([torch.zeros(d, dtype=F.dtype), -w[Q]])
    return torch.linalg.solve(K, rhs)[:d]


@pytest.mark.parametrize("block_size", [None, 4, 7])
def test_dense_inverse_matches_explicit_inverse(block_size):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 17, generator=g, dtype=torch.float64)
    inv = DenseFisherInverse(G, 1e-2, block_size)
    Finv = torch.linalg.inv(dense_F(G, 1e-2, block_size))
    torch.testing.assert_close(inv.inverse_diagonal(), Finv.diagonal())
    idx = torch.tensor([0, 5, 16, 3])
    torch.testing.assert_close(inv.inverse_rows(idx), Finv[idx])
    x = torch.randn(17, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(inv.ihvp(x), Finv @ x)
    torch.testing.assert_close(inv.mul(x), dense_F(G, 1e-2, block_size) @ x)


def test_scores_formula():
    w = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    diag = torch.tensor([2.0, 0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(obs_scores(w, diag), w**2 / (2 * diag))
    with pytest.raises(ValueError):
        obs_scores(w, diag[:2])


@pytest.mark.parametrize("block_size", [None, 5, 8])
def test_multi_update_equals_kkt_solution(block_size):
    g = torch.Generator().manual_seed(1)
    G = torch.randn(9, 23, generator=g, dtype=torch.float64)
    w = torch.randn(23, generator=g, dtype=torch.float64)
    Q = torch.tensor([2, 3, 4, 11, 12, 19, 22, 0])
    inv = DenseFisherInverse(G, 0.1, block_size)
    F = dense_F(G, 0.1, block_size)
    ref = kkt_update(F, w, Q)
    # the closed form -F^-1 E^T (E F^-1 E^T)^-1 E w
    Finv = torch.linalg.inv(F)
    closed = -Finv[:, Q] @ torch.linalg.solve(Finv[Q][:, Q], w[Q])
    torch.testing.assert_close(closed, ref)
    for max_rows in (3, 4096):  # chunked and unchunked row fetches
        delta = obs_update_multi(inv, w, Q, block_size, max_rows=max_rows)
        torch.testing.assert_close(delta, ref)
        torch.testing.assert_close((w + delta)[Q], torch.zeros(len(Q), dtype=torch.float64))


def test_diagonal_update_is_sum_of_single_weight_updates():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(7, 12, generator=g, dtype=torch.float64)
    w = torch.randn(12, generator=g, dtype=torch.float64)
    F = dense_F(G, 0.05)
    inv = DenseFisherInverse(G, 0.05)
    Q = torch.tensor([1, 6, 9])
    ref = sum(kkt_update(F, w, torch.tensor([q])) for q in Q.tolist())
    torch.testing.assert_close(obs_update_diagonal(inv, w, Q), ref)
    # a single weight: diagonal == exact multi-weight update
    one = torch.tensor([6])
    torch.testing.assert_close(
        obs_update_diagonal(inv, w, one), obs_update_multi(inv, w, one, None)
    )


def test_multi_update_with_float32_weights_and_empty_set():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(5, 10, generator=g)
    w = torch.randn(10, generator=g)
    inv = DenseFisherInverse(G, 0.1, 4)
    delta = obs_update_multi(inv, w, torch.tensor([1, 2, 9]), 4)
    assert delta.dtype == torch.float32
    assert float((w + delta)[[1, 2, 9]].abs().max()) < 1e-5
    empty = obs_update_multi(inv, w, torch.tensor([], dtype=torch.long), 4)
    assert torch.count_nonzero(empty) == 0


def test_dense_inverse_rejects_bad_input():
    with pytest.raises(ValueError):
        DenseFisherInverse(torch.randn(3, 4), 0.0)
    with pytest.raises(ValueError):
        DenseFisherInverse(torch.randn(4), 0.1)
    with pytest.raises(ValueError):
        DenseFisherInverse(torch.full((2, 3), float("nan")), 0.1)
