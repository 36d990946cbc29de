"""The GPOMDP gradient and the policy-Hessian-vector estimator against exact derivatives."""

import pytest
import torch
from pg_helpers import exact_return_fn, flat_params, grad, hessian, jacrev, log_prob_fn, small_mdp

from curvopt.rl import (
    Batch,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    LinearFeatureBaseline,
    PolicyGradientSampler,
    discounted_reward_to_go,
    policy_gradient,
    policy_hvp,
    trajectory_scores,
    trajectory_terms,
)
from curvopt.utils.params import flatten, unflatten


def random_batch(n=5, h=6, obs_dim=3, n_actions=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, h + 1, (n,), generator=g)
    mask = (torch.arange(h)[None, :] < lengths[:, None]).double()
    return Batch(
        obs=torch.randn(n, h, obs_dim, generator=g, dtype=torch.float64),
        actions=torch.randint(0, n_actions, (n, h), generator=g),
        rewards=torch.rand(n, h, generator=g, dtype=torch.float64) * mask,
        mask=mask,
    )


def test_discounted_reward_to_go_matches_loop():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(3, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.float64)
    mask[1, 4:] = 0
    out = discounted_reward_to_go(r, mask, 0.8)
    for i in range(3):
        for t in range(7):
            want = sum(0.8**h * r[i, h] * mask[i, h] for h in range(t, 7)) * mask[i, t]
            assert torch.isclose(out[i, t], torch.as_tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="discount"):
        discounted_reward_to_go(r, mask, 0.0)


def test_gradient_and_hvp_equal_dense_per_trajectory_formula():
    """B v = mean_i [∇Φ_i ⟨∇L_i, v⟩ + ∇²Φ_i v], each term from explicit jacobians/Hessians."""
    torch.manual_seed(0)
    policy = CategoricalMLPPolicy(3, 3, hidden=(5,)).double()
    params = list(policy.parameters())
    batch = random_batch()
    w = discounted_reward_to_go(batch.rewards, batch.mask, 0.9)
    theta = flat_params(policy)
    logp = log_prob_fn(policy, batch.obs, batch.actions)

    def phi(th):
        return (w * logp(th) * batch.mask).sum(1)

    def loglik(th):
        return (logp(th) * batch.mask).sum(1)

    v = torch.randn(theta.numel(), dtype=torch.float64)
    g_i, s_i = jacrev(phi)(theta), jacrev(loglik)(theta)
    # mean_i ∇²Φ_i v is linear in i, so one dense Hessian of the mean suffices for that part;
    # the first term must be formed per trajectory
    hess_mean = hessian(lambda th: phi(th).mean())(theta)
    want = (g_i * (s_i @ v)[:, None]).mean(0) + hess_mean @ v

    got, grad = policy_hvp(policy, params, batch, w, v, return_gradient=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, g_i.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(policy_gradient(policy, params, batch, w), g_i.mean(0))
    torch.testing.assert_close(trajectory_scores(policy, params, batch), s_i)


def _z_scores(samples, exact):
    s = torch.stack(samples)
    se = s.std(0) / len(samples) ** 0.5
    return (s.mean(0) - exact) / se


def _hess_phi_v(sampler, batch, w, v):
    """The ∇²Φ̄ v part alone (to build a wrong-sign estimator that the test must reject)."""
    phi, _ = trajectory_terms(sampler.policy, batch, w)
    params = sampler.params
    grads = torch.autograd.grad(phi.mean(), params, create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(grads, unflatten(v, params)))
    return flatten(torch.autograd.grad(dot, params))


@pytest.mark.parametrize("baseline", [None, "linear"])
def test_estimators_unbiased_on_tabular_mdp(baseline):
    mdp, policy = small_mdp(seed=3)
    sampler = PolicyGradientSampler(
        policy,
        mdp.rollout,
        batch_size=40,
        discount=mdp.discount,
        baseline=LinearFeatureBaseline() if baseline else None,
    )
    theta = flat_params(policy)
    j = exact_return_fn(mdp, policy)
    exact_grad = grad(j)(theta)
    exact_hess = hessian(j)(theta)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact_hv = exact_hess @ v

    grads, hvps, wrong = [], [], []
    for _ in range(150):
        grads.append(sampler.gradient())
        batch = sampler.sample(kind="hvp")
        w = sampler.weights(batch)
        bv = policy_hvp(policy, sampler.params, batch, w, v)
        hvps.append(bv)
        wrong.append(bv - 2 * _hess_phi_v(sampler, batch, w, v))  # g⟨S,v⟩ − ∇²Φ v
    assert _z_scores(grads, exact_grad).abs().max() < 4.5
    assert _z_scores(hvps, exact_hv).abs().max() < 4.5
    if baseline is None:
        # the same test has the power to catch a sign error in the Hessian term (with a good
        # baseline E[∇²Φ] is near zero for a tabular softmax, so the sign is not identifiable there)
        assert _z_scores(wrong, exact_hv).abs().max() > 8


def test_hvp_at_random_segment_point_estimates_gradient_difference():
    """E_q E_τ̂[B(τ̂, θ̂) (θ1 − θ0)] = ∇J(θ1) − ∇J(θ0) for θ̂ = θ0 + q (θ1 − θ0), q ~ U[0, 1]."""
    mdp, policy = small_mdp(seed=4)
    sampler = PolicyGradientSampler(policy, mdp.rollout, batch_size=40, discount=mdp.discount)
    j = exact_return_fn(mdp, policy)
    g = torch.Generator().manual_seed(0)
    theta0 = flat_params(policy)
    theta1 = theta0 + 0.8 * torch.randn(theta0.numel(), generator=g, dtype=torch.float64)
    exact = grad(j)(theta1) - grad(j)(theta0)
    samples = []
    for _ in range(200):
        q = torch.rand((), generator=g, dtype=torch.float64)
        with torch.no_grad():
            policy.logits.copy_((theta0 + q * (theta1 - theta0)).reshape(policy.logits.shape))
        samples.append(sampler.hvp(theta1 - theta0))
    assert _z_scores(samples, exact).abs().max() < 4.5
    assert sampler.num_trajectories == 200 * 40


def test_estimators_unbiased_for_gaussian_policy_on_a_quadratic_bandit():
    """One step, obs 1, a ~ N(w + b, σ²), r = −(a − c)²: J = −((w + b − c)² + σ²) exactly."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(1, 1, hidden=(), log_std_init=-0.5).double()
    c = 0.7
    gen = torch.Generator().manual_seed(1)

    def bandit(pi, n):
        obs = torch.ones(n, 1, 1, dtype=torch.float64)
        actions = pi.sample(obs, generator=gen)
        rewards = -((actions[..., 0] - c) ** 2)
        return Batch(obs, actions, rewards, torch.ones(n, 1, dtype=torch.float64))

    def exact(theta):  # parameters in order: weight, bias, log_std
        w, b, log_std = theta[0], theta[1], theta[2]
        return -((w + b - c) ** 2 + torch.exp(2 * log_std))

    names = [n for n, _ in policy.named_parameters()]
    assert names == ["log_std", "mean_net.0.weight", "mean_net.0.bias"]
    theta = flat_params(policy)  # (log_std, w, b)
    reordered = torch.stack([theta[1], theta[2], theta[0]])
    perm = [2, 0, 1]  # back to the policy's order

    sampler = PolicyGradientSampler(policy, bandit, batch_size=50, discount=1.0)
    v = torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64)
    exact_grad = grad(exact)(reordered)[perm]
    exact_hess = hessian(exact)(reordered)[perm][:, perm]
    grads = [sampler.gradient() for _ in range(200)]
    hvps = [sampler.hvp(v) for _ in range(200)]
    assert _z_scores(grads, exact_grad).abs().max() < 4.5
    assert _z_scores(hvps, exact_hess @ v).abs().max() < 4.5
