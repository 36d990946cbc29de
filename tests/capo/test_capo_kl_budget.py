"""The KL budget: a whole-model trust region on the step (curvopt.capo.whole_model, CAPOLoss)."""

import copy
import math

import pytest
import torch

from curvopt.capo.masker import CAPOLoss
from curvopt.capo.sequence_policy import GRUPolicy
from curvopt.capo.token_losses import grpo_loss
from curvopt.capo.whole_model import budget_scale, fit_kl_budget, trial_step

V, H, B, L = 12, 8, 6, 5


def _setup(seed, make_opt):
    torch.manual_seed(seed)
    policy = GRUPolicy(V, H).double()
    tokens = torch.randint(0, V, (B, L))
    adv = torch.randn(B, dtype=torch.float64)
    opt = make_opt(policy.parameters())
    return policy, tokens, adv, opt


def _backward(policy, tokens, adv):
    logp = torch.log_softmax(policy(tokens[:, :-1]), -1)
    logp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    mask = torch.ones_like(logp, dtype=torch.bool)
    grpo_loss(logp, logp.detach(), adv, mask).backward()


def _twin(policy, opt, make_opt):
    """An independent copy of the policy (with its gradients) and of the optimizer's state."""
    twin = copy.deepcopy(policy)
    for a, b in zip(policy.parameters(), twin.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()
    twin_opt = make_opt(twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


def _realized_kl(policy, old_logp, tokens):
    with torch.no_grad():
        new = torch.log_softmax(policy(tokens[:, :-1]), -1)
    return float((old_logp.exp() * (old_logp - new)).sum(-1).mean())


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=3.0, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.3, weight_decay=0.1),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.3, amsgrad=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trial_step_is_the_real_step_and_changes_nothing(name):
    policy, tokens, adv, opt = _setup(0, OPTIMIZERS[name])
    for _ in range(2):  # some optimizer state first
        opt.zero_grad()
        _backward(policy, tokens, adv)
        opt.step()
    opt.zero_grad()
    _backward(policy, tokens, adv)
    params = list(policy.parameters())
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    step = trial_step(opt, params)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    after = opt.state_dict()
    for k, s in state["state"].items():
        for key, v in s.items():
            assert torch.equal(after["state"][k][key], v)
    opt.step()  # the real step, from the restored state, is the trial step
    for s, p, b in zip(step, params, before):
        assert torch.equal(s, p.detach() - b)
    assert any(float(s.abs().max()) > 0 for s in step)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_capo_loss_kl_budget_realizes_the_budget(name):
    budget = 1e-4
    policy, tokens, adv, opt = _setup(1, OPTIMIZERS[name])
    capo = CAPOLoss(grpo_loss, policy.head, opt, tau_h=math.inf, tau_f=math.inf, kl_budget=budget)
    _backward(policy, tokens, adv)
    with torch.no_grad():
        old = torch.log_softmax(policy(tokens[:, :-1]), -1)
    lrs = [g["lr"] for g in opt.param_groups]
    unscaled = _twin(policy, opt, OPTIMIZERS[name])
    out = capo.fit_kl_budget(policy, tokens[:, :-1])
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == lrs  # restored after the step
    unscaled[1].step()
    big = _realized_kl(unscaled[0], old, tokens)
    assert big > 20 * budget and out["scale"] < 0.3  # the budget binds
    assert out["kl"] > 20 * budget  # (second order: not accurate for the unscaled step)
    assert _realized_kl(policy, old, tokens) == pytest.approx(budget, rel=0.05)


def test_a_budget_that_does_not_bind_changes_nothing():
    policy, tokens, adv, opt = _setup(2, OPTIMIZERS["adamw"])
    _backward(policy, tokens, adv)
    twin, twin_opt = _twin(policy, opt, OPTIMIZERS["adamw"])
    out = fit_kl_budget(policy, opt, 1e6, tokens[:, :-1])
    assert out["scale"] == 1.0
    opt.step()
    twin_opt.step()
    for a, b in zip(policy.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_budget_scale():
    assert budget_scale(4e-2, 1e-2) == 0.5
    assert budget_scale(1e-3, 1e-2) == 1.0
    assert budget_scale(0.0, 1e-2) == 1.0


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1.0, ValueError), (0.0, ValueError), (math.nan, ValueError), (math.inf, ValueError)]
    + [("1e-3", TypeError), (True, TypeError)],
)
def test_bad_budgets_are_refused(value, error):
    policy = GRUPolicy(V, H)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    with pytest.raises(error, match="kl_budget must be"):
        CAPOLoss(grpo_loss, policy.head, opt, tau_h=1.0, tau_f=1.0, kl_budget=value)


def test_fit_without_budget_or_optimizer_is_refused():
    policy = GRUPolicy(V, H)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    capo = CAPOLoss(grpo_loss, policy.head, None, tau_h=1.0, tau_f=1.0)
    with pytest.raises(ValueError, match="no kl_budget"):
        capo.fit_kl_budget(policy, tokens)
    capo = CAPOLoss(grpo_loss, policy.head, None, tau_h=1.0, tau_f=1.0, kl_budget=1e-3)
    with pytest.raises(ValueError, match="needs the optimizer"):
        capo.fit_kl_budget(policy, tokens)
