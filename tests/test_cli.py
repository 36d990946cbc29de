import subprocess
import sys

import curvopt
from curvopt.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert curvopt.__version__ in capsys.readouterr().out


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "curvopt.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in out and "--version" in out


def test_demo_matches_dense(capsys):
    assert main(["demo", "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines if ln.strip()[:1].isdigit() and len(ln.split()) == 3]
    assert len(rows) == 3
    for _, free, dense in rows:
        assert abs(float(free) - float(dense)) <= 1e-6 * max(1.0, abs(float(dense)))


def test_demo_bad_values_exit_2_with_usage(capsys):
    import pytest

    for argv, message in [
        (["--k", "0"], "positive integer"),
        (["--k", "650"], "at most 649"),
        (["--seed", str(2**70)], "--seed"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["demo", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "usage: curvopt demo" in err and message in err


def test_every_subcommand_help_shows_defaults(capsys):
    import pytest

    for command in ("demo", "bench", "prune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "default" in out and "--seed" in out
