"""Argument checks shared by the references and the Triton launchers.

Both paths raise the same ``ValueError``/``TypeError`` for the same bad input, so a caller sees one
behaviour whichever implementation the dispatcher picks. The checks look at shapes, dtypes and
devices only (no host-device synchronization).
"""

from __future__ import annotations

import torch
from torch import Tensor

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t: object, name: str, ndims: tuple[int, ...]) -> Tensor:
    """Check that ``t`` is a floating tensor with one of the allowed numbers of dimensions.

    Args:
        t: The object to check.
        name: Argument name used in error messages.
        ndims: Allowed values of ``t.dim()``.

    Returns:
        ``t`` unchanged.

    Raises:
        TypeError: If ``t`` is not a tensor or not float16/bfloat16/float32/float64.
        ValueError: If ``t`` has the wrong number of dimensions.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in STORAGE_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}; "
            f"convert it with {name}.float()"
        )
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: Tensor) -> None:
    """Raise ``ValueError`` unless all tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and float32: half-precision inputs accumulate in float32."""
    acc = torch.float32
    for dt in dtypes:
        acc = torch.promote_types(acc, dt)
    return acc
