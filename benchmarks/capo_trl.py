"""CAPO's overhead per GRPO step inside TRL: CAPOGRPOTrainer vs trl.GRPOTrainer, side by side.

Same model (a random-init GPT-2 from :mod:`curvopt.bench.tasks.trl_addition`), data, seed and
GRPOConfig for both arms. CAPO runs with infinite thresholds: every prediction is computed, the
mask is multiplied in and the per-step predictions are made (``capo_predict_step=True``), but no
token is rejected, so both arms train bit-identical models on identical completions and do the
same work apart from CAPO's (a finite threshold would change the completions and with them the
generation time, which dominates). Rounds alternate the arms (GRPO, CAPO, CAPO, GRPO, ...) so
that a load change on the shared machine hits both alike. Per optimizer step the wall time from
``on_step_begin`` to ``on_step_end`` (generation, rewards, forward, backward, CAPO, optimizer
step) is recorded, and TRL's own ``step_time`` metric (``training_step`` only); the first step of
each round is dropped (warm-up). Independently of that noisy difference, the time spent inside
CAPO's two entry points (the token mask per micro-batch and the step prediction at the
optimizer's pre-step hook) is measured directly. The table reports medians and ratios.

A third arm, ``CAPO+penalty``, adds the ``delta_kl`` penalty (:mod:`curvopt.capo.penalty`)
with ``--penalty-coef`` (default ``1e-30``: all the penalty's work is done, forward through the
differentiable predictions and backward through the head and the hidden states into the whole
network, but the term is far below float32 resolution, so the arm trains the same model on the
same completions as the others; the script checks that its final parameters equal the CAPO
arm's). The penalty's cost is also measured in isolation: one micro-batch's TRL loss and backward
on the same inputs with the penalty off and on, alternated, warm.

Run: ``python benchmarks/capo_trl.py`` (a few minutes) or ``--quick`` (under a minute). CPU only;
the ~100M-parameter GPU figure of the issue needs a GPU (``--n-embd 768 --n-layer 12`` with
``--device cuda`` is not wired up: this script measures the CPU configuration).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile

import torch  # noqa: E402

try:
    import trl  # noqa: E402, F401
except ImportError:  # the optional extra curvopt[trl]
    print("benchmarks/capo_trl.py: skipped, trl is not installed (pip install curvopt[trl])")
    sys.exit(0)
from harness import Stopwatch, clock, median, print_table  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl_task import StepTimer, add_task_arguments, addition_trainer_kwargs  # noqa: E402

from curvopt.bench.tasks.trl_addition import tiny_gpt2  # noqa: E402
from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402


def run(arm: str, args, out_dir: str) -> tuple[list[float], list[float], tuple, list]:
    common = addition_trainer_kwargs(args, out_dir, learning_rate=1e-3, loss_type="grpo")
    if arm == "GRPO":
        trainer = GRPOTrainer(**common)
    elif arm == "CAPO":
        trainer = CAPOGRPOTrainer(
            **common, capo_tau_h=math.inf, capo_tau_f=math.inf, capo_predict_step=True
        )
    else:
        trainer = CAPOGRPOTrainer(
            **common,
            capo_tau_h=math.inf,
            capo_tau_f=math.inf,
            capo_penalty="delta_kl",
            capo_penalty_coef=args.penalty_coef,
        )
        seen = {}
        trainer.compute_loss = _recording(trainer.compute_loss, seen)
    trainer.remove_callback(PrinterCallback)
    own = []
    if arm == "CAPO":  # time CAPO's own work where it happens
        for name in ("_capo_apply", "_capo_before_step"):
            setattr(trainer, name, _timed(getattr(trainer, name), own))
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "step_time" in h]
    # one micro-batch per step: own[0], own[1] are the first (warm-up) step's two calls
    own_step = sum(own[2:]) / (args.steps - 1) if arm == "CAPO" else math.nan
    isolated = isolated_capo_time(trainer) if arm == "CAPO" else math.nan
    if arm == "CAPO+penalty":
        isolated = isolated_penalty_time(trainer, seen["inputs"])
    params = [p.detach().clone() for p in trainer.model.parameters()]
    return timer.times[1:], [h["step_time"] for h in logs][1:], (own_step, isolated), params


def _recording(fn, into):
    def wrapper(model, inputs, *a, **kw):
        into["inputs"] = inputs
        return fn(model, inputs, *a, **kw)

    return wrapper


def isolated_penalty_time(trainer, inputs, reps: int = 20) -> tuple[float, float]:
    """Median time of one micro-batch's loss + backward without and with the penalty."""
    coef = trainer.capo_penalty.coef
    times = {0.0: [], coef: []}
    for _ in range(reps):
        for c in (0.0, coef):
            trainer.capo_penalty.coef = c
            trainer.model.zero_grad()
            with Stopwatch() as watch:
                trainer.compute_loss(trainer.model, inputs).backward()
            times[c].append(watch.seconds)
            trainer._capo_window.clear()
    trainer.capo_penalty.coef = coef
    return median(times[0.0]), median(times[coef])


def isolated_capo_time(trainer, reps: int = 20) -> float:
    """CAPO's work for the last step's batch (mask + step prediction), warm, in a tight loop."""
    mb = trainer.capo_last_step["batches"][0]
    inputs = {"completion_ids": mb["actions"], "advantages": mb["advantages"]}
    times = []
    for _ in range(reps):
        inputs["completion_mask"] = mb["valid"].long()
        with Stopwatch() as watch:
            trainer._capo_apply(inputs, mb["hidden"])
            trainer._capo_before_step(None, (), {})
        times.append(watch.seconds)
    return median(times)


def _timed(fn, into):
    def wrapper(*a, **kw):
        watch = Stopwatch()
        try:
            with watch:
                return fn(*a, **kw)
        finally:
            into.append(watch.seconds)

    return wrapper


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rounds per arm of 6 steps")
    p.add_argument("--rounds", type=int, default=6)
    add_task_arguments(p, steps=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--penalty-coef", type=float, default=1e-30)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 6
    torch.set_num_threads(args.threads)
    arms = ["GRPO", "CAPO", "CAPO+penalty"]
    order = (arms + arms[::-1]) * math.ceil(args.rounds / 2)
    order = order[: 3 * args.rounds]
    wall = {a: [] for a in arms}
    inner = {a: [] for a in arms}
    own, pen = [], []
    final = {}
    start = clock()
    with tempfile.TemporaryDirectory() as out_dir:
        for arm in order:
            w, s, r, params = run(arm, args, out_dir)
            wall[arm] += w
            inner[arm] += s
            if arm == "CAPO":
                own.append(r)
            if arm == "CAPO+penalty":
                pen.append(r[1])
            final[arm] = params
    same = all(torch.equal(a, b) for a, b in zip(final["CAPO"], final["CAPO+penalty"]))
    n_params = sum(
        p.numel() for p in tiny_gpt2(n_embd=args.n_embd, n_layer=args.n_layer).parameters()
    )
    print(
        f"tiny GPT-2: {n_params} parameters (H={args.n_embd}, {args.n_layer} layers, V=14), "
        f"{args.batch} completions/step ({args.generations} per prompt), <= {args.completion_len} "
        f"tokens, {args.rounds} rounds x {args.steps - 1} timed steps per arm, "
        f"{args.threads} thread(s)"
    )
    print()
    rows = []
    for label, data in (
        ("whole optimizer step (generation .. optimizer.step)", wall),
        ("TRL step_time (training_step: generation, loss, backward)", inner),
    ):
        a, b, c = (median(data[k]) for k in arms)
        rows.append(
            [label, f"{1e3 * a:.1f}", f"{1e3 * b:.1f}", f"{b / a:.3f}", f"{1e3 * c:.1f}"]
            + [f"{c / a:.3f}"]
        )
    base = median(wall["GRPO"])
    mean_own = statistics.mean(r[0] for r in own)
    isolated = median([r[1] for r in own])
    rows += [
        [
            "CAPO's own work inside training (mask + step prediction), mean per step",
            "-",
            f"{1e3 * mean_own:.1f}",
            f"{mean_own / base:.3f} of the GRPO step",
        ],
        [
            "CAPO's own work on one step's batch, warm, isolated (median)",
            "-",
            f"{1e3 * isolated:.1f}",
            f"{isolated / base:.3f} of the GRPO step",
        ],
    ]
    print_table(
        [
            "time per GRPO step (median)",
            "trl.GRPOTrainer (ms)",
            "CAPOGRPOTrainer (ms)",
            "ratio",
            "CAPO + delta_kl penalty (ms)",
            "ratio",
        ],
        rows,
    )
    off = median([p[0] for p in pen])
    on = median([p[1] for p in pen])
    print()
    print_table(
        ["one micro-batch's loss + backward, warm, isolated (median)", "ms", "ratio"],
        [
            ["CAPO mask, no penalty", f"{1e3 * off:.1f}", "1.000"],
            ["CAPO mask + delta_kl penalty", f"{1e3 * on:.1f}", f"{on / off:.3f}"],
            [
                "penalty's extra time per micro-batch",
                f"{1e3 * (on - off):.1f}",
                f"{(on - off) / base:.3f} of the GRPO step",
            ],
        ],
    )
    print()
    print(f"penalty arm (coef {args.penalty_coef:g}) trained the same parameters as CAPO: {same}")
    print(f"total {clock() - start:.0f} s")


if __name__ == "__main__":
    main()
