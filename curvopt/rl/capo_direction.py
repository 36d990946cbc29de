"""Models of the optimizer's update direction on the last layer, used by CAPO.

CAPO (:mod:`curvopt.rl.capo`) predicts what one token's gradient would do to the policy once the
optimizer has turned it into a step. The gradient of the token objective ``J_t = A log pi_t(a_t)``
with respect to the last-layer weight ``W`` (``V x H``, logits ``z = W h``) is the rank-one matrix

.. math::

    G_t = A\\, s_t h_t^\\top, \\qquad s_t = e_{a_t} - \\pi_t,

restricted to the top-K rows ``I_t`` of position ``t``. A direction model maps it to the modeled
step direction ``Delta_t = P(G_t)`` (the parameters move by ``+eta Delta_t``, ascent on ``J``) and
returns the two numbers CAPO needs: ``<G_t, Delta_t>`` and the logit change ``u_t = Delta_t h_t``
on the rows ``I_t``.

* :class:`SGDDirection`: ``P`` is the identity. Everything is closed form:
  ``<G_t, G_t> = A^2 ||s_t||^2 ||h_t||^2`` and ``u_t = A ||h_t||^2 s_t``; no ``K x H`` matrix is
  ever formed.
* :class:`AdamDirection`: ``P`` is the step Adam would take if ``G_t`` were this step's gradient,
  from its own running moments ``m, v`` (bias-corrected, with ``eps``):

  .. math::

      m' = \\beta_1 m + (1-\\beta_1) G_t,\\quad v' = \\beta_2 v + (1-\\beta_2) G_t^{\\odot 2},\\quad
      \\Delta_t = \\frac{m' / (1-\\beta_1^{k+1})}{\\sqrt{v' / (1-\\beta_2^{k+1})} + \\epsilon}.

  The moments are updated once per optimizer step with the masked global gradient
  (:meth:`AdamDirection.update`). The map is elementwise, so the ``c x K x H`` per-token matrices
  are formed only for a chunk of ``c`` tokens at a time.

The loss that the optimizer minimizes is ``-J``; pass the *ascent* gradient ``-W.grad`` to
:meth:`update` and :meth:`preview` (the :class:`~curvopt.rl.capo.CAPOLoss` wrapper does this).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SGDDirection:
    """Identity preconditioner: the step is the gradient itself (plain SGD).

    Example:
        >>> d = SGDDirection()
        >>> gd, u = d.token_terms(torch.ones(1, 2), torch.tensor([[0.5, -0.5]]),
        ...                       torch.ones(1), torch.tensor([[0, 1]]))
        >>> gd, u
        (tensor([1.]), tensor([[ 1., -1.]]))
    """

    name = "sgd"

    def token_terms(self, h: Tensor, s: Tensor, adv: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``<G_t, Delta_t>`` and ``u_t = Delta_t h_t`` for a chunk of tokens (closed form).

        Args:
            h: ``(c, H)`` hidden states.
            s: ``(c, K)`` scores ``e_a - pi`` on the top-K rows.
            adv: ``(c,)`` advantages.
            rows: ``(c, K)`` vocabulary rows of the top-K set (unused: SGD has no state).

        Returns:
            ``(c,)`` inner products and ``(c, K)`` logit changes.
        """
        hh = (h * h).sum(-1)
        return adv.square() * (s * s).sum(-1) * hh, (adv * hh).unsqueeze(-1) * s

    def preview(self, grad: Tensor) -> Tensor:
        """The modeled step direction for a full ``(V, H)`` ascent gradient: the gradient."""
        return grad

    def update(self, grad: Tensor) -> None:
        """SGD keeps no state; nothing to do."""

    def state_dict(self) -> dict:
        """Empty: SGD has no state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load."""


class AdamDirection:
    """Adam-style elementwise preconditioner with its own running moments.

    Args:
        betas: ``(beta1, beta2)`` in ``[0, 1)``, as in :class:`torch.optim.Adam`.
        eps: Denominator term, ``> 0``.

    The moments are created lazily, shaped like the first gradient given to :meth:`update`
    (``(V, H)``, or ``(V, H + 1)`` when the head has a bias folded in). Before the first update
    they are zero and the step count is 0, which is exactly the state of a fresh Adam.

    Example:
        >>> d = AdamDirection(betas=(0.9, 0.999), eps=1e-8)
        >>> d.update(torch.randn(5, 3))
        >>> d.step
        1
    """

    name = "adam"

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        beta1, beta2 = (float(b) for b in betas)
        for i, b in enumerate((beta1, beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must lie in [0, 1), got {b}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps}")
        self.betas = (beta1, beta2)
        self.eps = float(eps)
        self.step = 0
        self.exp_avg: Tensor | None = None
        self.exp_avg_sq: Tensor | None = None

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, param: Tensor) -> AdamDirection:
        """Copy ``betas`` and ``eps`` from the param group of ``optimizer`` that holds ``param``."""
        group = find_param_group(optimizer, param)
        return cls(betas=group.get("betas", (0.9, 0.999)), eps=group.get("eps", 1e-8))

    def _moments_like(self, shape: torch.Size, ref: Tensor) -> tuple[Tensor, Tensor]:
        if self.exp_avg is None:
            return ref.new_zeros(shape), ref.new_zeros(shape)
        if self.exp_avg.shape != shape:
            raise ValueError(
                f"the Adam direction model holds moments of shape {tuple(self.exp_avg.shape)}, "
                f"but the last layer now has shape {tuple(shape)}; use one model per head"
            )
        return self.exp_avg, self.exp_avg_sq

    def _direction(self, m: Tensor, v: Tensor, g: Tensor) -> Tensor:
        beta1, beta2 = self.betas
        k = self.step + 1
        m_new = m * beta1 + g * (1 - beta1)
        v_new = v * beta2 + g.square() * (1 - beta2)
        denom = (v_new / (1 - beta2**k)).sqrt_().add_(self.eps)
        return (m_new / (1 - beta1**k)).div_(denom)

    def token_terms(self, h: Tensor, s: Tensor, adv: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``<G_t, Delta_t>`` and ``u_t = Delta_t h_t`` for a chunk of ``c`` tokens.

        Forms the ``(c, K, H)`` per-token gradients ``G_t = A s_t h_t^T`` of the chunk only.

        Args:
            h: ``(c, H)`` hidden states.
            s: ``(c, K)`` scores ``e_a - pi`` on the top-K rows.
            adv: ``(c,)`` advantages.
            rows: ``(c, K)`` vocabulary rows of the top-K set (selects the moments).

        Returns:
            ``(c,)`` inner products and ``(c, K)`` logit changes.
        """
        G = (adv[:, None, None] * s[:, :, None]) * h[:, None, :]
        if self.exp_avg is None:  # fresh Adam: zero moments
            m = v = G.new_zeros(())
        else:
            m, v = self.exp_avg[rows], self.exp_avg_sq[rows]
        delta = self._direction(m, v, G)
        return (G * delta).sum((1, 2)), torch.einsum("ckh,ch->ck", delta, h)

    def preview(self, grad: Tensor) -> Tensor:
        """The Adam step direction for a full ``(V, H)`` ascent gradient; the state is unchanged."""
        m, v = self._moments_like(grad.shape, grad)
        return self._direction(m, v, grad)

    @torch.no_grad()
    def update(self, grad: Tensor) -> None:
        """One moment update with the (masked, global) ascent gradient of the last layer."""
        beta1, beta2 = self.betas
        m, v = self._moments_like(grad.shape, grad)
        self.exp_avg = m * beta1 + grad * (1 - beta1)
        self.exp_avg_sq = v * beta2 + grad.square() * (1 - beta2)
        self.step += 1

    def state_dict(self) -> dict:
        """Moments, step count and hyperparameters (tensors are cloned)."""
        return {
            "betas": self.betas,
            "eps": self.eps,
            "step": self.step,
            "exp_avg": None if self.exp_avg is None else self.exp_avg.clone(),
            "exp_avg_sq": None if self.exp_avg_sq is None else self.exp_avg_sq.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.betas = tuple(state["betas"])
        self.eps = float(state["eps"])
        self.step = int(state["step"])
        self.exp_avg = None if state["exp_avg"] is None else state["exp_avg"].clone()
        self.exp_avg_sq = None if state["exp_avg_sq"] is None else state["exp_avg_sq"].clone()


def find_param_group(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    """The param group of ``optimizer`` that holds ``param``.

    Raises:
        ValueError: If ``param`` is not optimized by ``optimizer``.
    """
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError(
        "the last-layer weight is not in any param group of the optimizer; pass the optimizer "
        "that trains the policy's head"
    )


def direction_for(optimizer: torch.optim.Optimizer, param: Tensor) -> SGDDirection | AdamDirection:
    """Pick the direction model that matches ``optimizer``: Adam-style for Adam/AdamW, else SGD."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return AdamDirection.from_optimizer(optimizer, param)
    return SGDDirection()
