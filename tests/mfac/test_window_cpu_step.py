"""The CPU window step: the LAPACK solve (``UnitColumnSolver``) and the NumPy bookkeeping of
``K``, against ``torch.linalg.solve`` and the dense float64 ``F``; ``next_row`` (the gradient
written straight into the window); and copies of a window (the step's NumPy views of ``K`` must
be views of the copy's own ``K``)."""

import copy
import pickle

import numpy as np
import pytest
import torch
from mfac_dense import dense_fisher, rel_err, woodbury_rtol

from curvopt.mfac import SlidingWindowMFAC
from curvopt.mfac._cpu_step import UnitColumnSolver

DT = torch.float64


@pytest.mark.parametrize("n,size", [(1, 1), (5, 5), (3, 8), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_column_solver_matches_dense_solve(n, size, dtype):
    gen = torch.Generator().manual_seed(100 * n + size)
    m, damp = 16, 10 ** (-torch.randint(1, 5, (), generator=gen).item())
    G = torch.randn(n, 30, generator=gen, dtype=DT)
    K = G @ G.T
    solver = UnitColumnSolver(m, size, dtype)
    A = m * torch.eye(n, dtype=DT) + K / damp
    for r in range(n):
        scale = float(torch.rand((), generator=gen, dtype=DT)) * 10
        c = solver(K.numpy().copy(), damp, r, scale)
        truth = torch.linalg.solve(A, scale * torch.eye(n, dtype=DT)[:, r])
        assert c.shape == (n,) and c.dtype == dtype
        tol = 1e-12 if dtype == DT else 1e-6
        torch.testing.assert_close(c.to(DT), truth, rtol=tol, atol=tol * truth.abs().max())


def test_unit_column_solver_refuses_a_matrix_that_is_not_positive_definite_or_gives_nan():
    K = -10.0 * np.eye(3)  # A = 3 I - 1000 I
    assert UnitColumnSolver(3, 3, DT)(K, 1e-2, 0, 1.0) is None
    K = np.eye(3)
    K[1, 1] = np.nan  # LAPACK builds differ: some report it, others return NaN
    c = UnitColumnSolver(3, 3, DT)(K, 1e-2, 1, 1.0)
    assert c is None or bool(torch.isnan(c).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,d,damp", [(6, 40, 1e-3), (6, 4, 1e-1), (16, 80, 1.0)])
def test_cpu_step_matches_device_path_and_dense_truth(m, d, damp, dtype):
    """The CPU path (NumPy K, LAPACK solve) and the device path (tensor calls) step by step,
    filling, full and wrapped, with refreshes on the way; each against the dense F."""
    gen = torch.Generator().manual_seed(m + d)
    cpu = SlidingWindowMFAC(d, m, damp, dtype=dtype)
    dev = SlidingWindowMFAC(d, m, damp, dtype=dtype)
    dev._cpu = False  # the path a CUDA window takes, run on the CPU
    assert cpu._cpu
    rows = []
    for step in range(3 * m + 1):
        g = (torch.randn(d, generator=gen, dtype=DT) * (1 + step % 3)).to(dtype)
        rows.append(g.to(DT))
        y_cpu, y_dev = cpu.add_and_ihvp(g), dev.add_and_ihvp(g)
        G = torch.zeros(m, d, dtype=DT)  # zero rows for the slots not yet filled
        G[: len(rows[-m:])] = torch.stack(rows[-m:])
        truth = torch.linalg.solve(dense_fisher(G, damp), g.to(DT))
        tol = woodbury_rtol(G, damp) if dtype == DT else 1e-4 * woodbury_rtol(G, damp, eps=1.0)
        assert rel_err(y_cpu, truth) < max(tol, 1e-12)
        assert rel_err(y_cpu, y_dev) < max(tol, 1e-12)
        torch.testing.assert_close(cpu.K, dev.K, rtol=0, atol=0)  # the same dot products
    assert cpu._unit_solver is not None and dev._unit_solver is None


def test_next_row_spares_the_copy_and_matches_a_gradient_passed_apart():
    gen = torch.Generator().manual_seed(3)
    d, m, damp = 30, 4, 1e-2
    a = SlidingWindowMFAC(d, m, damp, dtype=DT)
    b = SlidingWindowMFAC(d, m, damp, dtype=DT)
    for _ in range(2 * m + 1):
        g = torch.randn(d, generator=gen, dtype=DT)
        row = a.next_row()
        assert row.data_ptr() == a.G[a.count % m].data_ptr()
        torch.mul(g, 1.0, out=row)
        y_a = a.add_and_ihvp(row, on_nonfinite="ignore")
        y_b = b.add_and_ihvp(g.clone())
        torch.testing.assert_close(y_a, y_b, rtol=0, atol=0)
    torch.testing.assert_close(a.G, b.G, rtol=0, atol=0)
    torch.testing.assert_close(a.K, b.K, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("call", ["add", "add_and_ihvp"])
def test_next_row_with_a_checking_mode_is_refused(mode, call):
    w = SlidingWindowMFAC(10, 3, 1e-2, dtype=DT)
    for _ in range(4):
        w.add(torch.randn(10, dtype=DT))
    K, count = w.K.clone(), w.count
    row = w.next_row()
    row.fill_(float("nan"))
    with pytest.raises(ValueError, match="next_row.*on_nonfinite='ignore'"):
        getattr(w, call)(row, on_nonfinite=mode)
    assert torch.equal(w.K, K) and w.count == count


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_window_steps_on_its_own(how):
    gen = torch.Generator().manual_seed(5)
    w = SlidingWindowMFAC(20, 4, 1e-2, dtype=DT)
    for _ in range(3):
        w.add(torch.randn(20, generator=gen, dtype=DT))
    c = copy.deepcopy(w) if how == "deepcopy" else pickle.loads(pickle.dumps(w))
    K_before = w.K.clone()
    for _ in range(6):  # past a wrap: every row of the copy's K is rewritten
        g = torch.randn(20, generator=gen, dtype=DT)
        y_c = c.add_and_ihvp(g)
        truth = torch.linalg.solve(dense_fisher(c.G, 1e-2), g)
        assert rel_err(y_c, truth) < 1e-10
        torch.testing.assert_close(c.K, c.G @ c.G.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(w.K, K_before)  # the original is untouched
    y_w = w.add_and_ihvp(g)
    assert rel_err(y_w, torch.linalg.solve(dense_fisher(w.G, 1e-2), g)) < 1e-10
