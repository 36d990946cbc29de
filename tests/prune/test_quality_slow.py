"""Slow study: M-FAC OBS with recomputation beats magnitude pruning on digits (make test-all)."""

import copy

import pytest
import torch
from torch import nn

from curvopt.prune import prune
from curvopt.prune.zoo import accuracy, batches, build_model, load_dataset, train


@pytest.mark.slow
def test_mfac_beats_magnitude_at_90_percent():
    split = load_dataset("digits", seed=0)
    base = train(build_model("mlp", split, hidden=32), split.X_train, split.y_train)
    calib = batches(split.X_train, split.y_train, 64)
    acc = {}
    for name, kw in {
        "magnitude": dict(method="magnitude"),
        "mfac": dict(method="mfac", grad_batch_size=8),
    }.items():
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        prune(model, nn.CrossEntropyLoss(), calib, 0.9, **kw)
        acc[name] = accuracy(model, split.X_test, split.y_test)
    assert acc["mfac"] > acc["magnitude"] + 0.2, acc
