"""Matrix-free Hessian of the empirical risk."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ._functional import (
    call_model,
    dual_forward,
    evaluate_loss,
    make_forward,
    no_autograd_path,
)
from .base import Batch, CurvatureOperator
from .forward_ad import module_signature, reverse_over_forward_safe
from .losses import differentiable_loss

MODES = ("auto", "reverse-over-forward", "reverse-over-reverse", "forward-over-reverse")


class HessianOperator(CurvatureOperator):
    r"""The Hessian of the empirical risk, multiplied on vectors without forming it.

    $$
    H = \nabla^2_\theta \mathcal{L}(\theta)
      = c \sum_{n=1}^{N} \nabla^2_\theta \ell(f_\theta(x_n), y_n),
    $$

    with ``c`` from the loss reduction (see `curvopt.curvature.base`). Three exact ways to
    multiply the mini-batch Hessian onto ``k`` columns ``V``:

    * ``mode="reverse-over-forward"``: one forward pass with dual numbers gives the outputs
      ``f`` and ``J v``; one backward pass of ``s = \nabla_f \ell(f)^\top (J v)`` gives
      ``H v = \nabla_\theta s``. Fastest for one column on the CPU (it never computes the
      gradient itself), but each column repeats the forward pass.
    * ``mode="reverse-over-reverse"``: one forward and one backward pass that keeps its graph
      give ``g = \nabla_\theta L``; each column then costs one more backward pass through that
      graph, ``H v = \nabla_\theta (g^\top v)``. Fastest for many columns.
    * ``mode="forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, with
      ``vmap`` over the columns (one primal pass per batch). No graph is kept between calls;
      the natural form for ``torch.compile``.

    The default ``mode="auto"`` uses reverse-over-forward for one column and
    reverse-over-reverse for several (``benchmarks/curvature_products.py``). A model with an
    operation that has no forward-mode AD formula falls back to reverse-over-reverse (in every
    mode, from the first failure on); one without a double backward either (fused attention
    kernels) gets a RuntimeError naming the module and the fix.

    Note:
        Reverse-over-forward backpropagates through torch's forward-mode derivative formulas,
        and in PyTorch 2.13 some of them are differentiated wrongly without any error:
        ``nn.LayerNorm`` and ``F.layer_norm``, ``nn.InstanceNorm1d/2d/3d``, and batch norm in
        training mode (products off by 15-50 %). Reverse-over-forward is therefore used (in
        ``"auto"`` and when asked for by name) only when one recorded forward pass of the model
        calls nothing but the ATen operators of the allow-list
        `curvopt.curvature.forward_ad.SAFE_OPS`; otherwise the product is computed
        reverse-over-reverse (`forward_ad_safe` says which; the verdict is cached until a
        module is added, replaced or switched between train and eval). Forward-over-reverse
        (``torch.func.jvp`` of ``grad``) and reverse-over-reverse are right for all of them.

    The keywords ``num_data``, ``batch_size_fn``, ``check_deterministic``,
    ``allow_train_mode``, ``process_group`` and ``progressbar`` are those of
    `curvopt.curvature.base.CurvatureOperator`.

    Args:
        model_func: The network ``f_theta``.
        loss_func: A loss module with reduction 'mean' or 'sum' (any twice differentiable loss
            module; for 'mean' the batch weighting assumes it averages over the batch axis).
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.
        mode: ``"auto"``, ``"reverse-over-forward"``, ``"reverse-over-reverse"`` or
            ``"forward-over-reverse"``.

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
        mode: str = "auto",
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        check_deterministic: bool = False,
        allow_train_mode: bool = False,
        process_group: Any = None,
        progressbar: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._mode = mode
        self._safety: tuple[tuple, bool, list[str]] | None = None
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            check_deterministic=check_deterministic,
            allow_train_mode=allow_train_mode,
            process_group=process_group,
            progressbar=progressbar,
        )

    @property
    def mode(self) -> str:
        """How mini-batch products are computed (see the class docstring)."""
        return self._mode

    _forward_ad_failed: bool = False

    @property
    def forward_ad_safe(self) -> tuple[bool, list[str]] | None:
        """Whether reverse-over-forward is trusted for the model, and the operators against it.

        ``None`` until the first single-column product (the check records one forward pass on
        the first batch then); afterwards ``(safe, offenders)`` with the ATen operators outside
        `curvopt.curvature.forward_ad.SAFE_OPS`.

        Example:
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
            >>> H = HessianOperator(model, nn.MSELoss(), list(model.parameters()),
            ...                     [(torch.randn(5, 3), torch.randn(5, 1))])
            >>> _ = H @ torch.randn(H.shape[0])
            >>> H.forward_ad_safe  # doctest: +ELLIPSIS
            (False, ['aten.native_layer_norm (nn.LayerNorm / F.layer_norm ...)'])
        """
        if self._safety is None:
            return None
        return self._safety[1], list(self._safety[2])

    def _forward_ad_safe(self, X: Any) -> bool:
        """Check (once per module layout and mode) that the model's ops are allow-listed."""
        signature = module_signature(self._model_func)
        if self._safety is None or self._safety[0] != signature:
            safe, bad = reverse_over_forward_safe(
                lambda: call_model(self._model_func, X, self._loss_func)
            )
            self._safety = (signature, safe, bad)
        return self._safety[1]

    def _matmat_batch(self, X: Any, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        mode = self._mode
        if mode == "auto":
            mode = "reverse-over-forward" if cols[0].shape[0] == 1 else "reverse-over-reverse"
        if mode == "forward-over-reverse" and self._stateful_forward:
            mode = "reverse-over-reverse"  # buffers change in place: no torch.func
        if mode == "reverse-over-forward" and not self._forward_ad_safe(X):
            mode = "reverse-over-reverse"  # torch gets its second derivative wrong here
        if not self._forward_ad_failed:
            try:
                if mode == "forward-over-reverse":
                    return self._forward_over_reverse(X, y, cols)
                if mode == "reverse-over-forward":
                    return self._reverse_over_forward(X, y, cols)
            except (NotImplementedError, RuntimeError):
                self._forward_ad_failed = True  # no forward-mode formula, or its backward
        return self._reverse_over_reverse(X, y, cols)

    def _loss(self, X: Any, output: Tensor, y: Tensor) -> Tensor:
        """The mini-batch loss of an output, after checking output and targets."""
        self._check_output(X, output, y)
        return evaluate_loss(self._loss_func, output, y)

    def _reverse_over_forward(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """Per column: dual-number forward pass, then the gradient of ``grad_f(loss) . Jv``."""
        out = [torch.empty_like(c) for c in cols]
        for j in range(cols[0].shape[0]):
            with torch.enable_grad():
                output, Jv = dual_forward(
                    self._model_func, X, self._loss_func, self._named_params, [c[j] for c in cols]
                )
                # outside the dual level: the backward pass must not carry tangents
                if Jv is None:  # the output does not depend on the parameters
                    Jv = torch.zeros_like(output)
                (grad_output,) = torch.autograd.grad(
                    self._loss(X, output, y), output, create_graph=True
                )
                s = (grad_output * Jv).sum()
                hv = (
                    torch.autograd.grad(s, self._params, allow_unused=True)
                    if s.requires_grad
                    else [None] * len(self._params)
                )
            for o, h in zip(out, hv):
                if h is None:
                    o[j].zero_()
                else:
                    o[j] = h
        return out

    def _reverse_over_reverse(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """Keep the graph of the gradient; one more backward pass per column."""
        params = self._params
        with torch.enable_grad():
            output = call_model(self._model_func, X, self._loss_func)
            loss = self._loss(X, output, y)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # gradient entries constant in theta contribute nothing to H v
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            out = [torch.zeros_like(c) for c in cols]
            if not live:
                return out
            k = cols[0].shape[0]
            for j in range(k):
                try:
                    hv = torch.autograd.grad(
                        [grads[i] for i in live],
                        params,
                        grad_outputs=[cols[i][j] for i in live],
                        retain_graph=j < k - 1,
                        allow_unused=True,
                    )
                except (RuntimeError, NotImplementedError) as err:
                    raise no_autograd_path(self._model_func, "HessianOperator", err) from err
                for o, h in zip(out, hv):
                    if h is not None:
                        o[j] = h
        return out

    def _forward_over_reverse(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """``jvp`` of ``grad`` (torch.func), ``vmap`` over the columns."""
        forward = make_forward(self._model_func, self._names, X, self._loss_func)
        loss_func = differentiable_loss(self._loss_func)

        def loss(params: tuple[Tensor, ...]) -> Tensor:
            output = forward(*params)
            self._check_output(X, output, y)
            return evaluate_loss(loss_func, output, y)

        grad_fn = grad(loss)
        primals = tuple(p.detach() for p in self._params)

        def hvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return jvp(grad_fn, (primals,), (tangents,))[1]

        with torch.no_grad():
            if cols[0].shape[0] == 1:
                return [h.unsqueeze(0) for h in hvp(*(c[0] for c in cols))]
            return list(vmap(hvp)(*cols))
