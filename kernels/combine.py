"""Fused combine ``y = a * x + G^T c`` (the last step of an M-FAC IHVP)."""

from __future__ import annotations

from torch import Tensor


def combine_reference(a: float, x: Tensor, G: Tensor, c: Tensor) -> Tensor:
    """Scaled vector plus a combination of the rows of ``G``.

    .. math:: y = a x + G^\\top c

    Args:
        a: Scalar.
        x: ``(d,)`` or ``(d, k)`` tensor.
        G: ``(m, d)`` matrix (any floating storage dtype).
        c: ``(m,)`` or ``(m, k)`` coefficients, matching ``x``'s trailing dimension.

    Returns:
        Tensor shaped like ``x`` in ``x``'s dtype (accumulated in ``c``'s dtype or float32,
        whichever is wider).
    """
    acc = c.dtype if c.element_size() >= 4 else x.dtype
    y = G.to(acc).T @ c.to(acc)
    return (a * x.to(acc) + y).to(x.dtype)
