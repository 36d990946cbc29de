"""GRPO vs last-layer CAPO vs whole-model CAPO on a toy where the head carries the step's KL.

Issue #16, parts 2(a) and 2(c). Task and policy: ``curvopt.bench.tasks.recall`` (each of 64
one-token prompts has a secret 4-token answer over a vocabulary of V = 512; partial-credit reward;
policy ``LayerNorm(prompt embedding + position embedding)`` -> linear head, H = 16: 8,704 of the
17,008 parameters are the head's, 8,192 the embedding table of which 64 rows are used). Plain
SGD, constant lr, no normalization of the step, so its size follows the data: a token's head
gradient is ``A (e_a − π) hᵀ / (B T)``, largest for rare tokens with a large ``|A|`` (the wrong
tokens of a completion that scored above its group share its positive advantage).

Arms per seed, all from the same supervised warm start (50 Adam steps of teacher forcing), 8
prompts x G = 8 samples per step: GRPO at the small lr (the reference), GRPO at the large lr,
last-layer CAPO at the large lr (``CAPOLoss`` with the SGD direction model over the full
vocabulary, thresholds at the p-th percentile of one calibration batch, as in capo.py), and the
whole-model KL-budget mask of capo_compare.py at the large lr (budget: the predicted whole-model
KL of a small-lr step on one calibration batch), and, as a control that acts on the size of the
step instead of on tokens, a whole-model KL trust region (the large lr scaled per step so that the
predicted whole-model KL of the step fits the same budget).

Prints per arm: start (first 5 steps) and final (last 20) reward, collapse (final < half the
warm start's reward, i.e. the first 5 steps of small-lr GRPO of the same seed), rejected
fraction, final entropy per token (last 20 steps), samples to the target (half-way from start to
the best 20-step mean of small-lr GRPO, median seed), the head's share of the realized KL of each
step (median over the steps: KL of the new head on the old hidden states / KL of the whole
update) and ms per step. Before the runs, one large-lr step on a warm-start batch is taken apart
(``concentration``): the share of its predicted whole-model KL that the top 1 % and 5 % of tokens
carry (``token_kl_attributions``), the head's share of its realized KL, and the realized KL of the
same step under the whole-model mask.

Usage: python benchmarks/capo_recall.py [--quick] [--diagnose] [--seeds 5] [--steps 300]
(``--quick``: 1 seed, 60 steps, no plot, under a minute; ``--diagnose``: only the one-step
analysis. The full run: 6.5 min wall on the shared 2-core CPU.)
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

from curvopt.bench.tasks.recall import PromptPositionPolicy, RecallTask, supervised_warmstart
from curvopt.capo.grpo import GRPOTrainer, group_advantages
from curvopt.capo.masker import CAPOLoss
from curvopt.capo.token_losses import grpo_loss
from curvopt.capo.whole_model import predict_step_kl

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import capo as capo_bench  # noqa: E402  (threshold calibration, smoothing, samples-to-target)
import capo_compare  # noqa: E402  (the whole-model attributions and KL-budget mask)
from harness import Stopwatch, print_table, pyplot, save_figure  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROUP = capo_bench.GROUP
W = 20  # running-mean window for final reward and samples-to-target


def setup(seed, args):
    torch.manual_seed(seed)
    task = RecallTask(args.num_prompts, args.vocab, args.answer_len, seed=seed)
    policy = make_policy(task, args)
    gen = torch.Generator().manual_seed(seed)
    supervised_warmstart(policy, task, args.sft_steps, generator=gen)
    return task, {k: v.clone() for k, v in policy.state_dict().items()}


def make_policy(task, args):
    return PromptPositionPolicy(task.vocab_size, args.hidden, task.prompt_len + task.answer_len)


def run_arm(lr, percentile, seed, task, state, args):
    """GRPO with plain SGD at ``lr``; last-layer CAPO when ``percentile`` is not None."""
    torch.manual_seed(seed + 1000)
    policy = make_policy(task, args)
    policy.load_state_dict(state)
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    capo = None
    if percentile is not None:
        capo = CAPOLoss(grpo_loss, policy.head, opt, tau_h=math.inf, tau_f=math.inf)
        capo_bench.calibrate(
            policy, capo, task, torch.Generator().manual_seed(seed + 3000), percentile
        )
    gen = torch.Generator().manual_seed(seed + 2000)
    trainer = GRPOTrainer(policy, opt, grpo_loss, GROUP, capo=capo, generator=gen)
    keys = ("reward", "rejected_fraction", "realized_kl", "realized_head_kl", "entropy")
    hist = {k: [] for k in keys}
    with Stopwatch() as watch:
        for _ in range(args.steps):
            prompts, answers = task.sample(args.prompts, gen)
            out = trainer.step(
                prompts,
                task.answer_len,
                lambda c, a=answers: task.reward(c, a.repeat_interleave(GROUP, 0)),
            )
            for k in hist:
                hist[k].append(float(out[k]))
    hist["seconds"] = watch.seconds
    return hist


def run_whole_model(seed, task, state, args):
    return capo_compare.run_whole_model_arm(
        args.large_lr,
        seed,
        task,
        state,
        args,
        make_policy=lambda: make_policy(task, args),
        make_opt=torch.optim.SGD,
        lr_fn=lambda k: 1.0,
    )


def record_step(hist, policy, logits, h, seq, lp, rewards, scale, rejected=0.0):
    """Append one step's entropy, realized KLs (whole model, head only), reward and lr scale."""
    with torch.no_grad():
        old = logits.detach()
        p = torch.softmax(old, -1)
        hist["entropy"].append(float(-(p * torch.log_softmax(old, -1)).sum(-1).mean()))
        hist["realized_kl"].append(
            float(capo_compare._kl_rows(old, policy(seq)[:, lp - 1 :]).mean())
        )
        hist["realized_head_kl"].append(
            float(capo_compare._kl_rows(old, policy.head(h.detach())).mean())
        )
    hist["reward"].append(float(rewards.mean()))
    hist["rejected_fraction"].append(rejected)
    hist["lr_scale"].append(scale)


def run_trust_region(seed, task, state, args):
    """Large-lr GRPO whose step is scaled down so that its predicted whole-model KL fits δ.

    Not a token mask: every token stays, and the lr of the step is multiplied by
    ``min(1, sqrt(δ / KL̂))`` (the SGD step's KL is quadratic in the lr), with ``KL̂`` the
    whole-model prediction of the planned step (trial step on a copy, one JVP) and ``δ`` the
    same budget as the whole-model mask's.
    """
    torch.manual_seed(seed + 1000)
    policy = make_policy(task, args)
    policy.load_state_dict(state)
    opt = torch.optim.SGD(policy.parameters(), lr=args.large_lr)
    lp = task.prompt_len

    def predicted_kl(optimizer, seq, comp, adv):
        step, _ = capo_compare.trial_step(policy, optimizer, seq, comp, adv, lp)
        informative = (adv != 0)[:, None].expand_as(comp)
        return float(
            predict_step_kl(policy, step, seq, mask=informative, output_fn=lambda z: z[:, lp - 1 :])
        )

    cal = torch.Generator().manual_seed(seed + 3000)
    seq, comp, rewards = capo_compare.batch(policy, task, cal, args.prompts)
    small = torch.optim.SGD(policy.parameters(), lr=args.small_lr)
    budget = predicted_kl(small, seq, comp, group_advantages(rewards, GROUP))
    gen = torch.Generator().manual_seed(seed + 2000)
    keys = ("reward", "rejected_fraction", "realized_kl", "realized_head_kl", "lr_scale")
    keys += ("entropy",)
    hist = {k: [] for k in keys}
    with Stopwatch() as watch:
        for _ in range(args.steps):
            seq, comp, rewards = capo_compare.batch(policy, task, gen, args.prompts)
            adv = group_advantages(rewards, GROUP)
            scale = 1.0
            if bool((adv != 0).any()):
                opt.param_groups[0]["lr"] = args.large_lr
                kl = predicted_kl(opt, seq, comp, adv)
                scale = min(1.0, math.sqrt(budget / kl)) if kl > 0 else 1.0
            opt.param_groups[0]["lr"] = args.large_lr * scale
            h = policy.hidden_states(seq)[:, lp - 1 :]
            logits = policy.head(h)
            logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
            loss = grpo_loss(logp, logp.detach(), adv, torch.ones_like(comp, dtype=torch.bool))
            opt.zero_grad()
            loss.backward()
            opt.step()
            record_step(hist, policy, logits, h, seq, lp, rewards, scale)
    hist["seconds"] = watch.seconds
    hist["budget"] = budget
    return hist


def concentration(seed, task, state, args):
    """One large-lr SGD step on a warm-start batch, taken apart.

    Returns the top-1 %/5 % tokens' share of the step's predicted whole-model KL, the predicted
    KL, the realized KL of the head's part alone and of the whole step, the budget δ (predicted
    KL of a small-lr step on the same batch), the fraction of tokens the whole-model mask drops
    for it, and the realized KL of the masked step.
    """
    policy = make_policy(task, args)
    policy.load_state_dict(state)
    lp = task.prompt_len
    opt = torch.optim.SGD(policy.parameters(), lr=args.large_lr)
    gen = torch.Generator().manual_seed(seed + 5000)
    seq, comp, rewards = capo_compare.batch(policy, task, gen, args.prompts)
    adv = group_advantages(rewards, GROUP)
    c, informative, kl = capo_compare.whole_model_attributions(policy, opt, seq, comp, adv, lp)
    vals = c[informative].sort(descending=True).values
    total = float(vals.sum())
    shares = [float(vals[: max(1, round(f * len(vals)))].sum()) / total for f in (0.01, 0.05)]
    small = torch.optim.SGD(policy.parameters(), lr=args.small_lr)
    _, _, budget = capo_compare.whole_model_attributions(policy, small, seq, comp, adv, lp)
    keep = capo_compare.budget_mask(c, informative, float(budget))
    names = [n for n, _ in policy.named_parameters()]

    def realized(step, head_only=False):
        with torch.no_grad():
            h = policy.hidden_states(seq)[:, lp - 1 :]
            old = policy.head(h)
            if head_only:
                dw, db = (s for n, s in zip(names, step) if n.startswith("head."))
                new = h @ (policy.head.weight + dw).T + policy.head.bias + db
            else:
                moved = {n: p + s for n, p, s in zip(names, policy.parameters(), step)}
                new = torch.func.functional_call(policy, moved, (seq,))[:, lp - 1 :]
            return float(capo_compare._kl_rows(old, new).mean())

    step, _ = capo_compare.trial_step(policy, opt, seq, comp, adv, lp)
    masked, _ = capo_compare.trial_step(policy, opt, seq, comp, adv, lp, keep)
    return {
        "shares": shares,
        "predicted": float(kl),
        "head": realized(step, head_only=True),
        "whole": realized(step),
        "budget": float(budget),
        "dropped": float((~keep).float().mean()),
        "masked": realized(masked),
    }


def print_concentration(conc, args):
    print(
        f"\nwarm-start batch, one SGD step at lr {args.large_lr:g}, per seed: top-1 % / top-5 % "
        "tokens' share of the predicted whole-model KL | predicted KL | realized KL of the head's "
        "part alone / of the whole step | budget δ | whole-model mask: dropped tokens, realized "
        "KL of the masked step"
    )
    for seed, d in enumerate(conc):
        print(
            f"  seed {seed}: {d['shares'][0]:.2f} / {d['shares'][1]:.2f} | {d['predicted']:.3g} | "
            f"{d['head']:.3g} / {d['whole']:.3g} | {d['budget']:.3g} | {d['dropped']:.3f}, "
            f"{d['masked']:.3g}"
        )


def summarize(res, arms, args):
    per_step = args.prompts * GROUP
    base = res[arms[0][0]]
    start = [sum(h["reward"][:5]) / 5 for h in base]
    best = [float(max(capo_bench.smooth(h["reward"], W))) for h in base]
    target = float(torch.tensor([s + 0.5 * (b - s) for s, b in zip(start, best)]).median())
    print(
        f"\ntarget reward (half-way from start to best small-lr GRPO, {W}-step mean): {target:.3f}"
    )
    rows = []

    def fmt(xs, f):
        return " / ".join("never" if x == math.inf else f.format(x) for x in xs)

    for name, lr, _ in arms:
        hs = res[name]
        st = [sum(h["reward"][:5]) / 5 for h in hs]
        fin = [sum(h["reward"][-W:]) / W for h in hs]
        # collapsed: final reward below half the warm start's (first 5 steps of small-lr GRPO)
        col = sum(f < capo_bench.COLLAPSE_FRACTION * s for f, s in zip(fin, start))
        rej = [sum(h["rejected_fraction"]) / len(h["rejected_fraction"]) for h in hs]
        smp = [capo_bench.samples_to_reach(h["reward"], target, W, per_step) for h in hs]
        share = []
        for h in hs:
            full, head = torch.tensor(h["realized_kl"]), torch.tensor(h["realized_head_kl"])
            ok = full > 1e-12
            share.append(float((head[ok] / full[ok]).median()) if ok.any() else math.nan)
        ent = [sum(h["entropy"][-W:]) / W for h in hs]
        ms = sum(h["seconds"] for h in hs) / sum(len(h["reward"]) for h in hs) * 1e3
        rows.append(
            [
                name,
                f"{lr:g}",
                fmt(st, "{:.2f}"),
                fmt(fin, "{:.2f}"),
                f"{col}/{len(hs)}",
                fmt(rej, "{:.3f}"),
                fmt(ent, "{:.2f}"),
                fmt(smp, "{:.0f}"),
                fmt(share, "{:.2f}"),
                f"{ms:.1f}",
            ]
        )
    print_table(
        [
            "arm",
            "lr",
            "start reward",
            "final reward",
            "collapsed",
            "rejected tokens",
            "final entropy",
            "samples to target",
            "head share of KL (median)",
            "ms/step",
        ],
        rows,
    )
    budgets = " / ".join(f"{h['budget']:.2e}" for h in res["whole-model CAPO"])
    print(f"\nwhole-model KL budgets per seed: {budgets}")
    hs = res["whole-model KL trust region"]
    scales = " / ".join(f"{sum(h['lr_scale']) / len(h['lr_scale']):.3f}" for h in hs)
    print(f"trust region: mean lr scale per seed {scales}")
    print("median realized whole-model KL per step, per seed:")
    for name, _, _ in arms:
        meds = [float(torch.tensor(h["realized_kl"]).median()) for h in res[name]]
        print(f"  {name}: " + " / ".join(f"{m:.2e}" for m in meds))


def plot(res, arms, args):
    plt = pyplot()
    per_step = args.prompts * GROUP
    colors = ["tab:blue", "tab:red", "tab:green", "tab:olive", "tab:purple", "tab:orange"]
    colors += ["tab:brown", "tab:cyan"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, lr, _), c in zip(arms, colors):
        for i, h in enumerate(res[name]):
            r = capo_bench.smooth(h["reward"], W)
            x = (torch.arange(len(r)) + W) * per_step
            ax.plot(x, r, color=c, alpha=0.7, label=f"{name}, lr {lr:g}" if i == 0 else None)
    ax.set_xlabel("samples")
    ax.set_ylabel(f"batch reward ({W}-step mean)")
    ax.set_title(f"Recall toy, V = {args.vocab}, SGD ({args.seeds} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "capo_recall_reward.png"
    save_figure(fig, out)
    print(f"plot written to {out.relative_to(ROOT)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 60 steps, no plot")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--small-lr", type=float, default=1.0)
    ap.add_argument("--large-lr", type=float, default=10.0)
    ap.add_argument(
        "--percentiles",
        type=lambda x: [float(v) for v in x.split(",")],
        default=[95.0, 80.0, 50.0, 20.0],
        help="last-layer CAPO threshold percentiles, one arm each",
    )
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--diagnose", action="store_true", help="only the one-step warm-start diagnostics"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.no_plot = 1, 60, True
    args.num_prompts, args.answer_len, args.sft_steps, args.prompts = 64, 4, 50, 8
    torch.set_num_threads(1)
    arms = [("GRPO small lr", args.small_lr, None), ("GRPO large lr", args.large_lr, None)]
    arms += [(f"last-layer CAPO p{q:g}", args.large_lr, q) for q in args.percentiles]
    arms += [("whole-model CAPO", args.large_lr, "whole")]
    arms += [("whole-model KL trust region", args.large_lr, "trust")]
    res = {name: [] for name, _, _ in arms}
    conc = []
    for seed in range(args.seeds):
        task, state = setup(seed, args)
        conc.append(concentration(seed, task, state, args))
        if args.diagnose:
            continue
        for name, lr, kind in arms:
            if kind == "whole":
                h = run_whole_model(seed, task, state, args)
            elif kind == "trust":
                h = run_trust_region(seed, task, state, args)
            else:
                h = run_arm(lr, kind, seed, task, state, args)
            res[name].append(h)
            print(
                f"seed {seed} {name:22s} final {sum(h['reward'][-W:]) / W:.3f} "
                f"rejected {sum(h['rejected_fraction']) / args.steps:.3f} {h['seconds']:.0f}s",
                flush=True,
            )
    print_concentration(conc, args)
    if args.diagnose:
        return 0
    summarize(res, arms, args)
    if not args.no_plot:
        plot(res, arms, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
