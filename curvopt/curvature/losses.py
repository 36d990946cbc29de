"""What the curvature operators need to know about a loss: validation and output-space pieces.

For a mini-batch with outputs ``f`` (``N_b`` samples) the supported losses are

* ``nn.MSELoss``: ``ell_n = ||f_n - y_n||^2`` (summed over the ``C`` output entries of a sample),
  mini-batch loss ``c * sum_n ell_n`` with ``c = 1`` ('sum') or ``1 / (N_b C)`` ('mean'); its
  Hessian in output space is ``2 c I``.
* ``nn.CrossEntropyLoss`` on logits ``(N_b, C)``: ``ell_n = -log softmax(f_n)[y_n]``,
  ``c = 1`` ('sum') or ``1 / N_b`` ('mean'); its Hessian in logit space is
  ``c (diag(p_n) - p_n p_n^T)`` per sample, applied through
  :func:`curvopt.kernels.softmax_curvature`.

Both are negative log-likelihoods (a Gaussian with variance 1/2, a categorical), so their Fisher
equals the generalized Gauss-Newton matrix; sampling labels from the model gives the
Monte-Carlo Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvopt.kernels import softmax_curvature

REDUCTIONS = ("mean", "sum")


def check_loss(loss_func: nn.Module, supported: tuple[type[nn.Module], ...], owner: str) -> None:
    """Raise a clear error if ``owner`` cannot handle ``loss_func``.

    Raises:
        TypeError: If ``loss_func`` is not an instance of one of ``supported``.
        ValueError: If its reduction is not 'mean'/'sum', or options that change the scaling
            per sample (class weights, label smoothing) are set.
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
    if isinstance(loss_func, nn.CrossEntropyLoss):
        if loss_func.weight is not None:
            raise ValueError(f"{owner} does not support class weights in CrossEntropyLoss")
        if loss_func.label_smoothing != 0.0:
            raise ValueError(f"{owner} does not support label_smoothing in CrossEntropyLoss")


def check_output(loss_func: nn.Module, output: Tensor) -> None:
    """Check that the model output has a shape the output-space formulas handle."""
    if isinstance(loss_func, nn.CrossEntropyLoss) and output.ndim != 2:
        raise ValueError(
            "CrossEntropyLoss curvature needs model outputs (logits) of shape (N, C), got "
            f"{tuple(output.shape)}; flatten extra axes into the batch axis in the model"
        )


def reduction_scale(loss_func: nn.Module, output: Tensor) -> float:
    """The constant ``c`` of the mini-batch loss ``c * sum_n ell_n`` (see the module docstring)."""
    if loss_func.reduction == "sum":
        return 1.0
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return 1.0 / output.shape[0]
    return 1.0 / output.numel()


def loss_hessian_product(loss_func: nn.Module, output: Tensor, u: Tensor) -> Tensor:
    """Apply the Hessian of the mini-batch loss w.r.t. the outputs to directions ``u``.

    Args:
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss``.
        output: Model outputs ``f`` of shape ``(N_b, ...)``.
        u: Directions of shape ``(*batch, *output.shape)`` (e.g. ``(k, N_b, C)``).

    Returns:
        ``H_f u`` with the shape of ``u``.
    """
    scale = reduction_scale(loss_func, output)
    if isinstance(loss_func, nn.MSELoss):
        return (2.0 * scale) * u
    lead = u.shape[: u.ndim - output.ndim]
    if lead:
        n_rep = math.prod(lead)
        logits = output.detach().expand(*lead, *output.shape).reshape(-1, output.shape[-1])
        hu = softmax_curvature(logits, u.reshape(n_rep * output.shape[0], -1))
        return scale * hu.reshape(u.shape)
    return scale * softmax_curvature(output.detach(), u)


def sample_output_gradients(
    loss_func: nn.Module, output: Tensor, mc_samples: int, generator: torch.Generator
) -> Tensor:
    """Draw gradients of the per-sample loss w.r.t. the outputs at labels sampled from the model.

    For a label ``y ~ p(y | f_n)`` the would-be gradient ``g = grad_f ell(f_n, y)`` has
    ``E[g g^T] =`` the Hessian of ``ell_n`` w.r.t. ``f_n`` (without the reduction constant):

    * MSE: ``y = f + N(0, I/2)``, ``g = 2 (f - y) ~ N(0, 2 I)``;
    * cross-entropy: ``y ~ Categorical(softmax(f))``, ``g = softmax(f) - onehot(y)``.

    Args:
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss``.
        output: Outputs ``(N_b, ...)`` (logits ``(N_b, C)`` for cross-entropy).
        mc_samples: Number of samples ``M`` per data point.
        generator: Random generator on the outputs' device.

    Returns:
        Samples of shape ``(M, *output.shape)``.
    """
    output = output.detach()
    if isinstance(loss_func, nn.MSELoss):
        noise = torch.randn(
            (mc_samples, *output.shape),
            generator=generator,
            dtype=output.dtype,
            device=output.device,
        )
        return math.sqrt(2.0) * noise
    prob = torch.softmax(output, dim=-1)
    labels = torch.multinomial(prob, mc_samples, replacement=True, generator=generator).T
    onehot = torch.nn.functional.one_hot(labels, output.shape[-1]).to(prob.dtype)
    return prob.unsqueeze(0) - onehot


def per_sample_loss(loss_func: nn.Module, output_n: Tensor, y_n: Tensor) -> Tensor:
    """Unreduced loss ``ell_n`` of one sample (no batch axis on ``output_n``, ``y_n``)."""
    loss = loss_func(output_n.unsqueeze(0), y_n.unsqueeze(0))
    if loss_func.reduction == "mean" and isinstance(loss_func, nn.MSELoss):
        loss = loss * output_n.numel()
    return loss


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
