"""The base class of all curvature operators: data loop, weighting, input formats, exports.

A curvature operator represents a ``d x d`` matrix over the trainable parameters of a model,
for a data set given as an iterable of ``(X, y)`` batches, and multiplies it onto vectors
without ever forming it. Subclasses implement one method, `_matmat_batch`, the product of the
*mini-batch* curvature (of the mini-batch loss, with the loss function's own reduction) with a
matrix of columns. The base class adds the batches up so that the result is the curvature of
the loss of the whole data set evaluated as ONE batch:

$$
\\mathcal{L}(\\theta) = c \\sum_{b} \\sum_{t \\in b} \\ell_t(f_\\theta(X_b)_t, y_t),
\\qquad c = 1 / \\textstyle\\sum_b D_b \\text{ ('mean') or } 1 \\text{ ('sum')},
$$

with ``t`` the loss terms of a batch and ``D_b`` what the mini-batch loss divides by for
'mean' (`curvopt.curvature.losses.loss_terms`: the number of valid targets of a cross-entropy
with ``ignore_index``, the number of output entries of MSE/BCE, the batch size for other
losses). Batch ``b`` thus has the weight ``D_b`` and the products are divided by the total
weight ``sum_b D_b`` ('mean'); with 'sum' every weight is 1. A batch with weight 0 (no samples,
or only ignored targets) is skipped. curvlinops weights by samples, ``N_b / N``; both agree
whenever ``D_b`` is proportional to ``N_b``.

Data-parallel operators: with ``process_group=`` every rank passes its own shard of the data
(shards may differ in size; a rank may hold no batch at all). Each rank sums its weighted
mini-batch products, and ONE all-reduce per product sums them and the batch weights ``D_b`` over
the ranks before the division by the total weight, so every rank gets the product with the
curvature of the whole data set, bit for bit the same on every rank (`num_data` is summed over
the ranks at construction). Products are collectives: all ranks must multiply together, with the
same vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from curvopt.distributed import (
    all_reduce_max_,
    all_reduce_sum_,
    check_process_group,
    is_dtensor,
)
from curvopt.utils.params import check_vector, num_elements, trainable

from .batches import (
    BatchError,
    BatchSizeFn,
    check_batch_axes,
    check_input,
    default_batch_size,
    describe,
    move_to,
    split_batch,
)
from .losses import KNOWN_LOSSES, check_loss, check_targets, loss_terms
from .train_mode import check_train_mode, preserved_buffers, unsafe_training_modules

Batch = tuple[Any, Tensor]


class CurvatureOperator:
    """Matrix-free curvature matrix of an empirical risk over a model's trainable parameters.

    Args:
        model_func: The network ``f_theta`` (an ``nn.Module``) mapping a batch ``X`` to outputs:
            a tensor, or an object with a ``.logits`` tensor (transformers' models; see
            `curvopt.curvature.batches` for the layout).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` (any
            loss module with a ``'mean'``/``'sum'`` reduction for the Hessian); its
            ``reduction`` sets the scaling.
        params: Parameters of ``model_func`` to differentiate by; those with
            ``requires_grad=False`` are left out. Their order defines the flat layout.
        data: Re-iterable source of ``(X, y)`` batches, e.g. a list or a ``DataLoader``. ``X``
            is a tensor, a tuple of tensors (``model(*X)``) or a mapping of tensors
            (``model(**X)``, e.g. a tokenizer's output); ``y`` is a tensor. A batch may also
            be a transformers dict with ``labels`` aligned with ``input_ids`` (shifted here:
            ``y[:, t] = labels[:, t + 1]``, see :func:`~curvopt.curvature.batches.split_batch`).
        num_data: Total number of samples ``N`` (the `num_data` property); counted with one
            pass over ``data`` if None. The weighting does not use it (see the module
            docstring).
        batch_size_fn: ``X -> number of samples``; by default the length of the first axis of
            ``X`` (of its first tensor for tuples and mappings).
        check_deterministic: Multiply one random vector twice and raise if the results differ
            (catches shuffling loaders, random augmentation, ...). Off by default; costs two
            products.
        allow_train_mode: Accept a model with dropout or running-statistics layers in
            training mode (refused by default, see `curvopt.curvature.train_mode`); every
            buffer is then restored after each product.
        process_group: A ``torch.distributed`` process group over which the data is sharded
            (see the module docstring), or None for one process. Every rank of the group must
            build the operator with the same model and parameters, and call every product,
            `to_dense` and `to_scipy`'s products together with identical inputs. With a
            process group ``num_data`` is this rank's count (``0`` allowed) and the property
            is the sum over ranks.
        progressbar: Show the progress of every pass over the data (products, counting, factor
            computations) on stderr: with ``tqdm`` when it is installed, else a one-line
            counter.

    Attributes:
        SELF_ADJOINT: Whether the matrix is symmetric (all curvature matrices here are).
        SUPPORTED_LOSSES: Loss module types the operator accepts.

    Raises:
        TypeError: If ``model_func``/``loss_func`` have the wrong type, or ``data`` is a one-shot
            iterator.
        ValueError: If there are no trainable parameters, a parameter is not one of the model's,
            the loss reduction is unsupported, ``data`` is empty, a batch has no batch axis,
            or the model has dropout/batch norm in training mode (without
            ``allow_train_mode``). With a process group: if ``torch.distributed`` is not
            initialized, the parameters are FSDP2-sharded DTensors, or the ranks' parameter
            counts differ.
    """

    SELF_ADJOINT: bool = True
    _stateful_forward: bool = False
    SUPPORTED_LOSSES: tuple[type[nn.Module], ...] = (
        nn.MSELoss,
        nn.CrossEntropyLoss,
        nn.BCEWithLogitsLoss,
    )
    #: Whether the operator needs a negative log-likelihood (the Fisher).
    NEEDS_LIKELIHOOD: bool = False

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: Iterable[Tensor],
        data: Iterable[Batch],
        *,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        check_deterministic: bool = False,
        allow_train_mode: bool = False,
        process_group: Any = None,
        progressbar: bool = False,
    ) -> None:
        if not isinstance(progressbar, bool):
            raise TypeError(f"progressbar must be a bool, got {progressbar!r}")
        self._progressbar = progressbar
        if not isinstance(model_func, nn.Module):
            raise TypeError(f"model_func must be an nn.Module, got {type(model_func).__name__}")
        check_loss(
            loss_func,
            self.SUPPORTED_LOSSES,
            type(self).__name__,
            likelihood=self.NEEDS_LIKELIHOOD,
        )
        self._group = check_process_group(process_group)
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(f"batch_size_fn must be callable, got {type(batch_size_fn).__name__}")
        if not isinstance(allow_train_mode, bool):
            raise TypeError(f"allow_train_mode must be a bool, got {allow_train_mode!r}")
        self._allow_train_mode = allow_train_mode
        if not allow_train_mode:
            check_train_mode(model_func, type(self).__name__)
        self._batch_size_fn = batch_size_fn
        self._model_func = model_func
        self._loss_func = loss_func
        self._params = trainable(params)
        if not self._params:
            raise ValueError("params holds no tensor with requires_grad=True; nothing to do")
        if any(is_dtensor(p) for p in self._params):
            raise ValueError(
                "params holds FSDP2-sharded DTensors; curvature operators need the whole "
                "parameters on every rank (replicated, e.g. under DDP) and shard the data instead"
            )
        self._names = self._parameter_names(model_func, self._params)
        self._named_params = dict(zip(self._names, self._params))
        self._dim = num_elements(self._params)
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of (X, y) batches or a DataLoader), not a "
                "one-shot iterator or generator; wrap it in list(...)"
            )
        self._data = data
        if num_data is None:
            num_data = self._count_samples()
        self._num_data = self._total_num_data(num_data)
        if check_deterministic:
            self._check_deterministic()

    # ----------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int]:
        """``(d, d)`` with ``d`` the number of trainable parameter entries."""
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters (and of the products)."""
        return self._params[0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the parameters (and of the products)."""
        return self._params[0].device

    @property
    def num_data(self) -> int:
        """Total number of samples ``N`` in the data set."""
        return self._num_data

    @property
    def process_group(self) -> Any:
        """The process group the data is sharded over (None: one process)."""
        return self._group

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters, in the order of the flat layout."""
        return list(self._params)

    # ------------------------------------------------------------------------------- products
    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Multiply the curvature matrix onto ``v``.

        Args:
            v: A flat vector ``(d,)``, a matrix of columns ``(d, k)``, or a list of tensors shaped
                like the parameters (optionally each with a trailing column axis ``k``).

        Returns:
            The product in the format of ``v``.

        Raises:
            TypeError: If ``v`` is neither a tensor nor a list of tensors, or has the wrong dtype.
            ValueError: If shapes or the device do not fit.
        """
        if isinstance(v, Tensor):
            check_vector(
                v, self._dim, name="v", dtype=self.dtype, device=self.device, allow_matrix=True
            )
            cols = v.unsqueeze(1) if v.ndim == 1 else v
            if cols.shape[1] == 0:
                return torch.zeros_like(v)
            out = self._matmat(self._split_columns(cols))
            flat = torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1).T
            return flat.squeeze(1) if v.ndim == 1 else flat
        if isinstance(v, (list, tuple)):
            is_vec, k = self._check_list(v)
            if k == 0:
                return [torch.zeros_like(t) for t in v]
            cols = [t.unsqueeze(0) if is_vec else t.movedim(-1, 0) for t in v]
            out = self._matmat(cols)
            return [o.squeeze(0) if is_vec else o.movedim(0, -1) for o in out]
        raise TypeError(
            f"v must be a tensor of shape ({self._dim},) or ({self._dim}, k) or a list of tensors "
            f"shaped like the parameters, got {type(v).__name__}"
        )

    def __rmatmul__(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """``x @ self``: rows times the matrix, ``(self^T x^T)^T``.

        Args:
            x: A flat vector ``(d,)``, a matrix of rows ``(k, d)``, or a list of tensors shaped
                like the parameters (optionally each with a trailing axis ``k``, as in
                `__matmul__`).

        Returns:
            The product in the format of ``x``.
        """
        op = self.adjoint()
        if isinstance(x, Tensor) and x.ndim == 2:
            return (op @ x.T).T
        return op @ x

    def adjoint(self) -> CurvatureOperator:
        """The adjoint (transpose) operator.

        Every curvature matrix here is symmetric, so this is the operator itself.

        Example:
            >>> from curvopt.curvature import GGNOperator
            >>> model = nn.Linear(3, 2)
            >>> G = GGNOperator(model, nn.MSELoss(), list(model.parameters()),
            ...                 [(torch.randn(4, 3), torch.randn(4, 2))])
            >>> v = torch.randn(G.shape[0])
            >>> G.T is G and G.H is G and torch.allclose(v @ G, G @ v)
            True
        """
        if not self.SELF_ADJOINT:  # pragma: no cover - every operator here is symmetric
            raise NotImplementedError(f"{type(self).__name__} has no adjoint")
        return self

    @property
    def T(self) -> CurvatureOperator:  # noqa: N802 - numpy/scipy's name
        """The transpose (`adjoint`; real matrices)."""
        return self.adjoint()

    @property
    def H(self) -> CurvatureOperator:  # noqa: N802 - numpy/scipy's name
        """The conjugate transpose (`adjoint`)."""
        return self.adjoint()

    def matvec(self, v: Tensor) -> Tensor:
        """``self @ v`` for a flat vector; see `__matmul__`."""
        return self @ v

    def _matmat(self, cols: list[Tensor]) -> list[Tensor]:
        """Sum the weighted mini-batch products over the data and normalize.

        Args:
            cols: Columns in list format, tensors of shape ``(k, *p.shape)``.

        Returns:
            The product in the same format.
        """
        self._before_matmat()
        unsafe = bool(unsafe_training_modules(self._model_func))
        if unsafe and not self._allow_train_mode:
            # the model was switched to train() after construction: refuse as the constructor does
            check_train_mode(self._model_func, type(self).__name__)
        self._stateful_forward = unsafe  # torch.func cannot run it: subclasses avoid vmap
        with preserved_buffers(self._model_func, active=unsafe):
            out, total_weight = self._accumulate(cols)
        out, total_weight = self._sum_over_ranks(out, total_weight, cols)
        if out is None:
            if self._loss_func.reduction == "mean":
                raise ValueError(
                    "data holds no loss terms (every batch is empty or has only targets equal to "
                    "ignore_index); the 'mean' loss of the whole data set is undefined"
                )
            return [torch.zeros_like(c) for c in cols]
        if self._loss_func.reduction == "mean":
            for acc in out:
                acc.div_(total_weight)
        return out

    def _accumulate(self, cols: list[Tensor]) -> tuple[list[Tensor] | None, float]:
        """``sum_b w_b P_b`` and ``sum_b w_b`` over the batches.

        ``P_b`` is the mini-batch product and ``w_b`` the weight of batch ``b``
        (`_batch_weight`); batches of weight 0 are skipped. Returns ``(None, 0.0)`` when every
        batch was skipped.
        """
        out: list[Tensor] | None = None
        total_weight = 0.0
        for i, X, y in self._loop_over_data():
            weight = self._batch_weight(X, y, i)
            if weight == 0.0:
                continue
            total_weight += weight
            try:
                parts = self._matmat_batch(X, y, cols)
            except BatchError as err:
                raise BatchError(f"batch {i}: {err}") from err.__cause__
            if out is None:  # the parts are fresh tensors: scale them in place
                out = [part.mul_(weight) if weight != 1.0 else part for part in parts]
            else:
                for acc, part in zip(out, parts):
                    acc.add_(part, alpha=weight)
        return out, total_weight

    def _sum_over_ranks(
        self, out: list[Tensor] | None, total_weight: float, cols: list[Tensor]
    ) -> tuple[list[Tensor] | None, float]:
        """Data-parallel hook: sum the weighted products and weights over the process group.

        ONE all-reduce carries the ``d x k`` weighted sum and the sum of the batch weights, so
        the normalization that follows uses the weight of all ranks' data. A rank without
        batches contributes zeros. Without a process group: returned as they are.
        """
        if self._group is None:
            return out, total_weight
        parts = out if out is not None else [torch.zeros_like(c) for c in cols]
        weight = torch.tensor([total_weight], dtype=parts[0].dtype, device=parts[0].device)
        flat = all_reduce_sum_(torch.cat([p.reshape(-1) for p in parts] + [weight]), self._group)
        total = float(flat[-1])
        if total == 0.0:  # no rank held a loss term
            return None, 0.0
        chunks = flat[:-1].split([p.numel() for p in parts])
        return [c.view_as(p) for c, p in zip(chunks, parts)], total

    def _total_num_data(self, num_data: Any) -> int:
        """Check this rank's sample count; with a process group, sum it over the ranks.

        The same all-reduce checks that every rank has the same number of parameters (the
        products would be summed entry by entry).
        """
        local_min = 0 if self._group is not None else 1
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < local_min:
            raise ValueError(f"data must hold at least one sample, got num_data={num_data}")
        if self._group is None:
            return num_data
        stats = torch.tensor(
            [num_data, self._dim, -self._dim], dtype=torch.int64, device=self.device
        )
        total = all_reduce_sum_(stats[:1].clone(), self._group)
        dims = all_reduce_max_(stats[1:].clone(), self._group)
        if int(dims[0]) != -int(dims[1]):
            raise ValueError(
                f"the ranks' operators have different numbers of parameters (this rank "
                f"{self._dim}, between {-int(dims[1])} and {int(dims[0])} over the group); "
                "every rank must pass the same model and params"
            )
        if int(total) <= 0:
            raise ValueError("data must hold at least one sample on some rank, got none at all")
        return int(total)

    def _matmat_batch(self, X: Tensor, y: Tensor, cols: list[Tensor]) -> list[Tensor]:
        """Multiply the mini-batch curvature onto columns ``(k, *p.shape)``; for subclasses.

        Must return new tensors (not views of ``cols``): the base class accumulates in place.
        """
        raise NotImplementedError

    def _before_matmat(self) -> None:
        """Hook run at the start of every product (the MC Fisher reseeds here)."""

    def inverse(self, method: str = "cg", *, damping: float, **kwargs: Any) -> Any:
        """``(A + damping I)^{-1}`` as an operator (`curvopt.curvature.inverse.inverse`).

        Args:
            method: ``"cg"`` (exact up to a tolerance) or ``"neumann"`` (truncated series).
            damping: The damping ``delta > 0``.
            **kwargs: Options of the method (``rtol``, ``maxiter``; ``num_terms``, ``scale``).

        Example:
            >>> from curvopt.curvature import GGNOperator
            >>> model = nn.Linear(3, 2).double()
            >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2).double())]
            >>> G = GGNOperator(model, nn.MSELoss(), list(model.parameters()), data)
            >>> v = torch.randn(G.shape[0], dtype=torch.float64)
            >>> x = G.inverse("cg", damping=1e-2, rtol=1e-12) @ v
            >>> torch.allclose(G @ x + 1e-2 * x, v)
            True
        """
        from .inverse import inverse  # noqa: PLC0415 - inverse.py wraps this class

        return inverse(self, method, damping=damping, **kwargs)

    # -------------------------------------------------------------------------------- exports
    def to_scipy(self, dtype: np.dtype | type | None = None) -> LinearOperator:
        """Wrap the operator as a ``scipy.sparse.linalg.LinearOperator`` (for eigsh, cg, ...).

        Args:
            dtype: NumPy dtype scipy sees; defaults to the parameters' dtype.

        Returns:
            A symmetric linear operator of shape ``(d, d)`` computing products in PyTorch.

        With a process group every product is a collective: all ranks must run the same scipy
        routine together with the same inputs (for ``eigsh``/``lobpcg`` pass the same start
        vector ``v0``/``X`` on every rank; scipy's random default may differ between processes).

        Example:
            >>> from scipy.sparse.linalg import eigsh
            >>> from curvopt.curvature import HessianOperator
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
            >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> op = HessianOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
            >>> top = eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
            >>> dense = torch.linalg.eigvalsh(op.to_dense())[-3:]
            >>> bool(abs(torch.from_numpy(top).sort().values - dense).max() < 1e-8)
            True
        """
        np_dtype = np.dtype(dtype) if dtype is not None else _numpy_dtype(self.dtype)

        def matmat(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(x), dtype=self.dtype, device=self.device)
            return (self @ t).detach().cpu().numpy().astype(np_dtype, copy=False)

        return LinearOperator(
            self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat, dtype=np_dtype
        )

    def to_dense(self, chunk_size: int = 64, max_dim: int = 20_000) -> Tensor:
        """Form the ``d x d`` matrix by multiplying onto chunks of identity columns.

        Meant for small models (tests, references): it costs ``d / chunk_size`` products over
        the data and ``d^2`` memory.

        Args:
            chunk_size: Number of identity columns per product.
            max_dim: Refuse (ValueError) when ``d`` exceeds this.

        Returns:
            The dense matrix ``(d, d)`` in the operator's dtype and device.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        if self._dim > max_dim:
            raise ValueError(
                f"to_dense would build a {self._dim} x {self._dim} matrix; that exceeds "
                f"max_dim={max_dim}. Use products or to_scipy() instead, or raise max_dim"
            )
        dense = torch.empty(self._dim, self._dim, dtype=self.dtype, device=self.device)
        for start in range(0, self._dim, chunk_size):
            stop = min(start + chunk_size, self._dim)
            eye = torch.zeros(self._dim, stop - start, dtype=self.dtype, device=self.device)
            eye[start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
            dense[:, start:stop] = self @ eye
        return dense

    # -------------------------------------------------------------------------------- helpers
    def _loop_over_data(self, desc: str | None = None) -> Iterator[tuple[int, Any, Tensor]]:
        """Yield ``(index, X, y)`` for every batch, moved to the parameters' device."""
        batches = self._data
        if getattr(self, "_progressbar", False):
            batches = progress(batches, desc or f"{type(self).__name__} product")
        for i, batch in enumerate(batches):
            X, y = split_batch(batch, i, self._loss_func)  # a pair, or a dict with 'labels'
            check_input(X, i)
            if not isinstance(y, Tensor):
                raise TypeError(f"batch {i}: y must be a tensor, got {type(y).__name__}")
            yield i, move_to(X, self.device), y.to(self.device)

    def _batch_size(self, X: Any, index: int) -> int:
        """Number of samples of a batch input (``batch_size_fn`` or the first axis)."""
        if self._batch_size_fn is not None:
            size = self._batch_size_fn(X)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(
                    f"batch {index}: batch_size_fn must return an integer >= 0, got {size!r}"
                )
            return size
        try:
            return default_batch_size(X)
        except BatchError as err:
            raise BatchError(f"batch {index}: {err}") from None

    def _check_output(self, X: Any, output: Tensor, y: Tensor) -> None:
        """Check the model output and the targets of a batch (a `BatchError` if they do not fit)."""
        if self._batch_size_fn is None:
            check_batch_axes(output, X, y, default_batch_size(X))
        if isinstance(self._loss_func, KNOWN_LOSSES):
            check_targets(self._loss_func, output, y)

    def _count_samples(self) -> int:
        """One pass over the data: count the samples and check that ``y`` has the batch axis."""
        total = 0
        for i, X, y in self._loop_over_data(f"{type(self).__name__}: counting samples"):
            size = self._batch_size(X, i)
            if self._batch_size_fn is None and (y.ndim == 0 or y.shape[0] != size):
                raise BatchError(
                    f"batch {i}: y has shape {tuple(y.shape)}, but X {describe(X)} holds {size} "
                    "samples; y's first axis must be the batch axis"
                )
            total += size
        return total

    def _batch_weight(self, X: Any, y: Tensor, index: int) -> float:
        """Weight of batch ``index`` in the sum: its loss terms ``D_b`` for 'mean', else 1.

        0 for a batch without samples (or, for 'mean', without valid targets): it is skipped.
        """
        if self._batch_size(X, index) == 0:
            return 0.0
        if y.ndim == 0:
            raise BatchError(f"batch {index}: y is a scalar; it needs a leading batch axis")
        if self._loss_func.reduction == "mean":
            return loss_terms(self._loss_func, y)
        return 1.0

    def _split_columns(self, cols: Tensor) -> list[Tensor]:
        """``(d, k)`` -> list of ``(k, *p.shape)``."""
        rows = cols.T
        out, start = [], 0
        for p in self._params:
            n = p.numel()
            out.append(rows[:, start : start + n].reshape(rows.shape[0], *p.shape))
            start += n
        return out

    def _check_list(self, v: Sequence[Any]) -> tuple[bool, int]:
        """Validate list input; return (is_vector, number of columns)."""
        if len(v) != len(self._params):
            raise ValueError(
                f"v must hold {len(self._params)} tensors (one per trainable parameter), "
                f"got {len(v)}"
            )
        shapes = [tuple(p.shape) for p in self._params]
        for i, t in enumerate(v):
            if not isinstance(t, Tensor):
                raise TypeError(f"v[{i}] must be a tensor, got {type(t).__name__}")
            if t.dtype != self.dtype:
                raise TypeError(
                    f"v[{i}] must have dtype {self.dtype}, got {t.dtype}; convert with .to()"
                )
            if t.device != self.device:
                raise ValueError(f"v[{i}] is on {t.device}, but the parameters on {self.device}")
        if all(tuple(t.shape) == s for t, s in zip(v, shapes)):
            return True, 1
        ks = {t.shape[-1] for t in v if t.ndim >= 1}
        if len(ks) == 1 and all(
            t.ndim == len(s) + 1 and tuple(t.shape[:-1]) == s for t, s in zip(v, shapes)
        ):
            return False, ks.pop()
        raise ValueError(
            f"v must hold tensors of the parameter shapes {shapes}, optionally with one common "
            f"trailing column axis; got {[tuple(t.shape) for t in v]}"
        )

    @staticmethod
    def _parameter_names(model: nn.Module, params: list[Tensor]) -> list[str]:
        by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        names = []
        for i, p in enumerate(params):
            if id(p) not in by_id:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of model_func; "
                    "pass tensors from model_func.parameters()"
                )
            names.append(by_id[id(p)])
        if len(set(names)) != len(names):
            raise ValueError("params lists the same parameter more than once")
        return names

    def _check_deterministic(self, rtol: float = 1e-5, atol: float = 1e-7) -> None:
        """Multiply one random vector twice; raise RuntimeError if the results differ."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        v = torch.randn(self._dim, generator=gen, device=self.device, dtype=self.dtype)
        first, second = self @ v, self @ v
        if not torch.allclose(first, second, rtol=rtol, atol=atol):
            raise RuntimeError(
                f"{type(self).__name__} is not deterministic: two products with the same vector "
                "differ. Check for shuffling data loaders, dropout, or batch norm in train mode"
            )


def progress(iterable: Iterable[Any], desc: str) -> Iterator[Any]:
    """Iterate with a progress display on stderr (``tqdm`` if installed, else a counter).

    Example:
        >>> list(progress([1, 2], "demo"))  # doctest: +SKIP
        [1, 2]
    """
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency
    except ImportError:
        tqdm = None
    total = len(iterable) if hasattr(iterable, "__len__") else None
    if tqdm is not None:
        yield from tqdm(iterable, desc=desc, total=total)
        return
    import sys  # noqa: PLC0415

    count = 0
    for count, item in enumerate(iterable, start=1):
        yield item
        shown = f"{count}/{total}" if total is not None else str(count)
        sys.stderr.write(f"\r{desc}: {shown} batches")
        sys.stderr.flush()
    sys.stderr.write(f"\r{desc}: {count} batches, done\n")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """NumPy counterpart of a torch floating dtype (bfloat16/float16 map to float32)."""
    return np.dtype({torch.float64: np.float64, torch.float32: np.float32}.get(dtype, np.float32))
