"""MFAC optimizer against a dense float64 statement of its documented update."""

import io

import pytest
import torch
from mfac_problem import DT, flat, make_loss, make_params

from curvopt.optim import MFAC

D = 12


def reference_run(loss_flat, w0, groups, m, damp, steps, dead=(), skipped=()):
    """Dense float64 trajectory. groups: list of (index slice, lr, momentum, wd, decoupled).

    ``dead``: flat indices whose parameter has no gradient (zero in the window, never updated).
    ``skipped``: steps whose gradient was non-finite under nonfinite="skip": the row the window
    would evict is inserted again, nothing else changes.
    """
    w = w0.clone().to(DT)
    rows, bufs = [], [torch.zeros(sl.stop - sl.start, dtype=DT) for sl, *_ in groups]
    alive = torch.ones(w.numel(), dtype=DT)
    alive[list(dead)] = 0
    traj = []
    for t in range(steps):
        if t in skipped:
            rows.append(rows[-m] if len(rows) >= m else torch.zeros_like(w))
            traj.append(w.clone())
            continue
        g = torch.func.grad(loss_flat)(w) * alive
        for sl, _lr, _mom, wd, decoupled in groups:
            if not decoupled:
                g[sl] += wd * w[sl] * alive[sl]
        rows.append(g)
        G = torch.stack(rows[-m:])
        F = damp * torch.eye(w.numel(), dtype=DT) + G.T @ G / m
        u = torch.linalg.solve(F, g)
        w_new = w.clone()
        for k, (sl, lr, mom, wd, decoupled) in enumerate(groups):
            u_k = u[sl] * alive[sl]
            if mom:
                bufs[k] = mom * bufs[k] + u_k
                u_k = bufs[k]
            keep = 1 - lr * wd * alive[sl] if decoupled else 1.0
            w_new[sl] = w[sl] * keep - lr * u_k * alive[sl]
        w = w_new
        traj.append(w.clone())
    return traj


def run_optimizer(opt, params, loss_flat, steps, dead_params=()):
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        used = [p if i not in dead_params else p.detach() for i, p in enumerate(params)]
        loss_flat(torch.cat([p.reshape(-1) for p in used]).to(DT)).backward()
        opt.step()
        traj.append(flat(params).to(DT))
    return traj


def test_direction_is_dense_inverse_fisher_times_gradient():
    loss_flat = make_loss()
    params = make_params()
    w0 = flat(params)
    m, damp = 3, 1e-2
    opt = MFAC(params, lr=1.0, m=m, damp=damp, graft=None)
    got = run_optimizer(opt, params, loss_flat, 7)  # 7 > m: the ring wraps around
    want = reference_run(loss_flat, w0, [(slice(0, D), 1.0, 0.0, 0.0, False)], m, damp, 7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("decoupled", [False, True])
def test_param_groups_weight_decay_and_momentum(decoupled):
    loss_flat = make_loss(seed=2)
    params = make_params(seed=3)
    w0 = flat(params)
    m, damp = 4, 5e-2
    opt = MFAC(
        [
            {"params": params[:2], "lr": 0.05, "weight_decay": 0.3},
            {"params": params[2:], "momentum": 0.5},
        ],
        lr=0.02,
        m=m,
        damp=damp,
        momentum=0.9,
        weight_decay=0.1,
        decoupled_weight_decay=decoupled,
        graft=None,
    )
    got = run_optimizer(opt, params, loss_flat, 8)
    groups = [(slice(0, 8), 0.05, 0.9, 0.3, decoupled), (slice(8, 12), 0.02, 0.5, 0.1, decoupled)]
    want = reference_run(loss_flat, w0, groups, m, damp, 8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_parameters_without_gradient_are_skipped():
    loss_flat = make_loss(seed=4)
    params = make_params(seed=5)
    w0 = flat(params)
    opt = MFAC(params, lr=0.1, m=3, damp=1e-1, momentum=0.9, weight_decay=0.2, graft=None)
    got = run_optimizer(opt, params, loss_flat, 5, dead_params=(1,))  # b (flat 6:8) gets no grad
    assert params[1].grad is None
    assert "momentum_buffer" not in opt.state[params[1]]
    want = reference_run(
        loss_flat, w0, [(slice(0, D), 0.1, 0.9, 0.2, False)], 3, 1e-1, 5, dead=(6, 7)
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(params[1].detach(), w0[6:8])
    assert torch.count_nonzero(opt.window.G[:, 6:8]) == 0


def test_step_without_any_gradient_changes_nothing():
    params = make_params()
    opt = MFAC(params, lr=0.1, m=3, damp=1.0, graft=None)
    before = flat(params)
    with pytest.warns(UserWarning, match="no gradient on any of its parameters") as record:
        opt.step()
    # the warning points at the line that called step, not inside torch.optim
    assert [w.filename for w in record] == [__file__]
    assert opt.window.count == 0
    assert torch.equal(flat(params), before)


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("before", [2, 4])  # window still filling / full (m = 3)
def test_nonfinite_gradient_never_enters_the_window(mode, before):
    loss_flat = make_loss(seed=6)
    params = make_params(seed=7)
    w0 = flat(params)
    m, damp = 3, 1e-1
    opt = MFAC(params, lr=0.1, m=m, damp=damp, momentum=0.9, nonfinite=mode, graft=None)
    run_optimizer(opt, params, loss_flat, before)
    K_before = opt.window.K.clone()
    w_before = flat(params)
    buf_before = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[2].grad[1] = float("nan")
    if mode == "raise":
        with pytest.raises(ValueError, match="NaN or Inf"):
            opt.step()
        assert opt.window.count == before
    else:
        opt.step()
        assert int(opt.skipped_steps) == 1
    assert torch.isfinite(opt.window.G).all()
    torch.testing.assert_close(opt.window.K, K_before, rtol=1e-12, atol=1e-12)
    assert torch.equal(flat(params), w_before)
    for p, b in zip(params, buf_before):
        assert torch.equal(opt.state[p]["momentum_buffer"], b)
    # the rest of the trajectory: raise = as if the bad step never happened; skip = as documented
    got = run_optimizer(opt, params, loss_flat, 4)
    groups = [(slice(0, D), 0.1, 0.9, 0.0, False)]
    if mode == "raise":
        want = reference_run(loss_flat, w0, groups, m, damp, before + 4)[before:]
    else:
        want = reference_run(loss_flat, w0, groups, m, damp, before + 5, skipped={before})
        want = want[before + 1 :]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_skip_mode_step_has_no_host_synchronization(monkeypatch):
    loss_flat = make_loss()
    params = make_params()
    opt = MFAC(
        params, lr=0.1, m=3, damp=1e-1, momentum=0.9, weight_decay=0.1, nonfinite="skip", graft=None
    )
    run_optimizer(opt, params, loss_flat, 1)
    opt.zero_grad()
    loss_flat(torch.cat([p.reshape(-1) for p in params])).backward()
    # the device path, as a CUDA window takes it: a CPU window's m x m bookkeeping goes through
    # NumPy views of its own CPU tensors, which synchronizes nothing
    opt.window._cpu = False

    def sync(*args, **kwargs):
        raise AssertionError("host-device synchronization inside step()")

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for _ in range(4):  # fills and wraps the window (m = 3), with a refresh on the way
        opt.step()
    monkeypatch.undo()
    assert opt.window.count == 5


def test_bf16_window_matches_dense_reference_of_rounded_gradients():
    loss_flat = make_loss(seed=8)
    params = make_params(seed=9, dtype=torch.float32)
    m, damp = 4, 1e-1
    opt = MFAC(params, lr=1.0, m=m, damp=damp, window_dtype=torch.bfloat16, graft=None)
    rows = []
    for _ in range(6):
        w = flat(params).to(DT)
        opt.zero_grad()
        loss_flat(torch.cat([p.reshape(-1) for p in params]).to(DT)).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).to(DT)
        rows.append(g.to(torch.bfloat16).to(DT))
        G = torch.stack(rows[-m:])
        F = damp * torch.eye(D, dtype=DT) + G.T @ G / m
        opt.step()
        step = flat(params).to(DT) - w
        torch.testing.assert_close(step, -torch.linalg.solve(F, g), rtol=2e-3, atol=2e-4)
    assert opt.window.G.dtype == torch.bfloat16
    # G, K and A^{-1}, and the m I that the fresh factors of a small window use
    assert opt.memory_bytes() == m * D * 2 + 2 * m * m * 8 + m * m * 8


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def make_mfac(model):
    return MFAC(
        [
            {"params": model[0].parameters(), "weight_decay": 1e-2},
            {"params": model[2].parameters(), "decoupled_weight_decay": True, "lr": 0.05},
        ],
        lr=0.1,
        m=4,
        damp=1e-2,
        momentum=0.9,
        weight_decay=1e-3,
        graft=None,
    )


def train(model, opt, data, steps):
    X, y = data
    for t in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[t]), y[t]).backward()
        opt.step()


def test_state_dict_resume_is_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    N = 7
    X = torch.randn(2 * N, 10, 6, generator=gen)
    y = torch.randint(0, 3, (2 * N, 10), generator=gen)
    model_a = mlp(0)
    opt_a = make_mfac(model_a)
    train(model_a, opt_a, (X, y), 2 * N)

    model_b = mlp(0)
    opt_b = make_mfac(model_b)
    train(model_b, opt_b, (X, y), N)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model_c = mlp(1)
    model_c.load_state_dict(saved["model"])
    opt_c = make_mfac(model_c)
    opt_c.load_state_dict(saved["opt"])
    train(model_c, opt_c, (X[N:], y[N:]), N)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
    assert torch.equal(opt_a.window.G, opt_c.window.G)


def test_memory_bytes_counts_window_and_buffers():
    params = make_params(dtype=torch.float32)
    opt = MFAC(params, m=16, damp=1e-3, momentum=0.9, graft=None)
    window = 16 * D * 4 + 2 * 16 * 16 * 8
    assert opt.memory_bytes() == window
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    # momentum; the CPU step's LAPACK workspace: m I and A (float64 16 x 16), the right-hand
    # side (float64 16) and the coefficients (float32 16)
    assert opt.memory_bytes() == window + D * 4 + 2 * 16 * 16 * 8 + 16 * 8 + 16 * 4
    assert opt.window.Ainv.shape == (16, 16)  # forming A^{-1} from the factors adds a tensor m I
    assert opt.memory_bytes() == window + D * 4 + 3 * 16 * 16 * 8 + 16 * 8 + 16 * 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1e-3),
        dict(m=0),
        dict(m=2.5),
        dict(damp=0.0),
        dict(damp=-1e-3),
        dict(momentum=1.0),
        dict(momentum=-0.1),
        dict(weight_decay=-1.0),
        dict(window_dtype=torch.int32),
        dict(nonfinite="ignore"),
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        MFAC(make_params(), **kwargs, graft=None)


def test_bad_groups_raise():
    params = make_params()
    with pytest.raises(ValueError, match="lr"):
        MFAC([{"params": params[:1], "lr": -1.0}, {"params": params[1:]}], graft=None)
    with pytest.raises(ValueError, match="constructor"):
        MFAC([{"params": params[:1], "m": 8}, {"params": params[1:]}], graft=None)
    opt = MFAC(params[:2], graft=None)
    with pytest.raises(ValueError, match="constructor"):
        opt.add_param_group({"params": params[2:]})
    with pytest.raises(ValueError, match="dtype"):
        MFAC([params[0], params[1].detach().float().requires_grad_()], graft=None)


def test_closure_is_called_once_and_its_loss_returned():
    loss_flat = make_loss()
    params = make_params()
    opt = MFAC(params, lr=0.1, m=2, damp=1.0, graft=None)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = loss_flat(torch.cat([p.reshape(-1) for p in params]))
        loss.backward()
        return loss

    before = flat(params)
    loss = opt.step(closure)
    assert calls[0] == 1
    torch.testing.assert_close(loss.detach(), loss_flat(before))
    assert not torch.equal(flat(params), before)


def test_momentum_matches_the_reference_optimizer_with_rescaled_lr():
    """The authors' optimizer averages, v <- mu v + (1 - mu) u, step -lr_ref v (v = 0 at first);
    ours sums, b <- mu b + u, step -lr b. With lr = (1 - mu) lr_ref the 50-step trajectories agree
    (dense float64 reference with the authors' update)."""
    loss_flat = make_loss(seed=4)
    params = make_params(seed=5)
    w = flat(params)
    m, damp, mu, lr_ref, steps = 4, 1e-2, 0.9, 0.05, 50
    opt = MFAC(params, lr=(1 - mu) * lr_ref, m=m, damp=damp, momentum=mu, graft=None)
    got = run_optimizer(opt, params, loss_flat, steps)
    rows, v = [], torch.zeros_like(w)
    for t in range(steps):
        g = torch.func.grad(loss_flat)(w)
        rows.append(g)
        G = torch.stack(rows[-m:])
        u = torch.linalg.solve(damp * torch.eye(D, dtype=DT) + G.T @ G / m, g)
        v = mu * v + (1 - mu) * u
        w = w - lr_ref * v
        torch.testing.assert_close(got[t], w, rtol=1e-10, atol=1e-12)
    assert (got[-1] - got[0]).norm() > 1e-2  # it moved


def test_window_of_dependent_gradients_gives_accurate_steps():
    """d = 3 < m = 6 at damp 1e-8 (R ~ 1e12): the window's explicit m x m inverse used to give
    steps off by up to 100 %; with nonfinite="raise" the optimizer's refresh check puts the
    window in factored mode and every step matches -lr F^{-1} g within 1e3 eps R."""
    m, damp, lr = 6, 1e-8, 1.0
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(3, 3, generator=gen, dtype=DT)
    A = 1e2 * (A @ A.T + torch.eye(3, dtype=DT))
    w = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=DT))
    opt = MFAC([w], lr=lr, m=m, damp=damp, graft=None)
    rows = []
    for i in range(2 * m + 3):
        opt.zero_grad()
        (0.5 * w @ A @ w + (w**3).sum()).backward()
        g = w.grad.detach().clone()
        rows.append(g)
        G = torch.stack(rows[-m:])
        G = torch.cat([G, torch.zeros(m - len(G), 3, dtype=DT)])
        F = damp * torch.eye(3, dtype=DT) + G.T @ G / m
        R = torch.linalg.eigvalsh(F)[-1].item() / damp
        before = w.detach().clone()
        opt.step()
        want = -lr * torch.linalg.solve(F, g)
        got = w.detach() - before
        if i >= m:  # refreshed at step m: factored from there on
            assert opt.window.factored
            assert ((got - want).norm() / want.norm()).item() <= 1e3 * 2.2e-16 * R, i
        with torch.no_grad():
            w.copy_(before + 1e-3 * torch.randn(3, generator=gen, dtype=DT))  # keep w bounded
