"""StaticMFAC against a dense float64 F = damp*I + G^T G/m built explicitly."""

import pytest
import torch
from mfac_dense import dense_fisher, rel_err, woodbury_rtol

from curvopt.mfac import StaticMFAC

SHAPES = [(1, 1), (1, 40), (3, 2), (5, 300), (17, 9), (64, 33), (64, 200)]
DAMPS = [1e-8, 1e-4, 1.0, 1e2]


def _grads(m, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("damp", DAMPS)
@pytest.mark.parametrize("block_size", [None, 7])
def test_static_matches_dense_inverse(m, d, damp, block_size):
    G = _grads(m, d, seed=m * 1000 + d)
    F = dense_fisher(G, damp, block_size)
    Finv = torch.linalg.inv(F)
    tol = woodbury_rtol(G, damp, block_size)
    op = StaticMFAC(G, damp, block_size)
    gx = torch.Generator().manual_seed(7)
    x = torch.randn(d, generator=gx, dtype=torch.float64)
    X = torch.randn(d, 3, generator=gx, dtype=torch.float64)
    assert rel_err(op.ihvp(x), torch.linalg.solve(F, x)) < tol
    assert rel_err(op.ihvp(X), torch.linalg.solve(F, X)) < tol
    assert rel_err(op.mul(X), F @ X) < 1e-13
    assert rel_err(op.inverse_diagonal(), Finv.diagonal()) < tol
    idx = torch.unique(torch.tensor([0, d - 1, d // 2, (3 * d) // 4]))
    assert rel_err(op.inverse_entries(idx), Finv.diagonal()[idx]) < tol
    rows = op.inverse_rows(idx)
    assert rows.shape == (idx.numel(), d)
    assert rel_err(rows, Finv[idx]) < tol
    if block_size is not None and d > block_size:  # exactly zero outside the row's block
        for r, i in enumerate(idx.tolist()):
            b = i // block_size
            outside = torch.ones(d, dtype=torch.bool)
            outside[b * block_size : (b + 1) * block_size] = False
            assert torch.all(rows[r, outside] == 0)


def _block_solve(G, damp, R, block_size):
    """Solve with the block-diagonal F: each diagonal block built explicitly, torch.linalg.solve."""
    d = G.shape[1]
    B = d if block_size is None else block_size
    out = torch.empty_like(R)
    for s in range(0, d, B):
        out[s : s + B] = torch.linalg.solve(dense_fisher(G[:, s : s + B], damp), R[s : s + B])
    return out


@pytest.mark.parametrize(
    "d,block_size",
    [(5000, 128), (5000, 300), (2500, None), pytest.param(5000, None, marks=pytest.mark.slow)],
)
def test_static_large_d(d, block_size):
    """d in the thousands (d > m): solves against the dense F for many right-hand sides."""
    m, damp = 24, 1e-3
    G = _grads(m, d, seed=3)
    gx = torch.Generator().manual_seed(8)
    X = torch.randn(d, 2, generator=gx, dtype=torch.float64)
    idx = torch.randperm(d, generator=gx)[:20]
    E = torch.zeros(d, idx.numel(), dtype=torch.float64)
    E[idx, torch.arange(idx.numel())] = 1.0
    sol = _block_solve(G, damp, torch.cat([X, E], 1), block_size)
    tol = woodbury_rtol(G, damp, block_size)
    op = StaticMFAC(G, damp, block_size)
    assert op.block_size == (d if block_size is None else block_size)
    assert rel_err(op.ihvp(X), sol[:, :2]) < tol
    cols = sol[:, 2:]
    assert rel_err(op.inverse_rows(idx), cols.T) < tol
    diag_ref = cols[idx, torch.arange(idx.numel())]
    assert rel_err(op.inverse_entries(idx), diag_ref) < tol
    assert rel_err(op.inverse_diagonal()[idx], diag_ref) < tol


@pytest.mark.parametrize("m,d", [(1, 50), (6, 4), (32, 500)])
def test_static_damp_override(m, d):
    G = _grads(m, d, seed=11)
    op = StaticMFAC(G, 1e-2, block_size=None if d < 100 else 64)
    x = torch.randn(d, dtype=torch.float64)
    for damp in [3e-2, 1.0, 1e-5, 1e-2]:
        F = dense_fisher(G, damp, op.block_size if op.num_blocks > 1 else None)
        assert rel_err(op.ihvp(x, damp=damp), torch.linalg.solve(F, x)) < woodbury_rtol(
            G, damp, op.block_size
        )
    assert op.damp == 1e-2  # the override does not change the operator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [None, 16])
def test_static_low_precision_storage(dtype, block_size):
    """G stored in a narrow dtype: compared with the dense F of the *stored* gradients, the error is
    that of float32 accumulation; with accumulate_dtype=float64 that of float64."""
    m, d, damp = 12, 150, 1e-1
    G = _grads(m, d, seed=5).to(dtype)
    F = dense_fisher(G, damp, block_size)
    Finv = torch.linalg.inv(F)
    x = torch.randn(d, dtype=torch.float32)
    for acc, eps in [(None, torch.finfo(torch.float32).eps), (torch.float64, 2.3e-16)]:
        op = StaticMFAC(G, damp, block_size, accumulate_dtype=acc)
        tol = woodbury_rtol(G, damp, block_size, floor=1e-6 if acc is None else 1e-12, eps=eps)
        xa = x if acc is None else x.double()  # the result has x's dtype
        assert rel_err(op.ihvp(xa), Finv @ x.double()) < tol
        assert op.ihvp(xa).dtype == xa.dtype
        assert rel_err(op.inverse_diagonal(), Finv.diagonal()) < tol
        assert rel_err(op.inverse_rows([3, 77]), Finv[[3, 77]]) < tol
        assert op.inverse_diagonal().dtype == (torch.float32 if acc is None else torch.float64)


def test_static_float64_accumulation_in_span():
    """A vector inside the span of G at damp 1e-4 with float32 G: float32 products lose digits
    to cancellation, float64 accumulation recovers them (vs the dense F of the stored G)."""
    m, d, damp = 16, 2000, 1e-4
    G = _grads(m, d, seed=9).float()
    x = (G.double().T @ torch.randn(m, dtype=torch.float64)).float()
    ref = torch.linalg.solve(dense_fisher(G, damp), x.double())
    err32 = rel_err(StaticMFAC(G, damp).ihvp(x), ref)
    err64 = rel_err(StaticMFAC(G, damp, accumulate_dtype=torch.float64).ihvp(x.double()), ref)
    assert err64 < woodbury_rtol(G, damp)
    assert err32 > 100 * err64  # float32 products lose most digits here (documented in the guide)


def test_static_attributes_and_memory():
    G = torch.randn(6, 100)
    op = StaticMFAC(G, 1e-3, block_size=30)
    assert (op.dim, op.m, op.damp, op.block_size, op.num_blocks) == (100, 6, 1e-3, 30, 4)
    assert op.memory_bytes() >= 6 * 100 * 4 + 2 * 4 * 36 * 8
    assert op.G is G  # not copied
    assert StaticMFAC(G, 1.0, block_size=1000).num_blocks == 1


@pytest.mark.parametrize("damp", [1e-5, 1e-8, 1e-12])
@pytest.mark.parametrize("m,d,block_size", [(64, 96, 32), (64, 100, 64), (16, 10, None)])
def test_small_block_inverse_diagonal_is_accurate_at_small_damp(m, d, block_size, damp):
    """Blocks no wider than m: the diagonal comes from the B x B factor, without the cancellation
    of the Woodbury form (which loses log10(lambda_max/damp) digits: 1e-10 at damp=1e-5 here).
    Entry-wise against torch.linalg.inv of the dense float64 F, whose own error is about
    eps * cond(F) (cond(F) ~ 30 for B = m/2, larger for square blocks)."""
    G = torch.randn(m, d, dtype=torch.float64)
    F = dense_fisher(G, damp, block_size)
    evals = torch.linalg.eigvalsh(F)
    tol = max(1e-13, 20 * torch.finfo(torch.float64).eps * float(evals[-1] / evals[0]))
    Finv = torch.linalg.inv(F)
    diag = StaticMFAC(G, damp, block_size).inverse_diagonal()
    assert diag.dtype == torch.float64
    assert float(((diag - Finv.diagonal()).abs() / Finv.diagonal()).max()) < tol
