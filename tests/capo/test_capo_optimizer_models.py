"""CAPO's models of real optimizers against the real torch.optim steps (float64, exact)."""

import pytest
import torch

from curvopt.capo.direction import (
    AdamOptimizerDirection,
    SGDOptimizerDirection,
    direction_for,
)
from curvopt.capo.masker import CAPOMasker

V, H = 7, 5

SETTINGS = [
    (torch.optim.SGD, {}),
    (torch.optim.SGD, {"weight_decay": 0.1}),
    (torch.optim.SGD, {"momentum": 0.9}),
    (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05}),
    (torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05}),
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"weight_decay": 0.1}),
    (torch.optim.Adam, {"amsgrad": True, "betas": (0.5, 0.7)}),
    (torch.optim.AdamW, {"weight_decay": 0.1}),
    (torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
]


def _ids(setting):
    cls, kw = setting
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items())


def _head(seed, bias):
    torch.manual_seed(seed)
    return torch.nn.Linear(H, V, bias=bias).double()


@pytest.mark.parametrize("setting", SETTINGS, ids=[_ids(s) for s in SETTINGS])
@pytest.mark.parametrize("bias", [False, True])
def test_preview_is_the_real_step(setting, bias):
    """Over 5 steps (the state evolves: momentum buffers, moments, AMSGrad maxima, decay), lr times
    the modeled direction of the ascent gradient equals the parameter change of the real step."""
    cls, kw = setting
    head = _head(0, bias)
    lr = 0.05
    groups = [{"params": [head.weight]}]
    if bias:  # the bias in its own group without decay, as the HF Trainer does
        groups.append({"params": [head.bias], "weight_decay": 0.0})
    opt = cls(groups, lr=lr, **kw)
    model = direction_for(opt, head.weight, head.bias)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        gw = torch.randn(V, H, generator=g, dtype=torch.float64)
        gb = torch.randn(V, generator=g, dtype=torch.float64)
        ascent = -gw if not bias else -torch.cat([gw, gb[:, None]], 1)
        predicted = lr * model.preview(ascent)
        before = torch.cat([head.weight.detach(), head.bias.detach()[:, None]], 1) if bias else None
        before = head.weight.detach().clone() if not bias else before
        head.weight.grad = gw
        if bias:
            head.bias.grad = gb
        opt.step()
        after = (
            head.weight.detach() if not bias else torch.cat([head.weight, head.bias[:, None]], 1)
        )
        assert torch.allclose(after.detach() - before, predicted, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("setting", SETTINGS, ids=[_ids(s) for s in SETTINGS])
def test_token_terms_equal_the_dense_direction_of_each_token(setting):
    """<G_t, Delta_t> and u_t = Delta_t h_t on the top-K rows, against Delta_t = preview(G_t)
    formed densely for each token (after two real steps, so that the state is non-trivial)."""
    cls, kw = setting
    head = _head(2, True)
    opt = cls(head.parameters(), lr=0.1, **kw)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        head.weight.grad = torch.randn(V, H, generator=g, dtype=torch.float64)
        head.bias.grad = torch.randn(V, generator=g, dtype=torch.float64)
        opt.step()
    model = direction_for(opt, head.weight, head.bias)
    c, K = 6, 4
    h = torch.cat([torch.randn(c, H, generator=g, dtype=torch.float64), torch.ones(c, 1)], 1)
    rows = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(c)])
    s = torch.randn(c, K, generator=g, dtype=torch.float64)
    adv = torch.randn(c, generator=g, dtype=torch.float64)
    gd, u = model.token_terms(h, s, adv, rows)
    for t in range(c):
        G = torch.zeros(V, H + 1, dtype=torch.float64)
        G[rows[t]] = adv[t] * torch.outer(s[t], h[t])
        D = model.preview(G)
        assert torch.allclose(gd[t], (G * D).sum(), rtol=1e-10, atol=1e-13)
        assert torch.allclose(u[t], D[rows[t]] @ h[t], rtol=1e-10, atol=1e-13)


def test_models_read_the_optimizer_live_and_chunk_sizes_follow_the_model():
    head = _head(4, False)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    model = direction_for(opt, head.weight)
    assert isinstance(model, SGDOptimizerDirection) and not model.forms_token_matrices
    head.weight.grad = torch.ones(V, H, dtype=torch.float64)
    x = torch.randn(V, H, dtype=torch.float64)
    first = model.preview(x)
    assert torch.allclose(first, x)  # the buffer starts as the gradient: no drift yet
    opt.step()
    assert torch.allclose(model.preview(x), 0.9 * -torch.ones(V, H) + x)  # now mu * (-buffer)
    adam = direction_for(torch.optim.Adam(head.parameters(), lr=0.1), head.weight)
    assert isinstance(adam, AdamOptimizerDirection) and adam.forms_token_matrices
    m = CAPOMasker(1.0, 1.0, top_k=3, direction=adam)
    assert m._chunk(3, H, V) < CAPOMasker(1.0, 1.0, top_k=3, direction=model)._chunk(3, H, V)


def test_refusals_name_what_is_supported():
    head = _head(5, True)
    for cls in (torch.optim.RMSprop, torch.optim.NAdam, torch.optim.Adagrad, torch.optim.LBFGS):
        with pytest.raises(TypeError, match="supported optimizers are torch.optim.SGD"):
            direction_for(cls(head.parameters(), lr=0.1), head.weight, head.bias)

    class MyAdam(torch.optim.Adam):
        pass

    with pytest.raises(TypeError, match="MyAdam"):
        direction_for(MyAdam(head.parameters()), head.weight, head.bias)
    with pytest.raises(ValueError, match="maximize"):
        direction_for(torch.optim.Adam(head.parameters(), maximize=True), head.weight)
    with pytest.raises(ValueError, match="learning rate"):
        opt = torch.optim.SGD([{"params": [head.weight]}, {"params": [head.bias], "lr": 1.0}], 0.1)
        direction_for(opt, head.weight, head.bias)
    with pytest.raises(ValueError, match="param group"):
        direction_for(torch.optim.SGD([head.bias], 0.1), head.weight)
    sgd = torch.optim.SGD(head.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"a tensor of the head \(e.g. head.weight\), got float"):
        direction_for(sgd, 1.0, None)  # the learning rate where the weight goes
    with pytest.raises(TypeError, match=r"head.bias\), got str"):
        direction_for(sgd, head.weight, "bias")

    class Wrapper:  # like accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    inner = torch.optim.AdamW(head.parameters())
    assert direction_for(Wrapper(inner), head.weight, head.bias).optimizer is inner
