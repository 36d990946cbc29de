"""Damping too small for the dtype: a clear error or a warning with the number, never noise."""

import warnings

import pytest
import torch
from mfac_dense import EPS64, dense_fisher, rel_err

from curvopt.cli import main
from curvopt.mfac import SlidingWindowMFAC, StaticMFAC
from curvopt.optim import MFAC

DT = torch.float64


@pytest.mark.parametrize("damp", [1e-160, 1e-200, 5e-324])
def test_damping_whose_square_underflows_is_a_clear_error(damp):
    G = torch.randn(4, 5, dtype=DT)
    for build in (
        lambda: StaticMFAC(G, damp),
        lambda: StaticMFAC(G, 1.0).ihvp(torch.ones(5, dtype=DT), damp=damp),
        lambda: SlidingWindowMFAC(5, 4, damp),
        lambda: MFAC([torch.zeros(3, requires_grad=True)], damp=damp),
    ):
        with pytest.raises(ValueError, match="too small"):
            build()


def _big_rows(m, d, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return scale * (1 + torch.rand(m, d, generator=gen, dtype=DT))


def test_ill_conditioned_static_and_window_warn_with_the_number():
    """Entries ~1e4, d=1, m=2, damp=1e-9: lambda_max(F)/damp ~ 1e17 > 1/eps64; the products are
    noise (the window gave 1.5e13 instead of 1e-4 before), so both warn, naming the estimate."""
    G = _big_rows(2, 1, 1e4, seed=0)
    estimate = r"lambda_max\(F\)/damp is estimated at up to [0-9.]+e\+1[67]"
    with pytest.warns(RuntimeWarning, match=estimate):
        StaticMFAC(G, 1e-9)
    w = SlidingWindowMFAC(1, 2, 1e-9, dtype=DT)
    w.add(G[0])
    with pytest.warns(RuntimeWarning, match="SlidingWindowMFAC"):
        w.add(G[1])  # the second insertion refreshes (refresh_every = m = 2)
    with pytest.warns(RuntimeWarning, match="StaticMFAC"):
        StaticMFAC(G, 1.0).ihvp(torch.ones(1, dtype=DT), damp=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_no_warning_where_the_products_are_accurate(seed):
    """Below the threshold (here R ~ 1e9 < 1/eps64) the results match the dense float64 inverse
    to about eps64 * R, so a warning would be a false alarm."""
    m, d, damp = 4, 30, 1e-3
    G = _big_rows(m, d, 1e2, seed=seed)
    x = torch.randn(d, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        op = StaticMFAC(G, damp)
        w = SlidingWindowMFAC(d, m, damp, dtype=DT)
        for g in G[:-1]:
            w.add(g)
        y = w.add_and_ihvp(G[-1], x)
    want = torch.linalg.solve(dense_fisher(G, damp), x)
    assert rel_err(op.ihvp(x), want) < 1e-6
    assert rel_err(y, want) < 1e-6


def test_threshold_follows_the_accumulation_dtype():
    """R ~ 1e8: past 1/eps of float32 products (8.4e6), well inside float64's (4.5e15)."""
    G = _big_rows(8, 30, 1.0, seed=3).float()
    damp = float((G.double() ** 2).sum() / 8) / 1e8
    with pytest.warns(RuntimeWarning, match="float32"):
        StaticMFAC(G, damp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        StaticMFAC(G, damp, accumulate_dtype=torch.float64)


def test_bench_exits_nonzero_when_a_method_fails(capsys):
    argv = ["bench", "--problem", "logistic", "--methods", "hessian,mfac_m8"]
    argv += ["--train-steps", "0", "--repeats", "1", "--no-progress", "--damping", "1e-300"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "mfac_m8 failed" in err and "too small" in err


@pytest.mark.parametrize("damp", [1e-5, 1e-7, 1e-9])
@pytest.mark.parametrize("extra", [0, 3])
def test_rank_deficient_window_is_as_accurate_as_static(damp, extra):
    """d < m: K is rank-deficient and cond(A) grows like R, so the explicit (refined) inverse
    failed long before the Woodbury cancellation (relative error 0.97 at R ~ 9e11, 1e5 at 9e13,
    where StaticMFAC's Cholesky solve gets 1e-5 and 1e-3). The window now switches to solving
    with a fresh factor: within the documented ``1e3 eps R`` like StaticMFAC, and no warning
    while R < 1/eps64."""
    m, d = 8, 4
    G = _big_rows(m + extra, d, 1e2, seed=0)
    x = torch.randn(d, dtype=DT, generator=torch.Generator().manual_seed(1))
    kept = G[-m:]
    want = torch.linalg.solve(dense_fisher(kept, damp), x)
    R = 1 + torch.linalg.eigvalsh(kept @ kept.T)[-1].item() / (m * damp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        w = SlidingWindowMFAC(d, m, damp, dtype=DT)
        for g in G[:-1]:
            w.add(g)
        y = w.add_and_ihvp(G[-1], x)
    assert w.factored  # the estimate found the explicit inverse untrustworthy
    bound = 1e3 * EPS64 * R
    assert rel_err(y, want) <= bound
    assert rel_err(w.ihvp(x), want) <= bound
    assert rel_err(StaticMFAC(kept, damp).ihvp(x), want) <= bound


def test_colleagues_reproducer_m2_d1():
    """m=2, d=1, damp=1e-4, gradients randn*100 (seed 0), one beyond m: 9e-4 vs a bound of
    5e-5 (1e3 eps R) before, with no warning."""
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 1, generator=gen, dtype=DT) * 100
    x = torch.randn(1, generator=gen, dtype=DT)
    w = SlidingWindowMFAC(1, 2, 1e-4, dtype=DT)
    for g in grads:
        w.add(g)
    F = dense_fisher(grads[-2:], 1e-4)
    R = torch.linalg.eigvalsh(F)[-1].item() / 1e-4
    assert rel_err(w.ihvp(x), torch.linalg.solve(F, x)) <= 1e3 * EPS64 * R


def test_factored_mode_is_left_when_the_window_becomes_well_conditioned():
    """Duplicated gradients put the window in factored mode; fresh independent ones (d > m)
    bring it back to the O(m^2) updates, with accurate products all along."""
    m, d, damp = 4, 30, 1e-8
    gen = torch.Generator().manual_seed(2)
    g0 = torch.randn(d, generator=gen, dtype=DT)
    w = SlidingWindowMFAC(d, m, damp, dtype=DT)
    rows = []
    for i in range(3 * m):
        g = g0 if i < m else torch.randn(d, generator=gen, dtype=DT)
        rows.append(g)
        x = torch.randn(d, generator=gen, dtype=DT)
        y = w.add_and_ihvp(g, x)
        kept = torch.stack(rows[-m:])
        kept = torch.cat([kept, torch.zeros(m - len(kept), d, dtype=DT)])  # zero rows: filling
        F = dense_fisher(kept, damp)
        R = torch.linalg.eigvalsh(F)[-1].item() / damp
        assert rel_err(y, torch.linalg.solve(F, x)) <= 1e3 * EPS64 * R, i
        if i == m - 1:
            # G, K, A^{-1}, the factor, and the m I of the fresh factors
            assert w.factored and w.memory_bytes() == m * d * 8 + 4 * m * m * 8
    assert not w.factored and w.memory_bytes() == m * d * 8 + 3 * m * m * 8
