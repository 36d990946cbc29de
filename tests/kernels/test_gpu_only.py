"""Kernel cases that only a GPU can run at full size: part 1 of ``benchmarks/gpu_check.py``.

On CUDA (kernels compiled natively, no ``TRITON_INTERPRET``):

* the dispatcher runs the Triton launcher for CUDA tensors (not only ``use_triton`` saying so);
* every storage dtype (bfloat16, float16, float32, float64) at a GPU-sized problem, against a
  float64 dense result with the rounding-error bounds of ``kernel_helpers``;
* problems with more than 2^31 elements (``multi_dot``, ``combine``, ``softmax_curvature``), so
  64-bit offsets are exercised, checked chunk by chunk against float64;
* non-contiguous inputs (sliced, transposed, strided views) at GPU sizes.

Without CUDA the module is skipped, except in a *rehearsal*: with ``CURVOPT_GPU_REHEARSAL=1`` and
``TRITON_INTERPRET=1`` the same tests run on the CPU through Triton's interpreter at small sizes
(the dry run of ``benchmarks/gpu_check.py`` does this), so this code cannot rot unnoticed.
"""

import math
import os

import pytest
import torch
from kernel_helpers import assert_close_scaled
from test_combine import _check as check_combine
from test_gram_diag import _check as check_gram_diag
from test_multi_dot import _check as check_multi_dot
from test_softmax_curvature import _check as check_softmax_curvature

from curvopt import kernels
from curvopt.kernels import dispatch

NATIVE_CUDA = (
    torch.cuda.is_available() and dispatch.triton_available() and not dispatch.kernels_interpreted()
)
REHEARSAL = (
    not NATIVE_CUDA
    and os.environ.get("CURVOPT_GPU_REHEARSAL") == "1"
    and dispatch.interpreter_enabled()
    and dispatch.kernels_interpreted()
)
pytestmark = pytest.mark.skipif(
    not (NATIVE_CUDA or REHEARSAL),
    reason="needs CUDA with natively compiled kernels (or CURVOPT_GPU_REHEARSAL=1 under "
    "TRITON_INTERPRET=1 for a small CPU rehearsal)",
)
DEVICE = torch.device("cuda" if NATIVE_CUDA else "cpu")
# GPU-sized problems on CUDA; small ones in the CPU rehearsal (same code paths otherwise).
D = 1_000_003 if NATIVE_CUDA else 1003
M = 37 if NATIVE_CUDA else 5
SOFTMAX_ROWS, SOFTMAX_C = (64, 131_075) if NATIVE_CUDA else (3, 2100)
BIG_D = 2**30 + 1001 if NATIVE_CUDA else 5003  # 3 rows: m * d > 2^31 on CUDA
BIG_ROWS, BIG_C = (2**14 + 3, 2**17) if NATIVE_CUDA else (5, 3001)
BLOCK = 4096 if NATIVE_CUDA else 128  # gram_diag's coordinate blocks
CHUNK = 1 << 25

STORAGE = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _randn(*shape, dtype=torch.float32, seed=0):
    """Standard normal entries made on DEVICE (chunked: no float32 temporary of a big buffer)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    out = torch.empty(*shape, dtype=dtype, device=DEVICE)
    flat = out.view(-1)
    for s in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - s)
        flat[s : s + n] = torch.randn(n, generator=gen, device=DEVICE)
    return out


def test_dispatch_runs_the_triton_launchers(monkeypatch):
    from curvopt.kernels import triton_impl

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    called = []
    for name in ("multi_dot", "combine", "gram_diag", "softmax_curvature"):
        real = getattr(triton_impl, name)

        def record(*args, _name=name, _real=real):
            called.append(_name)
            return _real(*args)

        monkeypatch.setattr(triton_impl, name, record)
    G, V = _randn(M, D, seed=1), _randn(2, D, seed=2)
    x, c = _randn(D, seed=3), _randn(M, seed=4)
    T = _randn(1, M, M, seed=5)
    z, u = _randn(4, SOFTMAX_C, seed=6), _randn(4, SOFTMAX_C, seed=7)
    results = [
        (kernels.multi_dot(G, V), kernels.multi_dot_reference(G, V)),
        (kernels.combine(0.5, x, G, c), kernels.combine_reference(0.5, x, G, c)),
        (kernels.gram_diag(G, T), kernels.gram_diag_reference(G, T)),
        (kernels.softmax_curvature(z, u), kernels.softmax_curvature_reference(z, u)),
    ]
    assert called == ["multi_dot", "combine", "gram_diag", "softmax_curvature"]
    for got, ref in results:
        assert got.device.type == DEVICE.type
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_multi_dot_storage_dtypes(dtype):
    G = _randn(M, D, dtype=dtype, seed=10)
    V = _randn(3, D, seed=11)
    check_multi_dot(G, V, torch.float32)
    if dtype == torch.float64:
        check_multi_dot(G, V.double(), torch.float64)


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_combine_storage_dtypes(dtype):
    x_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    G = _randn(M, D, dtype=dtype, seed=20)
    x = _randn(D, dtype=x_dtype, seed=21)
    c = _randn(M, dtype=torch.float64, seed=22)
    check_combine(0.37, x, G, c)


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
@pytest.mark.parametrize("block_size", [None, BLOCK])
def test_gram_diag_storage_dtypes(dtype, block_size):
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    G = _randn(M, D, dtype=dtype, seed=30)
    nb = 1 if block_size is None else math.ceil(D / block_size)
    T = _randn(nb, M, M, dtype=t_dtype, seed=31) / M**0.5
    check_gram_diag(G, T, block_size)


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_softmax_curvature_storage_dtypes(dtype):
    z = 3 * _randn(SOFTMAX_ROWS, SOFTMAX_C, dtype=dtype, seed=40)
    u = _randn(SOFTMAX_ROWS, SOFTMAX_C, dtype=dtype, seed=41)
    check_softmax_curvature(z, u)


def test_non_contiguous_inputs():
    wide = _randn(M, D + 64, seed=50)
    G = wide[:, 32 : 32 + D]  # row stride D + 64
    Gt = _randn(D, M, seed=51).T  # column stride M
    V = _randn(D, 2, seed=52).T  # (2, D), column stride 2
    x = _randn(2 * D, seed=53)[::2]
    c = _randn(M, 2, seed=54)[:, 0]
    z = _randn(SOFTMAX_ROWS, SOFTMAX_C + 16, seed=55)[:, 8 : 8 + SOFTMAX_C]
    u = _randn(SOFTMAX_C, SOFTMAX_ROWS, seed=56).T
    T = _randn(1, M, M, seed=57).transpose(1, 2)
    for t in (G, Gt, V, x, c, z, u, T):
        assert not t.is_contiguous()
    for g in (G, Gt):
        check_multi_dot(g, V, torch.float32)
        check_combine(0.5, x, g, c)
        check_gram_diag(g, T, None)
    check_softmax_curvature(z, u)


def test_more_than_2_31_elements_multi_dot_and_combine():
    G = _randn(3, BIG_D, dtype=torch.bfloat16, seed=60)
    if NATIVE_CUDA:
        assert G.numel() > 2**31
    V = _randn(2, BIG_D, seed=61)
    x = _randn(BIG_D, seed=62)
    c = _randn(3, dtype=torch.float64, seed=63)
    P = kernels.multi_dot(G, V)
    y = kernels.combine(0.5, x, G, c)
    exact_P = torch.zeros(3, 2, dtype=torch.float64, device=DEVICE)
    scale_P = torch.zeros_like(exact_P)
    step = CHUNK
    for s in range(0, BIG_D, step):
        G64, V64 = G[:, s : s + step].double(), V[:, s : s + step].double()
        exact_P += G64 @ V64.T
        scale_P += G64.abs() @ V64.abs().T
        exact_y = 0.5 * x[s : s + step].double() + G64.T @ c
        scale_y = 0.5 * x[s : s + step].double().abs() + G64.abs().T @ c.abs()
        assert_close_scaled(
            y[s : s + step],
            exact_y,
            scale_y,
            out_dtype=torch.float32,
            acc_dtype=torch.float64,
            n=4,
        )
    assert_close_scaled(
        P, exact_P, scale_P, out_dtype=torch.float32, acc_dtype=torch.float32, n=BIG_D
    )


def test_more_than_2_31_elements_softmax_curvature():
    z = 3 * _randn(BIG_ROWS, BIG_C, dtype=torch.bfloat16, seed=70)
    u = _randn(BIG_ROWS, BIG_C, dtype=torch.bfloat16, seed=71)
    if NATIVE_CUDA:
        assert z.numel() > 2**31
    out = kernels.softmax_curvature(z, u)
    rows = max(1, CHUNK // BIG_C)
    for s in range(0, BIG_ROWS, rows):
        z64, u64 = z[s : s + rows].double(), u[s : s + rows].double()
        p = torch.softmax(z64, dim=-1)
        exact = p * u64 - p * (p * u64).sum(-1, keepdim=True)
        scale = p * u64.abs() + p * (p * u64.abs()).sum(-1, keepdim=True)
        assert_close_scaled(
            out[s : s + rows],
            exact,
            scale,
            out_dtype=torch.bfloat16,
            acc_dtype=torch.float32,
            n=BIG_C,
        )
