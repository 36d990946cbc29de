"""Slow end-to-end checks: the optimizers learn CartPole-v1 (H = 100) from a fixed seed."""

import pytest
import torch

from curvopt.optim import NHARPG, NPG, NPGIGT
from curvopt.rl import (
    CategoricalMLPPolicy,
    GymRollout,
    LinearFeatureBaseline,
    PolicyGradientSampler,
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, iterations",
    [
        (lambda ps: NHARPG(ps, lr=0.3, generator=torch.Generator().manual_seed(0)), 40),
        (lambda ps: NPGIGT(ps, lr=0.3), 60),
        (lambda ps: NPG(ps, delta=0.02), 25),
        (lambda ps: NPG(ps, delta=0.02, solver="mfac", damping=0.1), 25),
    ],
    ids=["nharpg", "npgigt", "npg-cg", "npg-mfac"],
)
def test_learns_cartpole(make, iterations):
    torch.manual_seed(0)
    policy = CategoricalMLPPolicy(4, 2, hidden=(32, 32))
    sampler = PolicyGradientSampler(
        policy, GymRollout("CartPole-v1", 100, seed=0), 10, baseline=LinearFeatureBaseline()
    )
    opt = make(policy.parameters())
    start = GymRollout("CartPole-v1", 100, seed=99)(policy, 20).total_rewards().mean()
    for _ in range(iterations):
        opt.step(sampler)
    end = GymRollout("CartPole-v1", 100, seed=99)(policy, 20).total_rewards().mean()
    assert start < 30 and end > 60, (float(start), float(end))
