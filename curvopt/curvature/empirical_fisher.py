"""Matrix-free empirical Fisher: the uncentered second moment of per-data-point gradients."""

from __future__ import annotations

from torch import Tensor

from .losses import empirical_fisher_product
from .output_space import OutputSpaceOperator


class EmpiricalFisherOperator(OutputSpaceOperator):
    r"""The empirical Fisher ("EF"), the uncentered covariance of per-data-point gradients.

    $$
    E = c \sum_{t} g_t g_t^\top, \qquad g_t = \nabla_\theta \ell_t = J_t^\top \nabla_{f_t}
    \ell_t,
    $$

    over every data point ``t`` of every batch, with ``\ell_t`` the unreduced loss of that
    point and ``c`` the loss's own normalization of the whole data set (`curvopt.curvature.base`).
    A data point is one output position (curvlinops' grouping, `curvopt.curvature.losses`): a
    sample of a ``(N, C)`` cross-entropy, a position ``(n, s)`` of a ``(N, C, S)`` one (targets
    equal to ``ignore_index`` have ``g_t = 0``), a vector along the last axis for MSE and BCE.
    For ``(N, C)`` outputs this is curvlinops' ``EFLinearOperator``.

    A mini-batch product has the form ``J^T M J V`` with ``M = c \operatorname{blockdiag}
    (\nabla_{f_t} \ell_t \nabla_{f_t} \ell_t^\top)``: the cost of a GGN product, and no
    per-sample gradients are stored (`curvopt.curvature.output_space`).

    The keywords ``num_data``, ``batch_size_fn``, ``check_deterministic``,
    ``allow_train_mode`` and ``process_group`` are those of
    `curvopt.curvature.base.CurvatureOperator`.

    Args:
        model_func: The network ``f_theta``.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction 'mean' or 'sum' (class weights, label smoothing, ``pos_weight`` included).
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> data = [(torch.randn(6, 3), torch.randint(0, 3, (6,)))]
        >>> E = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), list(model.parameters()),
        ...                             data)
        >>> bool(torch.linalg.eigvalsh(E.to_dense()).min() > -1e-6)
        True
    """

    def _output_product(self, output: Tensor, y: Tensor, Jv: Tensor) -> Tensor:
        return empirical_fisher_product(self._loss_func, output, y, Jv)
