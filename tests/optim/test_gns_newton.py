"""GNSNewton against a dense float64 re-computation of the step rule."""

import io
import math

import pytest
import torch

from curvopt.optim import GNSNewton

DT = torch.float64


def logistic_problem(seed=0, n=40, d=5, mu=1e-3):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    y = (torch.rand(n, generator=gen, dtype=DT) < torch.sigmoid(X[:, 0] - X[:, 1])).to(DT)

    def f(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * mu * (
            w.square().sum()
        )

    return f, d


def quadratic_problem(diag=(1.0, 2.0, 5.0)):
    A = torch.diag(torch.tensor(diag, dtype=DT))
    b = torch.arange(1, len(diag) + 1, dtype=DT)

    def f(w):
        return 0.5 * w @ A @ w - b @ w

    return f, len(diag)


def make_closure(f, w, opt, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = f(w)
        loss.backward()
        return loss

    return closure


def grad_of(f, x):
    return torch.func.grad(f)(x)


def reference_step(f, H, x, gamma, gamma_min, max_trials, take_last=True):
    """Dense float64 statement of one GNS step: (new x, new gamma, trials, points evaluated)."""
    g = grad_of(f, x)
    gn = torch.linalg.vector_norm(g)
    eye = torch.eye(x.numel(), dtype=DT)
    points, last = 0, None
    for t in range(1, max_trials + 1):
        lam = gn / gamma
        M = H + lam * eye
        if torch.linalg.eigvalsh(M).min() <= 0:
            gamma /= 2
            last = None
            continue
        xp = x + torch.linalg.solve(M, -g)
        points += 1
        last = xp
        if f(x) - f(xp) >= grad_of(f, xp).square().sum() / (8 * lam):
            return xp, max(2 * gamma, gamma_min), t, points
        gamma /= 2
    new_x = last if (take_last and last is not None) else x
    return new_x, gamma, max_trials, points


def test_dense_steps_match_reference_with_exact_hessian():
    f, d = logistic_problem()
    w = torch.zeros(d, dtype=DT, requires_grad=True)
    opt = GNSNewton([w], curvature=lambda ps: torch.func.hessian(f)(ps[0].detach()), gamma0=0.5)
    closure = make_closure(f, w, opt)
    x = w.detach().clone()
    gamma = 0.5
    for _ in range(4):
        H = torch.func.hessian(f)(x)
        x_ref, gamma_ref, trials, _ = reference_step(f, H, x, gamma, 1e-9, 40)
        opt.step(closure)
        torch.testing.assert_close(w.detach(), x_ref, rtol=1e-12, atol=1e-13)
        assert opt.gamma == pytest.approx(gamma_ref, rel=0, abs=0)
        assert opt.state["gns"]["last_trials"] == trials
        x, gamma = x_ref, gamma_ref


class MatrixOperator:
    """An operator known only through `@` (no to_dense)."""

    def __init__(self, A):
        self.A = A
        self.products = 0

    def __matmul__(self, v):
        self.products += 1
        return self.A @ v


@pytest.mark.parametrize("mode", ["dense_by_products", "cg", "cg_jacobi", "cg_callable"])
def test_operator_paths_solve_the_damped_system(mode):
    f, d = logistic_problem(seed=1, d=6)
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(d, d, generator=gen, dtype=DT)
    H_fixed = B @ B.T / d + 0.1 * torch.eye(d, dtype=DT)  # a fixed PSD approximation
    op = MatrixOperator(H_fixed)
    kwargs = dict(dense_threshold=100 if mode == "dense_by_products" else 0, cg_rtol=1e-13)
    if mode == "cg_jacobi":
        kwargs["preconditioner"] = "jacobi"
    if mode == "cg_callable":
        D = torch.diagonal(H_fixed)
        kwargs["preconditioner"] = lambda r, lam: r / (D + lam)
    w = torch.zeros(d, dtype=DT, requires_grad=True)
    opt = GNSNewton([w], curvature=op, gamma0=2.0, **kwargs)
    closure = make_closure(f, w, opt)
    x, gamma = w.detach().clone(), 2.0
    for _ in range(4):
        x_ref, gamma_ref, trials, _ = reference_step(f, H_fixed, x, gamma, 1e-9, 40)
        opt.step(closure)
        torch.testing.assert_close(w.detach(), x_ref, rtol=1e-9, atol=1e-11)
        assert opt.state["gns"]["last_trials"] == trials
        x, gamma = x_ref, gamma_ref
    if mode == "dense_by_products":
        assert op.products == 4  # one (d, d) product with the identity per outer step


def test_acceptance_rule_and_gamma_updates_with_rejections():
    # H = 0 makes every trial a normalized gradient step of length gamma; with a large gamma0
    # the first trials overshoot and are rejected.
    f, d = quadratic_problem()
    H = torch.zeros(d, d, dtype=DT)
    w = torch.full((d,), 3.0, dtype=DT, requires_grad=True)
    gamma0, gamma_min = 64.0, 0.3
    opt = GNSNewton([w], curvature=H, gamma0=gamma0, gamma_min=gamma_min)
    closure = make_closure(f, w, opt)
    x, gamma = w.detach().clone(), gamma0
    seen_rejection = False
    for _ in range(5):
        x_ref, gamma_ref, trials, _ = reference_step(f, H, x, gamma, gamma_min, 40)
        seen_rejection |= trials > 1
        opt.step(closure)
        torch.testing.assert_close(w.detach(), x_ref, rtol=1e-13, atol=1e-13)
        assert opt.gamma == gamma_ref
        assert opt.state["gns"]["last_trials"] == trials
        x, gamma = x_ref, gamma_ref
    assert seen_rejection
    # the first step: gamma0 = 64 halves until the rule holds, then doubles (never below gamma_min)
    assert opt.state["gns"]["exhausted"] == 0


def test_gamma_min_floor_applies_on_accept():
    f, d = quadratic_problem()
    H = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=DT))  # exact Hessian: accepted at once
    w = torch.ones(d, dtype=DT, requires_grad=True)
    opt = GNSNewton([w], curvature=H, gamma0=1e-3, gamma_min=7.0)
    opt.step(make_closure(f, w, opt))
    assert opt.state["gns"]["last_trials"] == 1
    assert opt.gamma == 7.0


@pytest.mark.parametrize("on_exhausted", ["take_last", "stay"])
def test_exhausted_trials(on_exhausted):
    f, d = quadratic_problem()
    H = torch.zeros(d, d, dtype=DT)
    w = torch.full((d,), 3.0, dtype=DT, requires_grad=True)
    opt = GNSNewton([w], curvature=H, gamma0=1e4, max_trials=2, on_exhausted=on_exhausted)
    x = w.detach().clone()
    x_ref, gamma_ref, trials, _ = reference_step(
        f, H, x, 1e4, 1e-9, 2, take_last=on_exhausted == "take_last"
    )
    opt.step(make_closure(f, w, opt))
    g = grad_of(f, x)
    expected = x - 5e3 * g / g.norm() if on_exhausted == "take_last" else x
    torch.testing.assert_close(w.detach(), expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(w.detach(), x_ref, rtol=1e-13, atol=1e-13)
    assert opt.gamma == gamma_ref == 1e4 / 4
    assert opt.state["gns"]["exhausted"] == 1


@pytest.mark.parametrize("path", ["cholesky", "cg"])
def test_indefinite_curvature_counts_failed_solves_as_rejections(path):
    f, d = quadratic_problem()
    H = torch.diag(torch.tensor([-3.0, 2.0, 5.0], dtype=DT))
    # the gradient (1, 0, 0) points along the negative eigenvector, so CG meets it at once
    w = torch.tensor([2.0, 1.0, 0.6], dtype=DT, requires_grad=True)
    calls = [0]
    curvature = H if path == "cholesky" else MatrixOperator(H)
    opt = GNSNewton([w], curvature=curvature, gamma0=100.0, dense_threshold=0, cg_rtol=1e-14)
    opt.step(make_closure(f, w, opt, calls))
    x0 = torch.tensor([2.0, 1.0, 0.6], dtype=DT)
    x_ref, gamma_ref, trials, points = reference_step(f, H, x0, 100.0, 1e-9, 40)
    assert trials > points >= 1  # some trials failed to factorize
    torch.testing.assert_close(w.detach(), x_ref, rtol=1e-13, atol=1e-13)
    assert opt.state["gns"]["last_trials"] == trials
    assert calls[0] == 1 + points


@pytest.mark.parametrize("reuse", [True, False])
def test_closure_call_counts(reuse):
    f, d = quadratic_problem()
    H = torch.zeros(d, d, dtype=DT)
    w = torch.full((d,), 3.0, dtype=DT, requires_grad=True)
    calls = [0]
    opt = GNSNewton([w], curvature=H, gamma0=64.0, reuse_evaluation=reuse)
    closure = make_closure(f, w, opt, calls)
    x, gamma = w.detach().clone(), 64.0
    for k in range(4):
        if k == 2:
            with torch.no_grad():
                w.mul_(1.0)  # an external in-place change invalidates the cached evaluation
        x_ref, gamma, trials, points = reference_step(f, H, x, gamma, 1e-9, 40)
        before = calls[0]
        loss = opt.step(closure)
        torch.testing.assert_close(loss, f(x).detach())
        fresh = (not reuse) or k in (0, 2)
        assert calls[0] - before == points + (1 if fresh else 0)
        assert opt.state["gns"]["closure_calls"] == calls[0]
        x = x_ref


def test_converges_to_tiny_gradient_on_logistic_regression():
    f, d = logistic_problem(seed=2, n=80, d=8)
    w = torch.zeros(d, dtype=DT, requires_grad=True)
    opt = GNSNewton([w], curvature=lambda ps: torch.func.hessian(f)(ps[0].detach()))
    closure = make_closure(f, w, opt)
    for _ in range(30):
        opt.step(closure)
        if grad_of(f, w.detach()).norm() <= 1e-10:
            break
    assert grad_of(f, w.detach()).norm() <= 1e-10


def test_state_dict_round_trip_resumes_exactly():
    f, d = logistic_problem(seed=4)
    hess = lambda ps: torch.func.hessian(f)(ps[0].detach())  # noqa: E731

    def run(n_steps, w, opt):
        closure = make_closure(f, w, opt)
        for _ in range(n_steps):
            opt.step(closure)

    w1 = torch.zeros(d, dtype=DT, requires_grad=True)
    opt1 = GNSNewton([w1], curvature=hess, gamma0=0.25)
    run(6, w1, opt1)

    w2 = torch.zeros(d, dtype=DT, requires_grad=True)
    opt2 = GNSNewton([w2], curvature=hess, gamma0=0.25)
    run(3, w2, opt2)
    buf = io.BytesIO()
    torch.save({"w": w2.detach().clone(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    w3 = saved["w"].clone().requires_grad_(True)
    opt3 = GNSNewton([w3], curvature=hess, gamma0=123.0)
    opt3.load_state_dict(saved["opt"])
    assert opt3.gamma == opt2.gamma
    run(3, w3, opt3)
    assert torch.equal(w3.detach(), w1.detach())
    assert opt3.gamma == opt1.gamma


def test_grad_tol_stops_at_small_gradients():
    f, d = quadratic_problem()
    w = torch.tensor([1.0, 1.0, 0.6 + 1e-6], dtype=DT, requires_grad=True)  # ||g|| = 5e-6
    calls = [0]
    opt = GNSNewton([w], curvature=torch.eye(d, dtype=DT), grad_tol=1e-5)
    opt.step(make_closure(f, w, opt, calls))
    assert calls[0] == 1 and opt.state["gns"]["trials"] == 0
    opt.param_groups[0]["grad_tol"] = 1e-6
    opt.step(make_closure(f, w, opt, calls))
    assert opt.state["gns"]["trials"] >= 1


def test_stationary_point_does_nothing():
    f, d = quadratic_problem()
    w = torch.tensor([1.0, 1.0, 0.6], dtype=DT, requires_grad=True)  # A w = b
    opt = GNSNewton([w], curvature=torch.eye(d, dtype=DT))
    opt.step(make_closure(f, w, opt))
    assert opt.state["gns"]["trials"] == 0
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 1.0, 0.6], dtype=DT))


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(gamma0=0.0), ValueError),
        (dict(gamma0=-1.0), ValueError),
        (dict(gamma0=math.inf), ValueError),
        (dict(gamma_min=-1.0), ValueError),
        (dict(max_trials=0), ValueError),
        (dict(grad_tol=-1.0), ValueError),
        (dict(dense_threshold=-1), ValueError),
        (dict(cg_rtol=0.0), ValueError),
        (dict(mfac_m=0), ValueError),
        (dict(mfac_damp=0.0), ValueError),
        (dict(on_exhausted="retry"), ValueError),
        (dict(preconditioner="ilu"), ValueError),
        (dict(curvature="newton"), ValueError),
        (dict(curvature="hessian"), ValueError),  # no model_func/loss_func/data
        (dict(curvature=3.0), TypeError),
    ],
)
def test_bad_arguments_raise(kwargs, exc):
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    kwargs.setdefault("curvature", torch.eye(3, dtype=DT))
    with pytest.raises(exc):
        GNSNewton([w], **kwargs)


def test_bad_usage_raises():
    a = torch.zeros(3, dtype=DT, requires_grad=True)
    b = torch.zeros(2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="single parameter group"):
        GNSNewton([{"params": [a]}, {"params": [b]}], curvature=torch.eye(5, dtype=DT))
    with pytest.raises(ValueError, match="dtype"):
        GNSNewton([a, b.float().detach().requires_grad_()], curvature=torch.eye(5, dtype=DT))
    opt = GNSNewton([a], curvature=torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)
    with pytest.raises(ValueError, match="backward"):
        opt.step(lambda: a.sum().detach())
    opt2 = GNSNewton([a], curvature=torch.eye(4, dtype=DT))
    f, _ = quadratic_problem()
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        opt2.step(make_closure(f, a, opt2))


def small_network(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(20, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (20,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def unpack(w):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.Size(s).numel())
            out[n] = w[i : i + k].view(s)
            i += k
        return out

    def outputs(w):
        return torch.func.functional_call(model, unpack(w), (X,))

    def f(w):
        return torch.nn.functional.cross_entropy(outputs(w), y)

    return model, X, y, f, outputs


def dense_ggn(outputs, x):
    J = torch.func.jacrev(outputs)(x)  # (N, C, d)
    p = torch.softmax(outputs(x), dim=1)
    Hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", J, Hout, J) / J.shape[0]


@pytest.mark.parametrize(
    "curvature, dense_threshold", [("hessian", 2000), ("ggn", 2000), ("ggn", 0)]
)
def test_named_operator_curvatures_match_dense_references(curvature, dense_threshold):
    model, X, y, f, outputs = small_network()
    params = list(model.parameters())
    opt = GNSNewton(
        params,
        curvature=curvature,
        model_func=model,
        loss_func=torch.nn.CrossEntropyLoss(),
        data=[(X, y)],
        dense_threshold=dense_threshold,
        cg_rtol=1e-13,
        gamma0=0.5,
    )

    def flat_params():
        return torch.cat([p.detach().reshape(-1) for p in params])

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    x, gamma = flat_params(), 0.5
    for _ in range(3):
        H = torch.func.hessian(f)(x) if curvature == "hessian" else dense_ggn(outputs, x)
        x_ref, gamma_ref, trials, _ = reference_step(f, H, x, gamma, 1e-9, 40)
        opt.step(closure)
        torch.testing.assert_close(flat_params(), x_ref, rtol=1e-8, atol=1e-10)
        assert opt.state["gns"]["last_trials"] == trials
        x, gamma = x_ref, gamma_ref


def test_mfac_curvature_is_the_window_of_iterate_gradients():
    f, d = logistic_problem(seed=5, d=6)
    w = torch.zeros(d, dtype=DT, requires_grad=True)
    m, damp = 3, 1e-2
    opt = GNSNewton([w], curvature="mfac", mfac_m=m, mfac_damp=damp, gamma0=0.5)
    closure = make_closure(f, w, opt)
    x, gamma, rows = w.detach().clone(), 0.5, []
    for _ in range(5):  # 5 > m: the window drops old gradients
        rows.append(grad_of(f, x))
        G = torch.stack(rows[-m:])
        H = damp * torch.eye(d, dtype=DT) + G.T @ G / m
        x_ref, gamma_ref, trials, _ = reference_step(f, H, x, gamma, 1e-9, 40)
        opt.step(closure)
        torch.testing.assert_close(w.detach(), x_ref, rtol=1e-10, atol=1e-12)
        assert opt.state["gns"]["last_trials"] == trials
        x, gamma = x_ref, gamma_ref
    # the window travels with the state dict
    sd = opt.state_dict()
    w2 = w.detach().clone().requires_grad_(True)
    opt2 = GNSNewton([w2], curvature="mfac", mfac_m=m, mfac_damp=damp)
    opt2.load_state_dict(sd)
    opt.step(closure)
    opt2.step(make_closure(f, w2, opt2))
    assert torch.equal(w.detach(), w2.detach())
