r"""Regularized Newton with an adaptive radius from gradient-normalized smoothness (GNS).

Semenov, Jaggi, Doikov, "Gradient-Normalized Smoothness for Optimization with Approximate
Hessians" (ICLR 2026). One outer step from ``x`` with gradient ``g`` and a PSD curvature ``H``
(exact Hessian or an approximation) runs trials ``t = 0, 1, ...``:

.. math::
    \lambda = \|g\| / \gamma, \qquad (H + \lambda I)\,\Delta = -g, \qquad x^+ = x + \Delta,

and accepts ``x+`` when

.. math::
    f(x) - f(x^+) \ge \frac{\|\nabla f(x^+)\|^2}{8 \lambda},

after which ``gamma <- max(2 gamma, gamma_min)``. A rejected trial halves ``gamma`` and solves
again with the same ``H``. Since ``||Delta|| <= ||g|| / lambda = gamma`` for PSD ``H``, ``gamma`` is
the radius of the step. The metric is the Euclidean one (``B = I`` in the paper's notation).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from curvopt.optim._copying import WholeCopyOptimizer
from curvopt.optim._state_checks import GROUP_SIZES_KEY, check_optimizer_state, group_sizes
from curvopt.optim.linear_solve import conjugate_gradient, damped_cholesky_solve
from curvopt.utils.params import flat_grad, flatten, unflatten

_OPERATOR_CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")
_CURVATURES = (*_OPERATOR_CURVATURES, "mfac")
_STATE_KEY = "gns"


def _has_matmul(obj: Any) -> bool:
    return isinstance(obj, Tensor) or hasattr(type(obj), "__matmul__")


def _operator_class(name: str):
    from curvopt import curvature

    classes = {
        "hessian": curvature.HessianOperator,
        "ggn": curvature.GGNOperator,
        "fisher": curvature.FisherOperator,
        "empirical_fisher": curvature.EmpiricalFisherOperator,
    }
    return classes[name]


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a hyperparameter of a GNSNewton group out of range.

    The constructor's rules, applied by the constructor and by :meth:`GNSNewton.load_state_dict`
    to the saved group (a state with ``max_trials=0`` is refused as the constructor refuses it).
    """
    gamma0, gamma_min, max_trials = group["gamma0"], group["gamma_min"], group["max_trials"]
    dense_threshold, cg_rtol, cg_maxiter = (
        group["dense_threshold"],
        group["cg_rtol"],
        group["cg_maxiter"],
    )
    jacobi_probes, mfac_m, mfac_damp = group["jacobi_probes"], group["mfac_m"], group["mfac_damp"]
    grad_tol, on_exhausted = group["grad_tol"], group["on_exhausted"]
    if not (isinstance(gamma0, (int, float)) and gamma0 > 0 and math.isfinite(gamma0)):
        raise ValueError(f"gamma0 must be a positive finite number, got {gamma0!r}")
    if not (isinstance(gamma_min, (int, float)) and gamma_min >= 0):
        raise ValueError(f"gamma_min must be >= 0, got {gamma_min!r}")
    if not (isinstance(max_trials, int) and max_trials >= 1):
        raise ValueError(f"max_trials must be an integer >= 1, got {max_trials!r}")
    if not (isinstance(dense_threshold, int) and dense_threshold >= 0):
        raise ValueError(f"dense_threshold must be an integer >= 0, got {dense_threshold!r}")
    if not cg_rtol > 0:
        raise ValueError(f"cg_rtol must be > 0, got {cg_rtol!r}")
    if cg_maxiter is not None and not (isinstance(cg_maxiter, int) and cg_maxiter >= 1):
        raise ValueError(f"cg_maxiter must be None or an integer >= 1, got {cg_maxiter!r}")
    if not (isinstance(mfac_m, int) and mfac_m >= 1):
        raise ValueError(f"mfac_m must be an integer >= 1, got {mfac_m!r}")
    if not mfac_damp > 0:
        raise ValueError(f"mfac_damp must be > 0, got {mfac_damp!r}")
    if not (isinstance(jacobi_probes, int) and jacobi_probes >= 1):
        raise ValueError(f"jacobi_probes must be an integer >= 1, got {jacobi_probes!r}")
    if not (isinstance(grad_tol, (int, float)) and grad_tol >= 0):
        raise ValueError(f"grad_tol must be >= 0, got {grad_tol!r}")
    if on_exhausted not in ("take_last", "stay"):
        raise ValueError(f"on_exhausted must be 'take_last' or 'stay', got {on_exhausted!r}")
    if not isinstance(group["reuse_evaluation"], bool):
        raise TypeError(
            f"reuse_evaluation must be True or False, got {group['reuse_evaluation']!r}"
        )


class GNSNewton(WholeCopyOptimizer):
    r"""Gradient-normalized-smoothness regularized Newton method (full-batch, deterministic).

    All parameters are treated as one flat vector ``x`` of length ``d`` (a single parameter group;
    all parameters must share one dtype and device). Every step needs a ``closure`` that zeroes the
    gradients, computes the loss, calls ``backward()`` and returns the loss, as for
    ``torch.optim.LBFGS``. The closure must be deterministic: the acceptance test compares losses.

    **Closure calls per step.** Each trial that produces a point evaluates the closure once at that
    point (loss and gradient at ``x+``). The evaluation at the current point ``x`` costs one more
    call, except when ``reuse_evaluation=True`` (default) and the parameters have not been changed
    since the previous step ended (checked through the tensors' version counters and by comparing
    the values, so ``p.data`` writes and ``vector_to_parameters`` are seen too): then the loss and
    gradient from the accepted trial are reused. So a step with ``T`` trials calls the closure
    ``T`` times (``T + 1`` on the first step, after an external change of the parameters, or with
    ``reuse_evaluation=False``). A trial whose system ``H + lambda I`` is found not positive
    definite (failed Cholesky, or CG meeting a direction of non-positive curvature) counts as
    rejected without a closure call; CG does not always detect an indefinite system, so give a
    PSD ``H`` on the CG path. When ``||g|| <= grad_tol`` the step does nothing (no trials).
    The acceptance test compares loss values, so it stops resolving progress once the expected
    decrease (about ``||g||^2 / L``) falls below the rounding of ``f`` (about ``eps |f|``); from
    there trials are rejected until they run out and ``gamma`` collapses. Set ``grad_tol`` to
    stop cleanly before that point (for example ``1e-8`` in float64 with ``|f| ~ 1``).

    **When the trials run out** (``max_trials`` rejections in a row), ``on_exhausted="take_last"``
    (default, the behaviour of the authors' code) moves to the last trial point if its loss is
    finite, and otherwise stays at ``x``; ``on_exhausted="stay"`` always stays at ``x``. ``gamma``
    keeps its halved value. ``state["gns"]["exhausted"]`` counts these events. If the loss was
    NaN/Inf at every trial point (while finite at ``x``, e.g. a reused evaluation and a closure
    that now returns NaN), the step also warns a ``RuntimeWarning``.

    **Non-finite curvature.** If the curvature (or its solve) yields NaN/Inf, :meth:`step` raises
    ``ValueError`` and leaves the parameters, ``gamma`` and the counters as they were (a broken
    ``H`` is not a reason to shrink the radius). Parameters must be real floating-point tensors
    with dense gradients (``TypeError`` otherwise).

    **Curvature** ``H``, rebuilt at every outer step for the current parameters:

    * ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``: the operators of
      :mod:`curvopt.curvature`, built from ``model_func``, ``loss_func`` and ``data``.
    * ``"mfac"``: the M-FAC matrix ``mfac_damp I + G^T G / mfac_m`` of the last ``mfac_m``
      gradients seen at the iterates; the damped system is solved exactly with the Woodbury
      identity at damping ``mfac_damp + lambda``.
    * a tensor ``(d, d)`` or any object with ``@`` (a fixed approximation), or a callable
      ``curvature(params) -> operator`` called once per outer step.

    Dense path: if ``d <= dense_threshold`` the operator is materialized (``to_dense()`` or
    ``op @ I``) once per outer step and each trial is one Cholesky solve. Otherwise each trial runs
    preconditioned CG on ``v -> H v + lambda v`` (warm-started from the previous trial), with
    ``preconditioner=None`` (plain CG), ``"jacobi"`` (``diag(H) + lambda``, ``diag(H)`` estimated
    once per outer step from ``jacobi_probes`` Rademacher probes) or a callable
    ``preconditioner(r, lam) -> M^{-1} r``.

    Args:
        params: Parameters (one group).
        curvature: See above.
        gamma0: Initial radius ``gamma`` (> 0).
        gamma_min: Floor applied when ``gamma`` grows after an accepted trial (>= 0).
        max_trials: Trials per step before giving up (>= 1).
        model_func: Model for the operator curvatures.
        loss_func: Loss for the operator curvatures.
        data: Iterable of ``(X, y)`` batches for the operator curvatures.
        dense_threshold: Largest ``d`` solved densely.
        cg_rtol: Relative residual tolerance of CG.
        cg_maxiter: CG iteration limit (default ``2 d``).
        preconditioner: ``None``, ``"jacobi"`` or a callable, for the CG path.
        jacobi_probes: Probes for the Jacobi diagonal estimate.
        mfac_m: Window size of the ``"mfac"`` curvature.
        mfac_damp: Damping of the ``"mfac"`` curvature (> 0).
        reuse_evaluation: Reuse the loss and gradient at the accepted point (see above).
        on_exhausted: ``"take_last"`` or ``"stay"``.
        seed: Seed of the Jacobi probes.
        grad_tol: Steps at a point with ``||g|| <= grad_tol`` do nothing (>= 0).

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> opt = GNSNewton([w], curvature=A, grad_tol=1e-8)  # A: PSD part of the Hessian
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = 0.5 * w @ A @ w - w.sum() + 0.1 * (w**4).sum()
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(30):
        ...     _ = opt.step(closure)
        >>> _ = closure()
        >>> bool(w.grad.norm() <= 1e-8)
        True
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        curvature: str | Tensor | Any | Callable[[list[Tensor]], Any] = "hessian",
        gamma0: float = 1.0,
        gamma_min: float = 1e-9,
        max_trials: int = 40,
        *,
        model_func: Callable | None = None,
        loss_func: Callable | None = None,
        data: Iterable | None = None,
        dense_threshold: int = 2000,
        cg_rtol: float = 1e-10,
        cg_maxiter: int | None = None,
        preconditioner: str | Callable[[Tensor, float], Tensor] | None = None,
        jacobi_probes: int = 16,
        mfac_m: int = 32,
        mfac_damp: float = 1e-4,
        reuse_evaluation: bool = True,
        on_exhausted: str = "take_last",
        seed: int = 0,
        grad_tol: float = 0.0,
    ) -> None:
        if not (preconditioner is None or preconditioner == "jacobi" or callable(preconditioner)):
            raise ValueError(
                f"preconditioner must be None, 'jacobi' or a callable (r, lam) -> M^-1 r, "
                f"got {preconditioner!r}"
            )
        if isinstance(curvature, str):
            if curvature not in _CURVATURES:
                raise ValueError(
                    f"unknown curvature {curvature!r}; use one of {_CURVATURES}, an object with @, "
                    "or a callable returning one"
                )
            if curvature in _OPERATOR_CURVATURES and (
                model_func is None or loss_func is None or data is None
            ):
                raise ValueError(
                    f"curvature={curvature!r} needs model_func=, loss_func= and data= "
                    "(as for curvopt.curvature operators)"
                )
        elif not (_has_matmul(curvature) or callable(curvature)):
            raise TypeError(
                "curvature must be a name, an object supporting `@` (e.g. a (d, d) tensor or an "
                f"operator), or a callable params -> operator; got {type(curvature).__name__}"
            )
        _check_hyperparameters(
            dict(
                gamma0=gamma0,
                gamma_min=gamma_min,
                max_trials=max_trials,
                dense_threshold=dense_threshold,
                cg_rtol=cg_rtol,
                cg_maxiter=cg_maxiter,
                jacobi_probes=jacobi_probes,
                mfac_m=mfac_m,
                mfac_damp=mfac_damp,
                reuse_evaluation=bool(reuse_evaluation),
                on_exhausted=on_exhausted,
                grad_tol=grad_tol,
            )
        )
        defaults = dict(
            gamma0=float(gamma0),
            gamma_min=float(gamma_min),
            max_trials=max_trials,
            dense_threshold=dense_threshold,
            cg_rtol=float(cg_rtol),
            cg_maxiter=cg_maxiter,
            jacobi_probes=jacobi_probes,
            mfac_m=mfac_m,
            mfac_damp=float(mfac_damp),
            reuse_evaluation=bool(reuse_evaluation),
            on_exhausted=on_exhausted,
            grad_tol=float(grad_tol),
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                "GNSNewton treats all parameters as one vector: pass a single parameter group"
            )
        ps = self._params
        for p in ps:
            if not p.is_floating_point():
                raise TypeError(
                    f"GNSNewton needs real floating-point parameters, got {p.dtype} (for complex "
                    "parameters optimize torch.view_as_real(p) instead)"
                )
        if len({(p.dtype, p.device) for p in ps}) != 1:
            raise ValueError("all parameters of GNSNewton must share one dtype and one device")
        self._curvature = curvature
        self._preconditioner = preconditioner
        self._model_func, self._loss_func, self._data = model_func, loss_func, data
        self._generator = torch.Generator(device=ps[0].device).manual_seed(seed)
        self._window = None  # SlidingWindowMFAC for curvature="mfac", built on first use
        self._cache: tuple[float, Tensor, list[int], Tensor] | None = None
        self.state[_STATE_KEY] = dict(
            gamma=float(gamma0), steps=0, trials=0, closure_calls=0, exhausted=0, last_trials=0
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the single parameter group (a second group raises ``ValueError``)."""
        if len(self.param_groups) >= 1:
            raise ValueError(
                "GNSNewton treats all parameters as one vector: pass a single parameter group"
            )
        super().add_param_group(param_group)

    @property
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    @property
    def gamma(self) -> float:
        """The current radius ``gamma``."""
        return self.state[_STATE_KEY]["gamma"]

    # -- evaluation ---------------------------------------------------------------------------

    def _evaluate(self, closure: Callable[[], Tensor]) -> tuple[float, Tensor]:
        for p in self._params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        self.state[_STATE_KEY]["closure_calls"] += 1
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError("the closure must return the loss as a one-element tensor")
        if all(p.grad is None for p in self._params):
            raise ValueError(
                "after the closure no parameter has a gradient: the closure must call "
                "loss.backward()"
            )
        if any(p.grad is not None and p.grad.layout != torch.strided for p in self._params):
            raise TypeError(
                "GNSNewton needs dense gradients; a parameter got a sparse gradient (e.g. from "
                "nn.Embedding(sparse=True)): use sparse=False"
            )
        return float(loss), flat_grad(self._params).detach().clone()

    def _versions(self) -> list[int]:
        return [p._version for p in self._params]

    def _remember(self, loss: float, g: Tensor) -> None:
        """Cache the evaluation at the current parameters (reused if they are left unchanged)."""
        x = flatten([p.detach() for p in self._params]).clone()
        self._cache = (loss, g, self._versions(), x)

    def _cache_is_current(self) -> bool:
        if self._cache is None or self._cache[2] != self._versions():
            return False
        return torch.equal(self._cache[3], flatten([p.detach() for p in self._params]))

    def _write(self, x: Tensor) -> None:
        for p, v in zip(self._params, unflatten(x, self._params)):
            p.copy_(v)

    # -- curvature ----------------------------------------------------------------------------

    def _operator(self) -> Any:
        c, ps = self._curvature, self._params
        if isinstance(c, str):
            cls = _operator_class(c)
            return cls(self._model_func, self._loss_func, ps, self._data)
        if _has_matmul(c):
            return c
        op = c(ps)
        if not _has_matmul(op):
            raise TypeError(
                f"the curvature callable must return an object supporting `@`, got "
                f"{type(op).__name__}"
            )
        return op

    def _mfac_solver(self, g: Tensor) -> Callable[[float, Tensor | None], Tensor | None]:
        from curvopt.mfac import SlidingWindowMFAC

        group = self.param_groups[0]
        if self._window is None:
            self._window = SlidingWindowMFAC(
                g.numel(), group["mfac_m"], group["mfac_damp"], device=g.device, dtype=g.dtype
            )
        self._window.add(g)
        damp = group["mfac_damp"]
        return lambda lam, x0: -self._window.ihvp(g, damp=damp + lam)

    def _make_solver(self, g: Tensor) -> Callable[[float, Tensor | None], Tensor | None]:
        """Return ``solve(lam, x0) -> Delta`` (or None when ``H + lam I`` is not PD)."""
        if isinstance(self._curvature, str) and self._curvature == "mfac":
            return self._mfac_solver(g)
        group = self.param_groups[0]
        d = g.numel()
        op = self._operator()
        if isinstance(op, Tensor) or d <= group["dense_threshold"]:
            H = self._dense(op, g)
            return lambda lam, x0: damped_cholesky_solve(H, lam, -g)
        precond = self._make_preconditioner(op, g)

        def solve(lam: float, x0: Tensor | None) -> Tensor:
            x, _ = conjugate_gradient(
                lambda v: (op @ v).to(g.dtype) + lam * v,
                -g,
                precond=None if precond is None else (lambda r: precond(r, lam)),
                x0=x0,
                rtol=group["cg_rtol"],
                maxiter=group["cg_maxiter"],
            )
            return x

        return solve

    @staticmethod
    def _dense(op: Any, g: Tensor) -> Tensor:
        d = g.numel()
        if isinstance(op, Tensor):
            H = op
        elif hasattr(op, "to_dense"):
            H = op.to_dense()
        else:
            H = op @ torch.eye(d, dtype=g.dtype, device=g.device)
        if not isinstance(H, Tensor) or tuple(H.shape) != (d, d):
            shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
            raise ValueError(f"the curvature must be a ({d}, {d}) matrix, got {shape}")
        H = H.to(dtype=g.dtype, device=g.device)
        if not bool(torch.isfinite(H).all()):
            raise ValueError("the curvature matrix contains NaN/Inf entries")
        return 0.5 * (H + H.T)

    def _make_preconditioner(self, op: Any, g: Tensor):
        pc = self._preconditioner
        if pc is None or callable(pc):
            return pc
        k = self.param_groups[0]["jacobi_probes"]
        Z = torch.randint(
            0, 2, (g.numel(), k), generator=self._generator, device=g.device, dtype=torch.int64
        ).to(g.dtype)
        Z = 2 * Z - 1
        diag = ((op @ Z).to(g.dtype) * Z).mean(dim=1).clamp_min(0)
        return lambda r, lam: r / (diag + lam)

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """Run one outer step (one or more trials) and return the loss at the starting point.

        Args:
            closure: Zeroes the gradients, computes the loss, calls ``backward()`` and returns
                the loss.

        Returns:
            The loss at the point where the step started, as a 0-dim float64 tensor.
        """
        if closure is None:
            raise ValueError("GNSNewton.step needs a closure that returns the loss")
        group = self.param_groups[0]
        st = self.state[_STATE_KEY]
        params = self._params
        if group["reuse_evaluation"] and self._cache_is_current():
            loss, g = self._cache[0], self._cache[1]
        else:
            loss, g = self._evaluate(closure)
        if not (math.isfinite(loss) and bool(torch.isfinite(g).all())):
            raise ValueError("the loss or gradient at the current point is NaN/Inf")
        x = flatten([p.detach() for p in params]).clone()
        g_norm = float(torch.linalg.vector_norm(g))
        before = dict(st)
        st["steps"] += 1
        st["last_trials"] = 0
        result = torch.tensor(loss, dtype=torch.float64)
        if g_norm <= group["grad_tol"]:
            self._remember(loss, g)
            return result

        try:
            solve = self._make_solver(g)
        except Exception:
            self.state[_STATE_KEY] = before
            raise
        gamma = st["gamma"]
        last: tuple[float, Tensor] | None = None
        dx: Tensor | None = None
        accepted, evaluated, nonfinite = False, 0, 0
        for _ in range(group["max_trials"]):
            st["trials"] += 1
            st["last_trials"] += 1
            lam = g_norm / gamma
            dx_new = solve(lam, dx)
            if dx_new is not None and not bool(torch.isfinite(dx_new).all()):
                self._write(x)
                self.state[_STATE_KEY] = before
                self._cache = None
                raise ValueError(
                    f"GNSNewton.step: the curvature solve at lambda={lam:.3g} gave NaN/Inf (the "
                    "curvature or its products contain non-finite values); the parameters, gamma "
                    "and the counters were left unchanged"
                )
            if dx_new is None:
                gamma /= 2
                last = None
                continue
            dx = dx_new
            self._write(x + dx)
            loss_new, g_new = self._evaluate(closure)
            last = (loss_new, g_new)
            evaluated += 1
            nonfinite += not math.isfinite(loss_new)
            decrease = loss - loss_new
            needed = float(g_new.square().sum()) / (8 * lam)
            if math.isfinite(loss_new) and decrease >= needed:
                gamma = max(2 * gamma, group["gamma_min"])
                accepted = True
                break
            gamma /= 2
        st["gamma"] = gamma
        if not accepted:
            st["exhausted"] += 1
            if evaluated and nonfinite == evaluated:
                warnings.warn(
                    f"GNSNewton.step: the loss was NaN/Inf at all {evaluated} trial points, down "
                    f"to a step of radius gamma={gamma:.3g}, although it was finite at the "
                    "current point: the closure is not deterministic (e.g. it returns NaN from "
                    "now on), or the loss is not finite anywhere near the parameters",
                    RuntimeWarning,
                    stacklevel=4,  # the caller of step (through torch.optim's and no_grad's)
                )
            take = (
                group["on_exhausted"] == "take_last"
                and last is not None
                and math.isfinite(last[0])
                and bool(torch.isfinite(last[1]).all())
            )
            if not take:
                self._write(x)
                last = (loss, g)
        assert last is not None
        self._remember(last[0], last[1])
        return result

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: ``gamma``, the counters and the M-FAC window if any.

        It also records the number of parameter entries ``d``, so that a load of a state saved
        for a problem of another dimension is refused.
        """
        sd = super().state_dict()
        sd["state"] = dict(sd["state"])
        sd["state"][GROUP_SIZES_KEY] = group_sizes(self)
        if self._window is not None:
            sd["state"]["gns_mfac_window"] = self._window.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; the cached evaluation is dropped.

        Everything is validated before anything is loaded: on error the optimizer is unchanged.
        A state saved for a problem with another number of parameter entries ``d`` raises
        ``ValueError`` (states saved before ``d`` was recorded load without that check).
        """
        from curvopt.mfac import SlidingWindowMFAC

        check_optimizer_state(self, state_dict, check_group=_check_hyperparameters)
        state_dict = dict(state_dict)
        state_dict["state"] = dict(state_dict["state"])
        state_dict["state"].pop(GROUP_SIZES_KEY, None)  # checked above
        window_state = state_dict["state"].pop("gns_mfac_window", None)
        gns = state_dict["state"].get(_STATE_KEY)
        needed = set(self.state[_STATE_KEY])
        if not isinstance(gns, dict) or not needed <= set(gns):
            raise ValueError(
                f"state_dict['state'][{_STATE_KEY!r}] must be a dict with {sorted(needed)}: the "
                "state was not saved by GNSNewton"
            )
        gamma = gns["gamma"]
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"the saved gamma must be a positive finite number, got {gamma!r}")
        group = state_dict["param_groups"][0]  # has every hyperparameter: checked above
        window = None
        if window_state is not None:
            g = flatten([p.detach() for p in self._params])
            window = SlidingWindowMFAC(
                g.numel(), group["mfac_m"], group["mfac_damp"], device=g.device, dtype=g.dtype
            )
            window.load_state_dict(window_state)  # validates before this optimizer changes
        super().load_state_dict(state_dict)
        self.state[_STATE_KEY] = dict(self.state[_STATE_KEY])
        self._cache = None
        self._window = window
