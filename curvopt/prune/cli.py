"""``curvopt prune``: train a built-in model on an sklearn dataset, prune it, report accuracy.

Example::

    curvopt prune --model mlp --dataset digits --sparsity 0.8 0.9 0.95 --method mfac --steps 16
    curvopt prune --model mlp --dataset digits --pattern 2:4 --method layerwise

prints a per-layer table for each sparsity and a summary (accuracy before/after), and writes
``prune_result.json`` and ``prune_accuracy.png`` (accuracy against sparsity, beside magnitude
pruning to the same targets as the baseline) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time

import torch
from torch import nn

from ..cli_types import (
    check_output_dir,
    fraction,
    nonnegative_int,
    positive_float,
    positive_int,
    seed,
)
from .patterns import parse_nm, parse_pattern
from .pruner import METHODS, SCOPES, prune
from .zoo import DATASETS, MODELS, accuracy, batches, build_model, load_dataset, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``curvopt prune``."""
    parser.add_argument("--model", choices=MODELS, default="mlp", help="built-in model")
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="sklearn dataset")
    parser.add_argument(
        "--sparsity",
        type=fraction,
        nargs="+",
        default=None,
        help="target sparsities in [0, 1) (default: 0.9, or 1 - n/m with --pattern)",
    )
    parser.add_argument(
        "--pattern",
        default=None,
        help="N:M pattern, e.g. 2:4: at most n non-zero weights in every m consecutive inputs "
        "(default: none, unstructured)",
    )
    parser.add_argument("--method", choices=METHODS, default="mfac", help="pruning method")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=16,
        help="recomputation steps per sparsity",
    )
    parser.add_argument("--scope", choices=SCOPES, default="global", help="threshold scope")
    parser.add_argument("--num-grads", type=positive_int, default=64, help="gradients m")
    parser.add_argument("--block-size", type=positive_int, default=128, help="M-FAC block size")
    parser.add_argument(
        "--damp",
        type=positive_float,
        default=None,
        help="damping relative to mean(diag(G^T G/m)), for layerwise to mean(diag H) "
        "(default: 1.0) (layerwise: 0.01)",
    )
    parser.add_argument(
        "--grad-batch-size", type=positive_int, default=8, help="samples per gradient"
    )
    parser.add_argument(
        "--update",
        choices=["auto", "multi", "diagonal", "none"],
        default="auto",
        help="OBS weight update",
    )
    parser.add_argument("--hidden", type=positive_int, default=64, help="hidden width of the mlp")
    parser.add_argument("--epochs", type=nonnegative_int, default=60, help="training epochs")
    parser.add_argument("--seed", type=seed, default=0, help="random seed")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("."),
        help="folder for prune_result.json and prune_accuracy.png (default: the current folder, "
        "created if missing)",
    )
    parser.set_defaults(_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Train, prune at each sparsity (from the same trained model), print and save results."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    parser: argparse.ArgumentParser = args._parser
    if args.model == "cnn" and args.dataset != "digits":
        parser.error(f"--model cnn needs an image dataset (--dataset digits), not {args.dataset}")
    if args.sparsity is None:
        args.sparsity = [0.9]
        if args.pattern is not None:
            n, m = parse_pattern_arg(parser, args.pattern, None)
            args.sparsity = [1 - n / m]
    if args.pattern is not None:
        for s in args.sparsity:
            parse_pattern_arg(parser, args.pattern, s)
    if args.method == "layerwise" and args.scope == "global" and args.pattern is None:
        parser.error("--method layerwise needs --scope layer (or --pattern)")
    check_output_dir(parser, "--out", args.out)
    console = Console()
    torch.manual_seed(args.seed)
    split = load_dataset(args.dataset, seed=args.seed)
    base = build_model(args.model, split, hidden=args.hidden, seed=args.seed)
    with console.status(f"training {args.model} on {args.dataset}"):
        train(base, split.X_train, split.y_train, epochs=args.epochs, seed=args.seed)
    acc_before = accuracy(base, split.X_test, split.y_test)
    # calibration data: training and held-out calibration split, gradients of small batches
    calib = batches(
        torch.cat([split.X_calib, split.X_train]), torch.cat([split.y_calib, split.y_train]), 64
    )
    results = []
    baseline = args.method != "magnitude"  # magnitude pruning to the same targets, beside it
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("pruning", total=len(args.sparsity) * args.steps)
        for target in args.sparsity:
            model = copy.deepcopy(base)
            torch.manual_seed(args.seed)

            def advance(j, k, reached, _t=target):
                progress.update(task, advance=1, description=f"s={_t:g} step {j}/{k}")

            report = prune(
                model,
                nn.CrossEntropyLoss(),
                calib,
                target,
                method=args.method,
                scope=args.scope,
                num_grads=args.num_grads,
                block_size=args.block_size,
                damp=args.damp,
                steps=args.steps,
                grad_batch_size=args.grad_batch_size,
                update=args.update,
                callback=advance,
                pattern=args.pattern,
            )
            acc_after = accuracy(model, split.X_test, split.y_test)
            entry = {"target": target, "accuracy_after": acc_after, **report.to_dict()}
            if baseline:  # same target and pattern
                entry["magnitude"] = magnitude_baseline(base, calib, target, args, split)
            results.append(entry)
    for r in results:
        kind = f"pattern {args.pattern}" if args.pattern else args.scope
        table = Table(title=f"{args.method} pruning to {r['target']:g} ({kind})")
        for col in ("layer", "shape", "params", "sparsity"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for layer in r["layers"]:
            table.add_row(
                layer["name"],
                str(tuple(layer["shape"])),
                str(layer["numel"]),
                f"{layer['sparsity']:.4f}",
            )
        table.add_row(
            "total", "", str(sum(x["numel"] for x in r["layers"])), f"{r['sparsity']:.4f}"
        )
        console.print(table)
    summary = Table(title=f"{args.model} on {args.dataset}: test accuracy")
    columns = ["target", "sparsity", "acc. before", "acc. after", "time [s]", "update"]
    for col in columns + ["acc. magnitude"] * baseline:
        summary.add_column(escape(col), justify="right")  # plain text, not rich markup
    for r in results:
        summary.add_row(
            f"{r['target']:g}",
            f"{r['sparsity']:.4f}",
            f"{acc_before:.4f}",
            f"{r['accuracy_after']:.4f}",
            f"{r['seconds']:.2f}",
            ",".join(sorted(set(r["update"]))),
            *([f"{r['magnitude']['accuracy_after']:.4f}"] if baseline else []),
        )
    console.print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "model": args.model,
        "dataset": args.dataset,
        "method": args.method,
        "accuracy_before": acc_before,
        "settings": {
            k: (str(v) if isinstance(v, pathlib.Path) else v)
            for k, v in vars(args).items()
            if not k.startswith("_")
        },
        "results": results,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    json_path = args.out / "prune_result.json"
    json_path.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {json_path}")
    png = args.out / "prune_accuracy.png"
    curves = {args.method: [(r["sparsity"], r["accuracy_after"]) for r in results]}
    if baseline:
        curves["magnitude"] = [
            (r["magnitude"]["sparsity"], r["magnitude"]["accuracy_after"]) for r in results
        ]
    plot_accuracy(
        curves,
        acc_before,
        png,
        title=f"{args.model} on {args.dataset}",
    )
    console.print(f"wrote {png}")
    return 0


def magnitude_baseline(base: nn.Module, calib, target: float, args, split) -> dict:
    """``{"sparsity", "accuracy_after"}`` of magnitude pruning a copy of ``base`` to ``target``.

    Same scope and ``--pattern`` as the main method, in one step (magnitude pruning does not
    depend on the number of steps); ``base`` is left unchanged.
    """
    model = copy.deepcopy(base)
    report = prune(
        model,
        nn.CrossEntropyLoss(),
        calib,
        target,
        method="magnitude",
        scope=args.scope,
        pattern=args.pattern,
    )
    return {
        "sparsity": report.sparsity,
        "accuracy_after": accuracy(model, split.X_test, split.y_test),
    }


def parse_pattern_arg(parser: argparse.ArgumentParser, pattern: str, sparsity) -> tuple[int, int]:
    """``(n, m)`` of ``--pattern``, or a parser error (checked against ``sparsity`` if given)."""
    try:
        return parse_nm(pattern) if sparsity is None else parse_pattern(pattern, sparsity)
    except (TypeError, ValueError) as err:
        parser.error(f"--pattern: {err}")
        raise  # unreachable: parser.error exits


def plot_accuracy(curves: dict, dense_acc: float, path: pathlib.Path, title: str = "") -> None:
    """Save an accuracy-vs-sparsity plot: ``curves`` maps a label to ``[(sparsity, acc), ...]``.

    Values may also be ``(sparsity, mean, std)`` triples (drawn with error bars).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, pts in curves.items():
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        errs = [p[2] for p in pts] if pts and len(pts[0]) > 2 else None
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
    ax.axhline(dense_acc, color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
