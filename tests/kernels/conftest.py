"""Fixtures for the kernel tests: the devices the Triton kernels can run on, and tolerances.

Run under ``TRITON_INTERPRET=1`` (``make test`` does) to test the kernels on the CPU through
Triton's interpreter; without it, on a machine with CUDA, the same tests run natively on the GPU.
"""

import pytest
import torch

from curvopt.kernels import dispatch


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
