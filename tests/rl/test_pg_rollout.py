"""Rollouts on gymnasium environments, batches, baselines and the sampler's bookkeeping."""

import pytest
import torch
from pg_helpers import small_mdp

from curvopt.rl import (
    Batch,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    GymRollout,
    LinearFeatureBaseline,
    PolicyGradientSampler,
    discounted_reward_to_go,
)


def _check_padded(batch, horizon):
    mask = batch.mask
    assert mask.shape[1] <= horizon
    # a prefix of ones per trajectory, zeros after
    assert torch.all(mask[:, 1:] <= mask[:, :-1])
    assert torch.all(batch.rewards[mask == 0] == 0)


def test_cartpole_rollout_masks_and_returns():
    torch.manual_seed(0)
    policy = CategoricalMLPPolicy(4, 2, hidden=(8,))
    rollout = GymRollout("CartPole-v1", horizon=40, seed=0)
    batch = rollout(policy, 7)
    _check_padded(batch, 40)
    assert batch.obs.shape[:2] == batch.mask.shape and batch.obs.shape[2] == 4
    assert batch.actions.dtype == torch.int64
    # CartPole pays 1 per step: return = episode length
    torch.testing.assert_close(batch.total_rewards(), batch.lengths())
    assert batch.lengths().max() <= 40
    again = GymRollout("CartPole-v1", horizon=40, seed=0)
    torch.manual_seed(0)
    torch.testing.assert_close(again(CategoricalMLPPolicy(4, 2, hidden=(8,)), 7).mask, batch.mask)


def test_acrobot_and_gaussian_pendulum_rollouts():
    acro = GymRollout("Acrobot-v1", horizon=25, seed=1)(CategoricalMLPPolicy(6, 3, hidden=(8,)), 3)
    _check_padded(acro, 25)
    assert torch.all(acro.rewards[acro.mask == 1] == -1)
    pend = GymRollout("Pendulum-v1", horizon=15, seed=2)(GaussianMLPPolicy(3, 1, hidden=(8,)), 2)
    assert pend.actions.shape == (2, 15, 1) and pend.actions.dtype == torch.float32
    assert torch.all(pend.mask == 1)


def test_bad_rollout_inputs():
    with pytest.raises(ValueError, match="horizon"):
        GymRollout("CartPole-v1", horizon=0)
    with pytest.raises(ValueError, match="positive int"):
        GymRollout("CartPole-v1", horizon=5)(CategoricalMLPPolicy(4, 2), 0)
    with pytest.raises(ValueError, match="like mask"):
        Batch(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_sampler_counts_every_trajectory_and_logs_returns():
    mdp, policy = small_mdp()
    sampler = PolicyGradientSampler(policy, mdp.rollout, batch_size=5, hvp_batch_size=3)
    sampler.gradient()
    v = torch.ones(6, dtype=torch.float64)
    sampler.hvp(v)
    sampler.gradient()
    assert sampler.num_trajectories == 13
    counts, means = sampler.returns("gradient")
    assert counts == [5, 13] and len(means) == 2
    assert [r.kind for r in sampler.history] == ["gradient", "hvp", "gradient"]
    assert sampler.returns(None)[0] == [5, 8, 13]


def test_linear_baseline_predicts_before_it_learns():
    mdp, policy = small_mdp()
    base = LinearFeatureBaseline()
    batch = mdp.rollout(policy, 50)
    targets = discounted_reward_to_go(batch.rewards, batch.mask, 0.9)
    assert torch.all(base.predict(batch) == 0)
    base.update(batch, targets)
    resid = ((base.predict(batch) - targets) ** 2).mean()
    assert resid < (targets**2).mean() * 0.5  # it explains most of the reward-to-go
    # the sampler's weights use the prediction made *before* refitting on the same batch
    sampler = PolicyGradientSampler(policy, mdp.rollout, batch_size=5, discount=0.9, baseline=base)
    b2 = mdp.rollout(policy, 5)
    before = base.predict(b2)
    w = sampler.weights(b2)
    torch.testing.assert_close(w, discounted_reward_to_go(b2.rewards, b2.mask, 0.9) - before)
    with pytest.raises(ValueError, match="reg"):
        LinearFeatureBaseline(reg=0)
