"""M-FAC over a sliding window of the last ``m`` gradients (for optimizers)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvopt import distributed as D

from . import _products as P
from ._cpu_step import UnitColumnSolver
from ._linalg import cholesky, replace_row_inverse, symmetric_matmul
from ._validation import (
    ACCUMULATE_DTYPES,
    STORAGE_DTYPES,
    check_damp,
    check_operand,
    check_positive_int,
    check_storage_dtype,
    conditioning_estimate,
    resolve_accumulate_dtype,
    warn_if_ill_conditioned,
)

NONFINITE_MODES = ("raise", "skip", "ignore")
#: Largest ``eps64 * cond(A) * R`` (upper estimates) at which steps use the explicit inverse.
EXPLICIT_INVERSE_LIMIT = 1e-4
#: Largest number of filled rows ``n`` at which a step factors ``A`` afresh (Cholesky and two
#: triangular solves) instead of updating ``A^{-1}`` by a rank-2 change: the cost model
#: ``a_f + b_f n^3`` against ``a_u + b_u n^2``, where the update's fixed cost ``a_u`` (about 25
#: small tensor calls) is five times the fresh factor's (about 5) and the cubic term wins past
#: the crossover. Measured per window step at d = 1e4 on the CPU (one thread): fresh faster by
#: 0.07 / 0.17 / 0.07 / 0.02 ms at n = 16 / 32 / 64 / 96, slower by 0.07 / 0.04 / 0.27 ms at
#: n = 128 / 192 / 256. The choice depends on ``n`` alone, so every rank of a sharded window
#: and a resumed run take the same path.
FRESH_FACTOR_MAX = 96


class SlidingWindowMFAC:
    """Inverse-curvature products for the empirical Fisher of the last ``m`` gradients.

    .. math::

        F = \\lambda I + \\tfrac{1}{m} G^\\top G,\\qquad
        F^{-1} x = \\lambda^{-1} x - \\lambda^{-2} G^\\top A^{-1} G x,\\qquad
        A = m I + K / \\lambda,\\ K = G G^\\top,

    where ``G`` ``(m, d)`` is a ring buffer of the last ``m`` gradients; ``m`` stays the window
    size while the buffer fills (empty rows are zero, so the first IHVP is ``x / lam``).

    Per step (``add_and_ihvp``) the cost is two passes over ``G`` (one computes ``G g`` and ``G x``
    together, one forms ``x / lam - G^T c``; for ``x = g``, the default, the push-through identity
    ``F^{-1} G^T = (m / lam) G^T A^{-1}`` makes them ``G g`` and ``(m / lam) G^T A^{-1} e_r``,
    with ``g`` in row ``r``: no pass over ``x`` and no cancellation) plus ``O(m^2)`` float64
    work: replacing one row of ``G`` changes one row and column of ``K``, a symmetric rank-2
    change of ``A``, and ``A^{-1}`` is updated by Woodbury's identity. Every ``refresh_every``
    insertions ``A^{-1}`` is recomputed from ``K`` by a Cholesky factorization (``O(m^3)``,
    amortized ``O(m^2)``); the relative difference between the updated and the fresh inverse is
    kept in :attr:`last_drift`.
    ``K`` itself never drifts: each of its rows is a fresh dot product.

    **Small windows** (at most ``FRESH_FACTOR_MAX`` = 96 rows filled): a step factors ``A``
    afresh and solves with the factor instead (``O(n^3)`` in a few calls, cheaper there than
    the ``O(n^2)`` update's many small ones, and backward stable, so such windows need no
    refinement and are accurate before their first refresh too). ``A^{-1}`` is then formed
    only when it is read (:attr:`Ainv`, :meth:`state_dict`, a refresh, a window grown past
    the limit), and :attr:`last_drift` is 0.

    **Nearly dependent gradients** (``d < m``, repeated gradients): ``cond(A)`` then grows like
    ``R = lambda_max(F)/damp`` and the explicit inverse loses about ``log10(R)`` more digits than
    a Cholesky solve. Each refresh estimates ``eps64 * cond(A) * R`` (:attr:`inverse_error`), and
    :meth:`check_conditioning` (called after refreshes with ``on_nonfinite="raise"``, one host
    synchronization) switches to **factored mode** above ``1e-4``: every insertion then
    refactors ``A`` (``O(m^3)``) and products solve with the factor, accurate to about
    ``eps64 * R`` like :class:`StaticMFAC`. Well-conditioned windows keep the ``O(m^2)`` path.
    The estimate is read at refreshes only: until the first refresh, and between refreshes of
    a window that was well conditioned at its last one, the explicit path is used.

    Memory: ``m * d * bytes(dtype)`` for ``G`` plus up to three ``m x m`` float64 matrices
    (:meth:`memory_bytes`).

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
            sharded, or None (one process). The ranks must agree on ``m``, ``damp``, the
            dtypes, ``refresh_every`` and ``refine``: checked here with one all-reduce of a few
            numbers (a ``ValueError`` on every rank otherwise).
        agree: Further numbers the ranks must agree on, checked in the same all-reduce (e.g.
            the total number of coordinates, which no rank's ``dim`` shows).

    Warns:
        RuntimeWarning: When ``R = lambda_max(F)/damp``, estimated from above by
            ``1 + ||K||_inf/(m damp)`` at each refresh (kept in :attr:`conditioning`, no host
            synchronization), reaches ``1/eps`` of the accumulation dtype: the Woodbury products
            then cancel to noise. Checked by :meth:`check_conditioning`, which ``add`` and
            ``add_and_ihvp`` call after a refresh with ``on_nonfinite="raise"`` (a mode that
            synchronizes anyway), and by :meth:`ihvp` with another ``damp``. ``damp`` so small
            that ``1/damp^2`` overflows float64 (below about 1e-154) raises ``ValueError``.

    Attributes:
        G: The ``(m, d)`` ring buffer.
        K: ``(m, m)`` float64 Gram matrix of the buffer.
        Ainv: ``(m, m)`` float64 inverse of ``A`` (formed from ``K`` when read after steps that
            solved with a fresh factor).
        count: Number of gradients added since construction or :meth:`reset`.
        last_finite: 0-dim bool tensor, whether the last gradient added with
            ``on_nonfinite="skip"`` was finite (and stored).
        nonfinite_count: 0-dim int64 tensor, gradients skipped as non-finite.
        last_drift: 0-dim float64 tensor, max-norm relative difference between the updated and
            the freshly computed ``A^{-1}`` at the last refresh (no host synchronization).
        conditioning: 0-dim float64 tensor, the upper estimate ``1 + ||K||_inf/(m damp)`` of
            ``lambda_max(F)/damp`` at the last refresh (1 before any).
        inverse_conditioning: 0-dim float64 tensor, ``(max_i L_ii / min_i L_ii)^2`` of the
            Cholesky factor of ``A`` at the last refresh, a lower estimate of ``cond(A)``.
        inverse_error: 0-dim float64 tensor, ``eps64 * cond(A) * R`` from upper estimates of
            both (``cond(A) <= m R ||A^{-1}||_inf``) at the last refresh: the relative error the
            explicit inverse may add.
        factored: Whether products solve with a fresh Cholesky factor of ``A`` (set by
            :meth:`check_conditioning`, kept in the state dict).

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
        agree: dict[str, float] | None = None,
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
        try:
            self.G = torch.zeros(self.m, self.dim, dtype=self.dtype, device=device)
        except (AssertionError, RuntimeError) as err:  # e.g. "Torch not compiled with CUDA"
            raise ValueError(
                f"SlidingWindowMFAC cannot allocate its buffer on device {str(device)!r} "
                f"({type(err).__name__}: {err}); pass a device this machine has, e.g. "
                "device='cpu' or the gradients' device"
            ) from None
        self.K = torch.zeros(self.m, self.m, dtype=torch.float64, device=device)
        # on the CPU the m x m bookkeeping of a step goes through NumPy views of K (see _insert)
        self._cpu = self.K.device.type == "cpu"
        self._Ainv = torch.eye(self.m, dtype=torch.float64, device=device) / self.m
        self._stale = False  # whether steps solved with fresh factors since _Ainv was exact
        self._eye: Tensor | None = None  # m I, for the fresh factors (at most 96 x 96)
        self._unit_solver: UnitColumnSolver | None = None  # the CPU step's m x m workspace
        self.last_drift = torch.zeros((), dtype=torch.float64, device=device)
        self.conditioning = torch.ones((), dtype=torch.float64, device=device)
        self.inverse_conditioning = torch.ones((), dtype=torch.float64, device=device)
        self.inverse_error = torch.zeros((), dtype=torch.float64, device=device)
        self.factored = False
        self._L: Tensor | None = None  # Cholesky factor of A, kept in factored mode only
        self.last_finite = torch.ones((), dtype=torch.bool, device=device)
        self.nonfinite_count = torch.zeros((), dtype=torch.long, device=device)
        self.count = 0
        self._since_refresh = 0
        if self.process_group is not None:  # one small all-reduce, here rather than 4 steps on
            codes = {t: i for i, t in enumerate((*STORAGE_DTYPES, *ACCUMULATE_DTYPES))}
            D.check_same_across_ranks(
                {
                    "m": self.m,
                    "damp": self._damp,
                    "dtype": codes[self.dtype],
                    "refresh_every": self.refresh_every,
                    "accumulate_dtype": codes[self._acc],
                    "refine": int(self.refine),
                    **(agree or {}),
                },
                self.process_group,
                "SlidingWindowMFAC",
                device,
            )

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

    @property
    def Ainv(self) -> Tensor:
        """``(m, m)`` float64 ``A^{-1}`` (formed from ``K`` if steps solved with fresh factors)."""
        self._form_inverse()
        return self._Ainv

    def _form_inverse(self) -> None:
        """Make ``A^{-1}`` exact for the current ``K`` if fresh-factor steps left it behind."""
        if self._stale:
            n = self.filled
            self._Ainv[:n, :n] = torch.cholesky_inverse(self._factor(n))
            self._stale = False

    def _fresh(self, n: int) -> bool:
        """Whether a step over ``n`` filled rows factors ``A`` afresh (see FRESH_FACTOR_MAX)."""
        return n <= FRESH_FACTOR_MAX and not self.factored

    def memory_bytes(self) -> int:
        """Bytes held: ``G``, ``K``, ``A^{-1}``, the factor and the fresh factors' workspaces.

        ``m d`` entries of ``G`` in its dtype, two float64 ``m x m`` (three when factored), and,
        once a step factored ``A`` afresh, a float64 ``m I`` of size ``s = min(m, 96)``; on the
        CPU, once such a step took its LAPACK path, that path's buffers too (two float64
        ``s x s``, a float64 and an accumulation-dtype ``s``-vector).
        """
        small = self.K.numel() + self._Ainv.numel() + (0 if self._L is None else self._L.numel())
        small += 0 if self._eye is None else self._eye.numel()
        solver = 0 if self._unit_solver is None else self._unit_solver.nbytes()
        return self.G.numel() * self.G.element_size() + small * 8 + solver

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the window (zero buffer, ``A^{-1} = I / m``)."""
        self.G.zero_()
        self.K.zero_()
        self._Ainv.copy_(torch.eye(self.m, dtype=torch.float64, device=self.device) / self.m)
        self._stale = False
        self.last_drift.zero_()
        self.conditioning.fill_(1.0)
        self.inverse_conditioning.fill_(1.0)
        self.inverse_error.zero_()
        self.factored = False
        self._L = None
        self.last_finite.fill_(True)
        self.nonfinite_count.zero_()
        self.count = 0
        self._since_refresh = 0

    def refresh(self) -> None:
        """Recompute ``A = L L^T`` and ``A^{-1}`` from ``K`` in float64 (no host synchronization).

        Records the drift of the updated inverse (:attr:`last_drift`; 0 after steps that solved
        with fresh factors), the estimates :attr:`conditioning`, :attr:`inverse_conditioning`
        and :attr:`inverse_error`, and keeps the factor ``L`` for the steps in factored mode.
        """
        self._refresh(None)

    def _refresh(self, L: Tensor | None) -> None:
        """:meth:`refresh`, with ``L`` the Cholesky factor of the current ``A`` if known."""
        n = self.filled
        self._since_refresh = 0
        if n == 0:
            return
        k_norm = self.K[:n, :n].abs().sum(-1).max()
        ratio = conditioning_estimate(k_norm, self.m, self._damp)
        self.conditioning.copy_(ratio)
        if L is None:
            L = cholesky(self.K[:n, :n], self.m, self._damp, check=False)
        if self._L is not None:
            self._L[:n, :n] = L
        diag = L.diagonal()
        self.inverse_conditioning.copy_((diag.max() / diag.min()).square())
        fresh = torch.cholesky_inverse(L)
        # cond(A) <= lambda_max(A) ||A^{-1}||_inf with lambda_max(A) = m R <= m * ratio
        cond_a = self.m * ratio * fresh.abs().sum(-1).max()
        self.inverse_error.copy_(torch.finfo(torch.float64).eps * cond_a * ratio)
        sub = self._Ainv[:n, :n]
        if self._stale:  # nothing was updated since A^{-1} was last exact
            self.last_drift.zero_()
        else:
            self.last_drift.copy_((sub - fresh).abs().max() / fresh.abs().max())
        sub.copy_(fresh)
        self._stale = False

    @property
    def refreshed(self) -> bool:
        """Whether the last insertion (or call of :meth:`refresh`) recomputed ``A^{-1}``."""
        return self._since_refresh == 0

    def check_conditioning(self) -> None:
        """Choose how steps solve with ``A``, and warn if the products lose every digit.

        One host synchronization; ``add``/``add_and_ihvp`` call it after each refresh with
        ``on_nonfinite="raise"`` (a mode that synchronizes anyway), and so does the
        :class:`~curvopt.optim.MFAC` optimizer with ``nonfinite="raise"``.

        * **Solve.** The explicit inverse of ``A`` (refined once) has a relative error of about
          ``eps64 R`` only while ``eps64 * cond(A) * R`` is small. When the window's gradients
          are (nearly) linearly dependent (``d < m``, repeated gradients), ``cond(A)`` grows like
          ``R`` instead of staying near ``cond(K)`` and the explicit inverse fails (relative error
          0.97 at ``R = 9e11``). If :attr:`inverse_error`, an upper estimate of
          ``eps64 * cond(A) * R``, exceeds ``EXPLICIT_INVERSE_LIMIT`` (1e-4), the window switches
          to **factored mode** (:attr:`factored`): each insertion recomputes the Cholesky factor
          of ``A`` from ``K`` (``O(m^3)``, like the published algorithm) and every product solves
          with it (backward stable, error about ``eps64 R`` like :class:`StaticMFAC`). It
          switches back at the first check below the limit.
        * **Warning.** :attr:`conditioning` ``R`` past ``1/eps`` of the accumulation dtype: the
          Woodbury form itself cancels to noise (``RuntimeWarning`` naming the estimate).
        """
        where = f"SlidingWindowMFAC(damp={self._damp:g})"
        ratio = float(self.conditioning)
        warn_if_ill_conditioned(ratio, self._acc, where)
        factored = self.filled > 0 and float(self.inverse_error) > EXPLICIT_INVERSE_LIMIT
        if factored and not self.refreshed:  # the factor must be the current one
            self.refresh()
            factored = float(self.inverse_error) > EXPLICIT_INVERSE_LIMIT
        self._set_factored(factored)

    def _set_factored(self, factored: bool) -> None:
        """Enter or leave factored mode; entering factors ``A`` from the current ``K``."""
        self.factored = factored
        if not factored:
            self._L = None
        elif self._L is None:  # bitwise the factor that refresh() computes from this K
            n = self.filled
            self._L = torch.zeros(self.m, self.m, dtype=torch.float64, device=self.device)
            self._L[:n, :n] = cholesky(self.K[:n, :n], self.m, self._damp, check=False)

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
            # redundant with count, so that a corrupted count is detected at load
            "position": self.count % self.m,
            "filled": self.filled,
            "G": self.G.clone(),
            "K": self.K.clone(),
            "Ainv": self.Ainv.clone(),
            "last_drift": self.last_drift.clone(),
            "conditioning": self.conditioning.clone(),
            "inverse_conditioning": self.inverse_conditioning.clone(),
            "inverse_error": self.inverse_error.clone(),
            "factored": self.factored,
            "last_finite": self.last_finite.clone(),
            "nonfinite_count": self.nonfinite_count.clone(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise if :meth:`load_state_dict` would fail on ``state``; change nothing.

        Checks the keys, ``dim``, ``m``, the storage dtype, the shapes of the tensors, the damping
        and the counters, so a caller can validate every part of a larger state before loading any.
        The buffers must be finite and consistent: ``K`` symmetric, rows of ``G`` and ``K`` past a
        count below ``m`` zero, ``since_refresh <= count`` and below ``refresh_every``, and the
        ring position and fill level that :meth:`state_dict` records beside ``count`` must agree
        with it (a count changed alone moves the row the next gradient replaces).

        Raises:
            TypeError: For entries of the wrong type or dtype.
            ValueError: For wrong shapes, values out of range, or inconsistent buffers.
        """
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
        shapes = {"G": (self.m, self.dim), "K": (self.m, self.m), "Ainv": (self.m, self.m)}
        shapes.update(last_drift=(), last_finite=(), nonfinite_count=())
        shapes.update(conditioning=(), inverse_conditioning=(), inverse_error=())
        for key, shape in shapes.items():
            if key in state and not (
                isinstance(state[key], Tensor) and tuple(state[key].shape) == shape
            ):
                got = getattr(state[key], "shape", type(state[key]).__name__)
                raise ValueError(f"state[{key!r}] must be a tensor of shape {shape}, got {got}")
        if state["G"].dtype != self.dtype:
            raise TypeError(
                f"state holds G in {state['G'].dtype} but this window stores {self.dtype}"
            )
        check_damp(state["damp"])
        refine = state.get("refine", self.refine)
        if not isinstance(refine, bool):
            raise TypeError(f"state['refine'] must be True or False, got {refine!r}")
        check_positive_int(state.get("refresh_every", self.refresh_every), "refresh_every")
        resolve_accumulate_dtype(state.get("accumulate_dtype"), self.dtype)
        for key in ("count", "since_refresh"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
        count, since = state["count"], state.get("since_refresh", 0)
        refresh_every = state.get("refresh_every", self.refresh_every)
        if since > count or since >= refresh_every:
            raise ValueError(
                f"state['since_refresh']={since} must be <= count={count} and < refresh_every="
                f"{refresh_every}: the saved counters are inconsistent"
            )
        for key, want in (("position", count % self.m), ("filled", min(count, self.m))):
            if key in state and state[key] != want:
                raise ValueError(
                    f"state[{key!r}]={state[key]!r} does not match count={count} (expected "
                    f"{want}): the saved counters are corrupted"
                )
        for key in ("G", "K", "Ainv"):
            if not bool(torch.isfinite(state[key]).all()):
                raise ValueError(
                    f"state[{key!r}] contains NaN or Inf: the saved window is corrupted"
                )
        K, G = state["K"], state["G"]
        if not torch.equal(K, K.T):
            raise ValueError("state['K'] (the Gram matrix G G^T) must be symmetric")
        if count < self.m and (bool(G[count:].any()) or bool(K[count:].any())):
            raise ValueError(
                f"state['count']={count} but rows of G or K past row {count} are not zero: the "
                "saved count does not match the buffer"
            )
        factored = state.get("factored", False)
        if not isinstance(factored, bool):
            raise TypeError(f"state['factored'] must be True or False, got {factored!r}")
        if factored and state.get("since_refresh", 0) != 0:
            raise ValueError("state['factored'] is True but the state was not just refreshed")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same ``dim``, ``m``, dtype); on error nothing changes."""
        self.check_state(state)
        self._damp = float(state["damp"])
        self.refresh_every = int(state.get("refresh_every", self.refresh_every))
        self._acc = resolve_accumulate_dtype(state.get("accumulate_dtype"), self.dtype)
        self.refine = bool(state.get("refine", self.refine))
        self.count = int(state["count"])
        self._since_refresh = int(state.get("since_refresh", 0))
        self.G.copy_(state["G"])
        self.K.copy_(state["K"])
        self._Ainv.copy_(state["Ainv"])
        self._stale = False
        optional = ("last_drift", "last_finite", "nonfinite_count", "conditioning")
        for key in (*optional, "inverse_conditioning", "inverse_error"):
            if key in state:
                getattr(self, key).copy_(state[key])
        self._set_factored(False)
        self._set_factored(bool(state.get("factored", False)))  # factors the loaded K

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
        stored = g if g.dtype == self.dtype and not g.requires_grad else g.detach().to(self.dtype)
        group = self.process_group
        if on_nonfinite == "ignore":
            return stored
        if self._is_next_row(stored):
            raise ValueError(
                "g was written into next_row(), which already replaced the oldest gradient, so a "
                f"non-finite g cannot be refused with on_nonfinite={on_nonfinite!r}; check g "
                "before writing it there and add it with on_nonfinite='ignore'"
            )
        # One reduction: the sum is NaN or Inf iff g holds a NaN or Inf, or entries so large
        # (some above max / d) that their squares overflow the accumulation dtype, and K too.
        total = stored.sum(dtype=self._acc)
        if on_nonfinite == "raise":
            if group is None:
                bad = not math.isfinite(float(total))
            else:
                bad = bool(D.all_reduce_any(~torch.isfinite(total), group))
            if bad:
                raise ValueError(
                    f"g contains NaN or Inf values (after conversion to {self.dtype}), or its sum "
                    f"overflows {self._acc}; the window was left unchanged"
                )
        else:  # "skip": no host synchronization, mask the write instead
            ok = ~D.all_reduce_any(~torch.isfinite(total), group)
            self.last_finite.copy_(ok)
            self.nonfinite_count.add_((~ok).long())
            stored = torch.where(ok, stored, self.G[self.count % self.m])
        return stored

    def _insert(
        self,
        g: Tensor,
        X: Tensor | None,
        on_nonfinite: str,
        x_is_g: bool = False,
        plain: bool = False,
    ) -> Tensor | None:
        """Write ``g`` into the ring and update ``K`` and the solve with ``A``.

        Returns ``A^{-1} G X`` (``None`` without ``X``). With ``x_is_g`` (``x`` is ``g`` exactly
        as stored, now row ``r`` of ``G``) it returns ``m A^{-1} e_r`` instead: by the
        push-through identity ``F^{-1} G^T = (m / lam) G^T A^{-1}``, so
        ``F^{-1} g = G^T (m A^{-1} e_r) / lam`` needs no ``G x`` (the one pass over ``G`` computes
        only the new row of ``K``) and, unlike ``x / lam - G^T c / lam^2``, cancels nothing.
        With ``plain`` (:func:`~curvopt.mfac._products.plain`) that pass is one ``torch.mv``;
        on the CPU, with ``x_is_g`` and ``plain``, a step that factors ``A`` afresh returns the
        final ``(n,)`` vector ``c = m A^{-1} e_r / lam`` of :class:`UnitColumnSolver` instead,
        so that the step is ``G^T c``.
        """
        stored = self._stored(g, on_nonfinite)
        r = self.count % self.m
        n = max(self.filled, r + 1)
        fresh = self._fresh(n)
        if not fresh:
            self._form_inverse()  # from the old K, if fresh-factor steps left it behind
        if not self._is_next_row(stored):  # else g was written into next_row() already
            self.G[r].copy_(stored)
        full = n == self.m  # no slicing: each view is one more call
        Gn = self.G if full else self.G[:n]
        one = X is None or x_is_g
        if one and plain:  # one pass: G g
            prods = torch.mv(Gn, stored)
        elif one:
            prods = P.dots(Gn, stored[:, None], self._acc)
        else:  # one pass: G g and G x, both in the wider dtype so that neither loses bits
            # before the products; built as contiguous (k + 1, d) rows (the skinny layout)
            wide = torch.promote_types(stored.dtype, X.dtype)
            V = torch.cat([stored[None].to(wide), X.T.to(wide)], 0).T
            prods = P.dots(Gn, V, self._acc)
        if self.process_group is not None:  # every coordinate sum, one all-reduce, in float64
            prods = D.all_reduce_sum_(prods.to(torch.float64), self.process_group)
        k_new = prods if prods.ndim == 1 else prods[:, 0]
        if self._cpu:  # through NumPy views: two ~1 us calls instead of two ~10 us tensor calls
            K_np, k_np = self.K.numpy(), k_new.numpy()
            K_np[r, :n] = k_np
            K_np[:n, r] = k_np
        elif full:
            self.K[r] = k_new
            self.K[:, r] = k_new
        else:
            self.K[r, :n] = k_new
            self.K[:n, r] = k_new
        self.count += 1
        self._since_refresh += 1
        due = self._since_refresh >= self.refresh_every
        rhs = None if X is None or x_is_g else prods[:, 1:].to(torch.float64)
        if fresh and x_is_g and plain and not due and self._cpu:  # the usual CPU step: LAPACK
            self._stale = True
            lam = self._damp
            if self._unit_solver is None:
                size = min(self.m, FRESH_FACTOR_MAX)
                self._unit_solver = UnitColumnSolver(self.m, size, self._acc)
            c = self._unit_solver(K_np[:n, :n], lam, r, self.m / lam)
            if c is not None:  # c = m A^{-1} e_r / lam: the step is G^T c (_finish)
                return c
        if fresh:  # factor A afresh: cheaper than the update's many small calls at small n
            L = self._factor(n)
            self._stale = True
            if due:
                self._refresh(L)
                if on_nonfinite == "raise":
                    self.check_conditioning()
            if x_is_g:
                rhs = self._scaled_eye(n)[:, r : r + 1]  # m e_r
            return None if rhs is None else torch.cholesky_solve(rhs, L)
        sub = self._Ainv[:n, :n]
        k_row = self.K[r, :n]
        lam = self._damp
        coef = replace_row_inverse(sub, r, k_row / lam, self.m + k_row[r] / lam, rhs)
        if x_is_g:  # m A^{-1} e_r is a column of the updated inverse
            coef = sub[:, r : r + 1] * float(self.m)
            if due or self.factored or self.refine:
                rhs = torch.zeros(n, 1, dtype=torch.float64, device=self.device)
                rhs[r] = float(self.m)
        if self.factored or due:
            self.refresh()
            if on_nonfinite == "raise":
                self.check_conditioning()
            coef = None if rhs is None else self._solve(rhs, n)
        elif rhs is not None and self.refine:
            coef = self._refine(coef, rhs, n)
        return coef

    def _scaled_eye(self, n: int) -> Tensor:
        """``m I`` of size ``n`` (a buffer kept for the fresh factors, or a view of it)."""
        if self._eye is None or self._eye.shape[0] < n:
            size = max(n, min(self.m, FRESH_FACTOR_MAX))
            self._eye = torch.eye(size, dtype=torch.float64, device=self.device).mul_(self.m)
        return self._eye if self._eye.shape[0] == n else self._eye[:n, :n]

    def _factor(self, n: int) -> Tensor:
        """Lower Cholesky factor of ``A = m I + K / lam`` over the first ``n`` rows (two calls)."""
        K = self.K if n == self.m else self.K[:n, :n]
        A = torch.add(self._scaled_eye(n), K, alpha=1.0 / self._damp)
        return torch.linalg.cholesky_ex(A)[0]

    def _solve(self, rhs: Tensor, n: int) -> Tensor:
        """``A^{-1} rhs`` for the first ``n`` rows.

        From the factor in factored mode, a fresh factor for ``n`` at most ``FRESH_FACTOR_MAX``,
        else the explicit inverse (refined).
        """
        if self._L is not None:  # factored mode
            return torch.cholesky_solve(rhs, self._L[:n, :n])
        if self._fresh(n):
            return torch.cholesky_solve(rhs, self._factor(n))
        coef = symmetric_matmul(self.Ainv[:n, :n], rhs)
        return self._refine(coef, rhs, n) if self.refine else coef

    def _refine(self, coef: Tensor, rhs: Tensor, n: int) -> Tensor:
        """One step of iterative refinement of ``coef ~ A^{-1} rhs`` with the exact ``A``.

        An explicit inverse has errors of size ``eps ||A^{-1}||`` in every direction, which
        swamps the small components along the large eigenvalues of ``K`` that the IHVP needs;
        the correction ``coef + A^{-1} (rhs - A coef)`` brings it to the accuracy of a
        backward-stable solve. Cost: two more ``O(n^2)`` matrix-vector products.
        """
        A_coef = symmetric_matmul(self.K[:n, :n], coef).div_(self._damp).add_(coef, alpha=self.m)
        return coef.add_(symmetric_matmul(self.Ainv[:n, :n], rhs - A_coef))

    def next_row(self) -> Tensor:
        """The ``(d,)`` row of ``G`` that the next added gradient will occupy (a view).

        A caller that produces the gradient anyway (a concatenation, a scaling) can write it
        here with ``out=`` and then pass this very view to :meth:`add` or :meth:`add_and_ihvp`:
        the step then does not copy ``g`` into the window, one pass over ``d`` numbers fewer
        (the :class:`~curvopt.optim.MFAC` optimizer does this). Writing here replaces the
        oldest gradient at once, while ``K`` still describes it: add the row right after
        writing it, with ``on_nonfinite="ignore"`` (check it for NaN/Inf before writing; the
        other modes refuse a row written here, since they could not leave the window
        unchanged).

        Example:
            >>> window = SlidingWindowMFAC(dim=6, m=2, damp=1e-2)
            >>> g = torch.randn(6)
            >>> row = torch.mul(g, 0.5, out=window.next_row())
            >>> step = window.add_and_ihvp(row, on_nonfinite="ignore")
            >>> torch.equal(window.G[0], 0.5 * g)
            True
        """
        return self.G[self.count % self.m]

    def _is_next_row(self, t: Tensor) -> bool:
        """Whether ``t`` (``(d,)``, the window's dtype) is the memory of :meth:`next_row`."""
        G = self.G
        row = G.data_ptr() + (self.count % self.m) * G.stride(0) * G.element_size()
        return t.data_ptr() == row and self.dim > 0 and (self.dim == 1 or t.stride(0) == 1)

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
        self._insert(g, None, on_nonfinite, plain=P.plain(self.G, self._acc))

    def _finish(
        self,
        x: Tensor,
        X: Tensor | None,
        coef: Tensor,
        n: int,
        lam: float,
        unit: bool = False,
        plain: bool = False,
    ) -> Tensor:
        """``X / lam - G^T coef / lam^2`` shaped like ``x``.

        With ``unit`` (``x`` is the stored gradient, ``coef = m A^{-1} e_r`` as an ``(n, 1)``
        float64 tensor, or already ``c = m A^{-1} e_r / lam`` as an ``(n,)`` vector in the
        accumulation dtype; see :meth:`_insert`) it is ``G^T c``: with ``plain`` one
        ``torch.mv`` that reads no ``x``, else the fused ``0 x + G^T c``.
        """
        Gn = self.G if n == self.m else self.G[:n]
        if not unit:
            C = coef.mul_(-1.0 / lam**2).to(self._acc).contiguous()
            Y = P.combine(1.0 / lam, X, Gn, C)
            return Y if x.ndim == 2 else Y[:, 0]
        # an (n,) vector is c already: the CPU step's LAPACK path (see _insert)
        c = coef if coef.ndim == 1 else coef[:, 0].mul_(1.0 / lam).to(self._acc)
        if plain:
            return torch.mv(Gn.T, c)
        return P.combine(0.0, x, Gn, c)

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
        # x is then row r of G: F^{-1} x = G^T (m A^{-1} e_r) / lam (not when "skip" may mask
        # the row); g itself is checked when it is stored
        x_is_g = (
            (x is None or x is g)
            and isinstance(g, Tensor)
            and g.dtype == self.dtype
            and on_nonfinite != "skip"
        )
        if x is None:
            x = g
        X = None if x_is_g else check_operand(x, self.dim, self.device)
        plain = P.plain(self.G, self._acc)
        coef = self._insert(g, X, on_nonfinite, x_is_g, plain)
        return self._finish(x, X, coef, self.filled, self._damp, x_is_g, plain)

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
            coef = self._solve(dots, n)
        else:
            k_norm = float(self.K[:n, :n].abs().sum(-1).max())
            ratio = conditioning_estimate(k_norm, self.m, lam)
            warn_if_ill_conditioned(ratio, self._acc, f"SlidingWindowMFAC.ihvp(damp={lam:g})")
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
