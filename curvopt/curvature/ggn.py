"""Matrix-free generalized Gauss-Newton matrix of the empirical risk."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import functional_call, jvp, vjp, vmap

from ._functional import make_forward
from .base import CurvatureOperator
from .losses import check_output, loss_hessian_product


class GGNOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix of the empirical risk, without forming Jacobians.

    $$
    G = c \sum_{n=1}^{N} J_n^\top \, \nabla^2_{f} \ell(f_n, y_n) \, J_n,
    \qquad J_n = \partial f_\theta(x_n) / \partial \theta,
    $$

    for ``nn.MSELoss`` (``\nabla^2_f \ell = 2 I``) and ``nn.CrossEntropyLoss`` on logits
    ``(N, C)`` (``\nabla^2_f \ell = \mathrm{diag}(p) - p p^\top``, through
    `curvopt.kernels.softmax_curvature`), reductions 'mean' and 'sum'.

    A mini-batch product is one forward pass carrying the tangent (``J v``, forward-mode AD),
    the loss Hessian applied in output space, and one backward pass (``J^T u``): about the
    cost of a gradient plus a forward-mode pass. Several columns share one primal forward pass
    (``torch.func.jvp`` and ``vjp`` under ``vmap``).

    Args:
        model_func: The network ``f_theta``.
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss`` with reduction 'mean' or 'sum'.
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.
        num_data: Number of samples; counted from ``data`` if None.
        check_deterministic: See `curvopt.curvature.base.CurvatureOperator`.
        process_group: Process group the data is sharded over (see
            `curvopt.curvature.base.CurvatureOperator`), or None.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> data = [(torch.randn(5, 3), torch.randint(0, 3, (5,)))]
        >>> G = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
        >>> G.to_dense().shape
        torch.Size([31, 31])
    """

    def _output_product(self, output: Tensor, y: Tensor, Jv: Tensor) -> Tensor:
        """Apply the output-space curvature to ``Jv`` of shape ``(k, *output.shape)``."""
        return loss_hessian_product(self._loss_func, output, Jv)

    def _matmat_batch(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        if cols[0].shape[0] == 1:
            return self._matvec_batch(X, y, [c[0] for c in cols])
        forward = make_forward(self._model_func, self._names, X)
        primals = tuple(p.detach() for p in self._params)
        with torch.no_grad():
            output, vjp_fn = vjp(forward, *primals)
            check_output(self._loss_func, output)
            Jv = vmap(lambda *t: jvp(forward, primals, t)[1])(*cols)
            u = self._output_product(output, y, Jv)
            return list(vmap(vjp_fn)(u))

    def _matvec_batch(self, X: Tensor, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        """One column: a forward pass with dual numbers, then one ordinary backward pass."""
        with torch.enable_grad():
            with fwAD.dual_level():
                duals = {
                    name: fwAD.make_dual(p, t.contiguous())
                    for name, p, t in zip(self._names, self._params, v)
                }
                output, Jv = fwAD.unpack_dual(functional_call(self._model_func, duals, (X,)))
            # the backward pass runs outside the dual level: inside it, autograd would also
            # push tangents through the backward graph (a second-order term we do not need)
            check_output(self._loss_func, output)
            if Jv is None:  # the output does not depend on the parameters
                Jv = torch.zeros_like(output)
            with torch.no_grad():
                u = self._output_product(output.detach(), y, Jv.detach().unsqueeze(0))
            grads = torch.autograd.grad(
                output, self._params, grad_outputs=u.squeeze(0), allow_unused=True
            )
        return [
            torch.zeros_like(p).unsqueeze(0) if g is None else g.unsqueeze(0)
            for g, p in zip(grads, self._params)
        ]
