"""Hot loops of curvopt: Triton kernels with a PyTorch reference beside each.

Call the functions exported here; :mod:`curvopt.kernels.dispatch` picks Triton (CUDA, or the CPU
interpreter under ``TRITON_INTERPRET=1``) or the reference (everywhere else, or when
``CURVOPT_KERNELS=reference``). Both paths take the same arguments, raise the same errors for bad
input and return the same result up to floating-point rounding.

Example:
    >>> import torch
    >>> from curvopt import kernels
    >>> G, V = torch.ones(3, 5), torch.ones(2, 5)
    >>> kernels.multi_dot(G, V).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

if __name__ != "curvopt.kernels":  # pragma: no cover - exercised in a subprocess by the tests
    # The source root is on sys.path (``python -m pytest``, ``python -c``, ``PYTHONPATH=.``), so
    # this folder was found as the top-level package ``kernels``: a name that belongs to another
    # distribution (Hugging Face's ``kernels``, which transformers imports). Hand the import over
    # to that distribution, or refuse; this folder is importable only as ``curvopt.kernels``.
    from ._name_guard import hand_over as _hand_over

    _hand_over(__name__, __file__)
else:
    from .api import (
        combine,
        combine_reference,
        gram_diag,
        gram_diag_reference,
        multi_dot,
        multi_dot_reference,
        softmax_curvature,
        softmax_curvature_reference,
        use_triton,
    )

__all__ = [
    "combine",
    "combine_reference",
    "gram_diag",
    "gram_diag_reference",
    "multi_dot",
    "multi_dot_reference",
    "softmax_curvature",
    "softmax_curvature_reference",
    "use_triton",
]
