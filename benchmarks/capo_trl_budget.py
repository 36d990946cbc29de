"""CAPOGRPOTrainer's KL budget against GRPO at a large lr on the TRL tiny task (CPU).

Arms (same random-init GPT-2 of :mod:`curvopt.bench.tasks.trl_addition`, same data and
``GRPOConfig`` per seed; AdamW, constant lr): ``GRPO small lr``, ``GRPO large lr`` and
``KL budget large lr`` (``CAPOGRPOTrainer(capo_kl_budget=delta)``, no token mask: each step's lr
is scaled so that its predicted whole-model KL fits ``delta``). Per arm and seed the script
records the reward per step (TRL's ``reward``: mean over the step's completions) and the step
time (``on_step_begin`` .. ``on_step_end``).

Reported over the seeds: **collapses** (the mean reward of the last 10 steps below that of the
first 5 steps, i.e. training made the policy worse, or a non-finite loss), **final reward** (mean
of the last 10 steps; per seed), **samples to target** (completions generated until the 5-step
running mean of the reward first reaches ``--target``; ``-`` if never), **cost per step** (median
step time) and, for the budget arm, the mean lr scale.

Run: ``python benchmarks/capo_trl_budget.py`` (5 seeds; minutes on one core) or ``--quick``;
``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile

import torch

try:
    import trl  # noqa: F401
except ImportError:  # the optional extra curvopt[trl]
    print("benchmarks/capo_trl_budget.py: skipped, trl is not installed")
    sys.exit(0)
from harness import clock, median, print_table, write_json  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl_task import StepTimer, add_task_arguments, addition_trainer_kwargs  # noqa: E402

from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402


def run(arm: str, seed: int, args, out_dir: str) -> dict:
    lr = args.small_lr if arm == "GRPO small lr" else args.large_lr
    common = addition_trainer_kwargs(
        args, out_dir, seed, learning_rate=lr, lr_scheduler_type="constant"
    )
    if arm == "KL budget large lr":
        trainer = CAPOGRPOTrainer(**common, capo_kl_budget=args.budget)
    else:
        trainer = GRPOTrainer(**common)
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "reward": [h["reward"] for h in logs],
        "loss": [h["loss"] for h in logs],
        "entropy": [h.get("entropy", math.nan) for h in logs],
        "lr_scale": [h.get("capo/kl_budget_scale", 1.0) for h in logs],
        "step_seconds": timer.times,
    }


def summarize(hist: dict, args) -> dict:
    r = hist["reward"]
    first, last = statistics.mean(r[:5]), statistics.mean(r[-10:])
    collapsed = last < first or not all(math.isfinite(x) for x in hist["loss"])
    samples = None
    for i in range(4, len(r)):
        if statistics.mean(r[i - 4 : i + 1]) >= args.target:
            samples = (i + 1) * args.batch
            break
    return {
        "collapsed": collapsed,
        "first": first,
        "final": last,
        "samples_to_target": samples,
        "step_ms": 1e3 * median(hist["step_seconds"][1:]),
        "mean_lr_scale": statistics.mean(hist["lr_scale"]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 30 steps")
    p.add_argument("--seeds", type=int, default=5)
    add_task_arguments(p, steps=60, completion_len=6, n_embd=32, n_head=False)
    p.add_argument("--small-lr", type=float, default=1e-3)
    p.add_argument("--large-lr", type=float, default=5e-2)
    p.add_argument("--budget", type=float, default=2e-2)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--arms", default="GRPO small lr,GRPO large lr,KL budget large lr")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps = 2, 30
    torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    res = {a: [] for a in arms}
    start = clock()
    with tempfile.TemporaryDirectory() as out_dir:
        for seed in range(args.seeds):
            for arm in arms if seed % 2 == 0 else arms[::-1]:
                hist = run(arm, seed, args, out_dir)
                hist["summary"] = summarize(hist, args)
                res[arm].append(hist)
                s = hist["summary"]
                print(
                    f"seed {seed} {arm}: first {s['first']:.3f} final {s['final']:.3f} "
                    f"collapsed {s['collapsed']} samples {s['samples_to_target']} "
                    f"step {s['step_ms']:.0f} ms scale {s['mean_lr_scale']:.3f}",
                    flush=True,
                )
    print(
        f"\ntiny GPT-2 (H={args.n_embd}, {args.n_layer} layers), AdamW constant lr, "
        f"{args.batch} completions/step, {args.steps} steps, {args.seeds} seeds; small lr "
        f"{args.small_lr:g}, large lr {args.large_lr:g}, budget {args.budget:g}; target reward "
        f"{args.target:g}"
    )
    rows = []
    for arm in arms:
        ss = [h["summary"] for h in res[arm]]
        reached = [s["samples_to_target"] for s in ss if s["samples_to_target"] is not None]
        rows.append(
            [
                arm,
                f"{sum(s['collapsed'] for s in ss)}/{len(ss)}",
                " ".join(f"{s['final']:.2f}" for s in ss),
                f"{median(reached):.0f} ({len(reached)}/{len(ss)} reached)" if reached else "-",
                f"{median([s['step_ms'] for s in ss]):.0f}",
                f"{statistics.mean(s['mean_lr_scale'] for s in ss):.3f}",
            ]
        )
    print_table(
        [
            "arm",
            "collapses",
            "final reward per seed",
            "samples to target (median)",
            "ms/step",
            "lr scale",
        ],
        rows,
    )
    print(f"total {clock() - start:.0f} s")
    if args.json:
        write_json(args.json, {"config": vars(args), "results": res})


if __name__ == "__main__":
    main()
