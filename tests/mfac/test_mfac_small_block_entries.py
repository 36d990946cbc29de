"""Inverse entries and rows of StaticMFAC with blocks no wider than m, against dense float64.

With ``B <= m`` the Woodbury form ``1/lam - ||.||^2/lam^2`` cancels (2e-10 relative error at
damp 1e-5, 3e-7 at 1e-8 for m=64, B=32 before the fix); the entries and rows now come from the
``B x B`` block's own Cholesky factor, like ``inverse_diagonal``.
"""

import pytest
import torch
from mfac_dense import dense_fisher

from curvopt.mfac import StaticMFAC

DT = torch.float64


def _problem(m, d, seed):
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("damp", [1e-5, 1e-8])
@pytest.mark.parametrize("d, block", [(96, 32), (100, 32), (40, None)])
def test_entries_and_rows_match_dense_inverse(damp, d, block):
    m = 64
    G = _problem(m, d, seed=int(1e3 * damp) + d)
    inv = torch.linalg.inv(dense_fisher(G, damp, block))
    op = StaticMFAC(G, damp, block_size=block)
    idx = torch.randperm(d, generator=torch.Generator().manual_seed(7))[:23]
    idx = torch.cat([idx, torch.tensor([d - 1, 0, d - 1])])  # the short last block, repeats
    entries = op.inverse_entries(idx)
    want = inv.diagonal()[idx]
    assert ((entries - want).abs() / want).max() < 1e-12
    rows = op.inverse_rows(idx)
    want_rows = inv[idx]
    err = (rows - want_rows).norm(dim=1) / want_rows.norm(dim=1)
    assert err.max() < 1e-12
    # zero outside the block of each coordinate, exactly
    assert torch.equal(rows == 0, want_rows == 0) or block is None


def test_float32_storage_is_accurate_too():
    m, d, damp = 32, 48, 1e-6
    G = _problem(m, d, seed=3).float()
    inv = torch.linalg.inv(dense_fisher(G.double(), damp, 16))
    op = StaticMFAC(G, damp, block_size=16)
    idx = torch.arange(0, d, 5)
    assert op.inverse_entries(idx).dtype == torch.float32
    rel = (op.inverse_entries(idx).double() - inv.diagonal()[idx]).abs() / inv.diagonal()[idx]
    assert rel.max() < 1e-6
    rows = op.inverse_rows(idx).double()
    assert ((rows - inv[idx]).norm(dim=1) / inv[idx].norm(dim=1)).max() < 1e-6


def test_many_indices_use_chunks(monkeypatch):
    """More indices than one chunk of factors (TEMP_ELEMENTS shrunk): same results."""
    from curvopt.mfac import _products

    m, d, damp = 8, 30, 1e-3
    G = _problem(m, d, seed=4)
    op = StaticMFAC(G, damp, block_size=4)
    idx = torch.arange(d).repeat(2)
    full_rows, full_entries = op.inverse_rows(idx), op.inverse_entries(idx)
    monkeypatch.setattr(_products, "TEMP_ELEMENTS", 64)  # 2 blocks per chunk
    assert torch.allclose(op.inverse_rows(idx), full_rows, rtol=1e-14, atol=0)
    assert torch.allclose(op.inverse_entries(idx), full_entries, rtol=1e-14, atol=0)
    inv = torch.linalg.inv(dense_fisher(G, damp, 4))
    assert torch.allclose(full_rows, inv[idx], rtol=1e-12, atol=1e-12 * inv.abs().max())
