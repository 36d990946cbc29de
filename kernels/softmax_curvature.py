"""Softmax cross-entropy curvature product ``(diag(p) - p p^T) u`` per row."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import accumulation_dtype, check_same_device, check_tensor
from ._launch import cdiv, next_power_of_2, require_triton, tl, triton


def _check_softmax_curvature(logits: Tensor, u: Tensor) -> None:
    check_tensor(logits, "logits", tuple(range(1, 9)))
    check_tensor(u, "u", tuple(range(1, 9)))
    check_same_device(logits=logits, u=u)
    if logits.shape != u.shape:
        raise ValueError(
            f"u must have the shape of logits {tuple(logits.shape)}, got {tuple(u.shape)}"
        )


def softmax_curvature_reference(logits: Tensor, u: Tensor) -> Tensor:
    """Hessian of softmax cross-entropy in logit space applied to ``u``, row by row.

    .. math::

        (\\mathrm{diag}(p) - p p^\\top) u = p \\odot (u - p^\\top u),
        \\quad p = \\mathrm{softmax}(z)

    Computed in the widest of the input dtypes and float32, returned in the dtype of ``logits``.
    The matrix does not depend on the labels: it is the Hessian of ``-log p_y`` for every ``y``.

    Args:
        logits: ``(..., C)`` logits ``z``.
        u: ``(..., C)`` directions, same shape as ``logits``.

    Returns:
        ``(..., C)`` tensor in the dtype of ``logits``.

    Raises:
        TypeError: For non-floating inputs.
        ValueError: For mismatched shapes or devices, or 0-D inputs.

    Example:
        >>> softmax_curvature_reference(torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])).tolist()
        [[0.5, -0.5]]
    """
    _check_softmax_curvature(logits, u)
    acc = accumulation_dtype(logits.dtype, u.dtype)
    p = torch.softmax(logits.to(acc), dim=-1)
    u = u.to(acc)
    return (p * (u - (p * u).sum(-1, keepdim=True))).to(logits.dtype)


if triton is not None:

    @triton.jit
    def _softmax_curvature_kernel(
        Z,
        U,
        Out,
        n_rows,
        C,
        stride_zr,
        stride_zc,
        stride_ur,
        stride_uc,
        FLOAT64: tl.constexpr,
        ONE_TILE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``Out = p * (u - p.u)`` for ``BLOCK_R`` rows, ``p = softmax(z)`` row-wise.

        With ``ONE_TILE`` the whole row fits one ``BLOCK_C`` tile: one read of ``z`` and ``u``.
        Otherwise a first sweep over class tiles keeps an online maximum ``mx`` and the rescaled
        sums ``sum exp(z - mx)`` and ``sum exp(z - mx) u`` (as in a tiled softmax), and a second
        sweep writes the output: two reads of ``z`` and ``u``, one write, no ``(rows, C)``
        temporary.
        """
        pid = tl.program_id(0)
        acc_ty = tl.float64 if FLOAT64 else tl.float32
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        z_rows = Z + rows.to(tl.int64)[:, None] * stride_zr
        u_rows = U + rows.to(tl.int64)[:, None] * stride_ur
        o_rows = Out + rows.to(tl.int64)[:, None] * C
        if ONE_TILE:
            cols = tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < C)[None, :]
            z = tl.load(
                z_rows + cols.to(tl.int64)[None, :] * stride_zc, mask=mask, other=-float("inf")
            )
            z = z.to(acc_ty)
            u = tl.load(u_rows + cols.to(tl.int64)[None, :] * stride_uc, mask=mask, other=0.0).to(
                acc_ty
            )
            mx = tl.where(row_ok, tl.max(z, axis=1), 0.0)  # rows past n_rows: all -inf
            e = tl.exp(z - mx[:, None])
            p = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
            pu = tl.sum(p * u, axis=1)
            out = p * (u - pu[:, None])
            tl.store(o_rows + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)
        else:
            mx = tl.full((BLOCK_R,), -float("inf"), dtype=acc_ty)
            total = tl.zeros((BLOCK_R,), dtype=acc_ty)
            total_u = tl.zeros((BLOCK_R,), dtype=acc_ty)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = row_ok[:, None] & (cols < C)[None, :]
                z = tl.load(
                    z_rows + cols.to(tl.int64)[None, :] * stride_zc, mask=mask, other=-float("inf")
                )
                z = z.to(acc_ty)
                u = tl.load(
                    u_rows + cols.to(tl.int64)[None, :] * stride_uc, mask=mask, other=0.0
                ).to(acc_ty)
                new_mx = tl.maximum(mx, tl.max(z, axis=1))
                # Rows past n_rows stay at -inf: keep their arithmetic finite (never stored).
                new_mx = tl.where(row_ok, new_mx, 0.0)
                scale = tl.exp(mx - new_mx)
                e = tl.exp(z - new_mx[:, None])
                total = total * scale + tl.sum(e, axis=1)
                total_u = total_u * scale + tl.sum(e * u, axis=1)
                mx = new_mx
            total = tl.where(row_ok, total, 1.0)
            pu = total_u / total
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = row_ok[:, None] & (cols < C)[None, :]
                z = tl.load(
                    z_rows + cols.to(tl.int64)[None, :] * stride_zc, mask=mask, other=-float("inf")
                )
                z = z.to(acc_ty)
                u = tl.load(
                    u_rows + cols.to(tl.int64)[None, :] * stride_uc, mask=mask, other=0.0
                ).to(acc_ty)
                p = tl.exp(z - mx[:, None]) / total[:, None]
                out = p * (u - pu[:, None])
                tl.store(o_rows + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)


def _softmax_curvature_config(device: torch.device, rows: int, C: int, float64: bool):
    """Block sizes ``(BLOCK_R, BLOCK_C, num_warps)``: rows of up to 4096 classes in one tile."""
    if device.type != "cuda":  # interpreter: few large blocks
        block_c = min(next_power_of_2(C), 1024)
        return max(1, min(next_power_of_2(rows), 8192 // block_c)), block_c, 4
    block_c = min(next_power_of_2(C), 2048 if float64 else 4096)
    block_r = max(1, min(next_power_of_2(rows), 2048 // block_c, 64))
    return block_r, block_c, 4 if block_r * block_c <= 2048 else 8


def softmax_curvature_triton(logits: Tensor, u: Tensor, *, block_c: int | None = None) -> Tensor:
    """Triton launcher for :func:`softmax_curvature_reference` (same arguments and result).

    Leading dimensions are flattened into rows (``reshape``: a copy only when they cannot be
    viewed as one); the class dimension may have any stride. The grid is ``ceil(rows / BLOCK_R)``
    programs. Rows of at most ``BLOCK_C`` classes (4096 on a GPU) are read once; longer rows
    (large vocabularies) take two sweeps over class tiles with an online max/sum.

    Args:
        logits: ``(..., C)`` logits.
        u: ``(..., C)`` directions.
        block_c: Class tile width (a power of two), to force the tiled path in tests.

    Returns:
        ``(..., C)`` tensor in the dtype of ``logits``.
    """
    require_triton()
    _check_softmax_curvature(logits, u)
    C = logits.shape[-1]
    if logits.numel() == 0:
        return softmax_curvature_reference(logits, u)
    z2, u2 = logits.reshape(-1, C), u.reshape(-1, C)
    rows = z2.shape[0]
    float64 = accumulation_dtype(logits.dtype, u.dtype) == torch.float64
    block_r, block_c_auto, num_warps = _softmax_curvature_config(logits.device, rows, C, float64)
    if block_c is not None:
        if block_c < 1 or block_c & (block_c - 1):
            raise ValueError(f"block_c must be a power of two, got {block_c}")
        block_r = max(1, min(block_r, block_c_auto * block_r // block_c))
    else:
        block_c = block_c_auto
    out = torch.empty(rows, C, dtype=logits.dtype, device=logits.device)
    _softmax_curvature_kernel[(cdiv(rows, block_r),)](
        z2,
        u2,
        out,
        rows,
        C,
        z2.stride(0),
        z2.stride(1),
        u2.stride(0),
        u2.stride(1),
        FLOAT64=float64,
        ONE_TILE=C <= block_c,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out.reshape(logits.shape)
