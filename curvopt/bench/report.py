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
    from rich.text import Text

    if console is None:
        console = Console()
        if not console.is_terminal:  # files and pipes: wide enough for every column
            console = Console(width=max(console.width, 120))
    rows, failures = [], []
    for row in table_rows(document):  # an error goes under the tables, whole
        if row[1].startswith("failed: "):
            failures.append(f"{row[0]} {row[1]}")
            row = [row[0], "failed", *row[2:]]
        rows.append(row)
    title = escape(_title(document))
    groups = column_groups(rows, console.width, whole_headers=True)
    whole = len(groups) == 1  # headers on one line where everything fits, else wrapped
    if not whole:
        groups = column_groups(rows, console.width)
    for group in groups:
        table = Table(title=title, title_justify="left")
        title = None  # the title once, above the first part
        columns = [0, *group]
        for j in columns:
            width = _min_width(rows, j, whole)
            right = "right" if j else "left"
            # headers may wrap at spaces; values never (a number is cut by nothing)
            table.add_column(Text(TABLE_COLUMNS[j][1]), justify=right, width=width)
        for row in rows:  # plain Text: "[s]" or an error's "[...]" is not markup
            table.add_row(*(Text(row[j], no_wrap=True) for j in columns))
        console.print(table)
    for line in failures:
        console.print(escape(line), soft_wrap=True)


def _min_width(rows: Sequence[Sequence[str]], j: int, whole_headers: bool = False) -> int:
    """The narrowest column ``j`` can be: its longest value (never cut) or header (word)."""
    title = TABLE_COLUMNS[j][1]
    header = [len(title)] if whole_headers else [len(w) for w in title.split()]
    return max(header + [len(r[j]) for r in rows])


def column_groups(
    rows: Sequence[Sequence[str]], width: int, whole_headers: bool = False
) -> list[list[int]]:
    """Split the metric columns into consecutive groups whose tables fit ``width`` characters.

    Each group is printed as a table of its own beside the method column, so that no number is
    cut short on a narrow terminal (80 columns). Every group holds at least one column.

    Args:
        rows: The formatted cells (:func:`table_rows`, with a failure shown as ``"failed"``).
        width: The console's width in characters.
        whole_headers: Count each header on one line (else its longest word: headers wrap).

    Returns:
        Lists of column indices into :data:`TABLE_COLUMNS` (1, 2, ...), in order.
    """
    border = 3  # a rule and one space of padding on either side of each column
    first = _min_width(rows, 0, whole_headers) + border + 1
    groups: list[list[int]] = [[]]
    used = first
    for j in range(1, len(TABLE_COLUMNS)):
        need = _min_width(rows, j, whole_headers) + border
        if groups[-1] and used + need > width:
            groups.append([])
            used = first
        groups[-1].append(j)
        used += need
    return groups


def markdown_table(document: Mapping[str, Any]) -> str:
    """The same table as GitHub-flavoured Markdown (for docs)."""
    head = "| " + " | ".join(t for _, t, _ in TABLE_COLUMNS) + " |"
    sep = "| --- |" + " ---: |" * (len(TABLE_COLUMNS) - 1)
    body = ["| " + " | ".join(row) + " |" for row in table_rows(document)]
    return "\n".join([head, sep, *body])


#: Errors below this count as exact (round-off only): such methods get a strip of their own
#: under the error-vs-time panel instead of a point far below every approximation.
EXACT_FLOOR = 1e-12

#: Two methods whose IHVP errors differ by less than this (relatively) share one line/label.
COINCIDE_RTOL = 1e-6

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "*")


def _groups(records: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Records in groups whose IHVP errors coincide (e.g. GGN and Fisher for cross-entropy)."""
    groups: list[list[Mapping[str, Any]]] = []
    for r in records:
        e = r["ihvp_rel_error"]
        for g in groups:
            e0 = g[0]["ihvp_rel_error"]
            if abs(e - e0) <= COINCIDE_RTOL * max(abs(e), abs(e0)):
                g.append(r)
                break
        else:
            groups.append([r])
    return groups


def plot_figure(document: Mapping[str, Any]) -> Any:
    """The matplotlib figure of :func:`save_plots` (for saving or inspecting).

    Left: IHVP error against M-FAC's ``m`` (log-log), the other inexact methods as horizontal
    lines; methods with coinciding errors (relative difference below :data:`COINCIDE_RTOL`) share
    one line labelled ``"a = b"``. Right: every inexact method's error against its time per IHVP,
    one marker and colour per method (hollow, so coinciding points stay visible), named in a
    legend rather than by labels that could overlap. Exact methods (error below
    :data:`EXACT_FLOOR`) sit in a strip of their own under the right panel, at their time.

    Args:
        document: The JSON document (``BenchmarkResult.to_dict()``).

    Returns:
        A ``matplotlib.figure.Figure`` (close it with ``matplotlib.pyplot.close``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in document["results"] if not r["error"]]
    exact = [r for r in ok if r["ihvp_rel_error"] < EXACT_FLOOR]
    inexact = [r for r in ok if r["ihvp_rel_error"] >= EXACT_FLOOR]
    mfac = sorted((r for r in inexact if r["m"] is not None), key=lambda r: r["m"])
    others = [r for r in inexact if r["m"] is None]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {}  # method -> (color, marker), the same in every panel; one marker per method
    shades = plt.get_cmap("Greys")
    for i, r in enumerate(others + exact + mfac):
        j = i - len(others) - len(exact)  # index among the M-FAC sizes (grey shades)
        color = colors[i % len(colors)] if j < 0 else shades(0.45 + 0.55 * (j + 1) / len(mfac))
        style[r["method"]] = (color, _MARKERS[i % len(_MARKERS)])

    fig = plt.figure(figsize=(13, 5.2))
    rows = 2 if exact else 1
    grid = fig.add_gridspec(rows, 2, height_ratios=[7, 1][:rows], width_ratios=[1, 1.3])
    left = fig.add_subplot(grid[:, 0])
    right = fig.add_subplot(grid[0, 1])

    if mfac:
        left.plot(
            [r["m"] for r in mfac], [r["ihvp_rel_error"] for r in mfac], "o-", color="black",
            label="M-FAC",
        )  # fmt: skip
    linestyles = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
    for i, group in enumerate(_groups(others)):
        left.axhline(
            group[0]["ihvp_rel_error"],
            ls=linestyles[i % len(linestyles)],
            lw=1.2,
            color=style[group[0]["method"]][0],
            label=" = ".join(r["method"] for r in group),
        )
    left.set(xscale="log", yscale="log", xlabel="M-FAC gradients m", ylabel="IHVP relative error")
    title = "error vs m"
    if exact:
        title += f" (exact: {', '.join(r['method'] for r in exact)})"
    left.set_title(title, fontsize=10)
    if mfac or others:
        left.legend(  # below the axes: inside, it would cover the highest lines
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False
        )

    for r in inexact:
        color, marker = style[r["method"]]
        right.scatter(
            r["time_s"], r["ihvp_rel_error"], s=42, marker=marker, facecolors="none",
            edgecolors=[color], linewidths=1.4, label=r["method"],
        )  # fmt: skip
    right.set(xscale="log", yscale="log", ylabel="IHVP relative error")
    right.set_title("error vs time per IHVP", fontsize=10)
    if inexact:
        right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    if exact:
        strip = fig.add_subplot(grid[1, 1], sharex=right)
        for r in exact:
            color, marker = style[r["method"]]
            strip.scatter(r["time_s"], 0, s=42, marker=marker, color=color, label=r["method"])
        strip.set_yticks([])
        strip.set_ylabel(f"< {EXACT_FLOOR:.0e}", fontsize=7, rotation=0, ha="right", va="center")
        strip.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        strip.set_xlabel("time per IHVP (s)")
        right.tick_params(labelbottom=False)
    else:
        right.set_xlabel("time per IHVP (s)")
    p = document["problem"]
    fig.suptitle(
        f"{p['name']} (d = {p['num_params']}), reference {document['reference']['curvature']}, "
        f"λ = {document['config']['damping']:.3g}"
    )
    fig.tight_layout()
    return fig


def save_plots(document: Mapping[str, Any], path: str | Path) -> Path:
    """Save the figure of :func:`plot_figure` as a PNG.

    Args:
        document: The JSON document.
        path: Output file (``.png``); parent folders are created.

    Returns:
        The path written.
    """
    import matplotlib.pyplot as plt

    fig = plot_figure(document)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summary_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One plain-text line per failed method (for the CLI's stderr)."""
    return [f"{r['method']}: {r['error']}" for r in records if r["error"]]
