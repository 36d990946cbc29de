"""MFAC's drop-in defaults: the window-size rule, the memory warning and the grafted step.

The grafted step (``graft="adam"``, the default) is checked against a dense float64 statement of
its documented formula, and for scale invariance: multiplying the loss by ``c`` must leave the
trajectory unchanged up to rounding.
"""

import copy
import io

import pytest
import torch
from mfac_problem import DT, flat, make_loss, make_params

from curvopt.optim import MFAC
from curvopt.optim.mfac import DEFAULT_M

SLICES = [slice(0, 6), slice(6, 8), slice(8, 12)]


def grafted_reference(
    loss_flat, w0, *, lr, m, damp, momentum, beta2, eps, steps, scale=1.0, graft="adam"
):
    """Dense float64 statement of the documented grafted step (independent of the window code)."""
    w = w0.clone()
    rows, v, b = [], torch.zeros_like(w), torch.zeros_like(w)
    traj = []
    for t in range(1, steps + 1):
        g = torch.func.grad(lambda x: scale * loss_flat(x))(w)
        v = beta2 * v + (1 - beta2) * g.square()
        a = g / ((v / (1 - beta2**t)).sqrt() + eps)
        row = a if graft == "adam" else g
        rows.append(row / row.norm())
        G = torch.stack(rows[-m:])
        F = (damp / m) * torch.eye(w.numel(), dtype=DT) + G.T @ G / m
        u = torch.linalg.solve(F, rows[-1])
        s = torch.empty_like(u)
        for sl in SLICES:
            s[sl] = u[sl] * a[sl].norm() / u[sl].norm()
        b = momentum * b + s
        w = w - lr * (1 - momentum) / (1 - momentum**t) * b
        traj.append(w.clone())
    return traj


def run(opt, params, loss_flat, steps, scale=1.0):
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        (scale * loss_flat(torch.cat([p.reshape(-1) for p in params]))).backward()
        opt.step()
        traj.append(flat(params))
    return traj


@pytest.mark.parametrize("graft", ["adam", "adam-grad"])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_grafted_step_matches_dense_reference(eps, graft):
    loss_flat, params = make_loss(), make_params()
    w0 = flat(params)
    kw = dict(lr=0.05, m=3, damp=0.1, momentum=0.8, beta2=0.9, eps=eps, graft=graft)
    got = run(MFAC(params, **kw), params, loss_flat, 8)  # 8 > m: the ring wraps around
    want = grafted_reference(loss_flat, w0, steps=8, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("graft", ["adam", "adam-grad"])
@pytest.mark.parametrize("c", [1e-4, 3.0, 1e5])
def test_grafted_step_is_invariant_to_the_loss_scale(c, graft):
    loss_flat = make_loss(seed=2)
    kw = dict(lr=0.05, m=4, damp=1e-2, momentum=0.9, eps=0.0, graft=graft)
    base_params, scaled_params = make_params(seed=3), make_params(seed=3)
    base = run(MFAC(base_params, **kw), base_params, loss_flat, 10)
    scaled = run(MFAC(scaled_params, **kw), scaled_params, loss_flat, 10, scale=c)
    for a, b in zip(base, scaled):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # rounding, times cond(F)
    # and the dense reference agrees at this scale, too
    want = grafted_reference(
        loss_flat, flat(make_params(seed=3)), steps=10, beta2=0.999, scale=c, **kw
    )
    torch.testing.assert_close(scaled[-1], want[-1], rtol=1e-9, atol=1e-11)


def test_authors_step_is_not_scale_invariant():
    """The reason for the default: with an absolute damping the step moves with the loss scale."""
    loss_flat = make_loss(seed=2)
    kw = dict(lr=1e-3, m=4, damp=1e-5, graft=None)
    a, b = make_params(seed=3), make_params(seed=3)
    wa = run(MFAC(a, **kw), a, loss_flat, 1)[-1] - flat(make_params(seed=3))
    wb = run(MFAC(b, **kw), b, loss_flat, 1, scale=10.0)[-1] - flat(make_params(seed=3))
    ratio = wa.norm() / wb.norm()  # 10, up to the damping
    torch.testing.assert_close(ratio, torch.tensor(10.0, dtype=DT), rtol=1e-3, atol=0)


def test_only_lr_gives_a_small_window():
    model = torch.nn.Linear(50, 20)
    d = sum(p.numel() for p in model.parameters())
    opt = MFAC(model.parameters(), lr=1e-3)
    assert opt.window.m == DEFAULT_M <= 64
    assert opt.window.G.numel() <= 64 * d
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.window.damp == pytest.approx(1.0 / DEFAULT_M)


def test_default_window_follows_the_memory_budget():
    model = torch.nn.Linear(50, 20)  # d = 1020 float32: 4080 bytes per gradient
    opt = MFAC(model.parameters(), lr=1e-3, max_window_bytes=10 * 4080 + 5)
    assert opt.window.m == 10
    opt = MFAC(model.parameters(), lr=1e-3, max_window_bytes=100)  # less than one gradient
    assert opt.window.m == 1


def test_explicit_window_above_the_budget_warns_with_its_size():
    model = torch.nn.Linear(300, 300)  # d = 90_300 float32: m = 64 takes 23.1 MB = 0.02 GiB
    with pytest.warns(UserWarning, match=r"0\.02 GiB") as rec:
        MFAC(model.parameters(), lr=1e-3, m=64, max_window_bytes=2**20)
    assert "m=64" in str(rec[0].message)
    with warnings_as_errors():  # under the budget: silent
        MFAC(model.parameters(), lr=1e-3, m=2, max_window_bytes=2**20)


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_authors_settings_are_one_argument_set_away():
    model = torch.nn.Linear(4, 2)
    with pytest.warns(UserWarning, match="GiB"):
        opt = MFAC(model.parameters(), lr=1e-3, m=1024, damp=1e-5, graft=None, max_window_bytes=1)
    assert opt.window.m == 1024 and opt.window.damp == 1e-5
    assert opt.param_groups[0]["momentum"] == 0.0


def test_grafted_state_dict_resume_is_bit_for_bit():
    loss_flat = make_loss(seed=4)
    a = make_params(seed=5)
    opt_a = MFAC(a, lr=0.05, m=3)
    run(opt_a, a, loss_flat, 9)

    b = make_params(seed=5)
    opt_b = MFAC(b, lr=0.05, m=3)
    run(opt_b, b, loss_flat, 5)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    c = [t.clone().requires_grad_() for t in saved["params"]]
    opt_c = MFAC(c, lr=0.05, m=3)
    opt_c.load_state_dict(saved["opt"])
    assert set(opt_c.state[c[0]]) == {"exp_avg_sq", "step", "momentum_buffer"}
    run(opt_c, c, loss_flat, 4)
    for pa, pc in zip(a, c):
        assert torch.equal(pa, pc)


def test_grafted_skip_of_a_nonfinite_gradient_changes_nothing():
    loss_flat = make_loss(seed=6)
    params = make_params(seed=7)
    opt = MFAC(params, lr=0.05, m=3, nonfinite="skip")
    run(opt, params, loss_flat, 2)
    before = (flat(params), copy.deepcopy(opt.state_dict()))
    opt.zero_grad()
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert int(opt.skipped_steps) == 1
    assert torch.equal(flat(params), before[0])
    for i, p in enumerate(params):
        for key in ("exp_avg_sq", "step", "momentum_buffer"):
            assert torch.equal(opt.state[p][key], before[1]["state"][i][key])


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(graft="shampoo"), "graft"),
        (dict(graft="Adam"), "graft"),
        (dict(beta2=1.0), "beta2"),
        (dict(eps=-1e-8), "eps"),
        (dict(max_window_bytes=0), "max_window_bytes"),
        (dict(m=None, damp=0.0), "damp"),
    ],
)
def test_bad_new_hyperparameters_raise_naming_the_value(kwargs, word):
    with pytest.raises(ValueError, match=word):
        MFAC(make_params(), **kwargs)


def test_grafted_resume_of_float32_parameters_is_bit_for_bit():
    """torch.optim casts floating state to the parameters' dtype on load, except ``step``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    X, y = torch.randn(8, 10, 6), torch.randint(0, 3, (8, 10))

    def train(model, opt, steps):
        for t in steps:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[t]), y[t]).backward()
            opt.step()

    ref = copy.deepcopy(model)
    opt_ref = MFAC(ref.parameters(), lr=1e-2, m=3)
    train(ref, opt_ref, range(8))
    opt = MFAC(model.parameters(), lr=1e-2, m=3)
    train(model, opt, range(4))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2 = torch.nn.Linear(6, 3)
    model2.load_state_dict(saved[0])
    opt2 = MFAC(model2.parameters(), lr=1e-2, m=3)
    opt2.load_state_dict(saved[1])
    assert opt2.state[model2.weight]["step"].dtype == torch.float64
    train(model2, opt2, range(4, 8))
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)
