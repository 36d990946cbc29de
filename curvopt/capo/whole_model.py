r"""Whole-model KL prediction for a planned step: the logit change through the whole network.

CAPO's curvature model (:mod:`curvopt.capo.masker`) sees only the last layer: it predicts the KL
that the head's update causes on fixed hidden states. When the body carries most of the step's KL
(the GRU of the addition toy: 94-98 %), that prediction misses most of the policy change. This
module predicts the KL of the *whole* step instead.

**Model.** For logits ``z_t(θ)`` (every position ``t`` of every sequence) and a planned parameter
step ``Δθ`` (any optimizer's: SGD, Adam, ...), the first-order logit change is the Jacobian-vector
product ``u_t = J_t Δθ``, computed for all tokens at once by ONE forward-mode pass
(``torch.func.jvp``). The second-order KL of the step at token ``t`` is

.. math::

    \mathrm{KL}_t \approx \tfrac12\, u_t^\top (\mathrm{Diag}(p_t) - p_t p_t^\top)\, u_t ,
    \qquad p_t = \mathrm{softmax}(z_t),

and the prediction of the mean KL is its average over the valid tokens; ``½ ΔθᵀFΔθ`` with ``F`` the
Fisher of the whole network averaged over those tokens (exact to second order in ``Δθ``).

**Per-token attribution.** If the step is a sum of per-token parts, ``Δθ = Σ_s Δθ_s`` (for SGD
``Δθ_s = η ∇ℓ_s``, with ``ℓ_s`` token ``s``'s term of the ascent objective; for Adam with its
denominators frozen ``Δθ_s ≈ η D ∇ℓ_s``), the quadratic form splits exactly into
``KL̂ = Σ_s c_s`` with ``c_s = ½⟨Δθ_s, F Δθ⟩``. ``F Δθ`` costs one vector-Jacobian product of the
curvature-weighted logit change; all ``⟨∇ℓ_s, D F Δθ⟩`` come from one more forward-mode pass over
the per-token objective terms. ``c_s`` may be negative (a token that cancels others' change).

**Cost.** A forward-mode pass costs about one forward (plus its tangents), so the prediction is
about 1-2 forwards per step; the attributions add one backward and one forward-mode pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from curvopt.distributed import all_reduce_sum_, check_process_group, is_dtensor
from curvopt.kernels import softmax_curvature


def _named(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    names, params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p)
    if not params:
        raise ValueError("the model has no trainable parameters")
    return names, params


def _check_step(step: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    step = list(step)
    if len(step) != len(params) or any(s.shape != p.shape for s, p in zip(step, params)):
        raise ValueError(
            "step must hold one tensor per trainable parameter with the same shapes, got "
            f"{[tuple(s.shape) for s in step]} for {[tuple(p.shape) for p in params]}"
        )
    return [s.detach().to(p.dtype) for s, p in zip(step, params)]


def logit_change(
    model: nn.Module, step: Sequence[Tensor], *inputs: Any, output_fn: Callable | None = None
) -> tuple[Tensor, Tensor]:
    """Logits ``z(θ)`` and their first-order change ``u = J Δθ`` along a planned step.

    Args:
        model: The policy; ``model(*inputs)`` (or ``output_fn(model_out)``) gives the logits.
        step: ``Δθ``, one tensor per trainable parameter (in ``named_parameters`` order).
        *inputs: The model's inputs.
        output_fn: Optional map from the model output to the logits ``(..., V)``.

    Returns:
        ``(z, u)``, both ``(..., V)``, detached.

    Example:
        >>> net = nn.Linear(3, 4)
        >>> step = [torch.ones_like(p) for p in net.parameters()]
        >>> x = torch.randn(2, 3)
        >>> z, u = logit_change(net, step, x)
        >>> torch.allclose(u, x @ torch.ones(4, 3).T + 1)  # u = ΔW x + Δb
        True
    """
    names, params = _named(model)
    tangents = _check_step(step, params)
    fn = output_fn or (lambda out: out)

    def logits(*flat):
        return fn(functional_call(model, dict(zip(names, flat)), inputs))

    primals = tuple(p.detach() for p in params)
    z, u = jvp(logits, primals, tuple(tangents))
    return z.detach(), u.detach()


def token_kl(logits: Tensor, change: Tensor) -> Tensor:
    """Second-order KL per token, ``½ uᵀ(Diag p − ppᵀ)u``, shape ``logits.shape[:-1]``.

    Example:
        >>> z, u = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])
        >>> token_kl(z, u)  # p = (½, ½): ½ · (½·1 + ½·1 − 0²) = 0.5
        tensor([0.5000])
    """
    if logits.shape != change.shape:
        raise ValueError(
            f"logits and change must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(change.shape)}"
        )
    return 0.5 * (change * softmax_curvature(logits, change)).sum(-1)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask must have shape {tuple(values.shape)}, got {tuple(mask.shape)}")
    w = mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1)


def predict_step_kl(
    model: nn.Module,
    step: Sequence[Tensor],
    *inputs: Any,
    mask: Tensor | None = None,
    output_fn: Callable | None = None,
) -> Tensor:
    """Predicted mean ``KL(π_θ ‖ π_{θ+Δθ})`` over the valid tokens for the whole-network step.

    Args:
        model: The policy (logits ``(..., V)`` from ``model(*inputs)``, or via ``output_fn``).
        step: Planned step ``Δθ`` per trainable parameter (e.g. the difference of the parameters
            after and before a trial optimizer step on a copy).
        *inputs: The model's inputs.
        mask: Optional ``logits.shape[:-1]`` mask of the tokens to average over.
        output_fn: Optional map from the model output to the logits.

    Returns:
        0-d tensor.

    Example:
        >>> net = nn.Linear(3, 5).double()
        >>> step = [1e-3 * torch.randn_like(p) for p in net.parameters()]
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> pred = predict_step_kl(net, step, x)
        >>> with torch.no_grad():
        ...     old = torch.log_softmax(net(x), -1)
        ...     new = torch.log_softmax(x @ (net.weight + step[0]).T + net.bias + step[1], -1)
        >>> real = (old.exp() * (old - new)).sum(-1).mean()
        >>> bool(abs(pred / real - 1) < 1e-2)
        True
    """
    z, u = logit_change(model, step, *inputs, output_fn=output_fn)
    return _masked_mean(token_kl(z, u), mask)


def token_kl_attributions(
    model: nn.Module,
    step: Sequence[Tensor],
    token_objective: Callable[[Tensor], Tensor],
    *inputs: Any,
    preconditioner: Sequence[Tensor] | None = None,
    lr: float = 1.0,
    mask: Tensor | None = None,
    output_fn: Callable | None = None,
) -> tuple[Tensor, Tensor]:
    """Each token's share ``c_s = ½⟨Δθ_s, F Δθ⟩`` of the predicted mean KL of the step.

    The step is modeled as ``Δθ = Σ_s Δθ_s`` with ``Δθ_s = lr · D ⊙ ∇ℓ_s`` where ``ℓ_s`` is token
    ``s``'s term of the ascent objective (``token_objective(logits)``, shape ``logits.shape[:-1]``,
    e.g. ``A_s log p_s(a_s)/N``) and ``D`` a fixed diagonal preconditioner (1 for SGD, Adam's
    frozen ``1/(sqrt(v̂)+eps)`` scaled by its momentum weight). Then ``Σ_s c_s = ½ΔθᵀFΔθ`` exactly
    when ``step`` equals ``lr · D ⊙ Σ_s ∇ℓ_s``; ``F`` averages over ``mask``.

    Args:
        model: The policy.
        step: ``Δθ`` per trainable parameter.
        token_objective: Maps the logits to the per-token objective terms ``ℓ_s``.
        *inputs: The model's inputs.
        preconditioner: ``D`` per trainable parameter (default ones).
        lr: ``η``.
        mask: Valid tokens for the KL average (``logits.shape[:-1]``).
        output_fn: Optional map from the model output to the logits.

    Returns:
        ``(c, kl)``: per-token attributions ``logits.shape[:-1]`` and the predicted mean KL.
    """
    names, params = _named(model)
    tangents = _check_step(step, params)
    fn = output_fn or (lambda out: out)
    if preconditioner is None:
        precond = [torch.ones_like(p) for p in params]
    else:
        precond = _check_step(preconditioner, params)

    def logits(*flat):
        return fn(functional_call(model, dict(zip(names, flat)), inputs))

    primals = tuple(p.detach() for p in params)
    z, u = jvp(logits, primals, tuple(tangents))
    z, u = z.detach(), u.detach()
    curv = softmax_curvature(z, u)  # (Diag p − ppᵀ) u per token
    kl = _masked_mean(0.5 * (u * curv).sum(-1), mask)
    w = torch.ones(z.shape[:-1], dtype=z.dtype) if mask is None else mask.to(z.dtype)
    weights = (w / w.sum().clamp_min(1)).unsqueeze(-1) * curv
    # F Δθ = Σ_t w_t J_tᵀ C_t u_t: one vector-Jacobian product
    with torch.enable_grad():
        flat = tuple(p.detach().requires_grad_(True) for p in params)
        out = logits(*flat)
        f_step = torch.autograd.grad(out, flat, grad_outputs=weights.to(out.dtype))
    direction = tuple(d * f for d, f in zip(precond, f_step))
    # ⟨∇ℓ_s, D F Δθ⟩ for every token s at once: one forward-mode pass of the token objective
    _, dots = jvp(lambda *f: token_objective(logits(*f)), primals, direction)
    return 0.5 * lr * dots.detach(), kl


# --- the KL budget: a whole-model trust region on the step ------------------------------------


def trial_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """The step ``Δθ`` the optimizer is about to take, read off a trial step, nothing changed.

    ``optimizer.step()`` runs once on the current gradients and state; the step of each of
    ``params`` is read off, then every parameter of the optimizer and its state are put back
    exactly (a parameter the optimizer does not hold gets a zero step). Hooks registered on the
    optimizer's ``step`` fire during the trial too.

    Args:
        optimizer: Any ``torch.optim`` optimizer, gradients already in place.
        params: The parameters to report the step of (e.g. the model's trainable ones).

    Returns:
        One tensor per ``params`` entry, its shape.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> w.grad = torch.tensor([1.0, -2.0])
        >>> trial_step(opt, [w]), w.data
        ([tensor([-0.5000,  1.0000])], tensor([1., 1.]))
    """
    held = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in held]
    state = {
        p: {k: v.clone() if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
        for p in held
        if p in optimizer.state
    }
    try:
        optimizer.step()
        steps = {p: p.detach() - b for p, b in zip(held, before)}
    finally:
        with torch.no_grad():
            for p, b in zip(held, before):
                p.copy_(b)
        for p in held:
            if p in state:
                optimizer.state[p] = state[p]
            else:
                optimizer.state.pop(p, None)
    return [steps[p] if p in steps else torch.zeros_like(p) for p in params]


def budget_scale(predicted_kl: float, budget: float) -> float:
    """``min(1, sqrt(budget / KL̂))``: the lr factor that brings a step's KL within the budget.

    The step of SGD and Adam is linear in the lr, its second-order KL quadratic.

    Example:
        >>> budget_scale(4e-2, 1e-2), budget_scale(1e-3, 1e-2), budget_scale(0.0, 1e-2)
        (0.5, 1.0, 1.0)
    """
    return min(1.0, math.sqrt(budget / predicted_kl)) if predicted_kl > 0 else 1.0


def check_budget(budget: Any, name: str = "kl_budget") -> float | None:
    """``budget`` as a float (finite, > 0) or None (off); ``TypeError``/``ValueError`` otherwise."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"{name} must be a number or None, got {budget!r}")
    budget = float(budget)
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(
            f"{name} must be a finite number > 0 (the predicted KL one step may cause) or None "
            f"(off), got {budget}"
        )
    return budget


def scale_next_step(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Multiply every param group's lr by ``scale`` for the next ``optimizer.step()`` only.

    The lrs are restored by a one-shot step post-hook (schedulers then see their own values).
    """
    if scale == 1.0:
        return
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * scale
    handle = None

    def restore(opt, args, kwargs):
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr
        handle.remove()

    handle = optimizer.register_step_post_hook(restore)


def fit_kl_budget(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    budget: float,
    *inputs: Any,
    mask: Tensor | None = None,
    output_fn: Callable | None = None,
    process_group: object = None,
) -> dict[str, float]:
    """Scale the coming step so that its predicted whole-model KL fits ``budget``.

    Call after ``backward`` (and clipping) and right before ``optimizer.step()``: the planned
    step ``Δθ`` is read off a trial step (:func:`trial_step`), its mean KL over ``mask``
    predicted with one forward-mode pass (:func:`predict_step_kl`), and the next step's lr
    multiplied by ``s = min(1, sqrt(budget / KL̂))`` (:func:`scale_next_step`).

    Args:
        model: The policy; its trainable parameters must be held by ``optimizer``.
        optimizer: SGD- or Adam-like optimizer (a step linear in the lr).
        budget: ``δ > 0``.
        *inputs: The model's inputs for the prediction.
        mask: Tokens the KL averages over (``logits.shape[:-1]``).
        output_fn: Map from the model output to the logits.
        process_group: Under data parallelism (replicated parameters, gradients averaged as
            DDP does, so every rank plans the same step), the ``torch.distributed`` group whose
            ranks hold the rest of the batch: the per-token KLs and token counts are summed over
            it (one all-reduce of 2 numbers), so ``KL̂`` is the mean over every rank's tokens
            and every rank gets the same scale. None: this process's tokens only.

    Returns:
        ``{"kl": KL̂ before scaling, "scale": s}``.

    Raises:
        ValueError: For FSDP2-sharded (DTensor) parameters: torch's forward-mode AD has no
            sharding rule for them (``aten._has_same_storage_numel``), so the JVP cannot run
            on a sharded model.

    Example:
        >>> net = nn.Linear(3, 5).double()
        >>> opt = torch.optim.SGD(net.parameters(), lr=10.0)
        >>> x = torch.randn(16, 3, dtype=torch.float64)
        >>> torch.log_softmax(net(x), -1)[:, 0].mean().backward()
        >>> with torch.no_grad():
        ...     old = torch.log_softmax(net(x), -1)
        >>> out = fit_kl_budget(net, opt, 1e-4, x)
        >>> opt.step()
        >>> with torch.no_grad():
        ...     new = torch.log_softmax(net(x), -1)
        >>> realized = float((old.exp() * (old - new)).sum(-1).mean())
        >>> out["scale"] < 1, abs(realized / 1e-4 - 1) < 0.05, opt.param_groups[0].get("lr")
        (True, True, 10.0)
    """
    budget = check_budget(budget)
    group = check_process_group(process_group)
    _, params = _named(model)
    if any(is_dtensor(p) for p in params):
        raise ValueError(
            "the KL budget does not support FSDP2-sharded (DTensor) parameters: torch's "
            "forward-mode AD has no sharding rule for them, so the step's JVP cannot run on a "
            "sharded model (use data parallelism with replicated parameters and process_group=)"
        )
    step = trial_step(optimizer, params)
    z, u = logit_change(model, step, *inputs, output_fn=output_fn)
    per_token = token_kl(z, u)
    if mask is not None and mask.shape != per_token.shape:
        raise ValueError(f"mask must have shape {tuple(per_token.shape)}, got {tuple(mask.shape)}")
    w = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    totals = torch.stack([(per_token * w).sum(), w.sum()]).double()
    all_reduce_sum_(totals, group)
    kl = float(totals[0] / totals[1].clamp_min(1))
    scale = budget_scale(kl, budget)
    scale_next_step(optimizer, scale)
    return {"kl": kl, "scale": scale}
