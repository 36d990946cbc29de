"""M-FAC over a sliding window of the last ``m`` gradients (for optimizers)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvopt import distributed as D

from . import _products as P
from ._linalg import cholesky, replace_row_inverse, symmetric_matmul
from ._validation import (
    check_damp,
    check_operand,
    check_positive_int,
    check_storage_dtype,
    finite_flag,
    resolve_accumulate_dtype,
)

NONFINITE_MODES = ("raise", "skip", "ignore")


class SlidingWindowMFAC:
    """Inverse-curvature products for the empirical Fisher of the last ``m`` gradients.

    .. math::

        F = \\lambda I + \\tfrac{1}{m} G^\\top G,\\qquad
        F^{-1} x = \\lambda^{-1} x - \\lambda^{-2} G^\\top A^{-1} G x,\\qquad
        A = m I + K / \\lambda,\\ K = G G^\\top,

    where ``G`` ``(m, d)`` is a ring buffer of the last ``m`` gradients; ``m`` stays the window
    size while the buffer fills (empty rows are zero, so the first IHVP is ``x / lam``).

    Per step (``add_and_ihvp``) the cost is two passes over ``G`` (one computes ``G g`` and ``G x``
    together, one forms ``x / lam - G^T c``) plus ``O(m^2)`` float64 work: replacing one row of
    ``G`` changes one row and column of ``K``, a symmetric rank-2 change of ``A``, and ``A^{-1}``
    is updated by Woodbury's identity. Every ``refresh_every`` insertions ``A^{-1}`` is recomputed
    from ``K`` by a Cholesky factorization (``O(m^3)``, amortized ``O(m^2)``); the relative
    difference between the updated and the fresh inverse is kept in :attr:`last_drift`.
    ``K`` itself never drifts: each of its rows is a fresh dot product.

    Memory: ``m * d * bytes(dtype)`` for ``G`` plus two ``m x m`` float64 matrices.

    **Sharded over ranks** (``process_group`` given): ``dim`` is the number of coordinates of this
    rank's shard (0 allowed) and ``G`` holds only those columns. The coordinate sums of a call
    (``G g`` and ``G x`` of one insertion, ``G x`` of :meth:`ihvp` / :meth:`mul`) are all-reduced
    together, one all-reduce of ``m (k + 1)`` float64 numbers; the ``m x m`` algebra then runs on
    identical numbers on every rank, so ``K`` and ``A^{-1}`` stay bit-identical. Every method takes
    and returns this rank's coordinates and must be called by all ranks together. The
    non-finite check of :meth:`add` is agreed over the ranks (one more all-reduce of one number):
    a NaN on any rank raises, or skips, on all of them.

    Args:
        dim: Number of coordinates ``d``.
        m: Window size (any ``m >= 1``).
        damp: Damping ``lam > 0``.
        device: Device of the buffer.
        dtype: Storage dtype of ``G``: float32, bfloat16, float16 or float64. Gradients of other
            floating dtypes are converted when added.
        refresh_every: Insertions between full refreshes of ``A^{-1}`` (default ``m``).
        accumulate_dtype: Dtype of the products over ``G`` (default float64 for float64
            storage, float32 otherwise); float64 removes most cancellation at small ``damp``.
        refine: Apply one step of iterative refinement to ``A^{-1} (G x)`` (two more
            ``O(m^2)`` products). The explicit inverse alone has relative error about
            ``eps64 * R^2`` with ``R = lambda_max(F) / damp``; refined, about ``eps64 * R``, as a
            Cholesky solve. Default: on with float64 accumulation, off with float32 (whose own
            error, about ``eps32 * R``, dominates while ``R < 1e8``).
        process_group: A ``torch.distributed`` process group over which the coordinates are
            sharded, or None (one process).

    Attributes:
        G: The ``(m, d)`` ring buffer.
        K: ``(m, m)`` float64 Gram matrix of the buffer.
        Ainv: ``(m, m)`` float64 inverse of ``A``.
        count: Number of gradients added since construction or :meth:`reset`.
        last_finite: 0-dim bool tensor, whether the last gradient added with
            ``on_nonfinite="skip"`` was finite (and stored).
        nonfinite_count: 0-dim int64 tensor, gradients skipped as non-finite.
        last_drift: 0-dim float64 tensor, max-norm relative difference between the updated and
            the freshly computed ``A^{-1}`` at the last refresh (no host synchronization).

    Example:
        >>> window = SlidingWindowMFAC(dim=10, m=4, damp=1e-3)
        >>> step = window.add_and_ihvp(torch.randn(10))  # F^{-1} g with g added first
        >>> step.shape
        torch.Size([10])
    """

    def __init__(
        self,
        dim: int,
        m: int,
        damp: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        refresh_every: int | None = None,
        accumulate_dtype: torch.dtype | None = None,
        refine: bool | None = None,
        process_group: object = None,
    ):
        """Allocate an empty window."""
        self.process_group = D.check_process_group(process_group)
        if self.process_group is not None and isinstance(dim, int) and dim == 0:
            self.dim = 0  # a rank may hold no coordinates
        else:
            self.dim = check_positive_int(dim, "dim")
        self.m = check_positive_int(m, "m")
        self._damp = check_damp(damp)
        self.dtype = check_storage_dtype(dtype)
        self.refresh_every = (
            self.m if refresh_every is None else check_positive_int(refresh_every, "refresh_every")
        )
        self._acc = resolve_accumulate_dtype(accumulate_dtype, self.dtype)
        if refine is not None and not isinstance(refine, bool):
            raise TypeError(f"refine must be True, False or None, got {type(refine).__name__}")
        self.refine = (self._acc == torch.float64) if refine is None else refine
        device = torch.device("cpu") if device is None else torch.device(device)
        self.G = torch.zeros(self.m, self.dim, dtype=self.dtype, device=device)
        self.K = torch.zeros(self.m, self.m, dtype=torch.float64, device=device)
        self.Ainv = torch.eye(self.m, dtype=torch.float64, device=device) / self.m
        self.last_drift = torch.zeros((), dtype=torch.float64, device=device)
        self.last_finite = torch.ones((), dtype=torch.bool, device=device)
        self.nonfinite_count = torch.zeros((), dtype=torch.long, device=device)
        self.count = 0
        self._since_refresh = 0

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Device of the buffer."""
        return self.G.device

    @property
    def damp(self) -> float:
        """The damping ``lam``; setting it recomputes ``A^{-1}`` (``O(m^3)``)."""
        return self._damp

    @damp.setter
    def damp(self, value: float) -> None:
        self._damp = check_damp(value)
        self.refresh()

    @property
    def filled(self) -> int:
        """Number of rows of ``G`` that hold gradients (``min(count, m)``)."""
        return min(self.count, self.m)

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """Dtype of the products over ``G``."""
        return self._acc

    def memory_bytes(self) -> int:
        """Bytes held: ``m d`` for ``G`` in its dtype plus two float64 ``m x m`` matrices."""
        return self.G.numel() * self.G.element_size() + (self.K.numel() + self.Ainv.numel()) * 8

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the window (zero buffer, ``A^{-1} = I / m``)."""
        self.G.zero_()
        self.K.zero_()
        self.Ainv.copy_(torch.eye(self.m, dtype=torch.float64, device=self.device) / self.m)
        self.last_drift.zero_()
        self.last_finite.fill_(True)
        self.nonfinite_count.zero_()
        self.count = 0
        self._since_refresh = 0

    def refresh(self) -> None:
        """Recompute ``A^{-1}`` from ``K`` in float64 and record the drift of the updated one."""
        n = self.filled
        self._since_refresh = 0
        if n == 0:
            return
        L = cholesky(self.K[:n, :n], self.m, self._damp, check=False)
        fresh = torch.cholesky_inverse(L)
        sub = self.Ainv[:n, :n]
        drift = (sub - fresh).abs().max() / fresh.abs().max()
        self.last_drift.copy_(drift)
        sub.copy_(fresh)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: buffer, Gram, inverse, counters, settings."""
        return {
            "dim": self.dim,
            "m": self.m,
            "damp": self._damp,
            "dtype": self.dtype,
            "refresh_every": self.refresh_every,
            "accumulate_dtype": self._acc,
            "refine": self.refine,
            "count": self.count,
            "since_refresh": self._since_refresh,
            "G": self.G.clone(),
            "K": self.K.clone(),
            "Ainv": self.Ainv.clone(),
            "last_drift": self.last_drift.clone(),
            "last_finite": self.last_finite.clone(),
            "nonfinite_count": self.nonfinite_count.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the window must have the same ``dim``, ``m`` and dtype)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"dim", "m", "damp", "count", "G", "K", "Ainv"} - set(state)
        if missing:
            raise ValueError(f"state is missing the keys {sorted(missing)}")
        if state["dim"] != self.dim or state["m"] != self.m:
            raise ValueError(
                f"state is for dim={state['dim']}, m={state['m']} but this window has "
                f"dim={self.dim}, m={self.m}"
            )
        if state["G"].dtype != self.dtype:
            raise TypeError(
                f"state holds G in {state['G'].dtype} but this window stores {self.dtype}"
            )
        self._damp = check_damp(state["damp"])
        self.refresh_every = check_positive_int(
            state.get("refresh_every", self.refresh_every), "refresh_every"
        )
        self._acc = resolve_accumulate_dtype(state.get("accumulate_dtype"), self.dtype)
        self.refine = bool(state.get("refine", self.refine))
        self.count = int(state["count"])
        self._since_refresh = int(state.get("since_refresh", 0))
        self.G.copy_(state["G"])
        self.K.copy_(state["K"])
        self.Ainv.copy_(state["Ainv"])
        for key in ("last_drift", "last_finite", "nonfinite_count"):
            if key in state:
                getattr(self, key).copy_(state[key])

    # ------------------------------------------------------------------ updates
    def _stored(self, g: Tensor, on_nonfinite: str) -> Tensor:
        """Validate ``g`` and return it converted to the storage dtype (masked in "skip" mode)."""
        if not isinstance(g, Tensor):
            raise TypeError(f"g must be a torch.Tensor, got {type(g).__name__}")
        if not g.is_floating_point():
            raise TypeError(
                f"g must be a floating-point tensor, got {g.dtype}; convert it with .float()"
            )
        if g.shape != (self.dim,):
            raise ValueError(f"g must have shape ({self.dim},), got {tuple(g.shape)}")
        if g.device != self.device:
            raise ValueError(
                f"g is on {g.device} but the window is on {self.device}; move it with .to()"
            )
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
        stored = g.detach().to(self.dtype)
        group = self.process_group
        if on_nonfinite == "raise":
            if bool(D.all_reduce_any(~finite_flag(stored), group)):
                raise ValueError(
                    f"g contains NaN or Inf values (after conversion to {self.dtype}); "
                    "the window was left unchanged"
                )
        elif on_nonfinite == "skip":  # no host synchronization: mask the write instead
            ok = ~D.all_reduce_any(~finite_flag(stored), group)
            self.last_finite.copy_(ok)
            self.nonfinite_count.add_((~ok).long())
            stored = torch.where(ok, stored, self.G[self.count % self.m])
        return stored

    def _insert(
        self, g: Tensor, X: Tensor | None, on_nonfinite: str, x_is_g: bool = False
    ) -> Tensor | None:
        """Write ``g`` into the ring, update ``K``, ``A^{-1}``; return ``A^{-1} G X`` if asked.

        With ``x_is_g`` (``X`` is ``g`` exactly as stored), ``G x`` is the new row of ``K``: one
        matrix-vector product over ``G`` serves both.
        """
        stored = self._stored(g, on_nonfinite)
        r = self.count % self.m
        n = max(self.filled, r + 1)
        self.G[r].copy_(stored)
        Gn = self.G[:n]
        if X is None or x_is_g:
            V = stored[:, None]
        else:  # both in the wider dtype, so neither g nor x loses bits before the products;
            # built as contiguous (k + 1, d) rows, the layout the skinny product wants
            wide = torch.promote_types(stored.dtype, X.dtype)
            V = torch.cat([stored[None].to(wide), X.T.to(wide)], 0).T
        prods = P.dots(Gn, V, self._acc).to(torch.float64)  # one pass: G g and G x
        D.all_reduce_sum_(prods, self.process_group)  # every coordinate sum, one all-reduce
        k_new = prods[:, 0]
        self.K[r, :n] = k_new
        self.K[:n, r] = k_new
        self.count += 1
        self._since_refresh += 1
        sub = self.Ainv[:n, :n]
        rhs = None if X is None else (prods[:, :1] if x_is_g else prods[:, 1:])
        lam = self._damp
        coef = replace_row_inverse(sub, r, k_new / lam, self.m + k_new[r] / lam, rhs)
        if self._since_refresh >= self.refresh_every:
            self.refresh()
            coef = None if rhs is None else symmetric_matmul(sub, rhs)
        if rhs is None or not self.refine:
            return coef
        return self._refine(coef, rhs, n)

    def _refine(self, coef: Tensor, rhs: Tensor, n: int) -> Tensor:
        """One step of iterative refinement of ``coef ~ A^{-1} rhs`` with the exact ``A``.

        An explicit inverse has errors of size ``eps ||A^{-1}||`` in every direction, which
        swamps the small components along the large eigenvalues of ``K`` that the IHVP needs;
        the correction ``coef + A^{-1} (rhs - A coef)`` brings it to the accuracy of a
        backward-stable solve. Cost: two more ``O(n^2)`` matrix-vector products.
        """
        A_coef = symmetric_matmul(self.K[:n, :n], coef).div_(self._damp).add_(coef, alpha=self.m)
        return coef.add_(symmetric_matmul(self.Ainv[:n, :n], rhs - A_coef))

    def add(self, g: Tensor, *, on_nonfinite: str = "raise") -> None:
        """Add a gradient (replacing the oldest one once the window is full).

        Args:
            g: ``(d,)`` floating tensor on the window's device (converted to the storage dtype).
            on_nonfinite: What to do with NaN/Inf in ``g`` (after conversion to the storage
                dtype):

                * ``"raise"`` (default): raise ``ValueError`` and leave the window unchanged.
                  Costs one host synchronization per call.
                * ``"skip"``: no synchronization. A non-finite ``g`` is not stored: its slot
                  keeps the gradient it held (an old one, now counted as the newest), the
                  counters advance, :attr:`last_finite` (0-dim bool tensor) says whether ``g``
                  was stored and :attr:`nonfinite_count` counts the skipped gradients. Callers
                  mask their own update with ``last_finite`` (``torch.where``).
                * ``"ignore"``: no check; a non-finite ``g`` corrupts the window until
                  :meth:`reset` (for callers that validated ``g`` already).
        """
        self._insert(g, None, on_nonfinite)

    def _finish(self, x: Tensor, X: Tensor, coef: Tensor, n: int, lam: float) -> Tensor:
        """``X / lam - G^T coef / lam^2`` shaped like ``x``."""
        C = coef.mul_(-1.0 / lam**2).to(self._acc).contiguous()
        Y = P.combine(1.0 / lam, X, self.G[:n], C)
        return Y if x.ndim == 2 else Y[:, 0]

    def add_and_ihvp(
        self, g: Tensor, x: Tensor | None = None, *, on_nonfinite: str = "raise"
    ) -> Tensor:
        """Add ``g``, then return ``F^{-1} x`` for the updated window (``x`` defaults to ``g``).

        Two passes over ``G`` in all: ``G g`` and ``G x`` share one.

        Args:
            g: ``(d,)`` gradient to add.
            x: ``(d,)`` or ``(d, k)`` operand; default ``g``.
            on_nonfinite: See :meth:`add`. With ``"skip"`` the product is still taken with ``x``
                as given (NaN in, NaN out).

        Returns:
            ``F^{-1} x`` shaped and typed like ``x``.
        """
        # G x is the new row of K when x is g as stored (not when "skip" may mask the row)
        x_is_g = (x is None or x is g) and g.dtype == self.dtype and on_nonfinite != "skip"
        if x is None:
            x = g
        X = check_operand(x, self.dim, self.device)
        coef = self._insert(g, X, on_nonfinite, x_is_g)
        return self._finish(x, X, coef, self.filled, self._damp)

    def ihvp(self, x: Tensor, damp: float | None = None) -> Tensor:
        """``F^{-1} x`` for the current window.

        Args:
            x: ``(d,)`` vector or ``(d, k)`` matrix.
            damp: Damping for this call only; a value other than ``self.damp`` costs one
                ``m x m`` Cholesky factorization.

        Returns:
            ``F^{-1} x`` shaped and typed like ``x``.
        """
        X = check_operand(x, self.dim, self.device)
        lam = self._damp if damp is None else check_damp(damp)
        n = self.filled
        if n == 0:
            return x / lam
        dots = P.dots(self.G[:n], X, self._acc).to(torch.float64)
        D.all_reduce_sum_(dots, self.process_group)
        if lam == self._damp:
            coef = symmetric_matmul(self.Ainv[:n, :n], dots)
            if self.refine:
                coef = self._refine(coef, dots, n)
        else:
            coef = torch.cholesky_solve(dots, cholesky(self.K[:n, :n], self.m, lam))
        return self._finish(x, X, coef, n, lam)

    def inverse_diagonal(self) -> Tensor:
        """Diagonal of ``F^{-1}`` for the current window, ``(d,)`` in the accumulation dtype.

        ``[F^{-1}]_jj = 1/lam - ||L^{-1} G e_j||^2 / lam^2`` with a fresh Cholesky factor
        ``A = L L^T`` (``O(m^3 + m^2 d)``; for diagnostics and pruning-style scores, not per step).
        """
        n, lam = self.filled, self._damp
        if n == 0:
            return torch.full((self.dim,), 1.0 / lam, dtype=self._acc, device=self.device)
        L = cholesky(self.K[:n, :n], self.m, lam)
        eye = torch.eye(n, dtype=torch.float64, device=self.device)
        T = torch.linalg.solve_triangular(L, eye, upper=False)[None].to(self._acc)
        s = P.block_gram_diag(self.G[:n], P.BlockLayout(self.dim, None), T)
        return (1.0 / lam) - s / lam**2

    def mul(self, x: Tensor) -> Tensor:
        """Curvature products ``F x = lam x + G^T (G x) / m``, shaped like ``x``."""
        X = check_operand(x, self.dim, self.device)
        dots = D.all_reduce_sum_(P.dots(self.G, X, self._acc), self.process_group)
        Y = P.combine(self._damp, X, self.G, dots / self.m)
        return Y if x.ndim == 2 else Y[:, 0]
