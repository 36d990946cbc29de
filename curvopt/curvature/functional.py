"""Functional Hessian-vector product for a loss given as a function of parameter tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp

from curvopt.utils.params import check_vector, flatten, num_elements, unflatten


def hvp(
    loss_fn: Callable[..., Tensor],
    params: Tensor | Sequence[Tensor],
    v: Tensor | Sequence[Tensor],
) -> Tensor | list[Tensor]:
    r"""Hessian-vector product ``\nabla^2 L(\theta) v`` of a scalar function, forward-over-reverse.

    Args:
        loss_fn: Called as ``loss_fn(*params)``; returns a scalar tensor.
        params: The point ``theta``: one tensor or a list of tensors.
        v: The direction: a tensor / list of tensors shaped like ``params``, or one flat vector
            of length ``sum(p.numel())``.

    Returns:
        ``H v`` in the format of ``v``.

    Raises:
        TypeError: If ``params``/``v`` are not tensors, or dtypes differ.
        ValueError: If shapes differ, or ``loss_fn`` does not return a scalar.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hvp(lambda x: 0.5 * x @ A @ x, torch.zeros(2), torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
    """
    single = isinstance(params, Tensor)
    primals = (params,) if single else tuple(params)
    if not primals or not all(isinstance(p, Tensor) for p in primals):
        raise TypeError("params must be a tensor or a non-empty list of tensors")
    primals = tuple(p.detach() for p in primals)
    flat_v = isinstance(v, Tensor) and not (single and v.shape == primals[0].shape)
    if flat_v:
        check_vector(v, num_elements(primals), name="v", dtype=primals[0].dtype)
        tangents = tuple(unflatten(v, primals))
    else:
        tangents = (v,) if single else tuple(v)
        if len(tangents) != len(primals) or any(
            not isinstance(t, Tensor) or t.shape != p.shape for t, p in zip(tangents, primals)
        ):
            raise ValueError(
                "v must be shaped like params: expected shapes "
                f"{[tuple(p.shape) for p in primals]}, got "
                f"{[tuple(getattr(t, 'shape', ())) for t in tangents]}"
            )
        for t, p in zip(tangents, primals):
            if t.dtype != p.dtype:
                raise TypeError(f"v has dtype {t.dtype} but params {p.dtype}; convert with .to()")

    def loss(ps: tuple[Tensor, ...]) -> Tensor:
        value = loss_fn(*ps)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        return value.reshape(())

    with torch.no_grad():
        out = jvp(grad(loss), (primals,), (tangents,))[1]
    if flat_v:
        return flatten(list(out))
    return out[0] if single else list(out)
