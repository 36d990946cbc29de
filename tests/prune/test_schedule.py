"""One-shot and gradual schedules; gradual pruning keeps masks through training."""

import pytest
import torch
from prune_helpers import tiny_data, tiny_model
from torch import nn

from curvopt.prune import CubicSchedule, GradualPruner, one_shot_schedule, prunable_weights


def test_one_shot_schedule_removes_equal_fractions_of_the_rest():
    s = one_shot_schedule(0.9, 4)
    assert s[-1] == 0.9 and len(s) == 4
    remaining = [1.0] + [1 - x for x in s]
    ratios = [b / a for a, b in zip(remaining, remaining[1:])]
    assert ratios == pytest.approx([0.1**0.25] * 4)
    s2 = one_shot_schedule(0.9, 2, start=0.5)
    assert s2 == pytest.approx([1 - 0.5 * (0.2**0.5), 0.9])
    assert one_shot_schedule(0.7, 1) == [0.7]


@pytest.mark.parametrize(
    "bad",
    [dict(target=1.0, steps=2), dict(target=0.5, steps=0), dict(target=0.5, steps=2, start=0.6)],
)
def test_one_shot_schedule_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        one_shot_schedule(**bad)


def test_cubic_schedule_values():
    s = CubicSchedule(0.8, start_step=10, end_step=50, frequency=10, initial_sparsity=0.2)
    assert s.prune_steps() == [10, 20, 30, 40, 50]
    assert s.sparsity_at(5) == 0.0
    assert s.sparsity_at(10) == pytest.approx(0.2)
    assert s.sparsity_at(30) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5**3)
    assert s.sparsity_at(50) == pytest.approx(0.8) and s.sparsity_at(90) == pytest.approx(0.8)
    assert not s.is_prune_step(15) and not s.is_prune_step(60)
    with pytest.raises(ValueError):
        CubicSchedule(0.5, start_step=5, end_step=5, frequency=1)
    with pytest.raises(ValueError):
        CubicSchedule(1.2, start_step=0, end_step=5, frequency=1)


@pytest.mark.parametrize("method", ["mfac", "magnitude"])
def test_gradual_pruning_follows_schedule_and_keeps_masks(method):
    model, data = tiny_model(), tiny_data()
    schedule = CubicSchedule(0.75, start_step=2, end_step=8, frequency=3)
    pruner = GradualPruner(model, nn.CrossEntropyLoss(), data, schedule, method=method, num_grads=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    d = 48
    seen = []
    for step in range(12):
        X, y = data[step % len(data)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        zeros = sum(int((t.module.weight == 0).sum()) for t in prunable_weights(model))
        if seen:  # the optimizer step never revived a pruned weight
            assert zeros >= seen[-1]
        report = pruner.step()
        if report is not None:
            assert report.sparsity == pytest.approx(round(schedule.sparsity_at(step) * d) / d)
        seen.append(sum(int((t.module.weight == 0).sum()) for t in prunable_weights(model)))
    assert [len(pruner.reports), seen[-1]] == [3, round(0.75 * d)]
    assert pruner.state_dict() == {"step_count": 12}


def test_gradual_pruner_rejects_bad_arguments():
    with pytest.raises(TypeError):
        GradualPruner(tiny_model(), None, None, [0.5])
    with pytest.raises(ValueError):
        GradualPruner(tiny_model(), None, None, CubicSchedule(0.5, 0, 2, 1), sparsity=0.3)
