import math

import pytest
import torch

from curvopt.bench import DenseApproximation, run_benchmark
from curvopt.bench.metrics import (
    column_relative_errors,
    cosine,
    ihvp_relative_error,
    top_eigenvalue_error,
)


def random_spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eig = torch.logspace(-2, 1, d, dtype=torch.float64)
    return Q @ torch.diag(eig) @ Q.T


def test_relative_error_per_column():
    exact = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    approx = torch.tensor([[1.5, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert column_relative_errors(approx, exact).tolist() == [0.5, 0.0]
    assert ihvp_relative_error(approx, exact) == pytest.approx(0.25)


def test_cosine_and_eigenvalue_error_on_constructed_cases():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert cosine(-a, a) == pytest.approx(-1.0)
    exact = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert top_eigenvalue_error(torch.tensor([4.0, 3.0], dtype=torch.float64), exact) == 0.0
    assert top_eigenvalue_error(
        torch.tensor([4.0, 0.0], dtype=torch.float64), exact
    ) == pytest.approx(3 / 5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: column_relative_errors(torch.ones(3), torch.ones(4)),
        lambda: column_relative_errors(torch.ones(3), torch.zeros(3)),
        lambda: cosine(torch.zeros(2), torch.ones(2)),
        lambda: top_eigenvalue_error(torch.ones(2), torch.ones(3)),
        lambda: top_eigenvalue_error(torch.ones(2), torch.zeros(2)),
    ],
)
def test_metrics_reject_bad_inputs(call):
    with pytest.raises(ValueError):
        call()


def test_exact_approximation_scores_zero(problem):
    A = random_spd(problem.num_params, seed=1)
    result = run_benchmark(
        problem,
        [DenseApproximation(A.clone(), name="same")],
        reference=DenseApproximation(A, name="exact"),
        damping=1e-3,
        num_probes=4,
        top_k=3,
        repeats=1,
    )
    r = result.record("same")
    assert r["error"] is None
    assert r["ihvp_rel_error"] < 1e-12
    assert r["newton_rel_error"] < 1e-12
    assert r["newton_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert r["top_eig_rel_error"] < 1e-12


def test_scaled_identity_scores_the_analytic_error(problem):
    """Ã = cI against A = Q diag(a) Q^T: in A's eigenbasis, with w = Q^T v and damping λ,

    (A+λ)^{-1} v = Q w/(a+λ),  (cI+λ)^{-1} v = Q w/(c+λ),
    error(v)^2 = sum_i w_i^2 (1/(c+λ) - 1/(a_i+λ))^2 / sum_i w_i^2 / (a_i+λ)^2.
    """
    d, c, lam, k = problem.num_params, 0.7, 0.05, 3
    A = random_spd(d, seed=2)
    a, Q = torch.linalg.eigh(A)
    result = run_benchmark(
        problem,
        [DenseApproximation(c * torch.eye(d, dtype=torch.float64), name="cI")],
        reference=DenseApproximation(A, name="exact"),
        damping=lam,
        num_probes=5,
        top_k=k,
        repeats=1,
        seed=7,
    )
    r = result.record("cI")

    def analytic_error(v):
        w = Q.T @ v
        diff = w * (1 / (c + lam) - 1 / (a + lam))
        return float(diff.norm() / (w / (a + lam)).norm())

    gen = torch.Generator().manual_seed(7)  # the runner's probes: randn(d, num_probes) from seed
    probes = torch.randn(d, 5, generator=gen, dtype=torch.float64)
    expected = sum(analytic_error(probes[:, j]) for j in range(5)) / 5
    assert r["ihvp_rel_error"] == pytest.approx(expected, rel=1e-10)

    g = problem.gradient()
    assert r["newton_rel_error"] == pytest.approx(analytic_error(g), rel=1e-10)
    exact_newton = Q @ ((Q.T @ g) / (a + lam))
    expected_cos = float(g @ exact_newton / (g.norm() * exact_newton.norm()))
    assert r["newton_cosine"] == pytest.approx(expected_cos, rel=1e-10)

    top = a.flip(0)[:k]
    expected_eig = float((torch.full((k,), c, dtype=torch.float64) - top).norm() / top.norm())
    assert r["top_eig_rel_error"] == pytest.approx(expected_eig, rel=1e-10)
    assert r["top_eigenvalues"] == pytest.approx([c] * k)


def test_relative_damping_uses_reference_top_eigenvalue(problem):
    A = random_spd(problem.num_params, seed=3)
    result = run_benchmark(
        problem,
        [DenseApproximation(A, name="same")],
        reference=DenseApproximation(A, name="exact"),
        relative_damping=0.1,
        repeats=1,
    )
    assert result.config["damping"] == pytest.approx(0.1 * float(torch.linalg.eigvalsh(A)[-1]))


def test_failing_method_is_recorded_not_raised(problem):
    A = random_spd(problem.num_params, seed=4)
    wrong = DenseApproximation(torch.eye(3, dtype=torch.float64), name="wrong-size")
    result = run_benchmark(
        problem, [wrong], reference=DenseApproximation(A), damping=1e-2, repeats=1
    )
    r = result.record("wrong-size")
    assert "ValueError" in r["error"] and r["ihvp_rel_error"] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"damping": 0.0},
        {"damping": -1.0},
        {"num_probes": 0},
        {"top_k": 0},
        {"repeats": 0},
        {"methods": []},
        {"methods": ["no_such_method"]},
        {"reference": "nonsense"},
    ],
)
def test_run_benchmark_rejects_bad_settings(problem, kwargs):
    kwargs.setdefault("methods", [DenseApproximation(torch.eye(problem.num_params))])
    with pytest.raises(ValueError):
        run_benchmark(problem, **kwargs)
