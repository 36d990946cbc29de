"""SlidingWindowMFAC's factored mode on a window that is still filling, its conditioning
estimates, and loads into a window that is already factored: against dense float64 truth."""

import copy

import numpy as np
import pytest
import torch
from mfac_dense import EPS64, dense_fisher, rel_err

from curvopt.mfac import SlidingWindowMFAC
from curvopt.mfac import window as window_module

DT = torch.float64


def nearly_dependent(n, d, seed):
    """``n`` gradients of length ``d`` close to one direction (large, so R = lambda_max/damp is)."""
    gen = torch.Generator().manual_seed(seed)
    g0 = torch.randn(d, generator=gen, dtype=DT)
    return 1e2 * (g0 + 1e-3 * torch.randn(n, d, generator=gen, dtype=DT))


def padded(rows, m):
    """The window's ``G``: the rows added so far, zero rows for the slots not yet filled."""
    return torch.cat([rows, torch.zeros(m - len(rows), rows.shape[1], dtype=DT)])


def test_factored_mode_entered_while_filling_solves_with_a_of_the_window_size():
    """m = 8, a refresh every 2 insertions: the window turns factored at 2 of 8 rows filled, and
    ``A = m I + K / damp`` (m = 8, not the 2 filled rows) gives F^{-1} of the padded window."""
    m, d, damp = 8, 5, 1e-7
    grads = nearly_dependent(4, d, seed=0)
    x = torch.randn(d, dtype=DT, generator=torch.Generator().manual_seed(1))
    w = SlidingWindowMFAC(d, m, damp, dtype=DT, refresh_every=2)
    w.add(grads[0])
    y = w.add_and_ihvp(grads[1], x)  # refresh, then the check switches to factored mode
    assert w.factored and w.filled == 2
    F = dense_fisher(padded(grads[:2], m), damp)
    R = torch.linalg.eigvalsh(F)[-1].item() / damp
    want = torch.linalg.solve(F, x)
    assert rel_err(y, want) <= 1e3 * EPS64 * R
    assert rel_err(w.ihvp(x), want) <= 1e3 * EPS64 * R
    for i in (2, 3):  # and it stays right while the window keeps filling
        y = w.add_and_ihvp(grads[i], x)
        F = dense_fisher(padded(grads[: i + 1], m), damp)
        R = torch.linalg.eigvalsh(F)[-1].item() / damp
        assert rel_err(y, torch.linalg.solve(F, x)) <= 1e3 * EPS64 * R, i


def test_factored_mode_forced_while_filling_matches_dense_truth(monkeypatch):
    """Well-conditioned rows (damp = 1, where ``m I`` and ``K / damp`` are of one size), factored
    mode forced from the first refresh at 2 of 8 rows: every product is F^{-1} x to 1e-12."""
    monkeypatch.setattr(window_module, "EXPLICIT_INVERSE_LIMIT", -1.0)
    m, d, damp = 8, 5, 1.0
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(5, d, generator=gen, dtype=DT)
    w = SlidingWindowMFAC(d, m, damp, dtype=DT, refresh_every=2)
    w.add(grads[0])
    for i in range(1, 5):
        x = torch.randn(d, generator=gen, dtype=DT)
        y = w.add_and_ihvp(grads[i], x)
        assert w.factored and w.filled == i + 1
        want = torch.linalg.solve(dense_fisher(padded(grads[: i + 1], m), damp), x)
        assert rel_err(y, want) <= 1e-12, i
        assert rel_err(w.ihvp(x), want) <= 1e-12, i


def test_inverse_conditioning_is_the_squared_diagonal_ratio_of_the_factor():
    """``(max L_ii / min L_ii)^2`` of ``A = m I + K/damp = L L^T``: a lower bound of cond(A)."""
    m, d, damp = 6, 4, 1e-5
    grads = nearly_dependent(m, d, seed=3)
    w = SlidingWindowMFAC(d, m, damp, dtype=DT)
    for g in grads:
        w.add(g)
    assert w.refreshed
    A = m * np.eye(m) + (grads @ grads.T).numpy() / damp
    diag = np.diag(np.linalg.cholesky(A))
    want = (diag.max() / diag.min()) ** 2
    assert float(w.inverse_conditioning) == pytest.approx(want, rel=1e-6)
    assert float(w.inverse_conditioning) <= np.linalg.cond(A) * (1 + 1e-8)
    assert want > 1e3  # far from 1, so the square matters


def factored_window(seed, m=6, d=3, damp=1e-7):
    gen = torch.Generator().manual_seed(seed)
    w = SlidingWindowMFAC(d, m, damp, dtype=DT)
    for g in 1e2 * (1 + torch.rand(m + 2, d, generator=gen, dtype=DT)):
        w.add(g)
    assert w.factored and w.refreshed
    return w


def test_load_into_a_factored_window_refactors_the_loaded_gram():
    """Loading replaces the Cholesky factor too: the loaded window answers as the saved one."""
    a, b = factored_window(seed=11), factored_window(seed=12)
    x = torch.randn(3, dtype=DT, generator=torch.Generator().manual_seed(0))
    want = a.ihvp(x)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.factored
    torch.testing.assert_close(b.ihvp(x), want, rtol=0, atol=0)
    F = dense_fisher(a.G, a.damp)
    R = torch.linalg.eigvalsh(F)[-1].item() / a.damp
    assert rel_err(b.ihvp(x), torch.linalg.solve(F, x)) <= 1e3 * EPS64 * R
