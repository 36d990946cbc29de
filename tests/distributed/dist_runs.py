"""One spawn per world size for all the M-FAC checks (spawning costs ~2 s per process).

The check functions live beside the tests that assert on their results;
:func:`results` runs all of them on ``world`` ranks once per pytest process and caches the
outcome, so the tests of several files share one spawn per world size.
"""

from __future__ import annotations

import functools

from dist_helpers import run_workers


def _all_checks(rank: int, world: int) -> dict:
    from test_dist_harness import _collectives
    from test_dist_mfac_optimizer import _optimizer_checks
    from test_dist_mfac_sharded import _static_checks, _window_checks

    return {
        "collectives": _collectives(rank, world),
        "window": _window_checks(rank, world),
        "static": _static_checks(rank, world),
        "optimizer": _optimizer_checks(rank, world),
    }


@functools.cache
def _run(world: int) -> tuple[list[dict] | None, BaseException | None]:
    try:
        return run_workers(_all_checks, world, timeout=180), None
    except RuntimeError as err:  # cached too: a failing spawn is not repeated per test
        return None, err


def results(world: int) -> list[dict]:
    """Every rank's results of all checks on ``world`` gloo processes."""
    out, err = _run(world)
    if err is not None:
        raise err
    return out
