"""Fixtures for the kernel tests: the devices the Triton kernels can run on, and tolerances.

Run under ``TRITON_INTERPRET=1`` (``make test`` does) to test the kernels on the CPU through
Triton's interpreter; without it, on a machine with CUDA, the same tests run natively on the GPU.
"""

import math

import pytest
import torch

from curvopt.kernels import dispatch

STORAGE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES_D = [1, 7, 1000, 4099]
SIZES_M = [1, 3, 33, 64]
# Every (d, m) pair in float32; each half-precision dtype on pairs that still cover every d and
# every m (the storage dtype changes only the load, not the tiling; the interpreter is slow).
SIZE_DTYPE_CASES = [(d, m, torch.float32) for d in SIZES_D for m in SIZES_M] + [
    (d, m, dtype)
    for dtype in (torch.bfloat16, torch.float16)
    for d, m in zip(SIZES_D, reversed(SIZES_M))
]
EPS = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}


def _kernel_devices():
    if not dispatch.triton_available():
        return [pytest.param("cpu", marks=pytest.mark.skip(reason="triton is not installed"))]
    devices = []
    if dispatch.interpreter_enabled() and dispatch.kernels_interpreted():
        devices.append("cpu")
    if torch.cuda.is_available() and not dispatch.kernels_interpreted():
        devices.append("cuda")
    if not devices:
        reason = "no CUDA device and TRITON_INTERPRET=1 not set before import"
        return [pytest.param("cpu", marks=pytest.mark.skip(reason=reason))]
    return devices


@pytest.fixture(params=_kernel_devices())
def device(request):
    """A device on which the Triton kernels run (interpreter on the CPU, or native CUDA)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _auto_dispatch(monkeypatch):
    """Every kernel test starts from the default dispatch mode."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def assert_close_scaled(actual, expected, scale, *, out_dtype, acc_dtype, n):
    """Check ``actual`` against a float64 ``expected`` with a rounding-error bound.

    The bound is the output rounding (``2 eps_out (|expected| + tiny_out)``) plus the
    accumulation error of a sum of ``n`` products (``8 sqrt(n) eps_acc scale``), where ``scale``
    is the same sum over absolute values (for a dot product ``|G| |V|^T``). A wrong tile, index
    or mask gives an error of the order of ``scale`` itself and fails.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == out_dtype, (actual.dtype, out_dtype)
    err = (actual.double().cpu() - expected.double().cpu()).abs()
    # Output rounding, relative for normal numbers and absolute for subnormals (float16).
    bound = 2 * EPS[out_dtype] * (expected.double().cpu().abs() + torch.finfo(out_dtype).tiny)
    bound += 8 * math.sqrt(max(n, 1)) * EPS[acc_dtype] * scale.double().cpu() + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g} x the bound (max abs error {err.max().item():.3g})"
