"""Pruning an FSDP2 model on P gloo processes: what curvopt's own collectives send per step.

For an MLP with ``d`` prunable weights (float32), sharded with ``fully_shard`` over P = 2
processes, one step of ``prune(method="mfac", block_size=None, update="diagonal")`` with ``m``
gradients, counted by :class:`curvopt.distributed.CommCounter` (payload bytes per rank; FSDP2's
own all-gathers and reduce-scatters of the forward/backward passes are not counted, they are
those of training). Next to it: what gathering the scores would cost (``4 d`` bytes), and the
time of the sharded prune against the single-process prune of the same model and data.

Expected: the all-reduces (Gram matrix ``8 m^2``, damping, IHVP ``8 m``, ~16 selection rounds of
255 counts, flags) do not grow with ``d``; only the mask all-gather (``d`` bytes, one per weight)
does.

Usage: ``PYTHONPATH=. python benchmarks/distributed_prune.py [--quick]`` from the repository root.
"""

from __future__ import annotations

import argparse

import torch
from harness import Stopwatch, add_repo_paths
from torch import nn

add_repo_paths("tests/distributed")
from dist_helpers import run_workers  # noqa: E402

from curvopt.distributed import CommCounter  # noqa: E402
from curvopt.prune import attach_masks, prune  # noqa: E402

BATCH = 8


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def _data(rank: int, m: int):
    gen = torch.Generator().manual_seed(rank)
    return [(torch.randn(BATCH, 64, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(m)]  # fmt: skip


def _kwargs(m: int) -> dict:
    return dict(num_grads=m, block_size=None, steps=1, update="diagonal")


def _worker(rank, world, width, m):
    from torch.distributed.fsdp import fully_shard

    for _ in range(2):  # the first run warms up (FSDP2 and autograd setup), the second counts
        model = _model(width)
        attach_masks(model)
        fully_shard(model)
        with Stopwatch() as watch, CommCounter() as counter:
            prune(model, nn.CrossEntropyLoss(), _data(rank, m), 0.5, **_kwargs(m))
    return {"seconds": watch.seconds, "calls": counter.calls, "bytes": counter.bytes}


def _single(width, m, world):
    model = _model(width)
    shards = [_data(r, m) for r in range(world)]
    data = [(torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
            for i in range(m)]  # fmt: skip
    prune(_model(width), nn.CrossEntropyLoss(), data, 0.5, **_kwargs(m))  # warm-up
    with Stopwatch() as watch:
        prune(model, nn.CrossEntropyLoss(), data, 0.5, **_kwargs(m))
    return watch.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models (about a minute)")
    args = parser.parse_args()
    widths = [64, 1024] if args.quick else [256, 4096, 16384]
    m, world = 16, 2
    torch.set_num_threads(1)
    print(f"P = {world}, m = {m}, float32; payload bytes per rank of curvopt's collectives")
    header = (
        f"{'d':>9} {'all-reduce':>11} {'AR bytes':>9} {'all-gather':>11} {'AG bytes':>9} "
        f"{'scores 4d':>10} {'t sharded':>10} {'t single':>9} {'ratio':>6}"
    )
    print(header)
    for width in widths:
        d = 64 * width + width * 10
        res = run_workers(_worker, world, width, m, timeout=600)[0]
        single = _single(width, m, world)
        calls, nbytes = res["calls"], res["bytes"]
        print(
            f"{d:>9} {calls.get('all_reduce', 0):>11} {nbytes.get('all_reduce', 0):>9} "
            f"{calls.get('all_gather', 0):>11} {nbytes.get('all_gather', 0):>9} {4 * d:>10} "
            f"{res['seconds']:>9.2f}s {single:>8.2f}s {res['seconds'] / single:>6.2f}"
        )


if __name__ == "__main__":
    main()
