"""CAPO's per-token predictions against float64 dense/autograd truth on a tiny last layer."""

import math

import pytest
import torch

from curvopt.capo.masker import AdamDirection, CAPOMasker, SGDDirection

V, H, B, T = 7, 5, 3, 4


def _problem(seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return W, b, hidden, actions, adv


def _adam_with_history(seed, shape):
    g = torch.Generator().manual_seed(seed + 100)
    d = AdamDirection(betas=(0.8, 0.95), eps=1e-3)
    for _ in range(3):
        d.update(torch.randn(*shape, generator=g, dtype=torch.float64))
    return d


def _support(z, a, K):
    """Top-K rows of z with the action forced in (the documented rule), and the action's slot."""
    rows = torch.topk(z, K).indices.tolist()
    if a not in rows:
        rows[-1] = a
    return torch.tensor(rows), rows.index(a)


def _dense_direction(direction, G):
    """Delta = P(G) written out densely from the model's state (independent of token_terms)."""
    if isinstance(direction, SGDDirection):
        return G.clone()
    b1, b2 = direction.betas
    k = direction.step + 1
    m = b1 * direction.exp_avg + (1 - b1) * G
    v = b2 * direction.exp_avg_sq + (1 - b2) * G * G
    return (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + direction.eps)


def _token_truth(W, b, h, a, A, K, direction):
    """Autograd gradient, modeled direction and the realized-change functions of one token."""
    Waug = torch.cat([W, b[:, None]], 1) if b is not None else W
    haug = torch.cat([h, h.new_ones(1)]) if b is not None else h
    rows, pos = _support(Waug @ haug, a, K)

    def logp(Wx):
        return torch.log_softmax((Wx @ haug)[rows], 0)[pos]

    Wv = Waug.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(A * logp(Wv), Wv)
    D = _dense_direction(direction, G)
    lp0 = logp(Waug).detach()

    def realized(eta):
        dlp = logp(Waug + eta * D).detach() - lp0
        return A * (torch.exp(dlp) - 1), 0.5 * dlp**2

    return G, D, rows, pos, realized


@pytest.mark.parametrize("direction_kind", ["sgd", "adam"])
@pytest.mark.parametrize("K", [4, V])
def test_predictions_match_dense_formula(direction_kind, K):
    W, b, hidden, actions, adv = _problem(0)
    direction = SGDDirection() if direction_kind == "sgd" else _adam_with_history(0, (V, H + 1))
    masker = CAPOMasker(1.0, 1.0, top_k=K, direction=direction)
    eta = 0.03
    dj, dkl = masker.predict(W, hidden, actions, adv, eta, bias=b)
    for i in range(B):
        for t in range(T):
            G, D, rows, pos, _ = _token_truth(
                W, b, hidden[i, t], int(actions[i, t]), adv[i], K, direction
            )
            haug = torch.cat([hidden[i, t], torch.ones(1, dtype=torch.float64)])
            pi = torch.softmax((torch.cat([W, b[:, None]], 1) @ haug)[rows], 0)
            s = -pi
            s[pos] += 1
            u = D[rows] @ haug
            Fu = (torch.diag(pi) - torch.outer(pi, pi)) @ u
            su = s @ u
            want_j = eta * (G * D).sum() + 0.5 * eta**2 * adv[i] * (su**2 - u @ Fu)
            want_kl = 0.5 * eta**2 * su**2
            assert torch.allclose(dj[i, t], want_j, rtol=1e-10, atol=1e-14)
            assert torch.allclose(dkl[i, t], want_kl, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("direction_kind", ["sgd", "adam"])
def test_prediction_error_shrinks_like_eta_cubed(direction_kind):
    """Apply the modeled last-layer update eta * Delta_t and measure the realized change of the
    importance-weighted objective A pi'(a)/pi(a) and of the KL estimate
    (log pi'(a) - log pi(a))^2 / 2; the prediction error must fall by ~2^3 per halving of eta."""
    W, b, hidden, actions, adv = _problem(1)
    K = 5
    direction = SGDDirection() if direction_kind == "sgd" else _adam_with_history(1, (V, H + 1))
    masker = CAPOMasker(1.0, 1.0, top_k=K, direction=direction)
    etas = [0.02, 0.01, 0.005, 0.0025]
    err_j = torch.zeros(len(etas), B, T, dtype=torch.float64)
    err_kl = torch.zeros_like(err_j)
    for i in range(B):
        for t in range(T):
            *_, realized = _token_truth(
                W, b, hidden[i, t], int(actions[i, t]), adv[i], K, direction
            )
            for e, eta in enumerate(etas):
                dj, dkl = masker.predict(
                    W,
                    hidden[i : i + 1, t : t + 1],
                    actions[i : i + 1, t : t + 1],
                    adv[i : i + 1],
                    eta,
                    bias=b,
                )
                rj, rkl = realized(eta)
                # the prediction is not trivially exact: the realized change is of order eta
                assert abs(float(rj)) > 0
                err_j[e, i, t] = (dj[0, 0] - rj).abs()
                err_kl[e, i, t] = (dkl[0, 0] - rkl).abs()
    for err in (err_j, err_kl):
        flat = err.reshape(len(etas), -1)
        used = flat[-1] > 1e-15  # tokens whose third-order term is not numerically zero
        assert used.sum() >= B * T // 2
        ratios = flat[:-1, used] / flat[1:, used]
        slopes = torch.log2(ratios)
        # error ~ C eta^3: each halving of eta divides the error by ~8
        assert slopes.median() == pytest.approx(3.0, abs=0.15)
        assert (slopes[-1] > 2.6).all() and (slopes[-1] < 3.4).all()


def test_adam_with_zero_betas_and_huge_eps_reduces_to_sgd():
    """With beta1 = beta2 = 0 and a huge eps the Adam model is G / eps: the SGD terms scaled."""
    W, b, hidden, actions, adv = _problem(2, bias=False)
    big = 1e6
    sgd = CAPOMasker(1.0, 1.0, top_k=5, direction=SGDDirection())
    adam = CAPOMasker(1.0, 1.0, top_k=5, direction=AdamDirection(betas=(0.0, 0.0), eps=big))
    dj_s, dkl_s = sgd.predict(W, hidden, actions, adv, 0.1)
    dj_a, dkl_a = adam.predict(W, hidden, actions, adv, 0.1 * big)
    # u and <G, Delta> differ from SGD only by the factor 1/(|G| + eps) ~ 1/eps
    assert torch.allclose(dkl_a, dkl_s, rtol=1e-5)
    assert torch.allclose(dj_a, dj_s, rtol=1e-5, atol=1e-9)


def test_adam_direction_reproduces_torch_adam_step():
    """preview() after k updates equals the (k+1)-th step of torch.optim.Adam (ascent sign)."""
    g = torch.Generator().manual_seed(3)
    p = torch.zeros(V, H, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.7, 0.9), eps=1e-4)
    model = AdamDirection.from_optimizer(opt, p)
    for _ in range(4):
        grad = torch.randn(V, H, generator=g, dtype=torch.float64)
        before = p.detach().clone()
        predicted = model.preview(-grad)
        p.grad = grad
        opt.step()
        assert torch.allclose(p.detach() - before, 0.1 * predicted, rtol=1e-10, atol=1e-14)
        model.update(-grad)


def test_adam_direction_state_dict_round_trip():
    d = _adam_with_history(4, (V, H))
    e = AdamDirection()
    e.load_state_dict(d.state_dict())
    assert e.step == d.step and e.betas == d.betas and e.eps == d.eps
    assert torch.equal(e.exp_avg, d.exp_avg) and torch.equal(e.exp_avg_sq, d.exp_avg_sq)
    x = torch.randn(V, H, dtype=torch.float64)
    assert torch.equal(e.preview(x), d.preview(x))
    assert math.isfinite(float(e.preview(x).sum()))


def _taylor2(f, eta):
    """eta f'(0) + eta^2/2 f''(0) of a scalar function of a scalar, by autograd."""
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(f(x), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1, x)
    return eta * d1.detach() + 0.5 * eta**2 * d2


@pytest.mark.parametrize("direction_kind", ["sgd", "adam"])
def test_whole_step_delta_j_and_kl_match_autograd_taylor(direction_kind):
    W, b, hidden, actions, adv = _problem(5)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.75
    direction = SGDDirection() if direction_kind == "sgd" else _adam_with_history(5, (V, H + 1))
    masker = CAPOMasker(1.0, 1.0, direction=direction)
    g = torch.randn(V, H + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eta = 0.05
    out = masker.predict_update(
        W, hidden, g, eta, b, mask, actions=actions, advantages=adv, token_weights=weights
    )
    Wa = torch.cat([W, b[:, None]], 1)
    ha = torch.cat([hidden, torch.ones(B, T, 1, dtype=torch.float64)], -1)
    D = direction.preview(g) if direction_kind == "adam" else g

    def logp(x):
        return torch.log_softmax(ha @ (Wa + x * D).T, -1)

    lp0 = logp(torch.zeros((), dtype=torch.float64)).detach()
    a = actions[..., None]

    def surrogate(x):
        r = torch.exp(logp(x).gather(-1, a) - lp0.gather(-1, a)).squeeze(-1)
        return (weights * mask * adv[:, None] * r).sum()

    def kl(x):
        p0 = lp0.exp()
        return ((p0 * (lp0 - logp(x))).sum(-1) * mask).sum() / mask.sum()

    assert torch.allclose(out["delta_j"], _taylor2(surrogate, eta), rtol=1e-9)
    assert torch.allclose(out["kl"], _taylor2(kl, eta), rtol=1e-9)
    assert torch.isnan(masker.predict_update(W, hidden, g, eta, b)["delta_j"])


@pytest.mark.parametrize("level", ["sequence", "global"])
@pytest.mark.parametrize("direction_kind", ["sgd", "adam"])
def test_group_predictions_match_autograd_taylor(level, direction_kind):
    """Group gradient by autograd of the weighted top-K log-likelihood, its modeled step, and the
    second-order change of the group's importance-weighted objective and mean KL estimate."""
    W, b, hidden, actions, adv = _problem(6)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    mask[2] = False  # a completion without valid tokens
    K = 4
    direction = SGDDirection() if direction_kind == "sgd" else _adam_with_history(6, (V, H + 1))
    masker = CAPOMasker(1.0, 1.0, top_k=K, direction=direction)
    eta = 0.04
    dj, dkl = masker.predict_groups(W, hidden, actions, adv, eta, b, mask, level=level)
    assert dj.shape == dkl.shape == ((B,) if level == "sequence" else ())
    dj, dkl = dj.reshape(-1), dkl.reshape(-1)
    Wa = torch.cat([W, b[:, None]], 1)
    n = mask.sum(1)
    groups = [[i] for i in range(B)] if level == "sequence" else [list(range(B))]
    n_seq = int((n > 0).sum())
    for gi, seqs in enumerate(groups):
        toks = [(i, t) for i in seqs for t in range(T) if mask[i, t]]
        if not toks:
            assert float(dj[gi]) == 0.0 and float(dkl[gi]) == 0.0
            continue
        w = {(i, t): 1 / float(n[i]) / (n_seq if level == "global" else 1) for i, t in toks}
        supp = {}
        for i, t in toks:
            haug = torch.cat([hidden[i, t], torch.ones(1, dtype=torch.float64)])
            supp[i, t] = (haug, *_support(Wa @ haug, int(actions[i, t]), K))

        def token_logp(Wx, key, supp=supp):
            haug, rows, pos = supp[key]
            return torch.log_softmax((Wx @ haug)[rows], 0)[pos]

        Wv = Wa.clone().requires_grad_(True)
        obj = sum(w[k] * adv[k[0]] * token_logp(Wv, k) for k in toks)
        (G,) = torch.autograd.grad(obj, Wv)
        D = _dense_direction(direction, G)
        lp0 = {k: token_logp(Wa, k).detach() for k in toks}

        def surrogate(x, toks=toks, w=w, D=D, lp0=lp0, token_logp=token_logp):
            return sum(
                w[k] * adv[k[0]] * torch.exp(token_logp(Wa + x * D, k) - lp0[k]) for k in toks
            )

        def kl_est(x, toks=toks, w=w, D=D, lp0=lp0, token_logp=token_logp):
            tot = sum(w[k] for k in toks)
            return sum(w[k] * 0.5 * (token_logp(Wa + x * D, k) - lp0[k]) ** 2 for k in toks) / tot

        want_j, want_kl = _taylor2(surrogate, eta), _taylor2(kl_est, eta)
        assert torch.allclose(dj[gi], want_j, rtol=1e-9, atol=1e-15)
        assert torch.allclose(dkl[gi], want_kl, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="level"):
        masker.predict_groups(W, hidden, actions, adv, eta, b, mask, level="batch")
