"""Matrix-free empirical Fisher: the uncentered second moment of per-sample gradients."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from .base import CurvatureOperator
from .losses import per_sample_loss, reduction_scale


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher ("EF"), the uncentered covariance of per-sample gradients.

    $$
    E = c \sum_{n=1}^{N} g_n g_n^\top, \qquad g_n = \nabla_\theta \ell(f_\theta(x_n), y_n),
    $$

    with ``\ell`` the unreduced per-sample loss and ``c`` from the reduction (curvlinops'
    ``EFLinearOperator`` convention). A mini-batch product computes the per-sample gradients
    with ``torch.func.vmap`` over ``torch.func.grad`` (memory ``N_b x d`` per batch) and then
    ``c \, G^\top (G V)``.

    Args:
        model_func: The network ``f_theta``; it must run on single samples under ``vmap`` (no
            batch norm in training mode).
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss`` with reduction 'mean' or 'sum'.
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.
        num_data: Number of samples; counted from ``data`` if None.
        check_deterministic: See `curvopt.curvature.base.CurvatureOperator`.
        process_group: Process group the data is sharded over (see
            `curvopt.curvature.base.CurvatureOperator`), or None.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> data = [(torch.randn(6, 3), torch.randint(0, 3, (6,)))]
        >>> E = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), list(model.parameters()),
        ...                             data)
        >>> bool(torch.linalg.eigvalsh(E.to_dense()).min() > -1e-6)
        True
    """

    def per_sample_gradients(self, X: Tensor, y: Tensor) -> list[Tensor]:
        """Gradients of the unreduced per-sample losses, tensors of shape ``(N_b, *p.shape)``."""
        names = tuple(self._names)

        def sample_loss(params: tuple[Tensor, ...], x: Tensor, t: Tensor) -> Tensor:
            out = functional_call(self._model_func, dict(zip(names, params)), (x.unsqueeze(0),))
            return per_sample_loss(self._loss_func, out.squeeze(0), t)

        primals = tuple(p.detach() for p in self._params)
        with torch.no_grad():
            return list(vmap(grad(sample_loss), in_dims=(None, 0, 0))(primals, X, y))

    def _matmat_batch(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        G = [g.reshape(g.shape[0], -1) for g in self.per_sample_gradients(X, y)]
        V = [c.reshape(c.shape[0], -1) for c in cols]
        GV = sum(g @ v.T for g, v in zip(G, V))  # (N_b, k)
        # for MSE the targets have the outputs' shape, so they give the 'mean' constant
        scale = reduction_scale(self._loss_func, y)
        return [(scale * (GV.T @ g)).reshape(c.shape) for g, c in zip(G, cols)]
