"""Matrix-free Fisher information of the model's predictive distribution (exact or Monte-Carlo)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvopt.distributed import rank

from .base import Batch
from .ggn import GGNOperator
from .losses import (
    group_last,
    reduction_scale,
    sample_output_gradients,
    term_coefficients,
    ungroup,
)


class FisherOperator(GGNOperator):
    r"""The Fisher of the model's likelihood, exact or estimated with sampled labels.

    The losses are negative log-likelihoods, ``\ell(f, y) = -\log p(y \mid f)`` (a Gaussian
    with variance 1/2 for ``nn.MSELoss``, a categorical for ``nn.CrossEntropyLoss``, Bernoulli
    for ``nn.BCEWithLogitsLoss``; class weights, label smoothing and ``pos_weight`` are refused,
    they make the loss no likelihood: use `GGNOperator`). Positions whose target is
    ``ignore_index`` are left out. The Fisher

    $$
    F = c \sum_{n=1}^{N} J_n^\top \,
        \mathbb{E}_{\tilde y \sim p(\cdot \mid f_n)}\!\left[g_n(\tilde y)\, g_n(\tilde y)^\top
        \right] J_n,
    \qquad g_n(\tilde y) = \nabla_f \ell(f_n, \tilde y),
    $$

    equals the GGN for these losses, which is what ``mc_samples=None`` (exact) computes. With
    ``mc_samples=M`` the expectation is replaced by the mean over ``M`` labels drawn from the
    model for every sample (curvlinops' ``FisherMCLinearOperator``). The labels are drawn again
    for each product from a generator seeded with ``seed``, so every product with the same
    operator uses the same draws (the operator is a fixed matrix); a different ``seed`` gives
    a different estimate.

    With a process group, rank ``r`` of the group seeds its sampler with ``seed + r``: the
    ranks draw independent labels, the operator is still a fixed matrix (the same on every
    rank and in every product), and it equals the weighted mean of the ranks' single-process
    Monte-Carlo Fishers at seeds ``seed + r`` (weights ``D_r``, the ranks' loss-term counts,
    for 'mean'; the plain sum for 'sum'). It estimates the same exact Fisher as the
    single-process operator on the concatenated data, with other draws.

    The keywords ``num_data``, ``batch_size_fn``, ``check_deterministic``,
    ``allow_train_mode``, ``process_group`` and ``progressbar`` are those of
    `curvopt.curvature.base.CurvatureOperator`.

    Args:
        model_func: The network ``f_theta``.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction 'mean' or 'sum'.
        params: Parameters to differentiate by (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches (the labels are used only for the weighting and
            ``ignore_index``).
        mc_samples: None for the exact Fisher, else the number of sampled labels per term.
        seed: Seed of the label sampler (Monte-Carlo only; rank ``r`` of a process group uses
            ``seed + r``).

    Raises:
        ValueError: If ``mc_samples`` is not None or a positive integer, or the loss is not a
            negative log-likelihood.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> data = [(torch.randn(8, 3), torch.randint(0, 3, (8,)))]
        >>> F = FisherOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data,
        ...                    mc_samples=4, seed=1)
        >>> v = torch.randn(F.shape[1])
        >>> torch.equal(F @ v, F @ v)
        True
    """

    NEEDS_LIKELIHOOD = True

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: Iterable[Tensor],
        data: Iterable[Batch],
        *,
        mc_samples: int | None = None,
        seed: int = 2147483647,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        check_deterministic: bool = False,
        allow_train_mode: bool = False,
        process_group: Any = None,
        progressbar: bool = False,
    ) -> None:
        if mc_samples is not None and (
            isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1
        ):
            raise ValueError(
                f"mc_samples must be None (exact) or an integer >= 1, got {mc_samples}"
            )
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        self._mc_samples = mc_samples
        self._seed = seed
        self._generator: torch.Generator | None = None
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
    def mc_samples(self) -> int | None:
        """Number of sampled labels per data point, None for the exact Fisher."""
        return self._mc_samples

    def _before_matmat(self) -> None:
        if self._mc_samples is None:
            return
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self._seed + rank(self._group))

    def _output_product(self, output: Tensor, y: Tensor, Jv: Tensor) -> Tensor:
        if self._mc_samples is None:
            return super()._output_product(output, y, Jv)
        samples = sample_output_gradients(
            self._loss_func, output, self._mc_samples, self._generator
        )  # (M, *output.shape)
        # alpha_t: 0 at ignored targets, 1 else (the MSE samples carry their factor 2 already)
        alpha = (
            1.0
            if isinstance(self._loss_func, nn.MSELoss)
            else term_coefficients(self._loss_func, output, y)
        )
        g = group_last(self._loss_func, samples, lead=1)  # (M, ..., entries of a data point)
        t = group_last(self._loss_func, Jv, lead=1)  # (k, ..., entries)
        # w[k, m, ...] = <g_m, (J v_k)> per data point, then u_k = c / M sum_m g_m w[k, m]
        w = (g.unsqueeze(0) * t.unsqueeze(1)).sum(-1, keepdim=True)
        u = ungroup(self._loss_func, (w * g.unsqueeze(0)).sum(1), output, lead=1)
        return u * (alpha * reduction_scale(self._loss_func, y) / self._mc_samples)
