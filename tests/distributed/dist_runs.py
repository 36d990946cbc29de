"""One spawn per world size for all the M-FAC checks (spawning costs ~2 s per process).

The check functions live beside the tests that assert on their results;
:func:`results` runs all of them on ``world`` ranks once per pytest process and caches the
outcome, so the tests of several files share one spawn per world size. The checkpoint test
rides along: the run on 2 ranks saves a checkpoint into a temporary folder, the run on 3 ranks
(which first makes sure the 2-rank run happened) loads it and continues.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

from dist_helpers import run_workers

SAVE_WORLD, LOAD_WORLD = 2, 3


def _all_checks(rank: int, world: int, ckpt_dir: str) -> dict:
    from test_dist_harness import _collectives
    from test_dist_mfac_checkpoint import _load_and_continue, _save
    from test_dist_mfac_optimizer import _optimizer_checks
    from test_dist_mfac_sharded import _static_checks, _window_checks
    from test_dist_misuse import _misuse_checks

    out = {
        "collectives": _collectives(rank, world),
        "window": _window_checks(rank, world),
        "static": _static_checks(rank, world),
        "optimizer": _optimizer_checks(rank, world),
        "misuse": _misuse_checks(rank, world),
    }
    if world == SAVE_WORLD:
        out["checkpoint_saved"] = _save(rank, world, ckpt_dir)
    if world == LOAD_WORLD:
        out["checkpoint"] = _load_and_continue(rank, world, ckpt_dir)
    return out


@functools.cache
def _checkpoint_dir() -> str:
    path = tempfile.mkdtemp(prefix="curvopt-dcp-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def _run(world: int) -> tuple[list[dict] | None, BaseException | None]:
    if world == LOAD_WORLD:
        _run(SAVE_WORLD)  # the checkpoint to load
    try:
        return run_workers(_all_checks, world, _checkpoint_dir(), timeout=240), None
    except RuntimeError as err:  # cached too: a failing spawn is not repeated per test
        return None, err


def results(world: int) -> list[dict]:
    """Every rank's results of all checks on ``world`` gloo processes."""
    out, err = _run(world)
    if err is not None:
        raise err
    return out
