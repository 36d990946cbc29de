"""Coordinate-sharded SlidingWindowMFAC and StaticMFAC on 1-3 gloo processes vs one process."""

import pytest
import torch
from dist_runs import results

from curvopt import distributed as D
from curvopt.mfac import SlidingWindowMFAC, StaticMFAC

M, DIM, K = 4, 23, 3  # 23 coordinates: uneven shards on 2 and 3 ranks


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _window_checks(rank, world):
    group = torch.distributed.group.WORLD
    lo, hi = D.shard_range(DIM, rank, world)
    gen = torch.Generator().manual_seed(1234)  # the same data on every rank
    kw = dict(dtype=torch.float64, refresh_every=3)
    full = SlidingWindowMFAC(DIM, M, 1e-2, **kw)
    part = SlidingWindowMFAC(hi - lo, M, 1e-2, process_group=group, **kw)
    err = {}

    def track(name, a, b):
        err[name] = max(err.get(name, 0.0), _rel(a, b[lo:hi]))

    for step in range(2 * M + 3):  # wraps the ring and crosses refreshes
        g = torch.randn(DIM, generator=gen, dtype=torch.float64)
        X = torch.randn(DIM, K, generator=gen, dtype=torch.float64)
        if step % 2:
            track("add_and_ihvp(g)", part.add_and_ihvp(g[lo:hi]), full.add_and_ihvp(g))
        else:
            track(
                "add_and_ihvp(g, X)", part.add_and_ihvp(g[lo:hi], X[lo:hi]), full.add_and_ihvp(g, X)
            )
        track("ihvp", part.ihvp(X[lo:hi]), full.ihvp(X))
    X = torch.randn(DIM, K, generator=gen, dtype=torch.float64)
    track("ihvp(damp)", part.ihvp(X[lo:hi], damp=0.5), full.ihvp(X, damp=0.5))
    track("mul", part.mul(X[lo:hi]), full.mul(X))
    track("inverse_diagonal", part.inverse_diagonal(), full.inverse_diagonal())
    err["K"] = _rel(part.K, full.K)
    # a NaN on the last rank only: every rank raises ("raise") or skips ("skip") together
    g = torch.randn(DIM, generator=gen, dtype=torch.float64)
    bad = g[lo:hi].clone()
    if rank == world - 1:
        bad[-1] = float("nan")
    K_before = part.K.clone()
    raised = False
    try:
        part.add(bad)
    except ValueError:
        raised = True
    unchanged = torch.equal(part.K, K_before)
    part.add(bad, on_nonfinite="skip")
    return {
        "err": err,
        "K": part.K,
        "Ainv": part.Ainv,
        "raised": raised,
        "unchanged": unchanged,
        "last_finite": bool(part.last_finite),
        "memory": part.memory_bytes(),
        "dim": hi - lo,
    }


def _static_checks(rank, world):
    group = torch.distributed.group.WORLD
    lo, hi = D.shard_range(DIM, rank, world)
    gen = torch.Generator().manual_seed(99)
    G = torch.randn(M, DIM, generator=gen, dtype=torch.float64)
    X = torch.randn(DIM, K, generator=gen, dtype=torch.float64)
    full = StaticMFAC(G, 1e-2)
    part = StaticMFAC(G[:, lo:hi].contiguous(), 1e-2, process_group=group)
    err = {
        "ihvp": _rel(part.ihvp(X[lo:hi]), full.ihvp(X)[lo:hi]),
        "ihvp(damp)": _rel(part.ihvp(X[lo:hi], damp=0.3), full.ihvp(X, damp=0.3)[lo:hi]),
        "mul": _rel(part.mul(X[lo:hi]), full.mul(X)[lo:hi]),
        "inverse_diagonal": _rel(part.inverse_diagonal(), full.inverse_diagonal()[lo:hi]),
    }
    local = torch.arange(hi - lo)[rank % 2 :: 2]  # uneven counts per rank, some may be empty
    err["inverse_entries"] = _rel(part.inverse_entries(local), full.inverse_entries(local + lo))
    rows = part.inverse_rows(local)
    glob = torch.cat(
        [torch.arange(*D.shard_range(DIM, r, world))[r % 2 :: 2] for r in range(world)]
    )
    err["inverse_rows"] = _rel(rows, full.inverse_rows(glob)[:, lo:hi])
    return {"err": err}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_window_and_static_match_one_process(world):
    out = results(world)
    for res in out:
        for kind in ("window", "static"):
            for name, e in res[kind]["err"].items():
                assert e <= 1e-12, (kind, name, e)
        w = res["window"]
        assert w["raised"] and w["unchanged"], "a NaN on one rank must raise everywhere"
        assert not w["last_finite"]
        # G, K, A^{-1} and the m I of the fresh factors (a window of M <= 96 rows), and the
        # CPU step's LAPACK workspace: m I, A, the right-hand side and the coefficients
        assert w["memory"] == M * w["dim"] * 8 + 3 * M * M * 8 + (2 * M * M + 2 * M) * 8
    # the m x m algebra is replicated bit for bit
    for res in out[1:]:
        assert torch.equal(res["window"]["K"], out[0]["window"]["K"])
        assert torch.equal(res["window"]["Ainv"], out[0]["window"]["Ainv"])
    assert sum(r["window"]["dim"] for r in out) == DIM


def test_static_rejects_a_group_without_initialized_distributed():
    with pytest.raises(ValueError, match="not initialized"):
        StaticMFAC(torch.randn(2, 5), 1e-2, process_group=object())
