"""Optimal Brain Surgeon: saliency scores and weight updates from an inverse-curvature provider.

With a quadratic model of the loss around the weights ``w`` and curvature ``F``, removing the
weight ``q`` (forcing ``w_q = 0``) at the least loss increase costs

.. math::

    \\rho_q = \\frac{w_q^2}{2 [F^{-1}]_{qq}},

and removing a set ``Q`` at once is optimally compensated by

.. math::

    \\delta w = -F^{-1} E_Q^\\top (E_Q F^{-1} E_Q^\\top)^{-1} E_Q w

(``E_Q`` selects the coordinates in ``Q``), which makes ``w + delta w`` exactly zero on ``Q``.

Two ways to apply it:

* :func:`obs_update_multi` -- the exact multi-weight update, solved per block of ``F`` (the
  ``|Q_b| x |Q_b|`` system of each block ``b``); cost ``|Q_b|^3`` per block plus the rows of
  ``F^{-1}``. Exact for a block-diagonal ``F``.
* :func:`obs_update_diagonal` -- the approximation used at scale: the removed weights are treated
  as independent, each contributing ``-w_q / [F^{-1}]_{qq} * F^{-1} e_q``, so the whole update is
  a single inverse-Hessian-vector product ``-F^{-1} v`` with ``v_q = w_q / [F^{-1}]_{qq}`` on
  ``Q``. It ignores the off-diagonal entries of ``E_Q F^{-1} E_Q^T``, so it is exact only for one
  weight per block, and overshoots when many correlated weights go at once.

The inverse provider is anything with ``inverse_diagonal()``, ``inverse_rows(idx)`` and
``ihvp(x)``: :class:`curvopt.mfac.StaticMFAC` or :class:`curvopt.prune.DenseFisherInverse`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class InverseProvider(Protocol):
    """What the OBS routines need from an inverse curvature (``StaticMFAC`` has all of it)."""

    def inverse_diagonal(self) -> Tensor:
        """``diag(F^{-1})``, shape ``(d,)``."""

    def inverse_rows(self, idx: Tensor) -> Tensor:
        """Rows ``F^{-1}[idx, :]``, shape ``(len(idx), d)``."""

    def ihvp(self, x: Tensor) -> Tensor:
        """``F^{-1} x``."""


def obs_scores(w: Tensor, inv_diag: Tensor) -> Tensor:
    """OBS saliency ``w**2 / (2 * diag(F^{-1}))``, elementwise.

    Args:
        w: Flat weights ``(d,)``.
        inv_diag: ``diag(F^{-1})``, shape ``(d,)``, positive.

    Example:
        >>> obs_scores(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0]))
        tensor([1., 1.])
    """
    if w.shape != inv_diag.shape:
        raise ValueError(f"w {tuple(w.shape)} and inv_diag {tuple(inv_diag.shape)} differ")
    return w.pow(2) / (2 * inv_diag)


def obs_update_diagonal(
    inverse: InverseProvider, w: Tensor, idx: Tensor, inv_diag: Tensor | None = None
) -> Tensor:
    """Diagonal-approximation OBS update for removing the coordinates ``idx``.

    ``delta w = -F^{-1} v`` with ``v_q = w_q / [F^{-1}]_{qq}`` for ``q`` in ``idx`` (else 0): the
    sum of the single-weight OBS updates. One IHVP regardless of ``len(idx)``.

    Args:
        inverse: Provider with ``ihvp`` and ``inverse_diagonal``.
        w: Flat weights ``(d,)``.
        idx: Indices to remove (long tensor).
        inv_diag: ``diag(F^{-1})`` if already computed.

    Returns:
        ``delta w`` of shape ``(d,)``, same dtype as ``w``.
    """
    if inv_diag is None:
        inv_diag = inverse.inverse_diagonal()
    v = torch.zeros_like(w)
    v[idx] = w[idx] / inv_diag[idx].to(w.dtype)
    return -inverse.ihvp(v).to(w.dtype)


def obs_update_multi(
    inverse: InverseProvider,
    w: Tensor,
    idx: Tensor,
    block_size: int | None,
    max_rows: int | None = None,
) -> Tensor:
    """Exact multi-weight OBS update, one ``|Q_b| x |Q_b|`` solve per block of ``F``.

    For each block ``b`` (coordinates ``[b*B, (b+1)*B)``) with removed set ``Q_b``:
    ``delta w_b = -F_b^{-1}[:, Q_b] (F_b^{-1}[Q_b, Q_b])^{-1} w_{Q_b}``. With ``block_size=None``
    the whole vector is one block (exact OBS for a dense ``F``; the solve is ``|Q| x |Q|``).

    Rows of ``F^{-1}`` are fetched in chunks of whole blocks with at most ``max_rows`` rows (default
    ``2**22 // d``, at least one block), so memory is ``max_rows * d`` (rows are zero outside their
    block). The small systems are solved in float64; the rows keep the provider's dtype. The
    total work is about ``len(idx) * d`` for the rows, which is why :func:`curvopt.prune.prune`
    switches to :func:`obs_update_diagonal` for large models.

    Args:
        inverse: Provider with ``inverse_rows(idx) -> (len(idx), d)``.
        w: Flat weights ``(d,)``.
        idx: Indices to remove (long tensor, any order).
        block_size: Block size of ``F`` (``None``: one block).
        max_rows: Upper bound on rows requested at once (a whole block is never split).

    Returns:
        ``delta w`` of shape ``(d,)``, same dtype as ``w``; ``(w + delta w)[idx]`` is zero up to
        round-off.
    """
    d = w.numel()
    idx = torch.sort(torch.as_tensor(idx, dtype=torch.long, device=w.device)).values
    delta = torch.zeros(d, dtype=torch.float64, device=w.device)
    if idx.numel() == 0:
        return delta.to(w.dtype)
    B = d if block_size is None else int(block_size)
    block_of = torch.div(idx, B, rounding_mode="floor")
    blocks, counts = torch.unique_consecutive(block_of, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0, *ends[:-1]]
    w64 = w.to(torch.float64)
    if max_rows is None:
        max_rows = max(1, 2**22 // d)
    # group consecutive blocks into chunks of at most max_rows rows (never split a block)
    chunk: list[int] = []
    rows_in_chunk = 0
    groups: list[list[int]] = []
    for j, c in enumerate(counts.tolist()):
        if chunk and rows_in_chunk + c > max_rows:
            groups.append(chunk)
            chunk, rows_in_chunk = [], 0
        chunk.append(j)
        rows_in_chunk += c
    groups.append(chunk)
    for group in groups:
        lo, hi = starts[group[0]], ends[group[-1]]
        sub = idx[lo:hi]
        R = inverse.inverse_rows(sub)  # (n, d), zero outside each row's block
        # per-block systems, padded to a batch: S_b = R_b[:, Q_b], rhs w_{Q_b}
        sizes = [counts[j].item() for j in group]
        k = max(sizes)
        S = torch.eye(k, dtype=torch.float64, device=w.device).repeat(len(group), 1, 1)
        rhs = torch.zeros(len(group), k, dtype=torch.float64, device=w.device)
        offset = 0
        for t, n in enumerate(sizes):
            q = sub[offset : offset + n]
            S[t, :n, :n] = R[offset : offset + n][:, q].to(torch.float64)
            rhs[t, :n] = w64[q]
            offset += n
        coef = torch.linalg.solve(S, rhs)  # (groups, k)
        c = torch.cat([coef[t, :n] for t, n in enumerate(sizes)])
        delta -= (R.T @ c.to(R.dtype)).to(torch.float64)
    return delta.to(w.dtype)
