r"""Eigenvalue-corrected K-FAC (EK-FAC; George, Laurent, Bouthillier, Ballas, Vincent 2018).

K-FAC's block ``A \otimes B`` has the eigenbasis ``Q_A \otimes Q_B`` (``A = Q_A \Lambda_A
Q_A^\top``, ``B = Q_B \Lambda_B Q_B^\top``) and the eigenvalues ``\Lambda_A \otimes
\Lambda_B``. EK-FAC keeps the basis and replaces the eigenvalues by the curvature's own
second moments in that basis, the best diagonal there:

$$
E_{ij} = c \sum_{u} \sum_{n} \big[ Q_B^\top G_n(u) \, Q_A \big]_{ij}^2, \qquad
G_n(u) = \sum_t g_{nt}(u) \, a_{nt}^\top,
$$

with ``G_n(u)`` the gradient of sample ``n`` (summed over its weight-sharing positions ``t``)
for the backward vector ``u`` (type-2 / mc / empirical, as in `curvopt.curvature.kfac`) and
``c`` the weighting of the other operators (divided by ``mc_samples``). For
``"type-2"`` and outputs with several loss terms per sample (sequences) every term gets its own
backward passes here (``T C`` per batch instead of K-FAC's ``C``), so that ``E`` is exactly
the diagonal of the GGN block in the eigenbasis; ``"mc"`` gets there in expectation (the
sampled gradients of different terms are independent with mean 0), and ``"empirical"`` uses
the per-sample gradients (the empirical Fisher of samples, not of single terms).

Where a factor is singular (K-FAC-reduce of a convolution with fewer samples than patch
entries, for instance) its eigenbasis is not unique inside the null space, and neither is
EK-FAC there: implementations (and devices) may then differ. A block then acts as
``V \mapsto Q_B [(Q_B^\top V Q_A) \odot E] Q_A^\top`` and its damped inverse divides by
``E + \delta`` instead, exactly. Biases: ``E_i = c \sum [Q_B^\top \sum_t g_{nt}]_i^2``.
Computing ``E`` costs a second pass over the data after the K-FAC factors (the same sampled
labels for ``"mc"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .kfac import KFACOperator, _Block


def _squared_gradient_sum(gt: Tensor, at: Tensor) -> Tensor:
    r"""``sum_n (G_n)^2`` (entrywise) of the rotated per-sample gradients ``G_n = gt_n^T at_n``.

    With ``T`` weight-sharing positions, ``G_n = \sum_t \tilde g_{nt} \tilde a_{nt}^\top``
    and

    $$
    \sum_n G_n^{\odot 2} = \sum_{n,s,t} (\tilde g_{ns} \odot \tilde g_{nt})
    (\tilde a_{ns} \odot \tilde a_{nt})^\top,
    $$

    one matrix product of the ``N T^2`` Gramian rows, which never forms the ``N x d_out x
    d_in`` per-sample gradients; used when ``T^2 (d_out + d_in) < d_out d_in`` (curvlinops'
    rule, by memory), else the per-sample gradients are formed and squared.

    Args:
        gt: Rotated output gradients ``(N, T, d_out)``.
        at: Rotated layer inputs ``(N, T, d_in)``.
    """
    _, T, d_out = gt.shape
    d_in = at.shape[2]
    if T * T * (d_out + d_in) < d_out * d_in:
        gg = (gt.unsqueeze(2) * gt.unsqueeze(1)).reshape(-1, d_out)
        aa = (at.unsqueeze(2) * at.unsqueeze(1)).reshape(-1, d_in)
        return gg.T @ aa
    G = torch.einsum("nto,nti->noi", gt, at)
    return (G * G).sum(0)


class EKFACOperator(KFACOperator):
    r"""EK-FAC of the GGN, the (Monte-Carlo) Fisher or the empirical Fisher (module docstring).

    Takes the arguments of `curvopt.curvature.kfac.KFACOperator`; `corrected_eigenvalues`
    exposes ``E`` per layer, ``input_covariances``/``gradient_covariances`` the K-FAC
    factors whose eigenvectors give the basis. ``inverse(damping=)`` is exact.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> E = EKFACOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data,
        ...                   fisher_type="type-2")
        >>> v = torch.randn(E.shape[0])
        >>> x = E.inverse(damping=1e-2) @ v
        >>> torch.allclose(E @ x + 1e-2 * x, v, atol=1e-4)
        True
        >>> layer = E.corrected_eigenvalues["0"]  # the eigenvalues of module "0", per parameter
        >>> layer["weight"].shape
        torch.Size([4, 3])
    """

    def compute_kronecker_factors(self) -> None:
        """K-FAC's factors, their eigendecompositions, then the corrected eigenvalues."""
        super().compute_kronecker_factors()
        self.compute_eigenvalue_correction()

    @property
    def corrected_eigenvalues(self) -> dict[str, dict[str, Tensor]]:
        """``E`` per layer: ``{"weight": ..., "bias": ...}`` or ``{"joint": ...}``.

        Weights in the parameter's 2-D layout (``(d_out, d_in)``; ``(d_in, d_out)`` for
        Conv1D), biases ``(d_out,)``; the joint block has one more input column (row for
        Conv1D).
        """
        self._ensure_factors()
        out = {}
        for b in self._blocks:
            out[b.name] = {k: v for k, v in b.eig.items() if k in ("weight", "bias", "joint")}
        return out

    def compute_eigenvalue_correction(self) -> None:
        """Recompute ``E`` for every layer with one more pass over the data."""
        blocks = self._blocks
        for b in blocks:
            self._eigen(b)
            for key in ("weight", "bias", "joint"):
                b.eig.pop(key, None)
        cache: dict[int, Tensor] = {}
        hooks = [(b, self._cache_hook(b, cache), self._correction_hook(b, cache)) for b in blocks]
        self._per_term = True
        try:
            weight = self._data_pass(hooks)
        finally:
            self._per_term = False
        sums = []
        for b in self._blocks:
            for key, shape in self._correction_shapes(b).items():
                if key not in b.eig:  # no backward pass reached the layer (on this rank)
                    b.eig[key] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                sums.append(b.eig[key])
        _, weight = self._sum_over_group(sums, [], weight)
        scale = self._scale(weight)
        for t in sums:
            t.mul_(scale)

    def _correction_shapes(self, b: _Block) -> dict[str, tuple[int, ...]]:
        n_out = b.eig["QB"].shape[0]
        n_in = b.eig["QA"].shape[0] if "QA" in b.eig else 0
        shape = (n_in, n_out) if b.transposed else (n_out, n_in)
        if b.weight is not None and b.bias is not None and not self._separate:
            return {"joint": shape}
        out = {"weight": shape} if b.weight is not None else {}
        if b.bias is not None:
            out["bias"] = (n_out,)
        return out

    def _cache_hook(self, block: _Block, cache: dict):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if getattr(self, "_recording", False) and block.weight is not None:
                cache[id(block)] = self._layer_inputs(block, inputs[0].detach())

        return hook

    def _correction_hook(self, block: _Block, cache: dict):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not getattr(self, "_recording", False) or not output.requires_grad:
                return

            def grad_hook(g: Tensor) -> None:
                self._accumulate(block, self._layer_outputs(block, g.detach()), cache)

            output.register_hook(grad_hook)

        return hook

    def _accumulate(self, b: _Block, g: Tensor, cache: dict) -> None:
        """Add ``sum_n [Q_B^T G_n Q_A]^2`` of one backward pass to ``b.eig``."""
        e = b.eig
        gt = g @ e["QB"]  # (N, T, d_out) rotated
        joint = b.weight is not None and b.bias is not None and not self._separate
        if b.weight is not None:
            a = cache[id(b)]
            if joint:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            at = a @ e["QA"]
            sq = _squared_gradient_sum(gt, at)  # (d_out, d_in)
            if b.transposed:
                sq = sq.T
            key = "joint" if joint else "weight"
            e[key] = sq if key not in e else e[key].add_(sq)
        if b.bias is not None and not joint:
            gb = gt.sum(1)
            sq = (gb * gb).sum(0)
            e["bias"] = sq if "bias" not in e else e["bias"].add_(sq)

    # ------------------------------------------------------------------------ products
    def _kron(self, b: _Block, V: Tensor, kind: str) -> Tensor:
        return self._rotate(b, V, kind, lambda M, E: M * E)

    def _solve(self, b: _Block, V: Tensor, kind: str, damping: float) -> Tensor:
        return self._rotate(b, V, kind, lambda M, E: M / (E + damping))

    def _rotate(self, b: _Block, V: Tensor, kind: str, scale: Any) -> Tensor:
        """``Q (scale(Q^T V Q, E)) Q^T`` in the block's eigenbasis."""
        e = b.eig
        QB = e["QB"]
        if kind == "bias":
            return scale(V @ QB, e["bias"]) @ QB.T
        QA, E = e["QA"], e["joint" if kind == "joint" else "weight"]
        if b.transposed:
            return QA @ scale(QA.T @ V @ QB, E) @ QB.T
        return QB @ scale(QB.T @ V @ QA, E) @ QA.T
