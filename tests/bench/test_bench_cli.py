import json

import pytest
import torch

from curvopt.bench import validate
from curvopt.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--problem"),
        (["--problem", "resnet"], "invalid choice"),
        (["--problem", "mlp", "--damping", "0"], "positive"),
        (["--problem", "mlp", "--damping=-1e-3"], "positive"),
        (["--problem", "mlp", "--damping", "nan"], "positive"),
        (["--problem", "mlp", "--damping", "abc"], "positive number"),
        (["--problem", "mlp", "--methods", "ggn,newton"], "unknown method 'newton'"),
        (["--problem", "mlp", "--methods", "mfac_mX"], "mfac_m<m>"),
        (["--problem", "mlp", "--probes", "0"], "positive integer"),
        (["--problem", "mlp", "--mfac-m", "8,zero"], "positive integer"),
        (["--problem", "mlp", "--train-steps", "-3"], ">= 0"),
        (["--problem", "mlp", "--reference", "kfac"], "invalid choice"),
        (["--problem", "mlp", "--plot", "out.pdf"], ".png"),
        (["--problem", "mlp", "--json", "no/such/folder/out.json"], "does not exist"),
        (["--problem", "mlp", "--methods", "ggn", "--mfac-m", "8"], "--mfac-m"),
        (["--problem", "mlp", "--device", "tpu"], "--device"),
        (["--problem", "mlp", "--threads", "0"], "positive integer"),
        (["--problem", "mlp", "--seed", str(2**70)], "--seed"),
        (["--problem", "mlp", "--seed", "-3"], "--seed"),
        (["--problem", "mlp", "--json", "/proc/no/such.json"], "--json"),
        (["--problem", "mlp", "--plot", "README.md/out.png"], "does not exist"),
        (["--problem", "logistic", "--top-k", "32", "--train-steps", "0"], "d = 31"),
        (["--problem", "logistic", "--estimators", "--budgets", "0"], "positive integer"),
        (["--problem", "logistic", "--estimators", "--budgets", "4,-2"], "positive integer"),
        (["--problem", "logistic", "--estimators", "--budgets", ","], "comma-separated"),
        (["--problem", "logistic", "--estimators", "--estimator-seeds", "0"], "positive"),
        (
            ["--problem", "logistic", "--estimators", "--budgets", "4,64", "--train-steps", "0"],
            "--budgets 64 exceed the problem's d = 31",
        ),
        (["--problem", "logistic", "--budgets", "4"], "--budgets needs --estimators"),
    ],
)
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: curvopt bench" in err and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--problem", "mlp", "--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["bench", "--problem", "logistic", "--methods", "hessian,sqgrad_diag,kfac,mfac_m16"]
    argv += ["--train-steps", "5", "--repeats", "1", "--no-progress"]
    argv += ["--json", str(out_json), "--plot", str(out_png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "IHVP rel. err" in out and "mfac_m16" in out and "kfac" in out
    document = json.loads(out_json.read_text())
    validate(document)
    assert [r["method"] for r in document["results"]] == [
        "hessian",
        "sqgrad_diag",
        "kfac",
        "mfac_m16",
    ]
    assert all(r["error"] is None for r in document["results"])
    assert document["results"][0]["ihvp_rel_error"] < 1e-10
    assert document["problem"]["num_params"] == 31
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimators_print_the_error_table_and_write_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "e.json", tmp_path / "e.png"
    argv = ["bench", "--problem", "logistic", "--estimators", "--reference", "ggn"]
    argv += ["--budgets", "2,8,31", "--estimator-seeds", "3", "--train-steps", "0"]
    argv += ["--json", str(out_json), "--plot", str(out_png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "logistic (d = 31), ggn: relative RMS error over 3 seeds" in out
    assert out.count("| estimator | m=2 | m=8 | m=31 |") == 2  # trace and diagonal tables
    document = json.loads(out_json.read_text())
    assert document["num_params"] == 31 and document["reference"] == "ggn"
    records = {(r["estimator"], r["budget"]): r for r in document["records"]}
    names = ("hutchinson", "hutchpp", "xtrace", "hutchinson_diag", "xdiag")
    assert {n for n, _ in records} == set(names)
    assert ("hutchpp", 2) not in records  # below Hutch++'s minimum of 3 products
    for name in names:
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        for m, cell in zip((2, 8, 31), cells):
            if (name, m) in records:  # the table shows the JSON's numbers
                assert cell == f"{records[(name, m)]['rel_error']:.2e}"
            else:
                assert cell == "-"
        assert records[(name, 31)]["rel_error"] < 1e-10  # a budget of d is exact
        assert records[(name, 8)]["rel_error"] > 1e-6  # and a smaller one is not
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
