"""CAPO's penalty variants: ``lambda * Delta KL`` or ``lambda * Delta J`` added to the token loss.

Besides masking, the authors' code (``luckeciano/stable-pg-llm`` at 933fe01, read for facts only)
has coefficients that add the predicted per-token objective change (``hessian_token_lambda``) or
KL change (``fisher_token_lambda``) to the per-token loss before GRPO's averaging (and sentence-
and global-level ones added after it). Their recipes leave all of them at 0, and there the
predictions are computed inside a ``torch.no_grad()`` method, so the added term is a constant that
changes the logged loss but not the gradient. Here the penalty is built to have a gradient.

**What is added.** With the loss type's own token weights ``w_t`` over the tokens the loss counts
(the completion mask times the CAPO mask: rejected tokens get no penalty either; see
:func:`curvopt.capo.token_losses.token_weights` and the TRL trainer's weights),

.. math::

    L' = L + \\lambda \\sum_t w_t\\, q_t, \\qquad
    q_t \\in \\{\\Delta\\mathrm{KL}_t,\\; \\Delta J_t,\\; |\\Delta J_t|\\}

(``penalty="delta_kl"``, ``"delta_j"``, ``"abs_delta_j"``), with ``Delta J_t`` and
``Delta KL_t`` the per-token predictions of :class:`~curvopt.capo.masker.CAPOMasker` at the
coming step's learning rate ``eta``. ``delta_j`` is the authors' signed form; ``abs_delta_j``
penalizes the quantity the symmetric mask thresholds. ``lambda >= 0``.

**What is differentiated.** The predictions are rebuilt with autograd as functions of the head
``[W, b]`` and the final hidden state ``h_t`` (so the gradient reaches the whole network through
``h_t``): the policy ``pi_t = softmax(W_I h_t / T)`` on the top-K support ``I_t``, the score
``s_t = e_{a_t} - pi_t``, the token gradient ``G_t = A s_t h_t^T``, the modeled step
``Delta_t = P(G_t)`` and the logit change ``u_t = Delta_t h_t``;
``Delta KL_t = eta^2 (s_t u_t)^2 / 2`` and
``Delta J_t = eta <G_t, Delta_t> + eta^2 A [(s_t u_t)^2 - u_t^T F_t u_t] / 2``. Held constant:
the support ``I_t`` (a discrete choice), the advantages, the learning rate and the optimizer
model's map from ``G_t`` to ``Delta_t`` apart from its dependence on ``G_t``: SGD's
``alpha G_t + D_0`` keeps ``alpha`` and the drift ``D_0`` (momentum buffer, weight decay of the
current weights) fixed, and Adam's step keeps its denominator ``sqrt(v_hat) + eps`` (the
preconditioner, which includes the token's own ``G_t^2``) fixed, so ``Delta_t`` is affine in
``G_t``. Why: the penalty should steer the policy (through ``pi_t`` and ``h_t``) towards tokens
whose update is predicted to be small, not differentiate the optimizer's bookkeeping;
differentiating Adam's denominator would also reward inflating ``v`` (``Delta`` shrinks as
``|G|`` grows, sign-like steps) rather than a smaller change of the policy.

Example:
    >>> from curvopt.capo.masker import CAPOMasker
    >>> head = torch.nn.Linear(4, 6)
    >>> hidden = torch.randn(2, 3, 4, requires_grad=True)
    >>> pen = CAPOPenalty("delta_kl", 0.5)
    >>> value = pen(CAPOMasker(float("inf"), float("inf")), head.weight, hidden,
    ...             torch.randint(0, 6, (2, 3)), torch.tensor([1.0, -1.0]), 0.1,
    ...             torch.full((2, 3), 1 / 6), bias=head.bias)
    >>> value.backward()
    >>> hidden.grad.shape
    torch.Size([2, 3, 4])
"""

from __future__ import annotations

import math
from typing import Protocol

from torch import Tensor


class TokenPredictor(Protocol):
    """What the penalty needs from a masker: per-token ``Delta J_t`` and ``Delta KL_t``.

    :class:`~curvopt.capo.masker.CAPOMasker` is one. The penalty depends on this protocol, not on
    the masker's module, so :mod:`curvopt.capo.token_mask` can import the penalty without a cycle.
    """

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
        """``(delta_j, delta_kl)``, each ``(B, T)``; see :meth:`CAPOMasker.predict`."""
        ...


PENALTIES = ("none", "delta_kl", "delta_j", "abs_delta_j")


class CAPOPenalty:
    """``lambda * sum_t w_t q_t`` with ``q_t`` a differentiable CAPO prediction (module docs).

    Args:
        kind: ``"none"``, ``"delta_kl"``, ``"delta_j"`` or ``"abs_delta_j"``.
        coef: ``lambda >= 0`` (finite). ``0`` (or ``kind="none"``) switches it off: nothing is
            computed and the loss is left untouched.

    Raises:
        ValueError: For an unknown kind or a negative / non-finite coefficient.
        TypeError: For a non-string kind or a non-number coefficient.
    """

    def __init__(self, kind: str = "none", coef: float = 0.0):
        if not isinstance(kind, str):
            raise TypeError(f"penalty must be a string, one of {PENALTIES}; got {kind!r}")
        if kind not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}; got {kind!r}")
        if isinstance(coef, bool) or not isinstance(coef, int | float):
            raise TypeError(f"penalty_coef must be a number, got {type(coef).__name__}")
        coef = float(coef)
        if not math.isfinite(coef) or coef < 0:
            raise ValueError(f"penalty_coef must be a finite number >= 0, got {coef}")
        self.kind, self.coef = kind, coef

    @property
    def active(self) -> bool:
        """Whether the penalty adds anything (a kind other than ``"none"`` and ``lambda > 0``)."""
        return self.kind != "none" and self.coef > 0

    def per_token(self, delta_j: Tensor, delta_kl: Tensor) -> Tensor:
        """``q_t`` from the predictions (any shape)."""
        if self.kind == "delta_kl":
            return delta_kl
        if self.kind == "delta_j":
            return delta_j
        if self.kind == "abs_delta_j":
            return delta_j.abs()
        raise ValueError("the penalty is off (kind='none')")

    def __call__(
        self,
        masker: TokenPredictor,
        weight: Tensor,
        hidden: Tensor,
        actions: Tensor,
        advantages: Tensor,
        lr: float,
        weights: Tensor,
        bias: Tensor | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """The penalty ``lambda sum_t w_t q_t`` (0-d, with grad).

        Args:
            masker: The predictor (a :class:`~curvopt.capo.masker.CAPOMasker`) whose
                predictions are penalized.
            weight: ``(V, H)`` head weight.
            hidden: ``(B, T, H)`` final hidden states (not detached: the gradient flows into them).
            actions: ``(B, T)`` token ids.
            advantages: ``(B,)`` or ``(B, T)``.
            lr: Learning rate of the coming step.
            weights: ``(B, T)`` token weights ``w_t``, zero on tokens not counted (padding,
                rejected by the mask).
            bias: Optional ``(V,)`` head bias.
            temperature: Logit temperature.
        """
        if weights.shape != hidden.shape[:2]:
            raise ValueError(
                f"weights must have shape {tuple(hidden.shape[:2])}, got {tuple(weights.shape)}"
            )
        counted = weights != 0
        dj, dkl = masker.predict(
            weight,
            hidden,
            actions,
            advantages,
            lr,
            bias,
            counted,
            temperature,
            differentiable=True,
        )
        q = self.per_token(dj, dkl)
        return self.coef * (weights.detach().to(q.dtype) * q).sum()


__all__ = ["PENALTIES", "CAPOPenalty", "TokenPredictor"]
