"""Matrix-free Hessian of the empirical risk."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ._functional import make_forward
from .base import CurvatureOperator
from .losses import differentiable_loss


class HessianOperator(CurvatureOperator):
    r"""The Hessian of the empirical risk, multiplied on vectors without forming it.

    .. math::

        H = \nabla^2_\theta \mathcal{L}(\theta)
          = c \sum_{n=1}^{N} \nabla^2_\theta \ell(f_\theta(x_n), y_n),

    with ``c`` from the loss reduction (see :mod:`curvopt.curvature.base`). A mini-batch product
    is forward-over-reverse: the directional derivative (``jvp``) of the gradient function
    (``torch.func.grad``), with ``vmap`` over the columns so the primal forward and backward
    passes run once per batch whatever the number of columns.

    Args:
        model_func: The network ``f_theta``.
        loss_func: A loss module with reduction 'mean' or 'sum' (any differentiable loss module;
            the batch weighting assumes it averages over the batch axis for 'mean').
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.
        num_data: Number of samples; counted from ``data`` if None.
        check_deterministic: See :class:`~curvopt.curvature.base.CurvatureOperator`.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(2)]
        >>> H = HessianOperator(model, nn.MSELoss(), list(model.parameters()), data)
        >>> (H @ torch.randn(H.shape[1])).shape
        torch.Size([26])
    """

    SUPPORTED_LOSSES = (nn.Module,)

    def _matmat_batch(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        forward = make_forward(self._model_func, self._names, X)
        loss_func = differentiable_loss(self._loss_func)

        def loss(params: tuple[Tensor, ...]) -> Tensor:
            return loss_func(forward(*params), y)

        grad_fn = grad(loss)
        primals = tuple(p.detach() for p in self._params)

        def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return jvp(grad_fn, (primals,), (tangents,))[1]

        with torch.no_grad():
            if cols[0].shape[0] == 1:
                return [h.unsqueeze(0) for h in hvp(*(c[0] for c in cols))]
            return list(vmap(hvp)(*cols))
