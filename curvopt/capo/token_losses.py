"""Token-level policy-gradient losses for sequence policies (GRPO, Dr.GRPO, REINFORCE).

All share one signature, ``loss(logprobs, old_logprobs, advantages, mask) -> scalar``, with
``(B, T)`` log-probabilities of the sampled tokens under the current and the sampling policy,
advantages ``(B,)`` per completion (or ``(B, T)``) and a bool ``(B, T)`` mask of the tokens that
count. Masked tokens are multiplied by zero, so they contribute exactly zero gradient; this is how
:class:`~curvopt.capo.masker.CAPOLoss` applies its curvature mask.

With the ratio ``r_t = exp(logprobs - old_logprobs)`` and clip range ``eps`` the per-token GRPO
surrogate is ``l_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A)``.

* :func:`grpo_loss`: ``mean_b [ sum_t m_bt l_bt / sum_t m_bt ]`` (per-completion token mean).
* :func:`dr_grpo_loss`: ``sum_bt m_bt l_bt / (B T)`` (constant normalizer, no length bias).
* :func:`reinforce_loss`: ``-sum_bt m_bt A_b logprobs_bt / B`` (sum over a completion's tokens).

:func:`token_weights` gives each loss's token weights ``w_t``: at ratio 1 the loss's gradient is
``-sum_t w_t A_t grad log pi(a_t)``, so ``sum_t w_t x_t`` averages any per-token quantity ``x_t``
the way the loss averages its tokens (CAPO's penalties, :mod:`curvopt.capo.penalty`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


def _check(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must have shape (B, T), got {tuple(logprobs.shape)}")
    B, T = logprobs.shape
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}"
        )
    if mask.shape != (B, T) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {(B, T)}, got {mask.dtype} {mask.shape}"
        )
    if advantages.shape == (B,):
        advantages = advantages[:, None]
    elif advantages.shape != (B, T):
        raise ValueError(f"advantages must have shape ({B},) or {(B, T)}, got {advantages.shape}")
    return advantages.to(logprobs.dtype)


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """Per-token clipped surrogate loss ``-min(r A, clip(r, 1-eps, 1+eps) A)``, ``(B, T)``."""
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """GRPO: clipped surrogate, token mean per completion, then mean over completions.

    A completion with no kept token contributes 0 (its denominator is clamped to 1).

    Example:
        >>> lp = torch.zeros(2, 3, requires_grad=True)
        >>> mask = torch.ones(2, 3, dtype=torch.bool)
        >>> grpo_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask)
        tensor(0., grad_fn=<MeanBackward0>)
    """
    adv = _check(logprobs, old_logprobs, advantages, mask)
    m = mask.to(logprobs.dtype)
    per_token = clipped_surrogate(logprobs, old_logprobs, adv, clip_eps) * m
    return (per_token.sum(1) / m.sum(1).clamp_min(1)).mean()


def dr_grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """Dr.GRPO: clipped surrogate summed over kept tokens, divided by the constant ``B T``."""
    adv = _check(logprobs, old_logprobs, advantages, mask)
    per_token = clipped_surrogate(logprobs, old_logprobs, adv, clip_eps) * mask.to(logprobs.dtype)
    return per_token.sum() / logprobs.numel()


def reinforce_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> Tensor:
    """REINFORCE: ``-sum_t A log pi(a_t)`` over kept tokens, mean over completions.

    ``old_logprobs`` is accepted for the common signature and ignored.
    """
    adv = _check(logprobs, old_logprobs, advantages, mask)
    per_token = -(adv * logprobs) * mask.to(logprobs.dtype)
    return per_token.sum() / logprobs.shape[0]


def _grpo_weights(mask: Tensor) -> Tensor:
    m = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
    return m / m.sum(1, keepdim=True).clamp_min(1) / m.shape[0]


def _dr_grpo_weights(mask: Tensor) -> Tensor:
    m = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
    return m / m.numel()


def _reinforce_weights(mask: Tensor) -> Tensor:
    m = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
    return m / m.shape[0]


_TOKEN_WEIGHTS = {
    grpo_loss: _grpo_weights,
    dr_grpo_loss: _dr_grpo_weights,
    reinforce_loss: _reinforce_weights,
}


def token_weights_fn(loss_fn: Callable) -> Callable[[Tensor], Tensor]:
    """The map ``mask -> (B, T) token weights`` of one of this module's losses.

    ``functools.partial`` wrappers (e.g. another ``clip_eps``) are unwrapped.

    Raises:
        TypeError: For any other loss (pass its token weights explicitly).
    """
    base = loss_fn
    while isinstance(base, functools.partial):
        base = base.func
    fn = _TOKEN_WEIGHTS.get(base)
    if fn is None:
        raise TypeError(
            f"no token weights known for the loss {getattr(loss_fn, '__name__', loss_fn)!r}; "
            "known: grpo_loss, dr_grpo_loss, reinforce_loss (pass token_weights= for others)"
        )
    return fn


def token_weights(loss_fn: Callable, mask: Tensor) -> Tensor:
    """Token weights ``w_t`` of ``loss_fn`` for the ``(B, T)`` ``mask`` of counted tokens.

    A bool mask gives weights in the default dtype, a 0/1 floating mask in its own dtype.

    ``grpo_loss``: ``m_bt / (B n_b)``; ``dr_grpo_loss``: ``m_bt / (B T)``; ``reinforce_loss``:
    ``m_bt / B``. At ratio 1 the loss's gradient is ``-sum_t w_t A_t grad log pi(a_t)``.

    Example:
        >>> token_weights(grpo_loss, torch.tensor([[True, True], [True, False]]))
        tensor([[0.2500, 0.2500],
                [0.5000, 0.0000]])
    """
    return token_weights_fn(loss_fn)(mask)


__all__ = [
    "clipped_surrogate",
    "dr_grpo_loss",
    "grpo_loss",
    "reinforce_loss",
    "token_weights",
    "token_weights_fn",
]
