"""The workloads harness reports bad input as table rows instead of failing (issue #23)."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import workload_suite as W  # noqa: E402
import workloads  # noqa: E402


def test_a_short_run_records_a_validation_curve():
    out = W.run("digits_cnn", "AdamW", 1e-3, seed=0, steps=4)
    assert out.status == "ok" and out.steps == [0, 4] and len(out.val) == 2


def test_unknown_names_and_missing_dependencies_are_outcomes(monkeypatch):
    assert W.run("no_such_workload", "AdamW", 1e-3, 0).status == "unknown workload"
    assert W.run("digits_cnn", "no_such_grid", 1e-3, 0).status == "unknown optimizer"

    def needs_missing(params, lr):
        import curvopt_no_such_module  # noqa: F401

    monkeypatch.setitem(W.GRIDS, "missing", (needs_missing, (1e-3,)))
    out = W.run("digits_cnn", "missing", 1e-3, 0, steps=2)
    assert out.status == "missing dependency" and "curvopt_no_such_module" in out.detail


def test_a_diverging_run_is_reported_and_the_study_goes_on(monkeypatch, tmp_path):
    monkeypatch.setitem(W.GRIDS, "huge-SGD", (lambda ps, lr: torch.optim.SGD(ps, lr=lr), (1e30,)))
    monkeypatch.setitem(
        W.WORKLOADS, "digits_cnn", W.Workload("digits_cnn", 3, 1, W._digits_cnn, "CE")
    )
    data = workloads.study("digits_cnn", ["huge-SGD", "AdamW"], 1, tmp_path, steps=3)
    assert data["best"]["huge-SGD"] is None and data["best"]["AdamW"] in W.GRIDS["AdamW"][1]
    table = workloads.render(data)
    assert "huge-SGD | — | diverged: non-finite loss" in table
    assert "| AdamW | " in table and "(1/1)" in table
