"""Misuse under torchrun: ranks that disagree, an optimizer built before fully_shard, and a
process group that is None because torch.distributed was not initialized yet."""

import warnings

import pytest
import torch
from dist_runs import results
from torch import nn

from curvopt.curvature import GGNOperator
from curvopt.mfac import SlidingWindowMFAC
from curvopt.optim import MFAC


def _model(extra=False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)]
    if extra:
        layers.append(nn.Linear(2, 2))
    return nn.Sequential(*layers).double()


def _misuse_checks(rank, world):
    """Every rank constructs with one argument that depends on the rank: all raise together."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    group = torch.distributed.group.WORLD
    last = rank == world - 1
    cases = {
        "m": lambda: MFAC(_model().parameters(), m=4 + last, process_group=group),
        "damp": lambda: MFAC(_model().parameters(), damp=0.1 + last, process_group=group),
        "dtype": lambda: MFAC(
            _model().parameters(),
            window_dtype=torch.float32 if last else None,
            process_group=group,
        ),
        "d (coordinates": lambda: MFAC(_model(extra=last).parameters(), process_group=group),
        "nonfinite": lambda: MFAC(
            _model().parameters(), nonfinite="skip" if last else "raise", process_group=group
        ),
        "refresh_every": lambda: SlidingWindowMFAC(
            3, 4, 0.1, refresh_every=2 + last, process_group=group
        ),
        "refine": lambda: SlidingWindowMFAC(3, 4, 0.1, refine=last, process_group=group),
    }
    out = {}
    for key, build in cases.items():
        try:
            build()
            out[key] = "accepted"
        except ValueError as err:
            out[key] = str(err)
    MFAC(_model().parameters(), process_group=group)  # the same arguments: accepted
    # an optimizer built before fully_shard holds the old tensors: its steps warn
    model = _model()
    opt = MFAC(model.parameters(), m=2)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    model(torch.randn(4, 3, dtype=torch.float64)).square().sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    out["no_grad_warning"] = [str(w.message) for w in caught]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_that_disagree_are_refused_at_construction(world):
    for res in (r["misuse"] for r in results(world)):
        for key in ("m", "damp", "dtype", "d (coordinates", "nonfinite", "refresh_every", "refine"):
            assert "disagree on " + key in res[key], (key, res[key])
        assert any("fully_shard" in w for w in res["no_grad_warning"]), res["no_grad_warning"]


def test_a_step_without_any_gradient_warns():
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = MFAC([w], m=2)
    with pytest.warns(UserWarning, match="no gradient on any of its parameters.*fully_shard"):
        opt.step()
    assert opt.window.count == 0


def test_none_group_under_a_launch_before_init_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not torch.distributed.is_initialized()
    model = _model()
    with pytest.raises(ValueError, match="WORLD_SIZE=2 .*not initialized.*init_process_group"):
        MFAC(model.parameters(), process_group=torch.distributed.group.WORLD)
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        SlidingWindowMFAC(3, 2, 0.1, process_group=None)
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        GGNOperator(model, nn.MSELoss(), list(model.parameters()), data)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single launched process: fine
    MFAC(model.parameters(), process_group=None)
