"""The benchmark scripts' plots: legends without NaN, axes that span the data, titles."""

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import pg_rates  # noqa: E402
from harness import pyplot  # noqa: E402


def test_rate_panel_spans_the_reached_epsilons_and_names_no_nan_slope():
    plt = pyplot()
    n = len(pg_rates.EPSILONS)
    one = np.full(n, np.nan)
    one[0] = 850.0  # one ε reached: no slope
    three = np.full(n, np.nan)
    three[:3] = [170.0, 900.0, 1700.0]
    rates = {"A": (one, math.nan), "B": (three, pg_rates.fit_slope(three)[0])}
    fig, ax = plt.subplots()
    try:
        pg_rates.draw_rates(ax, rates, budget=2000)
        labels = ax.get_legend_handles_labels()[1]
        assert not any("nan" in label.lower() for label in labels), labels
        assert labels[0] == "A (1 ε reached, no slope)" and labels[1].startswith("B (slope ")
        last = 1 / pg_rates.EPSILONS[2]  # the smallest ε reached
        lo, hi = ax.get_xlim()
        assert last <= hi <= 1.2 * last and lo >= 1 / pg_rates.EPSILONS[0] / 1.2
        for line in ax.get_lines():  # the guides stop where the data stop
            assert max(line.get_xdata()) <= last * (1 + 1e-12)
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert np.allclose(ticks, 1 / np.asarray(pg_rates.EPSILONS[:3]))
        fig.canvas.draw()
        assert not any(t.get_text() for t in ax.get_xminorticklabels())  # no colliding labels
    finally:
        plt.close(fig)


def test_return_panel_states_the_horizon_and_names_the_threshold_line():
    import policy_gradient

    plt = pyplot()
    cfg = policy_gradient.ENVS["CartPole-v1"]
    grid = np.arange(0, cfg[3] + 1, cfg[4])
    rng = np.random.default_rng(0)
    curves = {m: rng.uniform(0, cfg[2], (3, len(grid))) for m in ("REINFORCE", "NPG")}
    fig, ax = plt.subplots()
    try:
        policy_gradient.draw_returns(ax, "CartPole-v1", cfg, grid, curves)
        title = ax.get_title()
        assert f"H = {cfg[2]}" in title and f"return ≤ {cfg[2]}" in title and "3 seeds" in title
        labels = ax.get_legend_handles_labels()[1]
        assert labels == ["REINFORCE", "NPG", f"threshold {cfg[5]:g}"]  # every line is named
    finally:
        plt.close(fig)


def test_capo_plots_have_titles(monkeypatch):
    import argparse

    import capo

    figures = {}
    monkeypatch.setattr(capo, "save_figure", lambda fig, path: figures.setdefault(path.name, fig))
    rng = np.random.default_rng(1)

    def history(n=30):
        keys = ("reward", "rejected_fraction", "realized_head_kl", "realized_kl", "predicted_kl")
        return {k: list(rng.uniform(1e-4, 1, n)) for k in keys}

    arms = [("GRPO", 1e-3, None), ("CAPO", 1e-3, 0.5)]
    results = {name: [history(), history()] for name, _, _ in arms}
    args = argparse.Namespace(quick=True, prompts=2, seeds=2)
    try:
        capo.plot(results, arms, args)
        assert set(figures) == {"capo_reward.png", "capo_rejected.png", "capo_kl.png"}
        for name, fig in figures.items():
            titles = [ax.get_title() for ax in fig.axes]
            suptitle = fig._suptitle.get_text() if fig._suptitle else ""
            assert all(titles), name  # every panel says what it shows
            assert "2 seeds" in " ".join(titles) + suptitle, name
    finally:
        for fig in figures.values():
            pyplot().close(fig)
