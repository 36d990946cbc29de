"""Sample complexity of policy gradients on problems with an exact J: trajectories to J* − J ≤ ε.

Problems (both with exactly computable J(θ) and optimum J*):

- ``lqr``: a discounted linear-quadratic regulator (3 states, 2 actions, γ = 0.9, episodes of
  geometric length, so the undiscounted episode return samples J exactly) with the linear Gaussian
  policy u = θx + σε, σ = 1 fixed (Fisher-non-degenerate, the setting of N-HARPG's theory);
  J, J* from the Lyapunov/Riccati equations (``curvopt.rl.LinearQuadraticRegulator``).
- ``tabular``: a layered random tabular MDP (each state is visited at one step only, so a
  stationary softmax policy can be optimal and J* is the backward-induction optimum), softmax
  table policy (NOT Fisher-non-degenerate: the Fisher vanishes as the policy turns deterministic).

Methods, each with its paper's schedules (t = step index, γ₀ swept):

- N-HARPG: γ_t = γ₀·2/(t+2), η_t = 2/(t+2), Hessian batch at a random point of the last segment;
- N-PG-IGT: γ_t = γ₀·2/(t+2), η_t = (2/(t+2))^{4/5}, gradient at the extrapolated point;
- N-SGDM (normalized momentum without the Hessian term): γ_t = γ₀·2/(t+2), η_t = (2/(t+2))^{2/3};
- REINFORCE (GPOMDP, no baseline): θ += γ_t g, γ_t = γ₀ (2/(t+2))^{2/3};
- NPG: KL trust region δ_t = δ₀·2/(t+2) (step length ∝ t^{-1/2}; our choice, the paper has no
  NPG schedule, and a fixed δ stalls at its noise floor), 10 CG iterations, damping 1e-3.

Every method gets the same number of trajectories per estimate (``--batch``; N-HARPG's Hessian
batches are counted). The step size of each method is chosen from a small sweep on separate
tuning seeds (score: mean over tuning seeds and ε of log trajectories-to-ε, a run that never
reaches ε counting as twice the budget), then the evaluation seeds are run with the chosen value.
The gap is normalized: ε is measured on (J* − J(θ)) / (J* − J(θ₀)), θ₀ = 0 (LQR) or uniform.

Prints, per problem and method, the median and quartiles of the trajectories to each ε, how many
seeds reached it, the ratio of the median to N-PG-IGT's at the smallest ε both reached (half the
seeds or more), and the least-squares slope of log(median trajectories) against log(1/ε) over the
ε that at least half of the seeds reached, next to the theory (2 for N-HARPG, 2.5 for N-PG-IGT).

Usage: python benchmarks/pg_rates.py [--quick] [--seeds 20] [--jobs 2] [--problems lqr tabular]
(full run: about 15 min of CPU; --quick: a smoke run of about a minute, figure under results/quick)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pathlib
import sys
import time

import numpy as np
import torch

from curvopt.optim import NHARPG, NPG, NPGIGT
from curvopt.rl import (
    LinearGaussianPolicy,
    LinearQuadraticRegulator,
    PolicyGradientSampler,
    TabularMDP,
    TabularSoftmaxPolicy,
)

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from harness import clock, pyplot, save_figure  # noqa: E402
from policy_gradient import Reinforce, WithoutHessian  # noqa: E402  (the same baselines)

METHODS = ("N-HARPG", "N-PG-IGT", "N-SGDM", "REINFORCE", "NPG")
THEORY = {"N-HARPG": "2", "N-PG-IGT": "2.5"}
# step-size sweeps (γ₀; δ₀ for NPG), per problem
SWEEPS = {
    "lqr": {
        "N-HARPG": (0.1, 0.3, 1.0),
        "N-PG-IGT": (0.1, 0.3, 1.0),
        "N-SGDM": (0.1, 0.3, 1.0),
        "REINFORCE": (0.0003, 0.001, 0.003),
        "NPG": (0.003, 0.03, 0.3),
    },
    "tabular": {
        "N-HARPG": (3.0, 10.0, 30.0),
        "N-PG-IGT": (3.0, 10.0, 30.0),
        "N-SGDM": (3.0, 10.0, 30.0),
        "REINFORCE": (1.0, 3.0, 10.0),
        "NPG": (0.1, 1.0, 10.0),
    },
}
EPSILONS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.03)


class Problem:
    """A policy, its sampler and the exact normalized gap (J* − J(θ)) / (J* − J(θ₀))."""

    def __init__(self, name: str, seed: int):
        self.name = name
        if name == "lqr":
            self.system = LinearQuadraticRegulator.random(
                3, 2, discount=0.9, spectral_radius=0.8, seed=1
            )
            self.system.generator.manual_seed(10_000 + seed)
            self.std = 1.0
            self.policy = LinearGaussianPolicy(3, 2, self.std).double()
            self.discount = 1.0  # geometric episode lengths carry the discount
            self.j_star = self.system.optimal_return(self.std)
        else:
            self.system = TabularMDP.layered(4, 3, horizon=5, discount=0.95, seed=0)
            self.system.generator.manual_seed(10_000 + seed)
            s, a = self.system.rewards.shape
            self.policy = TabularSoftmaxPolicy(s, a).double()
            self.discount = self.system.discount
            self.j_star = float(self.system.optimal_return())
        self.j0 = self.exact_return()

    def exact_return(self) -> float:
        with torch.no_grad():
            if self.name == "lqr":
                return self.system.expected_return(self.policy.mean_net.weight, self.std)
            return float(self.system.expected_return(self.system.policy_table(self.policy)))

    def gap(self) -> float:
        return (self.j_star - self.exact_return()) / (self.j_star - self.j0)

    def sampler(self, batch: int) -> PolicyGradientSampler:
        return PolicyGradientSampler(self.policy, self.system.rollout, batch, self.discount)


class DecayingTrustRegionNPG:
    """NPG whose KL radius decays as δ_t = δ₀·2/(t+2) (step length ∝ t^{-1/2})."""

    def __init__(self, params, delta0):
        self.npg = NPG(params, delta=delta0, damping=1e-3, cg_iters=10)
        self.delta0, self.t = delta0, 0

    def step(self, sampler):
        self.npg.param_groups[0]["delta"] = self.delta0 * 2 / (self.t + 2)
        self.npg.step(sampler)
        self.t += 1


def make_optimizer(method, params, lr, seed):
    if method == "N-HARPG":
        return NHARPG(params, lr=lr, generator=torch.Generator().manual_seed(seed))
    if method == "N-PG-IGT":
        return NPGIGT(params, lr=lr)
    if method == "N-SGDM":
        return NHARPG(params, lr=lr, momentum_power=2 / 3)
    if method == "REINFORCE":
        return Reinforce(params, lr=lr)
    return DecayingTrustRegionNPG(params, lr)


def run_one(job):
    """Trajectories sampled when the gap first fell to each ε (inf if never), and the gap curve."""
    problem_name, method, lr, seed, budget, batch = job
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    problem = Problem(problem_name, seed)
    sampler = problem.sampler(batch)
    params = list(problem.policy.parameters())
    opt = make_optimizer(method, params, lr, seed)
    hits = np.full(len(EPSILONS), np.inf)
    curve = [(0, 1.0)]
    start = time.process_time()
    while sampler.num_trajectories < budget:
        opt.step(WithoutHessian(sampler) if method == "N-SGDM" else sampler)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            break  # diverged: never reaches the remaining ε
        gap = problem.gap()
        curve.append((sampler.num_trajectories, gap))
        for i, eps in enumerate(EPSILONS):
            if gap <= eps and hits[i] == np.inf:
                hits[i] = sampler.num_trajectories
    return problem_name, method, lr, seed, hits, np.array(curve), time.process_time() - start


def run_jobs(jobs, n_workers):
    if n_workers > 1:
        with mp.get_context("spawn").Pool(n_workers) as pool:
            return pool.map(run_one, jobs, chunksize=1)
    return [run_one(j) for j in jobs]


def sweep_score(hits, budget):
    """Mean log trajectories-to-ε over ε and seeds; never reached counts as 2·budget."""
    return float(np.mean(np.log(np.where(np.isfinite(hits), hits, 2.0 * budget))))


def fit_slope(medians):
    """Slope of log(median trajectories) vs log(1/ε) over the ε with a finite median."""
    ok = np.isfinite(medians)
    if ok.sum() < 2:
        return float("nan"), int(ok.sum())
    x = np.log(1 / np.asarray(EPSILONS)[ok])
    y = np.log(medians[ok])
    return float(np.polyfit(x, y, 1)[0]), int(ok.sum())


def draw_rates(ax, rates: dict, budget: int) -> None:
    """Median trajectories to each ε against 1/ε (log-log), with ε^-2 and ε^-2.5 guides.

    ``rates`` maps a method to ``(medians over EPSILONS, slope)``. The x axis spans only the ε
    that some method reached, ticked at those 1/ε (no minor labels to collide); a method that
    reached fewer than two ε has no slope and says so in its legend entry.
    """
    from matplotlib.ticker import FixedLocator, NullFormatter

    inv = 1 / np.asarray(EPSILONS)
    reached = np.zeros(len(EPSILONS), dtype=bool)
    for m, (med, slope) in rates.items():
        ok = np.isfinite(med)
        reached |= ok
        note = (
            f"slope {slope:.2f}" if np.isfinite(slope) else f"{int(ok.sum())} ε reached, no slope"
        )
        ax.plot(inv[ok], med[ok], "o-", label=f"{m} ({note})")
    shown = inv[reached] if reached.any() else inv[:1]
    firsts = [v[0][0] for v in rates.values() if np.isfinite(v[0][0])]
    ref = np.median(firsts or [1.0])
    for power, style in ((2.0, ":"), (2.5, "--")):
        ax.plot(
            shown, ref * (shown / inv[0]) ** power, "k" + style, lw=0.8,
            label=f"guide ∝ ε^-{power}",
        )  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="1/ε", ylabel="median trajectories to ε")
    ax.set_xlim(shown[0] / 1.15, shown[-1] * 1.15)
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:.3g}")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(top=budget * 3)
    ax.legend(fontsize=7)


def quantiles(hits):
    """Median and quartiles over seeds, treating 'never reached' as +inf (so they can be inf)."""
    q = np.quantile(np.sort(hits), [0.25, 0.5, 0.75], method="lower")
    return q


def fmt(x):
    return "—" if not np.isfinite(x) else f"{x:.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    ap.add_argument("--seeds", type=int, default=None, help="evaluation seeds (default 20; 3)")
    ap.add_argument("--tune-seeds", type=int, default=None, help="sweep seeds (default 2; 1)")
    ap.add_argument("--budget", type=int, default=None, help="trajectories per run (2500; 300)")
    ap.add_argument("--batch", type=int, default=5, help="trajectories per estimate")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--problems", nargs="+", choices=("lqr", "tabular"), default=["lqr", "tabular"])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--plot", default=None, help="figure path ('' to skip)")
    args = ap.parse_args(argv)
    seeds = args.seeds or (3 if args.quick else 20)
    tune_seeds = args.tune_seeds or (1 if args.quick else 2)
    budget = args.budget or (300 if args.quick else 2500)
    if args.plot is None:
        args.plot = "results/quick/pg_rates.png" if args.quick else "docs/img/pg_rates.png"
    cpu0, wall0 = time.process_time(), clock()

    # 1. step-size sweep on tuning seeds 1000, 1001, ... (never used for evaluation)
    sweep_jobs = [
        (p, m, lr, 1000 + s, budget, args.batch)
        for p in args.problems
        for m in args.methods
        for lr in SWEEPS[p][m]
        for s in range(tune_seeds)
    ]
    sweep = run_jobs(sweep_jobs, args.jobs)
    chosen = {}
    for p in args.problems:
        for m in args.methods:
            scores = {
                lr: sweep_score(np.stack([r[4] for r in sweep if r[:3] == (p, m, lr)]), budget)
                for lr in SWEEPS[p][m]
            }
            chosen[p, m] = min(scores, key=scores.get)

    # 2. evaluation seeds 0, 1, ... with the chosen step sizes
    eval_jobs = [
        (p, m, chosen[p, m], s, budget, args.batch)
        for p in args.problems
        for m in args.methods
        for s in range(seeds)
    ]
    results = run_jobs(eval_jobs, args.jobs)
    cpu_workers = sum(r[6] for r in sweep + results)
    wall = clock() - wall0

    print(
        f"\n{seeds} evaluation seeds, {tune_seeds} tuning seed(s) per swept value, batch "
        f"{args.batch} trajectories per estimate, budget {budget} trajectories per run; "
        f"wall {wall:.0f} s, CPU {cpu_workers + time.process_time() - cpu0:.0f} s"
    )
    eps_head = "".join(f"{'ε=' + format(e, 'g'):>21}" for e in EPSILONS)
    summary = {}
    for p in args.problems:
        probe = Problem(p, 0)
        print(f"\n{p}: J* = {probe.j_star:.4f}, J(θ₀) = {probe.j0:.4f}; trajectories to gap ≤ ε:")
        print("median [q1, q3] (seeds that reached it); slope of log(median) vs log(1/ε)")
        print(f"{'method':<10} {'step':>6}{eps_head} {'slope':>7} {'theory':>7} {'vs IGT':>7}")
        base = [r[4] for r in results if r[0] == p and r[1] == "N-PG-IGT"]
        base_med = np.full(len(EPSILONS), np.nan)
        if base:
            base_med = np.array([quantiles(np.stack(base)[:, i])[1] for i in range(len(EPSILONS))])
        for m in args.methods:
            hits = np.stack([r[4] for r in results if r[0] == p and r[1] == m])
            cells, medians = [], []
            for i in range(len(EPSILONS)):
                q1, med, q3 = quantiles(hits[:, i])
                medians.append(med)
                reached = int(np.isfinite(hits[:, i]).sum())
                cells.append(f"{fmt(med)} [{fmt(q1)},{fmt(q3)}]({reached})")
            slope, npts = fit_slope(np.array(medians))
            summary[p, m] = (np.array(medians), slope)
            # ratio of median trajectories to N-PG-IGT's at the smallest ε both reached
            both = np.isfinite(np.array(medians)) & np.isfinite(base_med)
            ratio = np.array(medians)[both][-1] / base_med[both][-1] if both.any() else np.nan
            print(
                f"{m:<10} {chosen[p, m]:>6g}"
                + "".join(f"{c:>21}" for c in cells)
                + f" {slope:>7.2f} {THEORY.get(m, '—'):>7} {ratio:>7.2f}"
            )

    if args.plot:
        plt = pyplot()
        fig, axes = plt.subplots(2, len(args.problems), figsize=(5.5 * len(args.problems), 8))
        axes = np.array(axes).reshape(2, -1)
        for col, p in enumerate(args.problems):
            ax = axes[0, col]
            grid = np.unique(np.geomspace(args.batch, budget, 60).astype(int))
            for m in args.methods:
                curves = []
                for r in results:
                    if r[0] == p and r[1] == m:
                        c = r[5]
                        idx = np.searchsorted(c[:, 0], grid, side="right") - 1
                        curves.append(np.minimum.accumulate(c[:, 1])[idx])
                curves = np.maximum(np.array(curves), 1e-12)
                ax.plot(grid, np.median(curves, 0), label=m)
                q1, q3 = np.quantile(curves, [0.25, 0.75], axis=0)
                ax.fill_between(grid, q1, q3, alpha=0.15)
            ax.set(
                xscale="log", yscale="log", xlabel="trajectories sampled", ylabel="best gap so far"
            )
            ax.set_title(f"{p}: normalized gap (median, quartiles, {seeds} seeds)")
            ax.legend(fontsize=8)
            draw_rates(axes[1, col], {m: summary[p, m] for m in args.methods}, budget)
        fig.tight_layout()
        out = save_figure(fig, args.plot, dpi=100)
        print(f"\nplot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
