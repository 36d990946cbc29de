r"""Fused first-order rules for elementwise activation modules in the dual forward pass.

An activation written out in torch operators, such as GPT-2's ``gelu_new``

$$
y = \tfrac12 x \bigl(1 + \tanh u\bigr), \qquad u = c\,(x + a x^3),
$$

costs eight operators in a forward pass; with dual tensors (forward-mode AD) each of them also
computes a tangent and autograd records both, so on the tiny GPT-2 of
``benchmarks/curvature_products.py`` the activation was about a tenth of a GGN-vector
product. Its derivative is known in closed form,

$$
y' = \tfrac12 (1 + \tanh u) + \tfrac12 x \,(1 - \tanh^2 u)\, c\,(1 + 3 a x^2),
$$

so `fused_forward` runs such a module as one `torch.autograd.Function` that computes
``y`` with the module's own operators (bitwise the module's output) and the slope ``y'`` from
the same ``tanh u``, and answers both the tangent (``x_dot * y'``) and the backward pass
(``grad_y * y'``) with one multiplication each.

The tangent is **first-order only**: the slope is a constant of the graph there, so
``x_dot * y'`` is not differentiable with respect to ``x`` again. `dual_forward` therefore uses
the rules only for the products that backpropagate through the output alone (GGN, Fisher,
empirical Fisher), never for a Hessian, whose reverse-over-forward pass backpropagates through
the tangent. (The backward pass itself stays exact under ``create_graph``: it recomputes the
slope from ``x`` with differentiable operators.)

A rule is used for a module only while the module computes exactly the rule's output: each
(module class, forward function, dtype, device type) is checked once per process, bitwise, on a
probe input; any difference (another transformers version, a kernel from the hub, a subclass,
an instance with its own ``forward``) leaves the module to plain forward-mode AD.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: ``x -> (y, dy/dx)`` for one activation, with ``y`` computed by the module's own operators.
Rule = Callable[[Tensor], tuple[Tensor, Tensor]]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_new(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""The ``NewGELUActivation`` of transformers (GPT-2's ``gelu_new``) and its slope.

    .. math:: y = \tfrac12 x (1 + \tanh(c(x + a x^3))), \quad c = \sqrt{2/\pi},\ a = 0.044715
    """
    th = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0)))
    half_x = 0.5 * x
    y = half_x * (1.0 + th)
    slope = 0.5 * (1.0 + th) + half_x * (1.0 - th * th) * (
        _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * (x * x))
    )
    return y, slope


def fast_gelu(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""The ``FastGELUActivation`` of transformers and its slope.

    .. math:: y = \tfrac12 x (1 + \tanh(k x (1 + a x^2))), \quad k = 0.7978845608,\ a = 0.044715
    """
    th = torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))
    half_x = 0.5 * x
    y = half_x * (1.0 + th)
    slope = 0.5 * (1.0 + th) + half_x * (1.0 - th * th) * (
        0.7978845608 * (1.0 + 3 * 0.044715 * (x * x))
    )
    return y, slope


def quick_gelu(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""The ``QuickGELUActivation`` of transformers and its slope.

    .. math:: y = x\,\sigma(1.702 x), \quad y' = \sigma + 1.702\, x\, \sigma (1 - \sigma)
    """
    s = torch.sigmoid(1.702 * x)
    y = x * s
    slope = s + (1.702 * x) * (s * (1.0 - s))
    return y, slope


#: The rules by the defining module and name of the activation class: a lookup that imports
#: nothing (a model holding one of these classes has imported transformers already).
RULES_BY_NAME: dict[tuple[str, str], Rule] = {
    ("transformers.activations", "NewGELUActivation"): gelu_new,
    ("transformers.activations", "FastGELUActivation"): fast_gelu,
    ("transformers.activations", "QuickGELUActivation"): quick_gelu,
}


def rule_for(cls: type) -> Rule | None:
    """The fused rule of an activation class (None: none)."""
    return RULES_BY_NAME.get((cls.__module__, cls.__qualname__))


class _FusedElementwise(torch.autograd.Function):
    """``y = f(x)`` with the slope ``f'(x)`` kept for one tangent and one backward pass.

    The backward pass is exact to any order: under ``create_graph`` it recomputes the slope
    from ``x`` with differentiable operators. The tangent ``x_dot * f'(x)`` is not: the
    slope is a constant of the graph there, which is why only first-order passes use this.
    """

    @staticmethod
    def forward(x: Tensor, rule: Rule) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return rule(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, rule = inputs
        slope = output[1]
        ctx.mark_non_differentiable(slope)
        ctx.rule = rule
        ctx.save_for_backward(x, slope)
        ctx.save_for_forward(slope)

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_slope: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        x, slope = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the slope as a function of x
            slope = ctx.rule(x)[1]
        return grad_y * slope, None

    @staticmethod
    def jvp(ctx, x_dot: Tensor, _rule: None) -> tuple[Tensor, None]:  # noqa: ANN001
        (slope,) = ctx.saved_tensors
        return x_dot * slope, None


# (class, forward function, dtype, device type) -> whether the rule reproduces the module
_VERIFIED: dict[tuple, bool] = {}


def _reproduces(module: nn.Module, rule: Rule, x: Tensor) -> bool:
    """Whether ``rule`` gives the module's output bitwise (checked once per kind of input)."""
    forward = type(module).forward
    key = (type(module), forward, x.dtype, x.device.type)
    verdict = _VERIFIED.get(key)
    if verdict is None:
        gen = torch.Generator().manual_seed(0)
        # 67 entries: vectorized body and scalar tail; values past the GELUs' bends
        probe = (4 * torch.randn(67, generator=gen, dtype=torch.float64)).to(x.dtype)
        probe = probe.to(x.device)
        with torch.no_grad():
            verdict = _VERIFIED[key] = bool(torch.equal(forward(module, probe), rule(probe)[0]))
    return verdict


def fused_forward(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """A forward for ``module`` as one fused first-order function (None: no rule for its class).

    The returned function falls back to the module's own forward for inputs the rule does not
    reproduce bitwise (see the module docstring). Only for passes whose backward goes through
    the output once.

    Example:
        >>> import torch.autograd.forward_ad as fwAD
        >>> from transformers.activations import NewGELUActivation
        >>> act, x = NewGELUActivation(), torch.randn(5, dtype=torch.float64)
        >>> forward = fused_forward(act)
        >>> with fwAD.dual_level():
        ...     y, y_dot = fwAD.unpack_dual(forward(fwAD.make_dual(x, torch.ones_like(x))))
        >>> torch.equal(y, act(x))
        True
        >>> torch.allclose(y_dot, torch.func.vmap(torch.func.grad(act))(x))
        True
    """
    rule = rule_for(type(module))
    if rule is None:
        return None
    original = type(module).forward

    def forward(x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.is_floating_point() and _reproduces(module, rule, x):
            return _FusedElementwise.apply(x, rule)[0]
        return original(module, x)

    return forward
