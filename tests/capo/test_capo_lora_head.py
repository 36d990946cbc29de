"""CAPO on a LoRA head (curvopt.capo.lora_head) against the real optimizer step, in float64.

The truth: one token's loss ``-A log pi(a)`` is back-propagated into the factors, the real
optimizer steps, and the new logits are compared with the model's ``eta u + eta^2 v`` (exact)
and its ``Delta J``/``Delta KL`` (second order: the error shrinks like ``eta^3``).
"""

import math

import pytest
import torch
from torch import nn

from curvopt.bench.tasks.addition import AdditionTask
from curvopt.capo.grpo import GRPOTrainer
from curvopt.capo.lora_head import LoRAHead
from curvopt.capo.loss import CAPOLoss
from curvopt.capo.masker import CAPOMasker
from curvopt.capo.sequence_policy import GRUPolicy
from curvopt.capo.token_losses import grpo_loss

peft = pytest.importorskip("peft")

V, H, R = 7, 5, 2
OPTIMIZERS = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "sgd_momentum_wd": lambda ps, lr: torch.optim.SGD(
        ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1, amsgrad=True),
}


def _head(seed, bias=True):
    """A peft LoRA adapter on an nn.Linear head, B nonzero (a trained adapter)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(H, V, bias=bias)).double()
    cfg = peft.LoraConfig(r=R, lora_alpha=3, lora_dropout=0.0, target_modules=["0"])
    model = peft.get_peft_model(net, cfg)
    lora = model.base_model.model[0]
    nn.init.normal_(lora.lora_B["default"].weight, std=0.5)
    return lora


def _warm(opt, params, steps=2):
    """Give the optimizer state (momentum buffers, moments) from random gradients."""
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()


def _token(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, 1, H, generator=g, dtype=torch.float64)
    a = torch.randint(0, V, (1, 1), generator=g)
    adv = torch.randn(1, generator=g, dtype=torch.float64)
    return h, a, adv


def _truth(lora, opt, h, a, adv):
    """Logits before and after the real step on the token's loss ``-A log pi(a)``."""
    with torch.no_grad():
        before = lora(h)[0, 0]
    opt.zero_grad()
    logp = torch.log_softmax(lora(h), -1)[0, 0, a[0, 0]]
    (-adv[0] * logp).backward()
    opt.step()
    with torch.no_grad():
        after = lora(h)[0, 0]
    return before, after


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_logit_change_is_exact(opt_name, seed):
    lora = _head(seed)
    head = LoRAHead(
        lora.base_layer.weight,
        lora.lora_A["default"].weight,
        lora.lora_B["default"].weight,
        float(lora.scaling["default"]),
        lora.base_layer.bias,
    )
    params = list(head.params())
    lr = 0.05
    opt = OPTIMIZERS[opt_name](params, lr)
    _warm(opt, params)
    h, a, adv = _token(seed + 10)
    direction = head.direction(opt)
    aug = torch.cat([h[0], torch.ones(1, 1, dtype=h.dtype)], -1)  # the bias column
    z = aug @ torch.cat([head.weight(), head.bias[:, None]], 1).T
    s = nn.functional.one_hot(a[0], V).double() - torch.softmax(z, -1)
    rows = torch.arange(V)[None]
    gd, u, v = direction.token_terms(aug, s, adv, rows)
    before, after = _truth(lora, opt, h, a, adv)
    assert torch.allclose(before, z[0], atol=1e-12)
    change = after - before
    assert torch.allclose(lr * u[0] + lr**2 * v[0], change, rtol=1e-9, atol=1e-12)
    assert v.abs().max() > 1e-6  # the second-order part is really there
    assert torch.allclose(gd, adv * (s * u).sum(-1), rtol=1e-10)  # <G, Delta> = A s.u


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_delta_j_and_kl_are_second_order_exact(opt_name):
    """|predicted - true| is O(eta^3): it falls ~8x when eta halves (an O(eta^2) error: 4x)."""
    errors = {"j": [], "kl": []}
    lr0 = 0.02 if opt_name == "sgd" else 2e-3  # Adam's steps are ~lr per entry
    for lr in (lr0, lr0 / 2):
        lora = _head(3, bias=False)
        params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
        opt = OPTIMIZERS[opt_name](params, lr)
        _warm(opt, params)
        capo = CAPOLoss(grpo_loss, lora, opt, tau_h=math.inf, tau_f=math.inf)
        h, a, adv = _token(4)
        weight, bias = capo.weight_and_bias()
        dj, dkl = capo.masker.predict(weight, h, a, adv, lr, bias)
        before, after = _truth(lora, opt, h, a, adv)
        log_ratio = torch.log_softmax(after, -1)[a[0, 0]] - torch.log_softmax(before, -1)[a[0, 0]]
        true_j = adv[0] * (log_ratio.exp() - 1)
        true_kl = 0.5 * log_ratio.square()
        assert dkl[0, 0] > 0
        errors["j"].append(float((dj[0, 0] - true_j).abs()))
        errors["kl"].append(float((dkl[0, 0] - true_kl).abs()))
        assert errors["j"][-1] < 0.05 * float(true_j.abs()), errors
        assert errors["kl"][-1] < 0.2 * float(true_kl), errors
    for key, (e_big, e_small) in errors.items():
        assert 6.0 < e_big / e_small < 10.0, (key, errors)


def test_second_order_term_matters():
    """Without the eta^2 s.v term Delta J is off at first order in the relative error."""
    lora = _head(5, bias=False)
    params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    opt = torch.optim.SGD(params, lr=0.05)
    capo = CAPOLoss(grpo_loss, lora, opt, tau_h=math.inf, tau_f=math.inf)
    h, a, adv = _token(6)
    weight, _ = capo.weight_and_bias()
    dj, _ = capo.masker.predict(weight, h, a, adv, 0.05)
    plain = CAPOMasker(math.inf, math.inf, direction=_FirstOrderOnly(capo.masker.direction))
    dj1, _ = plain.predict(weight, h, a, adv, 0.05)
    before, after = _truth(lora, opt, h, a, adv)
    ratio = torch.log_softmax(after, -1)[a[0, 0]] - torch.log_softmax(before, -1)[a[0, 0]]
    true_j = adv[0] * (ratio.exp() - 1)
    assert abs(dj[0, 0] - true_j) < abs(dj1[0, 0] - true_j) / 3


class _FirstOrderOnly:
    """The LoRA model with its eta^2 logit term dropped (a deliberately wrong model)."""

    forms_token_matrices = True

    def __init__(self, inner):
        self.inner = inner

    def token_terms(self, *args):
        return self.inner.token_terms(*args)[:2]

    def preview(self, grad):
        return self.inner.preview(grad)

    def update(self, grad):
        pass


def test_mask_rejects_exactly_the_tokens_above_tau_f_and_loss_gates_them():
    lora = _head(7)
    params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    opt = torch.optim.Adam(params, lr=1e-2)
    _warm(opt, params)
    torch.manual_seed(8)
    hidden = torch.randn(3, 4, H, dtype=torch.float64)
    actions = torch.randint(0, V, (3, 4))
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    probe = CAPOLoss(grpo_loss, lora, opt, tau_h=math.inf, tau_f=math.inf, top_k=4)
    weight, bias = probe.weight_and_bias()
    _, dkl = probe.masker.predict(weight, hidden, actions, adv, 1e-2, bias)
    tau = float(dkl.flatten().median())
    capo = CAPOLoss(grpo_loss, lora, opt, tau_h=math.inf, tau_f=tau, top_k=4)
    logp = torch.log_softmax(lora(hidden), -1).gather(-1, actions[..., None])[..., 0]
    loss, m = capo(logp, logp.detach(), adv, torch.ones(3, 4, dtype=torch.bool), hidden, actions)
    assert torch.equal(m.keep, dkl < tau)
    assert 0 < int(m.keep.sum()) < 12
    ref = grpo_loss(logp, logp.detach(), adv, m.keep)
    assert torch.equal(loss, ref)


def test_lora_refusals():
    lora = _head(9)
    params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    opt = torch.optim.SGD(params, lr=0.1)
    kw = {"tau_h": 1.0, "tau_f": 1.0}
    with pytest.raises(ValueError, match="direction= is not used"):
        CAPOLoss(grpo_loss, lora, opt, direction="adam", **kw)
    with pytest.raises(ValueError, match="not in any param group"):
        CAPOLoss(grpo_loss, lora, torch.optim.SGD(params[:1], lr=0.1), **kw)
    lora.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="base layer is frozen"):
        CAPOLoss(grpo_loss, lora, opt, **kw)
    lora.base_layer.weight.requires_grad_(False)
    capo = CAPOLoss(grpo_loss, lora, opt, **kw)
    with pytest.raises(ValueError, match="no gradient yet"):
        capo.ascent_grad()
    with pytest.raises(ValueError, match="factors' gradients must have shapes"):
        capo.masker.direction.preview((params[1].T, params[0].T))
    torch.manual_seed(0)
    dropped = peft.get_peft_model(
        nn.Sequential(nn.Linear(H, V)),
        peft.LoraConfig(r=R, lora_dropout=0.1, target_modules=["0"]),
    ).base_model.model[0]
    with pytest.raises(ValueError, match="lora_dropout=0.0"):
        CAPOLoss(grpo_loss, dropped, None, **kw)


def _lora_policy(seed):
    """A GRU policy whose head carries a LoRA adapter (the body and the base head frozen)."""
    torch.manual_seed(seed)
    pol = GRUPolicy(AdditionTask(max_operand=9).vocab_size, 16).double()
    cfg = peft.LoraConfig(r=R, lora_alpha=4, lora_dropout=0.0, target_modules=["head"])
    pol = peft.get_peft_model(pol, cfg).base_model.model
    nn.init.normal_(pol.head.lora_B["default"].weight, std=0.3)
    return pol


def _parity(completions):
    return (completions[:, 0] % 2).double()


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adamw"])
def test_grpo_loop_with_lora_head_equals_plain_grpo_at_infinite_thresholds(opt_name):
    task = AdditionTask(max_operand=9)
    runs = []
    for with_capo in (False, True):
        pol = _lora_policy(0)
        params = [p for p in pol.parameters() if p.requires_grad]
        assert len(params) == 2  # A and B only
        opt = OPTIMIZERS[opt_name](params, 1e-2)
        capo = CAPOLoss(grpo_loss, pol.head, opt, tau_h=math.inf, tau_f=math.inf)
        trainer = GRPOTrainer(
            pol, opt, capo=capo if with_capo else None, generator=torch.Generator().manual_seed(1)
        )
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            prompts, _ = task.sample(4, g)
            out = trainer.step(prompts, task.answer_len, _parity)
        runs.append([p.detach().clone() for p in params])
        assert float(out["realized_kl"]) > 0
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_grpo_loop_with_lora_head_masks():
    """tau_f at the mean prediction of the same step (a probe run) rejects part of the tokens."""
    task = AdditionTask(max_operand=9)
    outs = []
    for tau_f in (math.inf, None):
        pol = _lora_policy(3)
        params = [p for p in pol.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-2)
        tau = outs[0]["mean_delta_kl_all"] if tau_f is None else tau_f
        capo = CAPOLoss(grpo_loss, pol.head, opt, tau_h=math.inf, tau_f=float(tau), top_k=6)
        trainer = GRPOTrainer(pol, opt, capo=capo, generator=torch.Generator().manual_seed(1))
        prompts, _ = task.sample(4, torch.Generator().manual_seed(2))
        outs.append(trainer.step(prompts, task.answer_len, _parity))
    probe, out = outs
    assert float(probe["rejected_fraction"]) == 0
    assert 0 < float(out["rejected_fraction"]) < 1
    assert float(out["mean_delta_kl_kept"]) < float(probe["mean_delta_kl_all"])


def _batch(seed, n=3, T=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, T, H, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (n, T), generator=g)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, actions, adv


@pytest.mark.parametrize("opt_name", ["sgd_momentum_wd", "adam"])
@pytest.mark.parametrize("level", ["step", "global"])
def test_whole_step_predictions_are_second_order_exact(opt_name, level):
    """The batch step (predict_update, and the global level's group step) of a LoRA head.

    Truth: the real optimizer steps on ``-sum_t w_t A_t log pi(a_t)`` (token-mean weights
    ``w_t``); ``Delta J = sum_t w_t A_t (ratio_t - 1)`` and the KL: step level, the mean full
    KL(p_old || p_new); global level, ``mean_t (log ratio_t)^2 / 2``. Errors are O(eta^3).
    """
    errors = {"j": [], "kl": []}
    lr0 = 4e-3 if opt_name.startswith("sgd") else 1e-3
    for lr in (lr0, lr0 / 2):
        lora = _head(11)
        params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
        opt = OPTIMIZERS[opt_name](params, lr)
        _warm(opt, params)
        capo = CAPOLoss(grpo_loss, lora, opt, tau_h=math.inf, tau_f=math.inf)
        hidden, actions, adv = _batch(12)
        w = torch.full(actions.shape, 1 / actions.numel(), dtype=torch.float64)
        with torch.no_grad():
            before = torch.log_softmax(lora(hidden), -1)
        logp = torch.log_softmax(lora(hidden), -1).gather(-1, actions[..., None])[..., 0]
        opt.zero_grad()
        (-(w * adv[:, None] * logp).sum()).backward()
        weight, bias = capo.weight_and_bias()
        if level == "step":
            pred = capo.predict_step(hidden, actions, adv, lr=lr, token_weights=w)
            dj, dkl = pred["delta_j"], pred["kl"]
        else:
            dj, dkl = capo.masker.predict_groups(
                weight, hidden, actions, adv, lr, bias, level="global"
            )
        opt.step()
        with torch.no_grad():
            after = torch.log_softmax(lora(hidden), -1)
        ratio = (after - before).gather(-1, actions[..., None])[..., 0]
        true_j = (w * adv[:, None] * (ratio.exp() - 1)).sum()
        if level == "step":
            true_kl = (before.exp() * (before - after)).sum(-1).mean()
        else:
            true_kl = 0.5 * ratio.square().mean()
        assert float(true_kl) > 0
        errors["j"].append(float((dj - true_j).abs()))
        errors["kl"].append(float((dkl - true_kl).abs()))
        assert errors["j"][-1] < 0.05 * float(true_j.abs()), errors
        assert errors["kl"][-1] < 0.1 * float(true_kl), errors
    for key, (e_big, e_small) in errors.items():
        assert 6.0 < e_big / e_small < 10.0, (key, errors)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_grpo_loop_predicted_kl_matches_realized_kl_with_lora_head(opt_name):
    """Body and base head frozen: the whole step is the LoRA head's, so the predicted KL of the
    step must match the realized one (second order, small lr)."""
    task = AdditionTask(max_operand=9)
    pol = _lora_policy(4)
    params = [p for p in pol.parameters() if p.requires_grad]
    lr = 1e-3 if opt_name == "sgd" else 1e-4
    opt = OPTIMIZERS[opt_name](params, lr)
    capo = CAPOLoss(grpo_loss, pol.head, opt, tau_h=math.inf, tau_f=math.inf)
    trainer = GRPOTrainer(pol, opt, capo=capo, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        prompts, _ = task.sample(6, g)
        out = trainer.step(prompts, task.answer_len, _parity)
        assert float(out["realized_kl"]) > 1e-14
        assert float(out["realized_kl"]) == float(out["realized_head_kl"])
        assert float(out["predicted_kl"]) == pytest.approx(float(out["realized_kl"]), rel=2e-2)


def test_penalty_on_a_lora_head_against_double_autograd():
    """Plain SGD moves (A, B) by eta A_t g_t, g_t = grad_(A,B) log pi(a_t) (full vocabulary), so
    Delta KL_t = eta^2 A_t^2 |g_t|^4 / 2 exactly as a function of A, B and h_t: the penalty's
    value and its gradients in A, B and the hidden states must equal that built with autograd."""
    lora = _head(13)
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    lr, coef = 0.3, 2.0
    opt = torch.optim.SGD([A, B], lr=lr)
    hidden, actions, adv = _batch(14, n=2, T=3)
    hidden.requires_grad_(True)

    def weights(mask):
        return mask / mask.sum()

    def no_loss(logprobs, old, advantages, mask):
        return 0.0 * logprobs.sum()

    capo = CAPOLoss(
        no_loss,
        lora,
        opt,
        tau_h=math.inf,
        tau_f=math.inf,
        penalty="delta_kl",
        penalty_coef=coef,
        token_weights=weights,
    )
    logp = torch.log_softmax(lora(hidden), -1).gather(-1, actions[..., None])[..., 0]
    loss, m = capo(logp, logp.detach(), adv, torch.ones(2, 3, dtype=torch.bool), hidden, actions)
    got = torch.autograd.grad(loss, (A, B, hidden))

    ref = 0.0
    for i in range(2):
        for t in range(3):
            lp = torch.log_softmax(lora(hidden[i, t]), -1)[actions[i, t]]
            g = torch.autograd.grad(lp, (A, B), create_graph=True)
            sq = sum((gi * gi).sum() for gi in g)
            ref = ref + (1 / 6) * 0.5 * lr**2 * adv[i] ** 2 * sq**2
    ref = coef * ref
    want = torch.autograd.grad(ref, (A, B, hidden))
    assert torch.allclose(m.penalty, ref.detach(), rtol=1e-10)
    for a, b in zip(got, want):
        assert b.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-14)
