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
    captured = capsys.readouterr()
    # progress goes to stderr, one line per stage before it starts; the results to stdout
    progress = captured.err.splitlines()
    assert [line[:5] for line in progress] == ["[1/3]", "[2/3]", "[3/3]"]
    lines = captured.out.splitlines()
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


# --- a plain install: fast --help/--version, missing extras --------------------------------------

import json  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

from curvopt.cli import SUBCOMMANDS  # noqa: E402

# Runs `main(argv)` in a fresh interpreter where the top-level modules BLOCKED cannot be imported
# (as after a plain `pip install curvopt`), then prints the exit status and what got imported.
_RUNNER = textwrap.dedent(
    """
    import json, sys
    BLOCKED, argv = set(sys.argv[1].split(",")) - {""}, json.loads(sys.argv[2])

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Block())
    from curvopt.cli import main
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
    """
)


def _run_cli(argv, blocked=()):
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, ",".join(blocked), json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    *lines, last = proc.stderr.strip().splitlines()
    result = json.loads(last)
    return result["code"], proc.stdout, "\n".join(lines), set(result["modules"])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_help_and_version_import_neither_torch_nor_subcommands(argv):
    code, out, err, modules = _run_cli(argv)
    assert code == 0 and "curvopt" in out, err
    assert "torch" not in modules and "numpy" not in modules
    for command in SUBCOMMANDS.values():
        assert command.module not in modules


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_missing_extra_exits_2_with_one_line_naming_it(command):
    blocked = SUBCOMMANDS[command].needs
    code, out, err, modules = _run_cli([command], blocked=blocked)
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"curvopt {command}: needs ") and 'pip install "curvopt[bench]"' in err
    assert "torch" not in modules  # refused before any work


def test_extra_needed_by_one_option_is_named_too():
    # the tinylm problem is the only one that needs transformers ([lm])
    code, out, err, _ = _run_cli(["bench", "--problem", "tinylm"], blocked=["transformers"])
    assert code == 2
    assert err.splitlines()[-1] == (
        'curvopt bench: needs transformers (not installed); install with: pip install "curvopt[lm]"'
    )
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["frobnicate"], ["--frobnicate"], ["demo", "--frobnicate"]])
def test_unknown_command_or_option_is_one_usage_error(argv):
    code, out, err, _ = _run_cli(argv)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(("curvopt: error:", "curvopt demo: error:"))
