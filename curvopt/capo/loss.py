"""CAPOLoss: a CAPO token mask (and optional penalty, KL budget) around any token-level loss.

:class:`CAPOLoss` computes the mask of :class:`~curvopt.capo.masker.CAPOMasker` from the policy's
final hidden states and its head, hands the kept tokens to the loss, adds the penalty of
:mod:`curvopt.capo.penalty` when asked and fits the KL budget of
:mod:`curvopt.capo.whole_model`. The head is an ``nn.Linear`` trained by the optimizer, or a LoRA
adapter on it (a peft ``lora.Linear``; :mod:`curvopt.capo.lora_head`).

Example:
    >>> from curvopt.capo.token_losses import grpo_loss
    >>> head = torch.nn.Linear(8, 5)
    >>> opt = torch.optim.SGD(head.parameters(), lr=0.1)
    >>> capo = CAPOLoss(grpo_loss, head, opt, tau_h=1e-2, tau_f=1e-4, top_k=4)
    >>> hidden, actions = torch.randn(2, 3, 8), torch.randint(0, 5, (2, 3))
    >>> logp = torch.log_softmax(head(hidden), -1).gather(-1, actions[..., None])[..., 0]
    >>> loss, m = capo(logp, logp.detach(), torch.tensor([1.0, -1.0]),
    ...                torch.ones(2, 3, dtype=torch.bool), hidden, actions)
    >>> m.keep.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .direction import direction_for, find_param_group
from .lora_head import LoRAHead, is_lora_head, lora_head_of
from .penalty import CAPOPenalty
from .token_losses import token_weights_fn
from .token_mask import CAPOMask, CAPOMasker, Direction, TokenLoss
from .whole_model import check_budget, fit_kl_budget

__all__ = ["CAPOLoss"]


class CAPOLoss:
    """Apply a CAPO token mask to any token-level policy-gradient loss.

    ``loss_fn(logprobs, old_logprobs, advantages, mask)`` is a token-level loss such as
    :func:`~curvopt.capo.token_losses.grpo_loss`, :func:`~curvopt.capo.token_losses.dr_grpo_loss`
    or :func:`~curvopt.capo.token_losses.reinforce_loss`; CAPO only changes ``mask`` (the completion
    mask times the curvature mask), so masked tokens contribute exactly zero gradient.

    Use with any :mod:`torch.optim` optimizer::

        capo = CAPOLoss(grpo_loss, policy.head, optimizer, tau_h=1e-2, tau_f=1e-4, top_k=50)
        loss, m = capo(logprobs, logprobs.detach(), adv, completion_mask, hidden, actions)
        optimizer.zero_grad(); loss.backward()
        capo.update_direction()            # the Adam model sees the masked global gradient
        optimizer.step()

    Args:
        loss_fn: Token-level loss.
        head: The policy's last layer: an ``nn.Linear`` (``logits = head(hidden)``), or a LoRA
            adapter on it with the base layer frozen (a peft ``lora.Linear``, or a
            :class:`~curvopt.capo.lora_head.LoRAHead`), whose low-rank update CAPO models
            exactly (:mod:`curvopt.capo.lora_head`; every mask level, the step predictions
            and the penalties, differentiated through ``A``, ``B`` and the hidden states).
        optimizer: The optimizer training ``head``: gives ``lr`` and the direction model,
            which reads the optimizer's hyperparameters and state
            (:func:`~curvopt.capo.direction.direction_for`: SGD, Adam, AdamW; others are
            refused unless ``direction`` is given). May be None if ``lr`` is passed per call.
        tau_h: Threshold on ``|Delta J_t|`` (see :class:`CAPOMasker`).
        tau_f: Threshold on ``Delta KL_t``.
        top_k: Softmax support size ``K`` (``None``: whole vocabulary).
        direction: Direction model; default: the model of ``optimizer``'s real update
            (:func:`~curvopt.capo.direction.direction_for`; plain SGD without optimizer).
        symmetric: Keep rule on ``Delta J`` (see :class:`CAPOMasker`).
        chunk_size: Tokens per chunk (see :class:`CAPOMasker`).
        level: ``"token"``, ``"sequence"`` or ``"global"`` mask (see :class:`CAPOMasker`).
        penalty: ``"none"``, ``"delta_kl"``, ``"delta_j"`` or ``"abs_delta_j"``: add
            ``penalty_coef * sum_t w_t q_t`` to the loss, with ``q_t`` the token's
            differentiable prediction and ``w_t`` the loss's token weights over the kept tokens
            (:mod:`curvopt.capo.penalty`). Combines with the mask (infinite thresholds give
            the penalty alone).
        penalty_coef: ``lambda >= 0``; 0 switches the penalty off (the loss is then the plain
            masked loss, bit for bit).
        token_weights: ``mask -> (B, T)`` token weights of ``loss_fn``, the mask given as 0/1
            in the head's dtype (needed for a penalty with a loss other than
            :mod:`curvopt.capo.token_losses`' ones).
        kl_budget: ``delta > 0``: :meth:`fit_kl_budget` scales the coming step so that its
            predicted whole-model KL fits ``delta`` (a trust region on the step, independent of
            the mask; infinite thresholds give it alone); None: off.

    With a KL budget, call :meth:`fit_kl_budget` between ``backward`` and
    ``optimizer.step()``::

        loss.backward()
        capo.fit_kl_budget(policy, inputs, mask=completion_mask, output_fn=to_logits)
        optimizer.step()                   # the lr is scaled for this step only
    """

    def __init__(
        self,
        loss_fn: TokenLoss,
        head: nn.Linear | LoRAHead | nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        tau_h: float,
        tau_f: float,
        top_k: int | None = None,
        direction: str | Direction | None = None,
        symmetric: bool = True,
        chunk_size: int | None = None,
        level: str = "token",
        penalty: str = "none",
        penalty_coef: float = 0.0,
        token_weights: Callable[[Tensor], Tensor] | None = None,
        kl_budget: float | None = None,
    ):
        self.kl_budget = check_budget(kl_budget)
        self.penalty = CAPOPenalty(penalty, penalty_coef)
        if token_weights is None and self.penalty.active:
            token_weights = token_weights_fn(loss_fn)
        self.token_weights = token_weights
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable(logprobs, old_logprobs, advantages, mask)")
        #: The :class:`~curvopt.capo.lora_head.LoRAHead` when ``head`` is a LoRA adapter.
        self.lora = head if isinstance(head, LoRAHead) else None
        if self.lora is None and is_lora_head(head):
            self.lora = lora_head_of(head)
        if self.lora is not None:
            _check_lora_options(direction)
            direction = self.lora.direction(optimizer)
        elif not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear or a LoRA head, got {type(head).__name__}")
        elif optimizer is not None:
            find_param_group(optimizer, head.weight)
        if direction is None:
            direction = (
                "sgd" if optimizer is None else direction_for(optimizer, head.weight, head.bias)
            )
        self.loss_fn = loss_fn
        self.head = head
        self.optimizer = optimizer
        self.masker = CAPOMasker(tau_h, tau_f, top_k, direction, symmetric, chunk_size, level)

    def lr(self) -> float:
        """The current learning rate of the head's param group."""
        if self.optimizer is None:
            raise ValueError("no optimizer given: pass lr= to the call")
        param = self.head.weight if self.lora is None else self.lora.lora_a
        return float(find_param_group(self.optimizer, param)["lr"])

    def weight_and_bias(self, differentiable: bool = False) -> tuple[Tensor, Tensor | None]:
        """The head's effective ``(V, H)`` weight and its bias.

        LoRA: ``W_0 + s B A``, a function of ``A`` and ``B`` when ``differentiable``.
        """
        if self.lora is None:
            return self.head.weight, self.head.bias
        return self.lora.weight(detach=not differentiable), self.lora.bias

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        completion_mask: Tensor,
        hidden: Tensor,
        actions: Tensor,
        lr: float | None = None,
    ) -> tuple[Tensor, CAPOMask]:
        """Masked loss and the mask.

        Args:
            logprobs: ``(B, T)`` log-probabilities of ``actions`` under the current policy (with
                grad).
            old_logprobs: ``(B, T)`` log-probabilities under the sampling policy.
            advantages: ``(B,)`` or ``(B, T)``.
            completion_mask: ``(B, T)`` bool, True on real completion tokens.
            hidden: ``(B, T, H)`` final hidden states at those positions (detached for the
                mask; the penalty differentiates through them).
            actions: ``(B, T)`` token ids.
            lr: Learning rate of the coming step (default: from the optimizer).

        Returns:
            ``(loss, mask)``; ``mask.stats()`` gives the fraction rejected and the mean predicted
            ``Delta J`` / ``Delta KL``; ``mask.penalty`` the penalty term (None when off).
        """
        if logprobs.shape != actions.shape or old_logprobs.shape != actions.shape:
            raise ValueError(
                f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
                f"actions {tuple(actions.shape)} must have the same (B, T) shape"
            )
        lr = self.lr() if lr is None else lr
        weight, bias = self.weight_and_bias()
        m = self.masker(weight, hidden, actions, advantages, lr, bias, completion_mask)
        loss = self.loss_fn(logprobs, old_logprobs, advantages, m.keep)
        if self.penalty.active:
            weight, bias = self.weight_and_bias(differentiable=True)
            weights = self.token_weights(m.keep.to(weight.dtype))
            if weights.shape != m.keep.shape:
                raise ValueError(
                    f"token_weights returned shape {tuple(weights.shape)}, expected "
                    f"{tuple(m.keep.shape)}"
                )
            pen = self.penalty(
                self.masker,
                weight,
                hidden,
                actions,
                advantages,
                lr,
                weights * m.keep,
                bias,
            )
            loss = loss + pen
            m.penalty = pen.detach()
        return loss, m

    def ascent_grad(self) -> Tensor | tuple[Tensor, Tensor]:
        """``-d loss / d[W, b]`` of the head from its ``.grad`` (after ``backward``).

        For a LoRA head: the factors' ``(-A.grad, -B.grad)``.
        """
        if self.lora is not None:
            a, b = self.lora.params()
            if a.grad is None or b.grad is None:
                raise ValueError("the LoRA factors have no gradient yet: call loss.backward()")
            return -a.grad, -b.grad
        if self.head.weight.grad is None:
            raise ValueError("the head has no gradient yet: call loss.backward() first")
        g = self.head.weight.grad
        if self.head.bias is not None:
            gb = self.head.bias.grad
            gb = torch.zeros_like(self.head.bias) if gb is None else gb
            g = torch.cat([g, gb[:, None]], 1)
        return -g

    def update_direction(self) -> None:
        """Update the direction model once with the masked global gradient (after backward)."""
        if self.lora is None:  # a LoRA head's model reads the real optimizer's state
            self.masker.direction.update(self.ascent_grad().detach())

    def predict_step(
        self,
        hidden: Tensor,
        actions: Tensor | None = None,
        advantages: Tensor | None = None,
        lr: float | None = None,
        mask: Tensor | None = None,
        token_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Predicted mean KL and batch ``Delta J`` of the coming step of the head.

        Call after ``backward`` and before ``optimizer.step()`` (and before
        :meth:`update_direction`); see :meth:`CAPOMasker.predict_update`.
        """
        lr = self.lr() if lr is None else lr
        weight, bias = self.weight_and_bias()
        return self.masker.predict_update(
            weight,
            hidden,
            self.ascent_grad(),
            lr,
            bias,
            mask,
            actions=actions,
            advantages=advantages,
            token_weights=token_weights,
        )

    def fit_kl_budget(
        self,
        model: nn.Module,
        *inputs: Any,
        mask: Tensor | None = None,
        output_fn: Callable | None = None,
        process_group: object = None,
    ) -> dict[str, float]:
        """Scale the coming step so that its predicted whole-model KL fits ``kl_budget``.

        Call after ``backward`` (and clipping), right before ``optimizer.step()``: the step of
        every trainable parameter of ``model`` is read off a trial step of the optimizer,
        its mean KL over ``mask`` predicted with one forward-mode pass, and the next step's lr
        multiplied by ``min(1, sqrt(kl_budget / KL_hat))``
        (:func:`~curvopt.capo.whole_model.fit_kl_budget`). Needs eager attention (no SDPA) and
        no activation checkpointing in ``model`` (forward-mode AD).

        Args:
            model: The whole policy (every trainable parameter held by the optimizer).
            *inputs: Its inputs for the prediction.
            mask: Tokens the KL averages over (``logits.shape[:-1]``).
            output_fn: Map from the model's output to the logits.
            process_group: Under data parallelism, the group whose ranks hold the rest of the
                batch: the KL is averaged over every rank's tokens, one scale for all (see
                :func:`~curvopt.capo.whole_model.fit_kl_budget`).

        Returns:
            ``{"kl": predicted KL before scaling, "scale": the lr factor}``.

        Raises:
            ValueError: Without a ``kl_budget`` or an optimizer.
        """
        if self.kl_budget is None:
            raise ValueError("no kl_budget: pass CAPOLoss(..., kl_budget=delta)")
        if self.optimizer is None:
            raise ValueError("fit_kl_budget needs the optimizer: pass CAPOLoss(..., optimizer)")
        return fit_kl_budget(
            model,
            self.optimizer,
            self.kl_budget,
            *inputs,
            mask=mask,
            output_fn=output_fn,
            process_group=process_group,
        )

    def predict_step_kl(self, hidden: Tensor, lr: float | None = None, mask: Tensor | None = None):
        """Predicted mean KL of the coming step of the head: ``predict_step(...)["kl"]``."""
        return self.predict_step(hidden, lr=lr, mask=mask)["kl"]


def _check_lora_options(direction: Any) -> None:
    """Refuse what CAPO does not model for a LoRA head (before anything is built)."""
    if direction is not None:
        raise ValueError(
            "direction= is not used with a LoRA head: the model of A's and B's steps is read "
            "from the optimizer (plain SGD without one)"
        )
