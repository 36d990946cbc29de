"""Matrix-free generalized Gauss-Newton matrix of the empirical risk."""

from __future__ import annotations

from torch import Tensor

from .losses import loss_hessian_product
from .output_space import OutputSpaceOperator


class GGNOperator(OutputSpaceOperator):
    r"""The generalized Gauss-Newton matrix of the empirical risk, without forming Jacobians.

    $$
    G = c \sum_{b} J_b^\top \, \nabla^2_{f} L_b \, J_b,
    \qquad J_b = \partial f_\theta(X_b) / \partial \theta,
    $$

    with ``\nabla^2_f L_b`` the Hessian of the unreduced mini-batch loss in output space and
    ``c`` the weighting of `curvopt.curvature.base`: for ``nn.MSELoss`` (``2 I``),
    ``nn.CrossEntropyLoss`` on logits ``(N, C)`` or ``(N, C, d_1, ...)`` (``\alpha_t
    (\mathrm{diag}(p_t) - p_t p_t^\top)`` per position, through
    `curvopt.kernels.softmax_curvature`; ``ignore_index``, class ``weight`` and
    ``label_smoothing`` exact) and ``nn.BCEWithLogitsLoss`` (``\alpha_t \sigma(1-\sigma)``;
    ``weight`` and ``pos_weight`` exact), reductions 'mean' and 'sum'
    (`curvopt.curvature.losses`).

    A mini-batch product is one forward pass carrying the tangent (``J v``, forward-mode AD),
    the loss Hessian applied in output space, and one backward pass (``J^T u``): about the
    cost of a gradient plus a forward-mode pass. Several columns share one primal forward pass
    (``torch.func.jvp`` and ``vjp`` under ``vmap``). Models without forward-mode AD fall back
    to reverse passes (`curvopt.curvature.output_space`).

    The keywords ``num_data``, ``batch_size_fn``, ``check_deterministic``,
    ``allow_train_mode``, ``process_group`` and ``progressbar`` are those of
    `curvopt.curvature.base.CurvatureOperator`.

    Args:
        model_func: The network ``f_theta``.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction 'mean' or 'sum'.
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> data = [(torch.randn(5, 3), torch.randint(0, 3, (5,)))]
        >>> G = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
        >>> G.to_dense().shape
        torch.Size([31, 31])
    """

    def _output_product(self, output: Tensor, y: Tensor, Jv: Tensor) -> Tensor:
        """Apply the output-space curvature to ``Jv`` of shape ``(k, *output.shape)``."""
        return loss_hessian_product(self._loss_func, output, y, Jv)
