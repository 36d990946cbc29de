import pytest
from bench_tiny_problem import tiny_problem

from curvopt.bench import Problem


@pytest.fixture
def problem() -> Problem:
    return tiny_problem()
