"""Distributed M-FAC on P gloo processes: memory and communication per rank, step time.

For P in {1, 2, 4} processes (gloo on the CPU; the same code runs NCCL), one model of ``d``
parameters (an MLP with a d ~ 1e6 hidden layer; ``--quick``: d ~ 1e5), float32, window ``m``:

1. Memory: bytes of this rank's window ``G`` against ``m * ceil(d / P) * 4``.
2. Communication per step, counted by wrapping M-FAC's own collectives
   (:class:`curvopt.distributed.CommCounter`, payload bytes per rank), next to the formula
   (FSDP2: ``8 m + 4`` bytes: ``m`` float64 dot products and one flag; ZeRO-1: that plus the
   all-gather of ``ceil(d / P)`` parameters) and next to the gradient all-reduce DDP already does
   (``4 d`` bytes).
3. Time of one training iteration (forward, backward, optimizer step; medians) of M-FAC
   replicated (DDP, every rank keeps the whole window), ZeRO-1 (DDP + ``process_group``),
   FSDP2, and DDP + Adam, with ratios to the replicated run.

Every configuration runs in the same spawned processes, interleaved step by step. The machine
is a shared 2-core CPU: with P = 4 the processes are oversubscribed and times are indicative only.

Usage: ``python benchmarks/distributed.py [--quick]``.
"""

from __future__ import annotations

import argparse

import torch
from harness import add_repo_paths, clock, median, print_table
from torch import nn

add_repo_paths("tests/distributed")
from dist_helpers import run_workers  # noqa: E402

from curvopt import distributed as D  # noqa: E402
from curvopt.optim import MFAC  # noqa: E402

BATCH = 32


def _model(width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))


def _worker(rank, world, width, m, steps):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    group = torch.distributed.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    X = torch.randn(BATCH, width, generator=gen)
    Y = torch.randn(BATCH, 8, generator=gen)
    runs = {}
    model = _model(width)
    runs["replicated"] = (DDP(model), MFAC(model.parameters(), lr=1e-3, m=m, damp=1e-2))
    model = _model(width)
    runs["zero1"] = (
        DDP(model),
        MFAC(model.parameters(), lr=1e-3, m=m, damp=1e-2, process_group=group),
    )
    model = _model(width)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    runs["fsdp2"] = (model, MFAC(model.parameters(), lr=1e-3, m=m, damp=1e-2))
    model = _model(width)
    runs["adam"] = (DDP(model), torch.optim.Adam(model.parameters(), lr=1e-3))
    times = {k: [] for k in runs}
    step_times = {k: [] for k in runs}
    comm = {}
    warmup = m + 1  # a full window: every step then all-reduces m dot products
    for step in range(warmup + steps):
        for name, (net, opt) in runs.items():
            t0 = clock()
            opt.zero_grad()
            nn.functional.mse_loss(net(X), Y).backward()
            t1 = clock()
            with D.CommCounter() as c:
                opt.step()
            t2 = clock()
            if step >= warmup:
                times[name].append(t2 - t0)
                step_times[name].append(t2 - t1)
            comm[name] = c
    d = sum(p.numel() for p in _model(width).parameters())
    out = {"d": d, "time": {k: median(v) for k, v in times.items()}}
    out["step_time"] = {k: median(v) for k, v in step_times.items()}
    out["bytes"] = {k: c.total_bytes for k, c in comm.items()}
    out["calls"] = {k: c.total_calls for k, c in comm.items()}
    out["window"] = {
        k: opt.window.G.numel() * opt.window.G.element_size()
        for k, (_, opt) in runs.items()
        if k != "adam"
    }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d ~ 1e5, m = 16, 5 timed steps")
    args = ap.parse_args()
    width, m, steps = (316, 16, 5) if args.quick else (1000, 32, 10)
    worlds = (1, 2, 4)
    results = {P: run_workers(_worker, P, width, m, steps, timeout=600) for P in worlds}
    d = results[1][0]["d"]
    print(f"d = {d}, m = {m}, float32 parameters and window, batch {BATCH} per rank\n")

    rows = []
    for P in worlds:
        bound = m * -(-d // P) * 4
        for mode in ("replicated", "zero1", "fsdp2"):
            got = max(r["window"][mode] for r in results[P])
            rows.append([P, mode, got, bound, f"{got / bound:.4f}"])
    print_table(["P", "mode", "window bytes / rank (max)", "m*ceil(d/P)*4", "ratio"], rows)

    rows = []
    for P in worlds:
        for mode in ("zero1", "fsdp2"):
            got = max(r["bytes"][mode] for r in results[P])
            calls = results[P][0]["calls"][mode]
            # one rank communicates nothing; else the flag, G g, and (ZeRO-1) the all-gather
            formula = 0 if P == 1 else 8 * m + 4 + (4 * -(-d // P) if mode == "zero1" else 0)
            rows.append([P, mode, calls, got, formula, 4 * d])
    print()
    print_table(
        [
            "P",
            "mode",
            "collectives / step",
            "bytes / step / rank (max)",
            "formula",
            "DDP gradient all-reduce (4d)",
        ],
        rows,
    )

    for key, what in (("time", "training iteration"), ("step_time", "optimizer step alone")):
        print(f"\n{what}, ms (median over steps, slowest rank)\n")
        rows = []
        for P in worlds:
            t = {k: max(r[key][k] for r in results[P]) * 1e3 for k in results[P][0][key]}
            rep = t["replicated"]
            rows.append(
                [P, f"{rep:.1f}"]
                + [f"{t[k]:.1f} ({t[k] / rep:.2f})" for k in ("zero1", "fsdp2", "adam")]
            )
        print_table(
            ["P", "MFAC replicated", "ZeRO-1 (x repl.)", "FSDP2 (x repl.)", "DDP+Adam (x repl.)"],
            rows,
        )


if __name__ == "__main__":
    main()
