"""Triton softmax curvature product against its reference and a float64 dense Hessian."""

import pytest
import torch
from conftest import SIZE_DTYPE_CASES, assert_close_scaled

from curvopt import kernels
from curvopt.kernels.softmax_curvature import (
    softmax_curvature_reference,
    softmax_curvature_triton,
)


def _dense(z, u):
    """(diag(p) - p p^T) u per row in float64, and |diag(p)| |u| + |p p^T| |u| for the bound.

    The explicit C x C matrices are built while they stay small (rows C^2 <= 2^21 entries);
    larger problems use the same product written out in float64.
    """
    C = z.shape[-1]
    z64, u64 = z.double().cpu().reshape(-1, C), u.double().cpu().reshape(-1, C)
    p = torch.softmax(z64, dim=-1)
    if z64.shape[0] * C * C <= 2**21:
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (rows, C, C)
        out = (H @ u64[:, :, None])[..., 0]
    else:
        out = p * u64 - p * (p * u64).sum(-1, keepdim=True)
    scale = p * u64.abs() + p * (p * u64.abs()).sum(-1, keepdim=True)
    return out.reshape(z.shape), scale.reshape(z.shape)


def _check(z, u, **launch):
    got = softmax_curvature_triton(z, u, **launch)
    ref = softmax_curvature_reference(z, u)
    dense, scale = _dense(z, u)
    acc = torch.promote_types(torch.promote_types(z.dtype, u.dtype), torch.float32)
    kw = dict(out_dtype=z.dtype, acc_dtype=acc, n=z.shape[-1])
    for result in (got, ref):
        assert_close_scaled(result, dense, scale, **kw)
    assert_close_scaled(got, ref.double(), scale, **kw)


@pytest.mark.parametrize("C,rows,dtype", SIZE_DTYPE_CASES)
def test_softmax_curvature_sizes_and_dtypes(device, C, rows, dtype):
    gen = torch.Generator().manual_seed(1000 * C + rows)
    z = (3 * torch.randn(rows, C, generator=gen)).to(device=device, dtype=dtype)
    u = torch.randn(rows, C, generator=gen).to(device=device, dtype=dtype)
    _check(z, u)


@pytest.mark.parametrize("C,block_c", [(7, 2), (1000, 256), (4099, 1024)])
def test_softmax_curvature_tiled_over_classes(device, C, block_c):
    """Rows wider than one tile take the online max/sum path (large vocabularies)."""
    gen = torch.Generator().manual_seed(C)
    z = (5 * torch.randn(3, C, generator=gen)).to(device)
    u = torch.randn(3, C, generator=gen).to(device)
    _check(z, u, block_c=block_c)
    z[:, -1] = 60.0  # the row maximum appears only in the last tile: earlier sums are rescaled
    _check(z, u, block_c=block_c)


@pytest.mark.parametrize("block_c", [None, 8])
def test_softmax_curvature_extreme_logits(device, block_c):
    gen = torch.Generator().manual_seed(11)
    z = 200 * torch.randn(4, 37, generator=gen)  # exp would overflow without the max shift
    z[1, ::3] = -float("inf")  # masked classes get p = 0
    u = torch.randn(4, 37, generator=gen)
    got = softmax_curvature_triton(z.to(device), u.to(device), block_c=block_c)
    assert torch.isfinite(got).all()
    _check(z.to(device), u.to(device), block_c=block_c)
    z64 = z.double()
    zrow = torch.where(torch.isinf(z64[1]), torch.full_like(z64[1], -1e300), z64[1])
    H = torch.autograd.functional.hessian(lambda t: torch.logsumexp(t, 0), zrow)
    torch.testing.assert_close(got[1].double().cpu(), H @ u[1].double(), rtol=1e-5, atol=1e-6)


def test_softmax_curvature_batched_float64_and_non_contiguous(device):
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(2, 3, 50, generator=gen, dtype=torch.float64).to(device)
    u = torch.randn(2, 3, 50, generator=gen, dtype=torch.float64).to(device)
    _check(z, u)
    zt = torch.randn(50, 6, generator=gen).to(device).T  # class stride 6
    ut = torch.randn(12, 50, generator=gen).to(device)[::2]  # row stride 100
    assert not zt.is_contiguous() and not ut.is_contiguous()
    _check(zt, ut)
    _check(zt, ut, block_c=16)
    _check(zt.to(torch.bfloat16), ut)  # mixed dtypes: output in the logits' dtype


def test_softmax_curvature_empty_and_dispatch(device):
    z = torch.randn(0, 5, device=device)
    assert softmax_curvature_triton(z, z).shape == (0, 5)
    z, u = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    torch.testing.assert_close(kernels.softmax_curvature(z, u), softmax_curvature_triton(z, u))


@pytest.mark.parametrize("fn", [softmax_curvature_reference, softmax_curvature_triton])
def test_softmax_curvature_bad_input(device, fn):
    z = torch.randn(3, 5, device=device)
    with pytest.raises(ValueError, match="u must have the shape of logits"):
        fn(z, torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match="logits must be"):
        fn(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device))
    with pytest.raises(TypeError, match="float16, bfloat16"):
        fn(z.long(), z)


def test_softmax_curvature_block_c_must_be_power_of_two(device):
    z = torch.randn(2, 10, device=device)
    with pytest.raises(ValueError, match="power of two"):
        softmax_curvature_triton(z, z, block_c=6)
