r"""Where reverse-over-forward Hessian products can be trusted: an allow-list of ATen operators.

A reverse-over-forward Hessian-vector product runs the model once with dual numbers (the
tangent ``J v`` comes from each operator's forward-mode derivative formula) and then
backpropagates through that computation, i.e. through the forward-mode formulas themselves:

$$
H v = \nabla_\theta \big( \nabla_f \ell(f)^\top \, \dot f(\theta; v) \big),
\qquad \dot f(\theta; v) = J_\theta f \, v .
$$

That is exact only if every forward-mode formula is itself differentiated correctly. In
PyTorch 2.13 it is not for the normalizations that go through ``aten.native_layer_norm``
(``nn.LayerNorm``, ``F.layer_norm``) or through ``aten.native_batch_norm`` with batch
statistics (``nn.InstanceNorm1d/2d/3d`` in any mode, batch norm in training mode): the products
come out wrong by tens of percent without any error (pytorch issues #196699, #196700).

So the Hessian operator's default mode uses reverse-over-forward only for models whose forward
pass, recorded once at the ATen level (`record_ops`), calls nothing but the operators in
`SAFE_OPS` (elementwise math, matrix products, convolutions, pooling, softmax, embeddings,
group norm, batch norm with running statistics, shape and creation operators), each covered by
``tests/curvature/test_forward_ad_safety.py`` or ``test_dual_arithmetic.py`` against a plain
double-backward truth. Anything else, including custom kernels, falls back to
reverse-over-reverse, which is always right.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

#: ATen operator packets whose forward-mode derivative torch differentiates correctly.
SAFE_OPS: frozenset[str] = frozenset(
    f"aten.{name}"
    for name in (
        # elementwise math
        "abs add add_ addcmul addcdiv clamp clamp_min clamp_max cos div div_ elu erf exp expm1 "
        "gelu hardtanh leaky_relu log log1p log_sigmoid_forward maximum minimum mish mul mul_ "
        "neg pow reciprocal relu relu_ rsqrt rsub sigmoid silu sin softplus sqrt square sub sub_ "
        "tanh where sign hardswish hardsigmoid"
        # reductions and normalizing maps
        " sum mean amax amin logsumexp _softmax _log_softmax softmax log_softmax"
        # products
        " mm addmm bmm baddbmm matmul dot mv linear convolution embedding"
        # pooling
        " max_pool1d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d "
        "avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool2d"
        # normalizations known to be right (batch norm only with running statistics, below)
        " native_group_norm _native_batch_norm_legit_no_training"
        # shapes, indexing, copies
        " view _unsafe_view reshape t transpose permute expand unsqueeze squeeze slice select "
        "cat stack split split_with_sizes chunk unbind narrow clone contiguous alias detach "
        "flatten repeat gather index_select index masked_fill constant_pad_nd _to_copy copy_ "
        "unfold col2im im2col"
        # creation and comparisons (no derivative)
        " zeros ones empty full arange scalar_tensor lift_fresh lift_fresh_copy zeros_like "
        "ones_like empty_like full_like new_zeros new_ones new_empty new_full fill_ zero_ "
        "le lt ge gt eq ne logical_not logical_and logical_or bitwise_not bitwise_and "
        "bitwise_or argmax argmin _local_scalar_dense"
    ).split()
)

#: Why the best-known unsafe operators are excluded (for the error and debugging messages).
KNOWN_UNSAFE: dict[str, str] = {
    "aten.native_layer_norm": "nn.LayerNorm / F.layer_norm (pytorch #196699)",
    "aten.native_batch_norm(training=True)": (
        "batch statistics: InstanceNorm, or BatchNorm in training mode (pytorch #196700)"
    ),
}


class _Recorder(TorchDispatchMode):
    """Collect the ATen operators a computation dispatches (batch norm with its mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = str(func.overloadpacket)
        if name in ("aten.native_batch_norm", "aten._native_batch_norm_legit"):
            training = _batch_norm_training(func, args, kwargs or {})
            name = f"aten.native_batch_norm(training={training})"
        self.ops.add(name)
        return func(*args, **(kwargs or {}))


def _batch_norm_training(func: Any, args: tuple, kwargs: dict) -> bool:
    """The ``training`` argument of a batch-norm ATen call (True when it cannot be read)."""
    names = [a.name for a in func._schema.arguments]
    if "training" not in names:
        return True
    position = names.index("training")
    value = args[position] if position < len(args) else kwargs.get("training", True)
    return bool(value)


def record_ops(fn: Any, *args: Any, **kwargs: Any) -> set[str]:
    """Run ``fn(*args, **kwargs)`` once and return the ATen operators it called.

    Batch norm appears as ``"aten.native_batch_norm(training=...)"``, since only its
    running-statistics form is safe.

    Example:
        >>> ops = record_ops(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), torch.randn(4, 3))
        >>> {"aten.addmm", "aten.tanh"} <= ops
        True
    """
    recorder = _Recorder()
    with recorder:
        fn(*args, **kwargs)
    return recorder.ops


def unsafe_ops(ops: set[str]) -> list[str]:
    """The recorded operators outside the allow-list, sorted, with the reason where known.

    Example:
        >>> unsafe_ops({"aten.addmm", "aten.native_layer_norm"})
        ['aten.native_layer_norm (nn.LayerNorm / F.layer_norm (pytorch #196699))']
    """
    out = []
    for op in sorted(ops):
        if op in SAFE_OPS or op == "aten.native_batch_norm(training=False)":
            continue
        why = KNOWN_UNSAFE.get(op)
        out.append(f"{op} ({why})" if why else op)
    return out


def module_signature(model: nn.Module) -> tuple:
    """Identity, type and mode of every submodule: the key under which a verdict is cached."""
    return tuple((id(m), type(m), m.training) for m in model.modules())


def reverse_over_forward_safe(forward: Any, *args: Any) -> tuple[bool, list[str]]:
    """Record one forward pass; return whether reverse-over-forward is safe and the offenders.

    The pass runs with autograd enabled (as the products do); its graph is dropped.
    """
    with torch.enable_grad():
        ops = record_ops(forward, *args)
    bad = unsafe_ops(ops)
    return not bad, bad
