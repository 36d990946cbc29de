"""M-FAC for a fixed set of gradients (pruning, Newton-type steps with a frozen curvature)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from curvopt import distributed as D

from . import _products as P
from ._linalg import cholesky
from ._validation import (
    check_damp,
    check_indices,
    check_operand,
    check_positive_int,
    check_storage_dtype,
    conditioning_estimate,
    finite_flag,
    resolve_accumulate_dtype,
    warn_if_ill_conditioned,
)

#: ``m >= _TRANSPOSED_RATIO * d`` rows of ``grads`` look like a transposed ``(d, m)`` matrix.
_TRANSPOSED_RATIO = 16


class StaticMFAC:
    """Inverse of the empirical-Fisher approximation built from ``m`` fixed gradients.

    .. math::

        F = \\lambda I + \\tfrac{1}{m} G^\\top G,\\qquad
        F^{-1} x = \\lambda^{-1} x - \\lambda^{-2} G^\\top A^{-1} G x,\\qquad
        A = m I + G G^\\top / \\lambda,

    with ``G`` the ``(m, d)`` matrix of gradients (rows) and ``lam = damp``. Setup is one GEMM
    for ``K = G G^T`` and a float64 Cholesky factorization ``A = L L^T`` (``O(m^2 d + m^3)``); the
    published algorithm instead builds ``m`` vectors with a sequential loop. Memory: ``G`` itself
    (not copied) plus ``O(m^2)`` per block; no ``d x d`` matrix is ever formed.

    With ``block_size=B`` the curvature is block-diagonal over contiguous chunks of ``B``
    coordinates (the last chunk may be shorter); each block uses the same ``m`` gradients
    restricted to its coordinates, and all blocks are processed as batched matrix products.

    **Sharded over ranks** (``process_group`` given): the columns of ``grads`` are this rank's
    coordinate shard (possibly none). ``K`` is summed over the ranks once at setup (one
    all-reduce of ``m^2`` numbers) and the factorization is replicated bit-identically; each
    :meth:`ihvp` / :meth:`mul` all-reduces its ``m k`` dot products once. :meth:`ihvp`,
    :meth:`mul`, :meth:`inverse_diagonal` and :meth:`inverse_entries` take and return this
    rank's coordinates (the last two need no communication); :meth:`inverse_rows` is collective:
    every rank passes indices of its own coordinates and receives the rows of all ranks'
    indices restricted to its columns. Blocks (``block_size``) are not supported sharded.

    Args:
        grads: ``(m, d)`` gradients in float16, bfloat16, float32 or float64. Kept by reference.
        damp: Damping ``lam > 0``.
        block_size: Block width ``B`` or None for the full matrix.
        accumulate_dtype: Dtype of the products over ``G`` (``G x``, ``G G^T``, ``G^T c``):
            float64 removes most of the cancellation at small ``damp`` (see the guide);
            default float64 for float64 ``grads``, float32 otherwise. The m x m algebra is
            always float64.
        process_group: A ``torch.distributed`` process group over which the coordinates are
            sharded, or None (one process).

    Warns:
        UserWarning: When ``grads`` has at least 16 times more rows than columns (one process):
            most likely a transposed ``(d, m)`` matrix, which would fail at the first product.
        RuntimeWarning: When ``lambda_max(F)/damp``, estimated from above by
            ``1 + max_b ||K_b||_inf / (m damp)``, reaches ``1/eps`` of the accumulation dtype: the
            Woodbury products then cancel to noise. ``damp`` so small that ``1/damp^2``
            overflows float64 (below about 1e-154) raises ``ValueError``.

    Attributes:
        G: The gradients, ``(m, d)``.
        dim: ``d``.
        m: Number of gradients.
        damp: The damping.
        block_size: Effective block width (``d`` when unblocked or ``block_size >= d``).
        K: ``(num_blocks, m, m)`` float64 Gram matrices.

    Example:
        >>> G = torch.randn(8, 100)
        >>> F_inv = StaticMFAC(G, damp=1e-2)
        >>> y = F_inv.ihvp(torch.randn(100))
        >>> F_inv.inverse_diagonal().shape
        torch.Size([100])
    """

    def __init__(
        self,
        grads: Tensor,
        damp: float,
        block_size: int | None = None,
        *,
        accumulate_dtype: torch.dtype | None = None,
        process_group: object = None,
    ):
        """Validate the inputs, form the Gram matrices and factor them."""
        group = D.check_process_group(process_group)
        if group is not None and block_size is not None:
            raise ValueError(
                "block_size is not supported with a process_group (blocks would cross the "
                "ranks' coordinate shards); pass block_size=None"
            )
        if not isinstance(grads, Tensor):
            raise TypeError(
                f"grads must be a torch.Tensor of shape (m, d), got {type(grads).__name__}"
            )
        check_storage_dtype(grads.dtype, "grads.dtype")
        if grads.ndim != 2:
            raise ValueError(
                f"grads must be a 2-D (m, d) tensor with one gradient per row, got shape "
                f"{tuple(grads.shape)}; use grads[None] for a single gradient"
            )
        if grads.shape[0] == 0 or (grads.shape[1] == 0 and group is None):
            raise ValueError(
                f"grads is empty (shape {tuple(grads.shape)}); pass at least one gradient"
            )
        m, d = grads.shape
        if group is None and m >= _TRANSPOSED_RATIO * max(d, 1):
            warnings.warn(
                f"grads has shape (m, d) = {tuple(grads.shape)}: {m} gradients of only {d} "
                "coordinates. StaticMFAC takes one gradient per row; if these are the columns, "
                f"pass grads.T (shape ({d}, {m})), or the first ihvp with a ({d},)-vector fails "
                "on a shape mismatch. With that many gradients of so few coordinates, the "
                f"dense ({d}, {d}) curvature is also cheaper than M-FAC",
                UserWarning,
                stacklevel=2,
            )
        if bool(D.all_reduce_any(~finite_flag(grads), group)):
            raise ValueError("grads contains NaN or Inf values (on this or another rank)")
        self.process_group = group
        self._damp = check_damp(damp)
        if block_size is not None:
            check_positive_int(block_size, "block_size")
        self.G = grads
        self.m, self.dim = grads.shape
        self._acc = resolve_accumulate_dtype(accumulate_dtype, grads.dtype)
        self._layout = P.BlockLayout(self.dim, block_size)
        self.block_size = self._layout.block_size
        if self.dim == 0:  # this rank holds no coordinates
            self.K = torch.zeros(1, self.m, self.m, dtype=torch.float64, device=grads.device)
        else:
            self.K = P.block_gram(grads, self._layout, self._acc)
        D.all_reduce_sum_(self.K, group)
        self._k_norm = float(self.K.detach().abs().sum(-1).max())  # >= lambda_max(K_b)
        self._check_conditioning(self._damp)
        self._L = cholesky(self.K, self.m, self._damp)
        self._eig: tuple[Tensor, Tensor] | None = None
        self._diag: Tensor | None = None

    @property
    def damp(self) -> float:
        """The damping ``lam`` of ``F = lam I + G^T G / m``."""
        return self._damp

    def _check_conditioning(self, damp: float) -> None:
        """Warn if ``lambda_max(F)/damp`` (upper estimate) is past ``1/eps`` of the products."""
        ratio = conditioning_estimate(self._k_norm, self.m, damp)
        warn_if_ill_conditioned(ratio, self._acc, f"StaticMFAC(damp={damp:g})")

    @property
    def num_blocks(self) -> int:
        """Number of coordinate blocks."""
        return self._layout.num_blocks

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """Dtype of the products over ``G``."""
        return self._acc

    def memory_bytes(self) -> int:
        """Bytes held: ``G`` plus the float64 ``m x m`` matrices (Gram and factor) per block."""
        total = self.G.numel() * self.G.element_size()
        total += 2 * self.K.numel() * 8
        if self._eig is not None:
            total += sum(t.numel() * 8 for t in self._eig)
        if self._diag is not None:
            total += self._diag.numel() * self._diag.element_size()
        return total

    def _solve(self, rhs: Tensor, damp: float | None) -> Tensor:
        """``A^{-1} rhs`` per block (rhs ``(nb, m, k)`` float64), optionally at another damping."""
        if damp is None or damp == self._damp:
            return torch.cholesky_solve(rhs, self._L)
        if self._eig is None:  # one eigendecomposition serves every later damping
            self._eig = torch.linalg.eigh(self.K)
        evals, Q = self._eig
        scale = 1.0 / (self.m + evals.clamp_min(0.0) / damp)  # (nb, m)
        return Q @ (scale[..., None] * (Q.transpose(1, 2) @ rhs))

    def ihvp(self, x: Tensor, damp: float | None = None) -> Tensor:
        """Inverse-curvature products ``F^{-1} x``.

        Args:
            x: ``(d,)`` vector or ``(d, k)`` matrix of columns.
            damp: Damping for this call only (default: ``self.damp``). A different value costs
                one batched ``m x m`` eigendecomposition on first use, then ``O(m^2)`` per call.

        Returns:
            ``F^{-1} x`` shaped and typed like ``x``.
        """
        X = check_operand(x, self.dim, self.G.device)
        lam = self._damp if damp is None else check_damp(damp)
        if lam != self._damp:
            self._check_conditioning(lam)
        dots = P.block_dots(self.G, self._layout, X, self._acc).to(torch.float64)
        D.all_reduce_sum_(dots, self.process_group)
        C = self._solve(dots, lam).mul_(-1.0 / lam**2).to(self._acc)
        Y = P.block_combine(1.0 / lam, X, self.G, self._layout, C)
        return Y if x.ndim == 2 else Y[:, 0]

    def mul(self, x: Tensor) -> Tensor:
        """Curvature products ``F x = lam x + G^T (G x) / m`` (block-wise), shaped like ``x``."""
        X = check_operand(x, self.dim, self.G.device)
        dots = D.all_reduce_sum_(
            P.block_dots(self.G, self._layout, X, self._acc), self.process_group
        )
        Y = P.block_combine(self._damp, X, self.G, self._layout, dots / self.m)
        return Y if x.ndim == 2 else Y[:, 0]

    def _inverse_factor(self) -> Tensor:
        """``T = L^{-1}`` per block, ``(nb, m, m)`` float64."""
        eye = torch.eye(self.m, dtype=torch.float64, device=self.G.device)
        return torch.linalg.solve_triangular(self._L, eye.expand_as(self._L), upper=False)

    def inverse_diagonal(self) -> Tensor:
        """Diagonal of ``F^{-1}``, ``(d,)`` in the accumulation dtype; computed once and cached.

        * Blocks wider than ``m``: ``1/lam - ||L_b^{-1} G_b e_j||^2 / lam^2`` (Woodbury; one
          GEMM-sized pass, ``O(m^2 d)``). At small ``damp`` the difference cancels; use
          ``accumulate_dtype=torch.float64`` there.
        * Blocks of width ``B <= m`` (including ``d <= m`` unblocked): from the Cholesky factor of
          the ``B x B`` block ``F_b = lam I + G_b^T G_b / m`` itself, in float64,
          ``[F_b^{-1}]_jj = ||R_b^{-1} e_j||^2`` with ``F_b = R_b R_b^T``: a sum of positive terms,
          accurate to a few ulps at any ``damp`` (``O(m B d)``). Not with a process group (the
          block then spans all ranks' coordinates): the Woodbury form is used.
        """
        if self._diag is None and self._small_blocks():
            diag = P.small_block_inverse_diagonal(self.G, self._layout, self._damp)
            self._diag = diag.to(self._acc)
        if self._diag is None:
            T = self._inverse_factor().to(self._acc)
            s = P.block_gram_diag(self.G, self._layout, T)
            self._diag = (1.0 / self._damp) - s / self._damp**2
        return self._diag

    def _columns(self, idx: Tensor) -> Tensor:
        """``G e_i`` for each index: ``(k, m, 1)`` float64."""
        return self.G[:, idx].to(torch.float64).T[..., None]

    def _small_blocks(self) -> bool:
        """Whether the blocks are no wider than ``m`` (then factor the ``B x B`` blocks).

        Not with a process group: the one block then spans every rank's coordinates, and only
        the Woodbury form applies.
        """
        return self.block_size <= self.m and self.process_group is None

    def inverse_entries(self, idx: Tensor) -> Tensor:
        """Diagonal entries ``F^{-1}[i, i]`` for coordinate indices ``idx``.

        Blocks wider than ``m``: ``1/lam - ||L_b^{-1} G_b e_i||^2 / lam^2`` (Woodbury,
        ``O(k m^2)``). Blocks of width ``B <= m``: ``||R_b^{-1} e_i||^2`` from the Cholesky factor
        of the ``B x B`` block ``F_b = R_b R_b^T`` (no cancellation, like
        :meth:`inverse_diagonal`; ``O(m B^2 + B^3)`` per distinct block).

        Args:
            idx: Integer tensor (or sequence) of indices in ``[0, d)``.

        Returns:
            ``(k,)`` tensor in the accumulation dtype (computed in float64).
        """
        idx = check_indices(idx, self.dim, self.G.device)
        if self._small_blocks():
            entries = P.small_block_inverse_columns(
                self.G, self._layout, self._damp, idx, entries_only=True
            )
            return entries.to(self._acc)
        L = self._L[self._layout.block_of(idx)]
        z = torch.linalg.solve_triangular(L, self._columns(idx), upper=False)
        s = z.square().sum(dim=(1, 2))
        return ((1.0 / self._damp) - s / self._damp**2).to(self._acc)

    def inverse_rows(self, idx: Tensor) -> Tensor:
        """Rows ``F^{-1}[i, :]`` (equal to the columns ``F^{-1} e_i``), as needed by OBS updates.

        With blocks, a row is zero outside the block of its coordinate. Blocks wider than ``m``:
        ``e_i / lam - G^T A_b^{-1} G e_i / lam^2`` (Woodbury, ``O(k m^2 + k m B)``). Blocks of width
        ``B <= m`` (not sharded): solved with the Cholesky factor of the ``B x B`` block itself,
        backward stable with no cancellation (``O(m B^2 + B^3)`` per distinct block); the
        Woodbury form loses ``log10(lambda_max(F)/damp)`` digits there.

        Args:
            idx: Integer tensor (or sequence) of ``k`` indices in ``[0, d)``.

        Returns:
            ``(k, d)`` tensor in the accumulation dtype. Sharded (``process_group`` given; a
            collective, ``idx`` may be empty on some ranks): ``(k_0 + ... + k_{P-1}, d_r)``, the
            rows of every rank's indices in rank order, restricted to this rank's columns.
        """
        if self.process_group is not None:
            return self._sharded_inverse_rows(idx)
        idx = check_indices(idx, self.dim, self.G.device)
        k, lay, acc = idx.numel(), self._layout, self._acc
        if self._small_blocks():  # the B x B blocks' own factors: no Woodbury cancellation
            vals = P.small_block_inverse_columns(self.G, lay, self._damp, idx)  # (k, B)
            cols = lay.block_of(idx)[:, None] * lay.block_size
            cols = cols + torch.arange(lay.block_size, device=idx.device)
            inside = cols < self.dim
            rows = torch.zeros(k, self.dim, dtype=acc, device=self.G.device)
            ks = torch.arange(k, device=idx.device)[:, None].expand_as(cols)
            rows[ks[inside], cols[inside]] = vals[inside].to(acc)
            return rows
        blocks = lay.block_of(idx)
        scale = -1.0 / self._damp**2
        C = torch.cholesky_solve(self._columns(idx), self._L[blocks])[..., 0]  # (k, m)
        rows_ar = torch.arange(k, device=idx.device)
        if lay.single:
            zeros = torch.zeros(self.dim, k, dtype=acc, device=self.G.device)
            rows = P.combine(0.0, zeros, self.G, (scale * C.T).to(acc)).T.contiguous()
        else:
            rows = torch.zeros(k, self.dim, dtype=acc, device=self.G.device)
            B, nf = lay.block_size, lay.num_full
            groups = [(blocks < nf, B, 0)]
            if lay.tail:
                groups.append((blocks >= nf, lay.tail, nf * B))
            for mask, w, start in groups:
                sel = rows_ar[mask]
                per = max(1, P.TEMP_ELEMENTS // max(self.m * w, 1))
                for s in range(0, sel.numel(), per):
                    r = sel[s : s + per]
                    first = blocks[r] * B if start == 0 else torch.full_like(r, start)
                    cols = first[:, None] + torch.arange(w, device=r.device)  # (k', w)
                    Gsel = self.G[:, cols].to(acc).permute(1, 0, 2)  # (k', m, w)
                    vals = torch.bmm((scale * C[r]).to(acc)[:, None, :], Gsel)[:, 0]
                    rows[r[:, None], cols] = vals
        rows[rows_ar, idx] += 1.0 / self._damp
        return rows

    def _sharded_inverse_rows(self, idx: Tensor) -> Tensor:
        """:meth:`inverse_rows` over ranks: one all-gather of the ``A^{-1} G e_i`` (``k m``)."""
        group, dev = self.process_group, self.G.device
        if isinstance(idx, Tensor) and idx.numel() == 0:
            idx = torch.zeros(0, dtype=torch.long, device=dev)
        else:
            idx = check_indices(idx, self.dim, dev)
        k = idx.numel()
        counts = D.all_gather_flat(
            torch.tensor([k], dtype=torch.long, device=dev), [1] * D.world_size(group), group
        ).tolist()
        C = torch.cholesky_solve(self._columns(idx), self._L[0].expand(k, -1, -1))[..., 0]
        C_all = D.all_gather_flat(C.reshape(-1), [c * self.m for c in counts], group)
        C_all = C_all.reshape(-1, self.m)  # (sum k, m), every rank's indices in rank order
        zeros = torch.zeros(self.dim, C_all.shape[0], dtype=self._acc, device=dev)
        scale = -1.0 / self._damp**2
        rows = P.combine(0.0, zeros, self.G, (scale * C_all.T).to(self._acc)).T.contiguous()
        first = sum(counts[: D.rank(group)])
        rows[first + torch.arange(k, device=dev), idx] += 1.0 / self._damp
        return rows
