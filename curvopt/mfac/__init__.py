"""M-FAC: matrix-free inverse-curvature products for the empirical Fisher of m gradients.

``F = damp * I + G^T G / m`` with ``G`` the ``(m, d)`` gradient matrix.
:class:`StaticMFAC` serves a fixed set of gradients (pruning), :class:`SlidingWindowMFAC`
a ring buffer of the last ``m`` gradients (optimizers).
"""

from .static import StaticMFAC
from .window import SlidingWindowMFAC

__all__ = ["SlidingWindowMFAC", "StaticMFAC"]
