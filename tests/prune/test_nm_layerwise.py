"""N:M patterns and layer-wise OBS, checked in float64 against independent dense solutions."""

import copy

import pytest
import torch
from torch import nn

from curvopt.prune import collect_gradients, prunable_weights, prune
from curvopt.prune.patterns import group_index, parse_pattern


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` in miniature: weight ``(in, out)``, ``y = x @ W + b``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def gpt_like(seed=0):
    """Linear (rows along dim 1) and Conv1D (rows along dim 0), both with 8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), Conv1D(4, 8)).double()


def data(n=32, batch=4, d_in=8, classes=3, seed=1):
    """Correlated inputs (so that the layer Hessians are far from a multiple of I)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix
    y = torch.randint(0, classes, (n,), generator=g)
    return [(X[s : s + batch], y[s : s + batch]) for s in range(0, n, batch)]


def rows_view(t):
    """Effective weight as ``(out, in)`` rows."""
    w = getattr(t.module, t.attr).detach()
    return w.T if isinstance(t.module, Conv1D) else w


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ patterns
def test_group_index_along_the_input_dimension():
    assert group_index((2, 4), 1, 2).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_index((4, 2), 0, 2).tolist() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    conv = group_index((1, 4, 1, 2), 1, 4)  # (out, in, kh, kw): input channels at each position
    assert conv.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize(
    "pattern, sparsity, error, match",
    [
        ("2-4", 0.5, ValueError, "look like 'n:m'"),
        ("2:4:8", 0.5, ValueError, "look like"),
        ("a:4", 0.5, ValueError, "look like"),
        ("4:4", 0.0, ValueError, "n < m"),
        ("5:4", 0.5, ValueError, "n < m"),
        ("0:4", 0.5, ValueError, "1 <= n"),
        ("2:4", 0.6, ValueError, "disagrees"),
        ("1:4", 0.5, ValueError, "0.75"),
        ("2:4", {"0": 0.5}, ValueError, "fixes the sparsity"),
        (24, 0.5, TypeError, "string"),
    ],
)
def test_bad_patterns_are_clear_errors_and_leave_the_model_unchanged(
    pattern, sparsity, error, match
):
    model = mlp()
    before = state(model)
    with pytest.raises(error, match=match):
        prune(model, nn.CrossEntropyLoss(), data(), sparsity, method="mfac", pattern=pattern)
    assert same_state(before, state(model))
    with pytest.raises(error, match=match):
        parse_pattern(pattern, sparsity)


@pytest.mark.parametrize("method", ["magnitude", "mfac", "layerwise"])
def test_a_layer_the_pattern_cannot_tile_is_refused_before_anything_changes(method):
    model = mlp()  # second layer: rows of 6 inputs, 4 does not divide them
    before = state(model)
    with pytest.raises(ValueError, match=r"2\.weight.*row length 6.*m=4"):
        prune(model, nn.CrossEntropyLoss(), data(), 0.5, method=method, pattern="2:4")
    assert same_state(before, state(model))
    prune(model, nn.CrossEntropyLoss(), data(), 0.5, method=method, pattern="2:4", names=["0"])


@pytest.mark.parametrize("steps", [1, 3])
def test_magnitude_nm_keeps_the_n_largest_of_every_group(steps):
    model = gpt_like()
    targets = prunable_weights(model, layer_types=(nn.Linear, Conv1D))
    dense = [rows_view(t).clone() for t in targets]
    report = prune(
        model, None, None, 0.5, method="magnitude", pattern="2:4", steps=steps,
        layer_types=(nn.Linear, Conv1D),
    )  # fmt: skip
    assert report.pattern == "2:4" and report.sparsity == 0.5
    for t, w0 in zip(targets, dense):
        w = rows_view(t)
        groups0, groups = w0.reshape(-1, 4), w.reshape(-1, 4)
        keep = groups0.abs().topk(2, dim=1).indices
        expected = torch.zeros_like(groups0).scatter(1, keep, groups0.gather(1, keep))
        assert torch.equal(groups, expected), t.qualified_name
        mask = t.mask.T if isinstance(t.module, Conv1D) else t.mask
        assert torch.equal(mask, (w != 0).to(mask.dtype))


def kkt_solution(F, w, removed):
    """``argmin_v (v - w)^T F (v - w) s.t. v[removed] = 0``, by the reduced system on the rest."""
    keep = ~removed
    v = torch.zeros_like(w)
    rhs = (F @ w)[keep]
    v[keep] = torch.linalg.solve(F[keep][:, keep], rhs)
    return v


def test_obs_nm_is_the_dense_constrained_minimum_of_the_quadratic_model():
    """2:4 with the exact dense Fisher: scores select per group, the update solves the QP."""
    model = gpt_like()
    calib = data()
    types = (nn.Linear, Conv1D)
    targets = prunable_weights(model, layer_types=types)
    G = collect_gradients(model, nn.CrossEntropyLoss(), calib, targets, 16, 2)
    m = G.shape[0]
    gram = G.T @ G / m
    lam = 0.5 * float(torch.diagonal(gram).mean())
    F = lam * torch.eye(G.shape[1], dtype=torch.float64) + gram
    w0 = torch.cat([t.module.weight.detach().reshape(-1) for t in targets])
    # independent selection: per group of 4 consecutive inputs, the 2 lowest w^2 / [F^-1]_qq
    scores = w0**2 / torch.diagonal(torch.linalg.inv(F))
    removed = torch.zeros_like(w0, dtype=torch.bool)
    offset = 0
    for t in targets:
        flat = torch.arange(t.param.numel()).reshape(t.param.shape)
        rows = flat.T if isinstance(t.module, Conv1D) else flat
        for g in rows.reshape(-1, 4):
            removed[offset + g[torch.argsort(scores[offset + g], stable=True)[:2]]] = True
        offset += t.param.numel()
    expected = kkt_solution(F, w0, removed)

    report = prune(
        model, nn.CrossEntropyLoss(), calib, 0.5, method="obs", num_grads=16, grad_batch_size=2,
        damp=0.5, steps=1, update="multi", pattern="2:4", layer_types=types,
    )  # fmt: skip
    got = torch.cat([t.module.weight.detach().reshape(-1) for t in targets])
    assert report.update == ["multi"]
    assert torch.equal(got == 0, removed)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-11)


def test_mfac_and_layerwise_nm_in_several_steps_reach_the_pattern_and_beat_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    calib = data(n=128, batch=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        for X, y in calib:
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    losses = {}
    for method in ("magnitude", "mfac", "layerwise"):
        m = copy.deepcopy(model)
        report = prune(m, nn.CrossEntropyLoss(), calib, 0.5, method=method, pattern="2:4",
                       steps=4, num_grads=128, grad_batch_size=1, block_size=None)  # fmt: skip
        for t in prunable_weights(m):
            assert int((rows_view(t).reshape(-1, 4) != 0).sum(1).max()) <= 2
        assert report.sparsity == 0.5
        with torch.no_grad():
            losses[method] = sum(float(nn.functional.cross_entropy(m(X), y)) for X, y in calib)
    # measured: magnitude 30.9, M-FAC 29.6 (per-sample empirical Fisher), layer-wise 14.6
    assert losses["mfac"] < losses["magnitude"] and losses["layerwise"] < losses["mfac"]


# ------------------------------------------------------------------------ layer-wise OBS
def layer_inputs(model, module, calib):
    xs = []
    h = module.register_forward_hook(lambda mod, inp, out: xs.append(inp[0].detach()))
    with torch.no_grad():
        for X, _ in calib:
            model(X)
    h.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    return X  # (N, in)


def layer_reference(model, calib, types, damp, removed_of):
    """Per layer: H = 2 X^T X / N + damp * mean(diag) I; every row solved as a constrained QP."""
    out = {}
    for t in prunable_weights(model, layer_types=types):
        X = layer_inputs(model, t.module, calib)
        H = 2 * X.T @ X / X.shape[0]
        H = H + damp * float(torch.diagonal(H).mean()) * torch.eye(H.shape[0], dtype=H.dtype)
        W = rows_view(t).clone()
        removed = removed_of(W, torch.diagonal(torch.linalg.inv(H)))
        out[t.qualified_name] = torch.stack(
            [kkt_solution(H, W[r], removed[r]) for r in range(W.shape[0])]
        )
    return out


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_layerwise_is_the_exact_per_row_reconstruction_solution(pattern):
    model = gpt_like()
    calib = data(n=40, batch=8)
    types = (nn.Linear, Conv1D)

    def removed_of(W, inv_diag):  # lowest w^2 / [H^-1]_qq: half of each layer, or 2 of 4
        scores = W**2 / inv_diag
        if pattern is None:
            flat = torch.zeros(W.numel(), dtype=torch.bool)
            flat[torch.argsort(scores.reshape(-1), stable=True)[: W.numel() // 2]] = True
            return flat.reshape(W.shape)
        out = torch.zeros_like(W, dtype=torch.bool)
        g = torch.argsort(scores.reshape(W.shape[0], -1, 4), dim=2, stable=True)[:, :, :2]
        return out.reshape(W.shape[0], -1, 4).scatter(2, g, True).reshape(W.shape)

    # one step: both layers' Hessians come from the dense model's inputs, as in the reference
    expected = layer_reference(model, calib, types, 0.05, removed_of)
    report = prune(model, nn.CrossEntropyLoss(), calib, 0.5, method="layerwise", scope="layer",
                   steps=1, damp=0.05, pattern=pattern, layer_types=types)  # fmt: skip
    assert report.update == ["multi"] and report.sparsity == 0.5
    for t in prunable_weights(model, layer_types=types):
        got = rows_view(t)
        ref = expected[t.qualified_name]
        assert torch.equal(got == 0, ref == 0), t.qualified_name
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-11), t.qualified_name


def test_layerwise_beats_magnitude_on_the_reconstruction_error():
    model = gpt_like()
    calib = data(n=64, batch=8)
    types = (nn.Linear, Conv1D)
    lin = model[0]
    X = layer_inputs(model, lin, calib)
    dense = lin(X).detach()
    errs = {}
    for method in ("magnitude", "layerwise"):
        m = copy.deepcopy(model)
        prune(m, None, calib, 0.5, method=method, scope="layer", steps=2, layer_types=types)
        errs[method] = float((m[0](X) - dense).pow(2).sum())
    assert errs["layerwise"] < 0.5 * errs["magnitude"]


def test_layerwise_refuses_what_it_cannot_do_and_leaves_the_model_unchanged():
    model = mlp()
    before = state(model)
    with pytest.raises(ValueError, match="scope='layer'"):
        prune(model, nn.CrossEntropyLoss(), data(), 0.5, method="layerwise")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match="2-D weight"):
        prune(conv, None, [(torch.randn(2, 1, 4, 4), None)], 0.5, method="layerwise",
              scope="layer")  # fmt: skip
    with pytest.raises(ValueError, match="no batches"):
        prune(model, None, [], 0.5, method="layerwise", scope="layer")
    assert same_state(before, state(model))


@pytest.mark.parametrize("method", ["mfac", "layerwise"])
def test_calibration_data_without_valid_tokens_is_an_error_and_the_model_unchanged(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 10))
    model = model.double()

    def lm_loss(logits, y):
        return nn.functional.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), ignore_index=-100)

    tokens = torch.randint(0, 10, (4, 6))
    calib = [(tokens, torch.full((4, 6), -100))]  # every target ignored
    before = state(model)
    with pytest.raises(ValueError, match="not finite"):
        prune(model, lm_loss, calib, 0.5, method=method, scope="layer", pattern="2:4",
              num_grads=2, steps=2)  # fmt: skip
    assert same_state(before, state(model))


def test_bf16_gradients_prune_a_float32_model_and_a_bad_dtype_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    calib = [(X.float(), y) for X, y in data()]
    before = state(model)
    with pytest.raises(TypeError, match="grad_dtype"):
        prune(model, nn.CrossEntropyLoss(), calib, 0.5, grad_dtype=torch.int8)
    assert same_state(before, state(model))
    report = prune(model, nn.CrossEntropyLoss(), calib, 0.5, pattern="2:4", num_grads=8,
                   grad_batch_size=4, steps=2, grad_dtype=torch.bfloat16)  # fmt: skip
    assert report.sparsity == 0.5 and all(torch.isfinite(p).all() for p in model.parameters())


def test_nm_select_prunes_the_lowest_earlier_on_ties_and_keeps_pruned_entries_pruned():
    from curvopt.prune.patterns import nm_select

    groups = torch.arange(8).reshape(2, 4)
    alive = torch.ones(8, dtype=torch.bool)
    ties = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.5, 0.5, 3.0])
    got = nm_select(ties, alive, groups, 2)  # ties: the earlier entries of the group
    assert got.tolist() == [True, True, False, False, False, True, True, False]
    # three entries of the first group already pruned, k = 2: all three stay pruned
    alive = torch.tensor([False, True, False, False, True, True, True, True])
    got = nm_select(torch.arange(8.0), alive, groups, 2)
    assert got.tolist() == [True, False, True, True, True, True, False, False]


def test_layer_hessians_are_2_x_xt_over_n_plus_the_damping():
    from curvopt.prune.layerwise import layer_hessians

    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    data = [(X[:6], torch.zeros(6)), (X[6:], torch.zeros(4))]
    for relative, damp in ((False, 0.3), (True, 0.01)):
        inv = layer_hessians(lin, prunable_weights(lin), data, None, damp=damp, relative=relative)
        H = 2 * X.T @ X / 10
        lam = damp * float(H.diagonal().mean()) if relative else damp
        assert inv.damps == [pytest.approx(lam, rel=1e-12)]
        want = torch.linalg.inv(H + lam * torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(inv.inverses[0], want, rtol=1e-10, atol=1e-12)
    # inputs that are all zero: mean(diag H) = 0, so the damping is damp itself (invertible)
    zero = [(torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5))]
    inv = layer_hessians(lin, prunable_weights(lin), zero, None, damp=0.5)
    assert inv.damps == [0.5]
    torch.testing.assert_close(inv.inverses[0], 2 * torch.eye(4, dtype=torch.float64))
