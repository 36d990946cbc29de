r"""Kronecker-factored approximate curvature (K-FAC) of the GGN / Fisher / empirical Fisher.

For a layer with weight ``W`` that maps inputs ``a`` to outputs ``s = W a`` (at every
weight-sharing position ``t``: the tokens of a sequence, the pixels of a convolution), the
curvature block of ``W`` is approximated by a Kronecker product of an input covariance ``A``
and a covariance ``B`` of would-be gradients ``g`` w.r.t. the layer output:

$$
C_W \approx A \otimes B \;\text{(acting as } V \mapsto B V A \text{ on } V \in
\mathbb{R}^{d_{out} \times d_{in}}\text{)}, \qquad
A = \frac{1}{M} \sum_{n,t} a_{nt} a_{nt}^\top, \qquad
B = c \sum_{u} \sum_{n,t} g_{nt}(u) \, g_{nt}(u)^\top,
$$

(Martens & Grosse 2015; Grosse & Martens 2016 for convolutions; Eschenhagen et al. 2023 for
weight sharing) with ``M`` the number of positions of all samples and ``c`` the weighting of
`curvopt.curvature.base` (``1 / \sum_b D_b`` for 'mean', 1 for 'sum'), so that ignored
targets (``ignore_index``) count exactly as in the other operators. ``g(u)`` is the gradient
of ``\langle u, f \rangle`` w.r.t. the layer output for a backward vector ``u`` in output space:

* ``fisher_type="type-2"``: the columns of a square root of every loss term's Hessian
  (``\sqrt{\alpha_t p_c} (e_c - p)`` for the softmax, ``\sqrt{2} e_c`` for MSE,
  ``\sqrt{\alpha \sigma(1-\sigma)} e_c`` for BCE; ``C`` backward passes): K-FAC of the GGN;
* ``fisher_type="mc"``: ``mc_samples`` gradients at labels drawn from the model (B divided by
  ``mc_samples``), seeded with ``seed`` like curvlinops' draws;
* ``fisher_type="empirical"``: the gradients at the true labels.

``kfac_approx="expand"`` treats every position as a sample (above); ``"reduce"`` first sums
``g`` and averages ``a`` over the positions of a sample, and ``M`` becomes the number of
samples. Biases get their own block ``B`` (``separate_weight_and_bias=True``, curvlinops'
default), or join the weight with a constant input 1. Supported layers: ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d`` (one group, zero padding) and transformers' ``Conv1D``
(``s = a W + b``, so its block acts as ``V \mapsto A V B``).

The factors are computed on the first product (one pass over the data with ``C`` backward
passes per batch for type-2, ``mc_samples`` for mc, one for empirical) and kept:
call `KFACOperator.compute_kronecker_factors` again after the model changed.
`KFACOperator.inverse` is exact through the factors' eigendecompositions,
``(A \otimes B + \delta I)^{-1} = (Q_A \otimes Q_B) (\Lambda_A \otimes \Lambda_B + \delta)^{-1}
(Q_A \otimes Q_B)^\top``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvopt.distributed import all_reduce_sum_, rank

from .base import Batch, CurvatureOperator
from .inverse import check_damping
from .linear_operator import SquareOperator
from .losses import output_gradients, term_coefficients
from .train_mode import preserved_buffers, unsafe_training_modules

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROX = ("expand", "reduce")


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2), without importing it."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def unsupported_reason(module: nn.Module) -> str | None:
    """Why K-FAC cannot handle ``module`` (None if it can)."""
    if isinstance(module, (nn.Linear,)) or _is_hf_conv1d(module):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros')"
        if isinstance(module.padding, str) and _string_padding(module) is None:
            return f"padding={module.padding!r} with unequal sides"
        return None
    return f"{type(module).__name__} is not a supported layer"


def _string_padding(module: nn.Module) -> tuple[int, ...] | None:
    """Integer padding for ``'valid'``/``'same'`` (None if 'same' pads the sides unequally)."""
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    out = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        out.append(total // 2)
    return tuple(out)


@dataclass
class _Block:
    """One layer's parameters in the flat layout and its Kronecker factors."""

    name: str
    module: nn.Module
    weight: int | None  # position in params
    bias: int | None
    transposed: bool  # Conv1D: weight (in, out)
    A: Tensor | None = None
    B: Tensor | None = None
    A_count: float = 0.0
    eig: dict[str, Tensor] = field(default_factory=dict)


class KFACOperator(CurvatureOperator):
    r"""K-FAC of the GGN, the (Monte-Carlo) Fisher or the empirical Fisher (module docstring).

    The keywords ``num_data``, ``batch_size_fn``, ``check_deterministic``,
    ``allow_train_mode``, ``process_group`` and ``progressbar`` are those of
    `curvopt.curvature.base.CurvatureOperator`. Batches are ``(X, y)`` as for every operator:
    tensors, tuples, mappings (tokenizer output), models returning ``.logits``.

    Data-parallel: with ``process_group=`` every rank passes its shard of the data; the sums
    behind ``A`` and ``B`` (and EK-FAC's corrections), the position counts and the batch
    weights are summed over the ranks by one all-reduce per pass before the normalization, so
    every rank holds the factors of the whole data set, the same bit for bit, and products and
    inverses need no communication. Computing the factors is a collective (the first product,
    `compute_kronecker_factors`); rank ``r`` draws its ``"mc"`` labels with ``seed + r``.

    Args:
        model_func: The network; the parameters must belong to supported layers.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``,
            reduction 'mean' or 'sum' (for ``"mc"`` without class weights, label smoothing or
            ``pos_weight``).
        params: Parameters (``requires_grad=False`` ones are left out).
        data: Re-iterable ``(X, y)`` batches.
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Sampled labels per term for ``"mc"`` (must be 1 otherwise).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        separate_weight_and_bias: Separate blocks for a layer's weight and bias.
        seed: Seed of the label sampler (``"mc"``), curvlinops' default.
        allow_unsupported: Leave parameters of unsupported layers out of the operator (listed
            in `skipped`) instead of raising.

    Raises:
        ValueError: For unknown options, parameters of unsupported layers (all named in one
            message) without ``allow_unsupported``, or (see the base class).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> K = KFACOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data,
        ...                  fisher_type="type-2")
        >>> v = torch.randn(K.shape[0])
        >>> x = K.inverse(damping=1e-3) @ v
        >>> torch.allclose(K @ x + 1e-3 * x, v, atol=1e-4)
        True
        >>> sorted(K.input_covariances), K.gradient_covariances["2"].shape
        (['0', '2'], torch.Size([2, 2]))
    """

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: Iterable[Tensor],
        data: Iterable[Batch],
        *,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = True,
        seed: int = 2147483647,
        allow_unsupported: bool = False,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        check_deterministic: bool = False,
        allow_train_mode: bool = False,
        process_group: Any = None,
        progressbar: bool = False,
    ) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(
                f"mc_samples={mc_samples} needs fisher_type='mc' (got {fisher_type!r})"
            )
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        self.NEEDS_LIKELIHOOD = fisher_type == "mc"
        self._fisher_type, self._kfac_approx = fisher_type, kfac_approx
        self._mc_samples, self._seed = mc_samples, seed
        self._separate = bool(separate_weight_and_bias)
        params = [p for p in params if isinstance(p, Tensor) and p.requires_grad]
        kept, self._skipped = self._supported_params(model_func, params, allow_unsupported)
        self._blocks: list[_Block] | None = None
        super().__init__(
            model_func,
            loss_func,
            kept,
            data,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            check_deterministic=False,
            allow_train_mode=allow_train_mode,
            process_group=process_group,
            progressbar=progressbar,
        )
        self._blocks = self._make_blocks()
        self._computed = False
        if check_deterministic:
            self._check_deterministic()

    # ------------------------------------------------------------------------- parameters
    @staticmethod
    def _supported_params(
        model: nn.Module, params: list[Tensor], allow_unsupported: bool
    ) -> tuple[list[Tensor], list[str]]:
        """Split ``params`` into those of supported layers and the names of the others."""
        if not isinstance(model, nn.Module):
            return params, []  # the base class raises the TypeError
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for p_name, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((mod_name, module, p_name))
        kept, skipped = [], []
        for p in params:
            found = owners.get(id(p), [])
            if not found:
                kept.append(p)  # the base class names the stranger
                continue
            names = ", ".join(f"{m or '<model>'}.{n}" for m, _, n in found)
            reason = None
            if len(found) > 1:
                reason = "shared by several modules (tied weights)"
            else:
                _, module, p_name = found[0]
                reason = unsupported_reason(module)
                if reason is None and p_name not in ("weight", "bias"):
                    reason = f"parameter {p_name!r} is neither weight nor bias"
            if reason is None:
                kept.append(p)
            else:
                skipped.append(f"{names} ({reason})")
        if skipped and not allow_unsupported:
            raise ValueError(
                "KFACOperator supports nn.Linear, nn.Conv1d, nn.Conv2d and transformers' "
                f"Conv1D; these parameters are in other layers: {'; '.join(skipped)}. Pass "
                "only supported parameters, or allow_unsupported=True to leave them out"
            )
        if not kept:
            raise ValueError("no parameter of a supported layer is left for KFACOperator")
        return kept, skipped

    @property
    def skipped(self) -> list[str]:
        """The parameters left out with ``allow_unsupported=True`` (names and reasons)."""
        return list(self._skipped)

    def _make_blocks(self) -> list[_Block]:
        by_id = {id(p): i for i, p in enumerate(self._params)}
        blocks = []
        for mod_name, module in self._model_func.named_modules():
            pos = {
                p_name: by_id[id(p)]
                for p_name, p in module.named_parameters(recurse=False)
                if id(p) in by_id
            }
            if pos:
                blocks.append(
                    _Block(
                        mod_name,
                        module,
                        pos.get("weight"),
                        pos.get("bias"),
                        _is_hf_conv1d(module),
                    )
                )
        return blocks

    # ---------------------------------------------------------------------------- factors
    @property
    def fisher_type(self) -> str:
        """``"type-2"``, ``"mc"`` or ``"empirical"``."""
        return self._fisher_type

    @property
    def input_covariances(self) -> dict[str, Tensor]:
        """``A`` per layer name (layers whose weight is a parameter); computed on demand."""
        self._ensure_factors()
        return {b.name: b.A for b in self._blocks if b.A is not None}

    @property
    def gradient_covariances(self) -> dict[str, Tensor]:
        """``B`` per layer name; computed on demand."""
        self._ensure_factors()
        return {b.name: b.B for b in self._blocks}

    def _ensure_factors(self) -> None:
        if not self._computed:
            self.compute_kronecker_factors()

    def compute_kronecker_factors(self) -> None:
        """(Re)compute every layer's ``A`` and ``B`` with one pass over the data."""
        blocks = self._blocks
        for b in blocks:
            b.A, b.B, b.A_count, b.eig = None, None, 0.0, {}
        hooks = [(b, self._input_hook(b), self._output_hook(b)) for b in blocks]
        weight = self._data_pass(hooks)
        zeros = functools.partial(torch.zeros, dtype=self.dtype, device=self.device)
        for b in blocks:  # a layer that never ran (here) has zero sums
            d_out = b.module.weight.shape[1 if b.transposed else 0]
            if b.B is None:
                b.B = zeros(d_out, d_out)
            if b.A is None and b.weight is not None:
                w = b.module.weight
                d_in = w.shape[0] if b.transposed else w[0].numel()
                d_in += int(b.bias is not None and not self._separate)
                b.A = zeros(d_in, d_in)
        sums = [b.B for b in blocks] + [b.A for b in blocks if b.A is not None]
        counts = [b.A_count for b in blocks if b.A is not None]
        counts, weight = self._sum_over_group(sums, counts, weight)
        scale = self._scale(weight)
        for b in blocks:
            b.B.mul_(scale)
        for b, count in zip([b for b in blocks if b.A is not None], counts):
            b.A_count = count
            if count > 0:
                b.A.div_(count)
        self._computed = True

    def _sum_over_group(
        self, sums: list[Tensor], counts: list[float], weight: float
    ) -> tuple[list[float], float]:
        """Sum the factor sums (in place), the position counts and the batch weight over ranks.

        One all-reduce of everything flattened into one buffer; without a process group the
        values are returned as they are.
        """
        if self._group is None:
            return counts, weight
        extra = torch.tensor([*counts, weight], dtype=self.dtype, device=self.device)
        flat = all_reduce_sum_(torch.cat([t.reshape(-1) for t in sums] + [extra]), self._group)
        start = 0
        for t in sums:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()
        totals = flat[start:].tolist()
        return totals[:-1], totals[-1]

    def _scale(self, weight: float) -> float:
        """``c / mc_samples`` for the gradient sums, with ``c`` from the total batch weight."""
        if self._loss_func.reduction == "mean" and weight == 0.0:
            raise ValueError(
                "data holds no loss terms (every target equals ignore_index); the 'mean' loss "
                "of the whole data set is undefined"
            )
        scale = 1.0 / weight if self._loss_func.reduction == "mean" else 1.0
        return scale / self._mc_samples

    def _data_pass(self, hooks: list) -> float:
        """One pass over the data with ``(block, pre_hook, hook)`` installed.

        Every batch runs one forward pass and the backward passes of `_backward_vectors`
        (labels drawn from a generator seeded with ``seed`` + the rank, so every pass draws the
        same). Returns this rank's total batch weight ``sum_b D_b``.
        """
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self._seed + rank(self._group))
        total_weight = 0.0
        handles = []
        for b, pre_hook, hook in hooks:
            handles.append(b.module.register_forward_pre_hook(pre_hook))
            handles.append(b.module.register_forward_hook(hook))
        unsafe = bool(unsafe_training_modules(self._model_func))
        try:
            with preserved_buffers(self._model_func, active=unsafe):
                for i, X, y in self._loop_over_data(f"{type(self).__name__} factors"):
                    weight = self._batch_weight(X, y, i)
                    if self._batch_size(X, i) == 0:
                        continue
                    total_weight += weight
                    self._batch_factors(X, y, generator)
        finally:
            for h in handles:
                h.remove()
        return total_weight

    def _batch_factors(self, X: Any, y: Tensor, generator: torch.Generator) -> None:
        from ._functional import call_model  # noqa: PLC0415

        self._recording = True
        with torch.enable_grad():
            output = call_model(self._model_func, X, self._loss_func)
            self._recording = False
            self._check_output(X, output, y)
            if not output.requires_grad:
                return
            vectors = self._backward_vectors(output.detach(), y, generator)
            for j, u in enumerate(vectors):
                torch.autograd.grad(  # the tensor hooks on the layer outputs collect g
                    output,
                    self._params,
                    grad_outputs=u,
                    retain_graph=j < len(vectors) - 1,
                    allow_unused=True,
                )

    def _backward_vectors(self, output: Tensor, y: Tensor, generator: torch.Generator):
        """Output-space vectors ``u`` whose backward passes give the ``g`` of `B`."""
        vectors = self._type2_or_sampled_vectors(output, y, generator)
        if self._fisher_type != "type-2" or not self._per_term:
            return vectors
        # one backward pass per loss term and column (EK-FAC's correction: the columns of
        # different terms of one sample must not be added up before squaring)
        axis = 1 if isinstance(self._loss_func, nn.CrossEntropyLoss) else output.ndim - 1
        grid = [n for i, n in enumerate(output.shape) if i not in (0, axis)]
        if not grid:
            return vectors
        out = []
        for index in torch.cartesian_prod(*[torch.arange(n) for n in grid]).reshape(-1, len(grid)):
            mask = torch.zeros_like(output)
            where = [slice(None)] * output.ndim
            positions = [i for i in range(output.ndim) if i not in (0, axis)]
            for dim, k in zip(positions, index.tolist()):
                where[dim] = k
            mask[tuple(where)] = 1.0
            out.extend(u * mask for u in vectors)
        return out

    _per_term: bool = False

    def _type2_or_sampled_vectors(self, output: Tensor, y: Tensor, generator: torch.Generator):
        loss = self._loss_func
        if self._fisher_type == "empirical":
            return [output_gradients(loss, output, y)]
        alpha = term_coefficients(loss, output, y)
        alpha = torch.as_tensor(alpha, dtype=output.dtype, device=output.device)
        if self._fisher_type == "mc":  # a likelihood: alpha is 1, or 0 at ignore_index (CE)
            mask = alpha if isinstance(loss, nn.CrossEntropyLoss) else 1.0
            return [
                self._sample_gradient(output, generator) * mask for _ in range(self._mc_samples)
            ]
        if isinstance(loss, nn.CrossEntropyLoss):
            p = torch.softmax(output, dim=1)
            root = (alpha * p).sqrt()
            out = []
            for c in range(output.shape[1]):
                u = -p * root.narrow(1, c, 1)
                u.narrow(1, c, 1).add_(root.narrow(1, c, 1))
                out.append(u)
            return out
        if isinstance(loss, nn.MSELoss):
            diag = (2.0 * torch.ones_like(output)).sqrt()
        else:
            s = torch.sigmoid(output)
            diag = (alpha * s * (1 - s)).sqrt()
        if output.ndim == 1:
            return [diag]
        out = []
        for c in range(output.shape[-1]):
            u = torch.zeros_like(output)
            u[..., c] = diag[..., c]
            out.append(u)
        return out

    def _sample_gradient(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """One would-be gradient at labels drawn from the model (curvlinops' draw order)."""
        loss = self._loss_func
        if isinstance(loss, nn.MSELoss):
            noise = torch.randn(
                output.shape, generator=generator, dtype=output.dtype, device=output.device
            )
            return -math.sqrt(2.0) * noise  # 2 (f - y) with y = f + N(0, 1/2)
        if isinstance(loss, nn.CrossEntropyLoss):
            z = output.movedim(1, -1)
            p = torch.softmax(z.reshape(-1, z.shape[-1]), dim=-1)
            labels = p.multinomial(num_samples=1, generator=generator).squeeze(-1)
            g = p - F.one_hot(labels, p.shape[-1]).to(p.dtype)
            return g.reshape(z.shape).movedim(-1, 1)
        s = torch.sigmoid(output)
        return s - s.bernoulli(generator=generator)

    def _input_hook(self, block: _Block):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not getattr(self, "_recording", False) or block.weight is None:
                return
            a = self._layer_inputs(block, inputs[0].detach())  # (N, T, d_in)
            if block.bias is not None and not self._separate:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            if self._kfac_approx == "expand":
                flat = a.reshape(-1, a.shape[-1])
                count = flat.shape[0]
            else:
                flat = a.mean(1)
                count = a.shape[0]
            cov = flat.T @ flat
            block.A = cov if block.A is None else block.A.add_(cov)
            block.A_count += count

        return hook

    def _output_hook(self, block: _Block):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not getattr(self, "_recording", False) or not output.requires_grad:
                return

            def grad_hook(g: Tensor) -> None:
                g = self._layer_outputs(block, g.detach())  # (N, T, d_out)
                flat = g.reshape(-1, g.shape[-1]) if self._kfac_approx == "expand" else g.sum(1)
                cov = flat.T @ flat
                block.B = cov if block.B is None else block.B.add_(cov)

            output.register_hook(grad_hook)

        return hook

    @staticmethod
    def _layer_inputs(block: _Block, x: Tensor) -> Tensor:
        """The layer input as ``(N, positions, d_in)`` (patches for convolutions)."""
        m = block.module
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            padding = _string_padding(m) if isinstance(m.padding, str) else m.padding
            if isinstance(m, nn.Conv1d):
                x = x.unsqueeze(-2)
                kernel, dil, pad, stride = (
                    (1, *m.kernel_size),
                    (1, *m.dilation),
                    (0, *padding),
                    (1, *m.stride),
                )
            else:
                kernel, dil, pad, stride = m.kernel_size, m.dilation, padding, m.stride
            patches = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)
            return patches.transpose(1, 2)  # (N, L, C_in * prod(kernel))
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def _layer_outputs(block: _Block, g: Tensor) -> Tensor:
        """The output gradient as ``(N, positions, d_out)``."""
        if isinstance(block.module, (nn.Conv1d, nn.Conv2d)):
            return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
        return g.reshape(g.shape[0], -1, g.shape[-1])

    # --------------------------------------------------------------------------- products
    def _matmat(self, cols: list[Tensor]) -> list[Tensor]:
        self._ensure_factors()
        return self._apply(cols, lambda b, V, kind: self._kron(b, V, kind))

    def _apply(self, cols: list[Tensor], fn: Callable) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(cols)
        for b in self._blocks:
            k = cols[0].shape[0]
            if b.weight is not None and b.bias is not None and not self._separate:
                W = self._weight_matrix(b, cols[b.weight])
                if b.transposed:  # rows: inputs; append the bias as one more input row
                    V = torch.cat([W, cols[b.bias].reshape(k, 1, -1)], dim=1)
                else:
                    V = torch.cat([W, cols[b.bias].reshape(k, -1, 1)], dim=2)
                R = fn(b, V, "joint")
                if b.transposed:
                    out[b.weight] = self._unweight(b, R[:, :-1, :], cols[b.weight])
                    out[b.bias] = R[:, -1, :].reshape_as(cols[b.bias]).clone()
                else:
                    out[b.weight] = self._unweight(b, R[..., :-1], cols[b.weight])
                    out[b.bias] = R[..., -1].reshape_as(cols[b.bias]).clone()
                continue
            if b.weight is not None:
                W = self._weight_matrix(b, cols[b.weight])
                out[b.weight] = self._unweight(b, fn(b, W, "weight"), cols[b.weight])
            if b.bias is not None:
                out[b.bias] = fn(b, cols[b.bias].reshape(k, -1), "bias").reshape_as(cols[b.bias])
        return out  # type: ignore[return-value]

    @staticmethod
    def _weight_matrix(b: _Block, V: Tensor) -> Tensor:
        """``(k, d_out, d_in)`` (``(k, d_in, d_out)`` for Conv1D) from parameter-shaped columns."""
        return V.reshape(V.shape[0], V.shape[1], -1)

    @staticmethod
    def _unweight(b: _Block, R: Tensor, like: Tensor) -> Tensor:
        return R.reshape(like.shape).clone()

    @staticmethod
    def _kron(b: _Block, V: Tensor, kind: str) -> Tensor:
        if kind == "bias":
            return V @ b.B
        if b.transposed:
            return b.A @ V @ b.B
        return b.B @ V @ b.A

    # ---------------------------------------------------------------------------- inverse
    def inverse(self, method: str = "exact", *, damping: float, **kwargs: Any) -> SquareOperator:
        r"""``(K + \delta I)^{-1}``: exact through the factors' eigendecompositions.

        Args:
            method: ``"exact"`` (block-wise, through ``A = Q_A \Lambda_A Q_A^T`` and
                ``B = Q_B \Lambda_B Q_B^T``), or ``"cg"``/``"neumann"`` (generic).
            damping: ``\delta > 0``.
            **kwargs: Options of the generic methods.
        """
        if method != "exact":
            return super().inverse(method, damping=damping, **kwargs)
        if kwargs:
            raise TypeError(f"unexpected arguments for the exact K-FAC inverse: {sorted(kwargs)}")
        return _KFACInverse(self, check_damping(damping))

    def _eigen(self, b: _Block) -> dict[str, Tensor]:
        if not b.eig:
            b.eig["lB"], b.eig["QB"] = torch.linalg.eigh(b.B)
            if b.A is not None:
                b.eig["lA"], b.eig["QA"] = torch.linalg.eigh(b.A)
        return b.eig

    def _solve(self, b: _Block, V: Tensor, kind: str, damping: float) -> Tensor:
        e = self._eigen(b)
        QB, lB = e["QB"], e["lB"]
        if kind == "bias":
            return ((V @ QB) / (lB + damping)) @ QB.T
        QA, lA = e["QA"], e["lA"]
        if b.transposed:  # V (in, out) -> QA^T V QB
            M = QA.T @ V @ QB
            return QA @ (M / (lA[:, None] * lB[None, :] + damping)) @ QB.T
        M = QB.T @ V @ QA
        return QB @ (M / (lB[:, None] * lA[None, :] + damping)) @ QA.T


class _KFACInverse(SquareOperator):
    """``(K + delta I)^{-1}`` of a `KFACOperator`, block by block."""

    def __init__(self, K: KFACOperator, damping: float) -> None:
        super().__init__(K.shape[0], K.dtype, K.device, [tuple(p.shape) for p in K.params])
        self._K, self._damping = K, damping

    def _matmat(self, X: Tensor) -> Tensor:
        K = self._K
        K._ensure_factors()
        cols = K._split_columns(X)
        out = K._apply(cols, lambda b, V, kind: K._solve(b, V, kind, self._damping))
        return torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1).T
