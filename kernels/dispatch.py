"""The one place that decides which implementation of a hot loop runs.

Rules, in order:

1. ``CURVOPT_KERNELS=reference`` forces the PyTorch reference everywhere.
2. Triton runs when it imports and the tensor is on CUDA, or when ``TRITON_INTERPRET=1`` is set
   and the tensor is on the CPU (Triton's interpreter; CI tests the kernels this way).
3. Otherwise the PyTorch reference runs.

M-FAC, the curvature operators and the optimizers call only the functions re-exported by
``curvopt.kernels``; they never import a kernel module directly.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports on this machine."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton implementation should run for a tensor on ``t.device``."""
    if os.environ.get("CURVOPT_KERNELS", "auto").lower() == "reference":
        return False
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreter_enabled()
