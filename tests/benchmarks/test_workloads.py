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


def _tiny_cnn(monkeypatch, steps=2):
    monkeypatch.setitem(
        W.WORKLOADS, "digits_cnn", W.Workload("digits_cnn", steps, 1, W._digits_cnn, "CE")
    )


def test_unknown_workload_and_optimizer_are_rows_of_the_study(monkeypatch, tmp_path):
    data = workloads.study("no_such_workload", ["AdamW"], 1, tmp_path, steps=2)
    assert "unknown workload 'no_such_workload'" in workloads.render(data)
    _tiny_cnn(monkeypatch)
    data = workloads.study("digits_cnn", ["no_such_grid", "AdamW"], 1, tmp_path, steps=2)
    table = workloads.render(data)
    assert "| no_such_grid | — | unknown optimizer: 'no_such_grid' not in" in table
    assert data["best"]["AdamW"] in W.GRIDS["AdamW"][1]


def test_an_optimizer_that_fails_to_build_is_an_error_row():
    def needs_gpu(params, lr):
        raise RuntimeError("this optimizer needs CUDA")

    W.ABLATIONS["needs-gpu"] = (needs_gpu, (1e-3,))
    try:
        out = W.run("digits_cnn", "needs-gpu", 1e-3, 0, steps=2)
    finally:
        del W.ABLATIONS["needs-gpu"]
    assert out.status == "error" and "needs CUDA" in out.detail


def test_every_optimizer_has_a_grid_of_at_least_five_points():
    assert all(len(grid) >= 5 for _, grid in W.GRIDS.values())
    assert W.run("digits_cnn", "MFAC-damp0.1", 1e-3, 0, steps=2).status == "ok"  # an ablation


def test_main_reports_a_bad_grid_name_in_the_tables_and_goes_on(monkeypatch, tmp_path):
    _tiny_cnn(monkeypatch)
    monkeypatch.setitem(W.GRIDS, "AdamW", W.GRIDS["AdamW"])  # main() overrides it
    args = ["--workloads", "digits_cnn", "--optimizers", "AdamW", "--seeds", "1", "--steps", "2"]
    args += ["--out", str(tmp_path), "--plots", str(tmp_path)]
    assert workloads.main([*args, "--grid", "no_such=1e-3", "AdamW=1e-3"]) == 0
    tables = (tmp_path / "tables_digits_cnn.md").read_text()
    assert "unknown optimizer 'no_such', ignored" in tables and "| AdamW | 0.001 |" in tables
    with pytest.raises(SystemExit):  # a grid that is not numbers is a usage error
        workloads.main([*args, "--grid", "AdamW=fast"])


def test_an_optimizer_in_another_interpreter_runs_there_or_is_a_row(monkeypatch):
    monkeypatch.setitem(W.EXTERNAL_PYTHON, "AdamW", "/no/such/python")
    out = W.run("digits_cnn", "AdamW", 1e-3, 0, steps=2)
    assert out.status == "missing dependency" and "/no/such/python" in out.detail
    monkeypatch.setitem(W.EXTERNAL_PYTHON, "AdamW", sys.executable)
    here = W.run("digits_cnn", "AdamW", 1e-3, 0, steps=2)
    monkeypatch.delitem(W.EXTERNAL_PYTHON, "AdamW")
    assert here.status == "ok" and here.steps == [0, 2]
    assert here.val == pytest.approx(W.run("digits_cnn", "AdamW", 1e-3, 0, steps=2).val, rel=1e-5)


def test_ista_mfac_without_the_package_is_a_missing_dependency():
    import importlib.util

    if importlib.util.find_spec("ista_daslab_optimizers") is not None:
        pytest.skip("ista_daslab_optimizers is installed here")
    out = W.run("digits_cnn", "ista-MFAC", 1e-3, 0, steps=2)
    assert out.status == "missing dependency" and "ista_daslab_optimizers" in out.detail


def test_combine_adds_optimizers_run_apart_with_their_ratio_to_adamw():
    def result(names, iter_s):
        runs = {k: [{"optimizer": k, "status": "ok", "val": [1.0]}] for k in names}
        tuning = [r for v in runs.values() for r in v]
        return {
            "workload": "w",
            "tuning": tuning,
            "seeds": runs,
            "best": dict.fromkeys(names, 1e-3),
            "iter_s": iter_s,
        }

    base = result(["AdamW", "MFAC"], {"AdamW": 2.0, "MFAC": 3.0})
    other = result(["AdamW", "SOAP"], {"AdamW": 0.5, "SOAP": 2.0})
    got = workloads.combine(base, other)
    assert set(got["best"]) == {"AdamW", "MFAC", "SOAP"} and len(got["tuning"]) == 3
    assert got["iter_s"] == {"AdamW": 2.0, "MFAC": 3.0, "SOAP": 8.0}  # 4x AdamW, as measured
    with pytest.raises(ValueError, match="cannot combine"):
        workloads.combine(base, {**other, "workload": "v"})


def test_a_study_stopped_mid_grid_keeps_its_runs_and_says_so(monkeypatch, tmp_path):
    _tiny_cnn(monkeypatch)
    calls = []

    def run_then_stop(workload, name, lr, seed, steps=None):
        if name == "MFAC" and calls:
            raise KeyboardInterrupt  # the study is stopped during MFAC's grid
        calls.append(lr) if name == "MFAC" else None
        return W.Outcome(workload, name, lr, seed, steps=[0, 2], cpu=[0, 1], val=[2.0, lr])

    monkeypatch.setattr(W, "run", run_then_stop)
    with pytest.raises(KeyboardInterrupt):
        workloads.study("digits_cnn", ["AdamW", "MFAC"], 1, tmp_path, steps=2)
    import json

    saved = json.loads((tmp_path / "digits_cnn.json").read_text())
    assert [r["lr"] for r in saved["tuning"] if r["optimizer"] == "MFAC"] == calls
    table = workloads.render(saved)
    assert f"| MFAC | — | not finished: stopped after seed-0 runs at lr {calls[0]:g} |" in table
    assert "| AdamW | 0.0001 |" in table  # the lowest final loss of the fake runs
