"""Column norms of ``T_b G_b`` per block: the core of M-FAC's inverse diagonal."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._checks import accumulation_dtype, check_same_device, check_tensor
from ._launch import cdiv, next_power_of_2, require_triton, tl, triton

_CHUNK_ELEMENTS = 1 << 25
"""Entries of the ``T G`` product the reference materializes at a time."""


def _check_gram_diag(G: Tensor, T: Tensor, block_size: int | None) -> tuple[int, int, int, int]:
    """Validate the arguments; return ``(m, d, B, nb)``."""
    check_tensor(G, "G", (2,))
    check_tensor(T, "T", (3,))
    check_same_device(G=G, T=T)
    m, d = G.shape
    if T.shape[1:] != (m, m):
        raise ValueError(
            f"T must be (nb, m, m) with m = G.shape[0] = {m}, got T of shape {tuple(T.shape)}"
        )
    if block_size is None:
        B = d
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    else:
        B = block_size
    nb = T.shape[0]
    if d > 0 and nb != cdiv(d, B):
        raise ValueError(f"T holds {nb} blocks but d={d} with block_size={B} needs {cdiv(d, B)}")
    return m, d, B, nb


def gram_diag_reference(G: Tensor, T: Tensor, block_size: int | None = None) -> Tensor:
    """Squared column norms of ``T_b G_b`` for contiguous coordinate blocks ``b``, batched.

    .. math:: s_j = \\sum_i (T_{b(j)} G_{:, b(j)})_{ij}^2

    With ``T_b = L_b^{-1}`` (``A_b = L_b L_b^T`` the Cholesky factor of M-FAC's m x m matrix),
    ``s_j = [G_b^T A_b^{-1} G_b]_{jj}`` and the inverse diagonal is ``1/damp - s_j / damp^2``.
    This reference materializes ``T G`` a chunk of 2^25 entries at a time (a batch of blocks,
    or a range of columns of one large block); the Triton kernel does not materialize it at all.
    Products accumulate in the wider of ``T``'s dtype and float32.

    Args:
        G: ``(m, d)`` matrix (any floating storage dtype).
        T: ``(nb, m, m)`` matrices, one per block of ``block_size`` coordinates
            (``nb = ceil(d / block_size)``; ``nb = 1`` and ``block_size=None`` for one block).
            The last block may be shorter.
        block_size: Number of coordinates per block, or None for a single block over all ``d``.

    Returns:
        ``(d,)`` tensor in ``T``'s dtype.

    Raises:
        TypeError: For non-floating inputs.
        ValueError: For mismatched shapes, devices or block counts.

    Example:
        >>> G = torch.tensor([[1.0, 2.0, 3.0]])
        >>> T = torch.tensor([[[2.0]], [[1.0]]])
        >>> gram_diag_reference(G, T, block_size=2).tolist()
        [4.0, 16.0, 9.0]
    """
    m, d, B, nb = _check_gram_diag(G, T, block_size)
    acc = accumulation_dtype(T.dtype)
    out = torch.empty(d, dtype=acc, device=G.device)
    cols_per_step = max(1, _CHUNK_ELEMENTS // max(m, 1))
    if B >= cols_per_step:  # large blocks: one block at a time, its columns in chunks
        for b in range(nb):
            Tb = T[b].to(acc)
            block_end = min((b + 1) * B, d)
            for s in range(b * B, block_end, cols_per_step):
                e = min(s + cols_per_step, block_end)
                out[s:e] = (Tb @ G[:, s:e].to(acc)).square().sum(0)
    else:  # small blocks: a batch of whole blocks per bmm
        per_step = cols_per_step // B
        for b0 in range(0, nb, per_step):
            b1 = min(b0 + per_step, nb)
            s, e = b0 * B, min(b1 * B, d)
            Gc = torch.nn.functional.pad(G[:, s:e].to(acc), (0, (b1 - b0) * B - (e - s)))
            Gb = Gc.reshape(m, b1 - b0, B).permute(1, 0, 2)  # (blocks, m, B)
            prod = torch.bmm(T[b0:b1].to(acc), Gb)
            out[s:e] = prod.square().sum(1).reshape(-1)[: e - s]
    return out.to(T.dtype)


if triton is not None:

    @triton.jit
    def _gram_diag_kernel(
        G,
        T,
        S,
        m,
        d,
        block_size,
        tiles_per_block,
        stride_gm,
        stride_gd,
        stride_tb,
        stride_ti,
        stride_tl,
        BLOCK_I: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        """``S[cols] = ||T_b G[:, cols]||^2`` per column for one tile of columns of block ``b``.

        Rows of ``T_b G`` are formed ``BLOCK_I`` at a time in registers (a ``(BLOCK_I, BLOCK_D)``
        tile summed over ``m`` in chunks of ``BLOCK_L``), squared and added to the column sums, so
        ``T G`` never reaches memory. Accumulation is in ``S``'s dtype with IEEE products
        (``tl.dot`` on a GPU; a broadcast product in the interpreter, whose dot is slow).
        """
        pid = tl.program_id(0)  # one flat axis: grid axes 1 and 2 are limited to 65535
        b = pid // tiles_per_block
        tile = pid % tiles_per_block
        acc_ty = S.dtype.element_ty
        in_block = tile * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = b * block_size + in_block
        col_ok = (in_block < block_size) & (cols < d)
        t_block = T + b.to(tl.int64) * stride_tb
        g_cols = G + cols.to(tl.int64)[None, :] * stride_gd
        s = tl.zeros((BLOCK_D,), dtype=acc_ty)
        for i0 in range(0, m, BLOCK_I):
            ii = i0 + tl.arange(0, BLOCK_I)
            i_ok = ii < m
            tg = tl.zeros((BLOCK_I, BLOCK_D), dtype=acc_ty)
            for l0 in range(0, m, BLOCK_L):
                ll = l0 + tl.arange(0, BLOCK_L)
                l_ok = ll < m
                t = tl.load(
                    t_block + ii[:, None] * stride_ti + ll[None, :] * stride_tl,
                    mask=i_ok[:, None] & l_ok[None, :],
                    other=0.0,
                ).to(acc_ty)
                g = tl.load(
                    g_cols + ll.to(tl.int64)[:, None] * stride_gm,
                    mask=l_ok[:, None] & col_ok[None, :],
                    other=0.0,
                ).to(acc_ty)
                if USE_DOT:
                    tg = tl.dot(t, g, tg, input_precision="ieee", out_dtype=acc_ty)
                else:  # same product by broadcasting: the interpreter's dot is a slow loop
                    tg += tl.sum(t[:, :, None] * g[None, :, :], axis=1)
            s += tl.sum(tg * tg, axis=0)
        tl.store(S + cols, s, mask=col_ok)


@functools.cache
def _fp64_dot_lowers() -> bool:
    """Whether this Triton lowers a float64 ``tl.dot`` on sm_90.

    Triton 3.6 to 3.8 fail in ``ConvertTritonGPUToLLVM`` on it (tests/kernels/test_compile.py
    compiles both paths for sm_90 with the installed Triton); 3.9 lowers it.
    """
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def _gram_diag_use_dot(device: torch.device, acc: torch.dtype) -> bool:
    """The default of ``use_dot``: ``tl.dot`` on CUDA where this Triton lowers it."""
    return device.type == "cuda" and (acc != torch.float64 or _fp64_dot_lowers())


def _gram_diag_config(
    device: torch.device, m: int, cols: int, acc: torch.dtype, use_dot: bool = True
):
    """Block sizes ``(BLOCK_I, BLOCK_L, BLOCK_D, num_warps)``; ``tl.dot`` needs each >= 16."""
    if device.type != "cuda":  # interpreter: few large blocks
        block_i, block_l = max(16, min(next_power_of_2(m), 64)), 16
        # The broadcast tile (BLOCK_I, BLOCK_L, BLOCK_D) must stay within Triton's 2^20 entries.
        return block_i, block_l, max(16, min(next_power_of_2(cols), 2**20 // (block_i * 16))), 4
    # Chosen so that ptxas (sm_90) reports no register spills: fp32 128 registers with 4 warps,
    # fp64 64 registers with 8 warps (see tests/kernels/test_compile.py).
    block_d = max(16, min(next_power_of_2(cols), 64))
    if not use_dot:  # a (16, 8, BLOCK_D) broadcast product per step
        return 16, 8, min(block_d, 32), 4
    if acc == torch.float64:
        return 32, 16, min(block_d, 32), 8
    return 32, 16, block_d, 4


def gram_diag_triton(
    G: Tensor, T: Tensor, block_size: int | None = None, *, use_dot: bool | None = None
) -> Tensor:
    """Triton launcher for :func:`gram_diag_reference` (same arguments and result).

    The grid is ``nb * ceil(B / BLOCK_D)`` programs: program ``(b, t)`` owns ``BLOCK_D`` columns
    of block ``b``, loops over the rows of ``T_b`` in chunks and over ``m`` in chunks with
    ``tl.dot``, and writes only the ``BLOCK_D`` column sums. Memory traffic is one read of ``G``
    plus ``T`` from cache; ``2 m^2 d`` flops in IEEE float32 or float64, never TF32 (the inverse
    diagonal ``1/damp - s/damp^2`` cancels digits). Any strides are accepted; empty inputs go to
    the reference.

    Args:
        G: ``(m, d)`` matrix in float32, bfloat16, float16 or float64.
        T: ``(nb, m, m)`` matrices, one per block.
        block_size: Coordinates per block, or None for one block.
        use_dot: Form the tiles of ``T G`` with ``tl.dot`` (default on CUDA, except float64
            accumulation under a Triton that cannot lower a float64 dot, before 3.9) or by a
            broadcast product (default in the interpreter, whose ``tl.dot`` is a slow loop);
            tests set it to check the GPU path in the interpreter.

    Returns:
        ``(d,)`` tensor in ``T``'s dtype.
    """
    require_triton()
    m, d, B, nb = _check_gram_diag(G, T, block_size)
    if 0 in (m, d):
        return gram_diag_reference(G, T, block_size)
    acc = accumulation_dtype(T.dtype)
    s = torch.empty(d, dtype=acc, device=G.device)
    use_dot = _gram_diag_use_dot(G.device, acc) if use_dot is None else bool(use_dot)
    block_i, block_l, block_d, num_warps = _gram_diag_config(G.device, m, min(B, d), acc, use_dot)
    tiles_per_block = cdiv(min(B, d), block_d)
    _gram_diag_kernel[(nb * tiles_per_block,)](
        G,
        T,
        s,
        m,
        d,
        B,
        tiles_per_block,
        G.stride(0),
        G.stride(1),
        T.stride(0),
        T.stride(1),
        T.stride(2),
        BLOCK_I=block_i,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        USE_DOT=use_dot,
        num_warps=num_warps,
    )
    return s.to(T.dtype)
