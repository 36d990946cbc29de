"""Models of the optimizer's update direction on the last layer, used by CAPO.

CAPO (:mod:`curvopt.capo.masker`) predicts what one token's gradient would do to the policy once the
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

* :class:`SGDOptimizerDirection` and :class:`AdamOptimizerDirection` (from
  :func:`direction_for`): the step of a real ``torch.optim.SGD`` (momentum, dampening, nesterov,
  weight decay) or ``Adam``/``AdamW`` (coupled or decoupled decay, AMSGrad), read from the
  optimizer's param group and state before the coming step; any other optimizer is refused with
  a ``TypeError``.

The loss that the optimizer minimizes is ``-J``; pass the *ascent* gradient ``-W.grad`` to
:meth:`update` and :meth:`preview` (the :class:`~curvopt.capo.masker.CAPOLoss` wrapper does this).
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
    forms_token_matrices = False

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

    def _delta(self, G: Tensor, pick=None) -> Tensor:
        """``Delta(G) = G`` for any batch of gradients (no state to read)."""
        return G

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
    forms_token_matrices = True

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

    def _direction(self, m: Tensor, v: Tensor, g: Tensor, constant_denominator=False) -> Tensor:
        beta1, beta2 = self.betas
        k = self.step + 1
        return adam_step(
            m,
            v,
            g,
            beta1,
            beta2,
            self.eps,
            1 - beta1**k,
            1 - beta2**k,
            constant_denominator=constant_denominator,
        )

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
        delta = self._direction(m, v, G, constant_denominator=True)
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


def adam_step(
    m: Tensor,
    v: Tensor,
    g: Tensor,
    beta1: Tensor | float,
    beta2: Tensor | float,
    eps: Tensor | float,
    bias_correction1: Tensor | float,
    bias_correction2: Tensor | float,
    v_max: Tensor | None = None,
    constant_denominator: bool = False,
) -> Tensor:
    """One Adam step direction, elementwise, in :class:`torch.optim.Adam`'s order of operations.

    ``m' = beta1 m + (1 - beta1) g``, ``v' = beta2 v + (1 - beta2) g^2`` (AMSGrad: ``v' = max(v_max,
    v')``) and ``(m' / bc1) / (sqrt(v') / sqrt(bc2) + eps)``. The hyperparameters may be
    tensors that broadcast against ``g`` (per-column values when a head's weight and bias sit in
    different param groups). The sign convention of ``m`` and ``g`` is the caller's; ``v`` is
    a square. With ``constant_denominator`` the denominator (the preconditioner) is detached:
    the value is unchanged, and autograd sees the step as affine in ``g``,
    ``d step / d g = (1 - beta1) / (bc1 denom)`` (what CAPO's penalties differentiate).

    Example:
        >>> g = torch.tensor([2.0, -1.0])
        >>> adam_step(torch.zeros(2), torch.zeros(2), g, 0.9, 0.999, 0.0, 0.1, 0.001).round()
        tensor([ 1., -1.])
    """
    m_new = m * beta1 + g * (1 - beta1)
    v_new = v * beta2 + g.square() * (1 - beta2)
    if v_max is not None:
        v_new = torch.maximum(v_max, v_new)
    if isinstance(bias_correction2, Tensor):
        denom = v_new.sqrt() / bias_correction2.sqrt() + eps
    else:
        denom = v_new.sqrt() / math.sqrt(bias_correction2) + eps
    if constant_denominator:
        denom = denom.detach()
    return (m_new / bias_correction1) / denom


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


class _HeadParts:
    """The head's weight ``(V, H)`` and optional bias ``(V,)`` seen as one ``(V, H + 1)`` matrix.

    Optimizer state lives per parameter; these helpers read it as the augmented matrix without
    concatenating full ``V x H`` copies on the per-token path.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight, self.bias = weight, bias
        self.H = weight.shape[1]

    def params(self) -> tuple[Tensor, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def columns(self, values: tuple[float, ...], ref: Tensor) -> Tensor | float:
        """``(H [+ 1],)``: ``values[0]`` on the weight's columns, ``values[1]`` on the bias.

        A plain float when all columns share the value (no bias, or equal values): the common
        case costs no tensor operations.
        """
        if self.bias is None or float(values[0]) == float(values[1]):
            return float(values[0])
        out = ref.new_full((self.H + (self.bias is not None),), float(values[0]))
        if self.bias is not None:
            out[-1] = float(values[1])
        return out

    def rows(self, pair: tuple[Tensor, Tensor | None], rows: Tensor) -> Tensor:
        """``(c, K, H [+ 1])``: rows ``rows`` (``(c, K)``) of the augmented matrix."""
        w, b = pair
        out = w[rows]
        return out if b is None else torch.cat([out, b[rows][..., None]], -1)

    def full(self, pair: tuple[Tensor, Tensor | None]) -> Tensor:
        w, b = pair
        return w if b is None else torch.cat([w, b[:, None]], 1)

    def logits(self, pair: tuple[Tensor, Tensor | None], h: Tensor) -> Tensor:
        """``h @ M^T`` (``(c, V)``) for the augmented ``M`` and ``(c, H [+ 1])`` rows ``h``."""
        w, b = pair
        z = h[:, : self.H] @ w.to(h.dtype).T
        return z if b is None else z + h[:, self.H :] * b.to(h.dtype)


def _nonzero(x: Tensor | float) -> bool:
    return bool((x != 0).any()) if isinstance(x, Tensor) else x != 0


def _cast(x: Tensor | float, dtype: torch.dtype) -> Tensor | float:
    return x.to(dtype) if isinstance(x, Tensor) else x


_SUPPORTED = "torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW"


class _OptimizerDirection:
    """Base of the direction models that read a real optimizer's hyperparameters and state.

    Nothing is duplicated: every call reads the param group (learning-rate schedules, changed
    betas) and ``optimizer.state`` of the head's parameters as they are *before* the coming
    ``optimizer.step()``, which is the state that step will use. :meth:`update` is a no-op.
    """

    forms_token_matrices = False

    def __init__(
        self, optimizer: torch.optim.Optimizer, weight: Tensor, bias: Tensor | None = None
    ):
        self.optimizer = optimizer
        self.parts = _HeadParts(weight, bias)
        self.groups = tuple(find_param_group(optimizer, p) for p in self.parts.params())
        for g in self.groups:
            if g.get("maximize", False):
                raise ValueError(
                    "CAPO models a minimizing optimizer; maximize=True is not supported"
                )
        if bias is not None and float(self.groups[0]["lr"]) != float(self.groups[1]["lr"]):
            raise ValueError("the head's weight and bias must share one learning rate")

    def _hyper(self, key: str, ref: Tensor) -> Tensor:
        return self.parts.columns(tuple(float(g[key]) for g in self.groups), ref)

    def _state(self, key: str) -> tuple[Tensor, Tensor | None] | None:
        """(weight's, bias's) ``optimizer.state[p][key]``; None if the weight has none."""
        states = [self.optimizer.state.get(p, {}) for p in self.parts.params()]
        if key not in states[0]:
            return None
        if self.parts.bias is not None and key not in states[1]:
            raise ValueError(f"the head's weight has optimizer state {key!r} but its bias has none")
        return states[0][key], (states[1][key] if self.parts.bias is not None else None)

    def _theta(self) -> tuple[Tensor, Tensor | None]:
        return self.parts.weight.detach(), (
            None if self.parts.bias is None else self.parts.bias.detach()
        )

    def update(self, grad: Tensor) -> None:
        """Nothing to do: the real optimizer updates its own state."""

    def state_dict(self) -> dict:
        """Empty: the state is the optimizer's (save the optimizer's state_dict)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load (see :meth:`state_dict`)."""


class SGDOptimizerDirection(_OptimizerDirection):
    """The step of a real :class:`torch.optim.SGD` (momentum, dampening, nesterov, weight decay).

    In ascent terms (``G`` the gradient of ``J``, ``theta`` the head, ``b`` the optimizer's
    momentum buffer of the loss gradient) torch's SGD moves by ``+eta Delta`` with

    .. math::

        \\Delta(G) = \\alpha\\,(G - \\lambda\\theta) - \\beta\\, b,

    an affine map: no momentum ``alpha = 1, beta = 0``; first step with momentum (the buffer
    starts as the gradient) ``alpha = 1`` (nesterov ``1 + mu``), ``beta = 0``; later
    ``alpha = 1 - d, beta = mu`` (nesterov ``alpha = 1 + mu (1 - d), beta = mu^2``). The per-token
    terms stay closed form: the drift ``D_0 = -alpha lambda theta - beta b`` enters only through
    ``D_0 h_t``, one ``(c, V)`` product like the logits.

    Example:
        >>> head = torch.nn.Linear(3, 4)
        >>> opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        >>> SGDOptimizerDirection(opt, head.weight, head.bias).name
        'sgd'
    """

    name = "sgd"

    def _coefficients(self, ref: Tensor) -> tuple[Tensor, Tensor, tuple | None]:
        alphas, betas = [], []
        buf = self._state("momentum_buffer") if any(g["momentum"] for g in self.groups) else None
        for g in self.groups:
            mu, d, nesterov = float(g["momentum"]), float(g["dampening"]), bool(g["nesterov"])
            if mu == 0:
                a, b = 1.0, 0.0
            elif buf is None or buf[0] is None:
                a, b = (1.0 + mu if nesterov else 1.0), 0.0
            else:
                a, b = (1.0 + mu * (1 - d), mu * mu) if nesterov else (1.0 - d, mu)
            alphas.append(a)
            betas.append(b)
        alpha = self.parts.columns(tuple(alphas), ref)
        beta = self.parts.columns(tuple(betas), ref)
        return alpha, beta, (buf if buf is not None and buf[0] is not None else None)

    def _drift_logits(self, h: Tensor, alpha: Tensor, beta: Tensor, buf) -> Tensor | None:
        """``D_0 h`` over the whole vocabulary, ``(c, V)``, or None when ``D_0 = 0``."""
        out = None
        wd = self._hyper("weight_decay", h) * alpha
        if _nonzero(wd):
            out = -self.parts.logits(self._theta(), h * _cast(wd, h.dtype))
        if buf is not None and _nonzero(beta):
            term = self.parts.logits(buf, h * _cast(beta, h.dtype))
            out = -term if out is None else out - term
        return out

    def token_terms(self, h: Tensor, s: Tensor, adv: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``<G_t, Delta_t>`` and ``u_t`` for a chunk (closed form; see the class docstring)."""
        alpha, beta, buf = self._coefficients(h)
        hh = (h * h * _cast(alpha, h.dtype)).sum(-1)
        gd = adv.square() * (s * s).sum(-1) * hh
        u = (adv * hh).unsqueeze(-1) * s
        drift = self._drift_logits(h, alpha, beta, buf)
        if drift is not None:
            d_rows = drift.to(h.dtype).gather(1, rows)
            gd = gd + adv * (s * d_rows).sum(-1)
            u = u + d_rows
        return gd, u

    def _delta(self, G: Tensor, pick) -> Tensor:
        """``Delta(G)`` with the state read through ``pick(pair) -> tensor like G``."""
        alpha, beta, buf = self._coefficients(G)
        out = alpha * (G - self._hyper("weight_decay", G) * pick(self._theta()).to(G.dtype))
        if buf is not None:
            out = out - beta * pick(buf).to(G.dtype)
        return out

    def preview(self, grad: Tensor) -> Tensor:
        """The full step direction ``Delta(grad)`` for an ascent gradient ``(V, H [+ 1])``."""
        return self._delta(grad, self.parts.full)


class AdamOptimizerDirection(_OptimizerDirection):
    """The step of a real :class:`torch.optim.Adam` / :class:`torch.optim.AdamW`.

    Reads ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with AMSGrad) and ``step`` from the
    optimizer's state. With the loss gradient ``g = -G`` (coupled decay: ``g + lambda theta``)
    the step is :func:`adam_step` with ``k = step + 1``; decoupled decay (AdamW) adds
    ``lambda theta`` to it; ``Delta = -step`` (ascent). Per token only the ``K`` rows of the
    top-K support are gathered (``(c, K, H)`` per chunk).

    Example:
        >>> head = torch.nn.Linear(3, 4, bias=False)
        >>> opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.1)
        >>> d = AdamOptimizerDirection(opt, head.weight)
        >>> d.preview(torch.ones(4, 3)).shape
        torch.Size([4, 3])
    """

    name = "adam"
    forms_token_matrices = True

    def __init__(
        self, optimizer: torch.optim.Optimizer, weight: Tensor, bias: Tensor | None = None
    ):
        super().__init__(optimizer, weight, bias)
        if len({bool(g["amsgrad"]) for g in self.groups}) > 1:
            raise ValueError("the head's weight and bias must agree on amsgrad")

    def _hypers(self, ref: Tensor) -> dict:
        steps = []
        for p in self.parts.params():
            st = self.optimizer.state.get(p, {})
            steps.append(float(st["step"]) if "step" in st else 0.0)
        b1 = self.parts.columns(tuple(float(g["betas"][0]) for g in self.groups), ref)
        b2 = self.parts.columns(tuple(float(g["betas"][1]) for g in self.groups), ref)
        k = self.parts.columns(tuple(s + 1 for s in steps), ref)
        wd = self._hyper("weight_decay", ref)
        decoupled = self.parts.columns(
            tuple(float(bool(g.get("decoupled_weight_decay", False))) for g in self.groups), ref
        )
        return {
            "beta1": b1,
            "beta2": b2,
            "eps": self._hyper("eps", ref),
            "bias_correction1": 1 - b1**k,
            "bias_correction2": 1 - b2**k,
            "wd_coupled": wd * (1 - decoupled),
            "wd_decoupled": wd * decoupled,
        }

    def _delta(self, G: Tensor, pick, constant_denominator: bool = False) -> Tensor:
        """``Delta(G)`` with the state read through ``pick(pair) -> tensor like G``."""
        hp = self._hypers(G)
        wd_c, wd_d = hp.pop("wd_coupled"), hp.pop("wd_decoupled")
        theta = pick(self._theta()).to(G.dtype) if _nonzero(wd_c) or _nonzero(wd_d) else None
        g = -G if theta is None else theta * wd_c - G
        m, v = self._state("exp_avg"), self._state("exp_avg_sq")
        m = 0.0 if m is None else pick(m).to(G.dtype)
        v = 0.0 if v is None else pick(v).to(G.dtype)
        v_max = None
        if self.groups[0]["amsgrad"]:
            vm = self._state("max_exp_avg_sq")
            v_max = G.new_zeros(()) if vm is None else pick(vm).to(G.dtype)
        step = adam_step(m, v, g, v_max=v_max, constant_denominator=constant_denominator, **hp)
        if theta is not None:
            step = step + wd_d * theta
        return -step

    def token_terms(self, h: Tensor, s: Tensor, adv: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``<G_t, Delta_t>`` and ``u_t`` for a chunk; forms ``(c, K, H)`` per-token matrices."""
        G = (adv[:, None, None] * s[:, :, None]) * h[:, None, :]
        delta = self._delta(G, lambda pair: self.parts.rows(pair, rows), constant_denominator=True)
        return (G * delta).sum((1, 2)), torch.einsum("ckh,ch->ck", delta, h)

    def preview(self, grad: Tensor) -> Tensor:
        """The full step direction ``Delta(grad)`` for an ascent gradient ``(V, H [+ 1])``."""
        return self._delta(grad, self.parts.full)


def direction_for(
    optimizer: torch.optim.Optimizer, param: Tensor, bias: Tensor | None = None
) -> SGDOptimizerDirection | AdamOptimizerDirection:
    """The direction model of ``optimizer``'s real update of the head ``(param, bias)``.

    Wrappers that hold the real optimizer in ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``) are unwrapped.

    Raises:
        TypeError: For an optimizer other than exactly ``torch.optim.SGD``, ``Adam`` or
            ``AdamW`` (a subclass may step differently, so it is not guessed).
        ValueError: For ``maximize=True`` or a head not in the optimizer.
    """
    for name, value in (("param", param), ("bias", bias)):
        if not (isinstance(value, Tensor) or (name == "bias" and value is None)):
            raise TypeError(
                f"direction_for({name}=...) takes a tensor of the head (e.g. "
                f"head.{'weight' if name == 'param' else 'bias'}), "
                f"got {type(value).__name__}; the learning rate is read from the optimizer"
            )
    optimizer = unwrap_optimizer(optimizer)
    model = _MODELS.get(type(optimizer))
    if model is None:
        raise TypeError(
            f"CAPO has no model of {type(optimizer).__name__}'s update; supported optimizers are "
            f"{_SUPPORTED}. Pass direction= explicitly to use another model knowingly."
        )
    return model(optimizer, param, bias)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The real optimizer inside wrappers that hold it in ``.optimizer`` (accelerate's)."""
    seen = 0
    while type(optimizer) not in _MODELS and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


_MODELS = {
    torch.optim.SGD: SGDOptimizerDirection,
    torch.optim.Adam: AdamOptimizerDirection,
    torch.optim.AdamW: AdamOptimizerDirection,
}
