"""Column norms of ``T_b G_b`` per block: the core of M-FAC's inverse diagonal."""

from __future__ import annotations

import torch
from torch import Tensor


def gram_diag_reference(G: Tensor, T: Tensor, block_size: int | None = None) -> Tensor:
    """Squared column norms of ``T_b G_b`` for contiguous coordinate blocks ``b``, batched.

    .. math:: s_j = \\sum_i (T_{b(j)} G_{:, b(j)})_{ij}^2

    With ``T_b = L_b^{-1}`` (``A_b = L_b L_b^T`` the Cholesky factor of M-FAC's m x m matrix),
    ``s_j = [G_b^T A_b^{-1} G_b]_{jj}`` and the inverse diagonal is ``1/damp - s_j / damp^2``.
    This reference materializes the ``(m, d)`` product; the Triton kernel does not.

    Args:
        G: ``(m, d)`` matrix (any floating storage dtype).
        T: ``(nb, m, m)`` matrices, one per block of ``block_size`` coordinates
            (``nb = ceil(d / block_size)``; ``nb = 1`` and ``block_size=None`` for one block).
            The last block may be shorter.
        block_size: Number of coordinates per block, or None for a single block over all ``d``.

    Returns:
        ``(d,)`` tensor in ``T``'s dtype.
    """
    m, d = G.shape
    B = d if block_size is None else block_size
    nb = T.shape[0]
    if nb * B < d or (nb - 1) * B >= max(d, 1):
        raise ValueError(f"T holds {nb} blocks but d={d} with block_size={B} needs {-(-d // B)}")
    Gp = torch.nn.functional.pad(G.to(T.dtype), (0, nb * B - d))  # (m, nb*B)
    Gb = Gp.reshape(m, nb, B).permute(1, 0, 2)  # (nb, m, B)
    return (torch.bmm(T, Gb) ** 2).sum(1).reshape(-1)[:d]
