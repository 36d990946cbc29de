"""Matrix-free Hessian of the empirical risk."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ._functional import make_forward
from .base import Batch, CurvatureOperator
from .losses import differentiable_loss

MODES = ("reverse-over-reverse", "forward-over-reverse")


class HessianOperator(CurvatureOperator):
    r"""The Hessian of the empirical risk, multiplied on vectors without forming it.

    $$
    H = \nabla^2_\theta \mathcal{L}(\theta)
      = c \sum_{n=1}^{N} \nabla^2_\theta \ell(f_\theta(x_n), y_n),
    $$

    with ``c`` from the loss reduction (see `curvopt.curvature.base`). Two ways to multiply
    the mini-batch Hessian onto ``k`` columns ``V``, both exact:

    * ``mode="reverse-over-reverse"`` (default): one forward and one backward pass that keeps
      its graph give ``g = \nabla_\theta L``; each column then costs one more backward pass
      through that graph, ``H v = \nabla_\theta (g^\top v)``. Fastest on the CPU in
      ``benchmarks/curvature_products.py`` for one column and for many.
    * ``mode="forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, with
      ``vmap`` over the columns (one primal pass per batch). No graph is kept between calls;
      the natural choice for ``torch.compile``.

    Args:
        model_func: The network ``f_theta``.
        loss_func: A loss module with reduction 'mean' or 'sum' (any twice differentiable loss
            module; for 'mean' the batch weighting assumes it averages over the batch axis).
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.
        mode: ``"reverse-over-reverse"`` or ``"forward-over-reverse"``.
        num_data: Number of samples; counted from ``data`` if None.
        check_deterministic: See `curvopt.curvature.base.CurvatureOperator`.

    Raises:
        ValueError: If ``mode`` is unknown (and see the base class).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(2)]
        >>> H = HessianOperator(model, nn.MSELoss(), list(model.parameters()), data)
        >>> (H @ torch.randn(H.shape[1])).shape
        torch.Size([26])
    """

    SUPPORTED_LOSSES = (nn.Module,)

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: Iterable[Tensor],
        data: Iterable[Batch],
        *,
        mode: str = "reverse-over-reverse",
        num_data: int | None = None,
        check_deterministic: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._mode = mode
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            num_data=num_data,
            check_deterministic=check_deterministic,
        )

    @property
    def mode(self) -> str:
        """How mini-batch products are computed (see the class docstring)."""
        return self._mode

    def _matmat_batch(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        if self._mode == "forward-over-reverse":
            return self._forward_over_reverse(X, y, cols)
        return self._reverse_over_reverse(X, y, cols)

    def _reverse_over_reverse(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """Keep the graph of the gradient; one more backward pass per column."""
        params = self._params
        with torch.enable_grad():
            loss = self._loss_func(self._model_func(X), y)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # gradient entries constant in theta contribute nothing to H v
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            out = [torch.zeros_like(c) for c in cols]
            if not live:
                return out
            k = cols[0].shape[0]
            for j in range(k):
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    params,
                    grad_outputs=[cols[i][j] for i in live],
                    retain_graph=j < k - 1,
                    allow_unused=True,
                )
                for o, h in zip(out, hv):
                    if h is not None:
                        o[j] = h
        return out

    def _forward_over_reverse(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """``jvp`` of ``grad`` (torch.func), ``vmap`` over the columns."""
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
