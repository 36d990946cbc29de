"""CAPO: curvature-aware token masking for policy-gradient losses (Melo, Abate, Gal, 2025).

Under aggressive learning rates GRPO-style training collapses. CAPO predicts, for every token, the
change of the objective and of the KL that the update would cause, from a curvature model of the
last layer, and drops the tokens whose update would be unstable.

**Curvature model.** Logits ``z_t = W h_t (+ b)`` with ``h_t`` the detached final hidden state and
``W`` the ``V x H`` head; the policy at position ``t`` is the softmax ``pi_t`` over the top-K logits
``I_t`` (the sampled action is always kept in ``I_t``). With the completion's advantage ``A``
and the score ``s_t = e_{a_t} - pi_t``, the token gradient is ``G_t = A s_t h_t^T``; a direction
model (:mod:`curvopt.capo.direction`) gives the modeled step ``Delta_t = P(G_t)`` and the logit
change ``u_t = Delta_t h_t``. With learning rate ``eta``:

.. math::

    \\Delta J_t = \\eta \\langle G_t, \\Delta_t\\rangle
        + \\tfrac12 \\eta^2 A\\big[(s_t\\cdot u_t)^2
        - u_t^\\top(\\mathrm{Diag}(\\pi_t) - \\pi_t\\pi_t^\\top) u_t\\big],
    \\qquad
    \\Delta \\mathrm{KL}_t = \\tfrac12 \\eta^2 (s_t\\cdot u_t)^2 .

``Delta J_t`` is the second-order expansion of the change of the importance-weighted token objective
``A pi_new(a_t)/pi_old(a_t)``; ``Delta KL_t`` that of the one-sample KL estimate
``(log pi_new(a_t) - log pi_old(a_t))^2 / 2`` (whose expectation over ``a_t`` is the KL). A token
is kept iff ``|Delta J_t| < tau_H`` and ``Delta KL_t < tau_F`` (with ``symmetric=False``:
``0 <= Delta J_t < tau_H``). The softmax-curvature product goes through
:func:`curvopt.kernels.softmax_curvature`.

**Cost.** Tokens are processed in chunks of ``chunk_size``: the largest temporaries are
``chunk x V`` logits and, for the Adam model only, ``chunk x K x H`` per-token matrices; the SGD
model is closed form (``O(K + H)`` per token).

Example:
    >>> head = torch.nn.Linear(8, 5)
    >>> hidden = torch.randn(2, 3, 8)
    >>> actions = torch.randint(0, 5, (2, 3))
    >>> masker = CAPOMasker(tau_h=1e-2, tau_f=1e-4, top_k=4)
    >>> out = masker(head.weight, hidden, actions, torch.tensor([1.0, -1.0]), lr=1e-2,
    ...              bias=head.bias)
    >>> out.keep.shape, out.delta_kl.shape
    (torch.Size([2, 3]), torch.Size([2, 3]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from curvopt.kernels import softmax_curvature

from .direction import (
    AdamDirection,
    AdamOptimizerDirection,
    SGDDirection,
    SGDOptimizerDirection,
    direction_for,
)

Direction = SGDDirection | AdamDirection | SGDOptimizerDirection | AdamOptimizerDirection

#: Elements allowed in one chunk's largest temporary when ``chunk_size`` is not given.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

TokenLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class CAPOMask:
    """Per-token predictions and the resulting mask, all ``(B, T)``.

    Attributes:
        keep: Tokens that pass both thresholds (and are valid completion tokens).
        delta_j: Predicted objective change ``Delta J_t`` (0 on invalid tokens).
        delta_kl: Predicted KL change ``Delta KL_t`` (0 on invalid tokens).
        valid: The completion mask the prediction was made for.
        penalty: The penalty term added to the loss (0-d, detached), or None when no penalty
            is on (:mod:`curvopt.capo.penalty`).
    """

    keep: Tensor
    delta_j: Tensor
    delta_kl: Tensor
    valid: Tensor
    penalty: Tensor | None = None

    @property
    def rejected_fraction(self) -> Tensor:
        """Fraction of valid tokens that were masked out (0-d tensor; no host sync)."""
        n = self.valid.sum().clamp_min(1)
        return (self.valid & ~self.keep).sum() / n

    def stats(self) -> dict[str, Tensor]:
        """Summary statistics, as 0-d tensors, over two named token sets.

        ``*_all``: every valid token (rejected ones included), ``*_kept``: the kept tokens only
        (what the update is made of; 0 when none is kept). Keys: ``rejected_fraction``,
        ``num_valid``, ``num_kept`` and ``mean_delta_j``, ``mean_abs_delta_j``,
        ``mean_delta_kl``, ``max_delta_kl``, each with the suffix ``_all`` or ``_kept``.
        """
        out = {
            "rejected_fraction": self.rejected_fraction,
            "num_valid": self.valid.sum(),
            "num_kept": self.keep.sum(),
        }
        for name, sel in (("all", self.valid), ("kept", self.keep)):
            n = sel.sum().clamp_min(1)
            w = sel.to(self.delta_kl.dtype)
            out[f"mean_delta_j_{name}"] = (self.delta_j * w).sum() / n
            out[f"mean_abs_delta_j_{name}"] = (self.delta_j.abs() * w).sum() / n
            out[f"mean_delta_kl_{name}"] = (self.delta_kl * w).sum() / n
            out[f"max_delta_kl_{name}"] = (self.delta_kl * w).max()
        return out


def _check_threshold(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative threshold (inf disables it), got {value}")
    return value


def _check_lr(lr: float) -> float:
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite non-negative number, got {lr}")
    return float(lr)


def _augment(
    weight: Tensor, bias: Tensor | None, hidden: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Fold the bias into the weight, ``[W, b]`` and ``[h, 1]``, and the temperature into ``h``.

    Logits ``(W h + b) / T`` are ``[W, b] [h, 1] / T``, so dividing the augmented hidden state by
    ``T`` gives the tempered policy and its gradients with respect to ``[W, b]`` exactly.
    """
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if bias is not None:
        ones = hidden.new_ones(*hidden.shape[:-1], 1)
        weight, hidden = torch.cat([weight, bias[:, None]], 1), torch.cat([hidden, ones], -1)
    return weight, (hidden if temperature == 1 else hidden / temperature)


def _validate(weight, bias, hidden, actions, advantages, mask):
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError("weight must be the (V, H) last-layer weight matrix")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    V, H = weight.shape
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (V,)):
        raise ValueError(f"bias must have shape ({V},), got {getattr(bias, 'shape', bias)}")
    if not isinstance(hidden, Tensor) or hidden.ndim != 3 or hidden.shape[-1] != H:
        raise ValueError(
            f"hidden must have shape (B, T, {H}) to match the weight's hidden size, "
            f"got {tuple(getattr(hidden, 'shape', ()))}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden has dtype {hidden.dtype} but the weight has {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but the weight is on {weight.device}")
    B, T = hidden.shape[:2]
    if not isinstance(actions, Tensor) or actions.shape != (B, T):
        raise ValueError(
            f"actions must have shape {(B, T)} like hidden[..., 0], "
            f"got {tuple(getattr(actions, 'shape', ()))}"
        )
    if actions.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"actions must be integer token ids, got {actions.dtype}")
    if actions.numel() and (bool((actions < 0).any()) or bool((actions >= V).any())):
        raise ValueError(f"actions must be token ids in [0, {V}), the head's vocabulary")
    if not isinstance(advantages, Tensor) or advantages.shape not in ((B,), (B, T)):
        raise ValueError(
            f"advantages must have shape ({B},) (one per completion) or {(B, T)}, "
            f"got {tuple(getattr(advantages, 'shape', ()))}"
        )
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages contain NaN or Inf")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != (B, T):
            raise ValueError(f"mask must have shape {(B, T)}, got {getattr(mask, 'shape', mask)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")


class CAPOMasker:
    """Predict per-token ``Delta J`` and ``Delta KL`` and keep the tokens below both thresholds.

    Args:
        tau_h: Threshold on ``|Delta J_t|`` (``>= 0``; ``inf`` disables it).
        tau_f: Threshold on ``Delta KL_t`` (``>= 0``; ``inf`` disables it).
        top_k: Size ``K`` of the per-position softmax support (``None``: the whole vocabulary).
        direction: ``"sgd"``, ``"adam"`` or a direction model instance
            (:class:`~curvopt.capo.direction.SGDDirection`,
            :class:`~curvopt.capo.direction.AdamDirection`, or a model of a real optimizer from
            :func:`~curvopt.capo.direction.direction_for`).
        symmetric: Keep iff ``|Delta J| < tau_h`` (True) or ``0 <= Delta J < tau_h`` (False).
            With ``tau_h = inf`` the rule on ``Delta J`` is off either way (no token is rejected
            for its ``Delta J``, whatever its sign).
        chunk_size: Tokens per chunk (``None``: as many as fit
            :data:`DEFAULT_CHUNK_ELEMENTS` elements in the largest temporary).
        level: Which prediction gates the mask: ``"token"`` (each token by its own ``Delta J_t``,
            ``Delta KL_t``; the CAPO recipe), ``"sequence"`` (all tokens of a completion by its
            token-averaged prediction) or ``"global"`` (all or none, by the batch's), see
            :meth:`predict_groups`.
    """

    def __init__(
        self,
        tau_h: float,
        tau_f: float,
        top_k: int | None = None,
        direction: str | Direction = "sgd",
        symmetric: bool = True,
        chunk_size: int | None = None,
        level: str = "token",
    ):
        if level not in ("token", "sequence", "global"):
            raise ValueError(f"level must be 'token', 'sequence' or 'global', got {level!r}")
        self.level = level
        self.tau_h = tau_h
        self.tau_f = tau_f
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        if isinstance(direction, str):
            if direction not in ("sgd", "adam"):
                raise ValueError(f"direction must be 'sgd', 'adam' or a model, got {direction!r}")
            direction = SGDDirection() if direction == "sgd" else AdamDirection()
        if not all(hasattr(direction, a) for a in ("token_terms", "preview", "update")):
            raise TypeError("direction must provide token_terms, preview and update")
        if not hasattr(direction, "forms_token_matrices"):
            direction.forms_token_matrices = True  # the memory-safe assumption for chunking
        self.direction = direction
        if not isinstance(symmetric, bool):  # bool("False") is True: refuse, never convert
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
        self.symmetric = symmetric
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        self.chunk_size = chunk_size

    @property
    def tau_h(self) -> float:
        """Threshold on ``|Delta J_t|``."""
        return self._tau_h

    @tau_h.setter
    def tau_h(self, value: float) -> None:
        self._tau_h = _check_threshold(value, "tau_h")

    @property
    def tau_f(self) -> float:
        """Threshold on ``Delta KL_t``."""
        return self._tau_f

    @tau_f.setter
    def tau_f(self, value: float) -> None:
        self._tau_f = _check_threshold(value, "tau_f")

    def _chunk(self, K: int, H: int, V: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per_token = max(V, K * H if self.direction.forms_token_matrices else K + H)
        return max(1, DEFAULT_CHUNK_ELEMENTS // per_token)

    def predict(
        self,
        weight: Tensor,
        hidden: Tensor,
        actions: Tensor,
        advantages: Tensor,
        lr: float,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        temperature: float = 1.0,
        differentiable: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Predicted ``Delta J_t`` and ``Delta KL_t`` for every token.

        Args:
            weight: ``(V, H)`` last-layer weight ``W``.
            hidden: ``(B, T, H)`` final hidden states (used detached unless ``differentiable``).
            actions: ``(B, T)`` sampled token ids.
            advantages: ``(B,)`` per completion or ``(B, T)`` per token.
            lr: Learning rate ``eta`` of the step being modeled.
            bias: Optional ``(V,)`` head bias (folded in as a column of ``W``).
            mask: Optional ``(B, T)`` bool completion mask; predictions are 0 outside it.
            temperature: The policy is ``softmax((W h + b) / temperature)`` (TRL divides the
                logits by its sampling temperature).
            differentiable: Build the predictions with autograd as functions of ``weight``,
                ``bias`` and ``hidden`` (through ``pi_t``, ``G_t`` and ``u_t = Delta_t h_t``;
                the top-K support and the direction model's preconditioner, momentum buffer
                and decay terms are constants; see :mod:`curvopt.capo.penalty`). The values
                equal the no-grad ones. With the Adam models each chunk is recomputed in the
                backward pass (activation checkpointing), so memory stays ``O(chunk K H)``.

        Returns:
            ``(delta_j, delta_kl)``, each ``(B, T)`` in the weight's dtype.

        Raises:
            ValueError: On mismatched shapes, ``top_k`` larger than the vocabulary, token ids out
                of range, non-finite advantages, a negative learning rate.
            TypeError: On wrong dtypes.
        """
        if not differentiable:
            with torch.no_grad():
                return self._predict(
                    weight, hidden, actions, advantages, lr, bias, mask, temperature, False
                )
        return self._predict(weight, hidden, actions, advantages, lr, bias, mask, temperature, True)

    def _inputs(self, weight, hidden, actions, advantages, lr, bias, mask, temperature, grad):
        """Checked inputs: the augmented ``[W, b]`` and ``[h, 1] / T``, the support size, the lr.

        Detached unless ``grad`` (the differentiable predictions).
        """
        _validate(weight, bias, hidden, actions, advantages, mask)
        lr = _check_lr(lr)
        V = weight.shape[0]
        K = V if self.top_k is None else self.top_k
        if K > V:
            raise ValueError(f"top_k={K} is larger than the vocabulary size V={V}")
        if not grad:
            weight, hidden = weight.detach(), hidden.detach()
            bias = None if bias is None else bias.detach()
        W, h = _augment(weight, bias, hidden, temperature)
        return W, h, K, lr

    def _predict(self, weight, hidden, actions, advantages, lr, bias, mask, temperature, grad):
        W, h, K, lr = self._inputs(
            weight, hidden, actions, advantages, lr, bias, mask, temperature, grad
        )
        V = W.shape[0]
        moments = getattr(self.direction, "exp_avg", None)
        if moments is not None and moments.shape != W.shape:
            raise ValueError(
                f"the direction model's moments have shape {tuple(moments.shape)} but the head "
                f"(with its bias folded in) has shape {tuple(W.shape)}"
            )
        B, T, Hp = h.shape
        h = h.reshape(B * T, Hp)
        a = actions.reshape(-1).long()
        adv = advantages.detach().to(W.dtype)
        adv = (adv[:, None].expand(B, T) if adv.ndim == 1 else adv).reshape(-1)
        step = self._chunk(K, Hp, V)
        checkpointed = grad and torch.is_grad_enabled() and self.direction.forms_token_matrices
        dj, dkl = [], []
        for lo in range(0, B * T, step):
            sl = slice(lo, lo + step)
            args = (W, h[sl], a[sl], adv[sl], K, lr)
            if checkpointed:
                out = checkpoint(self._chunk_terms, *args, use_reentrant=False)
            else:
                out = self._chunk_terms(*args)
            dj.append(out[0])
            dkl.append(out[1])
        dj = torch.cat(dj).view(B, T) if dj else W.new_zeros(B, T)
        dkl = torch.cat(dkl).view(B, T) if dkl else W.new_zeros(B, T)
        if mask is not None:
            dj, dkl = dj * mask, dkl * mask
        return dj, dkl

    def _chunk_terms(self, W, h, a, adv, K, lr):
        rows, zk, s = _support(h @ W.T, a, K)
        g_dot_d, u, *second = self.direction.token_terms(h, s, adv, rows)
        su = (s * u).sum(-1)
        curv = (u * softmax_curvature(zk, u)).sum(-1)
        dj = lr * g_dot_d + 0.5 * lr**2 * adv * (su.square() - curv)
        if second:  # a logit change with an eta^2 part (a LoRA head: curvopt.capo.lora_head)
            dj = dj + lr**2 * adv * (s * second[0]).sum(-1)
        return dj, 0.5 * lr**2 * su.square()

    @torch.no_grad()
    def predict_groups(
        self,
        weight: Tensor,
        hidden: Tensor,
        actions: Tensor,
        advantages: Tensor,
        lr: float,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        level: str = "sequence",
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Per-sequence or global predictions from token-averaged gradients.

        For a group ``g`` of valid tokens (one completion, or the whole batch) with weights
        ``w_t`` summing to 1 (``1/n_i`` within completion ``i``; ``1/(B' n_i)`` globally over the
        ``B'`` completions with a valid token, GRPO's averaging), the group gradient is
        ``G_g = sum_t w_t A_t s_t h_t^T`` (on each token's top-K rows), the modeled step
        ``Delta_g = P(G_g)`` and ``u_t = Delta_g h_t`` on the rows ``I_t``:

        .. math::

            \\Delta J_g = \\sum_{t\\in g} w_t A_t\\big[\\eta\\, s_t\\cdot u_t
                + \\tfrac12\\eta^2\\big((s_t\\cdot u_t)^2 - u_t^\\top F_t u_t\\big)\\big],
            \\qquad
            \\Delta\\mathrm{KL}_g = \\tfrac12\\eta^2 \\sum_{t\\in g} w_t (s_t\\cdot u_t)^2,

        with ``F_t = Diag(pi_t) - pi_t pi_t^T`` (the first-order term equals
        ``eta <G_g, Delta_g>``). Each group forms one dense ``(V, H)`` gradient: the cost is
        ``O(groups x V x H)``, well above the token-level mask's.

        Args:
            weight: ``(V, H)`` last-layer weight.
            hidden: ``(B, T, H)`` final hidden states.
            actions: ``(B, T)`` sampled token ids.
            advantages: ``(B,)`` or ``(B, T)``.
            lr: Learning rate ``eta``.
            bias: Optional ``(V,)`` head bias.
            mask: Optional ``(B, T)`` bool completion mask.
            level: ``"sequence"`` (returns ``(B,)`` tensors) or ``"global"`` (0-d tensors).
            temperature: Logit temperature (see :meth:`predict`).

        Returns:
            ``(delta_j, delta_kl)``; 0 for a completion without valid tokens.
        """
        if level not in ("sequence", "global"):
            raise ValueError(f"level must be 'sequence' or 'global', got {level!r}")
        W, h, K, lr = self._inputs(
            weight, hidden, actions, advantages, lr, bias, mask, temperature, False
        )
        V = W.shape[0]
        B, T, Hp = h.shape
        valid = torch.ones(B, T, dtype=torch.bool, device=h.device) if mask is None else mask
        adv = advantages.to(W.dtype)
        adv = adv[:, None].expand(B, T) if adv.ndim == 1 else adv
        n = valid.sum(1)
        w = valid.to(W.dtype) / n.clamp_min(1)[:, None].to(W.dtype)
        if level == "global":
            w = w / (n > 0).sum().clamp_min(1)
            groups = [torch.arange(B, device=h.device)]
        else:
            groups = [torch.tensor([i], device=h.device) for i in range(B)]
        dj = W.new_zeros(len(groups))
        dkl = W.new_zeros(len(groups))
        for gi, idx in enumerate(groups):
            sel = valid[idx]
            if not bool(sel.any()):
                continue
            hg, ag = h[idx][sel], actions[idx][sel].long()
            wa = (w[idx] * adv[idx])[sel]
            rows, zk, sc = _support(hg @ W.T, ag, K)
            grad = W.new_zeros(W.shape)
            step = self._chunk(K, Hp, V)
            for lo in range(0, hg.shape[0], step):
                sl = slice(lo, lo + step)
                src = (wa[sl, None, None] * sc[sl, :, None]) * hg[sl, None, :]
                grad.index_add_(0, rows[sl].reshape(-1), src.reshape(-1, Hp))
            delta, second = self._preview(grad)
            u = (hg @ delta.T).gather(1, rows)
            su = (sc * u).sum(-1)
            curv = (u * softmax_curvature(zk, u)).sum(-1)
            if second is not None:  # the eta^2 logit change of a LoRA head
                su2 = (sc * (hg @ second.T).gather(1, rows)).sum(-1)
                su_j = su + lr * su2
            else:
                su_j = su
            dj[gi] = (wa * (lr * su_j + 0.5 * lr**2 * (su.square() - curv))).sum()
            dkl[gi] = 0.5 * lr**2 * (w[idx][sel] * su.square()).sum() / w[idx][sel].sum()
        return (dj[0], dkl[0]) if level == "global" else (dj, dkl)

    def _preview(self, grad) -> tuple[Tensor, Tensor | None]:
        """The modeled step ``Delta`` of a whole gradient, and its ``eta^2`` part (or None).

        A plain head's logit change is ``eta Delta h``; a LoRA head's
        (:class:`~curvopt.capo.lora_head.LoRAHeadDirection`) is ``eta Delta h + eta^2 D_2 h``.
        """
        both = getattr(self.direction, "preview_with_second_order", None)
        return both(grad) if both is not None else (self.direction.preview(grad), None)

    def keep(self, delta_j: Tensor, delta_kl: Tensor) -> Tensor:
        """The keep rule on given predictions (any shape): see :class:`CAPOMasker`.

        ``|Delta J| < tau_h`` (``symmetric=False``: ``0 <= Delta J < tau_h``) and
        ``Delta KL < tau_f``; an infinite threshold switches its rule off entirely.
        """
        ok = torch.ones_like(delta_j, dtype=torch.bool)
        if math.isfinite(self.tau_h):
            if self.symmetric:
                ok = delta_j.abs() < self.tau_h
            else:
                ok = (delta_j >= 0) & (delta_j < self.tau_h)
        if math.isfinite(self.tau_f):
            ok = ok & (delta_kl < self.tau_f)
        return ok

    def __call__(
        self,
        weight: Tensor,
        hidden: Tensor,
        actions: Tensor,
        advantages: Tensor,
        lr: float,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        temperature: float = 1.0,
    ) -> CAPOMask:
        """Predict and mask; arguments as in :meth:`predict`. Returns a :class:`CAPOMask`.

        With ``level="sequence"``/``"global"`` the mask's ``delta_j``/``delta_kl`` hold, on each
        valid token, the prediction of its completion / of the batch.
        """
        if self.level == "token":
            dj, dkl = self.predict(weight, hidden, actions, advantages, lr, bias, mask, temperature)
        else:
            dj, dkl = self.predict_groups(
                weight, hidden, actions, advantages, lr, bias, mask, self.level, temperature
            )
            shape = hidden.shape[:2]
            dj = (dj[:, None] if dj.ndim else dj).expand(shape)
            dkl = (dkl[:, None] if dkl.ndim else dkl).expand(shape)
            if mask is not None:
                dj, dkl = dj * mask, dkl * mask
        valid = torch.ones_like(dj, dtype=torch.bool) if mask is None else mask
        return CAPOMask(keep=self.keep(dj, dkl) & valid, delta_j=dj, delta_kl=dkl, valid=valid)

    @torch.no_grad()
    def predict_update(
        self,
        weight: Tensor,
        hidden: Tensor,
        ascent_grad: Tensor,
        lr: float,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        actions: Tensor | None = None,
        advantages: Tensor | None = None,
        token_weights: Tensor | None = None,
        temperature: float = 1.0,
    ) -> dict[str, Tensor]:
        """Predicted mean KL and objective change of one whole step of the last layer.

        The modeled step is ``eta P(g)`` for the batch ascent gradient ``g`` (``(V, H)``, or
        ``(V, H + 1)`` with the bias gradient as last column); per token the logit change is
        ``u_t = P(g) h_t`` over the full vocabulary, ``p_t`` the full softmax,
        ``F_t = Diag(p_t) - p_t p_t^T`` and ``s_t = e_{a_t} - p_t``:

        .. math::

            \\mathrm{KL} = \\operatorname{mean}_t \\tfrac12\\eta^2 u_t^\\top F_t u_t,
            \\qquad
            \\Delta J = \\sum_t w_t A_t \\big[\\eta\\, s_t\\cdot u_t
                + \\tfrac12\\eta^2\\big((s_t\\cdot u_t)^2 - u_t^\\top F_t u_t\\big)\\big],

        the second-order expansions of the mean KL(p_old || p_new) over the valid tokens and of
        the change of the batch surrogate ``J = sum_t w_t A_t pi_new(a_t) / pi_old(a_t)``. The
        direction model's state is not changed.

        Args:
            weight: ``(V, H)`` last-layer weight.
            hidden: ``(B, T, H)`` final hidden states.
            ascent_grad: The step's ascent gradient of the head (``-grad`` of the loss); for
                a LoRA head the factors' ``(-A.grad, -B.grad)``.
            lr: Learning rate ``eta``.
            actions: ``(B, T)`` sampled ids (needed for ``delta_j``).
            advantages: ``(B,)`` or ``(B, T)`` (needed for ``delta_j``).
            token_weights: ``(B, T)`` weights ``w_t`` of the surrogate (default: the token mean
                over valid tokens, ``1 / #valid``).
            bias: Optional ``(V,)`` head bias.
            mask: Optional ``(B, T)`` bool mask of the valid tokens.
            temperature: Logit temperature (see :meth:`predict`).

        Returns:
            ``{"kl": 0-d, "delta_j": 0-d}`` (``delta_j`` is NaN without actions/advantages).
        """
        lr = _check_lr(lr)
        if hidden.ndim != 3 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"hidden must have shape (B, T, {weight.shape[1]}), got {tuple(hidden.shape)}"
            )
        if mask is not None and mask.shape != hidden.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])}")
        with_j = actions is not None and advantages is not None
        if with_j:
            _validate(weight, bias, hidden, actions, advantages, mask)
        W, h = _augment(
            weight.detach(), None if bias is None else bias.detach(), hidden.detach(), temperature
        )
        if isinstance(ascent_grad, tuple):  # the factors' gradients (a LoRA head)
            ascent_grad = tuple(g.to(W.dtype) for g in ascent_grad)
        elif ascent_grad.shape != W.shape:
            raise ValueError(
                f"ascent_grad must have shape {tuple(W.shape)}, got {ascent_grad.shape}"
            )
        else:
            ascent_grad = ascent_grad.to(W.dtype)
        delta, second = self._preview(ascent_grad)
        B, T, Hp = h.shape
        h = h.reshape(B * T, Hp)
        valid = (
            torch.ones(B * T, dtype=W.dtype, device=W.device)
            if mask is None
            else mask.reshape(-1).to(W.dtype)
        )
        if token_weights is None:
            tw = valid / valid.sum().clamp_min(1)
        else:
            if token_weights.shape != (B, T):
                raise ValueError(f"token_weights must have shape {(B, T)}")
            tw = token_weights.reshape(-1).to(W.dtype) * valid
        if with_j:
            a = actions.reshape(-1).long()
            adv = advantages.to(W.dtype)
            adv = (adv[:, None].expand(B, T) if adv.ndim == 1 else adv).reshape(-1)
        kl = W.new_zeros(B * T)
        dj = W.new_zeros(B * T)
        step = self._chunk(1, Hp, W.shape[0])
        for lo in range(0, B * T, step):
            sl = slice(lo, lo + step)
            z, u = h[sl] @ W.T, h[sl] @ delta.T
            curv = (u * softmax_curvature(z, u)).sum(-1)
            kl[sl] = 0.5 * lr**2 * curv
            if with_j:
                p = torch.softmax(z, -1)
                su = u.gather(1, a[sl, None]).squeeze(1) - (p * u).sum(-1)
                su_j = su
                if second is not None:  # the eta^2 logit change of a LoRA head
                    v = h[sl] @ second.T
                    su_j = su + lr * (v.gather(1, a[sl, None]).squeeze(1) - (p * v).sum(-1))
                dj[sl] = adv[sl] * (lr * su_j + 0.5 * lr**2 * (su.square() - curv))
        nan = W.new_full((), float("nan"))
        return {
            "kl": (kl * valid).sum() / valid.sum().clamp_min(1),
            "delta_j": (dj * tw).sum() if with_j else nan,
        }

    def predict_update_kl(
        self,
        weight: Tensor,
        hidden: Tensor,
        ascent_grad: Tensor,
        lr: float,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Predicted mean KL(pi_old || pi_new) of one whole step: ``predict_update(...)["kl"]``."""
        return self.predict_update(weight, hidden, ascent_grad, lr, bias, mask)["kl"]


def _support(z: Tensor, a: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-K rows of ``z`` (``(c, V)``) with the action forced in, their logits, and the scores.

    Returns ``rows`` and ``zk`` (``(c, K)``) and ``s = e_a - softmax(zk)``.
    """
    if K < z.shape[1]:
        zk, top = z.topk(K, dim=-1)
        # the sampled action is always in the support: it replaces the last slot where missing
        # (out of place: autograd keeps topk's indices for the differentiable predictions)
        swap = ~(top == a[:, None]).any(-1, keepdim=True) & (
            torch.arange(K, device=z.device) == K - 1
        )
        rows = torch.where(swap, a[:, None], top)
        zk = torch.where(swap, z.gather(1, a[:, None]), zk)
    else:
        rows = torch.arange(z.shape[1], device=z.device).expand_as(z)
        zk = z
    pi = torch.softmax(zk, dim=-1)
    return rows, zk, (rows == a[:, None]).to(pi.dtype) - pi


def calibrate_thresholds(
    delta_j: Tensor, delta_kl: Tensor, valid: Tensor | None = None, percentile: float = 95.0
) -> tuple[float, float]:
    """Thresholds ``(tau_h, tau_f)`` at a percentile of observed ``|Delta J|`` and ``Delta KL``.

    Thresholds from the paper's 7B-model recipes do not transfer to other model sizes; this sets
    them from the distribution of the predictions on a calibration batch instead.

    Args:
        delta_j: Predicted ``Delta J_t``.
        delta_kl: Predicted ``Delta KL_t``, same shape.
        valid: Optional bool mask of the tokens to use.
        percentile: In ``(0, 100]``.

    Returns:
        Python floats ``(tau_h, tau_f)``.
    """
    if delta_j.shape != delta_kl.shape:
        raise ValueError(f"delta_j {delta_j.shape} and delta_kl {delta_kl.shape} differ in shape")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    if valid is not None:
        if valid.shape != delta_j.shape:
            raise ValueError(f"valid must have shape {tuple(delta_j.shape)}")
        delta_j, delta_kl = delta_j[valid], delta_kl[valid]
    if delta_j.numel() == 0:
        raise ValueError("no tokens to calibrate on")
    q = percentile / 100
    return (
        float(torch.quantile(delta_j.abs().double().flatten(), q)),
        float(torch.quantile(delta_kl.double().flatten(), q)),
    )


__all__ = [
    "AdamDirection",
    "AdamOptimizerDirection",
    "CAPOMask",
    "CAPOMasker",
    "SGDDirection",
    "SGDOptimizerDirection",
    "calibrate_thresholds",
    "direction_for",
]
