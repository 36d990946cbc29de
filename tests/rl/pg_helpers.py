"""Dense float64 references for the policy-gradient tests (independent of the surrogates)."""

import torch
from torch.autograd.functional import hessian as _hessian
from torch.autograd.functional import jacobian as _jacobian
from torch.func import functional_call

from curvopt.rl import TabularMDP, TabularSoftmaxPolicy
from curvopt.utils.params import flatten, unflatten


# Dense derivatives through torch.autograd.functional (plain autograd loops; torch.func's first call
# imports the compiler stack, which costs seconds on a loaded machine).
def jacrev(fn):
    return lambda x: _jacobian(fn, x)


def hessian(fn):
    return lambda x: _hessian(fn, x)


def grad(fn):
    return lambda x: _jacobian(fn, x)


def flat_params(module):
    return flatten([p.detach() for p in module.parameters()]).clone()


def log_prob_fn(policy, obs, actions):
    """θ -> log π_θ(actions|obs) through functional_call (no autograd on the live parameters)."""
    names = [n for n, _ in policy.named_parameters()]
    like = [p for _, p in policy.named_parameters()]

    def fn(theta):
        return functional_call(policy, dict(zip(names, unflatten(theta, like))), (obs, actions))

    return fn


def small_mdp(seed=0, n_states=3, n_actions=2, horizon=4, discount=0.9):
    mdp = TabularMDP.random(n_states, n_actions, horizon, discount, seed=seed)
    torch.manual_seed(seed)
    policy = TabularSoftmaxPolicy(n_states, n_actions, init_scale=0.7).double()
    return mdp, policy


def exact_return_fn(mdp, policy):
    """θ -> J(θ) for a TabularSoftmaxPolicy (the table is its only parameter)."""

    def j(theta):
        return mdp.expected_return(torch.softmax(theta.reshape(policy.logits.shape), dim=-1))

    return j


def dense_fisher(policy, obs, mask, n_actions):
    """F = mean over real states of Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)^T, (explicit Jacobians)."""
    states = obs[mask.bool()]
    theta = flat_params(policy)
    jacs, probs = [], []
    for a in range(n_actions):
        acts = torch.full(states.shape[:1], a, dtype=torch.long)
        fn = log_prob_fn(policy, states, acts)
        jacs.append(jacrev(fn)(theta))
        probs.append(fn(theta).exp().detach())
    jac = torch.stack(jacs, 1)  # (n, A, d)
    pi = torch.stack(probs, 1)  # (n, A)
    return torch.einsum("na,nai,naj->ij", pi, jac, jac) / states.shape[0]
