"""The one place that decides which implementation of a hot loop runs.

Rules, in order:

1. ``CURVOPT_KERNELS=reference`` forces the PyTorch reference everywhere;
   ``CURVOPT_KERNELS=triton`` forces the Triton kernels and raises ``RuntimeError`` where they
   cannot run (no Triton, or a CPU tensor without the interpreter); ``auto`` (the default, also
   when unset or empty) applies rules 2-3. Any other value raises ``ValueError``.
2. Triton runs when it imports and the tensor is on CUDA, or when the tensor is on the CPU and
   Triton's interpreter is on: ``TRITON_INTERPRET=1`` must be set *before* ``curvopt.kernels``
   is first imported (Triton decides when a kernel is defined whether it is interpreted) and
   still be set at the call. CI tests the kernels this way.
3. Otherwise the PyTorch reference runs (for example on a CPU without the interpreter, or on
   MPS).

M-FAC, the curvature operators and the optimizers call only the functions re-exported by
``curvopt.kernels``; they never import a kernel module directly.
"""

from __future__ import annotations

import os

import torch

from ._launch import triton

ENV_VAR = "CURVOPT_KERNELS"
"""Environment variable that selects the implementation: ``auto``, ``reference`` or ``triton``."""

MODES = ("auto", "reference", "triton")


def triton_available() -> bool:
    """Whether ``triton`` imports on this machine."""
    return triton is not None


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_interpreted() -> bool:
    """Whether curvopt's kernels were defined under the interpreter (and so can run on the CPU)."""
    if not triton_available():
        return False
    from . import triton_impl

    return triton_impl.INTERPRETED


def mode() -> str:
    """The value of ``CURVOPT_KERNELS`` (lower case; ``auto`` when unset or empty).

    Raises:
        ValueError: If the variable holds anything but ``auto``, ``reference`` or ``triton``.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {value!r}")
    return value


def triton_unavailable_reason(t: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``t``'s device, or None when they can."""
    if not triton_available():
        return "triton is not installed (pip install curvopt[gpu])"
    if t.is_cuda:
        return None
    if t.device.type != "cpu":
        return f"there are no Triton kernels for {t.device.type} tensors"
    if not interpreter_enabled():
        return "the tensor is on the CPU and TRITON_INTERPRET=1 is not set"
    if not kernels_interpreted():
        return (
            "TRITON_INTERPRET=1 was set after curvopt.kernels was imported; set it before the "
            "first import to run the kernels on the CPU"
        )
    return None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton implementation should run for a tensor on ``t.device``.

    Args:
        t: The main input tensor of the call (its device decides).

    Returns:
        True for Triton, False for the PyTorch reference (see the module docstring for the rules).

    Raises:
        ValueError: If ``CURVOPT_KERNELS`` holds an unknown value.
        RuntimeError: If ``CURVOPT_KERNELS=triton`` but Triton cannot run on ``t``'s device.
    """
    selected = mode()
    if selected == "reference" or not isinstance(t, torch.Tensor):
        return False  # a non-tensor goes to the reference, whose checks raise a clear TypeError
    reason = triton_unavailable_reason(t)
    if selected == "triton" and reason is not None:
        raise RuntimeError(f"{ENV_VAR}=triton, but the Triton kernels cannot run: {reason}")
    return reason is None
