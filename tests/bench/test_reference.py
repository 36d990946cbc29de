import pytest
import torch
from bench_tiny_problem import tiny_problem
from torch import nn

from curvopt.bench import Problem, make_approximation, run_benchmark
from curvopt.bench.problems import BinaryLogits


def dense_of(approx, d):
    return approx.matvec(torch.eye(d, dtype=torch.float64))


@pytest.mark.parametrize("max_dense_dim", [20_000, 5])  # dense eigh path and matrix-free path
def test_hessian_reference_matches_torch_func_hessian(problem, max_dense_dim):
    d = problem.num_params
    expected = torch.func.hessian(problem.loss_function())(problem.flat_params())
    ref = make_approximation("hessian", max_dense_dim=max_dense_dim)
    ref.setup(problem, damping=0.1)
    torch.testing.assert_close(dense_of(ref, d), expected, rtol=1e-10, atol=1e-12)
    # the damped solve and the eigenvalues, against torch.linalg on the same matrix
    v = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    solve = torch.linalg.solve(expected + 0.1 * torch.eye(d, dtype=torch.float64), v)
    torch.testing.assert_close(ref.ihvp(v), solve, rtol=1e-7, atol=1e-9)
    top = torch.linalg.eigvalsh(expected).flip(0)[:3]
    torch.testing.assert_close(ref.top_eigenvalues(3), top, rtol=1e-8, atol=1e-10)


def test_reference_kind_and_damping_in_a_run():
    problem = tiny_problem(seed=1)
    H = torch.func.hessian(problem.loss_function())(problem.flat_params())
    result = run_benchmark(problem, ["hessian"], relative_damping=0.5, repeats=1)
    assert result.reference["kind"] == "dense"
    assert result.reference["min_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(H)[0]))
    assert result.config["damping"] == pytest.approx(0.5 * float(torch.linalg.eigvalsh(H)[-1]))
    assert result.record("hessian")["ihvp_rel_error"] < 1e-10


def test_logistic_two_logit_model_is_logistic_regression():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(10, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (10,), generator=gen)
    lin = nn.Linear(3, 1).double()
    two = nn.Sequential(lin, BinaryLogits())
    ce = nn.functional.cross_entropy(two(X), y)
    bce = nn.functional.binary_cross_entropy_with_logits(lin(X).squeeze(1), y.double())
    assert float(ce.detach()) == pytest.approx(float(bce.detach()), rel=1e-12)


def test_sqgrad_diagonal_is_the_empirical_fisher_diagonal(problem):
    d = problem.num_params
    G = torch.func.jacrev(
        lambda w: torch.stack(
            [
                nn.functional.cross_entropy(
                    torch.func.functional_call(problem.model, problem._as_dict(w), (x[None],)),
                    t[None],
                )
                for x, t in zip(*problem.sample(range(problem.num_samples)))
            ]
        )
    )(problem.flat_params())  # (N, d) per-sample gradients by a separate route
    ef = G.T @ G / problem.num_samples
    diag = make_approximation("sqgrad_diag")
    diag.setup(problem, damping=1.0)
    torch.testing.assert_close(diag.diagonal, torch.diagonal(ef), rtol=1e-10, atol=1e-14)
    efop = make_approximation("empirical_fisher")
    efop.setup(problem, damping=1.0)
    torch.testing.assert_close(dense_of(efop, d), ef, rtol=1e-10, atol=1e-14)


def test_user_problem_with_kfac_exact_on_a_linear_mse_model():
    """For a bias-free linear model with MSE the GGN is (2 / (N C)) sum_n x_n x_n^T ⊗ I, which K-FAC
    represents exactly, so K-FAC must score round-off error against a GGN reference."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(16, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(16, 2, dtype=torch.float64, generator=gen)
    model = nn.Linear(3, 2, bias=False).double()  # K-FAC splits W and b into separate blocks
    problem = Problem("regression", model, nn.MSELoss(), [(X[:8], y[:8]), (X[8:], y[8:])])
    result = run_benchmark(
        problem, ["ggn", "kfac", "ekfac", "sqgrad_diag"], reference="ggn", damping=1e-2, repeats=1
    )
    for r in result.records:
        assert r["error"] is None, r["error"]
    for name in ("kfac", "ekfac"):
        assert result.record(name)["ihvp_rel_error"] < 1e-10
        assert result.record(name)["top_eig_rel_error"] < 1e-10
    assert result.record("sqgrad_diag")["ihvp_rel_error"] > 1e-3


def test_mfac_with_all_samples_is_the_damped_empirical_fisher(problem):
    """With m = N per-sample gradients, λI + GᵀG/m is exactly the damped empirical Fisher."""
    n = problem.num_samples
    result = run_benchmark(
        problem,
        [f"mfac_m{n}", "mfac_m4", f"mfac_m{n + 1}"],
        reference="empirical_fisher",
        damping=1e-3,
        repeats=1,
        top_k=3,
    )
    full = result.record(f"mfac_m{n}")
    assert full["error"] is None, full["error"]
    assert full["ihvp_rel_error"] < 1e-8 and full["top_eig_rel_error"] < 1e-8
    assert full["m"] == n and full["family"] == "low-rank"
    assert result.record("mfac_m4")["ihvp_rel_error"] > 1e-3
    assert "exceeds the number of samples" in result.record(f"mfac_m{n + 1}")["error"]
