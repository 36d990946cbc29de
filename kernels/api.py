"""The dispatching functions of :mod:`curvopt.kernels`: Triton where it runs, else the reference."""

from __future__ import annotations

import torch
from torch import Tensor

from .combine import combine_reference
from .dispatch import use_triton
from .gram_diag import gram_diag_reference
from .multi_dot import multi_dot_reference
from .softmax_curvature import softmax_curvature_reference


def _triton_impl(name: str):
    """Return the Triton launcher ``name`` or None when it is not available."""
    try:
        from . import triton_impl
    except ImportError:
        return None
    return getattr(triton_impl, name, None)


def multi_dot(G: Tensor, V: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``G @ V.T`` for ``G`` ``(m, d)`` and ``V`` ``(k, d)`` in one pass over ``G``.

    See :func:`~curvopt.kernels.multi_dot.multi_dot_reference` for the arguments; the Triton path
    is :func:`~curvopt.kernels.multi_dot.multi_dot_triton`.
    """
    impl = _triton_impl("multi_dot") if use_triton(G) else None
    return (impl or multi_dot_reference)(G, V, out_dtype)


def combine(a: float | Tensor, x: Tensor, G: Tensor, c: Tensor) -> Tensor:
    """``a * x + G.T @ c`` in one pass over ``G``.

    See :func:`~curvopt.kernels.combine.combine_reference` for the arguments; the Triton path is
    :func:`~curvopt.kernels.combine.combine_triton`.
    """
    impl = _triton_impl("combine") if use_triton(G) else None
    return (impl or combine_reference)(a, x, G, c)


def gram_diag(G: Tensor, T: Tensor, block_size: int | None = None) -> Tensor:
    """Squared column norms of ``T_b G_b`` per block, without materializing ``T G``.

    See :func:`~curvopt.kernels.gram_diag.gram_diag_reference` for the arguments; the Triton path
    is :func:`~curvopt.kernels.gram_diag.gram_diag_triton`.
    """
    impl = _triton_impl("gram_diag") if use_triton(G) else None
    return (impl or gram_diag_reference)(G, T, block_size)


def softmax_curvature(logits: Tensor, u: Tensor) -> Tensor:
    """``(diag(p) - p p^T) u`` per row with ``p = softmax(logits)``, tiled over classes.

    See :func:`~curvopt.kernels.softmax_curvature.softmax_curvature_reference` for the
    arguments; the Triton path is
    :func:`~curvopt.kernels.softmax_curvature.softmax_curvature_triton`.
    """
    impl = _triton_impl("softmax_curvature") if use_triton(logits) else None
    return (impl or softmax_curvature_reference)(logits, u)
