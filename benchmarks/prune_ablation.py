"""Ablation of what makes M-FAC pruning work (one-shot, no fine-tuning, MLP on digits).

Starting from the recommended setting (relative damping 1, gradients of batches of 8 training
samples, 16 recomputation steps, exact multi-weight update, global scope), change one thing at a
time and report test accuracy at 90 % and 95 % sparsity, next to magnitude pruning.

    python benchmarks/prune_ablation.py            # MLP 64-64-64-10, seed 0, a few minutes
    python benchmarks/prune_ablation.py --quick    # hidden 16, 90 % only
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from harness import print_row, print_table
from torch import nn

from curvopt.prune import prune
from curvopt.prune.zoo import accuracy, batches, build_model, load_dataset, train


def sampled_label_loss(logits, y):
    """Cross-entropy against labels drawn from the model (true Fisher instead of empirical)."""
    with torch.no_grad():
        ys = torch.multinomial(F.softmax(logits, -1), 1).squeeze(1)
    return F.cross_entropy(logits, ys)


BASE = dict(method="mfac", steps=16, damp=1.0, grad_batch_size=8)
ABLATIONS = {
    "magnitude": dict(method="magnitude"),
    "recommended (k=16, rel. damp 1, batches of 8)": BASE,
    "k=1": {**BASE, "steps": 1},
    "k=4": {**BASE, "steps": 4},
    "k=32": {**BASE, "steps": 32},
    "absolute damp 1e-5": {**BASE, "damp": 1e-5, "damp_mode": "absolute"},
    "relative damp 1e-3": {**BASE, "damp": 1e-3},
    "relative damp 0.1": {**BASE, "damp": 0.1},
    "relative damp 10": {**BASE, "damp": 10.0},
    "diagonal update": {**BASE, "update": "diagonal"},
    "no update (scores only)": {**BASE, "update": "none"},
    "per-sample grads, held-out split": {**BASE, "grad_batch_size": 1, "data": "calib"},
    "sampled labels (true Fisher)": {**BASE, "grad_batch_size": 1, "loss": sampled_label_loss},
    "global + per-layer normalization": {**BASE, "normalize": True},
    "layer-wise scope": {**BASE, "scope": "layer"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hidden, sparsities = (16, [0.9]) if args.quick else (args.hidden, [0.9, 0.95])
    split = load_dataset("digits", seed=args.seed)
    base = train(
        build_model("mlp", split, hidden=hidden, seed=args.seed),
        split.X_train,
        split.y_train,
        seed=args.seed,
    )
    data = {
        "train": batches(split.X_train, split.y_train, 64),
        "calib": batches(split.X_calib, split.y_calib, 64),
    }
    print(f"MLP 64-{hidden}-{hidden}-10 on digits, seed {args.seed}, ", end="")
    print(f"dense test accuracy {accuracy(base, split.X_test, split.y_test):.3f}\n")
    print_table(["setting", *(f"{s:.0%}" for s in sparsities)])
    curvature = {}
    for name, cfg in ABLATIONS.items():
        cfg = dict(cfg)
        loader = data[cfg.pop("data", "train")]
        loss = cfg.pop("loss", nn.CrossEntropyLoss())
        cells = []
        for s in sparsities:
            model = copy.deepcopy(base)
            torch.manual_seed(args.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = prune(model, loss, loader, s, **cfg)
            if rep.damp and cfg.get("damp_mode", "relative") == "relative":
                curvature.setdefault(name, rep.damp[0] / cfg["damp"])
            cells.append(f"{accuracy(model, split.X_test, split.y_test):.3f}")
        print_row([name, *cells])
    print("\nmean(diag(G^T G / m)) at the first step, i.e. lambda for relative damping 1:")
    for name, value in curvature.items():
        print(f"  {name}: {value:.3g}")


if __name__ == "__main__":
    main()
