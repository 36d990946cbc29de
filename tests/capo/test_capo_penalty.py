"""CAPO's penalty variants against float64 dense/autograd restatements on a tiny last layer."""

import functools
import math

import pytest
import torch

from curvopt.capo.direction import direction_for
from curvopt.capo.masker import AdamDirection, CAPOLoss, CAPOMasker, SGDDirection
from curvopt.capo.penalty import CAPOPenalty
from curvopt.capo.token_losses import dr_grpo_loss, grpo_loss, reinforce_loss, token_weights

V, H, B, T, K = 7, 5, 3, 4, 4
LR = 0.05


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    valid = torch.rand(B, T, generator=g) < 0.8
    valid[:, 0] = True
    return W, b, hidden, actions, adv, valid


def _trained_optimizer(cls, kw, seed):
    """A real optimizer over a head, after two steps (non-trivial buffers and moments)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V).double()
    opt = cls(head.parameters(), lr=LR, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):
        head.weight.grad = torch.randn(V, H, generator=g, dtype=torch.float64)
        head.bias.grad = torch.randn(V, generator=g, dtype=torch.float64)
        opt.step()
    return head, opt


def _dense_adam_frozen(b1, b2, eps, k, m, v, theta, wd, decoupled):
    """The Adam step of the ascent gradient G written out densely, denominator held constant."""

    def direction(G):
        g = -G if decoupled or wd == 0 else wd * theta - G
        m1 = b1 * m + (1 - b1) * g
        v1 = b2 * v + (1 - b2) * g * g
        denom = (torch.sqrt(v1) / math.sqrt(1 - b2**k) + eps).detach()
        step = m1 / (1 - b1**k) / denom
        return -(step + wd * theta) if decoupled else -step

    return direction


def _setting(name, seed=0):
    """(direction model for the masker, independent dense map G -> Delta, head or None)."""
    if name == "sgd":
        return SGDDirection(), lambda G: G, None
    if name == "adam-own":
        d = AdamDirection(betas=(0.8, 0.95), eps=1e-3)
        g = torch.Generator().manual_seed(seed + 7)
        for _ in range(3):
            d.update(torch.randn(V, H + 1, generator=g, dtype=torch.float64))
        return (
            d,
            _dense_adam_frozen(
                0.8, 0.95, 1e-3, d.step + 1, -d.exp_avg, d.exp_avg_sq, 0.0, 0.0, False
            ),
            None,
        )
    if name == "torch-sgd-nesterov-wd":
        head, opt = _trained_optimizer(
            torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, seed
        )
        theta = torch.cat([head.weight, head.bias[:, None]], 1).detach()
        buf = torch.cat(
            [
                opt.state[head.weight]["momentum_buffer"],
                opt.state[head.bias]["momentum_buffer"][:, None],
            ],
            1,
        )
        mu, wd = 0.9, 0.1
        # nesterov: step = (g + wd theta) + mu * (mu buf + (g + wd theta)), descent; Delta = -step
        return (
            direction_for(opt, head.weight, head.bias),
            lambda G: -((1 + mu) * (wd * theta - G) + mu * mu * buf),
            head,
        )
    cls = {"torch-adam-coupled": torch.optim.Adam, "torch-adamw": torch.optim.AdamW}[name]
    head, opt = _trained_optimizer(cls, {"weight_decay": 0.1, "betas": (0.7, 0.9)}, seed)
    sw, sb = opt.state[head.weight], opt.state[head.bias]
    m = torch.cat([sw["exp_avg"], sb["exp_avg"][:, None]], 1)
    v = torch.cat([sw["exp_avg_sq"], sb["exp_avg_sq"][:, None]], 1)
    theta = torch.cat([head.weight, head.bias[:, None]], 1).detach()
    dense = _dense_adam_frozen(
        0.7, 0.9, 1e-8, float(sw["step"]) + 1, m, v, theta, 0.1, cls is torch.optim.AdamW
    )
    return direction_for(opt, head.weight, head.bias), dense, head


def _dense_penalty(kind, coef, dense_dir, W, b, hidden, actions, adv, weights):
    """lambda * sum_t w_t q_t, one token at a time, with dense V x (H+1) gradients and directions,
    the explicit softmax Jacobian, and the top-K support chosen from detached logits."""
    Waug = torch.cat([W, b[:, None]], 1)
    total = W.new_zeros(())
    for i in range(B):
        for t in range(T):
            if weights[i, t] == 0:
                continue
            h = torch.cat([hidden[i, t], hidden.new_ones(1)])
            a = int(actions[i, t])
            z = Waug @ h
            rows = torch.topk(z.detach(), K).indices.tolist()
            if a not in rows:
                rows[-1] = a
            E = torch.zeros(K, V, dtype=W.dtype)
            E[torch.arange(K), torch.tensor(rows)] = 1.0
            pi = torch.softmax(E @ z, 0)
            s = torch.tensor([float(r == a) for r in rows], dtype=W.dtype) - pi
            G = E.T @ (adv[i] * torch.outer(s, h))
            D = dense_dir(G)
            u = E @ (D @ h)
            su = s @ u
            F = torch.diag(pi) - torch.outer(pi, pi)
            dkl = 0.5 * LR**2 * su**2
            dj = LR * (G * D).sum() + 0.5 * LR**2 * adv[i] * (su**2 - u @ F @ u)
            q = {"delta_kl": dkl, "delta_j": dj, "abs_delta_j": dj.abs()}[kind]
            total = total + weights[i, t] * q
    return coef * total


SETTINGS = ["sgd", "adam-own", "torch-sgd-nesterov-wd", "torch-adam-coupled", "torch-adamw"]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", ["delta_kl", "delta_j", "abs_delta_j"])
def test_penalty_value_and_gradient_match_dense_restatement(setting, kind):
    W, b, hidden, actions, adv, valid = _problem(1)
    direction, dense_dir, _ = _setting(setting)
    masker = CAPOMasker(math.inf, math.inf, top_k=K, direction=direction, chunk_size=5)
    weights = token_weights(grpo_loss, valid.double())
    pen = CAPOPenalty(kind, 0.7)
    leaves = [x.clone().requires_grad_(True) for x in (W, b, hidden)]
    value = pen(masker, leaves[0], leaves[2], actions, adv, LR, weights, bias=leaves[1])
    grads = torch.autograd.grad(value, leaves)
    # the value is the no-grad prediction, averaged with the loss's token weights
    dj, dkl = masker.predict(W, hidden, actions, adv, LR, b, valid)
    q = {"delta_kl": dkl, "delta_j": dj, "abs_delta_j": dj.abs()}[kind]
    assert torch.allclose(value, 0.7 * (weights * q).sum(), rtol=1e-12, atol=0)
    assert value.abs() > 0
    ref_leaves = [x.clone().requires_grad_(True) for x in (W, b, hidden)]
    ref = _dense_penalty(
        kind, 0.7, dense_dir, ref_leaves[0], ref_leaves[1], ref_leaves[2], actions, adv, weights
    )
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert torch.allclose(value, ref, rtol=1e-10, atol=1e-14)
    for ours, theirs in zip(grads, ref_grads):
        assert ours.abs().max() > 0
        assert torch.allclose(ours, theirs, rtol=1e-8, atol=1e-12)
    assert torch.all(grads[2][~valid] == 0)  # tokens not counted get no gradient


@pytest.mark.parametrize(
    "loss_fn", [grpo_loss, dr_grpo_loss, reinforce_loss, functools.partial(grpo_loss, clip_eps=0.1)]
)
def test_token_weights_are_the_losses_own(loss_fn):
    """At ratio 1 each loss's gradient in the log-probabilities is -w_t A_t."""
    _, _, _, _, adv, valid = _problem(2)
    lp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss_fn(lp, lp.detach(), adv, valid), lp)
    w = token_weights(loss_fn, valid.double())
    assert torch.allclose(g, -w * adv[:, None], rtol=1e-12, atol=0)


def _loop_pieces(seed, cls=torch.optim.Adam):
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V).double()
    trunk = torch.nn.Linear(H, H).double()
    opt = cls(list(head.parameters()) + list(trunk.parameters()), lr=LR)
    _, _, x, actions, adv, valid = _problem(seed)
    return head, trunk, opt, x, actions, adv, valid


def _loss_and_grads(capo, head, trunk, x, actions, adv, valid):
    hidden = torch.tanh(trunk(x))
    lp = torch.log_softmax(head(hidden), -1).gather(-1, actions[..., None]).squeeze(-1)
    loss, m = capo(lp, lp.detach(), adv, valid, hidden, actions)
    params = list(head.parameters()) + list(trunk.parameters())
    return loss, torch.autograd.grad(loss, params), m


def test_zero_coefficient_is_the_plain_loss_bit_for_bit_and_the_penalty_reaches_the_trunk():
    head, trunk, opt, x, actions, adv, valid = _loop_pieces(3)
    kw = dict(tau_h=math.inf, tau_f=math.inf, top_k=K)
    plain = CAPOLoss(grpo_loss, head, opt, **kw)
    zero = CAPOLoss(grpo_loss, head, opt, penalty="delta_kl", penalty_coef=0.0, **kw)
    on = CAPOLoss(grpo_loss, head, opt, penalty="delta_kl", penalty_coef=10.0, **kw)
    l0, g0, m0 = _loss_and_grads(plain, head, trunk, x, actions, adv, valid)
    l1, g1, m1 = _loss_and_grads(zero, head, trunk, x, actions, adv, valid)
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert m0.penalty is None and m1.penalty is None
    l2, g2, m2 = _loss_and_grads(on, head, trunk, x, actions, adv, valid)
    assert torch.allclose(l2 - l0, m2.penalty, rtol=1e-12, atol=0) and m2.penalty > 0
    assert not torch.allclose(g2[2], g0[2])  # the trunk's gradient changed (through h_t)


def test_masked_tokens_get_no_penalty_gradient():
    head, trunk, opt, x, actions, adv, valid = _loop_pieces(4, torch.optim.SGD)
    hidden = torch.tanh(trunk(x)).detach().requires_grad_(True)
    probe = CAPOLoss(grpo_loss, head, opt, tau_h=math.inf, tau_f=math.inf, top_k=K)
    lp = torch.log_softmax(head(hidden), -1).gather(-1, actions[..., None]).squeeze(-1)
    _, m = probe(lp, lp.detach(), adv, valid, hidden, actions)
    tau_f = float(m.delta_kl[valid].median())
    capo = CAPOLoss(
        grpo_loss,
        head,
        opt,
        tau_h=math.inf,
        tau_f=tau_f,
        top_k=K,
        penalty="abs_delta_j",
        penalty_coef=1.0,
    )
    lp = torch.log_softmax(head(hidden), -1).gather(-1, actions[..., None]).squeeze(-1)
    loss, m = capo(lp, lp.detach(), adv, valid, hidden, actions)
    (g,) = torch.autograd.grad(loss, hidden)
    rejected = valid & ~m.keep
    assert rejected.any() and m.keep.any()
    assert torch.all(g[rejected] == 0) and torch.all(g[~valid] == 0)
    assert g[m.keep].abs().sum(-1).min() > 0
    # the value: grpo's weights renormalized over the KEPT tokens of each completion (a row with
    # rejected tokens weighs its kept ones more), not over the completion mask
    keep = m.keep.double()
    assert bool(((keep.sum(1) > 0) & (keep.sum(1) < valid.sum(1))).any())
    w = keep / keep.sum(1, keepdim=True).clamp_min(1) / B
    dj, _ = capo.masker.predict(head.weight, hidden, actions, adv, LR, head.bias, valid)
    assert torch.allclose(m.penalty, (w * dj.abs()).sum(), rtol=1e-12, atol=0)


def test_bad_settings_are_refused():
    head = torch.nn.Linear(H, V)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    kw = dict(tau_h=1.0, tau_f=1.0)
    with pytest.raises(ValueError, match="penalty must be one of"):
        CAPOLoss(grpo_loss, head, opt, penalty="kl", penalty_coef=1.0, **kw)
    with pytest.raises(TypeError, match="penalty must be a string"):
        CAPOLoss(grpo_loss, head, opt, penalty=None, **kw)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="penalty_coef must be a finite number >= 0"):
            CAPOLoss(grpo_loss, head, opt, penalty="delta_j", penalty_coef=bad, **kw)
    with pytest.raises(TypeError, match="penalty_coef must be a number"):
        CAPOLoss(grpo_loss, head, opt, penalty="delta_j", penalty_coef="1", **kw)

    def my_loss(lp, old, adv, mask):
        return -(lp * mask).sum()

    with pytest.raises(TypeError, match="no token weights known"):
        CAPOLoss(my_loss, head, opt, penalty="delta_kl", penalty_coef=1.0, **kw)
    CAPOLoss(
        my_loss,
        head,
        opt,
        penalty="delta_kl",
        penalty_coef=1.0,
        token_weights=lambda m: m.float(),
        **kw,
    )


def test_grpo_loop_runs_with_mask_and_penalty():
    from curvopt.bench.tasks.addition import AdditionTask
    from curvopt.capo.grpo import GRPOTrainer
    from curvopt.capo.sequence_policy import GRUPolicy

    torch.manual_seed(0)
    task = AdditionTask(max_operand=9)
    pol = GRUPolicy(task.vocab_size, 16)
    opt = torch.optim.Adam(pol.parameters(), 1e-2)
    capo = CAPOLoss(
        grpo_loss, pol.head, opt, tau_h=math.inf, tau_f=0.05, penalty="delta_kl", penalty_coef=100.0
    )
    trainer = GRPOTrainer(pol, opt, group_size=4, capo=capo)
    before = [p.detach().clone() for p in pol.parameters()]
    for _ in range(2):
        prompts, _ = task.sample(2)
        # a reward that varies within groups (the task's exact-match reward is 0 at init)
        out = trainer.step(prompts, task.answer_len, lambda c: (c[:, 0] % 2).float())
        assert torch.isfinite(out["loss"]) and out["penalty"] > 0
        assert 0 <= out["rejected_fraction"] < 1
    assert any(not torch.equal(a, p) for a, p in zip(before, pol.parameters()))
