"""K-FAC against curvlinops (fp64, every case it accepts) and against the explicit definition.

curvlinops' ``KFACLinearOperator`` handles ``nn.Linear`` and ``nn.Conv2d``; transformers'
``Conv1D`` is checked through an ``nn.Linear`` twin with the transposed weight, ``nn.Conv1d``
through an ``nn.Conv2d`` twin with a ``(1, k)`` kernel, and the LM layout with
``ignore_index`` against the factors written out for the output layer.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from curvopt.curvature import EKFACOperator, GGNOperator, KFACOperator

curvlinops = pytest.importorskip("curvlinops")  # the dev extra
EKFACLinearOperator, KFACLinearOperator = (
    curvlinops.EKFACLinearOperator,
    curvlinops.KFACLinearOperator,
)
F64 = torch.float64


def _model(arch: str) -> tuple[nn.Module, list[torch.Tensor]]:
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        xs = [torch.randn(n, 4) for n in (5, 3)]
    elif arch == "seq":  # weight sharing over 6 positions
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        xs = [torch.randn(n, 6, 4) for n in (5, 3)]
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 2, stride=2),
            nn.Flatten(), nn.Linear(8, 3),
        )  # fmt: skip
        xs = [torch.randn(n, 2, 4, 4) for n in (5, 3)]
    return model.double(), [x.double() for x in xs]


def _targets(loss_name: str, outputs: list[torch.Tensor]) -> tuple[nn.Module, list]:
    if loss_name == "ce":
        return nn.CrossEntropyLoss, [torch.randint(0, 3, o.shape[:1]) for o in outputs]
    if loss_name == "mse":
        return nn.MSELoss, [torch.randn_like(o) for o in outputs]
    return nn.BCEWithLogitsLoss, [torch.rand_like(o).round() for o in outputs]


CASES = [
    (arch, loss, fisher, *variant)
    for (arch, loss, fisher), variant in zip(
        itertools.product(
            ["mlp", "seq", "cnn"], ["ce", "mse", "bce"], ["type-2", "mc", "empirical"]
        ),
        itertools.cycle(itertools.product(["mean", "sum"], ["expand", "reduce"], [True, False])),
    )
    if not (arch == "seq" and loss == "ce")  # curvlinops wants (N, C, T) logits: below
]


def _dense(op, d: int) -> torch.Tensor:
    return op @ torch.eye(d, dtype=F64)


@pytest.mark.parametrize(("arch", "loss", "fisher", "reduction", "approx", "separate"), CASES)
def test_matches_curvlinops(arch, loss, fisher, reduction, approx, separate):
    torch.manual_seed(0)
    model, xs = _model(arch)
    with torch.no_grad():
        outputs = [model(x) for x in xs]
    loss_cls, ys = _targets(loss, outputs)
    loss_func = loss_cls(reduction=reduction)
    data, params = list(zip(xs, ys)), list(model.parameters())
    options = dict(fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=separate)
    ref = KFACLinearOperator(model, loss_func, params, data, check_deterministic=False, **options)
    ours = KFACOperator(model, loss_func, params, data, **options)
    d = ours.shape[0]
    torch.testing.assert_close(_dense(ours, d), _dense(ref, d), rtol=1e-10, atol=1e-12)


class LogitsLM(nn.Module):
    """A tiny token model: embedding (frozen), a Linear block, a Linear head; ``.logits``."""

    def __init__(self, vocab: int = 7, hidden: int = 5, permute: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.embed.weight.requires_grad_(False)
        self.block = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.permute = permute

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = torch.tanh(self.block(self.embed(input_ids)))
        logits = self.head(h)
        if self.permute:  # curvlinops' twin: torch's (N, C, T) layout
            return logits.movedim(-1, 1)
        return SimpleNamespace(logits=logits)


def _lm_data(vocab: int = 7, ignore: bool = False):
    torch.manual_seed(3)
    data = []
    for n in (3, 2):
        ids = torch.randint(0, vocab, (n, 4))
        labels = torch.randint(0, vocab, (n, 4))
        if ignore:
            labels[0, :2] = -100
        data.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels))
    return data


@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_language_model_layout_matches_curvlinops(fisher, approx):
    torch.manual_seed(0)
    model = LogitsLM().double()
    twin = LogitsLM(permute=True).double()
    twin.load_state_dict(model.state_dict())
    data = _lm_data()
    loss = nn.CrossEntropyLoss()
    ours = KFACOperator(model, loss, [p for p in model.parameters() if p.requires_grad], data,
                        fisher_type=fisher, kfac_approx=approx)  # fmt: skip
    twin_data = [(X["input_ids"], y) for X, y in data]
    ref = KFACLinearOperator(
        twin, loss, [p for p in twin.parameters() if p.requires_grad], twin_data,
        fisher_type=fisher, kfac_approx=approx, check_deterministic=False,
    )  # fmt: skip
    d = ours.shape[0]
    torch.testing.assert_close(_dense(ours, d), _dense(ref, d), rtol=1e-10, atol=1e-12)


def test_ignore_index_weights_the_head_factors_like_the_other_operators():
    torch.manual_seed(1)
    model = LogitsLM().double()
    data = _lm_data(ignore=True)
    params = [p for p in model.parameters() if p.requires_grad]
    K = KFACOperator(model, nn.CrossEntropyLoss(), params, data, fisher_type="type-2")
    # the head outputs the logits: g for column c is sqrt(p_c) (e_c - p) at valid positions
    hidden, probs, valid = [], [], []
    with torch.no_grad():
        for X, y in data:
            h = torch.tanh(model.block(model.embed(X["input_ids"])))
            hidden.append(h.reshape(-1, h.shape[-1]))
            probs.append(torch.softmax(model.head(h), -1).reshape(-1, 7))
            valid.append((y != -100).reshape(-1))
    H, P, ok = torch.cat(hidden), torch.cat(probs), torch.cat(valid)
    B = sum(torch.diag(p) - torch.outer(p, p) for p in P[ok]) / ok.sum()
    A = H.T @ H / H.shape[0]  # every position feeds the layer, ignored or not
    torch.testing.assert_close(K.gradient_covariances["head"], B)
    torch.testing.assert_close(K.input_covariances["head"], A)
    # the weight block is B V A (row-major flat layout of the (out, in) weight)
    dense = _dense(K, K.shape[0])
    n_block = sum(p.numel() for p in model.block.parameters())
    w = slice(n_block, n_block + 7 * 5)
    torch.testing.assert_close(dense[w, w], torch.kron(B, A))


def _gpt2_conv1d_twins():
    transformers = pytest.importorskip("transformers")
    Conv1D = transformers.pytorch_utils.Conv1D
    torch.manual_seed(2)
    conv = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).double()
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for c, m in zip(conv[::2], lin[::2]):
            m.weight.copy_(c.weight.T)
            m.bias.copy_(c.bias)
    return conv, lin


def _transpose_permutation(shapes_conv: list[tuple[int, ...]]) -> torch.Tensor:
    """Index map: flat Conv1D layout -> flat Linear layout (weights transposed)."""
    idx, start = [], 0
    for shape in shapes_conv:
        n = int(torch.tensor(shape).prod())
        block = torch.arange(start, start + n)
        idx.append(block.reshape(shape).T.reshape(-1) if len(shape) == 2 else block)
        start += n
    return torch.cat(idx).argsort()  # entry a of the Conv1D layout sits at perm[a] in Linear's


@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize(("approx", "separate"), [("expand", True), ("reduce", False)])
def test_transformers_conv1d_equals_its_linear_twin(fisher, approx, separate):
    conv, lin = _gpt2_conv1d_twins()
    data = [(torch.randn(n, 6, 4, dtype=F64), torch.randn(n, 6, 3, dtype=F64)) for n in (4, 3)]
    loss = nn.MSELoss()
    options = dict(fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=separate)
    ours = KFACOperator(conv, loss, list(conv.parameters()), data, **options)
    ref = KFACLinearOperator(lin, loss, list(lin.parameters()), data, check_deterministic=False,
                             **options)  # fmt: skip
    d = ours.shape[0]
    perm = _transpose_permutation([tuple(p.shape) for p in conv.parameters()])
    expected = _dense(ref, d)
    # ours in the Conv1D layout = the Linear one with rows and columns permuted
    torch.testing.assert_close(_dense(ours, d), expected[perm][:, perm], rtol=1e-10, atol=1e-12)


def test_transformers_conv1d_against_the_dense_definition():
    conv, _ = _gpt2_conv1d_twins()
    layer = conv[0]
    X = torch.randn(6, 4, dtype=F64)
    y = torch.randint(0, 5, (6,))
    K = KFACOperator(layer, nn.CrossEntropyLoss(), list(layer.parameters()), [(X, y)],
                     fisher_type="type-2")  # fmt: skip
    with torch.no_grad():
        p = torch.softmax(layer(X), -1)
    A = X.T @ X / 6
    B = sum(torch.diag(q) - torch.outer(q, q) for q in p) / 6
    dense = _dense(K, K.shape[0])
    torch.testing.assert_close(dense[:20, :20], torch.kron(A, B))  # weight (in, out): A V B
    torch.testing.assert_close(dense[20:, 20:], B)
    torch.testing.assert_close(dense[:20, 20:], torch.zeros(20, 5, dtype=F64))


def test_conv1d_equals_its_conv2d_twin():
    torch.manual_seed(4)
    c1 = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(),
                       nn.Linear(9, 2)).double()  # fmt: skip
    c2 = nn.Sequential(nn.Conv2d(2, 3, (1, 3), padding=(0, 1), stride=(1, 2)), nn.Tanh(),
                       nn.Flatten(), nn.Linear(9, 2)).double()  # fmt: skip
    with torch.no_grad():
        c2[0].weight.copy_(c1[0].weight.unsqueeze(2))
        c2[0].bias.copy_(c1[0].bias)
        c2[3].load_state_dict(c1[3].state_dict())
    data = [(torch.randn(n, 2, 6, dtype=F64), torch.randint(0, 2, (n,))) for n in (4, 3)]
    loss = nn.CrossEntropyLoss(reduction="sum")
    ours = KFACOperator(c1, loss, list(c1.parameters()), data, fisher_type="type-2")
    ref = KFACLinearOperator(c2, loss, list(c2.parameters()),
                             [(x.unsqueeze(2), y) for x, y in data], fisher_type="type-2",
                             check_deterministic=False)  # fmt: skip
    d = ours.shape[0]
    torch.testing.assert_close(_dense(ours, d), _dense(ref, d), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("separate", [True, False])
def test_exact_inverse_matches_solve(separate):
    torch.manual_seed(5)
    model, xs = _model("cnn")
    data = [(x, torch.randint(0, 3, (x.shape[0],))) for x in xs]
    K = KFACOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data,
                     fisher_type="type-2", separate_weight_and_bias=separate)  # fmt: skip
    d, delta = K.shape[0], 1e-3
    dense = _dense(K, d)
    B = torch.randn(d, 3, dtype=F64)
    expected = torch.linalg.solve(dense + delta * torch.eye(d, dtype=F64), B)
    inv = K.inverse(damping=delta)
    torch.testing.assert_close(inv @ B, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(inv @ B[:, 0], expected[:, 0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(K.inverse("cg", damping=delta, rtol=1e-12) @ B, expected,
                               rtol=1e-6, atol=1e-8)  # fmt: skip


def test_unsupported_layers_are_named_or_skipped():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Embedding(3, 2), nn.Linear(4, 2))
    model = model.double()
    data = [(torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))]
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"1\.weight.*LayerNorm.*1\.bias.*2\.weight.*Embedding"):
        KFACOperator(model, nn.CrossEntropyLoss(), params, data)
    small = nn.Sequential(model[0], model[1], model[3])
    K = KFACOperator(small, nn.CrossEntropyLoss(), list(small.parameters()), data,
                     allow_unsupported=True, fisher_type="type-2")  # fmt: skip
    assert len(K.skipped) == 2 and all("LayerNorm" in s for s in K.skipped)
    assert K.shape[0] == 3 * 4 + 4 + 4 * 2 + 2  # the two Linear layers only
    assert [tuple(p.shape) for p in K.params] == [(4, 3), (4,), (2, 4), (2,)]
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied weights"):
        KFACOperator(tied, nn.MSELoss(), list(tied.parameters()),
                     [(torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64))])  # fmt: skip


def test_bad_options():
    model = nn.Linear(3, 2)
    args = (model, nn.CrossEntropyLoss(), list(model.parameters()),
            [(torch.randn(4, 3), torch.randint(0, 2, (4,)))])  # fmt: skip
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        KFACOperator(*args, fisher_type="type2")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        KFACOperator(*args, kfac_approx="mean")
    with pytest.raises(ValueError, match="needs fisher_type='mc'"):
        KFACOperator(*args, fisher_type="empirical", mc_samples=2)
    with pytest.raises(ValueError, match="damping must be a positive"):
        KFACOperator(*args).inverse(damping=0.0)
    with pytest.raises(ValueError, match="label_smoothing|likelihood"):
        KFACOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), *args[2:])


# ----------------------------------------------------------------------------------- EK-FAC
EK_CASES = [
    (arch, loss, fisher, *variant)
    for (arch, loss, fisher), variant in zip(
        itertools.product(["mlp", "cnn"], ["ce", "mse", "bce"], ["type-2", "mc", "empirical"]),
        itertools.cycle(itertools.product(["mean", "sum"], ["expand", "reduce"], [True, False])),
    )
]


@pytest.mark.parametrize(("arch", "loss", "fisher", "reduction", "approx", "separate"), EK_CASES)
def test_ekfac_matches_curvlinops(arch, loss, fisher, reduction, approx, separate):
    torch.manual_seed(0)
    model, _ = _model(arch)
    # enough samples for non-singular factors: in a factor's null space the eigenbasis, and
    # with it EK-FAC, is not unique (K-FAC-reduce of a convolution with few samples)
    shape = (4,) if arch == "mlp" else (2, 4, 4)
    xs = [torch.randn(n, *shape, dtype=F64) for n in (20, 15)]
    with torch.no_grad():
        outputs = [model(x) for x in xs]
    loss_cls, ys = _targets(loss, outputs)
    loss_func = loss_cls(reduction=reduction)
    data, params = list(zip(xs, ys)), list(model.parameters())
    options = dict(fisher_type=fisher, kfac_approx=approx, separate_weight_and_bias=separate)
    ref = EKFACLinearOperator(model, loss_func, params, data, check_deterministic=False, **options)
    ours = EKFACOperator(model, loss_func, params, data, **options)
    d = ours.shape[0]
    torch.testing.assert_close(_dense(ours, d), _dense(ref, d), rtol=1e-9, atol=1e-12)


def _kfac_basis(K: KFACOperator, layer: str, transposed: bool = False) -> torch.Tensor:
    QA = torch.linalg.eigh(K.input_covariances[layer]).eigenvectors
    QB = torch.linalg.eigh(K.gradient_covariances[layer]).eigenvectors
    return torch.kron(QA, QB) if transposed else torch.kron(QB, QA)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ekfac_is_the_ggn_diagonal_in_the_kfac_basis(approx):
    # type-2 EK-FAC = Q diag(Q^T C Q) Q^T per weight block, C the exact GGN block, also with
    # weight sharing and ignore_index (the LM layout); basis from the K-FAC factors
    torch.manual_seed(6)
    model = LogitsLM().double()
    data = _lm_data(ignore=True)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.CrossEntropyLoss()
    E = EKFACOperator(model, loss, params, data, fisher_type="type-2", kfac_approx=approx)
    ggn = _dense(GGNOperator(model, loss, params, data), E.shape[0])
    dense = _dense(E, E.shape[0])
    start = 0
    for layer in ("block", "head"):
        module = getattr(model, layer)
        n_w = module.weight.numel()
        w = slice(start, start + n_w)
        Q = _kfac_basis(E, layer)
        expected = Q @ torch.diag((Q.T @ ggn[w, w] @ Q).diagonal()) @ Q.T
        torch.testing.assert_close(dense[w, w], expected, rtol=1e-9, atol=1e-12)
        start += n_w + module.bias.numel()


def test_ekfac_conv1d_and_inverse():
    conv, _ = _gpt2_conv1d_twins()
    data = [(torch.randn(n, 6, 4, dtype=F64), torch.randn(n, 6, 3, dtype=F64)) for n in (4, 3)]
    loss = nn.MSELoss()
    E = EKFACOperator(conv, loss, list(conv.parameters()), data, fisher_type="type-2")
    d = E.shape[0]
    ggn = _dense(GGNOperator(conv, loss, list(conv.parameters()), data), d)
    dense = _dense(E, d)
    Q = _kfac_basis(E, "0", transposed=True)
    w = slice(0, 20)
    expected = Q @ torch.diag((Q.T @ ggn[w, w] @ Q).diagonal()) @ Q.T
    torch.testing.assert_close(dense[w, w], expected, rtol=1e-9, atol=1e-12)
    B = torch.randn(d, 2, dtype=F64)
    solve = torch.linalg.solve(dense + 1e-3 * torch.eye(d, dtype=F64), B)
    torch.testing.assert_close(E.inverse(damping=1e-3) @ B, solve, rtol=1e-8, atol=1e-10)


def test_tiny_gpt2_kfac_and_ekfac():
    pytest.importorskip("transformers")
    from test_language_models import padded_batch, tiny_gpt2

    model = tiny_gpt2()
    gen = torch.Generator().manual_seed(0)
    data = [padded_batch([6, 4, 3], gen), padded_batch([5, 2], gen)]  # dicts, -100 labels
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="tied weights.*Embedding.*LayerNorm"):
        KFACOperator(model, loss, list(model.parameters()), data)
    E = EKFACOperator(model, loss, list(model.parameters()), data, fisher_type="type-2",
                      allow_unsupported=True)  # fmt: skip
    assert {type(b.module).__name__ for b in E._blocks} == {"Conv1D"}
    d = E.shape[0]
    ggn = _dense(GGNOperator(model, loss, E.params, data), d)
    dense = _dense(E, d)
    start = 0
    for b in E._blocks:  # every weight block: the GGN diagonal in the K-FAC basis
        n_w = b.module.weight.numel()
        w = slice(start, start + n_w)
        Q = _kfac_basis(E, b.name, transposed=True)
        expected = Q @ torch.diag((Q.T @ ggn[w, w] @ Q).diagonal()) @ Q.T
        torch.testing.assert_close(dense[w, w], expected, rtol=1e-8, atol=1e-12)
        start += n_w + b.module.bias.numel()
    K = KFACOperator(model, loss, list(model.parameters()), data, fisher_type="mc",
                     allow_unsupported=True)  # fmt: skip
    v = torch.randn(d, dtype=F64)
    x = K.inverse(damping=1e-2) @ v
    torch.testing.assert_close(K @ x + 1e-2 * x, v)


def test_kfac_progressbar(capsys):
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,)))] * 2
    K = KFACOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data, progressbar=True)
    K @ torch.randn(K.shape[0], dtype=F64)
    assert "KFACOperator factors" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("corrected", [False, True])
def test_several_mc_samples_and_another_seed_match_curvlinops(loss, corrected):
    torch.manual_seed(0)
    model, _ = _model("mlp")
    xs = [torch.randn(n, 4, dtype=F64) for n in (20, 15)]
    with torch.no_grad():
        outputs = [model(x) for x in xs]
    loss_cls, ys = _targets(loss, outputs)
    data, params = list(zip(xs, ys)), list(model.parameters())
    ref_cls, cls = (
        (EKFACLinearOperator, EKFACOperator) if corrected else (KFACLinearOperator, KFACOperator)
    )
    options = dict(fisher_type="mc", mc_samples=3, seed=7)
    ref = ref_cls(model, loss_cls(), params, data, check_deterministic=False, **options)
    ours = cls(model, loss_cls(), params, data, **options)
    d = ours.shape[0]
    torch.testing.assert_close(_dense(ours, d), _dense(ref, d), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_a_layer_that_never_runs_has_a_zero_block(cls):
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Unused().double()
    data = [(torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))]
    K = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), data, fisher_type="type-2")
    dense = _dense(K, K.shape[0])
    assert (dense[8:, :] == 0).all() and (dense[:, 8:] == 0).all() and dense[:8, :8].abs().sum() > 0
    x = K.inverse(damping=0.5) @ torch.ones(K.shape[0], dtype=F64)
    torch.testing.assert_close(x[8:], torch.full((8,), 2.0, dtype=F64))


@pytest.mark.parametrize("shape", [(6, 1, 4, 5), (6, 2, 10, 10), (6, 3, 4, 5)])
def test_ekfac_squared_gradient_sum_both_strategies(shape):
    """Gramian rows (T=1, and T=2 with wide layers) and per-sample gradients (T=3, narrow)."""
    from curvopt.curvature.ekfac import _squared_gradient_sum

    n, t, d_out, d_in = shape
    gt, at = torch.randn(n, t, d_out, dtype=F64), torch.randn(n, t, d_in, dtype=F64)
    expected = sum((gt[i].T @ at[i]) ** 2 for i in range(n))
    torch.testing.assert_close(_squared_gradient_sum(gt, at), expected, rtol=1e-12, atol=1e-12)
