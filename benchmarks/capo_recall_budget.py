"""The library's KL budget (``CAPOLoss(kl_budget=)``) against GRPO at a large lr on the recall toy.

Task, policy, warm start, seeds, SGD and arms' settings are those of ``capo_recall.py`` (issue
#16): 64 one-token prompts with secret 4-token answers over V = 512, a prompt+position policy with
a linear head, plain SGD, 8 prompts x 8 samples per step. Arms per seed, from the same warm start:
GRPO at the small lr (the reference), GRPO at the large lr, and GRPO at the large lr with
:meth:`~curvopt.capo.masker.CAPOLoss.fit_kl_budget` (no token mask: each step's lr is scaled so
that its predicted whole-model KL, from a trial step and one JVP, fits the budget ``delta``;
``delta`` = the predicted whole-model KL of a small-lr step on one calibration batch, as in
``capo_recall.py``'s own trust-region arm, which this script checks with the library's code
path). The table is ``capo_recall.py``'s (collapse: final reward below half the warm start's).

Run: ``python benchmarks/capo_recall_budget.py`` (5 seeds x 300 steps, a few minutes on one core)
or ``--quick`` (1 seed, 60 steps); ``--json PATH`` writes the histories.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

from curvopt.capo.grpo import group_advantages
from curvopt.capo.masker import CAPOLoss
from curvopt.capo.token_losses import grpo_loss
from curvopt.capo.whole_model import predict_step_kl, trial_step

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import capo_compare  # noqa: E402
import capo_recall  # noqa: E402
from harness import Stopwatch, write_json  # noqa: E402

GROUP = capo_recall.GROUP


def _loss(policy, seq, comp, adv, lp):
    logits = policy(seq)[:, lp - 1 :]
    logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
    return grpo_loss(logp, logp.detach(), adv, torch.ones_like(comp, dtype=torch.bool)), logits


def calibrated_budget(policy, task, seed, args) -> float:
    """Predicted whole-model KL of one small-lr SGD step on a calibration batch."""
    lp = task.prompt_len
    cal = torch.Generator().manual_seed(seed + 3000)
    seq, comp, rewards = capo_compare.batch(policy, task, cal, args.prompts)
    adv = group_advantages(rewards, GROUP)
    small = torch.optim.SGD(policy.parameters(), lr=args.small_lr)
    small.zero_grad()
    _loss(policy, seq, comp, adv, lp)[0].backward()
    step = trial_step(small, list(policy.parameters()))
    small.zero_grad()
    informative = (adv != 0)[:, None].expand_as(comp)
    out = lambda z: z[:, lp - 1 :]  # noqa: E731
    return float(predict_step_kl(policy, step, seq, mask=informative, output_fn=out))


def run_budget(seed, task, state, args):
    torch.manual_seed(seed + 1000)
    policy = capo_recall.make_policy(task, args)
    policy.load_state_dict(state)
    opt = torch.optim.SGD(policy.parameters(), lr=args.large_lr)
    lp = task.prompt_len
    budget = calibrated_budget(policy, task, seed, args)
    capo = CAPOLoss(grpo_loss, policy.head, opt, tau_h=math.inf, tau_f=math.inf, kl_budget=budget)
    gen = torch.Generator().manual_seed(seed + 2000)
    keys = ("reward", "rejected_fraction", "realized_kl", "realized_head_kl", "entropy")
    hist = {k: [] for k in keys + ("lr_scale", "predicted_kl")}
    with Stopwatch() as watch:
        for _ in range(args.steps):
            seq, comp, rewards = capo_compare.batch(policy, task, gen, args.prompts)
            adv = group_advantages(rewards, GROUP)
            h = policy.hidden_states(seq)[:, lp - 1 :]
            loss, logits = _loss(policy, seq, comp, adv, lp)
            opt.zero_grad()
            loss.backward()
            scale, kl = 1.0, 0.0
            if bool((adv != 0).any()):
                informative = (adv != 0)[:, None].expand_as(comp)
                fit = capo.fit_kl_budget(
                    policy, seq, mask=informative, output_fn=lambda z: z[:, lp - 1 :]
                )
                scale, kl = fit["scale"], fit["kl"]
            opt.step()
            capo_recall.record_step(hist, policy, logits, h, seq, lp, rewards, scale)
            hist["predicted_kl"].append(kl)
    hist["seconds"] = watch.seconds
    hist["budget"] = budget
    return hist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 60 steps")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--small-lr", type=float, default=1.0)
    ap.add_argument("--large-lr", type=float, default=10.0)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 60
    args.num_prompts, args.answer_len, args.sft_steps, args.prompts = 64, 4, 50, 8
    torch.set_num_threads(1)
    arms = [
        ("GRPO small lr", args.small_lr, None),
        ("GRPO large lr", args.large_lr, None),
        ("CAPOLoss kl_budget, large lr", args.large_lr, "budget"),
    ]
    res = {name: [] for name, _, _ in arms}
    for seed in range(args.seeds):
        task, state = capo_recall.setup(seed, args)
        for name, lr, kind in arms:
            if kind == "budget":
                h = run_budget(seed, task, state, args)
            else:
                h = capo_recall.run_arm(lr, None, seed, task, state, args)
            res[name].append(h)
            extra = ""
            if kind == "budget":
                extra = f" budget {h['budget']:.2e} mean lr scale "
                extra += f"{sum(h['lr_scale']) / len(h['lr_scale']):.3f}"
            print(
                f"seed {seed} {name:30s} final {sum(h['reward'][-20:]) / 20:.3f} "
                f"{1e3 * h['seconds'] / args.steps:.1f} ms/step{extra}",
                flush=True,
            )
    try:
        capo_recall.summarize(res, arms, args)
    except KeyError:  # its table is printed; what follows it covers capo_recall.py's other arms
        pass
    if args.json:
        write_json(args.json, {"config": vars(args), "results": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
