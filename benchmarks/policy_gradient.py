"""REINFORCE vs N-PG-IGT vs N-HARPG vs NPG on CartPole-v1 and Acrobot-v1: return vs trajectories.

Every method gets the same budget of sampled trajectories per run (N-HARPG's Hessian batches count),
a (32, 32) tanh MLP softmax policy, the linear feature baseline, discount 0.99 and horizon H.
The policy is evaluated at the current iterate on separate evaluation trajectories (not counted)
each time another ``eval_every`` trajectories have been sampled. Prints a table of the trajectories
each method needed to reach a return threshold (mean over seeds, how many seeds reached it) and
the final return; writes a plot with 95% confidence bands to docs/img/policy_gradient.png.

Usage: python benchmarks/policy_gradient.py [--quick] [--jobs 2]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp

import numpy as np
import torch
from harness import clock, pyplot, save_figure

from curvopt.optim import NHARPG, NPG, NPGIGT
from curvopt.rl import (
    CategoricalMLPPolicy,
    GymRollout,
    LinearFeatureBaseline,
    PolicyGradientSampler,
)
from curvopt.utils.params import unflatten

ENVS = {
    # env: (obs_dim, n_actions, horizon, trajectory budget, eval_every, threshold)
    "CartPole-v1": (4, 2, 100, 800, 50, 90.0),
    "Acrobot-v1": (6, 3, 200, 300, 50, -100.0),
}
QUICK = {"CartPole-v1": (4, 2, 50, 60, 20, 30.0), "Acrobot-v1": (6, 3, 100, 40, 20, -99.0)}
BATCH = 10  # trajectories per gradient (and per Hessian-vector) estimate
METHODS = ("REINFORCE", "N-PG-IGT", "N-HARPG", "NPG")
# extras (--methods ...): N-SGDM = N-HARPG's recursion and schedules with the Hessian correction
# v_t = 0 and no Hessian batches (normalized momentum d_t = (1 - η_t) d_{t-1} + η_t g_t);
# NPG-MFAC = NPG with the M-FAC Woodbury solve over per-trajectory scores instead of CG
EXTRA_METHODS = ("N-SGDM", "NPG-MFAC")


class WithoutHessian:
    """Wraps a sampler: gradients as usual, Hessian-vector products are zeros (nothing sampled)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def gradient(self, params=None):
        return self.sampler.gradient(params)

    def hvp(self, vector, params=None):
        return torch.zeros_like(vector)


class Reinforce:
    """Vanilla GPOMDP ascent θ += γ_t g, γ_t = γ₀ (2/(t+2))^{2/3} (the authors' 'sgd' baseline)."""

    def __init__(self, params, lr):
        self.params, self.lr, self.t = list(params), lr, 0

    def step(self, sampler):
        g = sampler.gradient(self.params)
        gamma = self.lr * (2 / (self.t + 2)) ** (2 / 3)
        with torch.no_grad():
            for p, gp in zip(self.params, unflatten(g, self.params)):
                p.add_(gamma * gp)
        self.t += 1


def make_optimizer(method, params):
    if method == "REINFORCE":
        return Reinforce(params, lr=0.01)
    if method == "N-PG-IGT":
        return NPGIGT(params, lr=0.3)
    if method in ("N-HARPG", "N-SGDM"):
        return NHARPG(params, lr=0.3, generator=torch.Generator().manual_seed(0))
    if method == "NPG-MFAC":
        return NPG(params, delta=0.02, damping=0.1, solver="mfac")
    return NPG(params, delta=0.02, damping=0.1, cg_iters=10)


def run_one(job):
    env_id, method, seed, cfg = job
    torch.set_num_threads(1)
    obs_dim, n_act, horizon, budget, eval_every, _ = cfg
    torch.manual_seed(seed)
    policy = CategoricalMLPPolicy(obs_dim, n_act, hidden=(32, 32))
    sampler = PolicyGradientSampler(
        policy,
        GymRollout(env_id, horizon, seed=seed),
        batch_size=BATCH,
        discount=0.99,
        baseline=LinearFeatureBaseline(),
    )
    evaluator = GymRollout(env_id, horizon, seed=10_000 + seed)
    opt = make_optimizer(method, policy.parameters())
    xs, ys = [], []
    next_eval = 0
    start = clock()
    while True:
        if sampler.num_trajectories >= next_eval:
            xs.append(sampler.num_trajectories)
            ys.append(float(evaluator(policy, BATCH).total_rewards().mean()))
            next_eval += eval_every
        if sampler.num_trajectories >= budget:
            break
        opt.step(WithoutHessian(sampler) if method == "N-SGDM" else sampler)
        if not all(torch.isfinite(p).all() for p in policy.parameters()):
            raise FloatingPointError(f"{method} diverged on {env_id} (seed {seed})")
    return env_id, method, seed, np.array(xs), np.array(ys), clock() - start


def curves_on_grid(results, env_id, method, grid):
    rows = []
    for r in results:
        if r[0] == env_id and r[1] == method:
            rows.append(np.interp(grid, r[3], r[4]))
    return np.array(rows)


def draw_returns(ax, env_id: str, cfg: tuple, grid, curves: dict) -> None:
    """One panel: mean evaluated return per method with 95% bands, and the table's threshold.

    ``curves`` maps a method to its ``(seeds, len(grid))`` returns. The title says the horizon
    ``H``, which caps the return (CartPole-v1: at most ``H``, not the registered 500); the dashed
    line is the threshold of the "trajectories to threshold" table, named in the legend.
    """
    for method, ys in curves.items():
        mean = ys.mean(0)
        half = 1.96 * ys.std(0, ddof=1) / math.sqrt(len(ys)) if len(ys) > 1 else 0 * mean
        ax.plot(grid, mean, label=method)
        ax.fill_between(grid, mean - half, mean + half, alpha=0.2)
    horizon, threshold = cfg[2], cfg[5]
    ax.axhline(threshold, color="gray", lw=0.8, ls="--", label=f"threshold {threshold:g}")
    seeds = len(next(iter(curves.values())))
    cap = f", return ≤ {horizon}" if env_id.startswith("CartPole") else ""
    ax.set_title(f"{env_id}, episodes cut at H = {horizon}{cap} ({seeds} seeds, 95% CI)")
    ax.set_xlabel("trajectories sampled (incl. Hessian batches)")
    ax.set_ylabel("mean return")
    ax.legend(fontsize=8)


def trajectories_to_threshold(results, env_id, method, threshold):
    """Per seed: trajectories sampled when the evaluated return first reached the threshold.

    A seed that never reaches it counts with its whole run (a lower bound); also returns the mask.
    """
    hits, reached = [], []
    for r in results:
        if r[0] == env_id and r[1] == method:
            above = np.nonzero(r[4] >= threshold)[0]
            hits.append(r[3][above[0]] if len(above) else r[3][-1])
            reached.append(len(above) > 0)
    return np.array(hits, dtype=float), np.array(reached)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5, quick 2)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument(
        "--plot",
        default=None,
        help="output image ('' to skip; default docs/img/policy_gradient.png, none with --quick)",
    )
    ap.add_argument("--envs", nargs="+", choices=list(ENVS), default=list(ENVS))
    ap.add_argument("--methods", nargs="+", choices=METHODS + EXTRA_METHODS, default=list(METHODS))
    args = ap.parse_args(argv)
    envs = {e: c for e, c in (QUICK if args.quick else ENVS).items() if e in args.envs}
    methods = tuple(args.methods)
    if args.plot is None:
        args.plot = "" if args.quick else "docs/img/policy_gradient.png"
    seeds = args.seeds or (2 if args.quick else 5)
    jobs = [(e, m, s, envs[e]) for e in envs for s in range(seeds) for m in methods]
    t0 = clock()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_one, jobs, chunksize=1)
    else:
        results = [run_one(j) for j in jobs]
    wall = clock() - t0

    print(f"\n{seeds} seeds, batch {BATCH} trajectories per estimate, wall {wall:.0f} s")
    for env_id, cfg in envs.items():
        budget, threshold = cfg[3], cfg[5]
        print(f"\n{env_id} (H={cfg[2]}, budget {budget} trajectories, threshold {threshold:g})")
        print(
            f"{'method':<10} {'traj. to threshold':>20} {'reached':>8} "
            f"{'final return':>16} {'ratio vs ' + methods[0]:>19} {'s/run':>6}"
        )
        base = np.mean(trajectories_to_threshold(results, env_id, methods[0], threshold)[0])
        for method in methods:
            hits, reached = trajectories_to_threshold(results, env_id, method, threshold)
            finals = [r[4][-1] for r in results if r[0] == env_id and r[1] == method]
            secs = np.mean([r[5] for r in results if r[0] == env_id and r[1] == method])
            ratio = np.mean(hits) / base
            print(
                f"{method:<10} {np.mean(hits):>14.0f} ± {np.std(hits):<4.0f}"
                f" {int(reached.sum()):>4}/{len(hits):<3}"
                f" {np.mean(finals):>9.1f} ± {np.std(finals):<5.1f} {ratio:>19.2f} {secs:>6.1f}"
            )

    if args.plot:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4))
        for ax, (env_id, cfg) in zip(np.atleast_1d(axes), envs.items()):
            grid = np.arange(0, cfg[3] + 1, cfg[4])
            curves = {m: curves_on_grid(results, env_id, m, grid) for m in methods}
            draw_returns(ax, env_id, cfg, grid, curves)
        fig.tight_layout()
        out = save_figure(fig, args.plot, dpi=110)
        print(f"\nplot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
