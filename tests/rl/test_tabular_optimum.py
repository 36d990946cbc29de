"""TabularMDP.optimal_return (backward induction) vs brute force over deterministic policies."""

import itertools

import pytest
import torch

from curvopt.rl import TabularMDP, TabularSoftmaxPolicy


def _best_stationary_deterministic(mdp):
    s, a = mdp.rewards.shape
    best = -float("inf")
    for choice in itertools.product(range(a), repeat=s):
        table = torch.zeros(s, a, dtype=torch.float64)
        table[torch.arange(s), torch.tensor(choice)] = 1.0
        best = max(best, float(mdp.expected_return(table)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layered_optimum_is_the_best_stationary_policy(seed):
    mdp = TabularMDP.layered(2, 2, horizon=4, discount=0.9, seed=seed)
    # in a layered MDP a stationary policy is a time-dependent one: brute force over all 2^8
    assert float(mdp.optimal_return()) == pytest.approx(_best_stationary_deterministic(mdp), 1e-12)
    # and no stochastic policy beats it
    for _ in range(20):
        pi = torch.softmax(3 * torch.randn(8, 2, dtype=torch.float64), -1)
        assert float(mdp.expected_return(pi)) <= float(mdp.optimal_return()) + 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_optimum_bounds_every_stationary_policy(seed):
    mdp = TabularMDP.random(3, 2, horizon=4, discount=0.9, seed=seed)
    assert _best_stationary_deterministic(mdp) <= float(mdp.optimal_return()) + 1e-12
    # horizon 1: the bound is attained (a bandit)
    bandit = TabularMDP.random(3, 2, horizon=1, seed=seed)
    assert float(bandit.optimal_return()) == pytest.approx(_best_stationary_deterministic(bandit))


def test_layered_mdp_moves_one_layer_per_step():
    mdp = TabularMDP.layered(3, 2, horizon=4, seed=0)
    torch.testing.assert_close(mdp.transitions.sum(-1), torch.ones(12, 2, dtype=torch.float64))
    batch = mdp.rollout(TabularSoftmaxPolicy(12, 2).double(), 50)
    assert torch.equal(batch.obs // 3, torch.arange(4).expand(50, 4))
