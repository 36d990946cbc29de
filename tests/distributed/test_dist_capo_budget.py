"""The KL budget under data parallelism (2 gloo ranks): the whole-data prediction on every rank.

Each rank holds its own part of the batch (unequal token counts), the parameters are replicated
and the gradients averaged as DDP does; ``fit_kl_budget(..., process_group=)`` must predict the
mean KL over *all* ranks' tokens (checked against one process's prediction on the concatenated
batch, float64), give every rank the same scale, and so keep the replicas equal after the step.
FSDP2-sharded parameters are refused with a clear error (forward-mode AD has no DTensor rule).
"""

import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_workers
from torch import nn

from curvopt.capo.whole_model import fit_kl_budget, logit_change, token_kl, trial_step

ROWS = (5, 3)  # rows of each rank's batch


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6)).double()


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(ROWS[rank], 3, 4, generator=g, dtype=torch.float64)  # (rows, T, features)
    mask = torch.rand(ROWS[rank], 3, generator=g) < 0.7
    mask[0, 0] = True
    return x, mask


def _checks(rank, world):
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    x, mask = _data(rank)
    logp = torch.log_softmax(net(x), -1)[..., 0]
    (-(logp * mask).sum() / mask.sum()).backward()
    for p in net.parameters():  # DDP's gradient averaging
        dist.all_reduce(p.grad)
        p.grad /= world
    # one process's prediction on the whole batch, for the same step
    step = trial_step(opt, list(net.parameters()))
    xs, masks = zip(*(_data(r) for r in range(world)))
    z, u = logit_change(net, step, torch.cat(xs))
    whole = token_kl(z, u)[torch.cat(masks)].mean().item()
    local = token_kl(*logit_change(net, step, x))[mask].mean().item()
    out = fit_kl_budget(net, opt, 1e-3, x, mask=mask, process_group=dist.group.WORLD)
    opt.step()
    # FSDP2: refused, nothing changed
    from torch.distributed.fsdp import fully_shard

    sharded = _net()
    fully_shard(sharded)
    sopt = torch.optim.SGD(sharded.parameters(), lr=0.1)
    torch.log_softmax(sharded(x), -1)[..., 0].mean().backward()
    try:
        fit_kl_budget(sharded, sopt, 1e-3, x)
        refused = None
    except ValueError as e:
        refused = str(e)
    return {
        "kl": out["kl"],
        "scale": out["scale"],
        "whole": whole,
        "local": local,
        "params": [p.detach().clone() for p in net.parameters()],
        "refused": refused,
    }


@pytest.fixture(scope="module")
def results():
    return run_workers(_checks, 2, timeout=120)


def test_every_rank_predicts_the_whole_batch_kl(results):
    for res in results:
        assert res["kl"] == pytest.approx(res["whole"], rel=1e-12)
        assert res["kl"] != pytest.approx(res["local"], rel=1e-3)  # the ranks' own KLs differ
    assert results[0]["kl"] == results[1]["kl"]
    assert results[0]["scale"] == results[1]["scale"] < 1  # the budget binds, one scale


def test_replicas_stay_equal_after_the_scaled_step(results):
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


def test_fsdp2_sharded_parameters_are_refused(results):
    for res in results:
        assert res["refused"] is not None and "FSDP2" in res["refused"]
