"""benchmarks/harness.py: the timing, table and file helpers every benchmark script uses."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import harness  # noqa: E402


def test_interleaved_calls_the_functions_in_turn_and_returns_medians_and_last_results():
    calls = []

    def make(name):
        def fn():
            calls.append(name)
            return len(calls)

        return fn

    medians, outs = harness.interleaved([make("a"), make("b")], repeats=3)
    assert calls == ["a", "b"] * 3
    assert outs == [5, 6] and len(medians) == 2 and all(t >= 0 for t in medians)
    seconds, out = harness.timed(lambda: "x", repeats=2)
    assert out == "x" and seconds >= 0


def test_side_by_side_warms_up_once_then_times_rounds_of_inner_calls():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    ms = harness.side_by_side({"a": lambda: bump("a"), "b": lambda: bump("b")}, 4, inner=2)
    assert calls == {"a": 1 + 4 * 2, "b": 1 + 4 * 2}
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_repeat_counts_are_checked(bad):
    with pytest.raises(ValueError, match="repeats"):
        harness.interleaved([lambda: None], bad)
    with pytest.raises(ValueError, match="rounds"):
        harness.side_by_side({"a": lambda: None}, bad)


def test_tables_are_github_markdown(capsys):
    assert harness.table_lines(["n", "ms"], [[1, "0.50"], ["2", 3.0]]) == [
        "| n | ms |",
        "|---|---|",
        "| 1 | 0.50 |",
        "| 2 | 3.0 |",
    ]
    assert harness.table_rule(3, "lrc") == "|---|---:|:---:|"
    assert harness.table_rule(3, "lrc", spaced=True) == "| --- | ---: | :---: |"
    assert harness.table_rule(2, spaced=True) == "| --- | --- |"
    with pytest.raises(ValueError, match="align"):
        harness.table_rule(2, "l")
    harness.print_table(["a"], [[1]], title="T")
    harness.print_row(["x", 2])
    assert capsys.readouterr().out == "\n### T\n\n| a |\n|---|\n| 1 |\n| x | 2 |\n"


def test_fmt_ms_switches_to_seconds_at_ten():
    assert harness.fmt_ms(0.01234) == "12.34"
    assert harness.fmt_ms(12.34) == "12.3 s"


def test_write_json_creates_the_folder_and_leaves_no_temporary(tmp_path):
    path = harness.write_json(tmp_path / "a" / "r.json", {"p": Path("x"), "v": [1, 2]})
    assert json.loads(path.read_text()) == {"p": "x", "v": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_stopwatch_and_save_figure(tmp_path):
    with harness.Stopwatch() as watch:
        sum(range(1000))
    assert watch.seconds >= 0
    pytest.importorskip("matplotlib")
    plt = harness.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = harness.save_figure(fig, tmp_path / "img" / "f.png", dpi=50)
    assert out.stat().st_size > 0 and not plt.get_fignums()


def test_padded_tables_justify_columns():
    assert harness.table_lines(["a", "bb"], [["xxx", 1]], padded=True) == [
        "| a   | bb |",
        "|-----|----|",
        "| xxx | 1  |",
    ]
    with pytest.raises(ValueError, match="padded"):
        harness.table_lines(["a"], padded=True, align="l")


def test_stopwatch_measures_cpu_time_too():
    with harness.Stopwatch() as watch:
        sum(range(10000))
    assert 0 <= watch.cpu_seconds and 0 <= watch.seconds
