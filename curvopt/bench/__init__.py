"""The curvature-approximation benchmark harness behind ``curvopt bench``.

Compare curvature approximations (exact Hessian, GGN, Fisher, empirical Fisher, diagonal estimates,
K-FAC, M-FAC) on one problem for accuracy, time and memory against an exact reference.

Example:
    >>> from curvopt.bench import make_problem, run_benchmark
    >>> problem = make_problem("softmax")  # doctest: +SKIP
    >>> result = run_benchmark(problem, ["ggn", "kfac", "mfac_m64"])  # doctest: +SKIP
    >>> result.to_dict()["results"][0]["ihvp_rel_error"]  # doctest: +SKIP
"""

from .approximations import (
    Approximation,
    DenseApproximation,
    default_approximations,
    make_approximation,
)
from .problems import BUILTIN_PROBLEMS, Problem, make_problem
from .runner import BenchmarkResult, run_benchmark
from .schema import SCHEMA_VERSION, validate

__all__ = [
    "Approximation",
    "BUILTIN_PROBLEMS",
    "BenchmarkResult",
    "DenseApproximation",
    "Problem",
    "SCHEMA_VERSION",
    "default_approximations",
    "make_approximation",
    "make_problem",
    "run_benchmark",
    "validate",
]
