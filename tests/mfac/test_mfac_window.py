"""SlidingWindowMFAC against a dense float64 F of the current window, checked after every step."""

import pytest
import torch
from mfac_dense import dense_fisher, rel_err, woodbury_rtol

from curvopt.mfac import SlidingWindowMFAC
from curvopt.mfac import window as window_module


@pytest.fixture(params=["fresh", "update"])
def solve_path(request, monkeypatch):
    """Run a test with every step solving by a fresh Cholesky factor of ``A``, or by the rank-2
    updates of the explicit inverse (the window picks by the number of filled rows)."""
    limit = 10**9 if request.param == "fresh" else 0
    monkeypatch.setattr(window_module, "FRESH_FACTOR_MAX", limit)
    return request.param


def _window_matrix(history, m, d):
    """The m x d matrix of the last m gradients (zero rows while the window fills)."""
    G = torch.zeros(m, d, dtype=torch.float64)
    last = history[-m:]
    if last:
        G[: len(last)] = torch.stack(last)
    return G


def test_empty_window_is_scaled_identity():
    w = SlidingWindowMFAC(7, 3, damp=0.25, dtype=torch.float64)
    x = torch.randn(7, 2, dtype=torch.float64)
    assert torch.equal(w.ihvp(x), x / 0.25)
    assert torch.equal(w.inverse_diagonal(), torch.full((7,), 4.0, dtype=torch.float64))
    assert torch.equal(w.ihvp(x[:, 0]), x[:, 0] / 0.25)
    assert rel_err(w.mul(x), 0.25 * x) == 0.0
    assert w.count == 0 and w.filled == 0


CASES = (
    [(m, d, damp, None) for m, d in [(1, 6), (2, 40), (5, 3)] for damp in [1e-4, 1e-1, 1e2]]
    + [(m, d, damp, None) for m, d in [(16, 40), (24, 30)] for damp in [1e-4, 1e2]]
    + [(m, d, 1e-4, r) for m, d in [(5, 3), (16, 40)] for r in [1, 10_000]]
)


@pytest.mark.parametrize("m,d,damp,refresh_every", CASES)
def test_window_matches_dense_after_every_step(m, d, damp, refresh_every, solve_path):
    """Empty, partial, exactly full and wrapped 3m+1 times; rank-2 updates with the default
    refresh, a refresh after every step, and no refresh at all within the run."""
    gen = torch.Generator().manual_seed(100 * m + d)
    w = SlidingWindowMFAC(d, m, damp, dtype=torch.float64, refresh_every=refresh_every)
    history = []
    for step in range(3 * m + 1):
        g = torch.randn(d, generator=gen, dtype=torch.float64) * (1 + step % 3)
        X = torch.randn(d, 2, generator=gen, dtype=torch.float64)
        if step % 2:
            y = w.add_and_ihvp(g, X)
            history.append(g)
            rhs = X
        else:
            y = w.add_and_ihvp(g)
            history.append(g)
            rhs = g
        G = _window_matrix(history, m, d)
        F = dense_fisher(G, damp)
        tol = woodbury_rtol(G, damp)
        assert rel_err(y, torch.linalg.solve(F, rhs)) < tol, f"step {step}"
        assert rel_err(w.ihvp(X), torch.linalg.solve(F, X)) < tol
        assert w.count == step + 1 and w.filled == min(step + 1, m)
        if step % (m + 3) == 0:
            assert rel_err(w.mul(X), F @ X) < 1e-13
            assert rel_err(w.inverse_diagonal(), torch.linalg.inv(F).diagonal()) < tol
            assert torch.allclose(w.K, w.G.double() @ w.G.double().T, rtol=1e-12, atol=1e-12)
    ev = torch.linalg.eigvalsh(m * torch.eye(m, dtype=torch.float64) + w.K / damp)
    assert float(w.last_drift) < 1e-11 * (ev[-1] / ev[0]).item()  # round-off of the updates
    A = m * torch.eye(m, dtype=torch.float64) + w.K / damp
    n = w.filled
    assert rel_err(w.Ainv[:n, :n], torch.linalg.inv(A[:n, :n])) < 1e-9 * (ev[-1] / ev[0]).item()


@pytest.mark.parametrize("m", [1, 4, 9])
def test_window_add_then_ihvp_and_damp_override(m, solve_path):
    d = 25
    gen = torch.Generator().manual_seed(m)
    w = SlidingWindowMFAC(d, m, 1e-2, dtype=torch.float64)
    history = []
    for _ in range(2 * m + 3):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        w.add(g)
        history.append(g)
        G = _window_matrix(history, m, d)
        x = torch.randn(d, generator=gen, dtype=torch.float64)
        for damp in (None, 0.5, 1e-5):
            lam = 1e-2 if damp is None else damp
            ref = torch.linalg.solve(dense_fisher(G, lam), x)
            assert rel_err(w.ihvp(x, damp=damp), ref) < woodbury_rtol(G, lam)
    assert w.damp == 1e-2
    w.damp = 0.3  # the setter refreshes A^{-1}
    ref = torch.linalg.solve(dense_fisher(_window_matrix(history, m, d), 0.3), x)
    assert rel_err(w.ihvp(x), ref) < 1e-12


@pytest.mark.parametrize(
    "dtype,floor", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]
)
def test_window_low_precision_storage(dtype, floor, solve_path):
    """Against the dense F of the stored (rounded) gradients: float32 accumulation error; against
    the exact float64 gradients: the storage dtype's rounding, amplified by the conditioning."""
    m, d, damp = 6, 120, 1e-1
    gen = torch.Generator().manual_seed(3)
    w = SlidingWindowMFAC(d, m, damp, dtype=dtype)
    w64 = SlidingWindowMFAC(d, m, damp, dtype=dtype, accumulate_dtype=torch.float64)
    exact, stored = [], []
    eps_store = torch.finfo(dtype).eps
    for _ in range(2 * m + 1):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        exact.append(g)
        stored.append(g.to(dtype).double())
        y = w.add_and_ihvp(g.float())
        y64 = w64.add_and_ihvp(g)
        assert y.dtype == torch.float32 and y64.dtype == torch.float64
        G_stored = _window_matrix(stored, m, d)
        F_stored = dense_fisher(G_stored, damp)
        ref = torch.linalg.solve(F_stored, g.float().double())
        tol32 = woodbury_rtol(G_stored, damp, floor=floor, eps=torch.finfo(torch.float32).eps)
        assert rel_err(y, ref) < tol32
        ref64 = torch.linalg.solve(F_stored, g)
        assert rel_err(y64, ref64) < woodbury_rtol(G_stored, damp)
        G_exact = _window_matrix(exact, m, d)
        ref_exact = torch.linalg.solve(dense_fisher(G_exact, damp), g)
        assert rel_err(y64, ref_exact) < woodbury_rtol(G_exact, damp, floor=0, eps=eps_store)
    assert w.G.dtype == dtype


def test_state_dict_round_trip_is_exact(solve_path):
    d, m = 30, 5
    gen = torch.Generator().manual_seed(0)
    a = SlidingWindowMFAC(d, m, 1e-3, refresh_every=4)
    for _ in range(7):  # mid-way between refreshes, wrapped once
        a.add(torch.randn(d, generator=gen))
    state = a.state_dict()
    b = SlidingWindowMFAC(d, m, 1.0)  # different damp and refresh: taken from the state
    b.load_state_dict(state)
    assert b.damp == a.damp and b.count == a.count and b.refresh_every == 4
    for _ in range(2 * m):
        g = torch.randn(d, generator=gen)
        x = torch.randn(d, 3, generator=gen)
        assert torch.equal(a.add_and_ihvp(g), b.add_and_ihvp(g))
        assert torch.equal(a.ihvp(x), b.ihvp(x))
    assert torch.equal(a.Ainv, b.Ainv) and torch.equal(a.G, b.G)
    state["G"].add_(1.0)  # the state dict holds copies
    assert not torch.equal(state["G"], a.G)


def test_reset_and_memory():
    d, m = 50, 4
    w = SlidingWindowMFAC(d, m, 1e-2, dtype=torch.bfloat16)
    assert w.memory_bytes() == m * d * 2 + 2 * m * m * 8
    for _ in range(6):
        w.add(torch.randn(d))
    w.reset()
    x = torch.randn(d)
    assert w.count == 0 and torch.equal(w.ihvp(x), x / 1e-2)
    assert torch.count_nonzero(w.G) == 0
    w.add(torch.ones(d))
    G = _window_matrix([torch.ones(d, dtype=torch.float64)], m, d)
    assert rel_err(w.ihvp(x), torch.linalg.solve(dense_fisher(G, 1e-2), x.double())) < 1e-5


def test_window_float64_accumulation_in_span():
    """x in the span of the window at damp 1e-4 with float32 storage: float64 products recover the
    digits that float32 products lose to cancellation."""
    m, d, damp = 8, 3000, 1e-4
    gen = torch.Generator().manual_seed(4)
    w32 = SlidingWindowMFAC(d, m, damp)
    w64 = SlidingWindowMFAC(d, m, damp, accumulate_dtype=torch.float64)
    for _ in range(m):
        g = torch.randn(d, generator=gen)
        w32.add(g)
        w64.add(g)
    G = w32.G.double()
    x = G.T @ torch.randn(m, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(dense_fisher(G, damp), x)
    err32 = rel_err(w32.ihvp(x.float()), ref)
    err64 = rel_err(w64.ihvp(x), ref)
    assert err64 < woodbury_rtol(G, damp)
    assert err32 > 100 * err64


@pytest.mark.parametrize("m,d,damp", [(5, 3, 1e-4), (12, 60, 1e-3)])
def test_window_without_refinement(m, d, damp, solve_path):
    """Without refinement the explicit inverse costs about eps * R^2 (R = lambda_max(F)/damp);
    with it, about eps * R like a Cholesky solve."""
    gen = torch.Generator().manual_seed(21)
    plain = SlidingWindowMFAC(d, m, damp, dtype=torch.float64, refine=False)
    refined = SlidingWindowMFAC(d, m, damp, dtype=torch.float64)
    assert refined.refine and not plain.refine
    history = []
    for _ in range(2 * m + 1):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        history.append(g)
        y_plain, y_ref = plain.add_and_ihvp(g), refined.add_and_ihvp(g)
        G = _window_matrix(history, m, d)
        ref = torch.linalg.solve(dense_fisher(G, damp), g)
        tol = woodbury_rtol(G, damp)
        assert rel_err(y_ref, ref) < tol
        assert rel_err(y_plain, ref) < tol * max(1.0, tol / 1e-14)


@pytest.mark.parametrize("every", [1, 3, 4])
def test_refresh_happens_exactly_every_refresh_every_insertions(every, monkeypatch):
    """Right after insertion k * refresh_every, A^{-1} is the fresh inverse from K (bitwise), and
    only then; a refresh one insertion late would leave the updated inverse in place."""
    from curvopt.mfac._linalg import cholesky

    monkeypatch.setattr(window_module, "FRESH_FACTOR_MAX", 0)  # the rank-2 updates
    d, m, damp = 9, 4, 1e-2
    w = SlidingWindowMFAC(d, m, damp, dtype=torch.float64, refresh_every=every)
    for i in range(1, 3 * every + 2):
        w.add(torch.randn(d, dtype=torch.float64))
        assert w.refreshed == (i % every == 0)
        if i % every == 0:
            n = w.filled
            fresh = torch.cholesky_inverse(cholesky(w.K[:n, :n], m, damp))
            assert torch.equal(w.Ainv[:n, :n], fresh)


def test_factored_mode_state_round_trip_is_exact():
    """A window in factored mode (d < m) resumes bit-identically from its state dict; the flag
    is validated before anything is loaded."""
    m, d, damp = 6, 3, 1e-7
    gen = torch.Generator().manual_seed(11)
    grads = 1e2 * (1 + torch.rand(2 * m + 5, d, generator=gen, dtype=torch.float64))
    a = SlidingWindowMFAC(d, m, damp, dtype=torch.float64)
    for g in grads[: m + 2]:
        a.add(g)
    assert a.factored and a.refreshed
    b = SlidingWindowMFAC(d, m, damp, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    assert b.factored
    for g in grads[m + 2 :]:
        torch.testing.assert_close(a.add_and_ihvp(g), b.add_and_ihvp(g), rtol=0, atol=0)
    bad = dict(a.state_dict(), since_refresh=1)
    before = b.state_dict()
    with pytest.raises(ValueError, match="factored"):
        b.load_state_dict(bad)
    with pytest.raises(TypeError, match="factored"):
        b.load_state_dict(dict(a.state_dict(), factored="yes"))
    after = b.state_dict()
    assert all(
        torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
        for k, v in before.items()
    )
    b.reset()
    assert not b.factored
