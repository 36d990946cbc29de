"""A tiny problem shared by the bench tests (a uniquely named module, not conftest)."""

import torch
from torch import nn

from curvopt.bench import Problem


def tiny_problem(seed: int = 0, n: int = 24, hidden: int = 3) -> Problem:
    """A tanh MLP 4-hidden-3 with cross-entropy on random data, in two unequal batches."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    data = [(X[: n // 3], y[: n // 3]), (X[n // 3 :], y[n // 3 :])]  # unequal batches
    return Problem("tiny", model, nn.CrossEntropyLoss(), data, "tiny MLP")
