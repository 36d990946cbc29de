"""Launch-side helpers shared by the Triton launchers: the optional import and the grid sizing.

``triton`` is an optional dependency (extra ``gpu``). The kernel modules import it through here and
define their kernels only when it is present, so the references import everywhere.

The kernels compute every offset that multiplies a runtime stride in int64 (``x.to(tl.int64)``),
so transposed or sliced views of buffers with more than 2^31 entries address correctly.
"""

from __future__ import annotations

import functools

import torch

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

# Triton's interpreter runs program instances one after another in numpy: few, large programs are
# fastest there. A GPU wants several programs per SM.
INTERPRETER_PROGRAMS = 2


def require_triton() -> None:
    """Raise ``RuntimeError`` when Triton is not importable (the launchers need it)."""
    if triton is None:
        raise RuntimeError(
            "Triton is not installed: install curvopt[gpu], or call the dispatching function in "
            "curvopt.kernels, which falls back to the PyTorch reference"
        )


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was built by Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return type(kernel).__name__ == "InterpretedFunction"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def concurrent_programs(device: torch.device) -> int:
    """Program instances that keep ``device`` busy: 4 per SM on CUDA, 2 in the interpreter."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index)
    return INTERPRETER_PROGRAMS


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)
