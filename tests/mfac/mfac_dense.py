"""Dense float64 references for the M-FAC tests: F built explicitly, solved by torch.linalg."""

import torch

EPS64 = torch.finfo(torch.float64).eps


def dense_fisher(G, damp, block_size=None):
    """F = damp*I + G^T G / m (block-diagonal over chunks of block_size), built entry by entry."""
    G = G.to(torch.float64)
    m, d = G.shape
    F = damp * torch.eye(d, dtype=torch.float64)
    B = d if block_size is None else block_size
    for s in range(0, d, B):
        Gb = G[:, s : s + B]
        F[s : s + B, s : s + B] += Gb.T @ Gb / m
    return F


def woodbury_rtol(G, damp, block_size=None, floor=1e-12, eps=EPS64):
    """Relative tolerance for a damped inverse: the Woodbury form cancels terms of size |x|/damp.

    Its amplification is lambda_max(F)/damp (>= cond(F)); float64 loses log10 of that many digits.
    lambda_max(F) = damp + max over blocks of lambda_max(G_b G_b^T)/m (from the small Gram).
    """
    G = G.to(torch.float64)
    m, d = G.shape
    B = d if block_size is None else block_size
    top = max(
        torch.linalg.eigvalsh(G[:, s : s + B] @ G[:, s : s + B].T)[-1].item()
        for s in range(0, d, B)
    )
    lam_max = damp + top / m
    return max(floor, 100 * eps * lam_max / damp)


def rel_err(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
