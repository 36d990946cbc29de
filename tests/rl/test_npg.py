"""NPG: Fisher-vector products and CG against dense float64 Fisher solves; the KL trust region."""

import pytest
import torch
from pg_helpers import dense_fisher, flat_params, hessian, jacrev, log_prob_fn
from test_pg_estimators import random_batch

import curvopt.mfac
from curvopt.optim import NPG
from curvopt.optim.linear_solve import fixed_iteration_cg
from curvopt.rl import (
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    GymRollout,
    PolicyGradientSampler,
    discounted_reward_to_go,
    fisher_vector_product,
    old_distribution,
    policy_gradient,
)
from curvopt.utils.params import unflatten


class FixedBatchSampler(PolicyGradientSampler):
    """Always returns the same batch, so the optimizer's step can be compared with a dense solve."""

    def __init__(self, policy, batch, discount=0.9):
        super().__init__(
            policy, lambda pi, n: batch, batch_size=batch.num_trajectories, discount=discount
        )


def setup_policy_and_batch(seed=0):
    torch.manual_seed(seed)
    policy = CategoricalMLPPolicy(3, 3, hidden=(6,)).double()
    batch = random_batch(n=6, h=7, seed=seed)
    return policy, batch


def test_fisher_vector_product_equals_dense_fisher():
    policy, batch = setup_policy_and_batch()
    params = list(policy.parameters())
    fisher = dense_fisher(policy, batch.obs, batch.mask, 3)
    old = old_distribution(policy, batch)
    v = torch.randn(fisher.shape[0], dtype=torch.float64)
    got = fisher_vector_product(policy, params, batch, old, v)
    torch.testing.assert_close(got, fisher @ v, rtol=1e-9, atol=1e-12)


def test_gaussian_policy_log_prob_kl_and_fisher():
    torch.manual_seed(1)
    policy = GaussianMLPPolicy(3, 2, hidden=(4,), log_std_init=-0.3).double()
    obs = torch.randn(5, 3, dtype=torch.float64)
    actions = torch.randn(5, 2, dtype=torch.float64)
    mean, log_std = policy.distribution_params(obs)
    ref = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(policy.log_prob(obs, actions), ref.log_prob(actions).sum(-1))
    old = tuple(t.detach() for t in policy.distribution_params(obs))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mean2, log_std2 = policy.distribution_params(obs)
    new = torch.distributions.Normal(mean2, log_std2.exp())
    old_d = torch.distributions.Normal(old[0], old[1].exp())
    want = torch.distributions.kl_divergence(old_d, new).sum(-1)
    torch.testing.assert_close(policy.kl_from(obs, old), want)
    # Fisher-vector product = dense Hessian of the mean KL at θ_old (dense Hessian)
    from curvopt.rl import Batch

    batch = Batch(
        obs[:, None],
        actions[:, None],
        torch.zeros(5, 1, dtype=torch.float64),
        torch.ones(5, 1, dtype=torch.float64),
    )
    old = old_distribution(policy, batch)
    names = [n for n, _ in policy.named_parameters()]
    like = list(policy.parameters())

    def kl_of(theta):
        vals = dict(zip(names, unflatten(theta, like)))
        mu = torch.func.functional_call(
            policy.mean_net,
            {k[9:]: v for k, v in vals.items() if k.startswith("mean_net.")},
            (obs,),
        )
        ls = vals["log_std"].expand_as(mu)
        p = torch.distributions.Normal(old[0][:, 0], old[1][:, 0].exp())
        q = torch.distributions.Normal(mu, ls.exp())
        return torch.distributions.kl_divergence(p, q).sum(-1).mean()

    theta = flat_params(policy)
    v = torch.randn(theta.numel(), dtype=torch.float64)
    dense = hessian(kl_of)(theta)
    got = fisher_vector_product(policy, like, batch, old, v)
    torch.testing.assert_close(got, dense @ v, rtol=1e-9, atol=1e-12)


def test_conjugate_gradient_equals_dense_solve():
    policy, batch = setup_policy_and_batch(seed=2)
    params = list(policy.parameters())
    fisher = dense_fisher(policy, batch.obs, batch.mask, 3)
    old = old_distribution(policy, batch)
    g = policy_gradient(
        policy, params, batch, discounted_reward_to_go(batch.rewards, batch.mask, 0.9)
    )
    damping = 0.05
    x = fixed_iteration_cg(
        lambda v: fisher_vector_product(policy, params, batch, old, v) + damping * v,
        g,
        max_iter=3 * g.numel(),
        tol=1e-30,
    )
    want = torch.linalg.solve(fisher + damping * torch.eye(g.numel(), dtype=torch.float64), g)
    torch.testing.assert_close(x, want, rtol=1e-7, atol=1e-10)
    # a few iterations already reduce the residual (CG is a descent method in the A-norm)
    a = fisher + damping * torch.eye(g.numel(), dtype=torch.float64)
    x3 = fixed_iteration_cg(lambda v: a @ v, g, max_iter=3)
    assert (a @ x3 - g).norm() < g.norm()


def test_npg_step_equals_dense_trust_region_step(delta=1e-2):
    policy, batch = setup_policy_and_batch(seed=3)
    theta = flat_params(policy)
    fisher = dense_fisher(policy, batch.obs, batch.mask, 3)
    w = discounted_reward_to_go(batch.rewards, batch.mask, 0.9)
    g = policy_gradient(policy, list(policy.parameters()), batch, w)
    damping = 0.1
    x = torch.linalg.solve(fisher + damping * torch.eye(g.numel(), dtype=torch.float64), g)
    beta = (2 * delta / (x @ fisher @ x)).sqrt()
    opt = NPG(policy.parameters(), delta=delta, damping=damping, cg_iters=60, cg_tol=1e-30)
    step = opt.step(FixedBatchSampler(policy, batch))
    torch.testing.assert_close(step, beta * x, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(flat_params(policy), theta + beta * x, rtol=1e-6, atol=1e-10)
    assert float(opt.last_step["predicted_kl"]) == pytest.approx(delta, rel=1e-9)


def test_predicted_kl_matches_realized_kl_for_small_delta():
    torch.manual_seed(0)
    policy = CategoricalMLPPolicy(4, 2, hidden=(16,)).double()
    sampler = PolicyGradientSampler(policy, GymRollout("CartPole-v1", 60, seed=0), batch_size=6)
    for delta, rel in ((1e-5, 0.03), (1e-3, 0.3)):
        opt = NPG(policy.parameters(), delta=delta)
        for _ in range(2):
            opt.step(sampler)
            realized = float(opt.last_step["realized_kl"])
            assert realized == pytest.approx(delta, rel=rel)


def test_backtracking_keeps_realized_kl_within_tolerance():
    torch.manual_seed(1)
    policy = CategoricalMLPPolicy(4, 2, hidden=(16,)).double()
    batch = GymRollout("CartPole-v1", 60, seed=1)(policy, 6)
    theta = flat_params(policy)
    delta, tol = 2.0, 0.5  # far outside the quadratic regime: the full step overshoots tol·δ
    plain = NPG(policy.parameters(), delta=delta)
    plain.step(FixedBatchSampler(policy, batch))
    assert float(plain.last_step["realized_kl"]) > tol * delta
    with torch.no_grad():
        for p, v in zip(policy.parameters(), unflatten(theta, list(policy.parameters()))):
            p.copy_(v)
    opt = NPG(
        policy.parameters(),
        delta=delta,
        backtrack=True,
        kl_tolerance=tol,
        require_improvement=False,
    )
    step = opt.step(FixedBatchSampler(policy, batch))
    frac = float(opt.last_step["step_fraction"])
    assert float(opt.last_step["realized_kl"]) <= tol * delta
    assert frac < 1.0 and frac in [0.5**j for j in range(10)]
    torch.testing.assert_close(flat_params(policy), theta + step)

    # the FIRST fraction within tol·δ is taken: the one before it (twice as long) overshoots
    def log_probs_at(x):  # log π_x(·|s) at the batch states
        with torch.no_grad():
            for p, v in zip(policy.parameters(), unflatten(x, list(policy.parameters()))):
                p.copy_(v)
            logp = torch.log_softmax(policy.distribution_params(batch.obs), -1)
        return logp

    old, longer = log_probs_at(theta), log_probs_at(theta + 2 * step)
    kl = (old.exp() * (old - longer)).sum(-1)
    kl = float((kl * batch.mask).sum() / batch.mask.sum())
    assert kl > tol * delta


@pytest.mark.skipif(not hasattr(curvopt.mfac, "StaticMFAC"), reason="needs curvopt.mfac.StaticMFAC")
def test_npg_mfac_step_equals_dense_woodbury_solve():
    policy, batch = setup_policy_and_batch(seed=4)
    theta = flat_params(policy)
    params = list(policy.parameters())
    w = discounted_reward_to_go(batch.rewards, batch.mask, 0.9)
    g = policy_gradient(policy, params, batch, w)
    logp = log_prob_fn(policy, batch.obs, batch.actions)
    scores = jacrev(lambda th: (logp(th) * batch.mask).sum(1))(theta)  # (N, d)
    scores = scores / batch.lengths().mean().sqrt()
    damp = 0.1
    m, d = scores.shape
    mat = damp * torch.eye(d, dtype=torch.float64) + scores.T @ scores / m
    x = torch.linalg.solve(mat, g)
    fisher = dense_fisher(policy, batch.obs, batch.mask, 3)
    beta = (2 * 0.01 / (x @ fisher @ x)).sqrt()
    opt = NPG(policy.parameters(), delta=0.01, damping=damp, solver="mfac")
    step = opt.step(FixedBatchSampler(policy, batch))
    torch.testing.assert_close(step, beta * x, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(flat_params(policy), theta + beta * x, rtol=1e-5, atol=1e-8)


def test_npg_state_dict_round_trip():
    policy, batch = setup_policy_and_batch(seed=5)
    opt = NPG(policy.parameters(), delta=0.02, backtrack=True)
    opt.step(FixedBatchSampler(policy, batch))
    state = opt.state_dict()
    opt2 = NPG(policy.parameters(), delta=0.5)
    opt2.load_state_dict(state)
    assert opt2.state_dict()["param_groups"] == state["param_groups"]
    assert opt2.param_groups[0]["delta"] == 0.02
    assert all(s["step"] == 1 for s in opt2.state_dict()["state"].values())


@pytest.mark.parametrize("scale", [1e-6, 1e-9])
def test_npg_step_does_not_depend_on_the_reward_scale(scale):
    """The trust-region step is invariant to scaling the rewards; CG's tolerance is relative to
    ‖g‖² (an absolute one stopped CG before its first iteration when ‖g‖² < cg_tol: step 0)."""
    import copy
    import dataclasses

    policy, batch = setup_policy_and_batch(seed=4)
    small = dataclasses.replace(batch, rewards=batch.rewards * scale)
    steps = []
    for b in (batch, small):
        pi = copy.deepcopy(policy)
        steps.append(NPG(pi.parameters(), delta=1e-2).step(FixedBatchSampler(pi, b)))
    g = policy_gradient(
        policy,
        list(policy.parameters()),
        small,
        discounted_reward_to_go(small.rewards, small.mask, 0.9),
    )
    assert float(g @ g) < 1e-10  # the regime where an absolute tolerance gave a zero step
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-6, atol=1e-12)
    assert steps[0].norm() > 0
    x1 = fixed_iteration_cg(lambda v: 3.0 * v + v.flip(0), g, max_iter=4)
    x2 = fixed_iteration_cg(lambda v: 3.0 * v + v.flip(0), g / scale, max_iter=4)
    torch.testing.assert_close(x1 / scale, x2, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="cg_tol"):
        NPG(policy.parameters(), cg_tol=1.0)
