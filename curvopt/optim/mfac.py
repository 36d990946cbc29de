r"""The M-FAC optimizer: the gradient preconditioned by a sliding-window empirical Fisher inverse.

By default the step is grafted to Adam's per-parameter norm and the damping is relative, so the
step does not depend on the loss scale (see :class:`MFAC`); ``graft=None`` gives the authors' step.

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information" (NeurIPS 2021), optimization section. With ``G`` the ``(m, d)`` matrix of the last
``m`` gradients of *all* parameters of the optimizer (flattened once, in parameter-group order),

.. math::
    F = \text{damp}\, I + G^\top G / m, \qquad u_t = F^{-1} g_t,

where ``g_t`` is added to the window before ``u_t`` is computed. The inverse products come from
:class:`curvopt.mfac.SlidingWindowMFAC` (Woodbury identity, ``O(m d + m^2)`` per step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvopt import distributed as D
from curvopt.mfac import SlidingWindowMFAC
from curvopt.mfac._validation import finite_flag
from curvopt.optim._copying import WholeCopyOptimizer
from curvopt.optim._state_checks import check_optimizer_state
from curvopt.optim.mfac_shards import ParamShards
from curvopt.utils.params import trainable

_WINDOW_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_STATE_KEY = "mfac_window"
_REQUIRES_GRAD_CHANGED = (
    "MFAC's window spans the parameters that had requires_grad=True at construction; "
    "requires_grad was changed since. Build a new optimizer for the new set of trainable parameters"
)
_SHARED = ("m", "damp", "window_dtype", "nonfinite", "graft", "beta2", "eps", "max_window_bytes")
_GRAFTS = ("adam", "adam-grad", None)
#: Default window with only ``lr`` given: ``m = min(DEFAULT_M, what max_window_bytes allows)``.
DEFAULT_M = 32
#: Default budget for the window's buffer ``G`` (bytes): 1 GiB.
DEFAULT_MAX_WINDOW_BYTES = 2**30
#: Default damping with a graft (relative: ``lambda = damp / m`` on unit-norm rows) and
#: with ``graft=None`` (absolute, the authors' value).
DEFAULT_DAMP = {"adam": 1.0, "adam-grad": 1.0, None: 1e-5}


def _resolve_window_size(
    m: int | None, d: int, itemsize: int, max_window_bytes: float | None
) -> int:
    """The window size: ``m`` as given (warning above the budget) or the default rule."""
    budget = DEFAULT_MAX_WINDOW_BYTES if max_window_bytes is None else max_window_bytes
    if m is None:
        return max(1, min(DEFAULT_M, int(budget // (max(d, 1) * itemsize))))
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (window size) must be an integer >= 1 or None, got {m!r}")
    size = m * d * itemsize
    if size > budget:
        warnings.warn(
            f"MFAC: the window of m={m} gradients of d={d} coordinates takes "
            f"{size / 2**30:.2f} GiB ({itemsize} bytes each), above max_window_bytes="
            f"{budget / 2**30:.2f} GiB; pass a smaller m (or m=None for the default rule), "
            "or raise max_window_bytes to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    return m


def _check_group_hyperparameters(group: dict[str, Any]) -> None:
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    if isinstance(lr, Tensor) or not lr >= 0:
        raise ValueError(f"lr must be a float >= 0, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not wd >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {wd!r}")
    if not isinstance(group["decoupled_weight_decay"], bool):
        raise TypeError("decoupled_weight_decay must be a bool")


class MFAC(WholeCopyOptimizer):
    r"""M-FAC: SGD on the gradient preconditioned by a sliding-window empirical Fisher inverse.

    **Defaults for a drop-in** (only ``lr`` given, ``graft="adam"``): a window of
    ``m = min(32, max_window_bytes / (d * bytes))`` gradients (at most ``32 d`` numbers; an
    explicit ``m`` whose buffer exceeds ``max_window_bytes``, 1 GiB by default, warns with its
    size in GiB), and M-FAC applied on top of Adam's diagonal scaling, with the step's size
    grafted to Adam's per parameter tensor (Shampoo's "grafting"). With ``g`` the gradient
    (after coupled decay), ``g_p`` its part for parameter ``p`` and ``t`` the step count:

    .. math::
        v_p \leftarrow \beta_2 v_p + (1-\beta_2) g_p^2, \quad
        a_p = g_p / (\sqrt{v_p / (1-\beta_2^t)} + \epsilon), \quad
        \hat a = a / \|a\|, \\
        F = \tfrac{\text{damp}}{m} I + \hat A^\top \hat A / m, \quad u = F^{-1} \hat a, \quad
        s_p = u_p \, \|a_p\| / \|u_p\|, \\
        b_p \leftarrow \mu b_p + s_p, \quad
        w_p \leftarrow w_p - \text{lr}\,\frac{1-\mu}{1-\mu^t}\, b_p,

    where ``\hat A`` ``(m, d)`` holds the last ``m`` *unit-norm* Adam steps, so ``damp`` is
    relative (each row adds eigenvalue ``1/m``; default ``damp=1``), ``mu = momentum``
    (default 0.9) acts as an exponential average with bias correction like Adam's ``beta1``,
    and ``s_p = 0`` where ``u_p = 0``. A large ``damp`` gives Adam (without its ``eps`` inside
    the momentum); ``graft="adam-grad"`` fills the window with ``g / ||g||`` instead of ``a``
    (measured worse, kept for the ablation). Multiplying the loss by ``c > 0`` leaves every
    step unchanged (exactly with ``eps=0``; up to ``eps`` otherwise, as for Adam), so Adam's
    learning rates apply. Costs one more ``d``-vector (``v``) per parameter. Why: with an
    absolute damping ``damp << ||g||^2/m`` the authors' step ``F^{-1} g`` has norm about
    ``m / ||g||``, so the right ``lr`` moves with the loss scale; see "Optimizers on
    workloads" in the benchmarks page for the measurements.

    **The authors' settings** are ``MFAC(params, lr, m=1024, damp=1e-5, graft=None)`` (plus
    ``momentum`` as below): then ``damp`` is absolute, the window holds the raw gradients and the
    step is as follows. One step, with ``g`` the gradient of all parameters as one vector and
    ``w`` the parameters (``graft="adam"`` differs only as stated above):

    1. Coupled weight decay (``decoupled_weight_decay=False``, default, as in L2 regularization and
       ``torch.optim.SGD``): ``g <- g + wd * w`` *before* ``g`` enters the window, so the
       preconditioner sees the regularized gradient.
    2. ``g`` is added to the window (replacing the oldest of the last ``m`` gradients) and
       ``u = F^{-1} g`` is computed for the updated window.
    3. Momentum (heavy ball on the preconditioned direction, like ``torch.optim.SGD`` with
       ``dampening=0``): ``b <- momentum * b + u`` (``b = u`` on the first step), ``u <- b``.
       The authors' reference optimizer averages instead, ``v <- momentum * v + (1 - momentum) u``
       from ``v = 0``, so ``v = (1 - momentum) b`` at every step: its trajectory is ours with
       ``lr = (1 - momentum) * lr_ref``.
    4. Decoupled weight decay (``decoupled_weight_decay=True``, AdamW style; the window sees the raw
       gradient): ``w <- w * (1 - lr * wd)``.
    5. ``w <- w - lr * u``.

    **Parameter groups.** All groups share one window over the concatenation of their parameters:
    ``F`` couples every coordinate, so ``u`` is one joint direction. Each group's ``lr``,
    ``momentum``, ``weight_decay`` and ``decoupled_weight_decay`` then act on that group's slice of
    ``u``, ``b`` and ``w``; with coupled decay a group's ``wd * w`` is added to its slice of ``g``
    before preconditioning. ``m``, ``damp``, ``window_dtype`` and ``nonfinite`` are shared and can
    only be given to the constructor. All parameter groups must be given at construction.

    **Parameters without a gradient** (``.grad is None``) contribute zeros to this step's window row
    and are not updated (no decay, their momentum buffer is untouched). A step where no parameter
    has a gradient does nothing, leaves the window unchanged and warns (``UserWarning``): the
    usual cause is an optimizer built before ``fully_shard``, whose old tensors get no gradient.

    **Frozen parameters** (``requires_grad=False`` at construction) are left out of the window
    (``d`` counts only trainable ones, so a frozen backbone costs no window memory) and are never
    updated. Changing ``requires_grad`` after construction is an error at the next step.

    **Non-finite gradients** (checked after coupled weight decay) never enter the window:

    * ``nonfinite="raise"`` (default): raise ``ValueError`` and change nothing. Reading the check's
      result costs one host-device synchronization per step.
    * ``nonfinite="skip"``: no per-step synchronization. The step is masked on the device:
      parameters and momentum buffers are left as they are, and the window re-inserts the gradient
      it would have evicted instead (so ``F`` is unchanged); :attr:`skipped_steps` counts these
      steps.

    No ``.item()``/``.cpu()`` is called in :meth:`step`; with ``nonfinite="skip"`` it has no
    host synchronization at all. With ``"raise"``, every ``m`` steps (when the window refreshes
    its inverse) one more reads the window's conditioning estimates: it raises a
    ``RuntimeWarning`` if ``damp`` is so small that the products are noise, and switches the
    window to its factored mode (a Cholesky factor per step, ``O(m^3)``) while its gradients are
    so nearly dependent that the explicit ``m x m`` inverse would be inaccurate (see
    :meth:`SlidingWindowMFAC.check_conditioning`). With ``"skip"``, read
    ``opt.window.conditioning`` or call ``opt.window.check_conditioning()`` yourself. All
    parameters must share one dtype and device.

    **Memory.** ``m * d * bytes(window_dtype)`` for the window plus ``O(m^2)`` float64 and one
    ``d``-vector per parameter with momentum, one more with a graft (``exp_avg_sq``): see
    :meth:`memory_bytes`.

    **Distributed** (see the guide page "Distributed"; all ranks call :meth:`step` together):

    * FSDP2: parameters that are DTensors sharded ``Shard(0)`` by ``fully_shard`` on one 1-D
      mesh are detected. The window holds this rank's local shards (``d_r`` coordinates), a step
      all-reduces ``m`` float64 numbers (``G g``) plus one non-finite flag over the mesh's group
      and updates the local shards; parameters are never all-gathered.
    * ZeRO-1: plain (replicated, e.g. DDP) parameters with ``process_group`` given. The
      flattened coordinates are split evenly (``floor(d/P)`` or ``ceil(d/P)`` per rank), the
      window (``window.G``) and the momentum buffers hold only this rank's part, and the new
      parameters are all-gathered once per step. ``check_replicated_grads=True`` verifies
      that every rank has the same gradient (one more all-reduce of 4 numbers).

    In both, ``memory_bytes()`` is per rank, a non-finite gradient on any rank makes every rank
    raise (or skip) together, and :meth:`sharded_state_dict` gives checkpoints for
    ``torch.distributed.checkpoint`` that load at another world size.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (>= 0).
        m: Window size, the number of recent gradients kept (>= 1); default None: ``32``, or
            fewer if ``32`` gradients exceed ``max_window_bytes``.
        damp: Damping of ``F`` (> 0); larger values move the step towards SGD (``graft=None``)
            or Adam (``graft="adam"``). Default None: ``1`` relative with a graft, ``1e-5``
            absolute with ``graft=None`` (the authors').
        momentum: Momentum in ``[0, 1)``: heavy ball with ``graft=None`` (default 0), an
            exponential average with ``graft="adam"`` (default 0.9).
        weight_decay: Weight decay (>= 0), coupled or decoupled as set by the next argument.
        graft: ``"adam"`` (default): window of unit-norm Adam steps, relative damping and
            Adam's norm per parameter (scale-invariant); ``"adam-grad"``: the same with
            unit-norm gradients in the window; None: the authors' step.
        beta2: Decay of the squared-gradient average of the Adam graft, in ``[0, 1)``.
        eps: Added to the Adam graft's denominator (>= 0).
        max_window_bytes: Budget for the window's buffer in bytes (default 1 GiB): the default
            ``m`` fits in it, an explicit ``m`` above it warns (``UserWarning``).
        decoupled_weight_decay: Use decoupled (AdamW-style) instead of coupled weight decay.
        window_dtype: Storage dtype of the window (float32, bfloat16 or float64; default: the
            parameters' dtype). The ``m x m`` algebra is float64 regardless.
        nonfinite: ``"raise"`` or ``"skip"`` (see above).
        process_group: ``torch.distributed`` group for ZeRO-1 sharding of plain parameters, or
            None. With FSDP2 parameters it may be None or a group with the mesh's ranks.
        check_replicated_grads: ZeRO-1 only: check each step that all ranks' gradients agree.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = MFAC(model.parameters(), lr=1e-2)  # drop-in for AdamW's lr range
        >>> opt.window.m, opt.defaults["momentum"]
        (32, 0.9)
        >>> authors = MFAC(model.parameters(), lr=1e-2, m=8, damp=1e-3, graft=None)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        m: int | None = None,
        damp: float | None = None,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        *,
        graft: str | None = "adam",
        beta2: float = 0.999,
        eps: float = 1e-8,
        max_window_bytes: float | None = None,
        decoupled_weight_decay: bool = False,
        window_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        process_group: object = None,
        check_replicated_grads: bool = False,
    ) -> None:
        if graft not in _GRAFTS:
            raise ValueError(f"graft must be 'adam', 'adam-grad' or None, got {graft!r}")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"m (window size) must be an integer >= 1 or None, got {m!r}")
        if damp is None:
            damp = DEFAULT_DAMP[graft]
        if momentum is None:
            momentum = 0.0 if graft is None else 0.9
        if isinstance(damp, bool) or not (isinstance(damp, (int, float)) and damp > 0):
            raise ValueError(f"damp must be a number > 0, got {damp!r}")
        if isinstance(beta2, bool) or not (isinstance(beta2, (int, float)) and 0 <= beta2 < 1):
            raise ValueError(f"beta2 must be a number in [0, 1), got {beta2!r}")
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        if max_window_bytes is not None and (
            isinstance(max_window_bytes, bool)
            or not (isinstance(max_window_bytes, (int, float)) and max_window_bytes > 0)
        ):
            raise ValueError(
                f"max_window_bytes must be a number > 0 or None, got {max_window_bytes!r}"
            )
        if window_dtype is not None and window_dtype not in _WINDOW_DTYPES:
            raise ValueError(
                f"window_dtype must be one of {_WINDOW_DTYPES} or None, got {window_dtype!r}"
            )
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        _check_group_hyperparameters(defaults)
        self._damp, self._nonfinite = float(damp), nonfinite
        self._graft, self._beta2, self._eps = graft, float(beta2), float(eps)
        self._window: SlidingWindowMFAC | None = None
        super().__init__(params, defaults)
        ps = trainable(self._all_params())
        if not ps:
            raise ValueError(
                "MFAC got no parameter with requires_grad=True: nothing to optimize (frozen "
                "parameters are left out of the window)"
            )
        if len({(p.dtype, p.device) for p in ps}) != 1:
            raise ValueError("all parameters of MFAC must share one dtype and one device")
        if not ps[0].is_floating_point():
            raise TypeError(f"MFAC needs floating-point parameters, got {ps[0].dtype}")
        self._shards = ParamShards(ps, process_group)
        offsets, total = [], 0
        for _, n in self._shards.ranges:
            offsets.append(total)
            total += n
        self._offsets = offsets
        self._check_replicated = bool(check_replicated_grads)
        dtype = ps[0].dtype if window_dtype is None else window_dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        m = _resolve_window_size(m, self._shards.local_dim, itemsize, max_window_bytes)
        self._m = m
        # relative damping: the rows are unit vectors, each adds eigenvalue 1/m to F
        window_damp = self._damp / m if graft is not None else self._damp
        if window_damp == 0.0:
            raise ValueError(
                f"damp={damp!r} is too small: with graft={graft!r} the window's damping "
                f"damp / m = {damp!r} / {m} underflows to 0; use a damp of at least 1e-150"
            )
        self._window = SlidingWindowMFAC(
            self._shards.local_dim,
            m,
            window_damp,
            device=ps[0].device,
            dtype=dtype,
            process_group=self._shards.group,
            agree={
                "d (coordinates of all ranks)": sum(p.numel() for p in ps),
                "nonfinite": ("raise", "skip").index(nonfinite),
            },
        )
        self._skipped = torch.zeros((), dtype=torch.int64, device=ps[0].device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group before the first step (the window spans all parameters at construction)."""
        if getattr(self, "_window", None) is not None:
            raise ValueError(
                "MFAC's window spans all parameters: pass every parameter group to the constructor"
            )
        for key in _SHARED:
            if key in param_group:
                raise ValueError(
                    f"{key!r} is shared by all groups (one window); pass it to the constructor"
                )
        with warnings.catch_warnings():  # torch only warns about duplicates: we refuse them
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with dup")
            super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len({id(p) for p in params}) != len(params):
            self.param_groups.pop()
            raise ValueError(
                "MFAC got the same parameter twice in one group; the window would hold its "
                "coordinates twice (d too large) and the step would update it twice: pass each "
                "parameter once"
            )
        _check_group_hyperparameters(self.param_groups[-1])

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def window(self) -> SlidingWindowMFAC:
        """The shared :class:`~curvopt.mfac.SlidingWindowMFAC` (read it, don't modify it)."""
        assert self._window is not None
        return self._window

    @property
    def skipped_steps(self) -> Tensor:
        """0-dim int64 tensor: steps skipped because of a non-finite gradient."""
        return self._skipped

    def memory_bytes(self) -> int:
        """Bytes held: the window (``m d`` entries + float64 ``m x m``) plus per-parameter state."""
        buffers = sum(
            t.numel() * t.element_size()
            for key, st in self.state.items()
            if isinstance(key, Tensor)
            for t in st.values()
            if isinstance(t, Tensor)
        )
        return self.window.memory_bytes() + buffers

    def _flat_gradient(self) -> Tensor | None:
        """Concatenated gradients with coupled weight decay applied; None if no gradient at all."""
        parts, any_grad, shards, i = [], False, self._shards, 0
        for group in self.param_groups:
            wd = group["weight_decay"]
            coupled = wd != 0 and not group["decoupled_weight_decay"]
            for p in trainable(group["params"]):
                if i >= len(shards.params) or p is not shards.params[i]:
                    raise ValueError(_REQUIRES_GRAD_CHANGED)
                grad, n = shards.grad(i), shards.ranges[i][1]
                if grad is None:
                    parts.append(torch.zeros(n, dtype=p.dtype, device=p.device))
                else:
                    if grad.is_sparse:
                        raise TypeError("MFAC does not support sparse gradients")
                    any_grad = True
                    parts.append(
                        grad.add(shards.param(i).reshape(-1), alpha=wd) if coupled else grad
                    )
                i += 1
        if i != len(shards.params):
            raise ValueError(_REQUIRES_GRAD_CHANGED)
        return torch.cat(parts) if any_grad else None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimization step.

        Args:
            closure: Optional; re-evaluates the model and returns the loss (called once).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self._flat_gradient()
        if g is None:
            warnings.warn(
                "MFAC.step found no gradient on any of its parameters and did nothing. If the "
                "model was wrapped with fully_shard (FSDP2) after the optimizer was built, the "
                "optimizer holds the old tensors, which never get a gradient: build MFAC after "
                "fully_shard, from model.parameters()",
                UserWarning,
                stacklevel=4,  # the caller of step (through torch.optim's and no_grad's wrappers)
            )
            return loss
        window, shards = self.window, self._shards
        if shards.mode == "zero1":  # every rank holds the whole gradient: check all of it
            bad = shards.nonfinite_anywhere()
        else:
            bad = ~finite_flag(g)
        bad = D.all_reduce_any(bad, shards.group)  # on any rank
        if self._check_replicated and not bool(bad):  # optional; costs a synchronization
            shards.check_replicated_grads()
        mask = None
        if self._nonfinite == "raise":
            if bool(bad):
                raise ValueError(
                    "MFAC.step: the gradient contains NaN or Inf (on this or another rank); "
                    "nothing was changed (pass nonfinite='skip' to skip such steps instead)"
                )
        else:
            self._skipped.add_(bad.to(self._skipped.dtype))
            mask = (~bad).to(g.dtype)
        row, a2 = g, None
        if self._graft is not None:  # unit-norm rows: the direction ignores the loss scale
            a, a2 = self._adam_step(g, mask)
            row = g if self._graft == "adam-grad" else a  # "adam": the window sees Adam's steps
            norm2 = D.all_reduce_sum_(row.square().sum().reshape(1), shards.group)
            scale = norm2.sqrt().clamp_min(torch.finfo(g.dtype).tiny)
            if mask is None and window.dtype == g.dtype:  # checked: write it into the window
                row = torch.div(row, scale, out=window.next_row())  # (saves the step a copy)
            else:
                row = row / scale
        if mask is not None:
            evicted = window.G[window.count % window.m].to(g.dtype)
            row = torch.where(~bad, row, evicted)
        u = window.add_and_ihvp(row, on_nonfinite="ignore")  # checked above
        if self._nonfinite == "raise" and window.refreshed:
            window.check_conditioning()  # once per refresh, in the mode that synchronizes anyway
        scales = None if a2 is None else self._graft_scales(a2, u)
        offset, i = 0, 0
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            wd, decoupled = group["weight_decay"], group["decoupled_weight_decay"]
            for p in trainable(group["params"]):
                w = shards.param(i)  # p itself, or the part of p this rank holds
                n = shards.ranges[i][1]
                i += 1
                u_p = u[offset : offset + n].view_as(w)
                offset += n
                if p.grad is None:
                    continue
                if scales is not None:
                    u_p = u_p * scales[i - 1]
                if mask is not None:
                    u_p = u_p * mask
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:  # zeros: the first step gives b = u
                        state["momentum_buffer"] = torch.zeros_like(w)
                    buf = state["momentum_buffer"]
                    if mask is None:
                        buf.mul_(momentum).add_(u_p)
                    else:  # a skipped step multiplies by 1 and adds 0
                        buf.mul_(1 + (momentum - 1) * mask).add_(u_p)
                    u_p = buf if mask is None else buf * mask
                if decoupled and wd != 0:
                    if mask is None:
                        w.mul_(1 - lr * wd)
                    else:
                        w.mul_(1 - lr * wd * mask)
                if scales is None:
                    w.add_(u_p, alpha=-lr)
                elif momentum == 0:
                    w.sub_(u_p, alpha=lr)
                else:  # an exponential average with Adam's bias correction: lr keeps its scale
                    t = self.state[p]["step"].clamp_min(1)
                    w.sub_(u_p * (lr * (1 - momentum) / (1 - torch.pow(momentum, t))).to(w.dtype))
        shards.gather_()  # ZeRO-1: the one all-gather of the new parameters
        return loss

    def _adam_step(self, g: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Adam's unmomented step ``a`` (flat, updates ``v``) and ``||a_p||^2`` per parameter.

        ``v_p <- beta2 v_p + (1 - beta2) g_p^2``, ``a_p = g_p / (sqrt(v_p / (1 - beta2^t)) + eps)``
        (``t`` counts the steps in which ``p`` had a gradient); ``a_p = 0`` for parameters
        without a gradient and on a skipped step. The norms are all-reduced when sharded.
        """
        shards, beta2, eps = self._shards, self._beta2, self._eps
        a = torch.zeros_like(g)
        a2 = torch.zeros(len(shards.params), dtype=torch.float64, device=g.device)
        for i, (p, (_, n)) in enumerate(zip(shards.params, shards.ranges)):
            if p.grad is None:
                continue
            off = self._offsets[i]
            g_p = g[off : off + n]
            state = self.state[p]
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros(n, dtype=g.dtype, device=g.device)
                state["step"] = torch.zeros((), dtype=torch.float64, device=g.device)
            v, t = state["exp_avg_sq"], state["step"]
            if mask is None:
                v.mul_(beta2).addcmul_(g_p, g_p, value=1 - beta2)
                t.add_(1)
            else:  # a skipped step leaves v and t as they are
                v.lerp_(torch.where(mask.bool(), g_p, 0).square(), (1 - beta2) * mask)
                t.add_(mask.to(t.dtype))
            bias = 1 - torch.pow(beta2, t.clamp_min(1))
            a_p = a[off : off + n]
            torch.div(g_p, (v / bias.to(v.dtype)).sqrt_().add_(eps), out=a_p)
            if mask is not None:
                a_p.copy_(torch.where(mask.bool(), a_p, 0))
            a2[i] = a_p.square().sum(dtype=torch.float64)
        return a, D.all_reduce_sum_(a2, shards.group)

    def _check_graft_state(self, saved: Mapping[Any, Any], by_id: Mapping[int, Tensor]) -> None:
        """Refuse a saved graft state (``exp_avg_sq``, ``step``) that this optimizer cannot use.

        ``exp_avg_sq`` must be a finite, non-negative flat tensor of this rank's element count of
        the parameter, and ``step`` a finite scalar ``>= 0``; the two come together.
        """
        sizes = {id(p): n for p, (_, n) in zip(self._shards.params, self._shards.ranges)}
        for key, entry in saved.items():
            if key == _STATE_KEY or not isinstance(entry, Mapping):
                continue
            has_v, has_t = "exp_avg_sq" in entry, "step" in entry
            if has_v != has_t:
                raise ValueError(
                    f"state_dict['state'][{key!r}] has only one of 'exp_avg_sq' and 'step'; "
                    "the Adam graft needs both (save and load with the same MFAC version)"
                )
            if not has_v:
                continue
            v, t, p = entry["exp_avg_sq"], entry["step"], by_id.get(key)
            n = sizes.get(id(p)) if p is not None else None
            if not isinstance(v, Tensor) or v.dim() != 1 or (n is not None and v.numel() != n):
                raise ValueError(
                    f"state_dict['state'][{key!r}]['exp_avg_sq'] must be a flat tensor of {n} "
                    f"entries (this rank's part of the parameter), got "
                    f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
                )
            if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise ValueError(
                    f"state_dict['state'][{key!r}]['exp_avg_sq'] must be finite and >= 0"
                )
            if not isinstance(t, Tensor) or t.numel() != 1 or not (0 <= float(t) < math.inf):
                raise ValueError(
                    f"state_dict['state'][{key!r}]['step'] must be a finite scalar tensor >= 0"
                )

    def _graft_scales(self, a2: Tensor, u: Tensor) -> Tensor:
        """Per parameter ``||a_p|| / ||u_p||`` (0 where ``u_p = 0``); all-reduced when sharded."""
        shards = self._shards
        u2 = torch.zeros(len(shards.params), dtype=torch.float64, device=u.device)
        for i, (_, n) in enumerate(shards.ranges):
            off = self._offsets[i]
            u2[i] = u[off : off + n].square().sum(dtype=torch.float64)
        D.all_reduce_sum_(u2, shards.group)
        return torch.where(u2 > 0, (a2 / u2).sqrt(), 0).to(u.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The torch.optim state plus the window (buffer, factors, counters) as ``mfac_window``."""
        sd = super().state_dict()
        sd["state"] = dict(sd["state"])
        sd["state"][_STATE_KEY] = {
            "window": self.window.state_dict(),
            "skipped": self._skipped.clone(),
            "nonfinite": self._nonfinite,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the window must have the same ``m``, ``d`` and dtype.

        Everything is validated before anything is loaded: on error the optimizer is unchanged.
        """
        local = {id(p): self._shards.param(i).shape for i, p in enumerate(self._shards.params)}
        by_id = check_optimizer_state(
            self,
            state_dict,
            ["momentum_buffer"],
            lambda p: local.get(id(p), p.shape),
            check_group=_check_group_hyperparameters,
        )
        self._check_graft_state(state_dict["state"], by_id)
        state_dict = dict(state_dict)
        state_dict["state"] = dict(state_dict["state"])
        saved = state_dict["state"].pop(_STATE_KEY, None)
        if not isinstance(saved, dict) or "window" not in saved:
            raise ValueError("state_dict has no 'mfac_window' entry: it was not saved by MFAC")
        self.window.check_state(saved["window"])
        skipped = saved.get("skipped")
        if not (
            isinstance(skipped, Tensor)
            and skipped.numel() == 1
            and not skipped.is_floating_point()
            and not skipped.is_complex()
            and int(skipped) >= 0
        ):
            raise ValueError(
                "the saved MFAC skipped-step counter must be a 1-element integer tensor >= 0, "
                f"got {skipped!r}"
            )
        super().load_state_dict(state_dict)
        self.window.load_state_dict(saved["window"])
        self._skipped.copy_(skipped.reshape(()))

    # ------------------------------------------------------------------ sharded checkpoints
    def _local_columns(self) -> list[tuple[int, int, int]]:
        """Per parameter: (column of the window, offset in the flat parameter, length)."""
        out, col = [], 0
        for off, n in self._shards.ranges:
            out.append((col, off, n))
            col += n
        return out

    def _momentum_params(self) -> list[int]:
        """Indices of the parameters whose group uses momentum."""
        idx, i = [], 0
        for group in self.param_groups:
            for _ in trainable(group["params"]):
                if group["momentum"] != 0:
                    idx.append(i)
                i += 1
        return idx

    def sharded_state_dict(self) -> dict[str, Any]:
        """State for ``torch.distributed.checkpoint`` that loads at any world size (collective).

        The window's columns and the momentum buffers are stored per parameter as tensors of the
        parameter's full flat size, sharded by the coordinates each rank holds; ``K``,
        ``A^{-1}`` and the counters are replicated. Hyperparameters are not included: they
        come from the constructor. Load with :meth:`load_sharded_state_dict`::

            dcp.save({"model": model_sd, "optim": opt.sharded_state_dict()}, checkpoint_id=path)
            # later, at any world size, after building the same model and MFAC:
            sd = {"model": model_sd, "optim": opt.sharded_state_dict()}
            dcp.load(sd, checkpoint_id=path)
            opt.load_sharded_state_dict(sd["optim"])

        Raises:
            ValueError: For an MFAC without a process group or FSDP2 parameters (use
                :meth:`state_dict`).
        """
        shards, w = self._shards, self.window
        if shards.group is None:
            raise ValueError(
                "sharded_state_dict() is for a sharded MFAC (FSDP2 parameters or "
                "process_group=...); use state_dict() for a single process"
            )
        group, cols = shards.group, self._local_columns()
        G = {
            str(i): D.sharded_columns(w.G[:, c : c + n], p.numel(), off, group)
            for i, (p, (c, off, n)) in enumerate(zip(shards.params, cols))
        }
        momentum = {}
        for i in self._momentum_params():
            p, (_, off, n) = shards.params[i], cols[i]
            buf = self.state.get(p, {}).get("momentum_buffer")
            flat = (
                torch.zeros(n, dtype=p.dtype, device=w.device) if buf is None else buf.reshape(-1)
            )
            momentum[str(i)] = D.sharded_columns(flat, p.numel(), off, group)
        counters = torch.tensor([w.count, w._since_refresh], dtype=torch.int64, device=w.device)
        return {
            "window": {
                "K": w.K.clone(),
                "Ainv": w.Ainv.clone(),
                "damp": torch.tensor(w.damp, dtype=torch.float64, device=w.device),
                "counters": counters,
                "last_drift": w.last_drift.clone(),
                "factored": torch.tensor(w.factored, device=w.device),
                "last_finite": w.last_finite.clone(),
                "nonfinite_count": w.nonfinite_count.clone(),
                "G": G,
            },
            "momentum": momentum,
            "skipped": self._skipped.clone(),
            **self._sharded_graft_state(cols),
        }

    def _sharded_graft_state(self, cols: list[tuple[int, int, int]]) -> dict[str, Any]:
        """The graft's ``exp_avg_sq`` (sharded like the window) and step counts (replicated)."""
        if self._graft is None:
            return {}
        shards, w = self._shards, self.window
        v, steps = {}, []
        for i, p in enumerate(shards.params):
            _, off, n = cols[i]
            st = self.state.get(p, {})
            buf = st.get("exp_avg_sq")
            flat = torch.zeros(n, dtype=p.dtype, device=w.device) if buf is None else buf
            v[str(i)] = D.sharded_columns(flat.reshape(-1), p.numel(), off, shards.group)
            steps.append(st.get("step", torch.zeros((), dtype=torch.float64, device=w.device)))
        return {"graft": {"exp_avg_sq": v, "step": torch.stack(steps).clone()}}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`sharded_state_dict` filled by ``torch.distributed.checkpoint.load``.

        The checkpoint may come from another world size; this rank takes its own coordinates.
        """
        if not isinstance(state, dict) or {"window", "momentum", "skipped"} - set(state):
            raise ValueError(
                "state must be the dict of sharded_state_dict() after dcp.load, with the keys "
                "'window', 'momentum' and 'skipped'"
            )
        if self._graft is not None and "graft" not in state:
            raise ValueError("state has no 'graft' entry: it was saved by an MFAC with graft=None")
        shards, w, win = self._shards, self.window, state["window"]
        cols = self._local_columns()
        G = torch.zeros_like(w.G)
        for i, (c, _, n) in enumerate(cols):
            local = D.local_columns(win["G"][str(i)])
            if n:
                G[:, c : c + n] = local
        counters = win["counters"].tolist()
        w.load_state_dict(
            {
                "dim": w.dim,
                "m": w.m,
                "damp": float(win["damp"]),
                "dtype": w.dtype,
                "refresh_every": w.refresh_every,
                "accumulate_dtype": w.accumulate_dtype,
                "refine": w.refine,
                "count": counters[0],
                "since_refresh": counters[1],
                "G": G,
                "factored": bool(win["factored"]) if "factored" in win else False,
                **{
                    k: win[k] for k in ("K", "Ainv", "last_drift", "last_finite", "nonfinite_count")
                },
            }
        )
        for i in self._momentum_params():
            target = shards.param(i)
            local = D.local_columns(state["momentum"][str(i)])
            buf = torch.zeros_like(target) if local is None else local.reshape(target.shape)
            self.state[shards.params[i]]["momentum_buffer"] = buf.clone()
        if self._graft is not None:
            steps = state["graft"]["step"]
            for i, p in enumerate(shards.params):
                local = D.local_columns(state["graft"]["exp_avg_sq"][str(i)])
                n = shards.ranges[i][1]
                v = torch.zeros(n, dtype=p.dtype, device=w.device) if local is None else local
                self.state[p]["exp_avg_sq"] = v.reshape(n).clone()
                self.state[p]["step"] = steps[i].to(torch.float64).clone()
        self._skipped.copy_(state["skipped"])
