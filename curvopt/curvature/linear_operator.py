r"""A small base for square operators that are not tied to a data loop (inverses, K-FAC, M-FAC).

An operator here represents a ``d x d`` matrix ``A`` and multiplies it onto a flat vector
``(d,)``, a matrix of columns ``(d, k)``, or (when it knows the parameter shapes) a list of
parameter-shaped tensors, like `curvopt.curvature.base.CurvatureOperator`. Subclasses
implement one method, ``_matmat(X)`` with ``X`` of shape ``(d, k)``. The base adds the formats,
``to_dense``, ``to_scipy`` and ``inverse``.

`as_operator` turns what the estimators and inverses accept into such an operator: any object
with ``shape``, ``dtype``, ``device`` and ``@`` on ``(d, k)`` tensors (the curvature operators),
or a dense square tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor


class SquareOperator:
    """A ``d x d`` matrix, known only through products (see the module docstring).

    Args:
        dim: ``d``.
        dtype: Dtype of the products.
        device: Device of the products.
        shapes: Parameter shapes for the list format (their sizes must add up to ``d``), or
            None for flat tensors only.

    Attributes:
        SELF_ADJOINT: Whether the matrix is symmetric (then ``T``/``H`` return ``self``).
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        self._dim = int(dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self._shapes = [tuple(s) for s in shapes] if shapes is not None else None
        if self._shapes is not None and sum(int(np.prod(s)) for s in self._shapes) != dim:
            raise ValueError(f"the parameter shapes {self._shapes} do not hold {dim} entries")

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, d)``."""
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the products."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the products."""
        return self._device

    def _matmat(self, X: Tensor) -> Tensor:
        """``A X`` for ``X`` of shape ``(d, k)``; for subclasses."""
        raise NotImplementedError

    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Multiply onto ``(d,)``, ``(d, k)`` or a list of parameter-shaped tensors.

        Raises:
            TypeError: For other inputs or another dtype.
            ValueError: If shapes or the device do not fit.
        """
        if isinstance(v, Tensor):
            X = _check_flat(v, self)
            if X.shape[1] == 0:
                return torch.zeros_like(v)
            out = self._matmat(X)
            return out[:, 0] if v.ndim == 1 else out
        if isinstance(v, (list, tuple)) and self._shapes is not None:
            return self._matmat_list(list(v))
        raise TypeError(
            f"v must be a tensor of shape ({self._dim},) or ({self._dim}, k)"
            + (" or a list of parameter-shaped tensors" if self._shapes is not None else "")
            + f", got {type(v).__name__}"
        )

    def __rmatmul__(self, x: Tensor) -> Tensor:
        """``x @ self`` (rows times the matrix) for a symmetric operator."""
        if not self.SELF_ADJOINT:  # pragma: no cover - every operator here is symmetric
            raise NotImplementedError(f"{type(self).__name__} has no adjoint")
        if isinstance(x, Tensor) and x.ndim == 2:
            return (self @ x.T).T
        return self @ x

    def _matmat_list(self, v: list[Tensor]) -> list[Tensor]:
        shapes = self._shapes or []
        if len(v) != len(shapes) or not all(isinstance(t, Tensor) for t in v):
            raise ValueError(f"v must hold {len(shapes)} tensors shaped like the parameters")
        if all(tuple(t.shape) == s for t, s in zip(v, shapes)):
            flat = torch.cat([t.reshape(-1) for t in v])
            out = self @ flat
            return [o.reshape(s) for o, s in zip(out.split([t.numel() for t in v]), shapes)]
        k = v[0].shape[-1] if v[0].ndim else -1
        if not all(t.ndim == len(s) + 1 and tuple(t.shape) == (*s, k) for t, s in zip(v, shapes)):
            raise ValueError(
                f"v must hold tensors of the parameter shapes {shapes}, optionally with one "
                f"common trailing column axis; got {[tuple(t.shape) for t in v]}"
            )
        flat = torch.cat([t.reshape(-1, k) for t in v])
        out = self @ flat
        sizes = [int(np.prod(s)) for s in shapes]
        return [o.reshape(*s, k) for o, s in zip(out.split(sizes), shapes)]

    def adjoint(self) -> SquareOperator:
        """The adjoint; the operator itself (symmetric)."""
        if not self.SELF_ADJOINT:  # pragma: no cover
            raise NotImplementedError(f"{type(self).__name__} has no adjoint")
        return self

    @property
    def T(self) -> SquareOperator:  # noqa: N802 - numpy/scipy's name
        """The transpose (`adjoint`)."""
        return self.adjoint()

    @property
    def H(self) -> SquareOperator:  # noqa: N802 - numpy/scipy's name
        """The conjugate transpose (`adjoint`)."""
        return self.adjoint()

    def to_dense(self, chunk_size: int = 64, max_dim: int = 20_000) -> Tensor:
        """The ``d x d`` matrix, from products with chunks of identity columns (small ``d``)."""
        return dense_from_products(self, chunk_size, max_dim)

    def to_scipy(self, dtype: Any = None) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` computing the products in PyTorch."""
        return scipy_wrapper(self, dtype)

    def inverse(self, method: str = "cg", *, damping: float, **kwargs: Any) -> SquareOperator:
        """``(A + damping I)^{-1}`` as an operator; see `curvopt.curvature.inverse.inverse`."""
        if _inverse_factory is None:  # pragma: no cover - the package's __init__ registers it
            raise RuntimeError("import curvopt.curvature (it registers the inverses) first")
        return _inverse_factory(self, method, damping=damping, **kwargs)


#: ``curvopt.curvature.inverse.inverse``, registered by that module when it is imported (the
#: package's ``__init__`` imports it, and Python runs a package's ``__init__`` before any of its
#: modules). The inverses subclass `SquareOperator`, so this base module cannot import them.
_inverse_factory: Callable[..., SquareOperator] | None = None


def register_inverse(factory: Callable[..., SquareOperator]) -> None:
    """Make ``factory(A, method, damping=..., **kwargs)`` back `SquareOperator.inverse`."""
    global _inverse_factory
    _inverse_factory = factory


class DenseOperator(SquareOperator):
    """A dense symmetric ``(d, d)`` tensor as an operator (tests, small problems).

    Example:
        >>> A = DenseOperator(torch.eye(3, dtype=torch.float64) * 2)
        >>> A @ torch.ones(3, dtype=torch.float64)
        tensor([2., 2., 2.], dtype=torch.float64)
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            raise TypeError("matrix must be a 2-D tensor")
        check_square(tuple(matrix.shape), "matrix")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self._matrix = matrix

    def _matmat(self, X: Tensor) -> Tensor:
        return self._matrix @ X


class _Wrapped(SquareOperator):
    """Any object with ``shape``, ``dtype``, ``device`` and ``@`` on ``(d, k)`` tensors."""

    def __init__(self, op: Any) -> None:
        super().__init__(op.shape[0], op.dtype, op.device, _param_shapes(op))
        self._op = op

    def _matmat(self, X: Tensor) -> Tensor:
        return self._op @ X


def check_square(shape: tuple[int, ...], name: str = "the operator") -> None:
    """Raise ValueError unless ``shape`` is ``(d, d)`` with ``d >= 1``."""
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"{name} must be square (d x d), got shape {tuple(shape)}; inverses, traces, "
            "diagonals and spectra are defined for square matrices only"
        )
    if shape[0] < 1:
        raise ValueError(f"{name} is empty (shape {tuple(shape)})")


def as_operator(A: Any) -> SquareOperator:
    """Return ``A`` as a `SquareOperator`.

    Args:
        A: A `SquareOperator`, a curvature operator (anything with ``shape``, ``dtype``,
            ``device`` and ``@`` on ``(d, k)`` tensors), or a dense square tensor.

    Raises:
        TypeError: For other objects.
        ValueError: If ``A`` is not square.

    Example:
        >>> as_operator(torch.eye(2)).shape
        (2, 2)
    """
    if isinstance(A, SquareOperator):
        check_square(A.shape)
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    if all(hasattr(A, a) for a in ("shape", "dtype", "device", "__matmul__")):
        check_square(tuple(A.shape))
        return _Wrapped(A)
    raise TypeError(
        "expected a curvature operator (shape, dtype, device and @ on (d, k) tensors) or a "
        f"square tensor, got {type(A).__name__}"
    )


def _param_shapes(op: Any) -> list[tuple[int, ...]] | None:
    params = getattr(op, "params", None)
    if isinstance(params, list) and all(isinstance(p, Tensor) for p in params):
        return [tuple(p.shape) for p in params]
    return None


def _check_flat(v: Tensor, op: SquareOperator) -> Tensor:
    """Check ``(d,)``/``(d, k)`` input; return it as ``(d, k)``."""
    if v.ndim not in (1, 2) or v.shape[0] != op.shape[0]:
        raise ValueError(
            f"v must have shape ({op.shape[0]},) or ({op.shape[0]}, k), got {tuple(v.shape)}"
        )
    if v.dtype != op.dtype:
        raise TypeError(f"v must have dtype {op.dtype}, got {v.dtype}; convert with .to()")
    if v.device != op.device:
        raise ValueError(f"v is on {v.device}, but the operator on {op.device}")
    return v if v.ndim == 2 else v[:, None]


def dense_from_products(op: Any, chunk_size: int = 64, max_dim: int = 20_000) -> Tensor:
    """Form ``op``'s matrix from products with chunks of identity columns."""
    d = op.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if d > max_dim:
        raise ValueError(f"to_dense would build a {d} x {d} matrix (more than max_dim={max_dim})")
    eye = torch.eye(d, dtype=op.dtype, device=op.device)
    return torch.cat([op @ eye[:, s : s + chunk_size] for s in range(0, d, chunk_size)], dim=1)


def scipy_wrapper(op: Any, dtype: Any = None) -> LinearOperator:
    """``op`` as a symmetric ``scipy.sparse.linalg.LinearOperator``."""
    np_dtype = (
        np.dtype(dtype)
        if dtype is not None
        else np.dtype({torch.float64: np.float64}.get(op.dtype, np.float32))
    )

    def matmat(x: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=op.dtype, device=op.device)
        return (op @ t).detach().cpu().numpy().astype(np_dtype, copy=False)

    return LinearOperator(
        op.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat, dtype=np_dtype
    )
