"""Fused multi-dot ``G @ [v_1 ... v_k]`` in one pass over ``G``."""

from __future__ import annotations

import torch
from torch import Tensor


def multi_dot_reference(G: Tensor, V: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Products of the rows of ``G`` with k vectors.

    .. math:: P_{ij} = \\sum_l G_{il} V_{jl}

    Args:
        G: ``(m, d)`` matrix in float32, bfloat16, float16 or float64.
        V: ``(k, d)`` matrix of k vectors (any floating dtype).
        out_dtype: Accumulation and output dtype (float32 or float64).

    Returns:
        ``(m, k)`` tensor in ``out_dtype``.
    """
    acc = out_dtype
    return G.to(acc) @ V.to(acc).T
