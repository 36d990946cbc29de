import json

import pytest

from curvopt.cli import main


def test_prune_cli_writes_json_and_plot(tmp_path, capsys, monkeypatch):
    import curvopt.prune.cli as prune_cli

    plotted = {}
    plot = prune_cli.plot_accuracy
    monkeypatch.setattr(
        prune_cli,
        "plot_accuracy",
        lambda curves, *a, **k: plotted.update(curves) or plot(curves, *a, **k),
    )
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
    assert "time [s]" in out  # not eaten as rich markup
    result = json.loads((tmp_path / "prune_result.json").read_text())
    assert [r["target"] for r in result["results"]] == [0.5, 0.8]
    for r in result["results"]:
        total = sum(layer["numel"] for layer in r["layers"])
        assert abs(r["sparsity"] - round(r["target"] * total) / total) < 1e-12
        assert 0 <= r["accuracy_after"] <= 1 and len(r["steps"]) == 2
    assert (tmp_path / "prune_accuracy.png").stat().st_size > 1000
    # the plot has the magnitude baseline at the same targets beside the method
    assert list(plotted) == ["mfac", "magnitude"]
    assert plotted["mfac"] == [(r["sparsity"], r["accuracy_after"]) for r in result["results"]]
    base = [r["magnitude"] for r in result["results"]]
    assert plotted["magnitude"] == [(b["sparsity"], b["accuracy_after"]) for b in base]
    assert [b["sparsity"] for b in base] == [r["sparsity"] for r in result["results"]]


def test_prune_cli_single_sparsity_writes_the_plot_too(tmp_path, capsys):
    out = tmp_path / "new" / "folder"
    argv = ["prune", "--dataset", "iris", "--sparsity", "0.5", "--steps", "1", "--hidden", "8"]
    argv += ["--epochs", "2", "--num-grads", "4", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "prune_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "prune_result.json").read_text())["results"][0]["target"] == 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "1.0"], "--sparsity"),
        (["--sparsity", "0.5", "-0.1"], "--sparsity"),
        (["--model", "cnn", "--dataset", "iris"], "image dataset"),
        (["--seed", str(2**70)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--epochs", "-1"], "--epochs"),
        (["--steps", "1.5"], "--steps"),
    ],
)
def test_prune_cli_bad_values_exit_2_with_usage(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: curvopt prune" in err and message in err


def test_prune_cli_checks_the_output_folder_before_training(tmp_path, capsys, monkeypatch):
    import curvopt.prune.cli as prune_cli

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(prune_cli, "train", no_training)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(SystemExit) as exc:
            main(["prune", "--out", str(out)])
        assert exc.value.code == 2
        assert "usage: curvopt prune" in capsys.readouterr().err


def test_prune_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option, default in [("--steps STEPS", "16"), ("--seed SEED", "0"), ("--damp DAMP", "1.0")]:
        assert option in out
        assert f"(default: {default})" in out.split(option, 2)[-1].split("--", 1)[0]
    assert "(default: the current folder" in out
    assert out.count("(default") >= 15


def test_prune_cli_rejects_bad_numbers_with_a_usage_error(tmp_path, capsys):
    for option, value in [("--num-grads", "0"), ("--block-size", "-3"), ("--damp", "nan")]:
        with pytest.raises(SystemExit) as exc:
            main(["prune", option, value, "--out", str(tmp_path)])
        assert exc.value.code == 2
        assert option in capsys.readouterr().err


@pytest.mark.parametrize("method", ["magnitude", "mfac", "layerwise"])
def test_prune_cli_with_a_2_4_pattern(tmp_path, capsys, method):
    argv = ["prune", "--dataset", "iris", "--pattern", "2:4", "--method", method, "--steps", "2"]
    argv += ["--hidden", "8", "--epochs", "3", "--num-grads", "8", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "pattern 2:4" in capsys.readouterr().out
    result = json.loads((tmp_path / "prune_result.json").read_text())["results"][0]
    assert result["target"] == 0.5 and result["pattern"] == "2:4" and result["sparsity"] == 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pattern", "2-4"], "look like 'n:m'"),
        (["--pattern", "4:4"], "1 <= n < m"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "disagrees"),
        (["--method", "layerwise"], "--scope layer"),
    ],
)
def test_prune_cli_rejects_bad_patterns(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--dataset", "iris", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
