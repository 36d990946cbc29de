"""The small float64 problem of the MFAC optimizer tests: three tensors, one smooth loss."""

import torch

DT = torch.float64
SHAPES = [(3, 2), (2,), (4,)]  # the group tests: group 0 the first two, group 1 the last


def make_loss(seed=0):
    """A loss of the flat 12-vector ``w``: a tanh regression on ``(A, b)`` plus a quadratic and
    a sine term on ``c``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(5, 3, generator=gen, dtype=DT)
    Y = torch.randn(5, 2, generator=gen, dtype=DT)
    Q = torch.randn(4, 4, generator=gen, dtype=DT)

    def loss_flat(w):
        A, b, c = w[:6].view(3, 2), w[6:8], w[8:12]
        return (
            ((X @ A + b).tanh() - Y).square().mean()
            + 0.1 * (Q @ c).square().sum()
            + (c.sin().sum())
        )

    return loss_flat


def make_params(seed=1, dtype=DT):
    """The three tensors of ``SHAPES``, drawn in float64, then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=DT).to(dtype).requires_grad_() for s in SHAPES]


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])
