"""Products over the gradient buffer ``G`` (m x d), whole or split into coordinate blocks.

The unblocked products go through the dispatching functions of :mod:`curvopt.kernels`
(``multi_dot``, ``combine``, ``gram_diag``). When the accumulation dtype is wider than the
storage dtype and the PyTorch reference runs, the reference would convert the whole of ``G``;
here the columns are processed in chunks so that the temporary stays small (a few MiB).

Block-wise products (``block_size=B``: contiguous chunks of ``B`` coordinates, the last one
possibly shorter) are batched matrix products over groups of blocks (``torch.bmm``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from curvopt import kernels

# Largest temporary (in elements) that a chunked conversion of G may create.
TEMP_ELEMENTS = 1 << 22
# Column chunk (in elements of G) that keeps the temporaries of the reference gram_diag in cache.
CACHE_ELEMENTS = 1 << 18


def needs_chunks(G: Tensor, acc: torch.dtype) -> bool:
    """Whether products must convert ``G`` (so they run over column chunks)."""
    return G.dtype != acc and not kernels.use_triton(G)


def plain(G: Tensor, acc: torch.dtype) -> bool:
    """Whether a product over ``G`` in ``acc`` is one BLAS call (no conversion, no Triton)."""
    return G.dtype == acc and not kernels.use_triton(G)


def column_chunks(G: Tensor, acc: torch.dtype, align: int = 1) -> Iterator[slice]:
    """Column slices of ``G`` covering ``[0, d)``; one slice unless a conversion is needed."""
    m, d = G.shape
    if not needs_chunks(G, acc):
        yield slice(0, d)
        return
    step = max(align, (TEMP_ELEMENTS // max(m, 1)) // align * align)
    for s in range(0, d, step):
        yield slice(s, min(d, s + step))


def dots(G: Tensor, X: Tensor, acc: torch.dtype) -> Tensor:
    """``G @ X`` for ``X`` ``(d, k)``, one pass over ``G``; returns ``(m, k)`` in ``acc``."""
    if X.shape[1] == 1 and X.dtype == acc and plain(G, acc):  # one matrix-vector product
        return torch.mv(G, X[:, 0])[:, None]
    out = None
    for sl in column_chunks(G, acc):
        # (k, d) rows, contiguous: on the CPU, G @ V.T with V row-major is ~7x faster than
        # with V.T row-major for k >= 2 (BLAS packs the other operand).
        V = X[sl].T if X.shape[1] == 1 else X[sl].T.contiguous()
        part = kernels.multi_dot(G[:, sl], V, acc)
        out = part if out is None else out.add_(part)
    if out is None:  # no columns (a rank's empty coordinate shard)
        return torch.zeros(G.shape[0], X.shape[1], dtype=acc, device=G.device)
    return out


def combine(a: float, X: Tensor, G: Tensor, C: Tensor) -> Tensor:
    """``a * X + G^T C`` for ``X`` ``(d, k)`` and ``C`` ``(m, k)`` (in the accumulation dtype)."""
    chunks = list(column_chunks(G, C.dtype))
    if len(chunks) == 1:
        return kernels.combine(a, X, G, C)
    out = torch.empty_like(X)
    for sl in chunks:
        out[sl] = kernels.combine(a, X[sl], G[:, sl], C)
    return out


def _lower_gram(Gc: Tensor, acc: torch.dtype) -> Tensor:
    """``Gc Gc^T`` from the row blocks on and below the diagonal (a SYRK from GEMMs).

    Row block ``i`` times rows ``0..i``: ``(1 + ... + p) / p^2`` of the flops of one full GEMM
    (62.5 % for ``p = 4``), 1.5x faster on the CPU at m=512, and bitwise the same entries.
    """
    m = Gc.shape[0]
    p = min(4, max(1, m // 64))
    if p == 1:
        return kernels.multi_dot(Gc, Gc, acc)
    K = torch.empty(m, m, dtype=acc, device=Gc.device)
    edges = [m * i // p for i in range(p + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows = kernels.multi_dot(Gc[lo:hi], Gc[:hi], acc)  # (hi - lo, hi)
        K[lo:hi, :hi] = rows
        K[:lo, lo:hi] = rows[:, :lo].T
    return K


def gram(G: Tensor, acc: torch.dtype) -> Tensor:
    """``K = G G^T`` (m x m) in float64, accumulated in ``acc``."""
    K = None
    for sl in column_chunks(G, acc):
        part = _lower_gram(G[:, sl], acc)
        K = part if K is None else K.add_(part)
    return K.to(torch.float64)


class BlockLayout:
    """Contiguous coordinate blocks of width ``B`` over ``d`` coordinates (the last may be shorter).

    Attributes:
        dim: ``d``.
        block_size: ``B`` (``d`` when unblocked).
        num_blocks: ``ceil(d / B)``.
        num_full: Number of blocks of full width ``B``.
        tail: Width of the last, shorter block (0 when ``B`` divides ``d``).
    """

    def __init__(self, dim: int, block_size: int | None):
        """Split ``dim`` coordinates into blocks of ``block_size`` (None: one block)."""
        self.dim = dim
        self.block_size = dim if block_size is None else min(block_size, dim)
        if dim == 0:  # a rank's empty coordinate shard: one empty block
            self.num_full, self.tail, self.num_blocks = 0, 0, 1
            return
        self.num_full = dim // self.block_size
        self.tail = dim - self.num_full * self.block_size
        self.num_blocks = self.num_full + (1 if self.tail else 0)

    @property
    def single(self) -> bool:
        """Whether there is only one block (the unblocked case)."""
        return self.num_blocks == 1

    def groups(self, m: int, convert: bool) -> Iterator[tuple[int, int, int, int]]:
        """Groups of equal-width blocks: ``(first_block, num_blocks, width, first_column)``.

        Full blocks come in groups small enough that a converted copy stays below
        ``TEMP_ELEMENTS`` (all at once when no conversion is needed); the short last block is
        its own group.
        """
        B = self.block_size
        per = self.num_full
        if convert:
            per = max(1, TEMP_ELEMENTS // max(m * B, 1))
        for b in range(0, self.num_full, per):
            n = min(per, self.num_full - b)
            yield b, n, B, b * B
        if self.tail:
            yield self.num_full, 1, self.tail, self.num_full * B

    def block_of(self, idx: Tensor) -> Tensor:
        """Block number of each coordinate index."""
        return torch.div(idx, self.block_size, rounding_mode="floor")


def _as_blocks(A: Tensor, n: int, w: int) -> Tensor:
    """View the columns of ``A`` ``(r, n*w)`` as ``(n, r, w)``."""
    return A.reshape(A.shape[0], n, w).permute(1, 0, 2)


def block_gram(G: Tensor, layout: BlockLayout, acc: torch.dtype) -> Tensor:
    """Per-block Gram matrices ``K_b = G_b G_b^T``: ``(nb, m, m)`` float64."""
    if layout.single:
        return gram(G, acc)[None]
    m = G.shape[0]
    K = torch.empty(layout.num_blocks, m, m, dtype=torch.float64, device=G.device)
    for b, n, w, c in layout.groups(m, needs_chunks(G, acc)):
        Gb = _as_blocks(G[:, c : c + n * w].to(acc), n, w)
        K[b : b + n] = torch.bmm(Gb, Gb.transpose(1, 2))
    return K


def block_dots(G: Tensor, layout: BlockLayout, X: Tensor, acc: torch.dtype) -> Tensor:
    """``G_b @ X_b`` per block for ``X`` ``(d, k)``: ``(nb, m, k)`` in ``acc``."""
    if layout.single:
        return dots(G, X, acc)[None]
    m, k = G.shape[0], X.shape[1]
    out = torch.empty(layout.num_blocks, m, k, dtype=acc, device=G.device)
    for b, n, w, c in layout.groups(m, needs_chunks(G, acc)):
        Gb = _as_blocks(G[:, c : c + n * w].to(acc), n, w)  # (n, m, w)
        Xb = X[c : c + n * w].to(acc).reshape(n, w, k)
        out[b : b + n] = torch.bmm(Gb, Xb)
    return out


def block_combine(a: float, X: Tensor, G: Tensor, layout: BlockLayout, C: Tensor) -> Tensor:
    """``a X_b + G_b^T C_b`` per block for ``X`` ``(d, k)``, ``C`` ``(nb, m, k)``; like ``X``."""
    if layout.single:
        return combine(a, X, G, C[0])
    m, k = G.shape[0], X.shape[1]
    acc = C.dtype
    out = torch.empty_like(X)
    for b, n, w, c in layout.groups(m, needs_chunks(G, acc)):
        Gb = _as_blocks(G[:, c : c + n * w].to(acc), n, w)  # (n, m, w)
        Xb = X[c : c + n * w].to(acc).reshape(n, w, k)
        Yb = torch.baddbmm(Xb, Gb.transpose(1, 2), C[b : b + n], beta=a)
        out[c : c + n * w] = Yb.reshape(n * w, k)
    return out


def small_block_factors(G: Tensor, layout: BlockLayout, damp: float, blocks: Tensor) -> Tensor:
    """Cholesky factors of the ``B x B`` blocks ``F_b = damp I + G_b^T G_b / m``, float64.

    Formed and factored in float64 (``O(m B^2 + B^3)`` per block), for blocks no wider than
    ``m``, where ``F_b`` is smaller than the Woodbury matrix and has no cancellation. The short
    last block is padded to width ``B`` with zero columns of ``G``: its factor is
    ``diag(R_b, sqrt(damp) I)``, so the padded coordinates never mix with the real ones.

    Args:
        G: ``(m, d)`` gradients.
        layout: The block layout (``layout.block_size = B``).
        damp: Damping ``lam > 0``.
        blocks: ``(n,)`` long tensor of block numbers.

    Returns:
        ``(n, B, B)`` lower factors ``R_b`` with ``F_b = R_b R_b^T``.

    Raises:
        ValueError: If a block is not numerically positive definite (``damp`` far too small).
    """
    m, d = G.shape
    B = layout.block_size
    cols = blocks[:, None] * B + torch.arange(B, device=blocks.device)  # (n, B)
    inside = cols < d
    Gb = G[:, cols.clamp_max(d - 1)].to(torch.float64).permute(1, 0, 2)  # (n, m, B)
    Gb = Gb * inside[:, None, :]  # zero columns past d (the short last block)
    F = torch.bmm(Gb.transpose(1, 2), Gb).div_(m)
    F.diagonal(dim1=-2, dim2=-1).add_(damp)
    L, info = torch.linalg.cholesky_ex(F)
    if bool((info != 0).any()):
        raise ValueError(
            f"damp I + G_b^T G_b / m is not numerically positive definite at damp={damp}; "
            "increase damp or rescale the gradients"
        )
    return L


def _block_chunks(layout: BlockLayout, m: int) -> int:
    """Number of ``B x B`` factors formed at once (their copy of ``G`` stays small)."""
    return max(1, TEMP_ELEMENTS // max(m * layout.block_size, 1))


def small_block_inverse_diagonal(G: Tensor, layout: BlockLayout, damp: float) -> Tensor:
    """Diagonal of ``(damp I + G_b^T G_b / m)^{-1}`` from the ``B x B`` blocks, ``(d,)`` float64.

    For blocks no wider than ``m``: with the factors of :func:`small_block_factors`,
    ``F_b = R_b R_b^T``, ``[F_b^{-1}]_jj = ||R_b^{-1} e_j||^2`` is a sum of positive terms, so
    there is no cancellation (the Woodbury form ``1/lam - ||.||^2/lam^2`` loses ``log10(cond)``
    digits). Cost ``O(m B d + B^2 d)``, no more than the Woodbury form's ``O(m^2 d)`` when
    ``B <= m``.

    Raises:
        ValueError: If a block is not numerically positive definite (``damp`` far too small).
    """
    m, d = G.shape
    B, nb = layout.block_size, layout.num_blocks
    out = torch.empty(nb * B, dtype=torch.float64, device=G.device)
    per = _block_chunks(layout, m)
    for s in range(0, nb, per):
        blocks = torch.arange(s, min(nb, s + per), device=G.device)
        L = small_block_factors(G, layout, damp, blocks)
        eye = torch.eye(B, dtype=torch.float64, device=G.device).expand_as(L)
        Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        out[s * B : (s + blocks.numel()) * B] = Linv.square().sum(dim=1).reshape(-1)
    return out[:d]


def small_block_inverse_columns(
    G: Tensor, layout: BlockLayout, damp: float, idx: Tensor, entries_only: bool = False
) -> Tensor:
    """Columns ``F_b^{-1} e_i`` (or entries ``[F_b^{-1}]_ii``) of the ``B x B`` blocks, float64.

    From the factors of :func:`small_block_factors`, ``F_b = R_b R_b^T``: the column is
    ``R_b^{-T} (R_b^{-1} e_i)`` (backward stable) and the entry ``||R_b^{-1} e_i||^2`` (a sum of
    positive terms, accurate to a few ulps); neither cancels, unlike the Woodbury form. For
    blocks no wider than ``m``; each distinct block is factored once per group of indices,
    ``O(m B^2 + B^3)``.

    Args:
        G: ``(m, d)`` gradients.
        layout: The block layout.
        damp: Damping ``lam > 0``.
        idx: ``(k,)`` long tensor of coordinate indices.
        entries_only: Return only the diagonal entries.

    Returns:
        ``(k,)`` entries, or ``(k, B)`` values of ``F^{-1} e_i`` at the coordinates
        ``block(i) * B + [0, B)`` of the block of ``i`` (entries past ``d`` in a short last block
        are 0).
    """
    m, d = G.shape
    B = layout.block_size
    k = idx.numel()
    out = torch.empty((k,) if entries_only else (k, B), dtype=torch.float64, device=G.device)
    blocks = layout.block_of(idx)
    per = _block_chunks(layout, m)
    for s in range(0, k, per):
        bl = blocks[s : s + per]
        n = bl.numel()
        unique, where = torch.unique(bl, return_inverse=True)
        L = small_block_factors(G, layout, damp, unique)[where]  # (n, B, B)
        E = torch.zeros(n, B, 1, dtype=torch.float64, device=G.device)
        E[torch.arange(n, device=G.device), idx[s : s + per] - bl * B, 0] = 1.0
        if entries_only:
            z = torch.linalg.solve_triangular(L, E, upper=False)
            out[s : s + n] = z.square().sum(dim=(1, 2))
        else:
            out[s : s + n] = torch.cholesky_solve(E, L)[..., 0]
    return out


def block_gram_diag(G: Tensor, layout: BlockLayout, T: Tensor) -> Tensor:
    """Squared column norms of ``T_b G_b`` per block (``T`` ``(nb, m, m)``): ``(d,)``.

    On the reference path the columns go in cache-sized chunks (``CACHE_ELEMENTS``): the
    reference materializes ``T_b G_b``, and at cache size that is ~4x faster than in one piece
    (measured at m=128, d=1e5 on the CPU).
    """
    m, d = G.shape
    out = torch.empty(d, dtype=T.dtype, device=G.device)
    triton = kernels.use_triton(G)
    if layout.single:
        w = d if triton else max(64, CACHE_ELEMENTS // max(m, 1))
        for s in range(0, d, w):
            out[s : s + w] = kernels.gram_diag(G[:, s : s + w], T, None)
        return out
    B = layout.block_size
    per = layout.num_blocks if triton else max(1, CACHE_ELEMENTS // max(m * B, 1))
    for b in range(0, layout.num_blocks, per):
        n = min(per, layout.num_blocks - b)
        sl = slice(b * B, min(d, (b + n) * B))
        out[sl] = kernels.gram_diag(G[:, sl], T[b : b + n], B)
    return out
