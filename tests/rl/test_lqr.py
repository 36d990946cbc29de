"""The LQR's exact J, ∇J and J* against independent float64 references and Monte-Carlo."""

import numpy as np
import pytest
import torch

from curvopt.rl import LinearGaussianPolicy, LinearQuadraticRegulator, PolicyGradientSampler
from curvopt.rl.lqr_env import ENV_ID
from curvopt.rl.rollout import GymRollout


def _system(seed, n=3, m=2, noise=False):
    lqr = LinearQuadraticRegulator.random(n, m, discount=0.85, spectral_radius=0.9, seed=seed)
    if noise:
        g = np.random.default_rng(seed + 100)
        w = g.standard_normal((n, n)) * 0.3
        lqr = LinearQuadraticRegulator(
            lqr.A, lqr.B, lqr.Q + 0.5 * np.eye(n), 2.0 * lqr.R, lqr.initial_cov, 0.85, w @ w.T
        )
    return lqr


def _stable_gain(lqr, seed, scale=0.1):
    g = np.random.default_rng(seed)
    theta = lqr.optimal_gain() + scale * g.standard_normal((lqr.n_actions, lqr.n_states))
    assert lqr.is_stable(theta)
    return theta


def _brute_force_return(lqr, theta, std, steps=3000):
    """J as the truncated sum Σ_t γ^t E[r_t] with the covariance recursion C_{t+1} = M C Mᵀ + N."""
    m = lqr.A + lqr.B @ theta
    sa = np.diag(np.broadcast_to(std, (lqr.n_actions,)) ** 2)
    noise = lqr.B @ sa @ lqr.B.T + lqr.noise_cov
    qt = lqr.Q + theta.T @ lqr.R @ theta
    c, total = lqr.initial_cov.copy(), 0.0
    for t in range(steps):
        total -= lqr.discount**t * (np.trace(qt @ c) + np.trace(lqr.R @ sa))
        c = m @ c @ m.T + noise
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [False, True])
def test_return_matches_truncated_series(seed, noise):
    lqr = _system(seed, noise=noise)
    theta = _stable_gain(lqr, seed + 10)
    std = np.array([0.3, 0.7])
    assert lqr.expected_return(theta, std) == pytest.approx(
        _brute_force_return(lqr, theta, std), rel=1e-10
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [False, True])
def test_gradient_matches_finite_differences(seed, noise):
    lqr = _system(seed, noise=noise)
    theta = _stable_gain(lqr, seed + 20, scale=0.2)
    grad = lqr.gradient(theta, 0.4)
    fd, h = np.zeros_like(theta), 1e-6
    for idx in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[idx] = h
        fd[idx] = (lqr.expected_return(theta + e, 0.4) - lqr.expected_return(theta - e, 0.4)) / (
            2 * h
        )
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


@pytest.mark.parametrize("seed", [0, 3])
def test_optimal_gain_is_the_maximum(seed):
    lqr = _system(seed, noise=True)
    star = lqr.optimal_gain()
    j_star = lqr.optimal_return(0.5)
    assert np.abs(lqr.gradient(star, 0.5)).max() < 1e-8 * abs(j_star)
    g = np.random.default_rng(seed)
    for _ in range(20):
        other = star + 0.05 * g.standard_normal(star.shape)
        assert lqr.expected_return(other, 0.5) < j_star
    # the Riccati value matrix equals the Lyapunov value matrix of the optimal gain
    p = lqr.value_matrix(star)
    a, b, gam = lqr.A, lqr.B, lqr.discount
    riccati = (
        lqr.Q
        + gam * a.T @ p @ a
        - gam**2 * a.T @ p @ b @ np.linalg.solve(lqr.R + gam * b.T @ p @ b, b.T @ p @ a)
    )
    np.testing.assert_allclose(p, riccati, rtol=1e-9, atol=1e-9)


def _policy(lqr, theta, std):
    policy = LinearGaussianPolicy(lqr.n_states, lqr.n_actions, std).double()
    with torch.no_grad():
        policy.mean_net.weight.copy_(torch.as_tensor(theta))
    return policy


def test_monte_carlo_return_and_gradient():
    lqr = _system(4, noise=True)
    theta = _stable_gain(lqr, 5, scale=0.3)
    policy = _policy(lqr, theta, 0.5)
    sampler = PolicyGradientSampler(policy, lqr.rollout, batch_size=1000, discount=1.0)
    returns, grads = [], []
    for _ in range(16):
        returns.append(sampler.sample().total_rewards())
        grads.append(sampler.gradient())
    returns = torch.cat(returns)
    se = float(returns.std()) / np.sqrt(len(returns))
    assert abs(float(returns.mean()) - lqr.expected_return(theta, 0.5)) < 4 * se
    grads = torch.stack(grads)  # 16 independent batch means of 1000 trajectories each
    mean, se_g = grads.mean(0).numpy(), grads.std(0).numpy() / 4.0
    exact = lqr.gradient(theta, 0.5).reshape(-1)
    assert np.all(np.abs(mean - exact) < 4.5 * se_g), (mean, exact, se_g)
    # and the estimate is informative: the exact gradient is many standard errors away from 0
    assert np.linalg.norm(exact) > 5 * np.linalg.norm(se_g)


def test_gym_environment_samples_the_same_return():
    lqr = _system(6)
    theta = _stable_gain(lqr, 7)
    policy = _policy(lqr, theta, 0.5)
    rollout = GymRollout(ENV_ID, horizon=400, seed=0, make_kwargs={"lqr": lqr})
    returns = rollout(policy, 300).total_rewards()
    rollout.close()
    se = float(returns.std()) / np.sqrt(len(returns))
    assert abs(float(returns.mean()) - lqr.expected_return(theta, 0.5)) < 4 * se


def test_linear_gaussian_log_prob_matches_torch_normal():
    policy = LinearGaussianPolicy(3, 2, action_std=[0.5, 2.0]).double()
    torch.nn.init.normal_(policy.mean_net.weight)
    obs, act = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    ref = torch.distributions.Normal(obs @ policy.mean_net.weight.T, policy.action_std)
    torch.testing.assert_close(policy.log_prob(obs, act), ref.log_prob(act).sum(-1))
    assert [n for n, _ in policy.named_parameters()] == ["mean_net.weight"]


def test_bad_input_is_rejected():
    lqr = _system(0)
    eye = np.eye(3)
    with pytest.raises(ValueError, match="B"):
        LinearQuadraticRegulator(eye, np.ones((2, 2)), eye, np.eye(2), eye, 0.9)
    with pytest.raises(ValueError, match="R must be positive definite"):
        LinearQuadraticRegulator(eye, np.ones((3, 1)), eye, np.zeros((1, 1)), eye, 0.9)
    with pytest.raises(ValueError, match="discount"):
        LinearQuadraticRegulator(eye, np.ones((3, 1)), eye, np.eye(1), eye, 1.0)
    with pytest.raises(ValueError, match="theta"):
        lqr.expected_return(np.zeros((3, 3)), 0.5)
    unstable = np.zeros((2, 3)) + 50.0
    assert lqr.expected_return(unstable, 0.5) == float("-inf")
    with pytest.raises(ValueError, match="unstable"):
        lqr.gradient(unstable, 0.5)
    with pytest.raises(ValueError, match="action_std"):
        LinearGaussianPolicy(2, 1, action_std=0.0)
    with pytest.raises(ValueError, match="action_std"):
        LinearGaussianPolicy(2, 2, action_std=[1.0, 2.0, 3.0])


def test_complex_matrices_are_refused_not_truncated():
    eye = np.eye(2)
    a = np.array([[0.5, 0.1j], [0.0, 0.5]])
    with pytest.raises(TypeError, match="A must be real"):
        LinearQuadraticRegulator(a, np.ones((2, 1)), eye, np.eye(1), eye, 0.9)
    with pytest.raises(TypeError, match="B must be real"):
        LinearQuadraticRegulator(
            eye, torch.ones(2, 1, dtype=torch.complex64), eye, np.eye(1), eye, 0.9
        )
    with pytest.raises(TypeError, match="Q must be real"):
        LinearQuadraticRegulator(eye, np.ones((2, 1)), eye + 0j, np.eye(1), eye, 0.9)


@pytest.mark.parametrize(("a", "stable"), [(1.10, True), (1.15, False)])
def test_stability_is_that_of_sqrt_discount_times_the_closed_loop(a, stable):
    """Scalar x' = a x, γ = 0.81: J = -Σ γ^t a^{2t} is finite iff √γ a < 1 (1.15: γ a < 1)."""
    gamma = 0.81
    one = np.eye(1)
    lqr = LinearQuadraticRegulator(a * one, one, one, one, one, gamma)
    theta = np.zeros((1, 1))
    assert lqr.is_stable(theta) is stable
    std = 1e-3  # the action noise adds -Σ γ^t (R σ² + Q Σ_{s<t} a^{2(t-1-s)} σ²); tiny here
    if stable:
        truth = -1.0 / (1.0 - gamma * a**2)  # geometric series in float64
        assert lqr.expected_return(theta, std) == pytest.approx(truth, rel=1e-3)
    else:
        assert lqr.expected_return(theta, std) == float("-inf")


def test_linear_gaussian_policy_sigma_follows_the_model_dtype():
    """log σ in float64 after .double(), not float32's rounding of it (5e-8 off before)."""
    policy = LinearGaussianPolicy(2, 2, action_std=[0.3, 0.7])
    assert policy.log_std.dtype == torch.get_default_dtype()
    policy = policy.double()
    assert policy.log_std.dtype == torch.float64
    want = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(policy.action_std, want, rtol=1e-15, atol=0)
    torch.testing.assert_close(
        policy.log_std, torch.log(want), rtol=1e-15, atol=0
    )  # also after a round trip through float32
    torch.testing.assert_close(policy.float().double().action_std, want, rtol=1e-15, atol=0)
    loaded = LinearGaussianPolicy(2, 2, action_std=1.0)
    loaded.load_state_dict(LinearGaussianPolicy(2, 2, action_std=2.0).state_dict())
    torch.testing.assert_close(
        loaded.double().action_std, torch.full((2,), 2.0, dtype=torch.float64), rtol=1e-7, atol=0
    )  # a loaded σ is kept (to float32's precision, which is all the state holds)
