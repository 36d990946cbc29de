r"""Keep forward-mode AD off torch's slow path for arithmetic with constants.

In forward-mode AD every operator computes a tangent by its derivative formula, e.g. for
``a * b``

$$
\dot{(ab)} = \dot a \, b + a \, \dot b .
$$

When ``b`` carries no tangent (a Python number such as GPT-2's ``0.5 * x``, or a constant
tensor such as an attention mask), torch 2.x stands in an "efficient zero tensor" for
``\dot b``, and the arithmetic on that zero tensor computes its output shape through the
operator's *Python* meta function (``torch._refs``): 0.2-0.6 ms per operator on a CPU, against
5-30 microseconds for the operator itself at the sizes of a small model. On the tiny GPT-2 of
``benchmarks/curvature_products.py`` these calls were half the time of the forward-mode pass.

`DualArithmeticMode` (a ``TorchFunctionMode``, active only while the operators run a forward
pass with dual tensors) rewrites the few calls that take this path in practice into
equivalent ones that do not:

* ``x * s``, ``s * x``, ``x + s``, ``s + x``, ``x - s``, ``x / s`` with a dual tensor
  ``x`` and a Python number ``s`` (also ``torch.mul/add/sub/div`` and the methods, with
  ``alpha``) call the ``.Scalar`` overloads, whose formulas (``\dot x s``, ``\dot x``, ...)
  never form ``\dot s`` (``s - x`` already takes ``rsub.Scalar``); the kernels and the type
  promotion are those of the original call, so primal and tangent are bitwise the same.
* ``x + m``, ``m + x``, ``x - m``, ``m - x`` with a floating tensor ``m`` without tangent give
  ``m`` an explicit zero tangent; ``\dot x \pm 0`` is ``\dot x`` exactly.

Everything else (and every call without a dual operand) runs unchanged, so correctness never
depends on this mode: it only saves time. ``tests/curvature/test_dual_arithmetic.py`` checks
bitwise equality of primals and tangents with and without the mode.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Number
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten

# fwAD.make_dual registers, on every call, the decompositions that give some operators their
# forward-mode formulas; `make_dual` below skips that call, so it is done once here
getattr(fwAD, "_maybe_load_decompositions", lambda: None)()


def make_dual(primal: Tensor, tangent: Tensor, level: int) -> Tensor:
    """``fwAD.make_dual`` for a floating ``primal`` and a tangent of its shape.

    Without ``fwAD.make_dual``'s per-call search of the torch-function mode stack for an
    export tracer (several microseconds per call inside `DualArithmeticMode`; a pass makes
    one per parameter).
    """
    return torch._make_dual(primal, tangent, level=level)


def unpack_dual(t: Tensor, level: int) -> tuple[Tensor, Tensor | None]:
    """``fwAD.unpack_dual`` (primal, tangent or None) without the same search."""
    return torch._unpack_dual(t, level=level)


def _is_dual(t: Any, level: int) -> bool:
    """Whether ``t`` is a tensor with a tangent at dual level ``level``."""
    return isinstance(t, Tensor) and unpack_dual(t, level)[1] is not None


def _is_number(s: Any) -> bool:
    return isinstance(s, Number) and not isinstance(s, Tensor)


def _with_zero_tangent(m: Tensor, level: int) -> Tensor:
    """``m`` as a dual tensor whose tangent is zero (only for floating tensors)."""
    return make_dual(m, torch.zeros_like(m), level)


def _constant_tensor(m: Any, level: int) -> bool:
    """A floating tensor without a tangent (one that would get an implicit zero tangent)."""
    return isinstance(m, Tensor) and m.is_floating_point() and not _is_dual(m, level)


def _scalar_rule(overload: Any, *, reflected: bool = False) -> Callable[..., Any]:
    """``f(x, s[, alpha])`` -> ``overload(x, s[, alpha])`` for a dual ``x`` and a number ``s``."""

    def rule(args: tuple, kwargs: dict, level: int) -> Any:
        if len(args) != 2 or set(kwargs) - {"alpha"} or reflected and kwargs:
            return NotImplemented
        x, s = args
        if not (_is_number(s) and _is_dual(x, level)):
            return NotImplemented
        return overload(x, s, **kwargs)

    return rule


def _additive_rule(op: Callable[..., Tensor]) -> Callable[..., Any]:
    """``x ± m`` or ``m ± x`` with one dual and one constant floating tensor: zero tangent."""

    def rule(args: tuple, kwargs: dict, level: int) -> Any:
        if len(args) != 2 or set(kwargs) - {"alpha"}:
            return NotImplemented
        a, b = args
        if _is_dual(a, level) and _constant_tensor(b, level):
            return op(a, _with_zero_tangent(b, level), **kwargs)
        if _is_dual(b, level) and _constant_tensor(a, level):
            return op(_with_zero_tangent(a, level), b, **kwargs)
        return NotImplemented

    return rule


def _first(*rules: Callable[..., Any]) -> Callable[..., Any]:
    def rule(args: tuple, kwargs: dict, level: int) -> Any:
        for r in rules:
            out = r(args, kwargs, level)
            if out is not NotImplemented:
                return out
        return NotImplemented

    return rule


def _softmax_rule(log: bool) -> Callable[..., Any]:
    r"""``softmax`` / ``log_softmax`` of a dual tensor with the tangent from the result.

    torch's formula recomputes ``exp(x - max x)`` for the tangent (``logsumexp_jvp``), which
    is slow on a CPU where ``x`` holds masked entries near ``-3.4e38`` (exp underflows on a
    slow path: 1-2 ms for an ``8 x 4 x 32 x 32`` attention map). With ``p = softmax(x)``:

    $$
    \dot p = p \odot (\dot x - \langle p, \dot x \rangle), \qquad
    \dot{(\log p)} = \dot x - \langle p, \dot x \rangle,
    $$

    the inner product along ``dim``; the primal is computed by the original call.
    """

    def rule(func: Any, args: tuple, kwargs: dict, level: int) -> Any:
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(dim, int) or not _is_dual(x, level):
            return NotImplemented
        primal, tangent = unpack_dual(x, level)
        rest = {k: v for k, v in kwargs.items() if k != "input"}
        out = func(primal, *args[1:], **rest)
        tangent = tangent.to(out.dtype)
        p = out.exp() if log else out
        centred = tangent - (p * tangent).sum(dim, keepdim=True)
        return make_dual(out, centred if log else p * centred, level)

    return rule


_MUL = _scalar_rule(aten.mul.Scalar)
_ADD = _first(_scalar_rule(aten.add.Scalar), _additive_rule(torch.add))
_SUB = _first(_scalar_rule(aten.sub.Scalar), _additive_rule(torch.sub))
_DIV = _scalar_rule(aten.div.Scalar)

#: The intercepted functions and how each is rewritten (NotImplemented: run unchanged).
RULES: dict[Any, Callable[..., Any]] = {
    Tensor.__mul__: _MUL,
    Tensor.__rmul__: _MUL,
    Tensor.mul: _MUL,
    torch.mul: _MUL,
    Tensor.__add__: _ADD,
    Tensor.__radd__: _scalar_rule(aten.add.Scalar, reflected=True),  # only number + tensor
    Tensor.add: _ADD,
    torch.add: _ADD,
    Tensor.__sub__: _SUB,
    Tensor.sub: _SUB,
    torch.sub: _SUB,
    Tensor.__truediv__: _DIV,
    Tensor.div: _DIV,
    torch.div: _DIV,
}

#: Rules that need the intercepted function itself (to compute the primal as it would).
FUNC_RULES: dict[Any, Callable[..., Any]] = {
    f: _softmax_rule(log)
    for log, funcs in (
        (False, (torch.softmax, torch.nn.functional.softmax, Tensor.softmax)),
        (True, (torch.log_softmax, torch.nn.functional.log_softmax, Tensor.log_softmax)),
    )
    for f in funcs
}

#: Both tables as ``rule(func, args, kwargs, level)``, for one lookup per call.
_ALL_RULES: dict[Any, Callable[..., Any]] = {
    **{f: (lambda func, a, kw, level, r=r: r(a, kw, level)) for f, r in RULES.items()},
    **FUNC_RULES,
}


class DualArithmeticMode(TorchFunctionMode):
    """Rewrite arithmetic between dual tensors and constants (see the module docstring).

    Use it inside ``torch.autograd.forward_ad.dual_level()`` around the forward pass.

    Args:
        level: The dual level whose tangents the rules look at (what ``dual_level()``
            returns; 0 unless levels are nested).

    Example:
        >>> import torch.autograd.forward_ad as fwAD
        >>> x, t = torch.randn(3), torch.randn(3)
        >>> with fwAD.dual_level(), DualArithmeticMode():
        ...     y = 0.5 * fwAD.make_dual(x, t) + 1.0
        ...     primal, tangent = fwAD.unpack_dual(y)
        >>> torch.equal(tangent, 0.5 * t)
        True
    """

    def __init__(self, level: int = 0) -> None:
        super().__init__()
        self.level = level

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        # every torch call of the pass (shapes, views, ...) comes through here: one lookup
        # on the fast path, which is most calls
        rule = _ALL_RULES.get(func)
        if rule is None:
            return func(*args, **kwargs) if kwargs else func(*args)
        out = rule(func, args, kwargs or {}, self.level)
        return func(*args, **(kwargs or {})) if out is NotImplemented else out
