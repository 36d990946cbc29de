"""Matrix-free curvature operators over a model's trainable parameters (curvlinops style).

Each operator represents a ``d x d`` curvature matrix of the empirical risk over a data set of
``(X, y)`` batches and multiplies it onto flat vectors, ``(d, k)`` matrices or lists of
parameter-shaped tensors; ``to_scipy()`` and ``to_dense()`` export it.
"""

from . import estimators
from .base import CurvatureOperator
from .ekfac import EKFACOperator
from .empirical_fisher import EmpiricalFisherOperator
from .fisher import FisherOperator
from .functional import hvp
from .ggn import GGNOperator
from .hessian import HessianOperator
from .inverse import (
    CGInverseOperator,
    MFACOperator,
    NeumannInverseOperator,
    check_damping,
    inverse,
)
from .kfac import KFACOperator
from .linear_operator import DenseOperator, SquareOperator, as_operator

__all__ = [
    "CGInverseOperator",
    "CurvatureOperator",
    "DenseOperator",
    "MFACOperator",
    "NeumannInverseOperator",
    "SquareOperator",
    "as_operator",
    "estimators",
    "check_damping",
    "inverse",
    "EKFACOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "KFACOperator",
    "HessianOperator",
    "hvp",
]
