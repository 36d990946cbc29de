"""Off means off: CAPOGRPOTrainer with CAPO switched off costs nothing beyond trl.GRPOTrainer.

Both arms train the same random-init GPT-2 (:mod:`curvopt.bench.tasks.trl_addition`) on the same
data, seed and ``GRPOConfig``; the CAPO arm is built with no ``capo_*`` argument (infinite
thresholds, no penalty, step predictions then off by default). Rounds alternate the arms
(GRPO, off, off, GRPO, ...) so a load change on the shared machine hits both alike. Per optimizer
step the wall time from ``on_step_begin`` to ``on_step_end`` is recorded, the first step of each
round dropped (warm-up). The script also checks that both arms end with bit-identical parameters
and counts CAPO's entry points (mask pass, step prediction, backbone hook): all must be 0.

Run: ``python benchmarks/capo_trl_off.py`` (about a minute on one core) or ``--quick``;
``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

try:
    import trl  # noqa: F401
except ImportError:  # the optional extra curvopt[trl]
    print("benchmarks/capo_trl_off.py: skipped, trl is not installed (pip install curvopt[trl])")
    sys.exit(0)
from harness import median, print_table, write_json  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl_task import StepTimer, add_task_arguments, addition_trainer_kwargs  # noqa: E402

from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402


def run(arm: str, args, out_dir: str):
    common = addition_trainer_kwargs(args, out_dir, learning_rate=1e-3)
    calls = []
    if arm == "GRPO":
        trainer = GRPOTrainer(**common)
    else:
        trainer = CAPOGRPOTrainer(**common)
        for name in ("_capo_apply", "_capo_before_step"):
            fn = getattr(trainer, name)

            def counted(*a, _fn=fn, _name=name, **kw):
                calls.append(_name)
                return _fn(*a, **kw)

            setattr(trainer, name, counted)
        hook = trainer._capo_backbone.register_forward_hook

        def spy(*a, **kw):
            calls.append("backbone hook")
            return hook(*a, **kw)

        trainer._capo_backbone.register_forward_hook = spy
    trainer.remove_callback(PrinterCallback)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    params = [p.detach().clone() for p in trainer.model.parameters()]
    return timer.times[1:], params, calls


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rounds per arm of 5 steps")
    p.add_argument("--rounds", type=int, default=4)
    add_task_arguments(p, steps=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 5
    torch.set_num_threads(args.threads)
    arms = ["GRPO", "CAPO off"]
    order = []
    for r in range(args.rounds):
        order += arms if r % 2 == 0 else arms[::-1]
    times = {a: [] for a in arms}
    final, calls = {}, []
    with tempfile.TemporaryDirectory() as out_dir:
        for arm in order:
            t, params, c = run(arm, args, out_dir)
            times[arm] += t
            final[arm] = params
            calls += c
    same = all(torch.equal(a, b) for a, b in zip(final["GRPO"], final["CAPO off"]))
    g, c = median(times["GRPO"]), median(times["CAPO off"])
    print(
        f"tiny GPT-2 (H={args.n_embd}, {args.n_layer} layers), {args.batch} completions/step, "
        f"{args.rounds} rounds x {args.steps - 1} timed steps per arm, {args.threads} thread(s)"
    )
    print_table(
        ["median time per optimizer step", "trl.GRPOTrainer (ms)", "CAPO off (ms)", "ratio"],
        [["generation .. optimizer.step", f"{1e3 * g:.1f}", f"{1e3 * c:.1f}", f"{c / g:.3f}"]],
    )
    print(f"bit-identical final parameters: {same}; CAPO entry points called: {len(calls)}")
    if args.json:
        write_json(
            args.json,
            {
                "grpo_ms": 1e3 * g,
                "capo_off_ms": 1e3 * c,
                "ratio": c / g,
                "bit_identical": same,
                "capo_calls": len(calls),
                "config": vars(args),
            },
        )


if __name__ == "__main__":
    main()
