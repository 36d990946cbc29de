"""One-shot pruning of an MLP on sklearn digits: M-FAC OBS vs magnitude vs exact dense OBS.

For each seed an MLP (64-H-H-10) is trained on digits, then pruned one-shot (no fine-tuning) to each
sparsity by every method, all from the same trained weights, and evaluated on the test split.
Prints mean +- std test accuracy over seeds (a markdown table), wall time per pruning run and the
peak extra memory of one pruning run per method (a fresh process each; resident set size
sampled every 0.5 ms, peak minus the value before pruning),
and saves an accuracy-vs-sparsity plot.

    python benchmarks/prune.py            # 3 seeds, 50/70/80/90/95 %, 2-7 min on 2 cores
    python benchmarks/prune.py --quick    # 1 seed, 2 sparsities, smaller model
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import pathlib
import statistics
import threading
import time
import warnings

import torch
from harness import Stopwatch, median, print_row, print_table
from torch import nn

from curvopt.prune import prune
from curvopt.prune.cli import plot_accuracy
from curvopt.prune.zoo import accuracy, batches, build_model, load_dataset, train

ROOT = pathlib.Path(__file__).resolve().parent.parent

# the configurations compared; "data" picks the gradient source
METHODS = {
    "magnitude": dict(method="magnitude"),
    # what a new user tries first: one shot, absolute damping, one gradient per mini-batch of 16
    "mfac naive (k=1, damp 1e-5 abs)": dict(
        method="mfac", steps=1, damp=1e-5, damp_mode="absolute", grad_batch_size=16
    ),
    # the recommended setting: relative damping, small-batch gradients, 16 recomputations
    "mfac (k=16)": dict(method="mfac", steps=16, damp=1.0, grad_batch_size=8),
    "mfac diag. update (k=16)": dict(
        method="mfac", steps=16, damp=1.0, grad_batch_size=8, update="diagonal"
    ),
    "mfac (k=1)": dict(method="mfac", steps=1, damp=1.0, grad_batch_size=8),
    # exact OBS: dense d x d empirical Fisher, 2x more gradients, same schedule
    "exact OBS (k=16, m=128)": dict(
        method="obs", steps=16, damp=1.0, grad_batch_size=8, num_grads=128
    ),
}


def setup(seed: int, hidden: int, epochs: int):
    split = load_dataset("digits", seed=seed)
    model = train(
        build_model("mlp", split, hidden=hidden, seed=seed),
        split.X_train,
        split.y_train,
        epochs=epochs,
        seed=seed,
    )
    calib = batches(split.X_train, split.y_train, 64)
    return split, model, calib


def run_one(base, calib, split, sparsity, cfg, seed):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    with Stopwatch() as watch:
        prune(model, nn.CrossEntropyLoss(), calib, sparsity, **cfg)
    return accuracy(model, split.X_test, split.y_test), watch.seconds


def _memory_child(queue, seed, hidden, state, sparsity, cfg):
    # a fresh process that only loads the trained weights (no training, whose peak would hide
    # the pruning's), so the RSS growth during prune() is the pruning's own peak
    torch.set_num_threads(1)
    split = load_dataset("digits", seed=seed)
    model = build_model("mlp", split, hidden=hidden, seed=seed)
    model.load_state_dict(state)
    model.eval()
    calib = batches(split.X_train, split.y_train, 64)
    # warm up the code paths (autograd, LAPACK, ...) on a tiny network so that loading libraries
    # is not counted as the pruning's memory
    tiny = nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer gradients than asked for: irrelevant here
        prune(tiny, nn.CrossEntropyLoss(), calib[:4], 0.5, **{**cfg, "block_size": 16})
    sampler = RssSampler()
    sampler.start()
    prune(model, nn.CrossEntropyLoss(), calib, sparsity, **cfg)
    queue.put(sampler.stop() / 2**20)


class RssSampler(threading.Thread):
    """Polls the resident set size (``/proc/self/statm``) and keeps the peak above the start."""

    def __init__(self):
        super().__init__(daemon=True)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.rss()
        self.running = True

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0005)

    def stop(self) -> int:
        self.running = False
        self.join()
        self.peak = max(self.peak, self.rss())
        return self.peak - self.base


def peak_memory_mib(seed, hidden, state, sparsity, cfg) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(queue, seed, hidden, state, sparsity, cfg))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 sparsities, hidden 16")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument(
        "--plot",
        type=pathlib.Path,
        default=None,
        help="plot path (default docs/img/prune_accuracy.png; under results/quick with --quick)",
    )
    args = parser.parse_args()
    if args.plot is None:
        folder = ROOT / "results" / "quick" if args.quick else ROOT / "docs" / "img"
        args.plot = folder / "prune_accuracy.png"
    torch.set_num_threads(1)
    sparsities = [0.5, 0.7, 0.8, 0.9, 0.95]
    seeds = list(range(args.seeds))
    hidden, epochs = args.hidden, args.epochs
    if args.quick:
        sparsities, seeds, hidden, epochs = [0.8, 0.9], [0], 16, 30
    acc = {name: {s: [] for s in sparsities} for name in METHODS}
    secs = {name: [] for name in METHODS}
    dense_acc = []
    first_state = None
    for seed in seeds:
        split, base, calib = setup(seed, hidden, epochs)
        if first_state is None:
            first_state = copy.deepcopy(base.state_dict())
        dense_acc.append(accuracy(base, split.X_test, split.y_test))
        for s in sparsities:
            for name, cfg in METHODS.items():
                a, t = run_one(base, calib, split, s, cfg, seed)
                acc[name][s].append(a)
                secs[name].append(t)
                print(
                    f"seed {seed} sparsity {s:.2f} {name:34s} acc {a:.4f} ({t:.2f} s)", flush=True
                )
    d = sum(p.numel() for n, p in base.named_parameters() if n.endswith("weight"))
    print(f"\nMLP 64-{hidden}-{hidden}-10 on digits, {d} prunable weights, seeds {seeds}; ")
    print(f"dense test accuracy {statistics.mean(dense_acc):.4f}; one-shot, no fine-tuning\n")

    def cell(v):
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.3f} ± {sd:.3f}"

    names = list(METHODS)
    print_table(
        ["sparsity", *names],
        [[f"{s:.0%}", *(cell(acc[n][s]) for n in names)] for s in sparsities],
    )
    s_mem = 0.9 if 0.9 in sparsities else sparsities[-1]
    print()
    print_table(
        ["method", "median wall time per run [s]", f"peak extra memory at {s_mem:.0%} [MiB]"]
    )
    for name in names:  # one row at a time: each measures in a fresh process
        mem = peak_memory_mib(seeds[0], hidden, first_state, s_mem, METHODS[name])
        print_row([name, f"{median(secs[name]):.2f}", f"{mem:.1f}"])
    curves = {
        n: [(s, statistics.mean(acc[n][s]), statistics.pstdev(acc[n][s])) for s in sparsities]
        for n in names
    }
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot_accuracy(
        curves, statistics.mean(dense_acc), args.plot, title=f"MLP 64-{hidden}-{hidden}-10, digits"
    )
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
