"""GRPO vs last-layer CAPO vs whole-model CAPO at a large lr on the addition toy (issue #16 c).

Arms per seed, from the same warm start and with the setup of benchmarks/capo.py (Adam, 10 %
warmup then cosine, 8 prompts x 8 samples, 400 steps): small-lr GRPO (the reference), large-lr
GRPO, large-lr GRPO + last-layer CAPO (``CAPOLoss``, thresholds at the p-th percentile of one
calibration batch, as in capo.py), and large-lr GRPO + a whole-model mask:

- per step, the planned Adam step ``Δθ`` is taken on a copy of the policy and optimizer (trial
  step on all tokens); each token's share of the step's predicted whole-model KL is
  ``c_s = ½⟨Δθ_s, FΔθ⟩`` (``curvopt.capo.whole_model.token_kl_attributions``) with
  ``Δθ_s = D ∇ℓ_s``, ``ℓ_s = A_s log π(a_s)/(B T)`` the token's term of the ascent objective and
  ``D = lr_t (1−β₁)/(1−β₁^k) / (sqrt(v̂_k) + eps)`` Adam's weight of the new gradient (its
  denominator frozen at the trial step's value; the momentum part of the step is not attributed);
- a KL budget: when the predicted KL of the step, ``Σ_s c_s``, exceeds ``δ``, the tokens with the
  largest ``c_s`` are dropped from the real step until the rest sum to at most ``δ``; ``δ`` is the
  predicted whole-model KL of a small-lr step (``--small-lr``) on one calibration batch (a "safe"
  step size), then fixed. Unlike a fixed per-token threshold, the budget does not depend on the
  lr schedule.

Prints, per arm: start and final reward, collapse (final < half the start), rejected fraction,
samples to the target (half-way from start to best small-lr GRPO, median seed) and the cost per
step (whole-model arm: trial step + JVP + VJP + JVP + the real step).
Usage: python benchmarks/capo_compare.py [--quick] [--seeds 3] [--percentile 80]
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sys

import torch

from curvopt.capo.grpo import _kl_rows, group_advantages
from curvopt.capo.sequence_policy import GRUPolicy, sample_tokens
from curvopt.capo.token_losses import grpo_loss
from curvopt.capo.whole_model import token_kl_attributions

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import capo as capo_bench  # noqa: E402  (the same warm start, arms, schedule and metrics)
from harness import Stopwatch, print_table  # noqa: E402

GROUP = capo_bench.GROUP


def trial_step(policy, opt, seq, comp, adv, lp, keep=None):
    """Δθ of an optimizer step on all (or the ``keep``) tokens, and D (its weight of a gradient).

    Taken on copies. Adam: ``D = lr (1−β₁)/(1−β₁^k) / (sqrt(v̂_k) + eps)``; plain SGD (no
    momentum, no weight decay): ``D = lr``.
    """
    pol, o = copy.deepcopy((policy, opt))
    logits = pol(seq)[:, lp - 1 :]
    logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
    keep = torch.ones_like(comp, dtype=torch.bool) if keep is None else keep
    loss = grpo_loss(logp, logp.detach(), adv, keep)
    o.zero_grad()
    loss.backward()
    o.step()
    step, precond = [], []
    group = o.param_groups[0]
    is_sgd = isinstance(o, torch.optim.SGD)
    if is_sgd and (group["momentum"] or group["weight_decay"]):
        raise ValueError("the SGD weight model covers plain SGD only (no momentum/weight decay)")
    for p_new, p_old in zip(pol.parameters(), policy.parameters()):
        step.append(p_new.detach() - p_old.detach())
        if is_sgd:
            precond.append(torch.full_like(p_new, group["lr"]))
            continue
        b1, b2 = group["betas"]
        st = o.state[p_new]
        k = int(st["step"])
        v_hat = st["exp_avg_sq"] / (1 - b2**k)
        precond.append(group["lr"] * (1 - b1) / (1 - b1**k) / (v_hat.sqrt() + group["eps"]))
    return step, precond


def whole_model_attributions(policy, opt, seq, comp, adv, lp):
    step, precond = trial_step(policy, opt, seq, comp, adv, lp)
    n = comp.numel()

    def objective(logits):
        logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
        return adv[:, None] * logp / n

    informative = (adv != 0)[:, None].expand_as(comp)
    c, kl = token_kl_attributions(
        policy,
        step,
        objective,
        seq,
        preconditioner=precond,
        mask=informative,
        output_fn=lambda z: z[:, lp - 1 :],
    )
    return c, informative, kl


def budget_mask(c, informative, budget):
    """Drop the largest c until the kept informative tokens' sum is at most ``budget``."""
    keep = torch.ones_like(informative)
    vals = torch.where(informative, c, torch.full_like(c, -math.inf)).reshape(-1)
    total = float(c[informative].sum())
    if total <= budget:
        return keep
    order = torch.argsort(vals, descending=True)
    remaining = total - torch.cumsum(vals[order].clamp_min(-1e30), 0)
    n_drop = int((remaining > budget).sum()) + 1
    flat = keep.reshape(-1).clone()
    flat[order[:n_drop]] = False
    return flat.reshape(keep.shape) | ~informative


def batch(policy, task, gen, prompts_per_step=8):
    prompts, answers = task.sample(prompts_per_step, gen)
    rep = prompts.repeat_interleave(GROUP, 0)
    comp = sample_tokens(policy, rep, task.answer_len, gen)
    rewards = task.reward(comp, answers.repeat_interleave(GROUP, 0)).float()
    return torch.cat([rep, comp], 1)[:, :-1], comp, rewards


def run_whole_model_arm(lr, seed, task, state, args, make_policy=None, make_opt=None, lr_fn=None):
    """GRPO with the whole-model KL-budget mask; returns the per-step history.

    Defaults: the addition toy's GRU policy, Adam and capo.py's warmup-cosine schedule; the
    recall toy (benchmarks/capo_recall.py) passes its own policy, SGD and a constant lr.
    """
    if make_policy is None:
        make_policy = lambda: GRUPolicy(task.vocab_size, args.hidden)  # noqa: E731
    make_opt = make_opt or torch.optim.Adam
    lr_fn = lr_fn or (lambda k: capo_bench.lr_factor(k, args))
    torch.manual_seed(seed + 1000)
    policy = make_policy()
    policy.load_state_dict(state)
    opt = make_opt(policy.parameters(), lr=lr)
    lp, n_prompts = task.prompt_len, args.prompts
    # calibration: the predicted whole-model KL of a small-lr step on one batch is the budget δ
    cal_gen = torch.Generator().manual_seed(seed + 3000)
    seq, comp, rewards = batch(policy, task, cal_gen, n_prompts)
    small = make_opt(policy.parameters(), lr=args.small_lr)
    _, _, budget = whole_model_attributions(
        policy, small, seq, comp, group_advantages(rewards, GROUP), lp
    )
    budget = float(budget)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    gen = torch.Generator().manual_seed(seed + 2000)
    hist = {"reward": [], "rejected_fraction": [], "entropy": [], "realized_kl": []}
    hist["realized_head_kl"] = []
    with Stopwatch() as watch:
        for _ in range(args.steps):
            seq, comp, rewards = batch(policy, task, gen, n_prompts)
            adv = group_advantages(rewards, GROUP)
            keep = torch.ones_like(comp, dtype=torch.bool)
            if bool((adv != 0).any()):
                c, informative, _ = whole_model_attributions(policy, opt, seq, comp, adv, lp)
                keep = budget_mask(c, informative, budget)
            h = policy.hidden_states(seq)[:, lp - 1 :]
            logits = policy.head(h)
            logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
            loss = grpo_loss(logp, logp.detach(), adv, keep)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                p = torch.softmax(logits, -1)
                hist["entropy"].append(float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()))
                old = logits.detach()
                hist["realized_kl"].append(float(_kl_rows(old, policy(seq)[:, lp - 1 :]).mean()))
                hist["realized_head_kl"].append(
                    float(_kl_rows(old, policy.head(h.detach())).mean())
                )
            hist["reward"].append(float(rewards.mean()))
            hist["rejected_fraction"].append(float((~keep).float().mean()))
    hist["seconds"] = watch.seconds
    hist["budget"] = budget
    return hist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--percentile", type=float, default=80.0)
    ap.add_argument("--small-lr", type=float, default=1e-3)
    ap.add_argument("--large-lr", type=float, default=1e-2)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 40
    # the fields capo.py's helpers read
    args.max_operand, args.hidden, args.sft_steps, args.prompts = 9, 64, 60, 8
    args.head_only, args.optimizer, args.warmup, args.schedule = False, "adam", 0.1, "cosine"
    args.eval_every = args.steps
    torch.set_num_threads(1)
    arms = ["GRPO small lr", "GRPO large lr", "last-layer CAPO", "whole-model CAPO"]
    res = {a: [] for a in arms}
    for seed in range(args.seeds):
        task, state = capo_bench.warm_start(seed, args)
        res[arms[0]].append(capo_bench.run_arm("s", args.small_lr, None, seed, task, state, args))
        res[arms[1]].append(capo_bench.run_arm("l", args.large_lr, None, seed, task, state, args))
        res[arms[2]].append(
            capo_bench.run_arm("c", args.large_lr, args.percentile, seed, task, state, args)
        )
        res[arms[3]].append(run_whole_model_arm(args.large_lr, seed, task, state, args))
        for a in arms:
            h = res[a][-1]
            print(
                f"seed {seed} {a:18s} final {sum(h['reward'][-20:]) / 20:.3f} {h['seconds']:.0f}s",
                flush=True,
            )
    w, per_step = 20, 8 * GROUP
    base = res[arms[0]]
    start = [sum(h["reward"][:5]) / 5 for h in base]
    best = [float(max(capo_bench.smooth(h["reward"], w))) for h in base]
    target = float(torch.tensor([s + 0.5 * (b - s) for s, b in zip(start, best)]).median())
    budgets = " / ".join(f"{h['budget']:.1e}" for h in res[arms[3]])
    print(
        f"\n{args.seeds} seeds, {args.steps} steps, last-layer CAPO p{args.percentile:g} "
        f"thresholds, whole-model KL budgets {budgets}; target reward {target:.3f}; "
        "entries are seeds 0 / 1 / ..."
    )
    rows = []
    for a in arms:
        hs = res[a]
        fin = [sum(h["reward"][-w:]) / w for h in hs]
        st = [sum(h["reward"][:5]) / 5 for h in hs]
        col = sum(f < capo_bench.COLLAPSE_FRACTION * s for f, s in zip(fin, st))
        rej = [sum(h["rejected_fraction"]) / len(h["rejected_fraction"]) for h in hs]
        smp = [capo_bench.samples_to_reach(h["reward"], target, w, per_step) for h in hs]
        ms = sum(h["seconds"] for h in hs) / sum(len(h["reward"]) for h in hs) * 1e3
        rows.append(
            [
                a,
                " / ".join(f"{x:.2f}" for x in fin),
                f"{col}/{len(hs)}",
                " / ".join(f"{x:.3f}" for x in rej),
                " / ".join("never" if x == math.inf else str(x) for x in smp),
                f"{ms:.0f}",
            ]
        )
    print_table(
        ["arm", "final reward", "collapsed", "rejected tokens", "samples to target", "ms/step"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
