"""A failed ``load_state_dict`` raises a clear error and changes nothing, for every optimizer."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from curvopt.mfac import SlidingWindowMFAC
from curvopt.optim import MFAC, NHARPG, NPG, NPGIGT, GNSNewton

DT = torch.float64


def snapshot(obj):
    """Deep copy of a state dict (tensors cloned), to compare after a failed load."""
    return copy.deepcopy(obj.state_dict())


def assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class ScriptedSampler:
    """Deterministic estimates g(θ) = θ + 1 and B v = 2 v."""

    def __init__(self, module):
        self.module = module

    def gradient(self, params):
        return torch.cat([p.detach().reshape(-1) for p in params]) + 1.0

    def hvp(self, vector, params):
        return 2.0 * vector


def mfac_after_steps(shapes, m, lr, steps=3, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=DT, requires_grad=True) for s in shapes]
    opt = MFAC(params, lr=lr, m=m, damp=1e-2, momentum=0.9, **kw, graft=None)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=DT)
        opt.step()
    return params, opt


def test_mfac_failed_loads_change_nothing():
    params, opt = mfac_after_steps([(3, 4), (4,)], m=4, lr=0.01)
    before = snapshot(opt)
    # another model with the same number of tensors (shapes differ: d = 20 + 5)
    _, other = mfac_after_steps([(5, 4), (5,)], m=4, lr=0.5)
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(other.state_dict())
    assert_same(before, opt.state_dict())
    # same model, window of another m
    _, other_m = mfac_after_steps([(3, 4), (4,)], m=6, lr=0.5)
    with pytest.raises(ValueError, match="m=6"):
        opt.load_state_dict(other_m.state_dict())
    assert_same(before, opt.state_dict())
    # bad hyperparameters in the saved groups
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad)
    assert_same(before, opt.state_dict())
    assert opt.param_groups[0]["lr"] == 0.01
    for p in params:  # and the optimizer still steps
        p.grad = torch.ones_like(p)
    opt.step()


def test_mfac_resume_restores_the_skipped_step_counter():
    params, opt = mfac_after_steps([(3,)], m=2, lr=0.1, nonfinite="skip")
    params[0].grad = torch.tensor([1.0, float("nan"), 0.0], dtype=DT)
    opt.step()
    opt.step()
    assert int(opt.skipped_steps) == 2
    fresh = MFAC(
        [torch.zeros(3, dtype=DT, requires_grad=True)], m=2, damp=1e-2, nonfinite="skip", graft=None
    )
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert int(fresh.skipped_steps) == 2


def test_mfac_leaves_frozen_parameters_out_of_the_window():
    backbone = nn.Linear(64, 64).double().requires_grad_(False)
    head = nn.Linear(64, 3).double()
    params = [*backbone.parameters(), *head.parameters()]
    opt = MFAC(params, lr=0.1, m=8, damp=1e-2, graft=None)
    d = sum(p.numel() for p in head.parameters())
    assert opt.window.dim == d
    assert opt.memory_bytes() == 8 * d * 8 + 2 * 8 * 8 * 8
    frozen = [p.detach().clone() for p in backbone.parameters()]
    x = torch.randn(16, 64, dtype=DT)
    # reference: MFAC on the head alone gives the same step
    head_ref = copy.deepcopy(head)
    ref = MFAC(head_ref.parameters(), lr=0.1, m=8, damp=1e-2, graft=None)
    for module, o in ((head, opt), (head_ref, ref)):
        o.zero_grad()
        module(backbone(x)).square().sum().backward()
        o.step()
    for p, q in zip(head.parameters(), head_ref.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(backbone.parameters(), frozen):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="requires_grad=True"):
        MFAC(backbone.parameters(), lr=0.1, graft=None)
    next(backbone.parameters()).requires_grad_(True)
    next(backbone.parameters()).grad = torch.ones(64, 64, dtype=DT)
    with pytest.raises(ValueError, match="requires_grad was changed"):
        opt.step()


def quadratic_gns(d, curvature="mfac", gamma0=2.0):
    torch.manual_seed(d)
    w = torch.randn(d, dtype=DT, requires_grad=True)
    A = torch.randn(d, d, dtype=DT)
    A = A @ A.T + torch.eye(d, dtype=DT)
    opt = GNSNewton([w], curvature=curvature if curvature != "dense" else A, gamma0=gamma0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w - w.sum() + 0.1 * (w**4).sum()
        loss.backward()
        return loss

    return w, opt, closure


def test_gns_newton_failed_load_changes_nothing():
    w, opt, closure = quadratic_gns(3)
    opt.step(closure)
    before, gamma = snapshot(opt), opt.gamma
    _, big, big_closure = quadratic_gns(5, gamma0=7.0)
    for _ in range(2):
        big.step(big_closure)
    assert big.gamma != gamma
    with pytest.raises(ValueError, match=r"groups of \[5\] entries.*have \[3\]"):
        opt.load_state_dict(big.state_dict())
    assert opt.gamma == gamma
    assert_same(before, opt.state_dict())
    broken = copy.deepcopy(before)
    broken["state"]["gns"]["gamma"] = float("nan")
    with pytest.raises(ValueError, match="gamma"):
        opt.load_state_dict(broken)
    assert_same(before, opt.state_dict())
    opt.step(closure)


def test_gns_newton_warns_when_every_trial_loss_is_nonfinite():
    """After a step the evaluation at x is reused; a closure that now returns NaN is seen only
    at the trial points: every trial is rejected, and the step says why instead of going on
    silently (the parameters stay at x, as on_exhausted='take_last' does for a NaN last trial)."""
    w, opt, closure = quadratic_gns(3, curvature="dense")
    opt.step(closure)
    x, exhausted = w.detach().clone(), opt.state["gns"]["exhausted"]

    def nan_closure():
        opt.zero_grad()
        loss = closure() * math.nan
        return loss

    with pytest.warns(RuntimeWarning, match="NaN/Inf at all 40 trial points") as caught:
        opt.step(nan_closure)
    assert caught[0].filename == __file__  # points at the caller of step
    assert torch.equal(w.detach(), x)
    assert opt.state["gns"]["exhausted"] == exhausted + 1
    opt.param_groups[0]["reuse_evaluation"] = False
    with pytest.raises(ValueError, match="NaN/Inf"):  # evaluated at x: a clear error there
        opt.step(nan_closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary exhausted step (finite losses) stays quiet
        w2, opt2, closure2 = quadratic_gns(3, curvature="dense")
        opt2.param_groups[0]["max_trials"] = 1
        opt2.state["gns"]["gamma"] = 1e6  # too long a step: rejected
        opt2.step(closure2)
        assert opt2.state["gns"]["exhausted"] == 1


@pytest.mark.parametrize("cls", [NHARPG, NPGIGT])
def test_momentum_pg_failed_load_changes_nothing(cls):
    torch.manual_seed(0)
    small, big = nn.Linear(3, 2).double(), nn.Linear(4, 2).double()
    opt, other = cls(small.parameters(), lr=0.1), cls(big.parameters(), lr=0.5)
    opt.step(ScriptedSampler(small))
    other.step(ScriptedSampler(big))
    before = snapshot(opt)
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(other.state_dict())
    assert_same(before, opt.state_dict())
    assert opt.param_groups[0]["lr"] == 0.1


def test_nharpg_bad_generator_state_changes_nothing():
    module = nn.Linear(3, 2).double()
    opt = NHARPG(module.parameters(), lr=0.1, generator=torch.Generator().manual_seed(0))
    opt.step(ScriptedSampler(module))
    before, gen_state = snapshot(opt), opt.generator.get_state()
    bad = copy.deepcopy(before)
    bad["generator_state"] = torch.zeros(3, dtype=torch.uint8)
    bad["param_groups"][0]["lr"] = 0.9
    with pytest.raises(ValueError, match="generator state"):
        opt.load_state_dict(bad)
    assert_same(before, opt.state_dict())
    assert torch.equal(opt.generator.get_state(), gen_state)


def test_npg_failed_load_changes_nothing():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    opt = NPG(a.parameters(), delta=0.01)
    other = NPG([{"params": [b.weight]}], delta=0.5)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(other.state_dict())
    assert_same(before, opt.state_dict())
    with pytest.raises(TypeError, match="param_groups"):
        opt.load_state_dict({"state": {}})


def test_window_failed_load_changes_nothing():
    w = SlidingWindowMFAC(6, 3, 1e-2, dtype=DT)
    for _ in range(4):
        w.add(torch.randn(6, dtype=DT))
    before = copy.deepcopy(w.state_dict())
    for key, value in [
        ("K", torch.zeros(2, 2, dtype=DT)),
        ("damp", -1.0),
        ("count", -3),
        ("refresh_every", 0),
    ]:
        bad = dict(before, **{key: value})
        with pytest.raises((ValueError, TypeError)):
            w.load_state_dict(bad)
        assert_same(before, w.state_dict())


def test_gns_newton_nan_curvature_raises_and_changes_nothing():
    w, opt, closure = quadratic_gns(3)
    opt.step(closure)
    before, w0 = snapshot(opt), w.detach().clone()
    H = torch.eye(3, dtype=DT)
    H[0, 1] = H[1, 0] = float("nan")
    opt._curvature = H  # a curvature that turned non-finite (e.g. an overflowing model)
    with pytest.raises(ValueError, match="NaN/Inf"):
        opt.step(closure)
    assert torch.equal(w.detach(), w0)
    assert_same(before, opt.state_dict())
    opt._curvature = lambda params: NanOperator()  # NaN only in the products (CG path too)
    opt.param_groups[0]["dense_threshold"] = 0
    with pytest.raises(ValueError, match="NaN/Inf"):
        opt.step(closure)
    assert torch.equal(w.detach(), w0)
    assert opt.gamma == before["state"]["gns"]["gamma"]


class NanOperator:
    def __matmul__(self, v):
        return torch.full_like(v, float("nan"))


@pytest.mark.parametrize("change", ["vector_to_parameters", "data"])
def test_gns_newton_sees_parameters_changed_outside_step(change):
    w, opt, closure = quadratic_gns(3, curvature="dense")
    opt.step(closure)
    new = torch.full((3,), 4.0, dtype=DT)
    if change == "data":
        w.data.copy_(new)
    else:
        torch.nn.utils.vector_to_parameters(new.clone(), [w])
    expected = float(closure().detach())
    assert float(opt.step(closure)) == expected
    assert not torch.equal(w.detach(), new)  # and it moved from there


def test_gns_newton_rejects_complex_parameters_and_sparse_gradients():
    with pytest.raises(TypeError, match="real floating-point"):
        GNSNewton([torch.zeros(2, dtype=torch.complex128, requires_grad=True)], curvature="mfac")
    emb = nn.Embedding(5, 2, sparse=True).double()
    opt = GNSNewton(emb.parameters(), curvature="mfac")

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([0, 3])).square().sum()
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="sparse"):
        opt.step(closure)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s["exp_avg_sq"].__setitem__(0, float("nan")), "finite and >= 0"),
        (lambda s: s["exp_avg_sq"].__setitem__(0, -1.0), "finite and >= 0"),
        (lambda s: s.__setitem__("exp_avg_sq", s["exp_avg_sq"][:-1]), "flat tensor of 12"),
        (lambda s: s.__setitem__("exp_avg_sq", s["exp_avg_sq"].reshape(3, 4)), "flat tensor"),
        (lambda s: s.__setitem__("step", torch.tensor(float("inf"))), "finite scalar"),
        (lambda s: s.pop("step"), "only one of"),
    ],
)
def test_mfac_graft_state_is_checked_and_a_failed_load_changes_nothing(corrupt, message):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=DT, requires_grad=True) for s in [(3, 4), (4,)]]
    opt = MFAC(params, lr=0.01, m=4)  # the default: the Adam graft keeps exp_avg_sq and step
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=DT)
        opt.step()
    before = snapshot(opt)
    bad = copy.deepcopy(before)
    corrupt(bad["state"][0])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert_same(before, opt.state_dict())
    opt.load_state_dict(copy.deepcopy(before))  # the intact state still loads
    assert_same(before, opt.state_dict())


def _mfac_and_steps():
    params, opt = mfac_after_steps([(3, 4), (4,)], m=4, lr=0.01)

    def step(o, ps):
        for k, p in enumerate(ps):
            p.grad = torch.full_like(p, 0.1 * (k + 1))
        o.step()

    return params, opt, step


def _momentum_pg(cls):
    def build():
        module = nn.Linear(3, 2).double()
        kwargs = {"generator": torch.Generator().manual_seed(0)} if cls is NHARPG else {}
        opt = cls(module.parameters(), lr=0.1, **kwargs)
        opt.step(ScriptedSampler(module))

        def step(o, ps):
            o.step(ScriptedSampler(None))  # g(θ) = θ + 1 of the parameters o holds

        return list(module.parameters()), opt, step

    return build


def _gns():
    w, opt, closure = quadratic_gns(4, curvature="dense")
    opt.step(closure)

    def step(o, ps):
        (v,) = ps

        def loss():
            o.zero_grad()
            value = (v**2).sum() + v.sum()
            value.backward()
            return value

        o.step(loss)

    return [w], opt, step


@pytest.mark.parametrize(
    "build",
    [_mfac_and_steps, _momentum_pg(NHARPG), _momentum_pg(NPGIGT), _gns],
    ids=["mfac", "nharpg", "npgigt", "gns_newton"],
)
def test_a_deep_copy_is_whole_and_loads_its_own_state(build):
    # torch's Optimizer.__getstate__ keeps only defaults/state/param_groups: a copy (deepcopy,
    # pickle; Hugging Face's Trainer) lost M-FAC's window and the samplers' generator. Its
    # __setstate__ also adds defaults["differentiable"], absent from saved groups: still valid.
    params, opt, step = build()
    clone = copy.deepcopy(opt)
    assert "differentiable" in clone.defaults
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    # copied together with its parameters, the copy steps exactly as the original
    clone = copy.deepcopy({"o": opt, "p": params})
    step(opt, params)
    step(clone["o"], clone["p"])
    for a, b in zip(params, clone["p"]):
        assert torch.equal(a, b)
