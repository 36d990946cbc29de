"""Argument checks shared by the M-FAC classes (clear errors that say what to fix)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACCUMULATE_DTYPES = (torch.float32, torch.float64)


def check_damp(damp: object, name: str = "damp") -> float:
    """Return ``damp`` as a float after checking that it is a finite number > 0."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(damp).__name__}")
    value = float(damp)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {damp}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` after checking that it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_storage_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """Return ``dtype`` after checking that it can store a gradient buffer."""
    if dtype not in STORAGE_DTYPES:
        raise TypeError(
            f"{name} must be one of float16, bfloat16, float32, float64 for the gradient buffer, "
            f"got {dtype}"
        )
    return dtype  # type: ignore[return-value]


def resolve_accumulate_dtype(acc: object, storage: torch.dtype) -> torch.dtype:
    """Dtype of the products over ``G``: default float64 for float64 storage, else float32."""
    if acc is None:
        return torch.float64 if storage == torch.float64 else torch.float32
    if acc not in ACCUMULATE_DTYPES:
        raise TypeError(f"accumulate_dtype must be torch.float32, torch.float64 or None, got {acc}")
    return acc  # type: ignore[return-value]


def check_operand(x: object, dim: int, device: torch.device, name: str = "x") -> Tensor:
    """Check a ``(d,)`` or ``(d, k)`` floating operand on ``device``; return it as ``(d, k)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {x.dtype}; convert it with .float()"
        )
    if x.ndim not in (1, 2) or x.shape[0] != dim:
        raise ValueError(f"{name} must have shape ({dim},) or ({dim}, k), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but the M-FAC buffer is on {device}; move it with .to()"
        )
    return x if x.ndim == 2 else x[:, None]


def check_indices(idx: object, dim: int, device: torch.device) -> Tensor:
    """Check indices (int tensor or sequence, each in ``[0, dim)``); return a 1-D long tensor."""
    if not isinstance(idx, Tensor):
        try:
            idx = torch.as_tensor(idx, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"idx must be an integer tensor or a sequence of ints: {err}") from None
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"idx must hold integers, got {idx.dtype}")
    idx = idx.reshape(-1).to(device=device, dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("idx is empty; pass at least one coordinate index")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= dim:
        raise ValueError(f"indices must lie in [0, {dim}), got values in [{lo}, {hi}]")
    return idx


def finite_flag(v: Tensor) -> Tensor:
    """0-dim bool tensor: ``v`` has no NaN/Inf (min and max are finite; one fast reduction)."""
    if v.numel() == 0:  # a rank's empty coordinate shard
        return torch.ones((), dtype=torch.bool, device=v.device)
    lo, hi = torch.aminmax(v)
    return torch.isfinite(lo) & torch.isfinite(hi)
