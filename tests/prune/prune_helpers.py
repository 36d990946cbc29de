"""Tiny models and data shared by the pruning tests."""

import torch
from torch import nn


def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def tiny_data(n=24, batch=4, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(X[s : s + batch], y[s : s + batch]) for s in range(0, n, batch)]
