r"""What the curvature operators need to know about a loss: validation and output-space pieces.

The supported losses split a mini-batch output ``f`` into *loss terms* ``t`` (output
positions) and add them up, ``L_b = c_b \sum_t \ell_t(f_t, y_t)``:

* ``nn.CrossEntropyLoss`` on logits ``(N, C)`` or ``(N, C, d_1, ...)`` (torch's layouts): one
  term per sample and position, ``f_t`` the ``C`` logits there. Targets equal to
  ``ignore_index`` give ``\ell_t = 0``; class ``weight`` and ``label_smoothing`` are exact.
  ``'mean'``: ``c_b = 1 / D_b`` with ``D_b`` the number of valid targets (the sum of their class
  weights with ``weight``), as torch computes it. Probability targets: ``D_b = N d_1 \cdots``.
* ``nn.MSELoss`` on outputs of any shape, ``\ell = (f - y)^2`` summed; ``'mean'``: ``D_b`` the
  number of output entries.
* ``nn.BCEWithLogitsLoss`` on outputs of any shape (``weight`` and ``pos_weight`` exact);
  ``'mean'``: ``D_b`` the number of output entries.

With ``'sum'``, ``c_b = 1``. For the curvature of the whole data set as one batch, batch ``b``
counts ``D_b / \sum_b D_b`` ('mean') or ``1`` ('sum'); `loss_terms` gives ``D_b``.

**Output-space curvature.** Each term's Hessian in output space is ``\alpha_t K_t``:
``K_t = \mathrm{diag}(p_t) - p_t p_t^\top`` (softmax, through
`curvopt.kernels.softmax_curvature`), ``\sigma(1-\sigma)`` per entry (BCE) or ``I`` (MSE,
``\alpha = 2``). For cross-entropy every ``-\log p_c`` has the same Hessian, so ``\alpha_t``
is the total coefficient of the target's ``-\log p_c`` terms, ``\alpha_t = \ell_t(0) / \log C``
(the loss at uniform logits); for BCE, ``\alpha_t = \ell_t(0) / \log 2 = w (p y + 1 - y)``.

**Likelihood.** Without class weights, label smoothing and ``pos_weight``, the losses are
negative log-likelihoods (a Gaussian with variance 1/2, a categorical, Bernoulli), so their
Fisher equals the GGN; sampling targets from the model gives the Monte-Carlo Fisher.

**Grouping for the empirical Fisher** (curvlinops' convention): a data point is one term of
the cross-entropy (the ``C`` logits of a position) and, for MSE and BCE, one vector along the
last output axis (every entry for 1-D outputs).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvopt.kernels import softmax_curvature

from .batches import BatchError

REDUCTIONS = ("mean", "sum")
KNOWN_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


def check_loss(
    loss_func: nn.Module,
    supported: tuple[type[nn.Module], ...],
    owner: str,
    *,
    likelihood: bool = False,
) -> None:
    """Raise a clear error if ``owner`` cannot handle ``loss_func``.

    Args:
        loss_func: The loss module.
        supported: The loss types ``owner`` accepts.
        owner: Name for messages.
        likelihood: Whether ``owner`` needs a negative log-likelihood (the Fisher): then class
            weights, label smoothing, BCE's ``weight`` and ``pos_weight`` are refused.

    Raises:
        TypeError: If ``loss_func`` is not an instance of one of ``supported``.
        ValueError: If its reduction is not 'mean'/'sum', or an option breaks the likelihood.
    """
    if not isinstance(loss_func, supported):
        names = ", ".join(f"nn.{t.__name__}" for t in supported)
        raise TypeError(f"{owner} supports loss_func of type {names}; got {type(loss_func)}")
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{owner} needs a loss with reduction 'mean' or 'sum' (the curvature of a scalar "
            f"risk); got reduction={reduction!r}. Construct it as e.g. "
            f"{type(loss_func).__name__}(reduction='mean')"
        )
    if not likelihood:
        return
    options = {
        nn.CrossEntropyLoss: ("weight", "label_smoothing"),
        nn.BCEWithLogitsLoss: ("weight", "pos_weight"),
    }.get(type(loss_func), ())
    for name in options:
        value = getattr(loss_func, name, None)
        if value is not None and not (name == "label_smoothing" and value == 0.0):
            raise ValueError(
                f"{owner} needs a negative log-likelihood, but {type(loss_func).__name__} has "
                f"{name} set, which makes the loss none; use GGNOperator (exact for it) or "
                f"drop {name}"
            )


def check_targets(loss_func: nn.Module, output: Tensor, y: Tensor) -> None:
    """Check that the output and the targets fit the loss, before torch sees them.

    Raises:
        BatchError: For cross-entropy logits without a class axis, targets of the wrong shape,
            labels outside ``[0, C)`` (other than ``ignore_index``), MSE/BCE targets whose
            shape differs from the output's, BCE targets that are not floating-point (int64 or
            bool labels), or a BCE ``weight``/``pos_weight`` that does not broadcast to the output.
    """
    if isinstance(loss_func, nn.CrossEntropyLoss):
        if output.ndim < 2:
            raise BatchError(
                f"CrossEntropyLoss needs logits (N, C) or (N, C, d1, ...), got the model "
                f"output {tuple(output.shape)}"
            )
        C = output.shape[1]
        if y.is_floating_point():
            if y.shape != output.shape:
                raise BatchError(
                    f"probability targets must have the logits' shape {tuple(output.shape)}, "
                    f"got y {tuple(y.shape)}"
                )
            return
        expected = (output.shape[0], *output.shape[2:])
        if tuple(y.shape) != expected:
            raise BatchError(
                f"CrossEntropyLoss takes logits (N, C, d1, ...) (classes on axis 1) and labels "
                f"(N, d1, ...): the logits {tuple(output.shape)} need labels {expected}, got y "
                f"{tuple(y.shape)}"
            )
        outside = ((y < 0) | (y >= C)) & (y != loss_func.ignore_index)
        if bool(outside.any()):
            bad = y[outside][0]
            raise BatchError(
                f"label {int(bad)} is outside the {C} classes [0, {C - 1}] of the logits "
                f"{tuple(output.shape)} (ignore_index={loss_func.ignore_index})"
            )
    elif isinstance(loss_func, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        name = type(loss_func).__name__
        if y.shape != output.shape:
            raise BatchError(
                f"{name} needs targets of the output's shape {tuple(output.shape)}, got y "
                f"{tuple(y.shape)}"
            )
        if isinstance(loss_func, nn.BCEWithLogitsLoss) and not y.is_floating_point():
            raise BatchError(
                f"{name} needs floating-point targets, got y {str(y.dtype).removeprefix('torch.')}"
                f" (torch's {name} refuses them too); convert them with y.to(torch."
                f"{str(output.dtype).removeprefix('torch.')}) in the data"
            )
        if isinstance(loss_func, nn.BCEWithLogitsLoss):
            for option in ("weight", "pos_weight"):
                value = getattr(loss_func, option)
                if value is not None and not _broadcasts_to(value.shape, output.shape):
                    hint = (
                        f"one entry per output of the last axis, ({output.shape[-1]},)"
                        if option == "pos_weight"
                        else "a shape that broadcasts to the output's"
                    )
                    raise BatchError(
                        f"BCEWithLogitsLoss's {option} has shape {tuple(value.shape)}, which "
                        f"does not broadcast to the output {tuple(output.shape)}; give it {hint}"
                    )


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without changing ``target``."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def loss_terms(loss_func: nn.Module, y: Tensor) -> float:
    """``D_b``: what the loss divides its sum by for ``'mean'`` (see the module docstring).

    For other loss modules (the Hessian takes any) the batch size ``y.shape[0]``: the weighting
    then assumes the loss averages over the batch axis.
    """
    if isinstance(loss_func, nn.CrossEntropyLoss) and not y.is_floating_point():
        valid = y != loss_func.ignore_index
        if loss_func.weight is None:
            return float(valid.sum())
        return float(loss_func.weight[y[valid]].sum())
    if isinstance(loss_func, nn.CrossEntropyLoss):  # probability targets (N, C, d1, ...)
        return float(y.numel() // y.shape[1])
    if isinstance(loss_func, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        return float(y.numel())
    return float(y.shape[0])


def reduction_scale(loss_func: nn.Module, y: Tensor) -> float:
    """The constant ``c_b`` of the mini-batch loss ``c_b sum_t ell_t``."""
    if loss_func.reduction == "sum":
        return 1.0
    return 1.0 / loss_terms(loss_func, y)


def summed(loss_func: nn.Module, reduction: str = "sum") -> nn.Module:
    """A copy of ``loss_func`` with another reduction (same options, shared buffers)."""
    out = copy.copy(loss_func)
    out.reduction = reduction
    return out


def term_coefficients(loss_func: nn.Module, output: Tensor, y: Tensor) -> Tensor | float:
    """``alpha_t`` of the module docstring, shaped to broadcast against ``output``."""
    if isinstance(loss_func, nn.MSELoss):
        return 2.0
    if isinstance(loss_func, nn.CrossEntropyLoss):
        C = output.shape[1]
        if C < 2:  # one class: the softmax is constant, the curvature zero
            return 0.0
        plain = loss_func.weight is None and loss_func.label_smoothing == 0.0
        if plain and not y.is_floating_point():  # 1 at valid targets, 0 at ignore_index
            return (y != loss_func.ignore_index).unsqueeze(1).to(output.dtype)
        zeros = torch.zeros_like(output)
        return (summed(loss_func, "none")(zeros, y) / math.log(C)).unsqueeze(1)
    if loss_func.weight is None and loss_func.pos_weight is None:  # BCE: 1 everywhere
        return 1.0
    return summed(loss_func, "none")(torch.zeros_like(output), y) / math.log(2.0)


def output_curvature(output: Tensor, u: Tensor, loss_func: nn.Module) -> Tensor:
    """``K_t u_t`` for every term (without ``alpha_t`` and ``c_b``); ``u`` is ``(*lead, *f)``."""
    if isinstance(loss_func, nn.MSELoss):
        return u
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        s = torch.sigmoid(output)
        return (s * (1.0 - s)) * u
    # cross-entropy: classes on axis 1 of the output; the kernel wants them last
    lead = u.ndim - output.ndim
    z = output.movedim(1, -1)
    ut = u.movedim(lead + 1, -1)
    C = z.shape[-1]
    zz = z.expand(*ut.shape).reshape(-1, C)
    hu = softmax_curvature(zz, ut.reshape(-1, C)).reshape(ut.shape)
    return hu.movedim(-1, lead + 1)


def loss_hessian_product(loss_func: nn.Module, output: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """Apply the Hessian of the mini-batch loss w.r.t. the outputs to directions ``u``.

    Args:
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        output: Model outputs ``f`` of shape ``(N_b, ...)`` (detached).
        y: Targets of the batch.
        u: Directions of shape ``(*lead, *output.shape)`` (e.g. ``(k, N_b, C)``).

    Returns:
        ``c_b alpha_t K_t u_t`` with the shape of ``u``.
    """
    alpha = term_coefficients(loss_func, output, y)
    return (reduction_scale(loss_func, y) * alpha) * output_curvature(output, u, loss_func)


def output_gradients(loss_func: nn.Module, output: Tensor, y: Tensor) -> Tensor:
    """``g_t``: the gradient of the summed loss w.r.t. the outputs, shape of ``output``."""
    out = output.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(summed(loss_func)(out, y), out)
    return g


def group_last(loss_func: nn.Module, t: Tensor, lead: int = 0) -> Tensor:
    """View ``t`` (``(*lead, *output)``) with each data point's entries on the last axis."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return t.movedim(lead + 1, -1)
    if t.ndim - lead == 1:
        return t.unsqueeze(-1)
    return t


def ungroup(loss_func: nn.Module, t: Tensor, like: Tensor, lead: int = 0) -> Tensor:
    """Undo `group_last` for a tensor of the grouped shape; ``like`` has the output shape."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return t.movedim(-1, lead + 1)
    return t.reshape(*t.shape[:lead], *like.shape)


def empirical_fisher_product(loss_func: nn.Module, output: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """``c_b g_t (g_t^T u_t)`` per data point: the output-space factor of the empirical Fisher.

    Args:
        loss_func: A loss of `KNOWN_LOSSES`.
        output: Model outputs (detached).
        y: Targets.
        u: Directions ``(*lead, *output.shape)``.
    """
    lead = u.ndim - output.ndim
    g = group_last(loss_func, output_gradients(loss_func, output, y))
    ug = group_last(loss_func, u, lead)
    w = (ug * g).sum(-1, keepdim=True)
    return ungroup(loss_func, reduction_scale(loss_func, y) * w * g, output, lead)


def sample_output_gradients(
    loss_func: nn.Module, output: Tensor, mc_samples: int, generator: torch.Generator
) -> Tensor:
    """Draw gradients of each term's loss w.r.t. the outputs at targets sampled from the model.

    For a target ``y ~ p(y | f_t)`` the would-be gradient ``g = grad_f ell(f_t, y)`` has
    ``E[g g^T] = K_t`` (the Hessian of the term w.r.t. ``f_t``):

    * MSE: ``y = f + N(0, I/2)``, ``g = 2 (f - y) ~ N(0, 2 I)``;
    * cross-entropy: ``y ~ Categorical(softmax(f_t))``, ``g = softmax(f_t) - onehot(y)``
      (classes on axis 1 of the output);
    * BCE: ``y ~ Bernoulli(sigmoid(f))`` per entry, ``g = sigmoid(f) - y``.

    Args:
        loss_func: A loss of `KNOWN_LOSSES`.
        output: Outputs ``(N_b, ...)`` (logits ``(N_b, C, ...)`` for cross-entropy).
        mc_samples: Number of samples ``M`` per term.
        generator: Random generator on the outputs' device.

    Returns:
        Samples of shape ``(M, *output.shape)``.
    """
    output = output.detach()
    shape = (mc_samples, *output.shape)
    if isinstance(loss_func, nn.MSELoss):
        noise = torch.randn(shape, generator=generator, dtype=output.dtype, device=output.device)
        return math.sqrt(2.0) * noise
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        s = torch.sigmoid(output)
        draws = torch.rand(shape, generator=generator, dtype=output.dtype, device=output.device)
        return s - (draws < s).to(s.dtype)
    z = output.movedim(1, -1)
    prob = torch.softmax(z, dim=-1).reshape(-1, z.shape[-1])
    labels = torch.multinomial(prob, mc_samples, replacement=True, generator=generator).T
    onehot = torch.nn.functional.one_hot(labels, prob.shape[-1]).to(prob.dtype)
    g = (prob.unsqueeze(0) - onehot).reshape(mc_samples, *z.shape)
    return g.movedim(-1, 2)


def differentiable_loss(loss_func: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Return ``loss_func`` itself, or for ``nn.MSELoss`` the same value written out.

    ``F.mse_loss`` with reduction 'mean' fails under forward-over-reverse AD in PyTorch 2.13
    ("ZeroTensors are immutable", from the zero tangent of the target); the written-out
    ``((f - y) ** 2).mean()`` has the same value and derivatives and does not.
    """
    if isinstance(loss_func, nn.MSELoss):
        reduce = torch.mean if loss_func.reduction == "mean" else torch.sum

        def mse(output: Tensor, target: Tensor) -> Tensor:
            return reduce((output - target) ** 2)

        return mse
    return loss_func
