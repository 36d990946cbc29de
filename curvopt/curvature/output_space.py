r"""Products ``J^T M J V`` with an output-space matrix ``M``: the machinery of GGN, Fisher, EF.

For a mini-batch with outputs ``f = f_\theta(X)`` and Jacobian ``J = \partial f / \partial
\theta``, the GGN, the Fisher and the empirical Fisher all have the form ``J^T M J`` with a
block-diagonal ``M`` in output space (`OutputSpaceOperator._output_product`). A product costs

* with forward-mode AD (the default): one forward pass carrying tangents (``J v``), ``M``, and
  one backward pass (``J^T u``); several columns share one primal pass under ``vmap``;
* without it (a module with no forward-mode formula): ``J v`` from two reverse passes,
  ``J v = \partial_u \langle J^T u, v \rangle`` (a double backward through the model), chosen
  automatically after the first failure. If the model has no double backward either (fused
  attention kernels), a RuntimeError names the module and the fix.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ._functional import call_model, dual_forward, make_forward, no_autograd_path
from .base import CurvatureOperator


class OutputSpaceOperator(CurvatureOperator):
    """Base of the operators ``sum_b w_b J_b^T M_b J_b`` (see the module docstring)."""

    _forward_ad_failed: bool = False

    def _output_product(self, output: Tensor, y: Tensor, Jv: Tensor) -> Tensor:
        """Apply ``M`` to ``Jv`` of shape ``(k, *output.shape)``; ``output`` is detached."""
        raise NotImplementedError

    def _matmat_batch(self, X: object, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        if not self._forward_ad_failed:
            try:
                if cols[0].shape[0] == 1:
                    return self._matvec_batch(X, y, [c[0] for c in cols])
                if self._stateful_forward:  # buffers change in place: no torch.func
                    parts = [
                        self._matvec_batch(X, y, [c[j] for c in cols])
                        for j in range(cols[0].shape[0])
                    ]
                    return [torch.cat(column) for column in zip(*parts)]
                return self._matmat_forward(X, y, cols)
            except (NotImplementedError, RuntimeError):
                self._forward_ad_failed = True  # no forward-mode formula, or its backward
        return self._matmat_reverse(X, y, cols)

    def _matmat_forward(self, X: object, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """Several columns: ``torch.func.jvp`` and ``vjp`` under ``vmap``, one primal pass."""
        forward = make_forward(self._model_func, self._names, X, self._loss_func)
        primals = tuple(p.detach() for p in self._params)
        with torch.no_grad():
            output, vjp_fn = vjp(forward, *primals)
            self._check_output(X, output, y)
            Jv = vmap(lambda *t: jvp(forward, primals, t)[1])(*cols)
            u = self._output_product(output, y, Jv)
            return list(vmap(vjp_fn)(u))

    def _matvec_batch(self, X: object, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        """One column: a forward pass with dual numbers, then one ordinary backward pass."""
        with torch.enable_grad():
            # the backward pass runs outside the dual level: inside it, autograd would also
            # push tangents through the backward graph (a second-order term we do not need)
            output, Jv = dual_forward(
                self._model_func, X, self._loss_func, self._named_params, v, first_order=True
            )
            self._check_output(X, output, y)
            if Jv is None:  # the output does not depend on the parameters
                Jv = torch.zeros_like(output)
            with torch.no_grad():
                u = self._output_product(output.detach(), y, Jv.detach().unsqueeze(0))
            grads = self._vjp(output, u[0], retain_graph=False)
        return [g.unsqueeze(0) for g in grads]

    def _matmat_reverse(self, X: object, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """``J v`` by a double backward (no forward-mode AD), then ``J^T u`` per column."""
        k = cols[0].shape[0]
        with torch.enable_grad():
            output = call_model(self._model_func, X, self._loss_func)
            self._check_output(X, output, y)
            if not output.requires_grad:  # the output does not depend on the parameters
                return [torch.zeros_like(c) for c in cols]
            dummy = torch.zeros_like(output, requires_grad=True)
            JTu = torch.autograd.grad(
                output, self._params, grad_outputs=dummy, create_graph=True, allow_unused=True
            )
            live = [i for i, g in enumerate(JTu) if g is not None and g.requires_grad]
            Jv = torch.zeros(k, *output.shape, dtype=output.dtype, device=output.device)
            try:
                for j in range(k):
                    if live:
                        (Jv[j],) = torch.autograd.grad(
                            [JTu[i] for i in live],
                            dummy,
                            grad_outputs=[cols[i][j] for i in live],
                            retain_graph=True,
                        )
            except (RuntimeError, NotImplementedError) as err:
                raise no_autograd_path(self._model_func, type(self).__name__, err) from err
            with torch.no_grad():
                u = self._output_product(output.detach(), y, Jv)
            out = [torch.empty_like(c) for c in cols]
            for j in range(k):
                for o, g in zip(out, self._vjp(output, u[j], retain_graph=j < k - 1)):
                    o[j] = g
        return out

    def _vjp(self, output: Tensor, u: Tensor, retain_graph: bool) -> list[Tensor]:
        """``J^T u`` as tensors shaped like the parameters (zeros where unused)."""
        if not output.requires_grad:
            return [torch.zeros_like(p) for p in self._params]
        grads = torch.autograd.grad(
            output, self._params, grad_outputs=u, retain_graph=retain_graph, allow_unused=True
        )
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self._params)]
