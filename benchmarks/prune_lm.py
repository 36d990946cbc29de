"""Pruning a character-level GPT-2: magnitude, Wanda, SparseGPT, M-FAC global and layer-wise OBS.

Run from the repository root (CPU, a few minutes with the defaults)::

    python benchmarks/prune_lm.py --train-steps 2000 --finetune 200  # the docs' run (~10 min)
    python benchmarks/prune_lm.py                 # 300 training steps, 20 fine-tune steps
    python benchmarks/prune_lm.py --quick         # 50 % only, 20 fine-tune steps

The dense model is trained once and cached (``results/prune_lm/dense_<steps>.pt``).

* **Text**: the Python standard library's own source files (a fixed list, read as bytes, so the
  vocabulary is the 256 byte values); the training files and the validation files are disjoint.
* **Model**: a transformers GPT-2 built from a local config (no download), ``n_embd=128``,
  3 layers, 4 heads, context 64, ``attn_implementation="eager"``: 0.64M parameters, of which
  the 12 ``Conv1D`` weights of the blocks (590k) are pruned; embeddings and the tied head are not.
* **Calibration**: the same 64 training sequences of 64 bytes (4096 tokens) for every method:
  SparseGPT, Wanda and layer-wise OBS use all their tokens as layer inputs; M-FAC uses one
  gradient per sequence (``num_grads=64``).
* **Metric**: validation bits per character (mean cross entropy / ln 2) on 64 fixed validation
  windows, right after pruning and after a short fine-tune with the masks kept (AdamW).
* **Methods**: magnitude (per layer), Wanda and SparseGPT (``benchmarks/baselines/``, from the
  papers, applied layer by layer in module order on the inputs of the model pruned so far),
  M-FAC (``curvopt.prune.prune``, global scope, blocks of 128, 4 steps) and layer-wise OBS
  (``method="layerwise"``, 4 steps); at 50 % and 70 % unstructured and 2:4.

Writes ``results/prune_lm/prune_lm.json`` and the plot ``docs/img/prune_lm.png`` (under
``results/prune_lm/`` with ``--quick``) and prints a markdown table.
Time is wall time on this machine; memory is the peak resident set size above the start of each
pruning run (sampled every 5 ms), which includes the allocator's caching.
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import statistics
import sys
import sysconfig
import time

import harness
import torch
from torch import nn

harness.add_repo_paths(".", "benchmarks")

from baselines.peak_rss import PeakRSS  # noqa: E402
from baselines.sparsegpt_wanda import prune_sequentially  # noqa: E402

from curvopt.prune import prunable_weights, prune  # noqa: E402

TRAIN_FILES = [
    "argparse.py", "textwrap.py", "string/__init__.py", "shlex.py", "fractions.py", "heapq.py",
    "bisect.py", "calendar.py", "difflib.py", "statistics.py", "functools.py", "dataclasses.py",
    "configparser.py", "enum.py", "inspect.py", "pathlib/__init__.py", "random.py", "typing.py",
]  # fmt: skip
VAL_FILES = ["pprint.py", "glob.py", "fnmatch.py", "copy.py"]
CTX = 64
OUT = harness.ROOT / "results" / "prune_lm"
METHODS = ["magnitude", "wanda", "sparsegpt", "mfac", "layerwise"]
LLMC_METHODS = ["llmc-sparsegpt", "llmc-wanda"]


def read_files(names: list[str]) -> torch.Tensor:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in names:
        path = root / name
        if not path.exists():  # the module moved between Python versions (pkg vs file)
            path = root / name.replace("/__init__.py", ".py")
        parts.append(path.read_bytes())
    return torch.tensor(list(b"\n".join(parts)), dtype=torch.long)


def windows(text: torch.Tensor, n: int, gen: torch.Generator | None) -> tuple:
    """``n`` windows: random (``gen``) or evenly spaced; inputs and next-byte targets."""
    top = len(text) - CTX - 1
    if gen is None:
        starts = torch.linspace(0, top, n).long()
    else:
        starts = torch.randint(0, top, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(CTX + 1)[None, :]
    chunk = text[idx]
    return chunk[:, :-1], chunk[:, 1:]


def build_model(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=256, n_positions=CTX, n_embd=128, n_layer=3, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def lm_loss(out, y: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def bpc(model: nn.Module, val: tuple) -> float:
    model.eval()
    with torch.no_grad():
        X, Y = val
        losses = [float(lm_loss(model(X[i : i + 16]), Y[i : i + 16])) for i in range(0, len(X), 16)]
    return sum(losses) / len(losses) / math.log(2)


def train(
    model: nn.Module, text: torch.Tensor, steps: int, lr: float, seed: int, batch: int = 16
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        X, Y = windows(text, batch, gen)
        opt.zero_grad()
        lm_loss(model(X), Y).backward()
        opt.step()
    model.eval()


def dense_model(train_text, steps: int) -> nn.Module:
    model = build_model()
    path = OUT / f"dense_{steps}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        t0 = time.perf_counter()
        train(model, train_text, steps, 3e-3, seed=0)
        OUT.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        print(f"trained the dense model in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    model.eval()
    return model


def run_method(
    model, method: str, sparsity: float, pattern: str | None, calib, llmc_python: str | None = None
) -> dict:
    from transformers.pytorch_utils import Conv1D

    types = (Conv1D,)
    nm = tuple(int(x) for x in pattern.split(":")) if pattern else None
    if method in LLMC_METHODS:  # llmcompressor's own implementation, in its own venv
        from baselines.llmcompressor_client import prune_with_llmcompressor

        info = prune_with_llmcompressor(
            llmc_python, model, calib, method.removeprefix("llmc-"), sparsity, pattern
        )
        from curvopt.prune import set_mask

        with torch.no_grad():  # keep llmcompressor's zeros through the fine-tune
            for t in prunable_weights(model, types):
                w = getattr(t.module, t.attr).detach()
                set_mask(t, (w != 0).to(w.dtype))
        ws = [getattr(t.module, "weight").detach() for t in prunable_weights(model, types)]  # noqa: B009
        zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        return {**info, "sparsity": zeros}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if method == "magnitude":
            prune(model, None, None, sparsity, method="magnitude", scope="layer", steps=1,
                  pattern=pattern, layer_types=types)  # fmt: skip
        elif method in ("wanda", "sparsegpt"):
            prune_sequentially(model, prunable_weights(model, types), calib, method, sparsity, nm)
        elif method == "mfac":
            prune(model, lm_loss, calib, sparsity, method="mfac", scope="global", num_grads=64,
                  block_size=128, steps=4, grad_batch_size=1, pattern=pattern,
                  layer_types=types)  # fmt: skip
        elif method == "layerwise":
            prune(model, lm_loss, calib, sparsity, method="layerwise", scope="layer", steps=4,
                  pattern=pattern, layer_types=types)  # fmt: skip
        seconds = time.perf_counter() - t0
    ws = [getattr(t.module, "weight").detach() for t in prunable_weights(model, types)]  # noqa: B009
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    return {"seconds": seconds, "peak_mib": mem.mib, "sparsity": zeros}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--finetune", type=int, default=20, help="fine-tune steps after pruning")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + LLMC_METHODS)
    parser.add_argument("--settings", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[123],
        help="calibration-sample seeds (the trained model and the fine-tune batches stay fixed)",
    )  # fmt: skip
    parser.add_argument(
        "--llmcompressor-python", default=None, metavar="PYTHON",
        help="python of a venv with llmcompressor: adds the llmc-sparsegpt and llmc-wanda methods "
        "(run through benchmarks/baselines/llmcompressor_run.py); without it they are skipped",
    )  # fmt: skip
    parser.add_argument("--json", default="prune_lm.json", help="file name under results/prune_lm")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--summarize", nargs="+", metavar="JSON", default=None,
        help="only merge these result files (names under results/prune_lm): print the mean ± sd "
        "table and draw docs/img/prune_lm.png",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="300 training steps, 50 %% only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see the docs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_steps, args.finetune, args.settings = 300, 20, ["0.5"]
    if args.summarize:
        import json

        runs = [json.loads((OUT / name).read_text()) for name in args.summarize]
        results = [r for run in runs for r in run["results"]]
        finetune = min(run["settings"]["finetune"] for run in runs)
        print_summary(results, finetune)
        plot(
            results, runs[0]["dense_bpc"], finetune, harness.ROOT / "docs" / "img" / "prune_lm.png"
        )
        return 0
    if args.llmcompressor_python is None and any(m in LLMC_METHODS for m in args.methods):
        print("no --llmcompressor-python: skipping " + ", ".join(LLMC_METHODS), flush=True)
        args.methods = [m for m in args.methods if m not in LLMC_METHODS]
    torch.set_num_threads(args.threads)  # 2 threads on 2 busy shared cores stalled for minutes
    train_text, val_text = read_files(TRAIN_FILES), read_files(VAL_FILES)
    val = windows(val_text, 64, None)
    base = dense_model(train_text, args.train_steps)
    dense_bpc = bpc(base, val)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"dense: {n_params} parameters, validation {dense_bpc:.4f} bits/char", flush=True)
    dense_ft = copy.deepcopy(base)  # the dense model fine-tuned the same way: the fair reference
    train(dense_ft, train_text, args.finetune, 1e-3, seed=1)
    dense_ft_bpc = bpc(dense_ft, val)
    results = []
    header = ["setting", "seed", "method", "bpc one-shot", f"bpc +{args.finetune} steps",
              "time [s]", "peak RSS [MiB]"]  # fmt: skip
    print("\n".join(harness.table_lines(header, [])), flush=True)
    for setting in args.settings:
        pattern = setting if ":" in setting else None
        sparsity = (
            1 - int(setting.split(":")[0]) / int(setting.split(":")[1])
            if pattern
            else float(setting)
        )
        for seed in args.seeds:
            Xc, Yc = windows(train_text, 64, torch.Generator().manual_seed(seed))
            calib = [(Xc[i : i + 8], Yc[i : i + 8]) for i in range(0, 64, 8)]
            for method in args.methods:
                model = copy.deepcopy(base)
                torch.manual_seed(0)
                info = run_method(
                    model, method, sparsity, pattern, calib, args.llmcompressor_python
                )
                one_shot = bpc(model, val)
                train(model, train_text, args.finetune, 1e-3, seed=1)
                tuned = bpc(model, val)
                results.append({"setting": setting, "seed": seed, "method": method,
                                "bpc": one_shot, "bpc_finetuned": tuned, **info})  # fmt: skip
                secs, mib = f"{info['seconds']:.1f}", f"{info['peak_mib']:.0f}"
                harness.print_row(
                    [setting, seed, method, f"{one_shot:.4f}", f"{tuned:.4f}", secs, mib]
                )
                harness.write_json(OUT / args.json, {
                    "dense_bpc": dense_bpc, "dense_finetuned_bpc": dense_ft_bpc,
                    "parameters": n_params, "settings": vars(args), "results": results,
                })  # fmt: skip
    print(f"dense {dense_bpc:.4f} bpc; dense fine-tuned the same way {dense_ft_bpc:.4f} bpc")
    print_summary(results, args.finetune)
    if not args.no_plot:
        folder = OUT if args.quick else harness.ROOT / "docs" / "img"
        plot(results, dense_bpc, args.finetune, folder / "prune_lm.png")
    return 0


def summarize(results: list[dict]) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """Mean, sample standard deviation and count over the seeds, per (setting, method) and key."""
    out: dict = {}
    for r in results:
        out.setdefault((r["setting"], r["method"]), []).append(r)
    summary = {}
    for key, rows in out.items():
        summary[key] = {}
        for field in ("bpc", "bpc_finetuned", "seconds", "peak_mib"):
            xs = [r[field] for r in rows]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            summary[key][field] = (statistics.fmean(xs), sd, len(xs))
    return summary


def print_summary(results: list[dict], finetune: int) -> None:
    """Markdown table of mean +- sd over the calibration seeds."""
    rows = []
    for (setting, method), s in summarize(results).items():
        rows.append([setting, method, s["bpc"][2]] + [
            f"{s[k][0]:.4f} ± {s[k][1]:.4f}" for k in ("bpc", "bpc_finetuned")
        ] + [f"{s['seconds'][0]:.1f}", f"{s['peak_mib'][0]:.0f}"])  # fmt: skip
    header = ["setting", "method", "seeds", "bpc one-shot", f"bpc +{finetune} steps",
              "time [s]", "peak RSS [MiB]"]  # fmt: skip
    print("\n".join(harness.table_lines(header, rows)), flush=True)


def plot(results: list[dict], dense_bpc: float, finetune: int, path: pathlib.Path) -> None:
    plt = harness.pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    panels = [("bpc", "one-shot")] + ([("bpc_finetuned", f"+{finetune} steps")] if finetune else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 3.8), squeeze=False)
    axes = axes[0]
    width = 0.8 / len(methods)
    summary = summarize(results)
    nan = (float("nan"), 0.0, 0)
    for ax, (key, title) in zip(axes, panels):
        for j, method in enumerate(methods):
            stats = [summary.get((s, method), {}).get(key, nan) for s in settings]
            ax.bar([i + j * width for i in range(len(settings))], [m for m, _, _ in stats], width,
                   yerr=[sd for _, sd, _ in stats], capsize=2, label=method)  # fmt: skip
        ax.axhline(dense_bpc, color="gray", ls="--", lw=1, label="dense")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))], settings)
        ax.set_title(f"validation bits/char, {title}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(bottom=max(0.0, dense_bpc - 0.5))
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    harness.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
