"""curvopt.optim.MFAC under DDP (ZeRO-1) and FSDP2 on 1-3 gloo ranks vs the one-process run."""

import copy

import pytest
import torch
from dist_runs import results
from torch import nn

from curvopt import distributed as D
from curvopt.optim import MFAC

STEPS, BATCH = 12, 12  # the batch splits evenly over 1, 2 and 3 ranks


def make_model():
    torch.manual_seed(7)  # rows 7 and 2: uneven (and empty) FSDP2 shards on 3 ranks
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()


def make_data():
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
    return X, torch.randn(BATCH, 2, generator=gen, dtype=torch.float64)


def make_opt(model, graft=None, **kw):
    groups = [
        {"params": model[0].parameters(), "momentum": 0.9, "weight_decay": 1e-2},
        {
            "params": model[2].parameters(),
            "lr": 0.05,
            "momentum": 0.5,
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
        },
    ]
    return MFAC(groups, lr=0.1, m=4, damp=0.1, graft=graft, **kw)


def train(model, opt, X, Y, steps):
    """``steps`` MFAC steps on the mean squared error; the parameters after each step."""
    history = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
        history.append([full(p).clone() for p in model.parameters()])
    return history


def full(p):
    return p.detach().full_tensor() if D.is_dtensor(p) else p.detach()


def max_rel(hist, ref):
    return max(
        float((a - b).abs().max() / b.abs().max()) for h, r in zip(hist, ref) for a, b in zip(h, r)
    )


def _plain_state_dict_round_trip(net, model, X, Y, group):
    """A sharded MFAC loads its own ``state_dict()`` (per-rank shard shapes) into a fresh one.

    Returns True if the load succeeded and the next step of both optimizers, from the same
    parameters, gives bitwise the same parameters; the error text if the load failed.
    """
    kw = {} if group is None else {"process_group": group}
    opt = make_opt(model, **kw)
    train(net, opt, X, Y, 5)  # momentum buffers and a window that has refreshed
    fresh = make_opt(model, **kw)
    try:
        fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load aliases tensors
    except ValueError as err:
        return str(err)
    start = [full(p).clone() for p in model.parameters()]
    first = train(net, opt, X, Y, 1)[0]
    _write_full(model, start)
    second = train(net, fresh, X, Y, 1)[0]
    return all(torch.equal(a, b) for a, b in zip(first, second))


def _write_full(model, values):
    """Set every parameter (a DTensor's local Shard(0) rows, or the tensor) from full values."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            if not D.is_dtensor(p):
                p.copy_(v)
                continue
            world, rows = torch.distributed.get_world_size(), p.shape[0]
            per = -(-rows // world)  # torch.chunk's split, as FSDP2 uses
            bounds = [min(per * r, rows) for r in range(1, world)]
            D.local_tensor(p).copy_(v.tensor_split(bounds, 0)[torch.distributed.get_rank()])


def _optimizer_checks(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    group = torch.distributed.group.WORLD
    X, Y = make_data()
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    ref_model = make_model()
    reference = train(ref_model, make_opt(ref_model), X, Y, STEPS)
    out = {}

    # DDP + ZeRO-1
    ddp = DDP(make_model())
    opt = make_opt(ddp.module, process_group=group, check_replicated_grads=True)
    out["ddp_err"] = max_rel(train(ddp, opt, X[mine], Y[mine], STEPS), reference)
    out["ddp_dim"] = opt.window.G.shape[1]
    out["ddp_memory"] = opt.memory_bytes()
    # a NaN on the last rank only: every rank raises, nothing changes
    opt.zero_grad()
    nn.functional.mse_loss(ddp(X[mine]), Y[mine]).backward()
    before = [p.detach().clone() for p in ddp.parameters()]
    K_before = opt.window.K.clone()
    if rank == world - 1:
        next(ddp.parameters()).grad[0, 0] = float("nan")
    try:
        opt.step()
        out["nan_raised"] = False
    except ValueError as err:
        out["nan_raised"] = "NaN" in str(err)
    out["nan_unchanged"] = torch.equal(opt.window.K, K_before) and all(
        torch.equal(a, b) for a, b in zip(before, ddp.parameters())
    )
    # gradients that differ across ranks (a missing DDP all-reduce) are caught
    opt.zero_grad()
    nn.functional.mse_loss(ddp(X[mine]), Y[mine]).backward()
    if rank == 0 and world > 1:
        next(ddp.parameters()).grad[0, 0] += 1.0
    try:
        opt.step()
        out["differ_raised"] = False
    except ValueError as err:
        out["differ_raised"] = "differ across the ranks" in str(err)
    # ... also when they differ with the same sum on every rank: small integers (every sum
    # exact, in any order), +3 and -3 on rank 0 (0, 1 become 3, -2: squares 1 -> 13)
    opt.zero_grad()
    nn.functional.mse_loss(ddp(X[mine]), Y[mine]).backward()
    for p in ddp.parameters():
        p.grad.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) % 5)
    if rank == 0 and world > 1:
        g = next(ddp.parameters()).grad
        g[0, 0] += 3.0
        g[0, 1] -= 3.0
    try:
        opt.step()
        out["same_sum_raised"] = False
    except ValueError as err:
        out["same_sum_raised"] = "differ across the ranks" in str(err)
    out["zero1_reload"] = _plain_state_dict_round_trip(ddp, ddp.module, X[mine], Y[mine], group)

    # FSDP2
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model, mesh=mesh)
    opt = make_opt(model, nonfinite="skip")
    out["fsdp_err"] = max_rel(train(model, opt, X[mine], Y[mine], STEPS), reference)
    out["fsdp_dim"] = opt.window.G.shape[1]
    out["fsdp_local"] = sum(D.local_tensor(p).numel() for p in model.parameters())
    # a NaN on the last rank only, nonfinite="skip": every rank skips
    opt.zero_grad()
    nn.functional.mse_loss(model(X[mine]), Y[mine]).backward()
    before = [full(p).clone() for p in model.parameters()]
    if rank == world - 1:
        g = D.local_tensor(model[0].weight.grad)
        g[0, 0] = float("inf")
    opt.step()
    out["skipped"] = int(opt.skipped_steps)
    out["skip_unchanged"] = all(torch.equal(a, full(b)) for a, b in zip(before, model.parameters()))
    out["fsdp_reload"] = _plain_state_dict_round_trip(model, model, X[mine], Y[mine], None)

    # the default grafted step (per-parameter norms all-reduced) matches one process too
    ref_model = make_model()
    reference = train(ref_model, make_opt(ref_model, graft="adam"), X, Y, STEPS)
    ddp = DDP(make_model())
    opt = make_opt(ddp.module, graft="adam", process_group=group)
    out["graft_ddp_err"] = max_rel(train(ddp, opt, X[mine], Y[mine], STEPS), reference)
    model = make_model()
    fully_shard(model, mesh=mesh)
    opt = make_opt(model, graft="adam")
    out["graft_fsdp_err"] = max_rel(train(model, opt, X[mine], Y[mine], STEPS), reference)

    # bad input: a Replicate placement; DTensor and plain parameters mixed
    rep = nn.Parameter(distribute_tensor(torch.ones(4, dtype=torch.float64), mesh, [Replicate()]))
    out["bad"] = []
    for params in (
        [rep],
        [next(model.parameters()), nn.Parameter(torch.ones(3, dtype=torch.float64))],
    ):
        try:
            MFAC(params, m=2, graft=None)
            out["bad"].append("accepted")
        except ValueError as err:
            out["bad"].append(str(err))
    # a process_group whose ranks differ from the parameters' mesh
    sub = torch.distributed.new_group([0]) if world > 1 else None
    if rank == 0 and sub is not None:
        try:
            MFAC(model.parameters(), m=2, process_group=sub, graft=None)
            out["bad"].append("accepted")
        except ValueError as err:
            out["bad"].append(str(err))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_mfac_ddp_zero1_and_fsdp2_match_one_process(world):
    out = [r["optimizer"] for r in results(world)]
    d = sum(p.numel() for p in make_model().parameters())
    for res in out:
        assert res["ddp_err"] <= 1e-10, res["ddp_err"]
        assert res["fsdp_err"] <= 1e-10, res["fsdp_err"]
        assert res["graft_ddp_err"] <= 1e-9, res["graft_ddp_err"]
        assert res["graft_fsdp_err"] <= 1e-9, res["graft_fsdp_err"]
        assert res["ddp_dim"] in (d // world, -(-d // world))
        assert res["fsdp_dim"] == res["fsdp_local"]
        assert res["nan_raised"] and res["nan_unchanged"]
        assert res["differ_raised"] == (world > 1)
        assert res["same_sum_raised"] == (world > 1)
        assert res["zero1_reload"] is True, res["zero1_reload"]
        assert res["fsdp_reload"] is True, res["fsdp_reload"]
        assert res["skipped"] == 1 and res["skip_unchanged"]
        assert "Shard(0)" in res["bad"][0] and "both DTensor" in res["bad"][1]
    if world > 1:
        assert "but the parameters are sharded over the mesh ranks" in out[0]["bad"][2]
    assert sum(r["ddp_dim"] for r in out) == d
    assert sum(r["fsdp_dim"] for r in out) == d


def test_mfac_rejects_a_group_without_initialized_distributed():
    with pytest.raises(ValueError, match="not initialized"):
        MFAC(make_model().parameters(), m=2, process_group=object(), graft=None)
