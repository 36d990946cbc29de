"""Optimizers on workloads (issue #23): MFAC at its defaults against AdamW, SGD, SOAP, Muon, PSGD.

For each workload of :mod:`workload_suite` and each optimizer: the lr grid of
``workload_suite.GRIDS`` on the tuning seed 0, then the best lr (lowest final validation loss)
on further seeds (the tuning run counts as the first seed). Reports per optimizer the final
validation loss (mean ± sd over seeds), steps and CPU seconds to reach AdamW's mean final
validation loss (the target), and the iteration time as a ratio to AdamW's, measured interleaved
after warm-up. Unknown names, missing optional dependencies and diverging runs are rows of the
table, not errors.

Usage::

    python benchmarks/workloads.py [--workloads char_lm digits_ae digits_cnn]
        [--optimizers AdamW MFAC ...] [--seeds 3] [--out results/workloads] [--plots docs/img]
    python benchmarks/workloads.py --render   # tables and plots from the saved JSON only

Each run pins one intra-op thread; results go to ``--out`` as JSON after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload_suite as W  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _merge_base(path: Path, optimizers: list[str], rename: dict[str, str]) -> dict | None:
    """Saved results without the optimizers about to be rerun (others renamed as asked)."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    for r in data["tuning"]:
        r["optimizer"] = rename.get(r["optimizer"], r["optimizer"])
    for key in ("seeds", "best"):
        data[key] = {rename.get(k, k): v for k, v in data[key].items()}
    for runs in data["seeds"].values():
        for r in runs:
            r["optimizer"] = rename.get(r["optimizer"], r["optimizer"])
    data["tuning"] = [r for r in data["tuning"] if r["optimizer"] not in optimizers]
    for key in ("seeds", "best"):
        data[key] = {k: v for k, v in data[key].items() if k not in optimizers}
    return data


def study(
    workload: str,
    optimizers: list[str],
    seeds: int,
    out: Path,
    steps: int | None,
    merge: bool = False,
    rename: dict[str, str] | None = None,
) -> dict:
    """Tune, rerun on seeds and time one workload; saves ``out/<workload>.json`` as it goes.

    With ``merge``, the saved results of other optimizers are kept (after ``rename``), the
    optimizers given run only the grid points not saved yet (seeds again only if the best lr
    changed), and the iteration times are measured again for all of them.
    """
    data: dict = {"workload": workload, "tuning": [], "seeds": {}, "best": {}, "iter_s": {}}
    path = out / f"{workload}.json"
    extend: dict[str, dict] = {}  # with merge: saved runs of the optimizers run again
    if merge and path.exists():
        saved = _merge_base(path, [], rename or {})
        assert saved is not None
        for name in optimizers:
            extend[name] = {
                "tuning": [r for r in saved["tuning"] if r["optimizer"] == name],
                "best": saved["best"].get(name),
                "seeds": saved["seeds"].get(name),
            }
        data = _merge_base(path, optimizers, rename or {}) or data
    if workload not in W.WORKLOADS:
        data["error"] = f"unknown workload {workload!r} (known: {sorted(W.WORKLOADS)})"
        print(data["error"])
        _save(path, data)
        return data
    data["unit"] = W.WORKLOADS[workload].unit
    for name in optimizers:
        entry = W.lookup(name)
        grid = entry[1] if entry else (float("nan"),)
        done = [W.Outcome(**r) for r in extend.get(name, {}).get("tuning", [])]
        data["tuning"] += [asdict(o) for o in done]
        tuned = list(done)
        for lr in grid:  # saved after every run, so a stopped study keeps its tuning runs
            if lr not in {o.lr for o in done}:
                tuned.append(W.run(workload, name, lr, 0, steps))
                data["tuning"].append(asdict(tuned[-1]))
                _save(path, data)
        ok = [o for o in tuned if o.status == "ok" and math.isfinite(o.final)]
        for o in tuned:
            print(f"{workload} {name} lr={o.lr:g} seed 0: {o.status} {o.final:.4f} {o.detail}")
        if not ok:
            data["best"][name] = None
            _save(path, data)
            continue
        best = min(ok, key=lambda o: o.final)
        data["best"][name] = best.lr
        old = extend.get(name, {})
        if old.get("best") == best.lr and old.get("seeds"):  # the extension changed nothing
            data["seeds"][name] = old["seeds"]
            _save(path, data)
            continue
        runs = [best] + [W.run(workload, name, best.lr, s, steps) for s in range(1, seeds)]
        data["seeds"][name] = [asdict(o) for o in runs]
        print(f"{workload} {name} best lr {best.lr:g}: " + " ".join(f"{o.final:.4f}" for o in runs))
        _save(path, data)
    chosen = {k: v for k, v in data["best"].items() if v is not None}
    data["iter_s"] = W.iteration_times(workload, chosen)
    print(f"{workload} iteration seconds: {data['iter_s']}")
    _save(path, data)
    return data


def combine(base: dict, other: dict) -> dict:
    """``base`` plus the optimizers that only ``other`` (the same workload, run apart) has.

    Their iteration times enter as their ratio to AdamW measured interleaved in ``other``'s
    process, times ``base``'s AdamW time; tuning runs, seeds and best lr are copied.
    """
    if base.get("workload") != other.get("workload"):
        raise ValueError(f"cannot combine {base.get('workload')!r} with {other.get('workload')!r}")
    ours = set(base["best"]) | {r["optimizer"] for r in base["tuning"]}
    new = [k for k in dict.fromkeys(r["optimizer"] for r in other["tuning"]) if k not in ours]
    base["tuning"] += [r for r in other["tuning"] if r["optimizer"] in new]
    for key in ("seeds", "best"):
        base[key] |= {k: v for k, v in other[key].items() if k in new}
    a, b = other["iter_s"].get("AdamW"), base["iter_s"].get("AdamW")
    base["iter_s"] |= {
        k: other["iter_s"][k] / a * b for k in new if a and b and k in other["iter_s"]
    }
    return base


def _to_target(run: dict, target: float) -> tuple[int | None, float | None]:
    for s, c, v in zip(run["steps"], run["cpu"], run["val"]):
        if v <= target:
            return s, c
    return None, None


def _mean_curve(runs: list[dict]) -> dict | None:
    """The validation curve averaged over the finished seeds (steps, CPU seconds, loss)."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return None
    n = min(len(r["val"]) for r in ok)
    return {
        "steps": ok[0]["steps"][:n],
        "cpu": [statistics.mean(r["cpu"][i] for r in ok) for i in range(n)],
        "val": [statistics.mean(r["val"][i] for r in ok) for i in range(n)],
    }


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _order(data: dict) -> list[str]:
    """Optimizers of a result in the order of ``GRIDS`` (unknown names last)."""
    names = list(dict.fromkeys(r["optimizer"] for r in data["tuning"]))
    known = list(W.GRIDS) + list(W.ABLATIONS)
    return sorted(names, key=lambda n: known.index(n) if n in known else len(known))


def render(data: dict) -> str:
    """Markdown tables for one workload."""
    name = data["workload"]
    if "error" in data:
        return f"### {name}\n\n{data['error']}\n"
    unit = data.get("unit", "loss")
    adam = data["seeds"].get("AdamW")
    finals = {
        k: [r["val"][-1] for r in runs if r["status"] == "ok"] for k, runs in data["seeds"].items()
    }
    target = statistics.mean(finals["AdamW"]) if adam and finals.get("AdamW") else None
    adam_steps = _to_target(_mean_curve(adam), target)[0] if target is not None else None
    t_adam = data["iter_s"].get("AdamW")
    lines = [
        f"### {name}",
        "",
        f"Target: AdamW's mean final validation {unit} = {_fmt(target, '.4f')}.",
        "",
        "| optimizer | best lr | final val (mean ± sd, n) | steps to target (seeds reaching it) "
        "| × AdamW's steps | CPU s to target | iteration time × AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for opt in _order(data):
        lr = data["best"].get(opt)
        if opt not in data["best"]:  # a study stopped during this optimizer's grid
            tuned = [r for r in data["tuning"] if r["optimizer"] == opt]
            cells = ", ".join(f"{r['lr']:g}" for r in tuned)
            lines.append(
                f"| {opt} | — | not finished: stopped after seed-0 runs at lr {cells} "
                "| — | — | — | — |"
            )
            continue
        if lr is None:
            tuned = [r for r in data["tuning"] if r["optimizer"] == opt]
            why = "; ".join(sorted({f"{r['status']}: {r['detail']}" for r in tuned}))
            lines.append(f"| {opt} | — | {why} | — | — | — | — |")
            continue
        runs, f = data["seeds"][opt], finals[opt]
        bad = [r for r in runs if r["status"] != "ok"]
        sd = statistics.stdev(f) if len(f) > 1 else 0.0
        final = f"{statistics.mean(f):.4f} ± {sd:.4f} ({len(f)})" if f else "—"
        if bad:
            final += " " + "; ".join(f"seed {r['seed']} {r['status']}" for r in bad)
        hits = [_to_target(r, target) for r in runs] if target is not None else []
        got = [h for h in hits if h[0] is not None]  # seeds that reach the target on their own
        curve = _mean_curve(runs)
        steps, cpu = _to_target(curve, target) if target is not None and curve else (None, None)
        ratio = steps / adam_steps if steps and adam_steps else None
        t = data["iter_s"].get(opt)
        tr = t / t_adam if t and t_adam else None
        lines.append(
            f"| {opt} | {lr:g} | {final} | {_fmt(steps, '.0f')} ({len(got)}/{len(runs)}) "
            f"| {_fmt(ratio, '.2f')} | {_fmt(cpu, '.1f')} | {_fmt(tr, '.2f')} |"
        )
    lines += ["", "Tuning (seed 0, final validation loss per lr):", ""]
    lines += ["| optimizer | " + " | ".join(["lr: final"] * 1) + " |", "|---|---|"]
    for opt in _order(data):
        cells = [
            f"{r['lr']:g}: {_fmt(r['val'][-1] if r['status'] == 'ok' else None, '.4f')}"
            + ("" if r["status"] == "ok" else f" ({r['status']})")
            for r in data["tuning"]
            if r["optimizer"] == opt
        ]
        lines.append(f"| {opt} | " + ", ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, img: Path) -> Path | None:
    """Validation loss against steps and against CPU seconds (mean over seeds, best lr)."""
    if "error" in data or not data["seeds"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for opt, runs in data["seeds"].items():
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            continue
        n = min(len(r["val"]) for r in ok)
        val = [statistics.mean(r["val"][i] for r in ok) for i in range(n)]
        cpu = [statistics.mean(r["cpu"][i] for r in ok) for i in range(n)]
        style = dict(lw=2.2) if opt == "MFAC" else dict(lw=1.2)
        axes[0].plot(ok[0]["steps"][:n], val, label=opt, **style)
        axes[1].plot(cpu, val, label=opt, **style)
    for ax, xl in zip(axes, ("step", "CPU seconds (one thread)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(f"validation {data.get('unit', 'loss')}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{data['workload']}: mean over seeds at each optimizer's best lr")
    fig.tight_layout()
    img.mkdir(parents=True, exist_ok=True)
    path = img / f"workloads_{data['workload']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(W.WORKLOADS))
    ap.add_argument("--optimizers", nargs="+", default=list(W.GRIDS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="override every workload's steps")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "workloads")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--render", action="store_true", help="only tables/plots from saved JSON")
    ap.add_argument("--merge", action="store_true", help="keep saved results of other optimizers")
    ap.add_argument("--rename", nargs="*", default=[], help="OLD=NEW names in saved results")
    ap.add_argument(
        "--combine",
        nargs="*",
        type=Path,
        default=[],
        help="with --render: add the optimizers of results run apart in these folders",
    )
    ap.add_argument("--grid", nargs="*", default=[], help="NAME=lr,lr,... to override a grid")
    ap.add_argument(
        "--python",
        nargs="*",
        default=[],
        help="NAME=PATH: run optimizer NAME in that interpreter (another venv)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    md = []
    for item in args.grid + args.python:
        name, sep, value = item.partition("=")
        if not sep or not value:
            ap.error(f"expected NAME=VALUE, got {item!r}")
    for item in args.grid:
        name, _, lrs = item.partition("=")
        try:
            grid = tuple(float(x) for x in lrs.split(","))
        except ValueError:
            ap.error(f"--grid {item!r}: the lrs must be numbers separated by commas")
        entry = W.lookup(name)
        if entry is None:  # reported in the tables; the study goes on with the other grids
            md.append(f"--grid {item!r}: unknown optimizer {name!r}, ignored\n")
            print(md[-1])
        else:
            (W.GRIDS if name in W.GRIDS else W.ABLATIONS)[name] = (entry[0], grid)
    W.EXTERNAL_PYTHON.update(item.partition("=")[::2] for item in args.python)
    for wl in args.workloads:
        path = args.out / f"{wl}.json"
        if args.render:
            if not path.exists():
                md.append(f"### {wl}\n\nno results in {path}\n")
                continue
            data = json.loads(path.read_text())
            for folder in args.combine:
                if (folder / f"{wl}.json").exists():
                    data = combine(data, json.loads((folder / f"{wl}.json").read_text()))
            _save(path, data)
        else:
            rename = dict(item.split("=", 1) for item in args.rename)
            data = study(wl, args.optimizers, args.seeds, args.out, args.steps, args.merge, rename)
        md.append(render(data))
        plot(data, args.plots)
    text = "\n".join(md)
    print(text)
    (args.out / "tables.md").parent.mkdir(parents=True, exist_ok=True)
    (
        args.out / ("tables.md" if len(args.workloads) > 1 else f"tables_{args.workloads[0]}.md")
    ).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
