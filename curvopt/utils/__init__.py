"""Shared helpers: flat parameter vectors and input validation."""

from .params import check_vector, flat_grad, flatten, num_elements, trainable, unflatten

__all__ = ["check_vector", "flat_grad", "flatten", "num_elements", "trainable", "unflatten"]
