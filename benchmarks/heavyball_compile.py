"""heavyball's compiled mode on the CPU: compile (warm-up) time apart from the iteration ratio.

For each heavyball optimizer (SOAP, MuonAdamW, PSGDKron) on a workload of
:mod:`workload_suite`: one model trained with heavyball's default ``torch.compile`` mode
(``heavyball.utils.compile_mode``, ``"max-autotune-no-cudagraphs"`` in 3.2.1) and one eagerly
(``compile_mode = None``), next to AdamW. The first ``--warmup`` steps of the compiled optimizer
are timed apart (wall and CPU seconds: this is the compile time a user pays once); then
``--rounds`` interleaved rounds (one iteration of each runner per round) give the median
iteration time of each as a ratio to AdamW's. A compile that fails is recorded with its error
and the optimizer is reported eager only. One torch thread.

Usage::

    python benchmarks/heavyball_compile.py [--workloads digits_ae char_lm] [--rounds 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import workload_suite as W  # noqa: E402

OPTIMIZERS = ("SOAP", "MuonAdamW", "PSGDKron")


def _runner(workload: str, make, mode_setter):
    model, batch_loss, _ = W.WORKLOADS[workload].build(0)
    opt = make(model.parameters())

    def it():
        mode_setter()
        opt.zero_grad(set_to_none=True)
        batch_loss(0).backward()
        opt.step()

    return it


def measure(
    workload: str, lr: float, warmup: int, rounds: int, names: tuple[str, ...] = OPTIMIZERS
) -> list[dict]:
    """One row per heavyball optimizer: compile seconds and iteration ratios to AdamW."""
    import heavyball

    compiled_mode = heavyball.utils.compile_mode

    def set_mode(mode):
        def setter():
            heavyball.utils.compile_mode = mode

        return setter

    rows = []
    adamw = _runner(workload, lambda ps: torch.optim.AdamW(ps, lr=lr), lambda: None)
    for name in names:
        cls = getattr(heavyball, name)
        row: dict = {"workload": workload, "optimizer": name, "mode": "compiled"}
        eager = _runner(workload, lambda ps, cls=cls: cls(ps, lr=lr), set_mode(None))
        comp = _runner(workload, lambda ps, cls=cls: cls(ps, lr=lr), set_mode(compiled_mode))
        for _ in range(warmup):  # the eager and AdamW runners warm up too (no compile)
            eager(), adamw()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            for _ in range(warmup):
                comp()
        except Exception as err:  # noqa: BLE001 (any compile failure is a result)
            row["mode"] = "eager (compile failed)"
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            comp = None
        row["warmup_wall_s"] = time.perf_counter() - wall
        row["warmup_cpu_s"] = time.process_time() - cpu
        runners = {"AdamW": adamw, "eager": eager} | ({"compiled": comp} if comp else {})
        medians, _ = harness.interleaved(list(runners.values()), rounds)  # wall s, in turn
        med = dict(zip(runners, medians))
        row["iter_s"] = med
        row["eager_x_adamw"] = med["eager"] / med["AdamW"]
        row["compiled_x_adamw"] = med["compiled"] / med["AdamW"] if comp else None
        # compile time: the warm-up minus what the same steps cost once compiled
        row["compile_s"] = row["warmup_wall_s"] - warmup * med.get("compiled", med["eager"])
        heavyball.utils.compile_mode = compiled_mode
        rows.append(row)
        print(row, flush=True)
    return rows


def render(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| workload | optimizer | mode | compile: warm-up wall s (CPU s) | eager × AdamW "
        "| compiled × AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        comp = "—" if r["compiled_x_adamw"] is None else f"{r['compiled_x_adamw']:.2f}"
        err = f" ({r['error']})" if "error" in r else ""
        lines.append(
            f"| {r['workload']} | {r['optimizer']} | {r['mode']}{err} | "
            f"{r['warmup_wall_s']:.1f} ({r['warmup_cpu_s']:.1f}) | "
            f"{r['eager_x_adamw']:.2f} | {comp} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["digits_ae", "char_lm"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        import heavyball  # noqa: F401
    except ImportError as err:
        print(f"heavyball missing: {err} (pip install 'curvopt[baselines]')")
        return 0
    rows = []
    for wl in args.workloads:
        if wl not in W.WORKLOADS:
            print(f"unknown workload {wl!r} (known: {sorted(W.WORKLOADS)})")
            continue
        rows += measure(wl, args.lr, args.warmup, args.rounds, tuple(args.optimizers))
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
