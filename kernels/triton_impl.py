"""The Triton launchers under the names the dispatcher looks up.

:mod:`curvopt.kernels` imports this module lazily and calls ``multi_dot``, ``combine``,
``gram_diag`` and ``softmax_curvature`` from here when :func:`~curvopt.kernels.dispatch.use_triton`
says so. Importing it without Triton raises ``ImportError`` (the dispatcher then uses the
references).
"""

from __future__ import annotations

from ._launch import is_interpreted, triton

if triton is None:
    raise ImportError("triton is not installed")

from .combine import combine_triton as combine  # noqa: E402
from .gram_diag import gram_diag_triton as gram_diag  # noqa: E402
from .multi_dot import _multi_dot_kernel  # noqa: E402
from .multi_dot import multi_dot_triton as multi_dot  # noqa: E402
from .softmax_curvature import softmax_curvature_triton as softmax_curvature  # noqa: E402

INTERPRETED = is_interpreted(_multi_dot_kernel)
"""Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` was set
when they were defined); only then can they run on CPU tensors."""

__all__ = ["INTERPRETED", "combine", "gram_diag", "multi_dot", "softmax_curvature"]
