"""The window step's ``m x m`` algebra on the CPU: NumPy views and one LAPACK call.

For ``x = g`` a window step needs ``c = m A^{-1} e_r / lam`` with ``A = m I + K / lam`` over the
``n`` filled rows (see :class:`~curvopt.mfac.window.SlidingWindowMFAC`). The reference (and the
path on other devices) is ``torch.cholesky_solve(m e_r, cholesky(K, m, lam))``: about six tensor
calls on an ``n x n`` matrix. On the CPU each such call costs more than its arithmetic at
``n <= 96`` (2-15 us warm, up to 30 us right after a pass over a window that evicted the
caches), and at ``d = 1e5``, ``m = 16`` they decided the step's time against its two-pass floor
(issue #23). :class:`UnitColumnSolver` does the same factorization and solves as one ``dposv``
on preallocated NumPy buffers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_DPOSV = None  # scipy's LAPACK dposv, imported on first use (scipy.linalg takes ~0.1 s to import)


def _dposv():
    global _DPOSV
    if _DPOSV is None:
        from scipy.linalg.lapack import dposv

        _DPOSV = dposv
    return _DPOSV


class UnitColumnSolver:
    """Workspace for ``c = scale * A^{-1} e_r``, ``A = m I + K / lam``, on the CPU.

    .. math::

        c = \\text{scale} \\cdot (m I + K / \\lambda)^{-1} e_r

    by LAPACK's ``dposv`` (Cholesky factorization and two triangular solves, float64) on
    buffers of up to ``size x size``, written into an ``(size,)`` tensor of the accumulation
    dtype that the step's last pass reads.

    Args:
        m: Window size (the ``m`` in ``A``).
        size: Largest ``n`` the solver serves.
        dtype: Dtype of the returned column (the window's accumulation dtype).

    Example:
        >>> import numpy as np
        >>> solver = UnitColumnSolver(m=2, size=2, dtype=torch.float64)
        >>> K = np.array([[2.0, 1.0], [1.0, 3.0]])
        >>> c = solver(K, damp=0.5, r=1, scale=1.0)
        >>> bool(np.allclose(np.array([[6.0, 2.0], [2.0, 8.0]]) @ c.numpy(), [0.0, 1.0]))
        True
    """

    def __init__(self, m: int, size: int, dtype: torch.dtype):
        """Allocate the buffers."""
        self.size = size
        self.scaled_eye = np.eye(size) * float(m)
        self.A = np.empty((size, size))
        self.b = np.empty((size, 1))
        self.out = torch.empty(size, dtype=dtype)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        arrays = (self.scaled_eye, self.A, self.b)
        return sum(a.nbytes for a in arrays) + self.out.numel() * self.out.element_size()

    def __call__(self, K: np.ndarray, damp: float, r: int, scale: float) -> Tensor | None:
        """``scale * A^{-1} e_r`` for ``K`` ``(n, n)``, ``n <= size``.

        Args:
            K: ``(n, n)`` float64 Gram matrix (a NumPy view, symmetric).
            damp: Damping ``lam > 0``.
            r: Column wanted, ``0 <= r < n``.
            scale: Factor applied to the column.

        Returns:
            A view of the solver's ``(n,)`` output tensor (overwritten by the next call), or
            None if LAPACK finds ``A`` not positive definite; the caller then takes the
            reference path. A NaN in ``K`` gives None or NaN, depending on the LAPACK build.
        """
        n = K.shape[0]
        full = n == self.size
        A = self.A if full else self.A[:n, :n]
        np.multiply(K, 1.0 / damp, out=A)
        A += self.scaled_eye if full else self.scaled_eye[:n, :n]
        b = self.b if full else self.b[:n]
        b.fill(0.0)
        b[r, 0] = scale
        # A is symmetric, so A.T is A in the column-major order that LAPACK reads
        _, x, info = _dposv()(A.T, b, lower=1, overwrite_a=1, overwrite_b=1)
        if info != 0:
            return None
        out = self.out if full else self.out[:n]
        out.numpy()[:] = x[:, 0]
        return out
