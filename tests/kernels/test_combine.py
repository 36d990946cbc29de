"""Triton combine ``a x + G^T c`` against its reference and a float64 dense result."""

import pytest
import torch
from kernel_helpers import SIZE_DTYPE_CASES, assert_close_scaled

from curvopt import kernels
from curvopt.kernels._checks import accumulation_dtype
from curvopt.kernels.combine import combine_reference, combine_triton


def _check(a, x, G, c):
    got = combine_triton(a, x, G, c)
    ref = combine_reference(a, x, G, c)
    a64 = float(a) if not isinstance(a, torch.Tensor) else a.double().cpu()
    x64, G64, c64 = x.double().cpu(), G.double().cpu(), c.double().cpu()
    dense = a64 * x64 + G64.T @ c64
    scale = abs(a64) * x64.abs() + G64.abs().T @ c64.abs()
    acc = accumulation_dtype(x.dtype, c.dtype)
    kw = dict(out_dtype=x.dtype, acc_dtype=acc, n=G.shape[0] + 1)
    assert got.shape == x.shape and got.device == x.device
    for result in (got, ref):
        assert_close_scaled(result, dense, scale, **kw)
    assert_close_scaled(got, ref.double(), scale, **kw)


@pytest.mark.parametrize("d,m,dtype", SIZE_DTYPE_CASES)
def test_combine_sizes_and_dtypes(device, d, m, dtype):
    gen = torch.Generator().manual_seed(1000 * d + m)
    G = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(d, generator=gen).to(device)
    c = torch.randn(m, generator=gen, dtype=torch.float64).to(device)  # M-FAC's m x m algebra
    _check(0.37, x, G, c)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_combine_matrix_columns(device, k):
    gen = torch.Generator().manual_seed(k)
    G = torch.randn(33, 1000, generator=gen).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(1000, k, generator=gen).to(device)
    c = torch.randn(33, k, generator=gen).to(device)
    _check(-2.0, x, G, c)


@pytest.mark.parametrize(
    "x_dtype,c_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float32),
        (torch.float16, torch.float64),
    ],
)
def test_combine_mixed_dtypes_and_tensor_scale(device, x_dtype, c_dtype):
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(3, 7, generator=gen).to(device)
    x = torch.randn(7, generator=gen).to(device=device, dtype=x_dtype)
    c = torch.randn(3, generator=gen).to(device=device, dtype=c_dtype)
    _check(torch.tensor(300.0, device=device), x, G, c)  # a on the device, e.g. 1/damp


def test_combine_non_contiguous(device):
    gen = torch.Generator().manual_seed(6)
    G = torch.randn(33, 1200, generator=gen).to(device)[:, 100:1100]
    Gt = torch.randn(1000, 33, generator=gen).to(device).T
    x = torch.randn(2000, generator=gen).to(device)[::2]
    c = torch.randn(33, 2, generator=gen).to(device)[:, 0]
    X = torch.randn(2, 1000, generator=gen).to(device).T  # (1000, 2), row stride 1
    C = torch.randn(2, 33, generator=gen).to(device).T
    for arg in (G, Gt, x, c, X, C):
        assert not arg.is_contiguous()
    _check(0.5, x, G, c)
    _check(0.5, x, Gt, c)
    _check(0.5, X, G, C)


def test_combine_wide_and_empty_fall_back(device):
    G = torch.randn(4, 9, device=device)
    _check(1.5, torch.randn(9, 6, device=device), G, torch.randn(4, 6, device=device))
    x = torch.randn(9, device=device)
    torch.testing.assert_close(combine_triton(2.0, x, G[:0], torch.zeros(0, device=device)), 2 * x)


def test_combine_dispatch_matches(device):
    G = torch.randn(3, 50, device=device, dtype=torch.float16)
    x, c = torch.randn(50, device=device), torch.randn(3, device=device)
    torch.testing.assert_close(kernels.combine(0.1, x, G, c), combine_triton(0.1, x, G, c))


@pytest.mark.parametrize("fn", [combine_reference, combine_triton])
def test_combine_bad_input(device, fn):
    G = torch.randn(3, 5, device=device)
    x, c = torch.randn(5, device=device), torch.randn(3, device=device)
    with pytest.raises(ValueError, match="x must have d"):
        fn(1.0, torch.randn(4, device=device), G, c)
    with pytest.raises(ValueError, match="c must have m"):
        fn(1.0, x, G, torch.randn(2, device=device))
    with pytest.raises(ValueError, match="both be vectors or both"):
        fn(1.0, x, G, torch.randn(3, 2, device=device))
    with pytest.raises(ValueError, match="one-element tensor"):
        fn(torch.ones(2, device=device), x, G, c)
    with pytest.raises(TypeError, match="a must be a float"):
        fn("1", x, G, c)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        fn(1.0, x, G, c.to(torch.int64))


@pytest.mark.parametrize("d,m", [(300, 17), (1025, 5)])
def test_combine_float64_stays_float64(device, d, m):
    """A float64 G, x and c must accumulate in float64 (C's dtype). Narrower storage dtypes cannot
    tell: their entries are exact in float32, so a kernel that converts G or x to float32 would
    still pass every other test under the interpreter."""
    gen = torch.Generator().manual_seed(d + m)
    G = torch.randn(m, d, generator=gen, dtype=torch.float64).to(device)
    x = torch.randn(d, generator=gen, dtype=torch.float64).to(device)
    c = torch.randn(m, generator=gen, dtype=torch.float64).to(device)
    got = combine_triton(1.0 / 3.0, x, G, c)
    assert got.dtype == torch.float64
    dense = x.cpu() / 3.0 + G.cpu().T @ c.cpu()
    scale = x.cpu().abs() / 3.0 + G.cpu().abs().T @ c.cpu().abs()
    assert float(((got.cpu() - dense).abs() / scale).max()) < 1e-14
