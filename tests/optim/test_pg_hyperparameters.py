"""Every hyperparameter of the policy-gradient optimizers is validated at construction.

Before issue #18's follow-up, ``HARPG(lr=inf)``, ``NPG(delta=inf)`` or ``NHARPG(momentum=nan)``
were accepted and produced NaN parameters at the first step.
"""

import math

import pytest
import torch

from curvopt.optim import HARPG, NHARPG, NPG, NPGIGT
from curvopt.optim.pg_common import MomentumPolicyGradient

MOMENTUM_CLASSES = [NHARPG, HARPG, NPGIGT]


def _param():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("cls", MOMENTUM_CLASSES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": math.inf},
        {"lr": math.nan},
        {"lr": 0.0},
        {"lr": -1.0},
        {"lr_power": math.inf},
        {"lr_power": -0.5},
        {"momentum": math.nan},
        {"momentum": 0.0},
        {"momentum": 1.5},
        {"momentum_power": math.inf},
        {"momentum_power": -1.0},
    ],
)
def test_momentum_pg_rejects_bad_numbers_naming_them(cls, kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=name) as err:
        cls(_param(), **kwargs)
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("cls", MOMENTUM_CLASSES)
def test_momentum_pg_rejects_wrong_types(cls):
    with pytest.raises(TypeError, match="lr"):
        cls(_param(), lr="0.1")
    with pytest.raises(TypeError, match="lr"):
        cls(_param(), lr=True)


def test_normalize_and_generator_types():
    with pytest.raises(TypeError, match="normalize"):
        NHARPG(_param(), normalize="yes")
    with pytest.raises(TypeError, match="generator"):
        NHARPG(_param(), generator=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delta": math.inf},
        {"delta": 0.0},
        {"damping": math.inf},
        {"damping": math.nan},
        {"damping": -1.0},
        {"cg_iters": 0},
        {"cg_iters": True},
        {"cg_iters": 2.5},
        {"cg_tol": math.nan},
        {"cg_tol": 1.0},
        {"cg_tol": -1e-3},
        {"max_backtracks": 0},
        {"backtrack_ratio": 0.0},
        {"backtrack_ratio": math.nan},
        {"kl_tolerance": math.inf},
        {"kl_tolerance": 0.0},
    ],
)
def test_npg_rejects_bad_numbers_naming_them(kwargs):
    ((name, _),) = kwargs.items()
    with pytest.raises(ValueError, match=name):
        NPG(_param(), **kwargs)


def test_npg_zero_damping_only_with_cg():
    NPG(_param(), damping=0.0, solver="cg")
    with pytest.raises(ValueError, match="damping"):
        NPG(_param(), damping=0.0, solver="mfac")
    with pytest.raises(TypeError, match="backtrack"):
        NPG(_param(), backtrack="no")


def test_valid_edges_are_accepted():
    NHARPG(_param(), lr=1e-3, lr_power=0.0, momentum=1.0, momentum_power=0.0)
    NPG(_param(), cg_tol=0.0, damping=0.0)


def test_step_size_schedule_that_overflows_is_an_error():
    group = {"lr": 1.0, "lr_power": 1.0, "lr_schedule": lambda t: math.inf}
    with pytest.raises(ValueError, match="step-size schedule"):
        MomentumPolicyGradient.step_size(group, 3)
    group["lr_schedule"] = None
    assert MomentumPolicyGradient.step_size(group, 2) == pytest.approx(0.5)


class _AffineSampler:
    """g(θ) = θ + 1 and B v = 2 v, exactly."""

    def gradient(self, params):
        return torch.cat([p.detach().reshape(-1) for p in params]) + 1.0

    def hvp(self, vector, params):
        return 2.0 * vector


@pytest.mark.parametrize("cls", [NHARPG, HARPG, NPGIGT])
@pytest.mark.parametrize("momentum", [1.0, 0.5, 0.1])
def test_the_first_direction_is_the_first_gradient_whatever_eta0(cls, momentum):
    theta0 = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    w = theta0.clone().requires_grad_(True)
    opt = cls([w], lr=0.1, momentum=momentum)
    d0 = opt.step(_AffineSampler())
    torch.testing.assert_close(d0, theta0 + 1.0, rtol=0, atol=0)  # g_0, not η_0 g_0
    step = 0.1 * d0 / d0.norm() if cls is not HARPG else 0.1 * d0
    torch.testing.assert_close(w.detach(), theta0 + step, rtol=1e-15, atol=0)


def test_momentum_schedule_must_stay_in_the_half_open_unit_interval():
    group = {"momentum": 1.0, "momentum_power": 0.0, "momentum_schedule": None}
    assert MomentumPolicyGradient.momentum_weight(group, 0) == 1.0  # η = 1 is allowed
    for bad in (0.0, 1.5, math.nan):
        group["momentum_schedule"] = lambda t, v=bad: v
        with pytest.raises(ValueError, match="must lie in \\(0, 1\\]"):
            MomentumPolicyGradient.momentum_weight(group, 3)


@pytest.mark.parametrize("cls", MOMENTUM_CLASSES)
@pytest.mark.parametrize("key", ["prev", "momentum"])
def test_a_state_after_one_step_without_its_buffers_is_refused(cls, key):
    import copy

    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=0.1, momentum=0.5)
    opt.step(_AffineSampler())
    good = copy.deepcopy(opt.state_dict())
    assert good["state"][0]["step"] == 1
    bad = copy.deepcopy(good)
    del bad["state"][0][key]
    with pytest.raises(ValueError, match="at step 1 but lacks"):
        opt.load_state_dict(bad)
    opt.load_state_dict(good)
