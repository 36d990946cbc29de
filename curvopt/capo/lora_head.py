r"""CAPO's model of a LoRA adapter on the output layer: the exact low-rank update of the head.

With LoRA on the head the logits are ``z = (W_0 + s B A) h (+ b)``: ``W_0`` (``V x H``) and
``b`` frozen, ``A`` (``r x H``) and ``B`` (``V x r``) trained, ``s`` the adapter's scaling. A
token's ascent gradient with respect to the effective head ``W = W_0 + s B A`` is the rank-one
``G_t = A_t s_t h_t^T`` of :mod:`curvopt.capo.direction` (``s_t = e_{a_t} - pi_t`` on the top-K
rows ``I_t``, ``A_t`` the advantage); the factors' gradients are

.. math::

    G^B_t = s\, G_t A^\top = s A_t\, s_t (A h_t)^\top \ (\text{rows } I_t),\qquad
    G^A_t = s\, B^\top G_t = s A_t\, (B_{I_t}^\top s_t)\, h_t^\top .

The optimizer's direction models (:func:`~curvopt.capo.direction.direction_for`, read from the
real optimizer's state of ``A`` and ``B``) map them to the steps ``eta Delta B_t``,
``eta Delta A_t``, and the logit change of the step is *exactly*

.. math::

    z_{new} - z = \eta\, u_t + \eta^2 v_t, \qquad
    u_t = s(\Delta B_t A + B \Delta A_t) h_t, \quad v_t = s\, \Delta B_t \Delta A_t h_t

(a plain head's change ``eta Delta_t h_t`` is exact too). The masker
(:class:`~curvopt.capo.masker.CAPOMasker`) expands ``Delta J_t`` and ``Delta KL_t`` to second
order in ``eta`` as for a plain head, with the extra ``eta^2 A_t s_t . v_t`` in ``Delta J_t``
(``v_t`` enters ``Delta KL_t`` only at third order); ``<G_t, Delta_t> = A_t s_t . u_t``. A whole
step (:meth:`~curvopt.capo.token_mask.CAPOMasker.predict_update`, the sequence/global levels)
is modelled the same way from the factors' gradients
(:meth:`LoRAHeadDirection.preview_with_second_order`). Under autograd (the penalties of
:mod:`curvopt.capo.penalty`) the per-token terms are functions of ``A``, ``B`` and ``h_t``.

The adapter must be a single active LoRA adapter without dropout and DoRA, not merged, with
``W_0`` and ``b`` frozen (a peft ``lora.Linear``, or anything with its attributes).

Example:
    >>> import torch
    >>> from curvopt.capo.lora_head import LoRAHead
    >>> W0 = torch.randn(6, 4)
    >>> A = torch.nn.Parameter(torch.randn(2, 4))
    >>> B = torch.nn.Parameter(torch.randn(6, 2))
    >>> head = LoRAHead(W0, A, B, scaling=0.5)
    >>> head.weight().shape
    torch.Size([6, 4])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .direction import SGDDirection, direction_for, find_param_group

__all__ = ["LoRAHead", "LoRAHeadDirection", "is_lora_head", "lora_head_of"]


class LoRAHead:
    """The head ``z = (W_0 + s B A) h + b``, trained factors ``A`` (``r x H``), ``B`` (``V x r``).

    Args:
        base_weight: ``(V, H)`` frozen weight ``W_0``.
        lora_a: ``(r, H)`` factor ``A`` (an ``nn.Parameter`` the optimizer trains).
        lora_b: ``(V, r)`` factor ``B``.
        scaling: The adapter's scale ``s`` (peft: ``lora_alpha / r``).
        bias: Optional frozen ``(V,)`` bias.
    """

    def __init__(
        self,
        base_weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scaling: float,
        bias: Tensor | None = None,
    ):
        V, H = base_weight.shape
        if lora_a.ndim != 2 or lora_a.shape[1] != H:
            raise ValueError(f"lora_a must have shape (r, {H}), got {tuple(lora_a.shape)}")
        r = lora_a.shape[0]
        if lora_b.shape != (V, r):
            raise ValueError(f"lora_b must have shape ({V}, {r}), got {tuple(lora_b.shape)}")
        if isinstance(scaling, bool) or not isinstance(scaling, int | float):
            raise TypeError(f"scaling must be a number, got {scaling!r}")
        if not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling}")
        for name, t in (("base weight", base_weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"the LoRA head's {name} is trained: CAPO models a LoRA head whose base layer "
                    "is frozen (train the factors only, or the full head without LoRA)"
                )
        self.base_weight, self.lora_a, self.lora_b = base_weight, lora_a, lora_b
        self.scaling = float(scaling)
        self.bias = bias

    def weight(self, detach: bool = True) -> Tensor:
        """The effective ``(V, H)`` weight ``W_0 + s B A``.

        With ``detach=False`` a function of ``A`` and ``B`` for autograd (the penalties).
        """
        w = self.base_weight + self.scaling * self.lora_b @ self.lora_a
        return w.detach() if detach else w

    def params(self) -> tuple[Tensor, Tensor]:
        """The trained parameters ``(A, B)``."""
        return self.lora_a, self.lora_b

    def direction(self, optimizer: torch.optim.Optimizer | None) -> LoRAHeadDirection:
        """The model of ``optimizer``'s step of ``A`` and ``B`` (plain SGD without optimizer)."""
        if optimizer is None:
            return LoRAHeadDirection(self, SGDDirection(), SGDDirection())
        lrs = {float(find_param_group(optimizer, p)["lr"]) for p in self.params()}
        if len(lrs) > 1:
            raise ValueError("the LoRA head's factors A and B must share one learning rate")
        return LoRAHeadDirection(
            self, direction_for(optimizer, self.lora_a), direction_for(optimizer, self.lora_b)
        )


def is_lora_head(module: Any) -> bool:
    """Whether ``module`` looks like a peft ``lora.Linear`` (``base_layer``, ``lora_A/B``)."""
    return all(hasattr(module, k) for k in ("base_layer", "lora_A", "lora_B", "scaling"))


def lora_head_of(module: nn.Module) -> LoRAHead:
    """The :class:`LoRAHead` of a peft ``lora.Linear`` output layer.

    Raises:
        ValueError: For several active adapters, dropout, DoRA, a merged adapter, a trained base
            layer, or a base layer that is not an ``nn.Linear``.
    """
    active = module.active_adapters if hasattr(module, "active_adapters") else module.active_adapter
    active = [active] if isinstance(active, str) else list(active)
    if len(active) != 1:
        raise ValueError(f"CAPO models one active LoRA adapter on the head, got {active}")
    name = active[0]
    if getattr(module, "merged", False):
        raise ValueError("the head's LoRA adapter is merged: unmerge it (CAPO models A and B)")
    if getattr(module, "use_dora", {}).get(name, False):
        raise ValueError("CAPO has no model of DoRA on the head (use plain LoRA)")
    dropout = module.lora_dropout[name] if hasattr(module, "lora_dropout") else nn.Identity()
    if not isinstance(dropout, nn.Identity) and float(getattr(dropout, "p", 1.0)) != 0.0:
        raise ValueError("CAPO models a LoRA head without dropout: set lora_dropout=0.0")
    base = module.base_layer
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"the LoRA head's base layer must be an nn.Linear, got {type(base).__name__}"
        )
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError("CAPO models a LoRA head on an nn.Linear (fan_in_fan_out=False)")
    a, b = module.lora_A[name], module.lora_B[name]
    if getattr(a, "bias", None) is not None or getattr(b, "bias", None) is not None:
        raise ValueError("CAPO models LoRA factors without biases (lora_bias=False)")
    return LoRAHead(base.weight, a.weight, b.weight, float(module.scaling[name]), base.bias)


class LoRAHeadDirection:
    """Per-token steps of the factors of a :class:`LoRAHead` and the logit change they cause.

    Args:
        head: The LoRA head.
        direction_a: Direction model of ``A``'s optimizer (a model of a real optimizer from
            :func:`~curvopt.capo.direction.direction_for`, or
            :class:`~curvopt.capo.direction.SGDDirection`).
        direction_b: The same for ``B``.

    :meth:`token_terms` returns ``(<G_t, Delta_t>, u_t, v_t)``: the first- and second-order logit
    changes on the rows ``I_t`` (see the module docstring). It forms ``(c, K, r)`` and
    ``(c, r, H)`` per-token matrices.
    """

    name = "lora"
    forms_token_matrices = True

    def __init__(self, head: LoRAHead, direction_a: Any, direction_b: Any):
        for d in (direction_a, direction_b):
            if not hasattr(d, "_delta"):
                raise TypeError(
                    f"CAPO's LoRA head model needs a model of a real optimizer (SGD, Adam, "
                    f"AdamW) or plain SGD; got {type(d).__name__}"
                )
        self.head = head
        self.direction_a, self.direction_b = direction_a, direction_b
        self.optimizer = getattr(direction_a, "optimizer", None)

    def token_terms(
        self, h: Tensor, s: Tensor, adv: Tensor, rows: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``<G_t, Delta_t>``, ``u_t`` and ``v_t`` for a chunk of ``c`` tokens.

        Args:
            h: ``(c, H)`` or ``(c, H + 1)`` hidden states (a last column of ones for the frozen
                bias is ignored).
            s: ``(c, K)`` scores on the top-K rows.
            adv: ``(c,)`` advantages.
            rows: ``(c, K)`` vocabulary rows of the top-K sets.

        Returns:
            ``(c,)``, ``(c, K)``, ``(c, K)``.
        """
        head = self.head
        # not detached: under autograd (a penalty) the terms are functions of A and B too
        A = head.lora_a.to(h.dtype)
        x = h[:, : A.shape[1]]
        B_rows = head.lora_b.to(h.dtype)[rows]  # (c, K, r)
        xa = x @ A.T  # (c, r)
        gs = head.scaling * adv[:, None] * s  # (c, K): s A_t s_t
        G_b = gs[:, :, None] * xa[:, None, :]
        G_a = torch.einsum("ck,ckr->cr", gs, B_rows)[:, :, None] * x[:, None, :]
        d_b = self.direction_b._delta(G_b, lambda pair: pair[0][rows])
        d_a = self.direction_a._delta(G_a, lambda pair: pair[0])
        dax = torch.einsum("crh,ch->cr", d_a, x)
        u = head.scaling * (
            torch.einsum("ckr,cr->ck", d_b, xa) + torch.einsum("ckr,cr->ck", B_rows, dax)
        )
        v = head.scaling * torch.einsum("ckr,cr->ck", d_b, dax)
        gd = (G_b * d_b).sum((1, 2)) + (G_a * d_a).sum((1, 2))
        return gd, u, v

    def preview_with_second_order(
        self, grad: Tensor | tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The effective head's step for a whole ascent gradient: ``(D_1, D_2)``.

        With the factors' modeled steps ``Delta A = P_A(g_A)`` and ``Delta B = P_B(g_B)`` the
        head moves by ``eta D_1 + eta^2 D_2``, ``D_1 = s(Delta B A + B Delta A)`` and
        ``D_2 = s Delta B Delta A`` (exactly). A frozen bias gets a zero last column when the
        head has one.

        Args:
            grad: The factors' ascent gradients ``(g_A, g_B)`` (``(r, H)``, ``(V, r)``), or the
                ascent gradient ``G`` of the effective head (``(V, H [+ 1])``), whose factor
                gradients are ``g_A = s B^T G``, ``g_B = s G A^T``.

        Returns:
            Two ``(V, H [+ 1])`` matrices.
        """
        head = self.head
        A, B = head.lora_a.detach(), head.lora_b.detach()
        if isinstance(grad, tuple):
            g_a, g_b = grad
            if g_a.shape != A.shape or g_b.shape != B.shape:
                raise ValueError(
                    f"the factors' gradients must have shapes {tuple(A.shape)} and "
                    f"{tuple(B.shape)}, got {tuple(g_a.shape)} and {tuple(g_b.shape)}"
                )
        else:
            G = grad[:, : A.shape[1]]
            g_a, g_b = head.scaling * B.to(G.dtype).T @ G, head.scaling * G @ A.to(G.dtype).T
        d_a = self.direction_a.preview(g_a)
        d_b = self.direction_b.preview(g_b)
        A, B = A.to(d_a.dtype), B.to(d_a.dtype)
        first = head.scaling * (d_b @ A + B @ d_a)
        second = head.scaling * d_b @ d_a
        if head.bias is not None:
            zero = first.new_zeros(first.shape[0], 1)
            first, second = torch.cat([first, zero], 1), torch.cat([second, zero], 1)
        return first, second

    def preview(self, grad: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """The first-order step ``D_1`` (see :meth:`preview_with_second_order`)."""
        return self.preview_with_second_order(grad)[0]

    def update(self, grad: Tensor) -> None:
        """Nothing to do: the real optimizer holds the state."""

    def state_dict(self) -> dict:
        """Empty: the state is the optimizer's."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load."""
