"""Corrupted states are refused by ``load_state_dict`` with a clear error, changing nothing.

Each case is a state that used to load and then give wrong results (or a bare ``KeyError`` at the
next step): hyperparameters the constructor refuses, non-finite or transposed buffers,
inconsistent window counters, missing hyperparameters.
"""

import copy

import numpy as np
import pytest
import torch
from test_failed_loads import (
    ScriptedSampler,
    assert_same,
    mfac_after_steps,
    quadratic_gns,
    snapshot,
)
from torch import nn

from curvopt.mfac import SlidingWindowMFAC
from curvopt.optim import HARPG, MFAC, NHARPG, NPG, NPGIGT

DT = torch.float64


def refused(opt, bad, match, error=ValueError):
    """``bad`` is refused with ``error`` matching ``match`` and the optimizer is unchanged."""
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(opt))


def test_mfac_refuses_a_parameter_given_twice():
    p = torch.zeros(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="same parameter twice"):
        MFAC([p, p], lr=0.1, m=4)
    with pytest.raises(ValueError, match="more than one parameter group"):
        MFAC([{"params": [p]}, {"params": [p]}], lr=0.1, m=4)
    assert MFAC([p], lr=0.1, m=4).window.dim == 3


def test_mfac_refuses_nonfinite_and_transposed_momentum_buffers():
    params, opt = mfac_after_steps([(3, 4), (4,)], m=4, lr=0.01)
    good = snapshot(opt)
    bad = copy.deepcopy(good)
    bad["state"][0]["momentum_buffer"][1, 2] = float("nan")
    refused(opt, bad, "NaN or Inf")
    bad = copy.deepcopy(good)
    bad["state"][0]["momentum_buffer"] = good["state"][0]["momentum_buffer"].T.contiguous()
    refused(opt, bad, r"shape \(4, 3\).*needs shape \(3, 4\)")
    for not_a_tensor in (good["state"][0]["momentum_buffer"].tolist(), np.zeros((3, 4))):
        bad = copy.deepcopy(good)  # a list, or an array of the right shape: not a tensor
        bad["state"][0]["momentum_buffer"] = not_a_tensor
        refused(opt, bad, f"has shape {type(not_a_tensor).__name__} but parameter 0")
    bad = copy.deepcopy(good)
    bad["state"]["mfac_window"]["skipped"] = torch.tensor(-1)
    refused(opt, bad, "skipped-step counter")
    opt.load_state_dict(good)  # the valid state still loads


@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay", "decoupled_weight_decay"])
def test_mfac_refuses_a_group_without_a_hyperparameter(key):
    _, opt = mfac_after_steps([(3,)], m=2, lr=0.1)
    bad = snapshot(opt)
    del bad["param_groups"][0][key]
    refused(opt, bad, f"lacks the hyperparameters \\['{key}'\\]")


@pytest.mark.parametrize("count", [10**6, 2, 5])
def test_window_refuses_a_corrupted_count(count):
    """Saved at count 3 of m = 4: any other count moves the row the next gradient replaces."""
    gen = torch.Generator().manual_seed(0)
    w = SlidingWindowMFAC(6, 4, 1e-2, dtype=DT)
    for _ in range(3):
        w.add(torch.randn(6, generator=gen, dtype=DT))
    bad = dict(copy.deepcopy(w.state_dict()), count=count)
    before = copy.deepcopy(w.state_dict())
    with pytest.raises(ValueError, match="count"):
        w.load_state_dict(bad)
    assert_same(before, w.state_dict())
    # also when only the redundant fields are missing (a state from an older version)
    old = {k: v for k, v in bad.items() if k not in ("position", "filled")}
    if count < 3:  # rows past the count are not empty
        with pytest.raises(ValueError, match="count"):
            w.load_state_dict(old)


def test_window_refuses_nonfinite_and_inconsistent_buffers():
    gen = torch.Generator().manual_seed(1)
    w = SlidingWindowMFAC(6, 3, 1e-2, dtype=DT)
    for _ in range(4):
        w.add(torch.randn(6, generator=gen, dtype=DT))
    good = copy.deepcopy(w.state_dict())
    for key, edit, match in [
        (
            "G",
            lambda t: t.index_put_(
                (torch.tensor(0), torch.tensor(1)), torch.tensor(torch.nan, dtype=DT)
            ),
            "NaN",
        ),
        ("Ainv", lambda t: t.fill_(float("inf")), "NaN or Inf"),
        (
            "K",
            lambda t: t.index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(5.0, dtype=DT)),
            "symmetric",
        ),
        (  # exactly symmetric, as the window keeps it: not merely close
            "K",
            lambda t: t.index_put_((torch.tensor(0), torch.tensor(1)), t[0, 1] * (1 + 1e-12)),
            "symmetric",
        ),
    ]:
        bad = copy.deepcopy(good)
        edit(bad[key])
        with pytest.raises(ValueError, match=match):
            w.load_state_dict(bad)
        assert_same(good, w.state_dict())
    bad = dict(copy.deepcopy(good), refine="yes")
    with pytest.raises(TypeError, match="refine"):
        w.load_state_dict(bad)
    bad = dict(copy.deepcopy(good), since_refresh=3)  # refresh_every = m = 3
    with pytest.raises(ValueError, match="since_refresh"):
        w.load_state_dict(bad)
    w.load_state_dict(good)
    # a partly filled window: rows of G and of K past the count must be zero, each checked
    part = SlidingWindowMFAC(6, 3, 1e-2, dtype=DT)
    for _ in range(2):
        part.add(torch.randn(6, generator=gen, dtype=DT))
    good = copy.deepcopy(part.state_dict())
    for key, index, value in [("G", (2, 4), 0.5), ("K", (2, 2), 0.5)]:  # K stays symmetric
        bad = copy.deepcopy(good)
        bad[key][index] = value
        with pytest.raises(ValueError, match="past row 2 are not zero"):
            part.load_state_dict(bad)
        assert_same(good, part.state_dict())


def test_npg_refuses_hyperparameters_its_constructor_refuses():
    opt = NPG(nn.Linear(3, 2).double().parameters(), delta=0.01)
    good = snapshot(opt)
    for key, value, match in [
        ("delta", -1.0, "delta"),
        ("delta", float("nan"), "delta"),
        ("solver", "lbfgs", "solver must be 'cg' or 'mfac'"),
        ("cg_iters", 0, "cg_iters"),
        ("backtrack", "yes", "backtrack"),
    ]:
        bad = copy.deepcopy(good)
        bad["param_groups"][0][key] = value
        refused(opt, bad, match, (ValueError, TypeError))
    bad = copy.deepcopy(good)
    del bad["param_groups"][0]["delta"]
    refused(opt, bad, r"lacks the hyperparameters \['delta'\]")


@pytest.mark.parametrize("cls", [NHARPG, HARPG, NPGIGT])
def test_momentum_pg_refuses_bad_or_missing_hyperparameters(cls):
    module = nn.Linear(3, 2).double()
    opt = cls(module.parameters(), lr=0.1)
    opt.step(ScriptedSampler(module))
    good = snapshot(opt)
    for key, value in [
        ("momentum", 2.0),
        ("momentum", 0.0),
        ("lr", float("nan")),
        ("lr_power", -1.0),
    ]:
        bad = copy.deepcopy(good)
        bad["param_groups"][0][key] = value
        refused(opt, bad, key)
    bad = copy.deepcopy(good)
    del bad["param_groups"][0]["lr"]
    refused(opt, bad, r"lacks the hyperparameters \['lr'\]")
    bad = copy.deepcopy(good)
    bad["state"][0]["momentum"][0, 0] = float("nan")
    refused(opt, bad, "NaN or Inf")
    bad = copy.deepcopy(good)
    bad["state"][1]["step"] = 7
    refused(opt, bad, "different steps")
    opt.load_state_dict(good)
    opt.step(ScriptedSampler(module))


def test_gns_newton_refuses_hyperparameters_its_constructor_refuses():
    _, opt, closure = quadratic_gns(3)
    opt.step(closure)
    good = snapshot(opt)
    for key, value in [("max_trials", 0), ("mfac_damp", float("nan")), ("on_exhausted", "retry")]:
        bad = copy.deepcopy(good)
        bad["param_groups"][0][key] = value
        refused(opt, bad, key)
    opt.load_state_dict(good)
    opt.step(closure)
