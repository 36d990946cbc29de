"""The base class of all curvature operators: data loop, weighting, input formats, exports.

A curvature operator represents a ``d x d`` matrix over the trainable parameters of a model,
averaged over a data set given as an iterable of ``(X, y)`` batches, and multiplies it onto
vectors without ever forming it. Subclasses implement one method, `_matmat_batch`, the
product of the *mini-batch* curvature (of the mini-batch loss, with the loss function's own
reduction) with a matrix of columns. The base class adds the batches up with curvlinops'
weighting: a batch of size ``N_b`` counts ``N_b / N`` for ``reduction='mean'`` and ``1`` for
``reduction='sum'``, so that the result is the curvature of

$$
\\mathcal{L}(\\theta) = c \\sum_{n=1}^{N} \\ell(f_\\theta(x_n), y_n),
\\qquad c = 1/N \\text{ (mean) or } 1 \\text{ (sum)},
$$

the loss of the whole data set in one batch (for ``nn.MSELoss(reduction='mean')`` the constant
also divides by the number of output entries per sample, as the loss itself does).

Data-parallel operators: with ``process_group=`` every rank passes its own shard of the data
(shards may differ in size; a rank may hold no batch at all). Each rank sums its weighted
mini-batch products, and ONE all-reduce per product sums them and the batch weights over the
ranks before the division by the total weight ``N``, so every rank gets the product with the
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

from .losses import check_loss

Batch = tuple[Tensor, Tensor]


class CurvatureOperator:
    """Matrix-free curvature matrix of an empirical risk over a model's trainable parameters.

    Args:
        model_func: The network ``f_theta`` (an ``nn.Module``) mapping a batch ``X`` to outputs.
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss`` (any loss module with a
            ``'mean'``/``'sum'`` reduction for the Hessian); its ``reduction`` sets the scaling.
        params: Parameters of ``model_func`` to differentiate by; those with
            ``requires_grad=False`` are left out. Their order defines the flat layout.
        data: Re-iterable source of ``(X, y)`` batches, e.g. a list or a ``DataLoader``.
        num_data: Number of samples in ``data`` (the `num_data` property); counted with one
            pass over ``data`` if None. With a process group this is this rank's count (``0``
            allowed); the property is the sum over ranks. The weighting does not use it: the
            products are divided by the sum of the batch sizes actually seen.
        check_deterministic: Multiply one random vector twice and raise if the results differ
            (catches shuffling loaders, dropout, ...). Off by default; costs two products.
        process_group: A ``torch.distributed`` process group over which the data is sharded
            (see the module docstring), or None for one process. Every rank of the group must
            build the operator with the same model and parameters, and call every product,
            `to_dense` and `to_scipy`'s products together with identical inputs.

    Attributes:
        SELF_ADJOINT: Whether the matrix is symmetric (all curvature matrices here are).
        SUPPORTED_LOSSES: Loss module types the operator accepts.

    Raises:
        TypeError: If ``model_func``/``loss_func`` have the wrong type, or ``data`` is a one-shot
            iterator.
        ValueError: If there are no trainable parameters, a parameter is not one of the model's,
            the loss reduction is unsupported, or ``data`` is empty (on every rank).
            With a process group: if ``torch.distributed`` is not initialized or the ranks'
            parameter counts differ.
    """

    SELF_ADJOINT: bool = True
    SUPPORTED_LOSSES: tuple[type[nn.Module], ...] = (nn.MSELoss, nn.CrossEntropyLoss)

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: nn.Module,
        params: Iterable[Tensor],
        data: Iterable[Batch],
        *,
        num_data: int | None = None,
        check_deterministic: bool = False,
        process_group: Any = None,
    ) -> None:
        self._group = check_process_group(process_group)
        if not isinstance(model_func, nn.Module):
            raise TypeError(f"model_func must be an nn.Module, got {type(model_func).__name__}")
        check_loss(loss_func, self.SUPPORTED_LOSSES, type(self).__name__)
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
        self._dim = num_elements(self._params)
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of (X, y) batches or a DataLoader), not a "
                "one-shot iterator or generator; wrap it in list(...)"
            )
        self._data = data
        if num_data is None:
            num_data = sum(self._batch_size(X) for X, _ in self._loop_over_data())
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
        out: list[Tensor] | None = None
        total_weight = 0.0
        for X, y in self._loop_over_data():
            weight = self._batch_weight(X)
            total_weight += weight
            parts = self._matmat_batch(X, y, cols)
            if out is None:  # the parts are fresh tensors: scale them in place
                out = [part.mul_(weight) if weight != 1.0 else part for part in parts]
            else:
                for acc, part in zip(out, parts):
                    acc.add_(part, alpha=weight)
        out, total_weight = self._sum_over_ranks(out, total_weight, cols)
        if out is None:
            raise ValueError("data yielded no batches")
        if self._loss_func.reduction == "mean":
            for acc in out:
                acc.div_(total_weight)
        return out

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
        if total == 0.0:  # no rank held a batch
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
    def _loop_over_data(self) -> Iterator[Batch]:
        """Yield the batches, moved to the parameters' device."""
        for i, batch in enumerate(self._data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"batch {i} of data must be a pair (X, y), got {type(batch)}")
            X, y = batch
            if not isinstance(X, Tensor) or not isinstance(y, Tensor):
                raise TypeError(
                    f"batch {i} must hold tensors (X, y), got ({type(X).__name__}, "
                    f"{type(y).__name__})"
                )
            yield X.to(self.device), y.to(self.device)

    @staticmethod
    def _batch_size(X: Tensor) -> int:
        return X.shape[0]

    def _batch_weight(self, X: Tensor) -> float:
        """Weight of a batch: ``N_b`` for 'mean' (the sum is then divided by ``N``), 1 for 'sum'."""
        if self._loss_func.reduction == "mean":
            return float(self._batch_size(X))
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


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """NumPy counterpart of a torch floating dtype (bfloat16/float16 map to float32)."""
    return np.dtype({torch.float64: np.float64, torch.float32: np.float32}.get(dtype, np.float32))
