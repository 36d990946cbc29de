"""prune(): equality with dense OBS references, exact sparsities, masks, export, bad input."""

import copy

import pytest
import torch
from prune_helpers import tiny_data, tiny_model
from test_obs_math import dense_F, kkt_update
from torch import nn
from torch.func import functional_call, grad, vmap

from curvopt import mfac  # noqa: E402
from curvopt.prune import (
    collect_gradients,
    prunable_weights,
    prune,
    pruned_state_dict,
    remove_masks,
)


def batch_grads(model, data, m):
    """Reference: one gradient per batch with torch.func (independent of collect_gradients)."""
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    params = dict(model.named_parameters())

    def loss(ws, X, y):
        p = {**params, **dict(zip(names, ws))}
        return nn.functional.cross_entropy(functional_call(model, p, (X,)), y)

    rows = []
    for X, y in data[:m]:
        gs = grad(loss)([params[n].detach() for n in names], X, y)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def flat_weights(model):
    return torch.cat([t.module.weight.detach().reshape(-1) for t in prunable_weights(model)])


def test_collect_gradients_matches_torch_func(model, data):
    G = collect_gradients(model, nn.CrossEntropyLoss(), data, prunable_weights(model), 5)
    torch.testing.assert_close(G, batch_grads(model, data, 5))
    # per-sample gradients with vmap as the reference
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())

    def loss(ws, x, y):
        p = {**params, **dict(zip(names, ws))}
        out = functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(out, y[None])

    X, y = data[0]
    ps = vmap(grad(loss), in_dims=(None, 0, 0))([params[n].detach() for n in names], X, y)
    ref = torch.cat([g.reshape(len(y), -1) for g in ps], dim=1)
    G1 = collect_gradients(
        model, nn.CrossEntropyLoss(), data, prunable_weights(model), 4, grad_batch_size=1
    )
    torch.testing.assert_close(G1, ref)


@pytest.mark.parametrize("block_size", [4, 9])
def test_mfac_scores_and_update_equal_dense_obs(model, data, block_size):
    damp = 1e-2
    G = batch_grads(model, data, 6)
    w = flat_weights(model)
    F = dense_F(G, damp, block_size)
    Finv = torch.linalg.inv(F)
    est = mfac.StaticMFAC(G, damp, block_size=block_size)
    torch.testing.assert_close(est.inverse_diagonal(), Finv.diagonal())
    scores = w**2 / (2 * Finv.diagonal())
    k = int(round(0.5 * w.numel()))
    Q = torch.argsort(scores)[:k]
    expected = w + kkt_update(F, w, Q)
    pruned = copy.deepcopy(model)
    rep = prune(
        pruned,
        nn.CrossEntropyLoss(),
        data,
        0.5,
        num_grads=6,
        block_size=block_size,
        damp=damp,
        damp_mode="absolute",
        steps=1,
    )
    assert rep.update == ["multi"]
    torch.testing.assert_close(flat_weights(pruned), expected)


def test_mfac_diagonal_update_equals_dense_formula(model, data):
    damp = 1e-2
    G = batch_grads(model, data, 6)
    w = flat_weights(model)
    Finv = torch.linalg.inv(dense_F(G, damp, 8))
    Q = torch.argsort(w**2 / (2 * Finv.diagonal()))[:10]
    v = torch.zeros_like(w)
    v[Q] = w[Q] / Finv.diagonal()[Q]
    expected = w - Finv @ v
    expected[Q] = 0.0
    pruned = copy.deepcopy(model)
    prune(
        pruned,
        nn.CrossEntropyLoss(),
        data,
        10 / w.numel(),
        num_grads=6,
        block_size=8,
        damp=damp,
        damp_mode="absolute",
        update="diagonal",
        steps=1,
    )
    torch.testing.assert_close(flat_weights(pruned), expected)


@pytest.mark.parametrize("steps", [1, 3])
def test_full_block_mfac_equals_exact_obs(model, data, steps):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    d = sum(t.param.numel() for t in prunable_weights(model))
    kw = dict(num_grads=6, damp=1e-3, steps=steps)
    prune(a, nn.CrossEntropyLoss(), data, 0.6, method="mfac", block_size=d, **kw)
    prune(b, nn.CrossEntropyLoss(), data, 0.6, method="obs", **kw)
    torch.testing.assert_close(flat_weights(a), flat_weights(b))


def test_relative_damping_scales_with_gradients(model, data):
    rep = prune(
        copy.deepcopy(model), nn.CrossEntropyLoss(), data, 0.3, num_grads=6, damp=0.1, steps=1
    )
    G = batch_grads(model, data, 6)
    torch.testing.assert_close(rep.damp[0], 0.1 * float((G.detach() ** 2).sum(0).mean() / 6))


@pytest.mark.parametrize("method", ["mfac", "obs", "magnitude"])
@pytest.mark.parametrize("steps", [1, 4])
def test_global_sparsity_is_exact(model, data, method, steps):
    rep = prune(model, nn.CrossEntropyLoss(), data, 0.7, method=method, steps=steps, num_grads=6)
    d = sum(layer.numel for layer in rep.layers)
    assert rep.sparsity == pytest.approx(round(0.7 * d) / d)
    assert rep.steps[-1] == pytest.approx(rep.sparsity)
    assert all(a < b for a, b in zip(rep.steps, rep.steps[1:]))
    w = flat_weights(model)
    assert int((w == 0).sum()) == round(0.7 * d)


def test_layer_scope_sparsity_per_layer(model, data):
    rep = prune(
        model,
        nn.CrossEntropyLoss(),
        data,
        {"0.weight": 0.5, "2": 0.8},
        scope="layer",
        num_grads=6,
        steps=2,
    )
    assert [layer.zeros for layer in rep.layers] == [15, round(0.8 * 18)]
    rep = prune(model, nn.CrossEntropyLoss(), data, 0.9, scope="layer", num_grads=6, steps=3)
    assert [layer.zeros for layer in rep.layers] == [27, round(0.9 * 18)]


def test_masks_survive_training_and_export(model, data):
    prune(model, nn.CrossEntropyLoss(), data, 0.6, num_grads=6, steps=2)
    zeros = [t.module.weight.detach() == 0 for t in prunable_weights(model)]
    opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    for X, y in data * 3:
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    for z, t in zip(zeros, prunable_weights(model)):
        w = t.module.weight.detach()
        assert bool((w[z] == 0).all())
        assert bool((w[~z] != 0).all())
    sd = pruned_state_dict(model)
    assert set(sd) == set(tiny_model().state_dict())
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(sd)
    X = data[0][0]
    torch.testing.assert_close(fresh(X), model(X))
    remove_masks(model)
    assert set(model.state_dict()) == set(sd)
    torch.testing.assert_close(model(X), fresh(X))


def test_pruning_a_pruned_model_keeps_old_zeros(model, data):
    prune(model, nn.CrossEntropyLoss(), data, 0.4, method="magnitude")
    before = flat_weights(model) == 0
    rep = prune(model, nn.CrossEntropyLoss(), data, 0.8, num_grads=6, steps=2)
    after = flat_weights(model) == 0
    assert bool(after[before].all())
    assert rep.sparsity == pytest.approx(round(0.8 * 48) / 48)


def test_selected_layers_only(model, data):
    rep = prune(model, nn.CrossEntropyLoss(), data, 0.5, names=["2"], num_grads=6, steps=1)
    assert [layer.name for layer in rep.layers] == ["2.weight"]
    assert int((model[0].weight == 0).sum()) == 0


def test_bad_input(model, data):
    loss = nn.CrossEntropyLoss()
    for s in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            prune(model, loss, data, s)
    with pytest.raises(ValueError, match="prunable"):
        prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), loss, data, 0.5)
    with pytest.raises(ValueError, match="no batches"):
        prune(model, loss, [], 0.5)
    with pytest.raises(ValueError, match="no batches"):
        prune(model, loss, iter(()), 0.5, method="obs", steps=1)
    with pytest.raises(ValueError, match="read only once"):
        prune(model, loss, iter(data), 0.5, steps=2)
    with pytest.raises(ValueError, match="method"):
        prune(model, loss, data, 0.5, method="random")
    with pytest.raises(ValueError, match="scope"):
        prune(model, loss, data, 0.5, scope="row")
    with pytest.raises(ValueError, match="damp"):
        prune(model, loss, data, 0.5, damp=0.0)
    with pytest.raises(ValueError, match="steps"):
        prune(model, loss, data, 0.5, steps=0)
    with pytest.raises(ValueError, match="unknown layers"):
        prune(model, loss, data, {"nope": 0.5}, scope="layer")
    with pytest.raises(ValueError, match="loss_func"):
        prune(model, None, None, 0.5)


def test_short_loader_warns_and_uses_what_it_has():
    model, data = tiny_model(), tiny_data(n=8, batch=4)
    with pytest.warns(UserWarning, match="only 2"):
        rep = prune(model, nn.CrossEntropyLoss(), data, 0.5, num_grads=64, steps=2)
    assert rep.sparsity == pytest.approx(round(0.5 * 48) / 48)


def test_auto_update_falls_back_to_diagonal_beyond_budget(model, data):
    rep = prune(model, nn.CrossEntropyLoss(), data, 0.5, num_grads=6, steps=2, multi_budget=1)
    assert rep.update == ["diagonal", "diagonal"]
    rep = prune(tiny_model(), nn.CrossEntropyLoss(), data, 0.5, num_grads=6, steps=2)
    assert rep.update == ["multi", "multi"]


def test_normalized_global_scores_reach_target(model, data):
    rep = prune(model, nn.CrossEntropyLoss(), data, 0.6, num_grads=6, steps=2, normalize=True)
    assert rep.sparsity == pytest.approx(round(0.6 * 48) / 48)


def test_default_prunable_layers_of_a_cnn():
    from curvopt.prune.zoo import SmallCNN

    net = nn.Sequential(SmallCNN(8, 10), nn.BatchNorm1d(10))
    names = [t.qualified_name for t in prunable_weights(net)]
    assert names == ["0.features.0.weight", "0.features.2.weight", "0.head.weight"]
    only = prunable_weights(net, layer_types=[nn.Conv2d])
    assert [t.qualified_name for t in only] == names[:2]
