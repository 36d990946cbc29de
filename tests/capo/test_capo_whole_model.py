"""Whole-model KL prediction (one JVP) against dense float64 Jacobians and the exact KL."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from curvopt.capo.sequence_policy import GRUPolicy
from curvopt.capo.whole_model import (
    logit_change,
    predict_step_kl,
    token_kl,
    token_kl_attributions,
)
from curvopt.utils.params import flatten, unflatten


def _tiny(seed):
    torch.manual_seed(seed)
    model = GRUPolicy(vocab_size=5, hidden_size=4).double()
    tokens = torch.randint(0, 5, (3, 4))
    return model, tokens


def _logits_of(model, tokens):
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]

    def fn(theta):
        return torch.func.functional_call(
            model, dict(zip(names, unflatten(theta, like))), (tokens,)
        )

    return fn, flatten(like)


def _exact_kl(model, tokens, step):
    with torch.no_grad():
        old = torch.log_softmax(model(tokens), -1)
        fn, theta = _logits_of(model, tokens)
        new = torch.log_softmax(fn(theta + flatten(step)), -1)
    return (old.exp() * (old - new)).sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logit_change_is_the_jacobian_times_the_step(seed):
    model, tokens = _tiny(seed)
    step = [torch.randn_like(p) for p in model.parameters()]
    fn, theta = _logits_of(model, tokens)
    jac = jacobian(fn, theta)  # (B, T, V, d), dense
    z, u = logit_change(model, step, tokens)
    torch.testing.assert_close(z, fn(theta).detach())
    torch.testing.assert_close(u, jac @ flatten(step))


@pytest.mark.parametrize("seed", [0, 1])
def test_predicted_kl_is_the_fisher_quadratic_form_and_matches_small_steps(seed):
    model, tokens = _tiny(seed)
    direction = [torch.randn_like(p) for p in model.parameters()]
    fn, theta = _logits_of(model, tokens)
    jac = jacobian(fn, theta).reshape(-1, 5, theta.numel())
    p = torch.softmax(fn(theta), -1).reshape(-1, 5).detach()
    curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    fisher = torch.einsum("tvi,tvw,twj->ij", jac, curv, jac) / jac.shape[0]
    v = flatten(direction)
    mask = torch.rand(3, 4) > 0.3
    assert float(predict_step_kl(model, direction, tokens)) == pytest.approx(
        float(0.5 * v @ fisher @ v), rel=1e-10
    )
    # second order: predicted / realized -> 1 as the step shrinks, error O(step)
    errors = []
    for scale in (1e-2, 1e-3):
        step = [scale * d for d in direction]
        real = _exact_kl(model, tokens, step)[mask].mean()
        pred = predict_step_kl(model, step, tokens, mask=mask)
        errors.append(abs(float(pred / real) - 1))
    assert errors[1] < 0.2 * errors[0] + 1e-9 and errors[1] < 1e-2


def test_token_kl_matches_the_dense_formula():
    z = torch.randn(7, 6, dtype=torch.float64)
    u = torch.randn(7, 6, dtype=torch.float64)
    p = torch.softmax(z, -1)
    dense = 0.5 * torch.einsum(
        "tv,tvw,tw->t", u, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], u
    )
    torch.testing.assert_close(token_kl(z, u), dense)


@pytest.mark.parametrize("precondition", [False, True])
def test_attributions_sum_to_the_prediction_and_match_per_token_gradients(precondition):
    model, tokens = _tiny(3)
    params = list(model.parameters())
    adv = torch.randn(3, 1, dtype=torch.float64)
    actions = torch.randint(0, 5, (3, 4))
    mask = torch.rand(3, 4) > 0.2

    def objective(logits):  # ℓ_s = A_s log p_s(a_s) / N on the valid tokens
        logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
        return adv * logp * mask / mask.sum()

    d = [torch.rand_like(p) + 0.5 if precondition else torch.ones_like(p) for p in params]
    lr = 0.05
    per_token = []  # explicit per-token gradients, the dense reference
    for b in range(3):
        for t in range(4):
            g = torch.autograd.grad(objective(model(tokens))[b, t], params, allow_unused=True)
            per_token.append(
                flatten([torch.zeros_like(p) if x is None else x for p, x in zip(params, g)])
            )
    grads = torch.stack(per_token)  # (B·T, d)
    dflat = flatten(d)
    step_flat = lr * dflat * grads.sum(0)
    step = unflatten(step_flat, params)
    c, kl = token_kl_attributions(
        model, step, objective, tokens, preconditioner=d if precondition else None, lr=lr, mask=mask
    )
    assert float(c.sum()) == pytest.approx(float(kl), rel=1e-9)
    assert float(kl) == pytest.approx(
        float(predict_step_kl(model, step, tokens, mask=mask)), rel=1e-12
    )
    # c_s = ½ ⟨lr D ∇ℓ_s, F Δθ⟩ with the dense Fisher over the masked tokens
    fn, theta = _logits_of(model, tokens)
    jac = jacobian(fn, theta)[mask]
    p = torch.softmax(fn(theta), -1)[mask].detach()
    curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    fisher = torch.einsum("tvi,tvw,twj->ij", jac, curv, jac) / jac.shape[0]
    ref = 0.5 * (lr * dflat * grads) @ (fisher @ step_flat)
    torch.testing.assert_close(c.reshape(-1), ref)


def test_bad_step_is_rejected():
    net = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        logit_change(net, [torch.zeros(3, 2)], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="same shape"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 4))
