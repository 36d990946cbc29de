"""Inverse operators (CG, Neumann, M-FAC) against ``torch.linalg.solve`` on explicit matrices."""

from __future__ import annotations

import pytest
import torch
from problems import cached_problem, cached_reference

from curvopt.curvature import (
    CGInverseOperator,
    GGNOperator,
    HessianOperator,
    MFACOperator,
    NeumannInverseOperator,
    inverse,
)
from curvopt.mfac import SlidingWindowMFAC, StaticMFAC

F64 = torch.float64


def _spd(d: int, seed: int, cond: float = 50.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    evals = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=F64)
    return Q @ torch.diag(evals) @ Q.T


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cg_inverse_of_the_ggn_matches_solve(reduction):
    problem = cached_problem("mlp-ce", reduction)
    G = GGNOperator(problem.model, problem.loss, problem.params, problem.data)
    dense = cached_reference("ggn", "mlp-ce", reduction)  # explicit J^T H J
    delta = 1e-2
    M = dense + delta * torch.eye(dense.shape[0], dtype=F64)
    B = torch.randn(G.shape[0], 3, dtype=F64)
    inv = G.inverse("cg", damping=delta, rtol=1e-13)
    expected = torch.linalg.solve(M, B)
    torch.testing.assert_close(inv @ B, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(inv @ B[:, 1], expected[:, 1], rtol=1e-8, atol=1e-10)
    parts = inv @ [p.detach().clone().normal_() for p in problem.params]  # list format
    assert [p.shape for p in parts] == [p.shape for p in problem.params]
    assert inv.last_iterations <= 10 * G.shape[0]


def test_cg_on_a_damped_indefinite_hessian():
    problem = cached_problem("mlp-ce", "mean")
    H = HessianOperator(problem.model, problem.loss, problem.params, problem.data)
    dense = cached_reference("hessian", "mlp-ce", "mean")
    lam_min = float(torch.linalg.eigvalsh(dense)[0])
    assert lam_min < 0  # the test needs an indefinite Hessian
    delta = -lam_min + 0.5  # positive definite once damped
    b = torch.randn(H.shape[0], dtype=F64)
    x = inverse(H, "cg", damping=delta, rtol=1e-12) @ b
    expected = torch.linalg.solve(dense + delta * torch.eye(len(b), dtype=F64), b)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-9)


def test_cg_refuses_negative_curvature_and_non_convergence():
    A = torch.diag(torch.tensor([-1.0, 1.0, 2.0], dtype=F64))
    with pytest.raises(ValueError, match="non-positive curvature"):
        CGInverseOperator(A, damping=0.5) @ torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    with pytest.raises(RuntimeError, match="did not converge"):
        CGInverseOperator(_spd(30, 0, cond=1e4), 1e-3, maxiter=2) @ torch.ones(30, dtype=F64)


@pytest.mark.parametrize("seed", [0, 1])
def test_cg_on_dense_spd_matrices(seed):
    A = _spd(20, seed, cond=1e3)
    B = torch.randn(20, 4, dtype=F64, generator=torch.Generator().manual_seed(seed + 10))
    inv = CGInverseOperator(A, damping=0.1, rtol=1e-14)
    expected = torch.linalg.solve(A + 0.1 * torch.eye(20, dtype=F64), B)
    torch.testing.assert_close(inv @ B, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(A + 0.1 * torch.eye(20, dtype=F64)))
    torch.testing.assert_close(
        torch.from_numpy(inv.to_scipy() @ B.numpy()), expected, rtol=1e-10, atol=1e-12
    )


def test_neumann_converges_to_the_inverse_and_refuses_divergence():
    A = _spd(15, 3, cond=5.0)
    delta = 0.5
    M = A + delta * torch.eye(15, dtype=F64)
    inv = NeumannInverseOperator(A, damping=delta, num_terms=400)
    B = torch.randn(15, 2, dtype=F64)
    torch.testing.assert_close(inv @ B, torch.linalg.solve(M, B), rtol=1e-10, atol=1e-12)
    # the truncation error is exactly (I - alpha M)^K M^{-1} b
    K, alpha = 5, inv.scale
    short = NeumannInverseOperator(A, damping=delta, num_terms=K, scale=alpha)
    E = torch.linalg.matrix_power(torch.eye(15, dtype=F64) - alpha * M, K)
    torch.testing.assert_close(short @ B, (torch.eye(15, dtype=F64) - E) @ torch.linalg.solve(M, B))
    with pytest.raises(ValueError, match="diverges"):
        NeumannInverseOperator(A, damping=delta, scale=10.0) @ B
    with pytest.raises(ValueError, match="diverges"):
        NeumannInverseOperator(-A, damping=delta, scale=0.1) @ B


def test_neumann_on_a_curvature_operator():
    problem = cached_problem("mlp-mse", "sum")
    G = GGNOperator(problem.model, problem.loss, problem.params, problem.data)
    dense = cached_reference("ggn", "mlp-mse", "sum")
    delta = float(torch.linalg.eigvalsh(dense)[-1])  # condition number <= 2: fast series
    inv = G.inverse("neumann", damping=delta, num_terms=60)
    b = torch.randn(G.shape[0], dtype=F64)
    expected = torch.linalg.solve(dense + delta * torch.eye(len(b), dtype=F64), b)
    torch.testing.assert_close(inv @ b, expected, rtol=1e-8, atol=1e-10)


def test_mfac_objects_as_operators():
    gen = torch.Generator().manual_seed(5)
    m, d, lam = 6, 12, 0.05
    Gm = torch.randn(m, d, generator=gen, dtype=F64)
    dense = lam * torch.eye(d, dtype=F64) + Gm.T @ Gm / m
    x = torch.randn(d, 3, generator=gen, dtype=F64)
    static = MFACOperator(StaticMFAC(Gm, damp=lam))
    window = SlidingWindowMFAC(d, m, lam, dtype=F64)
    for g in Gm:
        window.add(g)
    for F in (static, MFACOperator(window)):
        torch.testing.assert_close(F @ x, dense @ x)
        torch.testing.assert_close(F.inverse() @ x, torch.linalg.solve(dense, x))
        other = dense + (0.2 - lam) * torch.eye(d, dtype=F64)  # damping replaced
        torch.testing.assert_close(F.inverse(damping=0.2) @ x, torch.linalg.solve(other, x))
        # the generic methods on top: (F + delta I)^{-1}
        cg = F.inverse("cg", damping=0.3, rtol=1e-13)
        target = torch.linalg.solve(dense + 0.3 * torch.eye(d, dtype=F64), x)
        torch.testing.assert_close(cg @ x, target, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("damping", [0, 0.0, -1e-3, float("nan"), float("inf")])
def test_bad_damping_is_refused(damping):
    with pytest.raises(ValueError, match="damping must be a positive finite number"):
        inverse(torch.eye(3), "cg", damping=damping)
    with pytest.raises(ValueError, match="damping must be a positive finite number"):
        MFACOperator(StaticMFAC(torch.randn(2, 3), damp=0.1)).inverse(damping=damping)


def test_other_bad_input():
    with pytest.raises(TypeError, match="positive float"):
        inverse(torch.eye(3), "cg", damping=True)
    with pytest.raises(ValueError, match="must be square"):
        inverse(torch.ones(3, 4), "cg", damping=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        inverse(torch.eye(3), "lsqr", damping=1.0)
    with pytest.raises(ValueError, match="num_terms"):
        NeumannInverseOperator(torch.eye(3), 1.0, num_terms=0)
    with pytest.raises(ValueError, match="maxiter"):
        CGInverseOperator(torch.eye(3), 1.0, maxiter=0)
    with pytest.raises(TypeError, match="StaticMFAC or SlidingWindowMFAC"):
        MFACOperator(torch.eye(3))
    inv = inverse(torch.eye(3, dtype=F64), "cg", damping=1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        inv @ torch.ones(4, dtype=F64)
    with pytest.raises(TypeError, match="dtype"):
        inv @ torch.ones(3)
