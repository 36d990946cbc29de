"""NHARPG / HARPG / NPGIGT: schedules, query points, recursions, normalization, state, errors."""

import copy
import math

import pytest
import torch
from pg_helpers import exact_return_fn, flat_params, small_mdp
from torch import nn

from curvopt.optim import HARPG, NHARPG, NPG, NPGIGT
from curvopt.optim.pg_common import power_schedule
from curvopt.rl import PolicyGradientSampler


class ScriptedSampler:
    """Deterministic 'estimates' g(θ) = A θ + b and B v = C v; records where it was queried."""

    def __init__(self, module, seed=0):
        self.module = module
        d = sum(p.numel() for p in module.parameters())
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.C = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.grad_points, self.hvp_points, self.hvp_vectors = [], [], []

    def gradient(self, params):
        theta = flat_params(self.module)
        self.grad_points.append(theta)
        return self.A @ theta + self.b

    def hvp(self, vector, params):
        self.hvp_points.append(flat_params(self.module))
        self.hvp_vectors.append(vector.clone())
        return self.C @ vector


class PointDependentSampler(ScriptedSampler):
    """ScriptedSampler whose 'Hessian' depends on the query point: B(θ) v = C v + (θ·θ) v, so
    NHARPG's random point q on the segment (drawn from its generator) changes the direction."""

    def hvp(self, vector, params):
        theta = flat_params(self.module)
        super().hvp(vector, params)
        return self.C @ vector + (theta @ theta) * vector


def make_module():
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def test_power_schedule_defaults_match_paper():
    assert [power_schedule(1.0, 1.0, t) for t in range(3)] == [1.0, 2 / 3, 0.5]
    opt = NHARPG(make_module().parameters(), lr=0.3)
    group = opt.param_groups[0]
    assert opt.momentum_weight(group, 4) == pytest.approx(2 / 6)
    assert opt.step_size(group, 4) == pytest.approx(0.3 * 2 / 6)
    igt = NPGIGT(make_module().parameters(), lr=0.3)
    assert igt.momentum_weight(igt.param_groups[0], 3) == pytest.approx((2 / 5) ** 0.8)
    harpg = HARPG(make_module().parameters(), lr=0.3)
    assert harpg.step_size(harpg.param_groups[0], 2) == pytest.approx(0.3 * math.sqrt(0.5))


@pytest.mark.parametrize("normalize", [True, False])
def test_nharpg_recursion_segment_point_and_step(normalize):
    module = make_module()
    sampler = ScriptedSampler(module)
    opt = NHARPG(
        module.parameters(), lr=0.2, normalize=normalize, generator=torch.Generator().manual_seed(3)
    )
    thetas, d_prev = [flat_params(module)], None
    for t in range(4):
        d = opt.step(sampler)
        thetas.append(flat_params(module))
        th, eta, gamma = thetas[t], 2 / (t + 2), 0.2 * 2 / (t + 2)
        g = sampler.A @ th + sampler.b
        torch.testing.assert_close(sampler.grad_points[t], th)
        if t == 0:
            want = g  # η_0 = 1: d_0 = g_0 and no Hessian batch
            assert sampler.hvp_points == []
        else:
            diff = th - thetas[t - 1]
            torch.testing.assert_close(sampler.hvp_vectors[t - 1], diff)
            # θ̂ = θ_{t-1} + q (θ_t − θ_{t-1}) with q in [0, 1]
            offset = sampler.hvp_points[t - 1] - thetas[t - 1]
            q = (offset @ diff) / (diff @ diff)
            assert 0.0 <= q <= 1.0
            torch.testing.assert_close(offset, q * diff)
            want = (1 - eta) * (d_prev + sampler.C @ diff) + eta * g
        torch.testing.assert_close(d, want)
        step = want / want.norm() if normalize else want
        torch.testing.assert_close(thetas[t + 1], th + gamma * step)
        d_prev = want
    # normalized: every step has length γ_t exactly
    if normalize:
        for t in range(4):
            assert (thetas[t + 1] - thetas[t]).norm() == pytest.approx(0.2 * 2 / (t + 2))


def test_segment_point_is_uniform():
    module = make_module()
    sampler = ScriptedSampler(module)
    opt = NHARPG(module.parameters(), lr=0.1, generator=torch.Generator().manual_seed(0))
    qs, prev = [], flat_params(module)
    for _ in range(400):
        before = flat_params(module)
        opt.step(sampler)
        if sampler.hvp_points:
            diff = before - prev
            qs.append(float((sampler.hvp_points[-1] - prev) @ diff / (diff @ diff)))
        prev = before
    qs = torch.tensor(qs)
    assert abs(qs.mean() - 0.5) < 4 * (1 / 12) ** 0.5 / len(qs) ** 0.5
    assert qs.min() >= 0 and qs.max() <= 1 and qs.min() < 0.05 and qs.max() > 0.95


def test_npgigt_extrapolation_point_and_recursion():
    module = make_module()
    sampler = ScriptedSampler(module)
    opt = NPGIGT(module.parameters(), lr=0.2)
    thetas, d_prev = [flat_params(module)], None
    for t in range(4):
        d = opt.step(sampler)
        thetas.append(flat_params(module))
        eta = (2 / (t + 2)) ** 0.8
        th = thetas[t]
        prev = thetas[t - 1] if t > 0 else th
        tilde = th + (1 - eta) / eta * (th - prev)
        torch.testing.assert_close(sampler.grad_points[t], tilde)
        g = sampler.A @ tilde + sampler.b
        want = g if t == 0 else (1 - eta) * d_prev + eta * g
        torch.testing.assert_close(d, want)
        torch.testing.assert_close(thetas[t + 1], th + 0.2 * 2 / (t + 2) * want / want.norm())
        d_prev = want
    assert sampler.hvp_points == []


def test_custom_schedules_are_used():
    module = make_module()
    sampler = ScriptedSampler(module)
    opt = NHARPG(
        module.parameters(),
        lr=0.5,
        lr_schedule=lambda t: 1.0 / (t + 1),
        momentum_schedule=lambda t: 0.5,
    )
    th0 = flat_params(module)
    d0 = opt.step(sampler)
    torch.testing.assert_close(d0, sampler.A @ th0 + sampler.b)  # d_0 = g_0 whatever η_0
    assert (flat_params(module) - th0).norm() == pytest.approx(0.5)
    th1 = flat_params(module)
    opt.step(sampler)
    assert len(sampler.hvp_points) == 1  # η_1 = 0.5 < 1: the Hessian correction is used
    assert (flat_params(module) - th1).norm() == pytest.approx(0.25)
    other = make_module()
    bad = NHARPG(other.parameters(), momentum_schedule=lambda t: 1.5)
    with pytest.raises(ValueError, match="η_0"):
        bad.step(ScriptedSampler(other))


def test_param_groups_share_global_norm():
    module = make_module()
    sampler = ScriptedSampler(module)
    opt = NPGIGT([{"params": [module.weight]}, {"params": [module.bias], "lr": 0.05}], lr=0.2)
    th0 = flat_params(module)
    d = opt.step(sampler)
    unit = d / d.norm()
    want = th0 + torch.cat([0.2 * unit[:6], 0.05 * unit[6:]])
    torch.testing.assert_close(flat_params(module), want)


@pytest.mark.parametrize("cls", [NHARPG, NPGIGT, HARPG])
def test_state_dict_round_trip(cls):
    module = make_module()
    other = copy.deepcopy(module)
    opt = cls(module.parameters(), lr=0.1, **({"generator": None} if cls is not NPGIGT else {}))
    sampler = ScriptedSampler(module)
    for _ in range(3):
        opt.step(sampler)
    state = copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        for p, q in zip(other.parameters(), module.parameters()):
            p.copy_(q)
    opt2 = cls(other.parameters(), lr=0.7)
    opt2.load_state_dict(state)
    s2 = opt2.state_dict()
    assert s2["param_groups"] == state["param_groups"]
    for k, st in state["state"].items():
        assert st["step"] == s2["state"][k]["step"] == 3
        for name in ("prev", "momentum"):
            assert torch.equal(st[name], s2["state"][k][name])
    if cls is NPGIGT:  # deterministic: continuing gives identical iterates
        opt.step(sampler)
        opt2.step(ScriptedSampler(other))
        torch.testing.assert_close(flat_params(module), flat_params(other), rtol=0, atol=0)


def test_nharpg_resume_with_generator_is_exact():
    torch.manual_seed(1)
    module = make_module()
    other = copy.deepcopy(module)
    opt = NHARPG(module.parameters(), lr=0.1, generator=torch.Generator().manual_seed(3))
    sampler = PointDependentSampler(module)
    for _ in range(2):
        opt.step(sampler)
    state = copy.deepcopy(opt.state_dict())
    assert "generator_state" in state
    with torch.no_grad():
        for p, q in zip(other.parameters(), module.parameters()):
            p.copy_(q)
    opt2 = NHARPG(other.parameters(), lr=0.1, generator=torch.Generator().manual_seed(99))
    opt2.load_state_dict(state)
    other_sampler = PointDependentSampler(other)
    for _ in range(3):
        opt.step(sampler)
        opt2.step(other_sampler)
    torch.testing.assert_close(flat_params(module), flat_params(other), rtol=0, atol=0)
    # both drew the same points q (a generator left at seed 99 would draw others)
    assert torch.equal(torch.stack(sampler.hvp_points[-3:]), torch.stack(other_sampler.hvp_points))
    with pytest.raises(ValueError, match="generator"):
        NHARPG(make_module().parameters(), lr=0.1).load_state_dict(state)


def test_nharpg_improves_exact_return_on_tabular_mdp():
    mdp, policy = small_mdp(seed=2, n_states=4, n_actions=3, horizon=5)
    j = exact_return_fn(mdp, policy)
    sampler = PolicyGradientSampler(policy, mdp.rollout, batch_size=20, discount=mdp.discount)
    opt = NHARPG(policy.parameters(), lr=1.0, generator=torch.Generator().manual_seed(0))
    start = float(j(flat_params(policy)))
    for _ in range(60):
        opt.step(sampler)
    end = float(j(flat_params(policy)))
    # the best deterministic policy's return bounds J from above
    best = _optimal_return(mdp)
    assert end > start + 0.5 * (best - start)
    assert sampler.num_trajectories == 60 * 20 + 59 * 20


def _optimal_return(mdp):
    """Finite-horizon value iteration: the time-dependent optimum bounds J from above."""
    v = torch.zeros(mdp.rewards.shape[0], dtype=torch.float64)
    for h in reversed(range(mdp.horizon)):
        q = mdp.discount**h * mdp.rewards + torch.einsum("sat,t->sa", mdp.transitions, v)
        v = q.max(1).values
    return float(mdp.initial @ v)


@pytest.mark.parametrize("cls", [NHARPG, NPGIGT, HARPG])
def test_bad_hyperparameters(cls):
    params = list(make_module().parameters())
    for lr in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            cls(params, lr=lr)
    with pytest.raises(ValueError, match="momentum"):
        cls(params, momentum=0.0)
    with pytest.raises(ValueError, match="momentum"):
        cls(params, momentum=1.5)
    with pytest.raises(ValueError, match="lr_power"):
        cls(params, lr_power=-1)
    with pytest.raises(TypeError, match="schedule"):
        cls(params, lr_schedule=3.0)
    with pytest.raises(TypeError, match="sampler"):
        cls(params).step(None)
    with pytest.raises(ValueError, match="empty"):
        cls([], lr=0.1)


def test_bad_npg_and_sampler_inputs():
    params = list(make_module().parameters())
    for delta in (0.0, -0.1):
        with pytest.raises(ValueError, match="delta"):
            NPG(params, delta=delta)
    with pytest.raises(ValueError, match="solver"):
        NPG(params, solver="exact")
    with pytest.raises(ValueError, match="damping"):
        NPG(params, solver="mfac", damping=0.0)
    with pytest.raises(ValueError, match="backtrack_ratio"):
        NPG(params, backtrack_ratio=1.0)
    with pytest.raises(TypeError, match="sampler"):
        NPG(params).step(lambda: 0.0)
    mdp, policy = small_mdp()
    frozen = copy.deepcopy(policy).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        PolicyGradientSampler(frozen, mdp.rollout, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        PolicyGradientSampler(policy, mdp.rollout, batch_size=0)
    with pytest.raises(ValueError, match="discount"):
        PolicyGradientSampler(policy, mdp.rollout, batch_size=2, discount=1.5)
    with pytest.raises(TypeError, match="nn.Module"):
        PolicyGradientSampler(lambda x: x, mdp.rollout, batch_size=2)
