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
from curvopt.optim import HARPG, MFAC, NHARPG, NPG, NPGIGT, GNSNewton
from curvopt.optim._state_checks import GROUP_SIZES_KEY

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


@pytest.mark.parametrize("curvature", ["dense", "identity"])
def test_gns_newton_refuses_a_state_of_another_dimension(curvature):
    """GNSNewton's state holds only gamma and counters (and, for "mfac", a window that checks
    its own d): the recorded number of parameter entries is what tells another problem apart."""
    w, opt, closure = quadratic_gns(3, curvature="dense")
    if curvature == "identity":  # no window in the state: only the recorded size can tell
        opt = GNSNewton([w], curvature=torch.eye(3, dtype=DT), gamma0=2.0)
    opt.step(closure)
    good = snapshot(opt)
    assert good["state"][GROUP_SIZES_KEY] == [3]
    v = torch.zeros(5, dtype=DT, requires_grad=True)  # same number of tensors, another d
    other = GNSNewton([v], curvature=torch.eye(5, dtype=DT), gamma0=14.0)
    other.state["gns"]["steps"] = 9
    refused(opt, other.state_dict(), r"groups of \[5\] entries.*have \[3\].*another dimension")
    two = GNSNewton([torch.zeros(1, dtype=DT, requires_grad=True), v], curvature="mfac")
    refused(opt, two.state_dict(), "has 2 parameters but the optimizer's has 1")
    for corrupt in ([3.0], [True], 3, ["3"]):
        bad = copy.deepcopy(good)
        bad["state"][GROUP_SIZES_KEY] = corrupt
        refused(opt, bad, "must be a list of integers")
    bad = copy.deepcopy(good)
    bad["state"][GROUP_SIZES_KEY] = [3, 3]  # as many groups as sizes: the sizes must match
    refused(opt, bad, r"groups of \[3, 3\] entries")
    opt.load_state_dict(good)
    assert_same(good, snapshot(opt))


def test_gns_newton_state_round_trip_is_exact_and_old_states_still_load():
    """A state round-trips exactly (the recorded size too); a state saved before the size was
    recorded (no entry) loads and resumes exactly like the new one."""
    w, opt, closure = quadratic_gns(4, curvature="mfac")
    for _ in range(3):
        opt.step(closure)
    saved = snapshot(opt)
    x = w.detach().clone()
    old = copy.deepcopy(saved)
    del old["state"][GROUP_SIZES_KEY]
    runs = []
    for state in (saved, old):
        w2, opt2, closure2 = quadratic_gns(4, curvature="mfac", gamma0=0.125)
        with torch.no_grad():
            w2.copy_(x)
        opt2.load_state_dict(state)
        assert_same(saved, snapshot(opt2))  # the entry is written again on save
        for _ in range(2):
            opt2.step(closure2)
        runs.append((w2.detach().clone(), snapshot(opt2)))
    for _ in range(2):
        opt.step(closure)
    want = snapshot(opt)
    want["state"]["gns"]["closure_calls"] += 1  # a load drops the cached evaluation at x
    for w2, sd in runs:
        assert torch.equal(w2, w.detach())
        assert_same(want, sd)
