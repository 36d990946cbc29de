"""The one-lease GPU programme ``benchmarks/gpu_check.py``: its dry run, budgets and verdicts.

The dry run (no CUDA here) runs all five parts at tiny sizes on the CPU, with the kernels in
Triton's interpreter, so the command that a GPU session runs once cannot rot. The goal verdicts,
which only a GPU run produces, are checked on rows shaped like a GPU run's.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _run(out, *args):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its parts
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    run = _run(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["schema"] == gpu_check.SCHEMA
    assert report["dry_run"] is True and report["correctness_ok"] is True
    assert report["exit_status"] == 0
    assert set(report["environment"]) >= {"python", "torch", "triton", "transformers", "device"}
    parts = {p["number"]: p for p in report["parts"]}
    assert sorted(parts) == [1, 2, 3, 4, 5]
    for number, part in parts.items():
        assert part["name"] == gpu_check.PARTS[number][0]
        assert part["status"] == "ok", (number, part["notes"])
        assert part["correctness_failures"] == []
        assert part["rows"], number
        assert 0 < part["seconds"] <= part["budget_s"] + gpu_check.GRACE_S
    # 1: the GPU-only tests ran (rehearsed), none skipped or failed
    gpu_only = [r for r in parts[1]["rows"] if r["module"] == "test_gpu_only"]
    assert gpu_only and gpu_only[0]["passed"] > 0
    assert gpu_only[0]["failed"] == gpu_only[0]["skipped"] == 0
    # 2: every kernel against the reference (and cuBLAS where there is one), plus the copy
    rows = parts[2]["rows"]
    impls = {(r["kernel"].split()[0], r["impl"]) for r in rows}
    for kernel in ("multi_dot", "combine", "gram_diag", "softmax_curv"):
        assert {(kernel, "triton"), (kernel, "reference")} <= impls
    assert {("multi_dot", "cuBLAS"), ("combine", "cuBLAS"), ("gram_diag", "cuBLAS")} <= impls
    assert ("device", "copy_") in impls
    for r in rows:
        if r["impl"] == "triton":
            assert r["rel_diff_vs_reference"] < gpu_check.TOL_HALF_OUT
            if r["unit"] == "GB/s":
                assert r["pct_of_copy"] > 0
    # 3: fp32 and bf16 windows, step vs floor, static setup vs GEMM, window vs static M-FAC
    rows = parts[3]["rows"]
    assert {r["window_dtype"] for r in rows} == {"fp32", "bf16"}
    static_max_d = gpu_check.DRY_SIZES.static_max_d
    assert {r["d"] > static_max_d for r in rows} == {True, False}  # both ways to the Gram
    for r in rows:
        assert r["step_over_floor"] > 0 and r["in_place_over_floor"] > 0
        if r["d"] <= static_max_d:
            assert r["setup_over_gemm"] > 0 and r["rel_diff_vs_static"] < r["tol_vs_static"]
        else:
            assert "setup_over_gemm" not in r and "rel_diff_vs_static" not in r
    # 4: each model's gradient and our HVP and GGN-vp
    rows = parts[4]["rows"]
    for model in ("MLP 64-256-256-10", "CNN"):
        methods = {r["method"] for r in rows if r["model"] == model}
        assert "gradient (eager)" in methods and "GGN-vp curvopt" in methods
        assert any(m.startswith("HVP curvopt") for m in methods)
    # 5: MFAC vs Adam, steps and whole iterations
    (row,) = parts[5]["rows"]
    for key in ("mfac_step_ms", "adam_step_ms", "mfac_iteration_ms", "adam_iteration_ms"):
        assert row[key] > 0
    # goals: all listed, none judged in a dry run
    goals = {g["key"]: g for g in report["goals"]}
    assert set(goals) == {
        "streaming_bandwidth",
        "vs_cublas",
        "gram_diag",
        "window_step",
        "hvp",
        "ggn",
        "mfac_vs_adam",
    }
    assert all(g["met"] is None and "unmeasured" in g["measured"] for g in goals.values())
    markdown = (tmp_path / "gpu_report.md").read_text()
    for number, (_, title, _) in gpu_check.PARTS.items():
        assert f"## Part {number}: {title}" in markdown
    assert "| goal | target | measured | verdict |" in run.stdout


def test_a_part_over_its_budget_stops_and_says_so(tmp_path):
    # a long grace: the parts must stop themselves between cases, however slow a busy machine is
    run = _run(tmp_path, "--parts", "1,3", "--budget-scale", "1e-6", "--grace", "500")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tests, window = json.loads((tmp_path / "gpu_report.json").read_text())["parts"]
    assert tests["status"] == window["status"] == "over budget"
    # pytest stops after its first test (a GPU-only one: they run first), with a verdict on it
    assert tests["rows"] == [dict(module="test_gpu_only", passed=1, failed=0, skipped=0)]
    assert "over budget: pytest stopped after 1 tests" in tests["notes"]
    assert window["rows"] == []
    assert any(n.startswith("over budget: stopped before d=") for n in window["notes"])


def test_bad_arguments_are_rejected(capsys):
    bad = (["--parts", "1,7"], ["--parts", "one"], ["--budget-scale", "0"], ["--grace", "-1"])
    for args in bad:
        with pytest.raises(SystemExit):
            gpu_check.main(args)
        assert f"{args[0]} must be" in capsys.readouterr().err


def _kernel_row(kernel, impl, problem, pct=None, faster=1.0):
    return dict(
        kernel=kernel,
        impl=impl,
        problem=problem,
        unit="GB/s",
        pct_of_copy=pct,
        ours_faster_by=faster,
    )


def _gpu_parts(pct=85.0, cublas=1.05, gram=1.3, window=1.08, hvp=2.1, ggn=1.5, default_ok=True):
    kernels = [
        _kernel_row("multi_dot k=2", "triton", "m=8 d=1e+08 fp32", pct),
        _kernel_row("multi_dot k=2", "cuBLAS", "m=8 d=1e+08 fp32", faster=cublas),
        _kernel_row("combine", "triton", "m=8 d=1e+08 fp32", 90.0),
        _kernel_row("combine", "cuBLAS", "m=8 d=1e+08 fp32", faster=1.2),
        _kernel_row("softmax_curv", "triton", "rows=512 C=256000 bf16", 88.0),
        dict(
            kernel="gram_diag", impl="cuBLAS", problem="m=1024", unit="TFLOP/s", ours_faster_by=gram
        ),
    ]
    window_rows = [
        # d < 1e7: not judged
        dict(d=10**6, m=32, window_dtype="fp32", step_over_floor=3.0, in_place_over_floor=2.0),
        dict(d=10**7, m=32, window_dtype="fp32", step_over_floor=1.02, in_place_over_floor=1.01),
        dict(d=10**8, m=256, window_dtype="bf16", step_over_floor=window, in_place_over_floor=1.0),
    ]
    hvp_method = "HVP curvopt (default: reverse-over-forward)"
    products = [
        dict(model="GPT-2", method="gradient (eager)", x_gradient=1.0),
        dict(model="GPT-2", method="HVP curvopt (reverse-over-reverse)", x_gradient=hvp),
        dict(model="GPT-2", method="HVP curvopt (forward-over-reverse)", x_gradient=hvp + 1),
        dict(model="GPT-2", method="GGN-vp curvopt", x_gradient=ggn),
        dict(model="MLP", method=hvp_method, x_gradient=1.2),
        dict(model="MLP", method="GGN-vp curvopt", x_gradient=1.1),
    ]
    if default_ok:
        products.append(dict(model="GPT-2", method=hvp_method, x_gradient=hvp))
    step = dict(model="GPT-2", step_ratio=3.0, iteration_ratio=1.2)
    rows = {2: kernels, 3: window_rows, 4: products, 5: [step]}
    return {n: {"rows": r} for n, r in rows.items()}


def _verdicts(parts):
    return {g.key: g for g in gpu_check.evaluate_goals(parts, dry_run=False)}


def test_goal_verdicts_on_gpu_shaped_rows():
    goals = _verdicts(_gpu_parts())
    for key in ("streaming_bandwidth", "vs_cublas", "gram_diag", "window_step", "hvp", "ggn"):
        assert goals[key].met is True, (key, goals[key].measured)
    assert goals["mfac_vs_adam"].met is None and "step 3.00x" in goals["mfac_vs_adam"].measured
    assert "min 85 %" in goals["streaming_bandwidth"].measured
    assert (
        "max 1.08x" in goals["window_step"].measured and "2 cases" in goals["window_step"].measured
    )
    assert "in-place call: max 1.01x" in goals["window_step"].measured  # d >= 1e7 rows only
    missed = _verdicts(_gpu_parts(pct=79.0, cublas=0.9, gram=0.8, window=1.2, hvp=2.6, ggn=1.9))
    for key in ("streaming_bandwidth", "vs_cublas", "gram_diag", "window_step", "hvp", "ggn"):
        assert missed[key].met is False, (key, missed[key].measured)
    assert "multi_dot k=2 m=8 d=1e+08 fp32" in missed["streaming_bandwidth"].measured


def test_goal_verdict_when_the_default_hvp_mode_failed():
    goals = _verdicts(_gpu_parts(default_ok=False))
    assert (
        "GPT-2: default failed, HVP curvopt (reverse-over-reverse) 2.10x" in goals["hvp"].measured
    )
    assert goals["hvp"].met is True


def test_goals_without_rows_stay_unmeasured():
    goals = _verdicts({})
    assert all(g.met is None for g in goals.values())
    assert "did not produce" in goals["window_step"].measured


def test_exit_status():
    ok = {"status": "ok", "correctness_failures": []}
    assert gpu_check.exit_status([ok, {**ok, "status": "over budget"}]) == 0
    assert gpu_check.exit_status([ok, {**ok, "status": "error"}]) == 2
    failed = {"status": "failed", "correctness_failures": ["test_x::test_y"]}
    assert gpu_check.exit_status([failed, {**ok, "status": "error"}]) == 1


def test_junit_summary(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" time="1.5">'
        '<testcase classname="tests.kernels.test_gpu_only" name="test_a"/>'
        '<testcase classname="tests.kernels.test_gpu_only" name="test_b"><failure/></testcase>'
        '<testcase classname="tests.kernels.test_combine" name="test_c"><skipped/></testcase>'
        '<testcase classname="tests.kernels.test_combine" name="test_d"><error/></testcase>'
        "</testsuite></testsuites>"
    )
    counts, failed, seconds = gpu_check.summarize_junit(junit)
    assert counts == {"test_gpu_only": [1, 1, 0], "test_combine": [0, 1, 1]}
    assert failed == ["test_gpu_only::test_b", "test_combine::test_d"]
    assert seconds == 1.5
