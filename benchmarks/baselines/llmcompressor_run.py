"""BASELINE, not part of curvopt: llmcompressor's own SparseGPT and Wanda on the LM study's model.

Runs in a separate virtual environment with llmcompressor (it pins its own transformers), e.g.::

    python -m venv /tmp/venv-llmc
    /tmp/venv-llmc/bin/pip install torch==2.13.0 && /tmp/venv-llmc/bin/pip install llmcompressor
    /tmp/venv-llmc/bin/python benchmarks/baselines/llmcompressor_run.py --model DIR \
        --calib calib.pt --method sparsegpt --sparsity 0.5 --pattern 2:4 --out out.pt

``benchmarks/prune_lm.py --llmcompressor-python /tmp/venv-llmc/bin/python`` calls it through
:mod:`baselines.llmcompressor_client`. Offline: the model is a ``save_pretrained`` folder, the
calibration tokens an in-memory ``datasets.Dataset`` (the same 64 x 64 tokens as every other
method, one batch of 8 sequences per step as in prune_lm.py), and the "tokenizer" llmcompressor
insists on is a 256-entry byte vocabulary built locally (the data are already token ids; it is
never used to tokenize).

**Conv1D.** The GPT-2 blocks use transformers' ``Conv1D`` (weight ``(in, out)``). llmcompressor
0.14 hooks only ``Linear``/``Conv1d``/``Conv2d``/``Conv3d`` by class name
(``sgpt_base.PRUNABLE_LAYER_TYPES``), so on the model as it is ``oneshot`` finishes without an
error and prunes nothing (checked by ``--as-is``); and its Hessian buffer is sized by
``weight.shape[1]``, which for a ``Conv1D`` is ``out``, not ``in``. So each ``Conv1D`` is replaced
by the equivalent ``nn.Linear`` (weight ``W^T``, same bias; the model computes the same function)
before ``oneshot`` and turned back after; the pruning itself is llmcompressor's code, unchanged.

Writes ``--out``: ``{"state_dict": ..., "seconds": oneshot's wall time, "peak_mib": peak RSS above
the start of oneshot, "samples": sequences llmcompressor saw, "version": llmcompressor's}``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from torch import nn


def byte_tokenizer():
    """A local 256-token vocabulary (llmcompressor needs a processor; the data are ids already)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", pad_token="<0>")


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` by the equivalent ``nn.Linear``; their names."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        lin = nn.Linear(n_in, n_out, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
            lin.bias.copy_(conv.bias)
        setattr(model.get_submodule(parent), attr, lin)
    return names


def linear_to_conv1d(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`conv1d_to_linear` (weights transposed back, values kept)."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        parent, _, attr = name.rpartition(".")
        lin = model.get_submodule(name)
        conv = Conv1D(lin.out_features, lin.in_features).to(lin.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.T)
            conv.bias.copy_(lin.bias)
        setattr(model.get_submodule(parent), attr, conv)


def check_layer(seed: int = 0) -> list[str]:
    """llmcompressor's per-layer SparseGPT/Wanda against ours (sparsegpt_wanda.py) on one layer.

    A random ``64 x 256`` weight and ``4096`` correlated inputs; the same Hessian for both. Rows:
    fraction of the pruned entries that agree, and ``|W_llmc - W_ours| / |W|`` (Frobenius).
    """
    import transformers  # noqa: F401  (llmcompressor's sparsify code matches on transformers)
    from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify
    from llmcompressor.modifiers.pruning.wanda import wanda_sparsify

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from sparsegpt_wanda import sparsegpt_prune, wanda_prune

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, 256, generator=g) @ torch.randn(256, 256, generator=g) / 16
    lines = []
    for method in ("sparsegpt", "wanda"):
        for nm in (None, (2, 4)):
            lin = nn.Linear(256, 64, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(64, 256, generator=g))
            W = lin.weight.detach().clone()
            if method == "sparsegpt":
                H, n = sgpt_sparsify.accumulate_hessian(
                    X[None], lin, sgpt_sparsify.make_empty_hessian(lin), 0
                )
                _, theirs = sgpt_sparsify.sparsify_weight(
                    lin, {lin: H}, 0.5, nm[0] if nm else 0, nm[1] if nm else 0, 128, 0.01, False
                )
                ours = sparsegpt_prune(W, X, 0.5, nm).float()
            else:
                S, n = wanda_sparsify.accumulate_row_scalars(
                    X[None], lin, wanda_sparsify.make_empty_row_scalars(lin), 0
                )
                theirs = wanda_sparsify.sparsify_weight(
                    lin, {lin: S}, 0.5, nm[0] if nm else 0, nm[1] if nm else 0
                )
                ours = wanda_prune(W, X, 0.5, nm)
            theirs = theirs.detach()
            same = float(((theirs == 0) == (ours == 0)).float().mean())
            rel = float((theirs - ours).norm() / W.norm())
            zeros = (float((theirs == 0).float().mean()), float((ours == 0).float().mean()))
            lines.append(
                f"| {method} | {'2:4' if nm else '50 %'} | {same:.4f} | {rel:.2e} | "
                f"{zeros[0]:.4f} / {zeros[1]:.4f} |"
            )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="one-layer comparison, then exit")
    parser.add_argument("--model", help="save_pretrained folder (GPT-2)")
    parser.add_argument("--calib", help="torch file: int64 tensor (N, T) of ids")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"])
    parser.add_argument("--sparsity", type=float)
    parser.add_argument("--pattern", default=None, help='"n:m", e.g. 2:4 (default unstructured)')
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--as-is", action="store_true", help="keep Conv1D (prunes nothing)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check:
        print("| method | setting | same mask | rel. weight diff | zeros llmc / ours |")
        print("|---|---|---|---|---|")
        print("\n".join(check_layer()))
        return 0
    if None in (args.model, args.calib, args.method, args.sparsity, args.out):
        parser.error("--model, --calib, --method, --sparsity and --out are required")

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from peak_rss import PeakRSS

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager")
    model.eval()
    names = [] if args.as_is else conv1d_to_linear(model)
    ids = torch.load(args.calib)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    modifier = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[args.method]
    recipe = modifier(
        sparsity=args.sparsity,
        mask_structure=args.pattern or "0:0",
        targets=["GPT2Block"],
        ignore=["re:.*lm_head"],
    )
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        oneshot(
            model=model, tokenizer=byte_tokenizer(), dataset=data, recipe=recipe,
            num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, batch_size=args.batch_size,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    linear_to_conv1d(model, names)
    torch.save(
        {
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "seconds": seconds,
            "peak_mib": mem.mib,
            "samples": len(ids),
            "version": llmcompressor.__version__,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
