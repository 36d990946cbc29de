"""MFAC checkpoints through torch.distributed.checkpoint: save at 2 ranks, load at 3, continue."""

import os

import torch
from dist_runs import LOAD_WORLD, results
from test_dist_mfac_optimizer import BATCH, make_data, make_model, make_opt, train

HALF = 6


GRAFTS = (None, "adam")


def _build(mode, world, graft):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    if mode == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        return model, model, make_opt(model, graft=graft)
    ddp = DDP(model)
    return ddp, model, make_opt(model, graft=graft, process_group=torch.distributed.group.WORLD)


def _shard(rank, world):
    X, Y = make_data()
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return X[mine], Y[mine]


def _save(rank, world, path):
    import torch.distributed.checkpoint as dcp

    X, Y = _shard(rank, world)
    for mode in ("zero1", "fsdp"):
        for graft in GRAFTS:
            net, model, opt = _build(mode, world, graft)
            train(net, opt, X, Y, HALF)
            sd = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
            dcp.save(sd, checkpoint_id=os.path.join(path, f"{mode}-{graft}"))
    return True


def _load_and_continue(rank, world, path):
    import torch.distributed.checkpoint as dcp

    X, Y = _shard(rank, world)
    out = {}
    for mode in ("zero1", "fsdp"):
        for graft in GRAFTS:
            net, model, opt = _build(mode, world, graft)
            sd = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
            dcp.load(sd, checkpoint_id=os.path.join(path, f"{mode}-{graft}"))
            model.load_state_dict(sd["model"])
            opt.load_sharded_state_dict(sd["optim"])
            out[f"{mode}-{graft}"] = train(net, opt, X, Y, HALF)
            out[f"{mode}-{graft}_count"] = opt.window.count
    return out


def test_dcp_save_at_two_ranks_load_at_three_continue():
    out = [r["checkpoint"] for r in results(LOAD_WORLD)]  # saved by the run on SAVE_WORLD ranks
    X, Y = make_data()
    for graft in GRAFTS:
        model = make_model()
        reference = train(model, make_opt(model, graft=graft), X, Y, 2 * HALF)[HALF:]
        for res in out:
            for mode in ("zero1", "fsdp"):
                key = f"{mode}-{graft}"
                assert res[key + "_count"] == 2 * HALF
                for step, ref in zip(res[key], reference):
                    for a, b in zip(step, ref):
                        rel = float((a - b).abs().max() / b.abs().max())
                        assert rel <= (1e-12 if graft is None else 1e-9), (key, rel)


def test_sharded_state_dict_needs_a_sharded_optimizer():
    import pytest

    model = make_model()
    with pytest.raises(ValueError, match="use state_dict"):
        make_opt(model).sharded_state_dict()
