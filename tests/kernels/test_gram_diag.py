"""Triton gram_diag (M-FAC's inverse diagonal core) against its reference and float64 dense."""

import pytest
import torch
from kernel_helpers import SIZE_DTYPE_CASES, assert_close_scaled

from curvopt import kernels
from curvopt.kernels.gram_diag import gram_diag_reference, gram_diag_triton


def _dense(G, T, B):
    """Column by column: s_j = ||T_{b(j)} g_j||^2 and the same with absolute values."""
    G64, T64 = G.double().cpu(), T.double().cpu()
    d = G.shape[1]
    Bv = d if B is None else B
    TG, absTG = torch.empty_like(G64), torch.empty_like(G64)
    for b in range(T.shape[0]):
        cols = slice(b * Bv, (b + 1) * Bv)
        TG[:, cols] = T64[b] @ G64[:, cols]
        absTG[:, cols] = T64[b].abs() @ G64[:, cols].abs()
    return TG.square().sum(0), absTG.square().sum(0)


def _check(G, T, B, **launch):
    got = gram_diag_triton(G, T, B, **launch)
    ref = gram_diag_reference(G, T, B)
    dense, scale = _dense(G, T, B)
    acc = torch.promote_types(T.dtype, torch.float32)
    kw = dict(out_dtype=T.dtype, acc_dtype=acc, n=2 * G.shape[0])
    for result in (got, ref):
        assert_close_scaled(result, dense, scale, **kw)
    assert_close_scaled(got, ref.double(), scale, **kw)


def _lower_inverse(m, nb, gen, dtype=torch.float64):
    """T_b = L_b^{-1} for random SPD A_b = L_b L_b^T, as M-FAC builds them."""
    X = torch.randn(nb, m, 2 * m, generator=gen, dtype=torch.float64)
    A = X @ X.transpose(1, 2) / (2 * m) + torch.eye(m, dtype=torch.float64)
    L = torch.linalg.cholesky(A)
    eye = torch.eye(m, dtype=torch.float64).expand(nb, m, m)
    return torch.linalg.solve_triangular(L, eye, upper=False).to(dtype).contiguous()


@pytest.mark.parametrize("d,m,dtype", SIZE_DTYPE_CASES)
def test_gram_diag_one_block(device, d, m, dtype):
    gen = torch.Generator().manual_seed(1000 * d + m)
    G = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
    T = _lower_inverse(m, 1, gen, torch.float32).to(device)
    _check(G, T, None)


@pytest.mark.parametrize(
    "d,m,B,t_dtype",
    [
        (7, 3, 3, torch.float32),
        (1000, 33, 256, torch.float64),
        (4099, 64, 1024, torch.float32),
        (1, 64, 5, torch.float64),
        (1000, 1, 999, torch.float32),
    ],
)
def test_gram_diag_blocks(device, d, m, B, t_dtype):
    gen = torch.Generator().manual_seed(d + B)
    G = torch.randn(m, d, generator=gen).to(device=device, dtype=torch.bfloat16)
    T = _lower_inverse(m, -(-d // B), gen, t_dtype).to(device)
    _check(G, T, B)


def test_gram_diag_general_T_and_dot_path(device):
    """A general (not triangular) T, and the tl.dot path the GPU takes, in any backend."""
    gen = torch.Generator().manual_seed(8)
    G = torch.randn(33, 300, generator=gen).to(device)
    T = torch.randn(3, 33, 33, generator=gen).to(device)
    _check(G, T, 128, use_dot=True)
    _check(G, T.double(), 128, use_dot=True)
    _check(G, T, 128, use_dot=False)


def test_gram_diag_non_contiguous(device):
    gen = torch.Generator().manual_seed(9)
    G = torch.randn(33, 500, generator=gen).to(device)[:, 100:400]
    Gt = torch.randn(300, 33, generator=gen).to(device).T
    T = _lower_inverse(33, 3, gen, torch.float32).to(device).transpose(1, 2)  # upper, strided
    assert not G.is_contiguous() and not Gt.is_contiguous() and not T.is_contiguous()
    _check(G, T, 128)
    _check(Gt, T, 128)


def test_gram_diag_mfac_inverse_diagonal(device):
    """1/damp - s/damp^2 is the diagonal of (damp I + G^T G / m)^{-1} (the M-FAC use)."""
    gen = torch.Generator().manual_seed(10)
    m, d, damp = 8, 60, 0.1
    G = torch.randn(m, d, generator=gen, dtype=torch.float64).to(device)
    A = m * torch.eye(m, dtype=torch.float64, device=device) + G @ G.T / damp
    T = torch.linalg.inv(torch.linalg.cholesky(A))[None]
    diag = 1 / damp - gram_diag_triton(G, T) / damp**2
    F = damp * torch.eye(d, dtype=torch.float64) + G.cpu().T @ G.cpu() / m
    torch.testing.assert_close(diag.cpu(), torch.linalg.inv(F).diagonal(), rtol=1e-10, atol=0)


def test_gram_diag_empty_and_dispatch(device):
    G = torch.randn(0, 5, device=device)
    assert torch.equal(
        gram_diag_triton(G, torch.zeros(1, 0, 0, device=device)), torch.zeros(5, device=device)
    )
    G = torch.randn(3, 50, device=device, dtype=torch.bfloat16)
    T = torch.randn(2, 3, 3, device=device)
    torch.testing.assert_close(kernels.gram_diag(G, T, 25), gram_diag_triton(G, T, 25))


@pytest.mark.parametrize("fn", [gram_diag_reference, gram_diag_triton])
def test_gram_diag_bad_input(device, fn):
    G = torch.randn(3, 10, device=device)
    with pytest.raises(ValueError, match=r"T must be \(nb, m, m\)"):
        fn(G, torch.randn(1, 4, 4, device=device))
    with pytest.raises(ValueError, match="needs 4"):
        fn(G, torch.randn(3, 3, 3, device=device), 3)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        fn(G, torch.randn(1, 3, 3, device=device), 0)
    with pytest.raises(ValueError, match="3-D"):
        fn(G, torch.randn(3, 3, device=device))


@pytest.mark.parametrize("chunk", [5 * 3, 4 * 7, 4 * 1000])  # columns per chunk: 3, 7, 1000
@pytest.mark.parametrize("B", [None, 4, 9])
def test_gram_diag_reference_chunking(monkeypatch, chunk, B):
    """The reference's two chunked paths (a large block in column ranges, a batch of small
    blocks per bmm) on small sizes, the last block shorter: against float64 dense."""
    # the module's globals (``curvopt.kernels.gram_diag`` itself names the dispatching function)
    monkeypatch.setitem(gram_diag_reference.__globals__, "_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(3)
    m, d = 5, 23
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    nb = 1 if B is None else -(-d // B)
    T = _lower_inverse(m, nb, gen)
    dense, _ = _dense(G, T, B)
    torch.testing.assert_close(gram_diag_reference(G, T, B), dense, rtol=1e-12, atol=0)
