import pytest
import torch
from torch import nn

from curvopt.bench import Problem, make_problem
from curvopt.bench.problems import CNN_SAMPLES


@pytest.mark.parametrize(
    "name, d, n",
    [("logistic", 31, 569), ("softmax", 650, 1797), ("mlp", 2410, 1797), ("cnn", 640, CNN_SAMPLES)],
)
def test_builtin_problems_build_and_train(name, d, n):
    # float32 keeps this quick (float64 convolutions are slow on the CPU); the CLI test runs float64
    untrained = make_problem(name, train_steps=0, dtype=torch.float32)
    trained = make_problem(name, train_steps=5, dtype=torch.float32)
    assert trained.num_params == d and trained.num_samples == n
    assert trained.dtype == torch.float32
    assert trained.loss() < untrained.loss()  # the warm-up training moved away from the init
    assert torch.isfinite(trained.gradient()).all()


def test_loss_function_is_the_batch_weighted_mean(problem):
    X = torch.cat([b[0] for b in problem.data])
    y = torch.cat([b[1] for b in problem.data])
    full = nn.functional.cross_entropy(problem.model(X), y)
    assert float(problem.loss_function()(problem.flat_params())) == pytest.approx(
        float(full.detach()), rel=1e-12
    )


def test_per_sample_gradients_match_autograd(problem):
    idx = [0, 5, 17]
    G = problem.per_sample_gradients(idx, chunk=2)
    X, y = problem.sample(idx)
    for row, x, t in zip(G, X, y):
        problem.model.zero_grad()
        nn.functional.cross_entropy(problem.model(x[None]), t[None]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in problem.model.parameters()])
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-12)


def test_problem_rejects_bad_inputs():
    model = nn.Linear(2, 2)
    X, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(TypeError, match="loss_func"):
        Problem("p", model, nn.NLLLoss(), [(X, y)])
    with pytest.raises(ValueError, match="reduction"):
        Problem("p", model, nn.CrossEntropyLoss(reduction="sum"), [(X, y)])
    with pytest.raises(ValueError, match="empty"):
        Problem("p", model, nn.CrossEntropyLoss(), [])
    with pytest.raises(ValueError, match="targets"):
        Problem("p", model, nn.CrossEntropyLoss(), [(X, y[:2])])
    with pytest.raises(ValueError, match="unknown problem"):
        make_problem("resnet")
    with pytest.raises(ValueError, match="train_steps"):
        make_problem("logistic", train_steps=-1)
