"""Monte-Carlo Fisher: exact sandwich with the same draws, reproducibility, convergence."""

import pytest
import torch
from problems import cached_problem, cached_reference, output_hessians, output_jacobian
from torch import nn

from curvopt.curvature import FisherOperator
from curvopt.curvature.losses import reduction_scale, sample_output_gradients


def dense_mc_fisher(problem, mc_samples, seed):
    """``sum_b w_b c_b / M sum_{n,m} J_n^T g_nm g_nm^T J_n`` with the operator's draws."""
    output, J = output_jacobian(problem)
    gen = torch.Generator().manual_seed(seed)
    N = output.shape[0]
    F, start = 0.0, 0
    for X, y_b in problem.data:
        n_b = X.shape[0]
        out_b, J_b = output[start : start + n_b], J[start : start + n_b]
        start += n_b
        g = sample_output_gradients(problem.loss, out_b, mc_samples, gen)  # (M, n_b, C)
        weight = n_b / N if problem.loss.reduction == "mean" else 1.0
        scale = weight * reduction_scale(problem.loss, y_b) / mc_samples
        JTg = torch.einsum("ncd,mnc->mnd", J_b, g)
        F = F + scale * torch.einsum("mni,mnj->ij", JTg, JTg)
    return F


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mc_fisher_matches_dense_sandwich(name, reduction):
    problem = cached_problem(name, reduction)
    op = FisherOperator(
        problem.model, problem.loss, problem.params, problem.data, mc_samples=3, seed=7
    )
    expected = dense_mc_fisher(problem, 3, 7)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.shape[1], dtype=torch.float64)  # single-column path, same draws
    torch.testing.assert_close(op @ v, expected @ v, rtol=1e-10, atol=1e-12)


def test_mc_fisher_reproducible_and_seed_dependent():
    problem = cached_problem("mlp-ce", "mean")
    args = (problem.model, problem.loss, problem.params, problem.data)
    v = torch.randn(sum(p.numel() for p in problem.params), dtype=torch.float64)
    a = FisherOperator(*args, mc_samples=2, seed=1)
    b = FisherOperator(*args, mc_samples=2, seed=1)
    c = FisherOperator(*args, mc_samples=2, seed=2)
    assert torch.equal(a @ v, a @ v) and torch.equal(a @ v, b @ v)
    assert not torch.allclose(a @ v, c @ v)
    assert a.mc_samples == 2 and FisherOperator(*args).mc_samples is None


@pytest.mark.parametrize("name", ["mlp-ce", "mlp-mse"])
def test_mc_fisher_converges_to_exact(name):
    problem = cached_problem(name, "mean")
    args = (problem.model, problem.loss, problem.params, problem.data)
    exact = cached_reference("ggn", name, "mean")
    errors = []
    for m in (1, 1000):
        F = FisherOperator(*args, mc_samples=m, seed=3).to_dense()
        errors.append(float(torch.linalg.norm(F - exact) / torch.linalg.norm(exact)))
    assert errors[1] < 0.1 and errors[1] < errors[0] / 5


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(reduction="sum"), nn.MSELoss()])
def test_sampled_output_gradients_have_the_loss_hessian_as_second_moment(loss):
    torch.manual_seed(0)
    output = torch.randn(3, 4, dtype=torch.float64)
    g = sample_output_gradients(loss, output, 100_000, torch.Generator().manual_seed(0))
    moment = torch.einsum("mni,mnj->nij", g, g) / g.shape[0]
    problem = type("P", (), {"loss": loss})()
    torch.testing.assert_close(moment, output_hessians(problem, output), rtol=0, atol=0.05)
