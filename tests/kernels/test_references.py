"""The kernels' PyTorch references against float64 dense results (the CPU path)."""

import importlib

import pytest
import torch

from curvopt import kernels


@pytest.mark.parametrize("m,d,k", [(1, 1, 1), (3, 7, 2), (33, 1000, 4)])
def test_multi_dot_and_combine_reference(m, d, k):
    G = torch.randn(m, d, dtype=torch.float64)
    V = torch.randn(k, d, dtype=torch.float64)
    P = kernels.multi_dot_reference(G, V, torch.float64)
    assert torch.allclose(P, torch.einsum("md,kd->mk", G, V), atol=1e-12)
    x, c = torch.randn(d, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    y = kernels.combine_reference(0.5, x, G, c)
    assert torch.allclose(y, 0.5 * x + sum(c[i] * G[i] for i in range(m)), atol=1e-12)


@pytest.mark.parametrize("m,d,B", [(3, 7, None), (4, 10, 3), (5, 9, 9), (2, 1, 4)])
def test_gram_diag_reference(m, d, B):
    G = torch.randn(m, d, dtype=torch.float64)
    nb = 1 if B is None else -(-d // B)
    T = torch.randn(nb, m, m, dtype=torch.float64)
    s = kernels.gram_diag_reference(G, T, B)
    Bv = d if B is None else B
    expect = torch.stack([(T[j // Bv] @ G[:, j]).pow(2).sum() for j in range(d)])
    assert torch.allclose(s, expect, atol=1e-12)


def test_softmax_curvature_reference():
    z, u = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    out = kernels.softmax_curvature_reference(z, u)
    for r in range(4):
        H = torch.func.hessian(lambda t: torch.logsumexp(t, 0))(z[r])
        assert torch.allclose(out[r], H @ u[r], atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_references_convert_G_in_column_chunks(monkeypatch, chunk):
    """With G stored in another dtype, the references convert it a few columns at a time."""
    for name in ("combine", "gram_diag", "multi_dot"):  # the modules, not the functions
        module = importlib.import_module(f"curvopt.kernels.{name}")
        monkeypatch.setattr(module, "_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(chunk)
    m, d = 3, 23
    G = torch.randn(m, d, generator=gen).to(torch.bfloat16)
    G64 = G.double()
    V = torch.randn(2, d, generator=gen, dtype=torch.float64)
    P = kernels.multi_dot_reference(G, V, torch.float64)
    torch.testing.assert_close(P, G64 @ V.T, rtol=1e-12, atol=1e-12)
    x, c = torch.randn(d, 2, generator=gen), torch.randn(m, 2, generator=gen, dtype=torch.float64)
    y = kernels.combine_reference(0.5, x, G, c)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (0.5 * x.double() + G64.T @ c).float())
    for B, nb in [(None, 1), (4, 6), (23, 1)]:
        T = torch.randn(nb, m, m, generator=gen, dtype=torch.float64)
        s = kernels.gram_diag_reference(G, T, B)
        Bv = d if B is None else B
        expect = torch.stack([(T[j // Bv] @ G64[:, j]).pow(2).sum() for j in range(d)])
        torch.testing.assert_close(s, expect, rtol=1e-12, atol=1e-12)
