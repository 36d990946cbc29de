"""Trace, diagonal, norm and spectral-density estimators against exact float64 values.

Unbiasedness is checked by z-tests over fixed seeds (deterministic: the thresholds hold with a
wide margin for these seeds and cannot flake); exactness where the method is exact (budget >=
d, low rank, Lanczos with d steps, Gauss quadrature of low-degree polynomials).
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import cached_problem, cached_reference

from curvopt.curvature import GGNOperator, HessianOperator
from curvopt.curvature.estimators import (
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    slq_spectral_density,
    xdiag,
    xtrace,
)

F64 = torch.float64
TRACES = [hutchinson_trace, hutchpp_trace, xtrace]
DIAGONALS = [hutchinson_diag, xdiag]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(d: int, seed: int, indefinite: bool = False) -> torch.Tensor:
    gen = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    evals = torch.rand(d, generator=gen, dtype=F64) * 3 + 0.1
    evals[:3] += torch.tensor([20.0, 10.0, 5.0], dtype=F64)  # a few outliers, as in curvature
    if indefinite:
        evals[-4:] *= -1
    return Q @ torch.diag(evals) @ Q.T


def _z(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    n = samples.shape[0]
    return (samples.mean(0) - truth) / (samples.std(0) / math.sqrt(n))


@pytest.mark.parametrize("estimator", TRACES)
@pytest.mark.parametrize("indefinite", [False, True])
@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_trace_estimators_are_unbiased(estimator, indefinite, distribution):
    A = _symmetric(30, seed=1 + indefinite, indefinite=indefinite)
    samples = torch.stack([estimator(A, 9, distribution, generator=_gen(s)) for s in range(300)])
    assert abs(float(_z(samples, A.trace()))) < 4.0


@pytest.mark.parametrize("estimator", DIAGONALS)
@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_diagonal_estimators_are_unbiased(estimator, distribution):
    A = _symmetric(20, seed=3, indefinite=True)
    samples = torch.stack([estimator(A, 8, distribution, generator=_gen(s)) for s in range(300)])
    z = _z(samples, A.diagonal())
    # 20 coordinates: a max |z| of 4.5 has probability < 2e-4 under the null
    assert float(z.abs().max()) < 4.5


def test_squared_frobenius_norm_is_unbiased():
    A = _symmetric(25, seed=4, indefinite=True)
    samples = torch.stack([hutchinson_squared_fro(A, 6, generator=_gen(s)) for s in range(300)])
    assert abs(float(_z(samples, (A**2).sum()))) < 4.0


def test_hutchpp_and_xtrace_beat_hutchinson_on_a_decaying_spectrum():
    gen = _gen(7)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=F64))
    A = Q @ torch.diag(0.7 ** torch.arange(60, dtype=F64)) @ Q.T
    err = {}
    for f in TRACES:
        est = torch.stack([f(A, 24, generator=_gen(s)) for s in range(50)])
        err[f.__name__] = float(((est - A.trace()) ** 2).mean().sqrt())
    assert err["hutchpp_trace"] < 0.3 * err["hutchinson_trace"]
    assert err["xtrace"] < 0.3 * err["hutchinson_trace"]


@pytest.mark.parametrize("estimator", [*TRACES, *DIAGONALS, hutchinson_squared_fro])
def test_a_budget_of_d_matvecs_is_exact(estimator):
    A = _symmetric(12, seed=5, indefinite=True)
    truth = {
        "hutchinson_squared_fro": (A**2).sum(),
        "hutchinson_diag": A.diagonal(),
        "xdiag": A.diagonal(),
    }.get(estimator.__name__, A.trace())
    torch.testing.assert_close(estimator(A, 12, generator=_gen(0)), truth)
    torch.testing.assert_close(estimator(A, 50, generator=_gen(0)), truth)


def test_exchangeable_and_deflated_estimators_are_exact_on_low_rank():
    gen = _gen(6)
    B = torch.randn(50, 4, generator=gen, dtype=F64)
    A = B @ torch.diag(torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=F64)) @ B.T  # rank 4
    for seed in range(3):
        # s = 5 test vectors: every P_i spans the 4-dimensional range
        torch.testing.assert_close(xtrace(A, 10, generator=_gen(seed)), A.trace())
        torch.testing.assert_close(xdiag(A, 10, generator=_gen(seed)), A.diagonal())
        # k = 4 sketch vectors capture the range
        torch.testing.assert_close(hutchpp_trace(A, 12, generator=_gen(seed)), A.trace())


def test_estimators_on_a_curvature_operator():
    problem = cached_problem("mlp-ce", "mean")
    G = GGNOperator(problem.model, problem.loss, problem.params, problem.data)
    dense = cached_reference("ggn", "mlp-ce", "mean")
    d = G.shape[0]
    torch.testing.assert_close(xtrace(G, d), dense.trace())
    torch.testing.assert_close(xdiag(G, d), dense.diagonal())
    samples = torch.stack([hutchinson_trace(G, 16, generator=_gen(s)) for s in range(40)])
    assert abs(float(_z(samples, dense.trace()))) < 4.0
    H = HessianOperator(problem.model, problem.loss, problem.params, problem.data)
    sd = slq_spectral_density(H, num_steps=d, num_vectors=1, generator=_gen(0))
    exact = torch.linalg.eigvalsh(cached_reference("hessian", "mlp-ce", "mean"))
    torch.testing.assert_close(sd.nodes[0].sort().values, exact, rtol=1e-7, atol=1e-9)


def test_slq_with_d_steps_finds_the_eigenvalues():
    A = _symmetric(25, seed=8, indefinite=True)
    sd = slq_spectral_density(A, num_steps=25, num_vectors=3, generator=_gen(1))
    exact = torch.linalg.eigvalsh(A)
    for row, w in zip(sd.nodes, sd.weights):
        torch.testing.assert_close(row.sort().values, exact, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))


def test_slq_quadrature_is_exact_for_low_degree_polynomials():
    A = _symmetric(40, seed=9, indefinite=True)
    m = 6
    V = torch.randn(40, 2, generator=_gen(2), dtype=F64)
    sd = slq_spectral_density(A, num_steps=m, start_vectors=V)
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    for p in range(2 * m):  # Gauss quadrature: exact up to degree 2m - 1
        B = torch.linalg.matrix_power(A / scale, p)
        expected = (V * (B @ V)).sum(0) / (V * V).sum(0)
        got = (sd.weights * (sd.nodes / scale) ** p).sum(1)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_slq_density_matches_the_exact_eigenvalues():
    A = _symmetric(30, seed=10)
    exact = torch.linalg.eigvalsh(A)
    sd = slq_spectral_density(A, num_steps=30, num_vectors=400, generator=_gen(3))
    sigma = 0.5
    grid = torch.linspace(-1, 25, 60, dtype=F64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - exact[None]) / sigma) ** 2)
    truth = (kernel / (sigma * math.sqrt(2 * math.pi))).mean(1)
    # the weights of one vector have variance ~2/d^2 each: 400 vectors give ~1 % noise
    torch.testing.assert_close(
        sd.density(grid, sigma), truth, rtol=0.0, atol=0.02 * float(truth.max())
    )
    # moments are unbiased: z-test over vectors for tr(A)/d and tr(A^2)/d
    per_vector = [(sd.weights * sd.nodes**p).sum(1) for p in (1, 2)]
    for p, samples in zip((1, 2), per_vector):
        truth_p = (exact**p).mean()
        assert abs(float(_z(samples, truth_p))) < 4.0
    # the density integrates to 1
    wide = torch.linspace(-10, 40, 4001, dtype=F64)
    torch.testing.assert_close(
        torch.trapezoid(sd.density(wide, sigma), wide), torch.tensor(1.0, dtype=F64)
    )


def test_slq_plot_helper(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = _symmetric(20, seed=11)
    sd = slq_spectral_density(A, num_steps=10, num_vectors=4, generator=_gen(4))
    ax = sd.plot()
    line = ax.get_lines()[0]
    assert len(line.get_xdata()) == 1000 and ax.get_yscale() == "log"
    ax.figure.savefig(tmp_path / "density.png")
    plt.close(ax.figure)


@pytest.mark.parametrize("estimator", [*TRACES, *DIAGONALS, hutchinson_squared_fro])
def test_bad_budgets_and_operators(estimator):
    A = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="num_matvecs must be at least"):
        estimator(A, 0)
    with pytest.raises(TypeError, match="num_matvecs must be an integer"):
        estimator(A, 2.0)
    with pytest.raises(ValueError, match="must be square"):
        estimator(torch.ones(5, 4, dtype=F64), 2)
    with pytest.raises(ValueError, match="distribution must be one of"):
        estimator(torch.eye(50, dtype=F64), 3, "uniform")
    with pytest.raises(TypeError, match="expected a curvature operator"):
        estimator([[1.0]], 1)


def test_slq_bad_input():
    A = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        slq_spectral_density(A, 0)
    with pytest.raises(ValueError, match="num_vectors must be at least 1"):
        slq_spectral_density(A, 3, num_vectors=0)
    with pytest.raises(ValueError, match="start_vectors must have shape"):
        slq_spectral_density(A, 3, start_vectors=torch.ones(4, 1, dtype=F64))
    with pytest.raises(ValueError, match="sigma must be positive"):
        slq_spectral_density(A, 3).density(torch.zeros(2, dtype=F64), sigma=0.0)
