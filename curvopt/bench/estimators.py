"""Error of the trace and diagonal estimators against their budget of matrix-vector products.

For an operator ``A`` with known exact trace and diagonal (a dense reference, or ``d`` identity
products), every estimator of `curvopt.curvature.estimators` runs at each budget
``m`` over several seeds; the records give the relative root-mean-square error

$$
\\mathrm{err}(m) = \\sqrt{\\tfrac{1}{S}\\textstyle\\sum_s \\|\\hat t_s(m) - t\\|^2} \\,/\\, \\|t\\|
$$

(``t`` the trace or the diagonal), so Hutchinson's ``1/\\sqrt{m}`` and Hutch++/XTrace's faster
decay on decaying spectra can be read off one table (`format_table`).

Example:
    >>> A = torch.diag(torch.linspace(1.0, 2.0, 30, dtype=torch.float64))
    >>> recs = estimator_errors(A, budgets=[6, 30], num_seeds=3)
    >>> max(r["rel_error"] for r in recs if r["budget"] == 30 and r["estimator"] == "xtrace")
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from curvopt.curvature import as_operator
from curvopt.curvature import estimators as est

TRACE = {"hutchinson": est.hutchinson_trace, "hutchpp": est.hutchpp_trace, "xtrace": est.xtrace}
DIAGONAL = {"hutchinson_diag": est.hutchinson_diag, "xdiag": est.xdiag}
MINIMUM = {"hutchpp": 3, "xtrace": 2, "xdiag": 2}


def estimator_errors(
    A: Any,
    budgets: Sequence[int],
    num_seeds: int = 10,
    estimators: Sequence[str] | None = None,
    exact_diagonal: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Relative RMS error of each estimator at each budget (see the module docstring).

    Args:
        A: A square operator (curvature operator, `SquareOperator`, dense tensor).
        budgets: Numbers of products; budgets below an estimator's minimum are skipped.
        num_seeds: Seeds ``0 .. S-1`` per budget.
        estimators: Names from ``TRACE`` and ``DIAGONAL`` (default: all).
        exact_diagonal: ``diag(A)``; computed from ``d`` products if None.

    Returns:
        Records ``{"estimator", "quantity", "budget", "rel_error", "seeds"}``.

    Raises:
        ValueError: For an unknown estimator, an empty budget list or ``num_seeds < 1``.
    """
    op = as_operator(A)
    names = list(estimators) if estimators is not None else [*TRACE, *DIAGONAL]
    unknown = [n for n in names if n not in TRACE and n not in DIAGONAL]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; choose from {[*TRACE, *DIAGONAL]}")
    if not budgets or num_seeds < 1:
        raise ValueError("need at least one budget and num_seeds >= 1")
    diag = exact_diagonal if exact_diagonal is not None else est.hutchinson_diag(op, op.shape[0])
    trace = diag.sum()
    records = []
    for name in names:
        fn, truth = (TRACE[name], trace) if name in TRACE else (DIAGONAL[name], diag)
        for m in budgets:
            if m < MINIMUM.get(name, 1):
                continue
            sq = 0.0
            for s in range(num_seeds):
                value = fn(op, m, generator=torch.Generator(device=op.device).manual_seed(s))
                sq += float(((value - truth) ** 2).sum())
            records.append(
                {
                    "estimator": name,
                    "quantity": "trace" if name in TRACE else "diagonal",
                    "budget": int(m),
                    "rel_error": math.sqrt(sq / num_seeds) / float(truth.norm()),
                    "seeds": num_seeds,
                }
            )
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per estimator, one column per budget.

    Example:
        >>> print(format_table([{"estimator": "xtrace", "budget": 4, "rel_error": 0.5}]))
        | estimator | m=4 |
        | --- | ---: |
        | xtrace | 5.00e-01 |
    """
    budgets = sorted({r["budget"] for r in records})
    names = list(dict.fromkeys(r["estimator"] for r in records))
    cell = {(r["estimator"], r["budget"]): r["rel_error"] for r in records}
    lines = [
        "| estimator | " + " | ".join(f"m={m}" for m in budgets) + " |",
        "| --- | " + " | ".join("---:" for _ in budgets) + " |",
    ]
    for n in names:
        row = [f"{cell[(n, m)]:.2e}" if (n, m) in cell else "-" for m in budgets]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


#: Errors below this are drawn at it on the log-scaled plot (an exact estimate has error 0).
PLOT_FLOOR = 1e-16


def plot_figure(records: Sequence[dict[str, Any]], title: str) -> Any:
    """Relative RMS error against the number of matrix-vector products, log-log.

    One line per estimator (trace estimators solid, diagonal estimators dashed); errors below
    `PLOT_FLOOR` (exact estimates) are drawn at it.

    Args:
        records: Output of `estimator_errors`.
        title: The figure title (problem, operator, seeds).

    Returns:
        A ``matplotlib.figure.Figure`` (close it with ``matplotlib.pyplot.close``).
    """
    import matplotlib  # noqa: PLC0415 - optional dependency (the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in dict.fromkeys(r["estimator"] for r in records):
        rows = sorted((r for r in records if r["estimator"] == name), key=lambda r: r["budget"])
        style = "o-" if rows[0]["quantity"] == "trace" else "s--"
        ax.plot(
            [r["budget"] for r in rows],
            [max(r["rel_error"], PLOT_FLOOR) for r in rows],
            style,
            label=f"{name} ({rows[0]['quantity']})",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="matrix-vector products (budget m)",
        ylabel="relative RMS error",
    )
    budgets = sorted({r["budget"] for r in records})
    ax.set_xticks(budgets, [str(m) for m in budgets])
    ax.minorticks_off()
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_plot(records: Sequence[dict[str, Any]], path: Any, title: str) -> Any:
    """Write the figure of `plot_figure` as a PNG (parent folders are created); return the path."""
    from pathlib import Path  # noqa: PLC0415

    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = plot_figure(records, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
