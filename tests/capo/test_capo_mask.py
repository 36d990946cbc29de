"""CAPO's mask rule, the masked losses' gradients, chunking, and input validation."""

import pytest
import torch

from curvopt.capo.masker import (
    AdamDirection,
    AdamOptimizerDirection,
    CAPOLoss,
    CAPOMasker,
    SGDOptimizerDirection,
    calibrate_thresholds,
)
from curvopt.capo.sequence_policy import GRUPolicy
from curvopt.capo.token_losses import clipped_surrogate, dr_grpo_loss, grpo_loss, reinforce_loss

V, H, B, T = 9, 6, 4, 5


def _inputs(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    actions = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) < 0.8
    return W, bias, hidden, actions, adv, mask


@pytest.mark.parametrize("symmetric", [True, False])
def test_mask_keeps_exactly_tokens_below_both_thresholds(symmetric):
    W, bias, hidden, actions, adv, mask = _inputs(0)
    masker = CAPOMasker(0.0, 0.0, top_k=6, symmetric=symmetric)
    dj, dkl = masker.predict(W, hidden, actions, adv, 0.05, bias, mask)
    # thresholds between observed values so that each rule rejects some tokens
    masker.tau_h = float(dj[mask].abs().median())
    masker.tau_f = float(dkl[mask].quantile(0.7))
    out = masker(W, hidden, actions, adv, 0.05, bias, mask)
    for i in range(B):
        for t in range(T):
            ok_j = (abs(dj[i, t]) < masker.tau_h) if symmetric else (0 <= dj[i, t] < masker.tau_h)
            want = bool(mask[i, t]) and bool(ok_j) and bool(dkl[i, t] < masker.tau_f)
            assert bool(out.keep[i, t]) == want
    assert 0 < int(out.keep.sum()) < int(mask.sum())
    n_valid = int(mask.sum())
    assert float(out.rejected_fraction) == pytest.approx((n_valid - int(out.keep.sum())) / n_valid)
    assert torch.equal(out.delta_j[~mask], torch.zeros_like(out.delta_j[~mask]))
    st = out.stats()
    assert int(st["num_valid"]) == n_valid and int(st["num_kept"]) == int(out.keep.sum())
    for name, sel in (("all", mask), ("kept", out.keep)):
        assert float(st[f"mean_delta_kl_{name}"]) == pytest.approx(float(dkl[sel].mean()))
        assert float(st[f"mean_abs_delta_j_{name}"]) == pytest.approx(float(dj[sel].abs().mean()))
        assert float(st[f"mean_delta_j_{name}"]) == pytest.approx(float(dj[sel].mean()))
        assert float(st[f"max_delta_kl_{name}"]) == pytest.approx(float(dkl[sel].max()))
    # the kept tokens are the ones below the thresholds: their mean KL is below the all-token one
    assert float(st["mean_delta_kl_kept"]) < float(st["mean_delta_kl_all"])


@pytest.mark.parametrize("symmetric", [True, False])
def test_infinite_thresholds_switch_their_rule_off(symmetric):
    W, bias, hidden, actions, adv, mask = _inputs(9)
    # an Adam model with history: its momentum drift makes some Delta J negative
    adam = AdamDirection()
    adam.update(
        torch.randn(V, H + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )
    masker = CAPOMasker(float("inf"), float("inf"), top_k=6, direction=adam, symmetric=symmetric)
    out = masker(W, hidden, actions, adv, 0.05, bias, mask)
    assert bool((out.delta_j[mask] < 0).any())  # negative Delta J exist and are kept
    assert torch.equal(out.keep, mask)
    masker.tau_f = float(out.delta_kl[mask].median())
    out2 = masker(W, hidden, actions, adv, 0.05, bias, mask)
    assert torch.equal(out2.keep, mask & (out.delta_kl < masker.tau_f))


@pytest.mark.parametrize("direction", ["sgd", "adam"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_chunked_equals_unchunked(direction, chunk_size):
    W, bias, hidden, actions, adv, mask = _inputs(1)

    def model():
        if direction == "sgd":
            return "sgd"
        d = AdamDirection(betas=(0.9, 0.99), eps=1e-6)
        d.update(
            torch.randn(V, H + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        )
        return d

    full = CAPOMasker(1.0, 1.0, top_k=5, direction=model(), chunk_size=B * T)
    part = CAPOMasker(1.0, 1.0, top_k=5, direction=model(), chunk_size=chunk_size)
    adv_tok = adv[:, None].expand(B, T).contiguous()
    a = full.predict(W, hidden, actions, adv_tok, 0.1, bias, mask)
    b = part.predict(W, hidden, actions, adv, 0.1, bias, mask)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-15)


def _reference_grpo(logp, old, adv, keep, eps=0.2):
    """GRPO loss over the kept tokens only, written with explicit loops."""
    total = 0.0
    for i in range(logp.shape[0]):
        terms = [
            clipped_surrogate(logp[i, t], old[i, t], adv[i], eps)
            for t in range(logp.shape[1])
            if keep[i, t]
        ]
        total = total + (sum(terms) / len(terms) if terms else 0.0)
    return total / logp.shape[0]


@pytest.mark.parametrize("loss_fn", [grpo_loss, dr_grpo_loss, reinforce_loss])
def test_masked_tokens_contribute_zero_gradient(loss_fn):
    torch.manual_seed(2)
    pol = GRUPolicy(V, H).double()
    opt = torch.optim.Adam(pol.parameters(), lr=0.05)
    tokens = torch.randint(0, V, (B, T + 1))
    actions = tokens[:, 1:]
    adv = torch.randn(B, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    capo = CAPOLoss(loss_fn, pol.head, opt, tau_h=float("inf"), tau_f=0.0, top_k=6)
    h = pol.hidden_states(tokens[:, :-1])
    logp = torch.log_softmax(pol.head(h), -1).gather(-1, actions[..., None]).squeeze(-1)
    old = logp.detach() + 0.05 * torch.randn(B, T, dtype=torch.float64)  # ratio != 1
    _, probe = capo(logp, old, adv, valid, h, actions)
    capo.masker.tau_f = float(probe.delta_kl.quantile(0.6))  # rejects ~40 %
    logp_leaf = logp.detach().requires_grad_(True)
    loss, m = capo(logp_leaf, old, adv, valid, h, actions)
    assert 0 < int(m.keep.sum()) < B * T
    assert isinstance(m.delta_kl, torch.Tensor) and m.delta_kl.shape == (B, T)
    (g,) = torch.autograd.grad(loss, logp_leaf)
    assert torch.all(g[~m.keep] == 0)
    assert torch.all(g[m.keep] != 0)
    # parameter gradients equal those of the loss restricted to the kept tokens
    if loss_fn is grpo_loss:
        loss_p, m2 = capo(logp, old, adv, valid, h, actions)
        assert torch.equal(m2.keep, m.keep)
        grads = torch.autograd.grad(loss_p, list(pol.parameters()), retain_graph=True)
        ref = torch.autograd.grad(_reference_grpo(logp, old, adv, m.keep), list(pol.parameters()))
        for x, y in zip(grads, ref):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-14)


def test_capo_loss_direction_follows_optimizer_and_explicit_models_update():
    torch.manual_seed(3)
    pol = GRUPolicy(V, H).double()
    params = list(pol.parameters())
    for cls, name in (
        (torch.optim.SGD, "sgd"),
        (torch.optim.Adam, "adam"),
        (torch.optim.AdamW, "adam"),
    ):
        capo = CAPOLoss(grpo_loss, pol.head, cls(params, lr=0.1), tau_h=1.0, tau_f=1.0)
        assert capo.masker.direction.name == name
        assert isinstance(capo.masker.direction, SGDOptimizerDirection | AdamOptimizerDirection)
    for cls in (
        torch.optim.RMSprop,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.Adamax,
        torch.optim.Adagrad,
    ):
        with pytest.raises(TypeError, match="SGD, torch.optim.Adam and torch.optim.AdamW"):
            CAPOLoss(grpo_loss, pol.head, cls(params, lr=0.1), tau_h=1.0, tau_f=1.0)
    with pytest.raises(ValueError, match="maximize"):
        CAPOLoss(grpo_loss, pol.head, torch.optim.SGD(params, 0.1, maximize=True), tau_h=1, tau_f=1)
    # an explicit own-moment Adam model is still updated with the masked global gradient
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.5, 0.6), eps=1e-5)
    d = AdamDirection.from_optimizer(opt, pol.head.weight)
    assert d.betas == (0.5, 0.6) and d.eps == 1e-5
    capo = CAPOLoss(grpo_loss, pol.head, opt, tau_h=1.0, tau_f=1.0, direction=d)
    tokens = torch.randint(0, V, (B, T + 1))
    h = pol.hidden_states(tokens[:, :-1])
    logp = torch.log_softmax(pol.head(h), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    loss, _ = capo(
        logp,
        logp.detach(),
        torch.randn(B, dtype=torch.float64),
        torch.ones(B, T, dtype=torch.bool),
        h,
        tokens[:, 1:],
    )
    loss.backward()
    capo.update_direction()
    g = torch.cat([pol.head.weight.grad, pol.head.bias.grad[:, None]], 1)
    assert d.step == 1
    assert torch.allclose(d.exp_avg, -(1 - 0.5) * g)
    assert torch.allclose(d.exp_avg_sq, (1 - 0.6) * g * g)


def test_calibrate_thresholds_percentiles():
    dj = torch.tensor([[-4.0, 1.0], [2.0, 3.0]])
    dkl = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    tau_h, tau_f = calibrate_thresholds(dj, dkl, percentile=100)
    assert tau_h == 4.0 and tau_f == pytest.approx(0.4)
    valid = torch.tensor([[False, True], [True, True]])
    tau_h, _ = calibrate_thresholds(dj, dkl, valid, percentile=100)
    assert tau_h == 3.0
    with pytest.raises(ValueError, match="percentile"):
        calibrate_thresholds(dj, dkl, percentile=0)
    with pytest.raises(ValueError, match="no tokens"):
        calibrate_thresholds(dj, dkl, torch.zeros(2, 2, dtype=torch.bool))


def test_bad_inputs_raise_clear_errors():
    W, bias, hidden, actions, adv, mask = _inputs(4)
    m = CAPOMasker(1.0, 1.0, top_k=5)
    with pytest.raises(ValueError, match="tau_h"):
        CAPOMasker(-1.0, 1.0)
    with pytest.raises(ValueError, match="tau_f"):
        CAPOMasker(1.0, -1e-3)
    with pytest.raises(ValueError, match="tau_f"):
        m.tau_f = float("nan")
    with pytest.raises(ValueError, match="top_k"):
        CAPOMasker(1.0, 1.0, top_k=0)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        CAPOMasker(1.0, 1.0, top_k=V + 1).predict(W, hidden, actions, adv, 0.1)
    with pytest.raises(ValueError, match="direction"):
        CAPOMasker(1.0, 1.0, direction="lion")
    with pytest.raises(ValueError, match="chunk_size"):
        CAPOMasker(1.0, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        m.predict(W, hidden[..., :-1], actions, adv, 0.1)
    with pytest.raises(ValueError, match="actions"):
        m.predict(W, hidden, actions[:, :-1], adv, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        m.predict(W, hidden, actions + V, adv, 0.1)
    with pytest.raises(TypeError, match="integer"):
        m.predict(W, hidden, actions.double(), adv, 0.1)
    with pytest.raises(ValueError, match="advantages"):
        m.predict(W, hidden, actions, adv[:-1], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        m.predict(W, hidden, actions, adv * float("nan"), 0.1)
    with pytest.raises(ValueError, match="mask"):
        m.predict(W, hidden, actions, adv, 0.1, mask=mask[:, :-1])
    with pytest.raises(TypeError, match="bool"):
        m.predict(W, hidden, actions, adv, 0.1, mask=mask.long())
    with pytest.raises(ValueError, match="bias"):
        m.predict(W, hidden, actions, adv, 0.1, bias=bias[:-1])
    with pytest.raises(TypeError, match="dtype"):
        m.predict(W, hidden.float(), actions, adv, 0.1)
    with pytest.raises(ValueError, match="lr"):
        m.predict(W, hidden, actions, adv, -0.1)
    adam = AdamDirection()
    adam.update(torch.zeros(V, H + 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="moments"):
        CAPOMasker(1.0, 1.0, direction=adam).predict(W, hidden, actions, adv, 0.1)
    with pytest.raises(ValueError, match="betas"):
        AdamDirection(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="eps"):
        AdamDirection(eps=0.0)
    pol = GRUPolicy(V, H)
    with pytest.raises(TypeError, match="nn.Linear"):
        CAPOLoss(grpo_loss, pol.rnn, tau_h=1.0, tau_f=1.0)
    with pytest.raises(ValueError, match="param group"):
        CAPOLoss(
            grpo_loss, pol.head, torch.optim.SGD(pol.rnn.parameters(), 0.1), tau_h=1.0, tau_f=1.0
        )
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B), torch.ones(B, T))
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(
            torch.zeros(B, T),
            torch.zeros(B, T),
            torch.zeros(B),
            torch.ones(B, T, dtype=torch.bool),
            clip_eps=0.0,
        )


def test_predict_update_kl_validates_and_matches_dense():
    W, bias, hidden, actions, adv, mask = _inputs(6)
    g = torch.randn(V, H + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    m = CAPOMasker(1.0, 1.0)
    got = m.predict_update_kl(W, hidden, g, 0.1, bias, mask)
    want, n = 0.0, 0
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                ha = torch.cat([hidden[i, t], torch.ones(1, dtype=torch.float64)])
                p = torch.softmax(torch.cat([W, bias[:, None]], 1) @ ha, 0)
                u = g @ ha
                want += 0.5 * 0.01 * u @ ((torch.diag(p) - torch.outer(p, p)) @ u)
                n += 1
    assert torch.allclose(got, want / n, rtol=1e-10)
    with pytest.raises(ValueError, match="hidden"):
        m.predict_update_kl(W, hidden[..., :-1], g, 0.1, bias)
    with pytest.raises(ValueError, match="ascent_grad"):
        m.predict_update_kl(W, hidden, g[:, :-1], 0.1, bias)


def test_token_losses_against_explicit_loops():
    g = torch.Generator().manual_seed(8)
    lp = torch.randn(B, T, dtype=torch.float64, generator=g) * 0.1 - 1
    old = lp + torch.randn(B, T, dtype=torch.float64, generator=g) * 0.3
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0] = False  # a completion with no kept token contributes 0 to GRPO

    def surr(i, t):
        r = torch.exp(lp[i, t] - old[i, t])
        return -min(r * adv[i], min(max(r, 0.8), 1.2) * adv[i])

    grpo = (
        sum(
            sum(surr(i, t) for t in range(T) if mask[i, t]) / max(1, int(mask[i].sum()))
            for i in range(B)
        )
        / B
    )
    dr = sum(surr(i, t) for i in range(B) for t in range(T) if mask[i, t]) / (B * T)
    rf = sum(-adv[i] * lp[i, t] for i in range(B) for t in range(T) if mask[i, t]) / B
    assert torch.allclose(grpo_loss(lp, old, adv, mask), torch.as_tensor(grpo))
    assert torch.allclose(dr_grpo_loss(lp, old, adv, mask), torch.as_tensor(dr))
    assert torch.allclose(reinforce_loss(lp, old, adv, mask), torch.as_tensor(rf))
    # per-token advantages give the same result as per-completion ones broadcast
    adv_tok = adv[:, None].expand(B, T)
    assert torch.allclose(grpo_loss(lp, old, adv_tok, mask), grpo_loss(lp, old, adv, mask))


@pytest.mark.parametrize("symmetric", [True, False])
def test_thresholds_are_strict_at_a_tokens_own_value(symmetric):
    """The rule is ``Delta KL < tau_f`` and ``|Delta J| < tau_h``: a token whose prediction equals
    the threshold exactly is dropped (quantile thresholds never land on a value exactly)."""
    W, bias, hidden, actions, adv, mask = _inputs(3)
    masker = CAPOMasker(float("inf"), float("inf"), top_k=6, symmetric=symmetric)
    first = masker(W, hidden, actions, adv, 0.05, bias, mask)
    dkl, dj = first.delta_kl[mask], first.delta_j[mask]
    ok_j = dj.abs() if symmetric else torch.where(dj >= 0, dj, torch.inf)
    for name, values in (("tau_f", dkl), ("tau_h", ok_j)):
        masker.tau_h = masker.tau_f = float("inf")
        tau = float(values[values.isfinite()].median())  # an observed value, bit for bit
        setattr(masker, name, tau)
        out = masker(W, hidden, actions, adv, 0.05, bias, mask)
        at_tau = (values == tau) & mask[mask]
        assert int(at_tau.sum()) >= 1
        assert not bool(out.keep[mask][at_tau].any()), name
        assert bool(out.keep[mask][values < tau].all()), name


@pytest.mark.parametrize("level", ["sequence", "global"])
def test_sequence_and_global_masks_gate_whole_groups(level):
    W, bias, hidden, actions, adv, mask = _inputs(10)
    masker = CAPOMasker(float("inf"), float("inf"), top_k=6, level=level)
    dj, dkl = masker.predict_groups(W, hidden, actions, adv, 0.05, bias, mask, level=level)
    if level == "sequence":
        masker.tau_f = float(dkl.median())  # rejects about half the completions
        out = masker(W, hidden, actions, adv, 0.05, bias, mask)
        want = (dkl < masker.tau_f)[:, None] & mask
        assert torch.equal(out.keep, want) and 0 < int(want.sum()) < int(mask.sum())
        assert torch.equal(out.delta_kl, dkl[:, None] * mask)
    else:
        for tau, kept in ((float(dkl) * 2, True), (float(dkl) / 2, False)):
            masker.tau_f = tau
            out = masker(W, hidden, actions, adv, 0.05, bias, mask)
            assert torch.equal(out.keep, mask if kept else torch.zeros_like(mask))
    with pytest.raises(ValueError, match="level"):
        CAPOMasker(1.0, 1.0, level="batch")


def test_symmetric_must_be_a_bool_not_a_string():
    from curvopt.capo import CAPOLoss

    for value in ("False", "True", 0, 1, None):
        with pytest.raises(TypeError, match="symmetric must be a bool"):
            CAPOMasker(0.1, 0.1, symmetric=value)
    assert CAPOMasker(0.1, 0.1, symmetric=False).symmetric is False
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        CAPOLoss(lambda *a: None, torch.nn.Linear(2, 3), tau_h=0.1, tau_f=0.1, symmetric="False")
