import json

from curvopt.cli import main


def test_prune_cli_writes_json_and_plot(tmp_path, capsys):
    args = [
        "prune",
        "--model",
        "mlp",
        "--dataset",
        "iris",
        "--sparsity",
        "0.5",
        "0.8",
        "--method",
        "mfac",
        "--steps",
        "2",
        "--hidden",
        "8",
        "--epochs",
        "5",
        "--num-grads",
        "8",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "acc. after" in out and "0.weight" in out
    result = json.loads((tmp_path / "prune_result.json").read_text())
    assert [r["target"] for r in result["results"]] == [0.5, 0.8]
    for r in result["results"]:
        total = sum(layer["numel"] for layer in r["layers"])
        assert abs(r["sparsity"] - round(r["target"] * total) / total) < 1e-12
        assert 0 <= r["accuracy_after"] <= 1 and len(r["steps"]) == 2
    assert (tmp_path / "prune_accuracy.png").stat().st_size > 1000


def test_prune_cli_rejects_bad_sparsity(tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        main(["prune", "--sparsity", "1.0", "--out", str(tmp_path)])


def test_prune_cli_rejects_bad_numbers_with_a_usage_error(tmp_path, capsys):
    import pytest

    for option, value in [("--num-grads", "0"), ("--block-size", "-3"), ("--damp", "nan")]:
        with pytest.raises(SystemExit) as exc:
            main(["prune", option, value, "--out", str(tmp_path)])
        assert exc.value.code == 2
        assert option in capsys.readouterr().err
