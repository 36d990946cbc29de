"""Triton multi-dot against its reference and a float64 dense product."""

import pytest
import torch
from conftest import SIZE_DTYPE_CASES, assert_close_scaled

from curvopt import kernels
from curvopt.kernels.multi_dot import multi_dot_reference, multi_dot_triton


def _check(G, V, out_dtype, **launch):
    got = multi_dot_triton(G, V, out_dtype, **launch)
    ref = multi_dot_reference(G, V, out_dtype)
    G64, V64 = G.double(), V.double()
    dense = G64 @ V64.T
    scale = G64.abs() @ V64.abs().T
    n = G.shape[1]
    for result in (got, ref):
        assert_close_scaled(result, dense, scale, out_dtype=out_dtype, acc_dtype=out_dtype, n=n)
    assert_close_scaled(got, ref.double(), scale, out_dtype=out_dtype, acc_dtype=out_dtype, n=n)


@pytest.mark.parametrize("d,m,dtype", SIZE_DTYPE_CASES)
def test_multi_dot_sizes_and_dtypes(device, d, m, dtype):
    gen = torch.Generator().manual_seed(1000 * d + m)
    k = 1 + (d + m) % 4  # every k in 1..4 across the grid
    G = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
    V = torch.randn(k, d, generator=gen).to(device)
    _check(G, V, torch.float32)


@pytest.mark.parametrize("k,n_split", [(1, 3), (2, 1), (3, 2), (4, 3)])
def test_multi_dot_splits_and_float64(device, k, n_split):
    gen = torch.Generator().manual_seed(k + 10 * n_split)
    G = torch.randn(33, 1000, generator=gen).to(device=device, dtype=torch.bfloat16)
    V = torch.randn(k, 1000, generator=gen, dtype=torch.float64).to(device)
    _check(G, V, torch.float32, n_split=n_split)
    _check(G, V, torch.float64, n_split=n_split)


def test_multi_dot_non_contiguous(device):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(33, 1200, generator=gen).to(device)
    G = wide[:, 100:1100]  # row stride 1200
    Gt = torch.randn(1000, 33, generator=gen).to(device).T  # column stride 33
    V = torch.randn(1000, 2, generator=gen).to(device).T  # (2, 1000), column stride 2
    assert not G.is_contiguous() and not Gt.is_contiguous() and not V.is_contiguous()
    _check(G, V, torch.float32)
    _check(Gt, V, torch.float32)
    _check(G.to(torch.float16), V[:, ::1], torch.float32)


def test_multi_dot_many_vectors_and_empty_fall_back(device):
    G = torch.randn(5, 9, device=device)
    V = torch.randn(6, 9, device=device)  # k > 4: reference GEMM
    _check(G, V, torch.float32)
    assert multi_dot_triton(G[:0], V).shape == (0, 6)
    assert torch.equal(multi_dot_triton(G[:, :0], V[:, :0]), torch.zeros(5, 6, device=device))


def test_multi_dot_dispatch_matches(device):
    G = torch.randn(3, 50, device=device, dtype=torch.bfloat16)
    V = torch.randn(2, 50, device=device)
    torch.testing.assert_close(kernels.multi_dot(G, V), multi_dot_triton(G, V))


@pytest.mark.parametrize("fn", [multi_dot_reference, multi_dot_triton])
def test_multi_dot_bad_input(device, fn):
    G = torch.randn(3, 5, device=device)
    with pytest.raises(ValueError, match=r"V must be \(k, d\)"):
        fn(G, torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="2-D"):
        fn(G, torch.randn(5, device=device))
    with pytest.raises(TypeError, match="out_dtype"):
        fn(G, torch.randn(2, 5, device=device), torch.float16)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fn(G.to(torch.int32), torch.randn(2, 5, device=device))
