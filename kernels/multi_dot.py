"""Fused multi-dot ``G @ [v_1 ... v_k]`` in one pass over ``G``.

The window step of sliding-window M-FAC needs ``G g`` and ``G x`` for the same ``(m, d)`` buffer
``G``; reading ``G`` once for both halves the memory traffic of two matrix-vector products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_same_device, check_tensor
from ._launch import cdiv, concurrent_programs, next_power_of_2, require_triton, tl, triton

MAX_K = 4
"""Largest ``k`` the Triton kernel handles; more vectors go to the reference (a GEMM)."""

_CHUNK_ELEMENTS = 1 << 25
"""Entries of ``G`` converted at a time when the reference must change its dtype."""


def _check_multi_dot(G: Tensor, V: Tensor, out_dtype: torch.dtype) -> None:
    check_tensor(G, "G", (2,))
    check_tensor(V, "V", (2,))
    check_same_device(G=G, V=V)
    if V.shape[1] != G.shape[1]:
        raise ValueError(
            f"V must be (k, d) with d = G.shape[1] = {G.shape[1]}, got V of shape {tuple(V.shape)}"
        )
    if out_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"out_dtype must be torch.float32 or torch.float64, got {out_dtype}")


def multi_dot_reference(G: Tensor, V: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Products of the rows of ``G`` with k vectors.

    .. math:: P_{ij} = \\sum_l G_{il} V_{jl}

    When ``G`` is stored in another dtype than ``out_dtype``, it is converted a chunk of columns
    at a time, so no second ``(m, d)`` copy of ``G`` is made.

    Args:
        G: ``(m, d)`` matrix in float32, bfloat16, float16 or float64.
        V: ``(k, d)`` matrix of k vectors (any floating dtype).
        out_dtype: Accumulation and output dtype (float32 or float64).

    Returns:
        ``(m, k)`` tensor in ``out_dtype``.

    Raises:
        TypeError: For non-floating inputs or another ``out_dtype``.
        ValueError: For mismatched shapes or devices.

    Example:
        >>> G, V = torch.ones(3, 5), torch.ones(2, 5)
        >>> multi_dot_reference(G, V).tolist()
        [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]
    """
    _check_multi_dot(G, V, out_dtype)
    Vt = V.to(out_dtype).T
    if G.dtype == out_dtype:
        return G @ Vt
    m, d = G.shape
    out = torch.zeros(m, V.shape[0], dtype=out_dtype, device=G.device)
    step = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for s in range(0, d, step):
        out += G[:, s : s + step].to(out_dtype) @ Vt[s : s + step]
    return out


if triton is not None:

    @triton.jit
    def _multi_dot_kernel(
        G,
        V,
        P,
        m,
        d,
        cols_per_split,
        stride_gm,
        stride_gd,
        stride_vk,
        stride_vd,
        K: tl.constexpr,
        K_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Partial products of ``BLOCK_M`` rows of G with K vectors over one split of columns.

        Program ``(i, s)`` writes ``P[s, rows_i, :] = G[rows_i, cols_s] @ V[:, cols_s].T``; the
        launcher sums the splits. The products accumulate elementwise in a
        ``(BLOCK_M, K_PAD, BLOCK_D)`` tile and are reduced over columns once at the end.
        """
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        acc_ty = P.dtype.element_ty
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, K_PAD)
        row_ok = rows < m
        k_ok = ks < K
        g_rows = G + rows.to(tl.int64)[:, None] * stride_gm
        v_rows = V + ks.to(tl.int64)[:, None] * stride_vk
        acc = tl.zeros((BLOCK_M, K_PAD, BLOCK_D), dtype=acc_ty)
        begin = split * cols_per_split
        end = tl.minimum(begin + cols_per_split, d)
        for start in range(begin, end, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < end
            g = tl.load(
                g_rows + cols.to(tl.int64)[None, :] * stride_gd,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(acc_ty)
            v = tl.load(
                v_rows + cols.to(tl.int64)[None, :] * stride_vd,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(acc_ty)
            acc += g[:, None, :] * v[None, :, :]
        out = tl.sum(acc, axis=2)
        offs = split * m * K + rows[:, None] * K + ks[None, :]
        tl.store(P + offs, out, mask=row_ok[:, None] & k_ok[None, :])


def _multi_dot_config(device: torch.device, m: int, k_pad: int, out_dtype: torch.dtype):
    """Block sizes ``(BLOCK_M, BLOCK_D, num_warps)`` for one launch."""
    if device.type != "cuda":  # interpreter: few large blocks
        return min(next_power_of_2(m), 32), 1024, 4
    # Keep the (BLOCK_M, K_PAD, BLOCK_D) accumulator near 32 registers per thread (4 warps).
    budget = 4096 if out_dtype == torch.float32 else 2048
    block_m = 8
    return block_m, max(64, budget // (block_m * k_pad)), 4


def multi_dot_triton(
    G: Tensor, V: Tensor, out_dtype: torch.dtype = torch.float32, *, n_split: int | None = None
) -> Tensor:
    """Triton launcher for :func:`multi_dot_reference` (same arguments and result).

    One pass over ``G``: the grid is ``(ceil(m / BLOCK_M), n_split)``; each program reads its rows
    of ``G`` over one split of the columns with all k vectors at once. Partial results of the splits
    are summed afterwards (deterministic, no atomics). Any strides are accepted (no copies);
    unit column stride is fastest. ``k > 4`` and empty inputs go to the reference.

    Args:
        G: ``(m, d)`` matrix in float32, bfloat16, float16 or float64.
        V: ``(k, d)`` matrix of k vectors.
        out_dtype: Accumulation and output dtype, float32 or float64 (float64 accumulates in
            float64 inside the kernel).
        n_split: Number of column splits (default: enough programs to fill the device).

    Returns:
        ``(m, k)`` tensor in ``out_dtype``.
    """
    require_triton()
    _check_multi_dot(G, V, out_dtype)
    m, d = G.shape
    k = V.shape[0]
    if k > MAX_K or 0 in (m, d, k):
        return multi_dot_reference(G, V, out_dtype)
    k_pad = next_power_of_2(k)
    block_m, block_d, num_warps = _multi_dot_config(G.device, m, k_pad, out_dtype)
    m_tiles = cdiv(m, block_m)
    d_blocks = cdiv(d, block_d)
    if n_split is None:
        n_split = cdiv(concurrent_programs(G.device), m_tiles)
    n_split = max(1, min(int(n_split), d_blocks, 65535))  # grid axis 1 is limited to 65535
    cols_per_split = cdiv(d_blocks, n_split) * block_d
    n_split = cdiv(d, cols_per_split)
    partial = torch.empty(n_split, m, k, dtype=out_dtype, device=G.device)
    _multi_dot_kernel[(m_tiles, n_split)](
        G,
        V,
        partial,
        m,
        d,
        cols_per_split,
        G.stride(0),
        G.stride(1),
        V.stride(0),
        V.stride(1),
        K=k,
        K_PAD=k_pad,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return partial[0] if n_split == 1 else partial.sum(0)
