"""Predicted vs realized KL of a GRPO step: CAPO's last-layer model vs a whole-model JVP model.

Setup as in benchmarks/capo.py (addition task a+b=, a, b in 0..9, GRU(64) policy after 60 steps of
supervised warm start per seed, 8 prompts x 8 samples, GRPO clipped surrogate, Adam, constant lr).
For every step the planned step Δθ is the optimizer's actual update (taken on the policy; the old
policy is kept as a copy), and the mean KL(π_old ‖ π_new) over the batch's completion tokens is

- realized, whole model: exact KL after the full update;
- realized, head only: exact KL of the new head on the old hidden states;
- predicted, last layer: ½ uᵀ(Diag p − ppᵀ)u with u = ΔW h + Δb (the head's exact step on the old
  hidden states; CAPO's model with a perfect direction model);
- predicted, whole model: the same with u = J Δθ, the logit change through the whole network by
  one forward-mode JVP (``curvopt.capo.whole_model.predict_step_kl``).

Prints the quartiles over steps and seeds of predicted / realized per lr, and the cost of the
whole-model prediction relative to one GRPO step (sampling, forward, backward, Adam), both timed
in the same run.

Usage: python benchmarks/capo_whole_model.py [--quick] (full: 3 seeds x 40 steps x 2 lrs, ~2 min)
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from harness import clock

from curvopt.bench.tasks.addition import AdditionTask, supervised_warmstart
from curvopt.capo.grpo import group_advantages
from curvopt.capo.sequence_policy import GRUPolicy, sample_tokens
from curvopt.capo.token_losses import grpo_loss
from curvopt.capo.whole_model import predict_step_kl

GROUP = 8


def kl_rows(old_logits, new_logits):
    old, new = torch.log_softmax(old_logits, -1), torch.log_softmax(new_logits, -1)
    return (old.exp() * (old - new)).sum(-1)


def run(seed: int, lr: float, args) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    task = AdditionTask(9)
    policy = GRUPolicy(task.vocab_size, 64)
    supervised_warmstart(policy, task, 60, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 2000)
    lp = task.prompt_len
    out = {k: [] for k in ("whole", "head_pred_whole", "head", "reward", "ms_step", "ms_jvp")}
    for _ in range(args.steps):
        t0 = clock()
        prompts, answers = task.sample(8, gen)
        rep = prompts.repeat_interleave(GROUP, 0)
        comp = sample_tokens(policy, rep, task.answer_len, gen)
        rewards = task.reward(comp, answers.repeat_interleave(GROUP, 0)).float()
        adv = group_advantages(rewards, GROUP)
        seq = torch.cat([rep, comp], 1)[:, :-1]
        old = copy.deepcopy(policy)
        h = policy.hidden_states(seq)[:, lp - 1 :]
        logits = policy.head(h)
        logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
        loss = grpo_loss(logp, logp.detach(), adv, torch.ones_like(comp, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
        t1 = clock()
        step = [(p.detach() - q.detach()) for p, q in zip(policy.parameters(), old.parameters())]
        informative = (adv != 0)[:, None].expand_as(comp)
        if not bool(informative.any()):
            continue
        t2 = clock()
        whole = predict_step_kl(
            old, step, seq, mask=informative, output_fn=lambda z: z[:, lp - 1 :]
        )
        t3 = clock()
        head_step = [
            s if name.startswith("head.") else torch.zeros_like(s)
            for (name, _), s in zip(old.named_parameters(), step)
        ]
        head = predict_step_kl(
            old, head_step, seq, mask=informative, output_fn=lambda z: z[:, lp - 1 :]
        )
        with torch.no_grad():
            old_logits = old(seq)[:, lp - 1 :]
            real = kl_rows(old_logits, policy(seq)[:, lp - 1 :])[informative].mean()
            real_head = kl_rows(old_logits, policy.head(old.hidden_states(seq)[:, lp - 1 :]))
            real_head = real_head[informative].mean()
        out["whole"].append(float(whole / real))
        out["head_pred_whole"].append(float(head / real))
        out["head"].append(float(head / real_head))
        out["reward"].append(float(rewards.mean()))
        out["ms_step"].append(1e3 * (t1 - t0))
        out["ms_jvp"].append(1e3 * (t3 - t2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 8 steps")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.steps = args.steps or (8 if args.quick else 40)
    torch.set_num_threads(1)
    t0 = clock()
    print(
        f"{args.seeds} seeds x {args.steps} steps; predicted / realized mean KL per step "
        "(quartiles over steps and seeds); informative tokens only"
    )
    print(
        f"{'lr':>7} {'last layer / head-only KL':>27} {'last layer / whole KL':>25} "
        f"{'whole model / whole KL':>25} {'JVP ms':>7} {'step ms':>8} {'JVP/step':>9}"
    )
    for lr in args.lrs:
        rows = [run(s, lr, args) for s in range(args.seeds)]
        cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

        def q(x):
            a, b, c = np.quantile(x, [0.25, 0.5, 0.75])
            return f"{a:.3f} / {b:.3f} / {c:.3f}"

        jvp, stp = np.median(cat["ms_jvp"]), np.median(cat["ms_step"])
        print(
            f"{lr:>7g} {q(cat['head']):>27} {q(cat['head_pred_whole']):>25} "
            f"{q(cat['whole']):>25} {jvp:>7.1f} {stp:>8.1f} {jvp / stp:>9.2f}"
        )
    print(f"\nwall {clock() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
