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
