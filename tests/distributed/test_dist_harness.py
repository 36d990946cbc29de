"""The harness and the collectives of curvopt.distributed, on 1-3 gloo processes."""

import pytest
import torch
from dist_helpers import run_workers
from dist_runs import results

from curvopt import distributed as D


def _collectives(rank, world):
    g = torch.distributed.group.WORLD
    D.check_process_group(g)
    assert D.world_size(g) == world and D.rank(g) == rank
    t = torch.full((3,), float(rank + 1), dtype=torch.float64)
    with D.CommCounter() as c:
        D.all_reduce_sum_(t, g)
        flag = D.all_reduce_any(torch.tensor(rank == world - 1 and world > 1), g)
        sizes = [b - a for a, b in (D.shard_range(7, r, world) for r in range(world))]
        full = D.all_gather_flat(torch.arange(*D.shard_range(7, rank, world)).double(), sizes, g)
    return {"sum": t, "any": bool(flag), "gathered": full, "calls": dict(c.calls)}


def _fails_on_rank_one(rank, world):
    if rank == 1:
        raise ArithmeticError("rank one fails on purpose")
    torch.distributed.barrier()  # would hang without the group timeout / the harness's kill


@pytest.mark.parametrize("world", [1, 2, 3])
def test_collectives_sum_any_gather(world):
    for res in (r["collectives"] for r in results(world)):
        assert torch.equal(
            res["sum"], torch.full((3,), world * (world + 1) / 2, dtype=torch.float64)
        )
        assert res["any"] == (world > 1)
        assert torch.equal(res["gathered"], torch.arange(7).double())
        assert res["calls"] == ({"all_reduce": 2, "all_gather": 1} if world > 1 else {})


def test_worker_error_reaches_pytest_without_hanging():
    with pytest.raises(RuntimeError, match="rank one fails on purpose"):
        run_workers(_fails_on_rank_one, 2, timeout=60)


def test_shard_range_even_split():
    for d in range(0, 12):
        for world in range(1, 5):
            ranges = [D.shard_range(d, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == d
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert {b - a for a, b in ranges} <= {d // world, -(-d // world)}
    with pytest.raises(ValueError, match="rank"):
        D.shard_range(4, 2, 2)


def test_group_without_initialized_distributed_is_rejected():
    with pytest.raises(ValueError, match="not initialized"):
        D.check_process_group(object())
    assert D.check_process_group(None) is None
