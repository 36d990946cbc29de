"""Presenting a :class:`~curvopt.bench.runner.BenchmarkResult`: a rich table and PNG plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: (record key, column title, format) of the terminal table, in order.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "{}"),
    ("ihvp_rel_error", "IHVP rel. err", "{:.2e}"),
    ("newton_cosine", "Newton cos", "{:.4f}"),
    ("top_eig_rel_error", "top-eig err", "{:.2e}"),
    ("time_s", "IHVP ms", "ms"),
    ("setup_time_s", "setup s", "{:.3f}"),
    ("peak_memory_bytes", "peak MiB", "MiB"),
    ("state_bytes", "state MiB", "MiB"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "ms":
        return f"{1e3 * value:.3f}"
    if fmt == "MiB":
        return f"{value / 2**20:.2f}"
    return fmt.format(value)


def table_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """The formatted cells of the table, one row per record (failed methods show their error)."""
    rows = []
    for r in document["results"]:
        if r["error"]:
            rows.append([r["method"], f"failed: {r['error']}"] + [""] * (len(TABLE_COLUMNS) - 2))
        else:
            rows.append([_cell(r[key], fmt) for key, _, fmt in TABLE_COLUMNS])
    return rows


def _title(document: Mapping[str, Any]) -> str:
    p, c, ref = document["problem"], document["config"], document["reference"]
    return (
        f"{p['name']}: {p['description']}\n"
        f"d = {p['num_params']}, N = {p['num_samples']}, loss = {p['loss_value']:.4f}; "
        f"reference: {ref['kind']} {ref['curvature']}, damping λ = {c['damping']:.3g}"
    )


def print_table(document: Mapping[str, Any], console: Any = None) -> None:
    """Print the results as a rich table (to ``console``, default standard output).

    Args:
        document: The JSON document (``BenchmarkResult.to_dict()``).
        console: A ``rich.console.Console``; by default one writing to stdout (120 columns wide
            when stdout is not a terminal).
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # files and pipes: wide enough for every column
            console = Console(width=max(console.width, 120))
    table = Table(title=escape(_title(document)), title_justify="left")
    for i, (_, title, _) in enumerate(TABLE_COLUMNS):
        table.add_column(escape(title), justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows(document):  # plain text: "[s]" or an error's "[...]" is not markup
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)


def markdown_table(document: Mapping[str, Any]) -> str:
    """The same table as GitHub-flavoured Markdown (for docs)."""
    head = "| " + " | ".join(t for _, t, _ in TABLE_COLUMNS) + " |"
    sep = "| --- |" + " ---: |" * (len(TABLE_COLUMNS) - 1)
    body = ["| " + " | ".join(row) + " |" for row in table_rows(document)]
    return "\n".join([head, sep, *body])


#: Errors below this are drawn at this value ("exact up to round-off") on the log axes.
EXACT_FLOOR = 1e-12


def _floor(x: float) -> float:
    return max(x, EXACT_FLOOR)


def save_plots(document: Mapping[str, Any], path: str | Path) -> Path:
    """Save a PNG with two panels: IHVP error vs M-FAC's ``m``, and IHVP error vs time per product.

    Left: M-FAC's error for each ``m`` (log-log), the other inexact methods as horizontal lines.
    Right: every method's error against its time per IHVP (log-log). Errors below
    :data:`EXACT_FLOOR` (exact methods, round-off only) are drawn at that floor.

    Args:
        document: The JSON document.
        path: Output file (``.png``); parent folders are created.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in document["results"] if not r["error"]]
    mfac = sorted((r for r in ok if r["m"] is not None), key=lambda r: r["m"])
    others = [r for r in ok if r["m"] is None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    if mfac:
        left.plot(
            [r["m"] for r in mfac],
            [_floor(r["ihvp_rel_error"]) for r in mfac],
            "o-",
            color="black",
            label="M-FAC",
        )
    for i, r in enumerate(others):
        if r["ihvp_rel_error"] < EXACT_FLOOR:
            continue  # exact up to round-off: a line at the floor would squash the others
        left.axhline(
            _floor(r["ihvp_rel_error"]),
            ls="--",
            lw=1,
            color=colors[i % len(colors)],
            label=r["method"],
        )
    left.set(xscale="log", yscale="log", xlabel="M-FAC gradients m", ylabel="IHVP relative error")
    left.set_title(f"error vs m (exact methods, error < {EXACT_FLOOR:.0e}, not drawn)", fontsize=10)
    left.legend(fontsize=7, loc="best")

    for r in ok:
        color = "black" if r["m"] is not None else colors[(others.index(r)) % len(colors)]
        right.scatter(r["time_s"], _floor(r["ihvp_rel_error"]), color=color)
        right.annotate(
            r["method"],
            (r["time_s"], _floor(r["ihvp_rel_error"])),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    right.set(xscale="log", yscale="log", xlabel="time per IHVP (s)", ylabel="IHVP relative error")
    right.set_title(
        f"error vs time (errors < {EXACT_FLOOR:.0e} drawn at {EXACT_FLOOR:.0e})", fontsize=10
    )
    p = document["problem"]
    fig.suptitle(
        f"{p['name']} (d = {p['num_params']}), reference {document['reference']['curvature']}, "
        f"λ = {document['config']['damping']:.3g}"
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summary_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One plain-text line per failed method (for the CLI's stderr)."""
    return [f"{r['method']}: {r['error']}" for r in records if r["error"]]
