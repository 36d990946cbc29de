"""What every benchmark script shares: device-aware timing, interleaved rounds, tables, JSON, plots.

The scripts in ``benchmarks/`` run as ``python benchmarks/NAME.py`` (this folder is then first on
``sys.path``, so ``import harness`` finds this file). One module, so that two scripts never time,
print or save the same thing in two ways.

**Timing.** Wall time is ``time.perf_counter``. With ``device`` a CUDA device, the device is
synchronized before the clock starts and before it stops (kernels launch asynchronously, so an
unsynchronized clock measures the launch, not the work); :func:`side_by_side` uses CUDA events
there. Reported numbers are medians: robust to the odd slow round on a shared machine.

**Interleaving.** Functions compared with each other are called in turn, round by round
(:func:`interleaved`, :func:`side_by_side`): a change of machine load during the run (another job,
thermal throttling) then hits all of them alike, and ratios stay meaningful.

**Tables.** GitHub markdown: ``| a | b |`` rows under a ``|---|---|`` rule (alignment marks
``---:`` and a spaced ``| --- |`` rule on request; a padded variant that also reads as plain
text), printed and flushed at once so a long run shows progress. Fixed-width text tables that a
script prints for the terminal (kernel_bandwidth, pg_rates) stay in the script.

Example:
    >>> seconds, out = timed(lambda: sum(range(10)), repeats=3)
    >>> out, seconds >= 0
    (45, True)
    >>> print("\\n".join(table_lines(["n", "ms"], [[1, "0.50"]])))
    | n | ms |
    |---|---|
    | 1 | 0.50 |
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ timing
def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    import torch

    return torch.device(device).type == "cuda"


def synchronize(device: Any = None) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU or for ``None``)."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def clock(device: Any = None) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (split timings)."""
    synchronize(device)
    return time.perf_counter()


class Stopwatch:
    """Elapsed wall seconds (``.seconds``) and this thread's CPU seconds (``.cpu_seconds``) of a
    ``with`` block, synchronizing ``device``.

    Args:
        device: Synchronized at entry and exit when it is a CUDA device; ``None``: the CPU.

    Example:
        >>> with Stopwatch() as watch:
        ...     _ = sum(range(100))
        >>> watch.seconds >= 0
        True
    """

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.seconds = self.cpu_seconds = float("nan")
        self._start = self._cpu_start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = clock(self.device)
        self._cpu_start = time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.cpu_seconds = time.thread_time() - self._cpu_start
        self.seconds = time.perf_counter() - self._start


def timed(fn: Callable[[], Any], repeats: int, device: Any = None) -> tuple[float, Any]:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, and the last call's result.

    Raises:
        ValueError: If ``repeats < 1``.
    """
    medians, outs = interleaved([fn], repeats, device)
    return medians[0], outs[0]


def interleaved(
    fns: Sequence[Callable[[], Any]], repeats: int, device: Any = None
) -> tuple[list[float], list[Any]]:
    """Median wall seconds of each function, calling them in turn ``repeats`` times.

    Round ``r`` calls ``fns[0]``, ``fns[1]``, ... once each, so all see the same machine load.

    Returns:
        ``(medians, outs)``: one median per function (seconds) and each one's last result.

    Raises:
        ValueError: If ``repeats < 1``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    times: list[list[float]] = [[] for _ in fns]
    outs: list[Any] = [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            with Stopwatch(device) as watch:
                outs[k] = fn()
            times[k].append(watch.seconds)
    return [statistics.median(t) for t in times], outs


def side_by_side(
    fns: Mapping[str, Callable[[], Any]], rounds: int, inner: int = 3, device: Any = "cpu"
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed round by round in turn.

    Every function is called once first (compilation, autotuning, the allocator), then each
    round times ``inner`` back-to-back calls of each function. On CUDA the calls are timed with
    CUDA events; elsewhere with ``time.perf_counter``.

    Raises:
        ValueError: If ``rounds < 1`` or ``inner < 1``.
    """
    for name, value in (("rounds", rounds), ("inner", inner)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    cuda = _is_cuda(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    if cuda:
        import torch

        torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            if cuda:
                stop.record()
                stop.synchronize()
                times[name].append(start.elapsed_time(stop) / inner)
            else:
                times[name].append(1e3 * (time.perf_counter() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def median(values: Sequence[float]) -> float:
    """The median (``statistics.median``) of a non-empty sequence."""
    return statistics.median(values)


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals below 10 s, else as ``"12.3 s"``."""
    return f"{1e3 * seconds:.2f}" if seconds < 10 else f"{seconds:.1f} s"


# ------------------------------------------------------------------------------------ tables
def table_row(cells: Sequence[Any]) -> str:
    """One markdown row: ``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_rule(columns: int, align: str | None = None, spaced: bool = False) -> str:
    """The rule under the header: ``|---|---|``.

    Args:
        columns: Number of columns.
        align: Optional alignment, one of ``l``/``r``/``c`` per column (``---``, ``---:``,
            ``:---:``).
        spaced: Spaces around the marks: ``| --- | ---: |`` instead of ``|---|---:|``.

    Raises:
        ValueError: If ``align`` does not have one letter ``l``, ``r`` or ``c`` per column.
    """
    if align is not None and (len(align) != columns or set(align) - set("lrc")):
        raise ValueError(f"align needs one of l/r/c per column ({columns}), got {align!r}")
    marks = [{"l": "---", "r": "---:", "c": ":---:"}[a] for a in (align or "l" * columns)]
    if spaced:
        return "| " + " | ".join(marks) + " |"
    return "|" + "|".join(marks) + "|"


def table_lines(
    header: Sequence[Any],
    rows: Sequence[Sequence[Any]] = (),
    align: str | None = None,
    padded: bool = False,
    spaced: bool = False,
) -> list[str]:
    """A markdown table as lines: header, rule, rows (cells formatted with ``str``).

    ``align`` and ``spaced`` shape the rule (:func:`table_rule`). With ``padded`` every column is
    left-justified to its widest cell and the rule is dashes of that width (readable as plain
    text too).

    Raises:
        ValueError: If ``padded`` is combined with ``align`` or ``spaced``.
    """
    if not padded:
        rule = table_rule(len(header), align, spaced)
        return [table_row(header), rule] + [table_row(r) for r in rows]
    if align is not None or spaced:
        raise ValueError("a padded table has plain dashes: no align or spaced with padded")
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return [lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]]


def print_table(
    header: Sequence[Any],
    rows: Sequence[Sequence[Any]] = (),
    title: str | None = None,
    align: str | None = None,
    padded: bool = False,
    spaced: bool = False,
) -> None:
    """Print a markdown table (after a ``### title`` heading if given) and flush stdout.

    The table is :func:`table_lines` of ``header``, ``rows``, ``align``, ``padded``, ``spaced``.
    """
    if title is not None:
        print(f"\n### {title}\n")
    print("\n".join(table_lines(header, rows, align, padded, spaced)))
    sys.stdout.flush()


def print_row(cells: Sequence[Any]) -> None:
    """Print one more row of a table whose rows arrive one by one, and flush."""
    print(table_row(cells), flush=True)


# ------------------------------------------------------------------------------------ files
def write_json(
    path: str | pathlib.Path, obj: Any, indent: int | None = 1, default: Callable | None = str
) -> pathlib.Path:
    """Write ``obj`` as JSON, atomically (a killed run leaves the last complete file).

    The folder is created. ``default`` turns what JSON cannot hold (paths, dtypes) into text.
    Returns the path.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=default))
    tmp.replace(path)
    return path


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use: optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | pathlib.Path, dpi: int = 110, close: bool = True) -> pathlib.Path:
    """``fig.savefig(path, dpi=dpi)`` into a created folder, then close the figure (``close``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    if close:
        pyplot().close(fig)
    return path


def add_repo_paths(*folders: str) -> None:
    """Put folders of the repository (relative to its root) first on ``sys.path``, once each.

    For helpers that live outside this folder (``tests/distributed``'s process launcher) and for
    scripts loaded from elsewhere that import their sibling scripts (``"benchmarks"``).
    """
    for folder in reversed(folders):
        path = str(ROOT / folder)
        if path not in sys.path:
            sys.path.insert(0, path)


__all__ = [
    "ROOT",
    "Stopwatch",
    "add_repo_paths",
    "clock",
    "fmt_ms",
    "interleaved",
    "median",
    "print_row",
    "print_table",
    "pyplot",
    "save_figure",
    "side_by_side",
    "synchronize",
    "table_lines",
    "table_row",
    "table_rule",
    "timed",
    "write_json",
]
