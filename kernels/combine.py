"""Fused combine ``y = a * x + G^T c`` (the last step of an M-FAC IHVP)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import accumulation_dtype, check_same_device, check_tensor
from ._launch import cdiv, next_power_of_2, require_triton, tl, triton

MAX_K = 4
"""Largest number of columns ``k`` the Triton kernel handles; wider inputs go to the reference."""

_CHUNK_ELEMENTS = 1 << 25
"""Entries of ``G`` converted at a time when the reference must change its dtype."""


def _check_combine(a: float | Tensor, x: Tensor, G: Tensor, c: Tensor) -> None:
    check_tensor(x, "x", (1, 2))
    check_tensor(G, "G", (2,))
    check_tensor(c, "c", (1, 2))
    check_same_device(x=x, G=G, c=c)
    m, d = G.shape
    if x.shape[0] != d:
        raise ValueError(f"x must have d = G.shape[1] = {d} rows, got x of shape {tuple(x.shape)}")
    if c.shape[0] != m:
        raise ValueError(f"c must have m = G.shape[0] = {m} rows, got c of shape {tuple(c.shape)}")
    if x.shape[1:] != c.shape[1:]:
        raise ValueError(
            "x and c must both be vectors or both (., k) with the same k, got "
            f"x {tuple(x.shape)} and c {tuple(c.shape)}"
        )
    if isinstance(a, Tensor):
        if a.numel() != 1 or a.device != x.device:
            raise ValueError(
                f"a must be a float or a one-element tensor on {x.device}, got shape "
                f"{tuple(a.shape)} on {a.device}"
            )
    elif not isinstance(a, (int, float)):
        raise TypeError(f"a must be a float or a one-element tensor, got {type(a).__name__}")


def combine_reference(a: float | Tensor, x: Tensor, G: Tensor, c: Tensor) -> Tensor:
    """Scaled vector plus a combination of the rows of ``G``.

    .. math:: y = a x + G^\\top c

    The sum accumulates in the widest of ``x``'s dtype, ``c``'s dtype and float32 (so float64
    coefficients from M-FAC's m x m algebra are applied in float64). When ``G`` is stored in
    another dtype it is converted a chunk of columns at a time (no second ``(m, d)`` copy).

    Args:
        a: Scalar (a float, or a one-element tensor on ``x``'s device).
        x: ``(d,)`` or ``(d, k)`` tensor.
        G: ``(m, d)`` matrix (any floating storage dtype).
        c: ``(m,)`` or ``(m, k)`` coefficients, matching ``x``'s trailing dimension.

    Returns:
        Tensor shaped like ``x`` in ``x``'s dtype.

    Raises:
        TypeError: For non-floating inputs or a non-numeric ``a``.
        ValueError: For mismatched shapes or devices.

    Example:
        >>> combine_reference(2.0, torch.ones(3), torch.ones(2, 3), torch.ones(2)).tolist()
        [4.0, 4.0, 4.0]
    """
    _check_combine(a, x, G, c)
    acc = accumulation_dtype(x.dtype, c.dtype)
    if isinstance(a, Tensor):
        a = a.reshape(()).to(acc)
    ca = c.to(acc)
    y = a * x.to(acc)
    m, d = G.shape
    step = d if G.dtype == acc else max(1, _CHUNK_ELEMENTS // max(m, 1))
    for s in range(0, d, max(step, 1)):
        y[s : s + step] += G[:, s : s + step].T.to(acc) @ ca
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _combine_kernel(
        X,
        G,
        C,
        Y,
        a,
        m,
        d,
        stride_xd,
        stride_xk,
        stride_gm,
        stride_gd,
        stride_cm,
        stride_ck,
        K: tl.constexpr,
        K_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``Y[cols] = a X[cols] + G[:, cols]^T C`` for one tile of ``BLOCK_D`` columns.

        The program walks down all m rows of ``G`` in chunks of ``BLOCK_M`` and accumulates in
        ``C``'s dtype (the launcher converts the small ``C`` to the accumulation dtype).
        """
        pid = tl.program_id(0)
        acc_ty = C.dtype.element_ty
        cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        ks = tl.arange(0, K_PAD)
        col_ok = cols < d
        k_ok = ks < K
        acc = tl.zeros((BLOCK_M, K_PAD, BLOCK_D), dtype=acc_ty)
        for start in range(0, m, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < m
            g = tl.load(
                G + rows.to(tl.int64)[:, None] * stride_gm + cols.to(tl.int64)[None, :] * stride_gd,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(acc_ty)
            coef = tl.load(
                C + rows[:, None] * stride_cm + ks[None, :] * stride_ck,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc += g[:, None, :] * coef[:, :, None]
        gtc = tl.sum(acc, axis=0)  # (K_PAD, BLOCK_D)
        scale = tl.load(a)
        offs_x = ks[:, None] * stride_xk + cols.to(tl.int64)[None, :] * stride_xd
        mask = k_ok[:, None] & col_ok[None, :]
        x = tl.load(X + offs_x, mask=mask, other=0.0).to(acc_ty)
        y = scale * x + gtc
        tl.store(Y + ks[:, None] + cols[None, :] * K, y.to(Y.dtype.element_ty), mask=mask)


def _combine_config(device: torch.device, m: int, k_pad: int, acc: torch.dtype):
    """Block sizes ``(BLOCK_M, BLOCK_D, num_warps)`` for one launch."""
    if device.type != "cuda":  # interpreter: few large blocks
        return min(next_power_of_2(m), 64), 2048, 4
    budget = 4096 if acc == torch.float32 else 2048
    block_m = 8
    return block_m, max(64, budget // (block_m * k_pad)), 4


def combine_triton(a: float | Tensor, x: Tensor, G: Tensor, c: Tensor) -> Tensor:
    """Triton launcher for :func:`combine_reference` (same arguments and result).

    One pass over ``G``: the grid is ``ceil(d / BLOCK_D)`` programs, each owning a tile of columns
    of ``G`` and walking down its m rows, so every entry of ``G`` is read once and ``y`` is written
    once. Any strides are accepted (no copies); a row-contiguous ``G`` is fastest. ``k > 4`` and
    empty inputs go to the reference.

    Args:
        a: Scalar (a float, or a one-element tensor on ``x``'s device, read on the device).
        x: ``(d,)`` or ``(d, k)`` tensor.
        G: ``(m, d)`` matrix in float32, bfloat16, float16 or float64.
        c: ``(m,)`` or ``(m, k)`` coefficients.

    Returns:
        Tensor shaped like ``x`` in ``x``'s dtype (contiguous).
    """
    require_triton()
    _check_combine(a, x, G, c)
    m, d = G.shape
    k = 1 if x.dim() == 1 else x.shape[1]
    if k > MAX_K or 0 in (m, d, k):
        return combine_reference(a, x, G, c)
    acc = accumulation_dtype(x.dtype, c.dtype)
    c2 = c.to(acc).reshape(m, k)
    x2 = x.reshape(d, k) if x.dim() == 1 else x  # a view: x is (d,)
    # ``a`` travels as a one-element tensor in the accumulation dtype: a Python float would reach
    # the kernel as float32, and torch.full fills on the device (no host-device copy or sync).
    if isinstance(a, Tensor):
        a_arg = a.reshape(1).to(acc)
    else:
        a_arg = torch.full((1,), float(a), dtype=acc, device=x.device)
    y = torch.empty(d, k, dtype=x.dtype, device=x.device)
    k_pad = next_power_of_2(k)
    block_m, block_d, num_warps = _combine_config(G.device, m, k_pad, acc)
    _combine_kernel[(cdiv(d, block_d),)](
        x2,
        G,
        c2,
        y,
        a_arg,
        m,
        d,
        x2.stride(0),
        x2.stride(1),
        G.stride(0),
        G.stride(1),
        c2.stride(0),
        c2.stride(1),
        K=k,
        K_PAD=k_pad,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y.reshape(x.shape)
