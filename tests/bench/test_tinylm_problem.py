"""The tiny GPT-2 problem of the harness: builds, trains, and its pieces agree with autograd."""

import pytest
import torch
from torch import nn

from curvopt.bench import make_problem
from curvopt.bench.problems import copy_task
from curvopt.curvature import HessianOperator

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm_problem():
    return make_problem("tinylm", train_steps=5)


def test_tinylm_builds_trains_and_keeps_token_ids(lm_problem):
    untrained = make_problem("tinylm", train_steps=0)
    assert lm_problem.num_samples == 64 and lm_problem.dtype == torch.float64
    assert all(X.dtype == torch.long for X, _ in lm_problem.data)  # ids are not cast to floats
    assert lm_problem.loss() < untrained.loss()


def test_copy_task_labels_are_the_next_tokens():
    ids, labels = copy_task(3, 6, 10, torch.Generator().manual_seed(0))
    assert torch.equal(ids[:, :3], ids[:, 3:]) and torch.equal(labels[:, :-1], ids[:, 1:])
    assert (labels[:, -1] == -100).all() and ((ids >= 1) & (ids < 10)).all()


def test_tinylm_pieces_agree_with_autograd(lm_problem):
    idx = [0, 40]
    G = lm_problem.per_sample_gradients(idx, chunk=1)
    X, y = lm_problem.sample(idx)
    for row, x, t in zip(G, X, y):
        loss = nn.functional.cross_entropy(lm_problem.model(x[None]), t[None])
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, lm_problem.params)])
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-12)
    # the harness's full-data loss is the operators' risk: its gradient's HVP agrees
    H = HessianOperator(lm_problem.model, lm_problem.loss_func, lm_problem.params, lm_problem.data)
    w, v = lm_problem.flat_params(), torch.randn(H.shape[1], dtype=torch.float64)
    hv = torch.autograd.functional.hvp(lm_problem.loss_function(), w, v)[1]
    torch.testing.assert_close(H @ v, hv, rtol=1e-9, atol=1e-11)


def test_native_kfac_and_ekfac_run_on_tinylm(lm_problem):
    from curvopt.bench import run_benchmark
    from curvopt.bench.approximations import make_approximation

    result = run_benchmark(lm_problem, ["ggn", "kfac", "ekfac"], reference="ggn", repeats=1)
    for name in ("kfac", "ekfac"):
        record = result.record(name)
        assert record["error"] is None, record["error"]
        assert 0 < record["ihvp_rel_error"] < 1  # an approximation, but a useful one
    # the layers K-FAC leaves out (embeddings, LayerNorm) get a zero block: inverse 1 / lam
    approx = make_approximation("kfac")
    approx.setup(lm_problem, damping=0.5)
    skipped = torch.ones(approx.dim, dtype=torch.bool)
    skipped[approx.index] = False
    assert skipped.any() and approx.op.skipped
    v = torch.randn(approx.dim, dtype=torch.float64)
    torch.testing.assert_close(approx.ihvp(v)[skipped], v[skipped] / 0.5)
    assert (approx.matvec(v)[skipped] == 0).all()
