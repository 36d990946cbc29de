"""Scale: M-FAC pruning of an 11M-parameter GPT-2 on the CPU, time and peak memory.

Run from the repository root::

    python benchmarks/prune_scale.py
    python benchmarks/prune_scale.py --quick   # 2 layers (1.6M parameters)

A transformers GPT-2 (local config, 14 layers, ``n_embd=256``, context 128, byte vocabulary:
11.1M parameters, 11.0M of them in the blocks' ``Conv1D`` weights, all pruned) at its random
initialisation (the point is the cost, not the quality), pruned to 2:4 by
``curvopt.prune.prune(method="mfac")``: M-FAC blocks of 128, ``m = 8`` per-sequence gradients,
1 step (few, to fit the time of a shared 2-core machine), gradients stored in bfloat16
(``grad_dtype``; with ``--all`` also float32, and 50 % unstructured with one global threshold).
Memory is the peak resident set size above the
start of the run (sampled), which includes the model's own activations for the gradients. Writes
``results/prune_lm/prune_scale.json`` and prints a markdown table.
"""

from __future__ import annotations

import sys
import time

import harness
import torch

harness.add_repo_paths(".", "benchmarks")

from prune_lm import OUT, PeakRSS, lm_loss  # noqa: E402

from curvopt.prune import prune  # noqa: E402


def main(argv=None) -> int:
    import argparse

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 14")
    parser.add_argument("--all", action="store_true", help="also float32 gradients and 50 %%")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 2 threads stalled on the busy shared cores (see prune_lm.py)
    cfg = GPT2Config(
        vocab_size=256, n_positions=128, n_embd=256, n_layer=2 if args.quick else 14, n_head=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (8, 129), generator=gen)
    calib = [(tokens[i : i + 4, :-1], tokens[i : i + 4, 1:]) for i in range(0, 8, 4)]
    header = ["setting", "grad dtype", "parameters", "pruned weights", "sparsity", "time [s]",
              "peak RSS [MiB]", "update"]  # fmt: skip
    print("\n".join(harness.table_lines(header, [])), flush=True)
    results = []
    for setting, dtype in [
        ("2:4", torch.bfloat16),
        ("2:4", torch.float32),
        ("0.5", torch.bfloat16),
    ]:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).eval()
        n_params = sum(p.numel() for p in model.parameters())
        pattern = setting if ":" in setting else None
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            report = prune(model, lm_loss, calib, 0.5, method="mfac", scope="global",
                           num_grads=8, block_size=128, steps=1, grad_batch_size=1,
                           pattern=pattern, layer_types=(Conv1D,), grad_dtype=dtype)  # fmt: skip
            seconds = time.perf_counter() - t0
        d = sum(layer.numel for layer in report.layers)
        kind = ",".join(sorted(set(report.update)))
        row = [setting, str(dtype).replace("torch.", ""), n_params, d, f"{report.sparsity:.4f}",
               f"{seconds:.1f}", f"{mem.mib:.0f}", kind]  # fmt: skip
        harness.print_row(row)
        results.append(dict(zip(header, row)))
        harness.write_json(
            OUT / ("prune_scale_quick.json" if args.quick else "prune_scale.json"), results
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
