"""Hessian products through every torch normalization, in every mode, against double backward.

PyTorch 2.13 differentiates the forward-mode formulas of layer norm and of batch statistics
wrongly (pytorch #196699, #196700); reverse-over-forward is used only for allow-listed
operators (`curvopt.curvature.forward_ad`). The truth here is plain ``torch.autograd.grad``
twice, never ``torch.func`` (whose ``hessian`` is wrong for these layers too).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvopt.curvature import GGNOperator, HessianOperator
from curvopt.curvature.forward_ad import SAFE_OPS, record_ops, unsafe_ops
from curvopt.curvature.train_mode import preserved_buffers

MODES = ("auto", "reverse-over-forward", "reverse-over-reverse", "forward-over-reverse")
TOL = dict(rtol=1e-9, atol=1e-11)


class FunctionalLayerNorm(nn.Module):
    """``F.layer_norm`` in a custom module's forward (invisible to a module-type check)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(n))
        self.bias = nn.Parameter(0.3 * torch.randn(n))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class PlainLayerNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:])


class Channels(nn.Module):
    """Apply a channel-wise norm to ``(N, F)`` features viewed as ``(N, C, F/C)`` or images."""

    def __init__(self, norm: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.norm, self.shape = norm, shape

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.reshape(x.shape[0], *self.shape)).reshape(x.shape[0], -1)


def _affine(norm: nn.Module) -> nn.Module:
    """Random (non-identity) affine parameters so their curvature blocks are generic."""
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return norm


NORMS = {
    "LayerNorm": lambda: _affine(nn.LayerNorm(8)),
    "F.layer_norm": lambda: FunctionalLayerNorm(8),
    "RMSNorm": lambda: _affine(nn.RMSNorm(8)),
    "GroupNorm": lambda: _affine(nn.GroupNorm(2, 8)),
    "InstanceNorm1d": lambda: Channels(_affine(nn.InstanceNorm1d(2, affine=True)), (2, 4)),
    "InstanceNorm1d-running": lambda: Channels(
        _affine(nn.InstanceNorm1d(2, affine=True, track_running_stats=True)), (2, 4)
    ),
    "InstanceNorm2d": lambda: Channels(_affine(nn.InstanceNorm2d(2, affine=True)), (2, 2, 2)),
    "BatchNorm1d-eval": lambda: _affine(nn.BatchNorm1d(8)),
    "BatchNorm1d-train": lambda: _affine(nn.BatchNorm1d(8)),
}


def _problem(norm: str, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), NORMS[norm](), nn.Tanh(), nn.Linear(8, 3)).double()
    train = norm.endswith("-train")
    model.train(train)
    if norm == "BatchNorm1d-eval":  # non-trivial running statistics
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    data = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 4)]
    return model, nn.CrossEntropyLoss(), data, train


def _double_backward(model: nn.Module, loss: nn.Module, data, V: Tensor) -> Tensor:
    """``H V`` of the whole-data risk, by ``autograd.grad`` of ``grad . v`` per column."""
    params = list(model.parameters())
    total = sum(y.numel() for _, y in data)
    out = torch.zeros_like(V)
    with preserved_buffers(model):
        for X, y in data:
            g = torch.autograd.grad(loss(model(X), y), params, create_graph=True)
            g = torch.cat([t.reshape(-1) for t in g])
            for j in range(V.shape[1]):
                hv = torch.autograd.grad(g @ V[:, j], params, retain_graph=True)
                out[:, j] += y.numel() / total * torch.cat([t.reshape(-1) for t in hv])
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", list(NORMS))
def test_hessian_products_through_normalizations(norm, mode):
    model, loss, data, train = _problem(norm, seed=zlib.crc32(f"{norm}/{mode}".encode()) % 1000)
    H = HessianOperator(model, loss, list(model.parameters()), data, mode=mode,
                        allow_train_mode=train)  # fmt: skip
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    expected = _double_backward(model, loss, data, V)
    torch.testing.assert_close(H @ V[:, 0], expected[:, 0], **TOL)
    torch.testing.assert_close(H @ V, expected, **TOL)
    if mode in ("auto", "reverse-over-forward"):
        safe, bad = H.forward_ad_safe
        # eval-mode instance norm with running statistics normalizes like eval batch norm
        batch_stats = "Instance" in norm and not norm.endswith("-running")
        unsafe = norm in ("LayerNorm", "F.layer_norm") or batch_stats or train
        assert safe is not unsafe and bool(bad) is unsafe


@pytest.mark.parametrize("norm", ["LayerNorm", "F.layer_norm", "InstanceNorm1d", "GroupNorm"])
def test_ggn_through_normalizations(norm):
    # the output-space operators only need first derivatives from forward-mode AD
    model, loss, data, _ = _problem(norm, seed=3)
    G = GGNOperator(model, loss, list(model.parameters()), data)
    params = list(model.parameters())
    total = sum(y.numel() for _, y in data)
    V = torch.randn(G.shape[0], 2, dtype=torch.float64)
    expected = torch.zeros_like(V)
    for X, _ in data:
        out = model(X)
        rows = [torch.autograd.grad(o, params, retain_graph=True) for o in out.reshape(-1)]
        J = torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])
        p = torch.softmax(out.detach(), 1)
        M = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
        expected += J.T @ M @ J @ V / total
    torch.testing.assert_close(G @ V, expected, **TOL)
    torch.testing.assert_close(G @ V[:, 1], expected[:, 1], **TOL)


def test_allow_listed_model_keeps_the_fast_path_and_is_right():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2),
        nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 6), nn.Softplus(),
        nn.Linear(6, 3), nn.LogSoftmax(dim=1),
    ).double()  # fmt: skip
    loss = nn.NLLLoss()
    data = [(torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    H = HessianOperator(model, loss, list(model.parameters()), data)
    v = torch.randn(H.shape[0], 1, dtype=torch.float64)
    torch.testing.assert_close(H @ v, _double_backward(model, loss, data, v), **TOL)
    assert H.forward_ad_safe == (True, [])


def test_verdict_is_renewed_when_the_model_changes():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.Tanh(), nn.Linear(4, 2)).double()
    loss, data = nn.MSELoss(), [(torch.randn(5, 3).double(), torch.randn(5, 2).double())]
    H = HessianOperator(model, loss, list(model.parameters()), data)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v
    assert H.forward_ad_safe == (True, [])
    model[1] = PlainLayerNorm()  # a new module: the same operator checks again
    torch.testing.assert_close(H @ v, _double_backward(model, loss, data, v[:, None])[:, 0], **TOL)
    assert H.forward_ad_safe[0] is False


def test_recorder_and_allow_list():
    assert "aten.native_layer_norm" not in SAFE_OPS
    ops = record_ops(nn.BatchNorm1d(3).train(), torch.randn(4, 3))
    assert "aten.native_batch_norm(training=True)" in ops
    assert unsafe_ops(ops)
    assert not unsafe_ops(record_ops(nn.BatchNorm1d(3).eval(), torch.randn(4, 3)))
    assert unsafe_ops({"aten.my_custom_kernel"}) == ["aten.my_custom_kernel"]
