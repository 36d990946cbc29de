"""GNSNewton and MFAC against standard optimizers, side by side in one run.

Part 1 (GNSNewton, float64, full batch): L2-regularized logistic regression on sklearn's
breast_cancer (standardized) and softmax regression on sklearn's digits. ||grad|| vs iteration and
vs time for GNSNewton with the exact Hessian, GGN, Fisher, empirical Fisher and M-FAC curvatures,
against gradient descent with backtracking, torch.optim.LBFGS (strong Wolfe) and exact Newton.

Part 2 (MFAC, float32, mini-batches): an MLP and a small CNN on digits; MFAC vs Adam vs SGD with
momentum, 3 seeds each, learning rates picked per optimizer by a short sweep on a separate seed;
final test accuracy and loss, and the per-step time of MFAC as a ratio to Adam measured
interleaved.

Usage: python benchmarks/optimizers.py [--quick] [--plots DIR]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics

import torch
from harness import Stopwatch, clock, median, print_table, pyplot, save_figure
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn
from torch.func import functional_call

plt = pyplot()

from curvopt.curvature import (  # noqa: E402
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from curvopt.optim import MFAC, GNSNewton  # noqa: E402
from curvopt.utils.params import flatten, unflatten  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-10
MU = 1e-3  # L2 regularization (mu/2) ||w||^2

# ----------------------------------------------------------------------------- part 1: GNS


class BinaryLogits(nn.Module):
    """Logistic regression written as 2-class cross-entropy: logits ``[0, x^T w + b]``."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, 1)

    def forward(self, x):
        z = self.linear(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def standardize(X):
    X = torch.as_tensor(X, dtype=torch.float64)
    std = X.std(0)
    return (X - X.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))


def glm_problem(name):
    if name == "breast_cancer":
        X, y = load_breast_cancer(return_X_y=True)
        X = standardize(X)
        model = BinaryLogits(X.shape[1])
    else:
        X, y = load_digits(return_X_y=True)
        X = standardize(X)
        model = nn.Linear(X.shape[1], 10)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    y = torch.as_tensor(y, dtype=torch.int64)
    return model, [(X, y)]


class ShiftedOperator:
    """``op + mu I`` (the Hessian of the L2 term added to a curvature operator)."""

    def __init__(self, op, mu):
        self.op, self.mu = op, mu

    def __matmul__(self, v):
        return self.op @ v + self.mu * v

    def to_dense(self):
        H = self.op.to_dense()
        return H + self.mu * torch.eye(H.shape[0], dtype=H.dtype)


def make_flat_loss(model, data):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p for p in model.parameters()]
    (X, y), ce = data[0], nn.CrossEntropyLoss()

    def f(w):
        params = dict(zip(names, unflatten(w, shapes)))
        return ce(functional_call(model, params, (X,)), y) + 0.5 * MU * w.square().sum()

    return f


def run_gns(model, data, curvature, max_iters):
    params = list(model.parameters())
    ce = nn.CrossEntropyLoss()
    X, y = data[0]
    builds = [0]

    def fisher_mc(model, ce, ps, data):  # one sampled label per example, fresh draws per step
        builds[0] += 1
        return FisherOperator(model, ce, ps, data, mc_samples=1, seed=builds[0])

    if curvature == "mfac":  # F = MU I + G^T G / m: the L2 term's Hessian is the damping
        opt = GNSNewton(params, curvature="mfac", mfac_m=16, mfac_damp=MU)
    else:
        cls = dict(
            hessian=HessianOperator,
            ggn=GGNOperator,
            fisher_mc1=fisher_mc,
            empirical_fisher=EmpiricalFisherOperator,
        )[curvature]
        opt = GNSNewton(params, curvature=lambda ps: ShiftedOperator(cls(model, ce, ps, data), MU))

    def loss_now():
        return ce(model(X), y) + 0.5 * MU * sum(p.square().sum() for p in params)

    def closure():
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        return loss

    def grad_norm():  # for the record; not timed and not counted
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_now(), params)
        return float(torch.linalg.vector_norm(flatten(list(grads))))

    hist = timed_history(
        lambda: opt.step(closure),
        grad_norm,
        max_iters,
        lambda: opt.state["gns"]["closure_calls"],
    )
    return hist, opt.state["gns"]


def timed_history(step, grad_norm, max_iters, evals):
    hist, elapsed = [(0, grad_norm(), 0.0, 1)], 0.0
    for it in range(1, max_iters + 1):
        with Stopwatch() as watch:
            step()
        elapsed += watch.seconds
        gn = grad_norm()
        hist.append((it, gn, elapsed, evals()))
        if gn <= TOL or not math.isfinite(gn):
            break
    return hist


def run_gd_backtracking(f, w0, max_iters):
    """Gradient descent, L doubled until f(T) <= f + <g, T-x> + L/2 ||T-x||^2, then halved."""
    state = dict(w=w0.clone(), L=1.0, evals=1)
    grad = torch.func.grad_and_value(f)

    def step():
        g, fx = grad(state["w"])
        while True:
            T = state["w"] - g / state["L"]
            state["evals"] += 1
            if f(T) <= fx - g.square().sum() / (2 * state["L"]):
                break
            state["L"] *= 2
        state["w"], state["L"] = T, state["L"] / 2

    return timed_history(
        step,
        lambda: float(torch.func.grad(f)(state["w"]).norm()),
        max_iters,
        lambda: state["evals"],
    )


def run_lbfgs(f, w0, max_iters):
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=1,  # one iteration per step() call; max_eval must then be raised explicitly
        max_eval=25,
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = f(w)
        loss.backward()
        return loss

    return timed_history(
        lambda: opt.step(closure),
        lambda: float(torch.func.grad(f)(w.detach()).norm()),
        max_iters,
        lambda: calls[0],
    )


def run_newton(f, w0, max_iters):
    state = dict(w=w0.clone(), evals=1)
    hess = torch.func.hessian(f)

    def step():
        g = torch.func.grad(f)(state["w"])
        state["w"] = state["w"] - torch.linalg.solve(hess(state["w"]), g)
        state["evals"] += 1

    def grad_norm():
        return float(torch.func.grad(f)(state["w"]).norm())

    return timed_history(step, grad_norm, max_iters, lambda: state["evals"])


def part_gns(quick, plots):
    max_second, max_first, max_mfac = (25, 300, 100) if quick else (60, 3000, 500)
    results = {}
    for name in ("breast_cancer", "digits"):
        rows = {}
        for curv in ("hessian", "ggn", "fisher_mc1", "empirical_fisher", "mfac"):
            model, data = glm_problem(name)
            hist, st = run_gns(model, data, curv, max_second if curv != "mfac" else max_mfac)
            rows[f"GNS {curv}"] = (hist, st["trials"] / max(st["steps"], 1))
            print(f"  {name} GNS {curv}: {hist[-1][0]} it, ||g|| {hist[-1][1]:.1e}", flush=True)
        model, data = glm_problem(name)
        f = make_flat_loss(model, data)
        w0 = flatten([p.detach() for p in model.parameters()])
        rows["GD backtracking"] = (run_gd_backtracking(f, w0, max_first), None)
        rows["L-BFGS (torch)"] = (run_lbfgs(f, w0, max_first), None)
        rows["exact Newton"] = (run_newton(f, w0, max_second), None)
        results[name] = (rows, w0.numel())

    print("\n## GNSNewton: iterations to ||grad|| <= 1e-10 (float64, full batch)\n")
    table = []
    for name, (rows, d) in results.items():
        for method, (hist, trials) in rows.items():
            it, gn, t, ev = hist[-1]
            firsts = [next((h[0] for h in hist if h[1] <= tol), "-") for tol in (1e-6, 1e-8)]
            reached = str(it) if gn <= TOL else f"not in {it}"
            extra = f" (trials/step {trials:.2f})" if trials is not None else ""
            table.append(
                [f"{name} ({d})", f"{method}{extra}", *firsts, reached, ev, f"{gn:.1e}", f"{t:.3f}"]
            )
    print_table(
        [
            "problem (d)",
            "method",
            "it. to 1e-6",
            "it. to 1e-8",
            "it. to 1e-10",
            "closure/grad evals",
            "final ‖g‖",
            "time [s]",
        ],
        table,
        align="llrrrrrr",
    )

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, (name, (rows, d)) in enumerate(results.items()):
        for method, (hist, _) in rows.items():
            its = [h[0] for h in hist]
            gns = [max(h[1], 1e-16) for h in hist]
            ts = [max(h[2], 1e-5) for h in hist]
            style = "--" if method.startswith(("GD", "L-BFGS", "exact")) else "-"
            axes[row, 0].semilogy(its, gns, style, label=method)
            axes[row, 1].loglog(ts, gns, style, label=method)
        axes[row, 0].set(title=f"{name} (d={d}): ||grad|| vs iteration", xlabel="iteration")
        axes[row, 1].set(title=f"{name}: ||grad|| vs time", xlabel="seconds (log)")
        axes[row, 0].set_xscale("symlog", linthresh=10)
        for ax in axes[row]:
            ax.axhline(TOL, color="gray", lw=0.5)
            ax.set_ylabel("||grad||")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, plots / "gns_convergence.png")
    print(f"\nplot: {out}")


# ----------------------------------------------------------------------------- part 2: MFAC


def digits_split():
    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return (X[:1437], y[:1437]), (X[1437:], y[1437:])


def make_model(kind, seed):
    torch.manual_seed(seed)
    if kind == "MLP":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


OPTIMIZERS = {
    # damp 1e-2 chosen by a one-off sweep (damp 1e-4..1e-1 x lr 3e-3..1e-1, seed 100, 150 steps)
    "MFAC": (
        lambda ps, lr: MFAC(ps, lr=lr, m=32, damp=1e-2, momentum=0.9, graft=None),
        (1e-3, 3e-3, 1e-2),
    ),
    "Adam": (lambda ps, lr: torch.optim.Adam(ps, lr=lr), (1e-3, 3e-3, 1e-2)),
    "SGD-momentum": (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), (0.01, 0.03, 0.1)),
}


def train(kind, opt_name, lr, seed, steps, train_set, test_set, batch=64, every=10):
    model = make_model(kind, seed)
    opt = OPTIMIZERS[opt_name][0](model.parameters(), lr)
    X, y = train_set
    gen = torch.Generator().manual_seed(seed)
    ce = nn.CrossEntropyLoss()
    curve, elapsed, perm, pos = [], 0.0, torch.randperm(len(y), generator=gen), 0
    for step in range(1, steps + 1):
        if pos + batch > len(y):
            perm, pos = torch.randperm(len(y), generator=gen), 0
        idx = perm[pos : pos + batch]
        pos += batch
        with Stopwatch() as watch:
            opt.zero_grad()
            ce(model(X[idx]), y[idx]).backward()
            opt.step()
        elapsed += watch.seconds
        if step % every == 0 or step == steps:
            with torch.no_grad():
                train_loss = float(ce(model(X), y))
            curve.append((step, elapsed, train_loss))
    with torch.no_grad():
        logits = model(test_set[0])
        test_loss = float(ce(logits, test_set[1]))
        acc = float((logits.argmax(1) == test_set[1]).double().mean())
    return curve, test_loss, acc


def step_overhead(kind, train_set, rounds, iters=20, batch=64):
    """Median time of one iteration (forward+backward+step) and of step() alone, interleaved."""
    X, y = train_set[0][:batch], train_set[1][:batch]
    ce = nn.CrossEntropyLoss()
    setups = {}
    for name, (make, lrs) in OPTIMIZERS.items():
        model = make_model(kind, 0)
        setups[name] = (model, make(model.parameters(), lrs[0]))
    total = {n: [] for n in setups}
    only = {n: [] for n in setups}
    for r in range(rounds):
        order = list(setups)[r % 3 :] + list(setups)[: r % 3]
        for name in order:
            model, opt = setups[name]
            t_step = 0.0
            t0 = clock()
            for _ in range(iters):
                opt.zero_grad()
                ce(model(X), y).backward()
                with Stopwatch() as watch:
                    opt.step()
                t_step += watch.seconds
            total[name].append((clock() - t0) / iters)
            only[name].append(t_step / iters)
    return {n: (median(total[n]), median(only[n])) for n in setups}


def part_mfac(quick, plots):
    train_set, test_set = digits_split()
    steps, sweep_steps, rounds = (150, 60, 5) if quick else (600, 200, 15)
    seeds = (0, 1, 2)
    print(f"\n## MFAC vs Adam vs SGD-momentum on digits ({steps} steps of batch 64, 3 seeds)\n")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    summary, overheads = [], {}
    for row, kind in enumerate(("MLP", "CNN")):
        for name, (_, lrs) in OPTIMIZERS.items():
            sweep = {
                lr: train(kind, name, lr, 100, sweep_steps, train_set, test_set)[0][-1][2]
                for lr in lrs
            }
            lr = min(sweep, key=lambda k: sweep[k] if math.isfinite(sweep[k]) else math.inf)
            runs = [train(kind, name, lr, s, steps, train_set, test_set) for s in seeds]
            accs = [r[2] for r in runs]
            losses = [r[1] for r in runs]
            train_final = [r[0][-1][2] for r in runs]
            summary.append((kind, name, lr, accs, losses, train_final))
            print(f"  {kind} {name}: lr {lr:g}, test acc {statistics.mean(accs):.3f}", flush=True)
            steps_axis = [c[0] for c in runs[0][0]]
            mean_loss = [statistics.mean(r[0][i][2] for r in runs) for i in range(len(steps_axis))]
            mean_time = [statistics.mean(r[0][i][1] for r in runs) for i in range(len(steps_axis))]
            axes[row, 0].semilogy(steps_axis, mean_loss, label=f"{name} (lr {lr:g})")
            axes[row, 1].semilogy(mean_time, mean_loss, label=name)
        axes[row, 0].set(title=f"{kind}: train loss vs step (mean of 3 seeds)", xlabel="step")
        axes[row, 1].set(title=f"{kind}: train loss vs wall time", xlabel="seconds")
        axes[row, 0].legend(fontsize=8)
        overheads[kind] = step_overhead(kind, train_set, rounds)
    fig.tight_layout()
    out = save_figure(fig, plots / "mfac_training.png")

    rows = []
    for kind, name, lr, accs, losses, tr in summary:
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(
            [
                kind,
                name,
                f"{lr:g}",
                f"{100 * statistics.mean(accs):.1f} ± {100 * sd:.1f} %",
                f"{statistics.mean(losses):.3f}",
                f"{statistics.mean(tr):.4f}",
            ]
        )
    print_table(
        ["model", "optimizer", "lr (sweep)", "test acc (mean ± sd)", "test loss", "train loss"],
        rows,
        align="llrrrr",
    )
    rows = []
    for kind, times in overheads.items():
        ta, sa = times["Adam"]
        for name, (t, s) in times.items():
            rows.append(
                [kind, name, f"{1e3 * t:.2f}", f"{t / ta:.2f}", f"{1e3 * s:.3f}", f"{s / sa:.2f}"]
            )
    print_table(
        ["model", "optimizer", "iteration [ms]", "ratio", "step() only [ms]", "ratio"],
        rows,
        title="Per-step time, interleaved, median of rounds (ratio to Adam)",
        align="llrrrr",
    )
    print(f"\nplot: {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and steps")
    parser.add_argument(
        "--plots",
        type=pathlib.Path,
        default=None,
        help="plot folder (default docs/img; results/quick with --quick, so the docs stay intact)",
    )
    parser.add_argument("--part", choices=("all", "gns", "mfac"), default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.plots is None:
        args.plots = ROOT / "results" / "quick" if args.quick else ROOT / "docs" / "img"
    args.plots.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = clock()
    if args.part in ("all", "gns"):
        part_gns(args.quick, args.plots)
    if args.part in ("all", "mfac"):
        part_mfac(args.quick, args.plots)
    print(f"\ntotal benchmark time: {clock() - t0:.0f} s")


if __name__ == "__main__":
    main()
