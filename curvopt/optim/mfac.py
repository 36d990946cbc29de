r"""The M-FAC optimizer: the gradient preconditioned by a sliding-window empirical Fisher inverse.

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information" (NeurIPS 2021), optimization section. With ``G`` the ``(m, d)`` matrix of the last
``m`` gradients of *all* parameters of the optimizer (flattened once, in parameter-group order),

.. math::
    F = \text{damp}\, I + G^\top G / m, \qquad u_t = F^{-1} g_t,

where ``g_t`` is added to the window before ``u_t`` is computed. The inverse products come from
:class:`curvopt.mfac.SlidingWindowMFAC` (Woodbury identity, ``O(m d + m^2)`` per step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvopt import distributed as D
from curvopt.mfac import SlidingWindowMFAC
from curvopt.mfac._validation import finite_flag
from curvopt.optim._state_checks import check_optimizer_state
from curvopt.optim.mfac_shards import ParamShards
from curvopt.utils.params import trainable

_WINDOW_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_STATE_KEY = "mfac_window"
_REQUIRES_GRAD_CHANGED = (
    "MFAC's window spans the parameters that had requires_grad=True at construction; "
    "requires_grad was changed since. Build a new optimizer for the new set of trainable parameters"
)
_SHARED = ("m", "damp", "window_dtype", "nonfinite")


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


class MFAC(Optimizer):
    r"""M-FAC: SGD on the gradient preconditioned by a sliding-window empirical Fisher inverse.

    One step, with ``g`` the gradient of all parameters as one vector and ``w`` the parameters:

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
    ``d``-vector per parameter with momentum: see :meth:`memory_bytes`.

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
        m: Window size, the number of recent gradients kept (>= 1).
        damp: Damping of ``F`` (> 0); larger values move the step towards SGD with step ``lr/damp``.
        momentum: Heavy-ball momentum in ``[0, 1)``.
        weight_decay: Weight decay (>= 0), coupled or decoupled as set by the next argument.
        decoupled_weight_decay: Use decoupled (AdamW-style) instead of coupled weight decay.
        window_dtype: Storage dtype of the window (float32, bfloat16 or float64; default: the
            parameters' dtype). The ``m x m`` algebra is float64 regardless.
        nonfinite: ``"raise"`` or ``"skip"`` (see above).
        process_group: ``torch.distributed`` group for ZeRO-1 sharding of plain parameters, or
            None. With FSDP2 parameters it may be None or a group with the mesh's ranks.
        check_replicated_grads: ZeRO-1 only: check each step that all ranks' gradients agree.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = MFAC(model.parameters(), lr=1e-2, m=8, damp=1e-3, momentum=0.9)
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
        m: int = 1024,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        window_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        process_group: object = None,
        check_replicated_grads: bool = False,
    ) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m (window size) must be an integer >= 1, got {m!r}")
        if not (isinstance(damp, (int, float)) and damp > 0):
            raise ValueError(f"damp must be a number > 0, got {damp!r}")
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
        self._m, self._damp, self._nonfinite = m, float(damp), nonfinite
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
        self._check_replicated = bool(check_replicated_grads)
        self._window = SlidingWindowMFAC(
            self._shards.local_dim,
            m,
            self._damp,
            device=ps[0].device,
            dtype=ps[0].dtype if window_dtype is None else window_dtype,
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
        """Bytes held: the window (``m d`` entries + float64 ``m x m``) plus momentum buffers."""
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
                stacklevel=3,  # the caller of step (through torch.no_grad's wrapper)
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
            ok = ~bad
            evicted = window.G[window.count % window.m].to(g.dtype)
            g = torch.where(ok, g, evicted)
            self._skipped.add_((~ok).to(self._skipped.dtype))
            mask = ok.to(g.dtype)
        u = window.add_and_ihvp(g, on_nonfinite="ignore")  # checked above
        if self._nonfinite == "raise" and window.refreshed:
            window.check_conditioning()  # once per refresh, in the mode that synchronizes anyway
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
                w.add_(u_p, alpha=-lr)
        shards.gather_()  # ZeRO-1: the one all-gather of the new parameters
        return loss

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
        check_optimizer_state(
            self,
            state_dict,
            ["momentum_buffer"],
            lambda p: local.get(id(p), p.shape),
            check_group=_check_group_hyperparameters,
        )
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
        }

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`sharded_state_dict` filled by ``torch.distributed.checkpoint.load``.

        The checkpoint may come from another world size; this rank takes its own coordinates.
        """
        if not isinstance(state, dict) or {"window", "momentum", "skipped"} - set(state):
            raise ValueError(
                "state must be the dict of sharded_state_dict() after dcp.load, with the keys "
                "'window', 'momentum' and 'skipped'"
            )
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
        self._skipped.copy_(state["skipped"])
