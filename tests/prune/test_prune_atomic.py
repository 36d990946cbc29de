"""prune is all or nothing: on any error the model is exactly as before, and bad input is named."""

import math

import pytest
import torch
from prune_helpers import tiny_data, tiny_model
from torch import nn
from torch.nn.utils import parametrize

from curvopt.prune import prune


def fingerprint(model):
    """Everything prune could change: structure, parameter objects and order, values, flags."""
    return {
        "classes": [type(m) for m in model.modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, id(b)) for n, b in model.named_buffers()],
        "state": [(k, v.detach().clone()) for k, v in model.state_dict().items()],
        "parametrized": [parametrize.is_parametrized(m) for m in model.modules()],
    }


def assert_unchanged(model, before):
    after = fingerprint(model)
    assert after["classes"] == before["classes"]
    assert after["params"] == before["params"]
    assert after["buffers"] == before["buffers"]
    assert after["parametrized"] == before["parametrized"]
    assert [k for k, _ in after["state"]] == [k for k, _ in before["state"]]
    for (k, a), (_, b) in zip(after["state"], before["state"]):
        assert torch.equal(a, b), k


def nan_data():
    data = tiny_data()
    X, y = data[2]
    X = X.clone()
    X[1, 3] = math.nan
    data[2] = (X, y)
    return data


def wrong_shape_data():
    data = tiny_data()
    data[1] = (torch.randn(4, 7, dtype=torch.float64), data[1][1])
    return data


def empty_batch_data():
    data = tiny_data()
    data.insert(1, (data[0][0][:0], data[0][1][:0]))
    return data


def failing_callback(step, steps, reached):
    if step == 2:
        raise RuntimeError("callback failed")


# (kwargs over a good call, data, expected error, message); each fails after some work
# would otherwise have been done on the model (masks attached, steps taken)
FAILURES = [
    ({}, "no batches", ValueError, "no batches"),
    ({"num_grads": 0}, None, ValueError, "num_grads"),
    ({"grad_batch_size": 0}, None, ValueError, "grad_batch_size"),
    ({"block_size": 1.5}, None, TypeError, "block_size"),
    ({"damp": math.inf}, None, ValueError, "damp"),
    ({"damp": -1.0, "damp_mode": "absolute"}, None, ValueError, "damp"),
    ({}, "nan", ValueError, "not finite"),
    ({}, "shape", ValueError, r"batch 1 .*shape \(4, 7\)"),
    ({"grad_batch_size": None}, "empty", ValueError, "batch 1 of data has 0 samples"),
    ({"grad_batch_size": 2}, "empty", ValueError, "batch 1 of data has 0 samples"),
    ({"callback": failing_callback}, None, RuntimeError, "callback failed"),
    ({"method": "obs", "callback": failing_callback}, None, RuntimeError, "callback failed"),
    ({"steps": 2.5}, None, TypeError, "steps"),
    ({"max_multi": -1}, None, ValueError, "max_multi"),
    ({"normalize": "yes"}, None, TypeError, "normalize"),
    ({"loss_func": 3}, None, TypeError, "loss_func"),
]


def make_data(kind):
    makers = {None: tiny_data, "nan": nan_data, "shape": wrong_shape_data}
    makers["empty"] = empty_batch_data
    return makers[kind]() if kind in makers else []


@pytest.mark.parametrize("kwargs, data_kind, error, message", FAILURES)
@pytest.mark.parametrize("already_pruned", [False, True])
def test_failed_prune_leaves_the_model_exactly_as_before(
    kwargs, data_kind, error, message, already_pruned
):
    model = tiny_model()
    if already_pruned:  # masks attached and zeros present: those must survive the failure too
        prune(model, nn.CrossEntropyLoss(), tiny_data(), 0.3, num_grads=6, steps=1)
    before = fingerprint(model)
    args = {"loss_func": nn.CrossEntropyLoss(), "num_grads": 4, "steps": 3, **kwargs}
    loss = args.pop("loss_func")
    with pytest.raises(error, match=message):
        prune(model, loss, make_data(data_kind), 0.6, **args)
    assert_unchanged(model, before)
    if not already_pruned:  # its state_dict still loads into a fresh, unpruned model
        fresh = tiny_model(seed=5)
        fresh.load_state_dict(model.state_dict())
        x = torch.randn(3, 5, dtype=torch.float64)
        assert torch.equal(fresh(x), model(x))


def test_failed_prune_restores_buffers_and_keeps_optimizer_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    model.train()  # forward passes during gradient collection update the running statistics
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    before = fingerprint(model)
    data = tiny_data() + [(torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 9, 0]))]
    with pytest.raises(ValueError, match="batch 6"):
        prune(model, nn.CrossEntropyLoss(), data, 0.5, num_grads=64, steps=1)
    assert_unchanged(model, before)
    assert list(model.parameters()) == params == opt.param_groups[0]["params"]


def test_interrupt_mid_prune_restores_the_model():
    model = tiny_model()
    before = fingerprint(model)

    def interrupt(step, steps, reached):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(model, nn.CrossEntropyLoss(), tiny_data(), 0.5, num_grads=4, callback=interrupt)
    assert_unchanged(model, before)


def test_frozen_weight_is_a_clear_error_unless_magnitude():
    model = tiny_model()
    model[2].weight.requires_grad_(False)
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"2\.weight has requires_grad=False"):
        prune(model, nn.CrossEntropyLoss(), tiny_data(), 0.5, num_grads=4)
    assert_unchanged(model, before)
    rep = prune(model, None, None, 0.5, method="magnitude")
    assert rep.sparsity == pytest.approx(0.5, abs=1 / 48)
    assert not model[2].parametrizations.weight.original.requires_grad


def test_foreign_parametrization_is_rejected_not_pruned_through():
    model = tiny_model()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    before = fingerprint(model)
    with pytest.raises(ValueError, match="parametrizations"):
        prune(model, nn.CrossEntropyLoss(), tiny_data(), 0.5, num_grads=4)
    assert_unchanged(model, before)


def test_successful_prune_after_a_failed_one_matches_a_clean_run():
    data = tiny_data()
    failed, clean = tiny_model(), tiny_model()
    with pytest.raises(RuntimeError):
        prune(failed, nn.CrossEntropyLoss(), data, 0.6, num_grads=6, steps=3,
              callback=failing_callback)  # fmt: skip
    a = prune(failed, nn.CrossEntropyLoss(), data, 0.6, num_grads=6, steps=3)
    b = prune(clean, nn.CrossEntropyLoss(), data, 0.6, num_grads=6, steps=3)
    assert a.steps == b.steps and a.damp == b.damp
    for (ka, va), (kb, vb) in zip(failed.state_dict().items(), clean.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
