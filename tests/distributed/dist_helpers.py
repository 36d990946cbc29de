"""Run a function on P spawned processes joined by a gloo process group (CPU), from pytest.

:func:`run_workers` spawns ``world`` processes; each initializes ``torch.distributed`` with gloo
and ``init_method="file://..."`` (no ports), a timeout on the process group (so a collective that
a bug leaves unmatched fails instead of hanging), runs ``fn(rank, world, *args)`` on one thread
and saves its return value with ``torch.save``. The parent joins every process with a deadline,
kills the ones still running when it expires or shortly after another rank failed, and raises
with the workers' tracebacks. ``fn`` must be a module-level function (it is pickled by name).

Spawning costs about 2 s per process (importing torch): put many checks in one ``fn``.
"""

from __future__ import annotations

import datetime
import gc
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Seconds a collective may wait for its peers before gloo raises.
PG_TIMEOUT_S = 30.0
# Seconds the ranks still running get after another rank failed.
GRACE_S = 5.0


def _worker(
    fn: Callable[..., Any], rank: int, world: int, init_file: str, out_dir: str, args: tuple
) -> None:
    """One rank: run ``fn``, then tear the process groups down while the interpreter is alive.

    The checks build DDP and FSDP2 modules, device meshes and DTensors, which hold their process
    groups in reference cycles: ``destroy_process_group()`` unregisters the groups but the
    objects live on until a garbage collection, and without one they are destructed during
    interpreter finalization. There gloo's worker threads can no longer take the GIL to release
    the tensors of their last work items, and the process aborts with "terminate called without
    an active exception" (exit code -6) after its result was written, sometimes (it depends on
    the order of finalization). So: collect the garbage, let every rank finish its collectives
    (a barrier), destroy the groups, collect again, and only then exit.
    """
    torch.set_num_threads(1)
    failed = False
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        try:
            result = fn(rank, world, *args)
            gc.collect()  # the modules, meshes and DTensors of fn, with their groups
            dist.barrier()  # no rank tears its connections down while a peer still uses them
        finally:
            gc.collect()
            dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"result_{rank}.pt"))
    except BaseException:  # noqa: BLE001 - every failure goes back to pytest
        with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        failed = True
    # outside the except block: the traceback (and the frames' objects) is released by now
    gc.collect()
    if failed:
        raise SystemExit(1)


def run_workers(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 90.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return their results by rank.

    Raises:
        RuntimeError: With every failing rank's traceback, or naming the ranks that timed out.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="curvopt-dist-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world, init_file, tmp, args), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
                break
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        errors = []
        for r in range(world):
            path = os.path.join(tmp, f"error_{r}.txt")
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(f"--- rank {r} ---\n{f.read()}")
        if errors or hung:
            what = f"ranks {hung} did not finish within {timeout} s (killed)\n" if hung else ""
            raise RuntimeError(
                f"distributed workers failed (world={world}):\n{what}" + "".join(errors)
            )
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"result_{r}.pt")
            if p.exitcode != 0 or not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {p.exitcode} and no result")
            results.append(torch.load(path, weights_only=False))
        return results
