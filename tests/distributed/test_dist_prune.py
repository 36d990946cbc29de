"""prune() on an FSDP2-sharded model on 1-3 gloo ranks gives the single-process masks."""

import pytest
import torch
from dist_helpers import run_workers
from torch import nn

from curvopt.prune import attach_masks, prunable_weights, prune

NUM_GRADS, BATCH = 6, 3
CASES = {  # name: prune arguments (block_size=None: one M-FAC block, as sharded pruning uses)
    "mfac-global-multi": dict(sparsity=0.6, method="mfac", steps=2, update="auto"),
    "mfac-layer-diagonal": dict(
        sparsity={"0": 0.5, "2": 0.7, "4": 0.3}, method="mfac", scope="layer", update="diagonal"
    ),
    "mfac-global-normalized": dict(sparsity=0.5, method="mfac", normalize=True, update="none"),
    "magnitude-ties": dict(sparsity=0.55, method="magnitude", steps=2),
}


def _model(ties: bool) -> nn.Module:
    """Rows 7, 5, 2: uneven shards on 2 and 3 ranks, and at 3 a rank without rows of the last."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2)
    ).double()
    if ties:  # a coarse grid: many weights of equal magnitude, across layers and ranks
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.round(p * 4) / 4)
    return model


def _shards(world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(10 + world)
    return [
        [
            (torch.randn(BATCH, 6, dtype=torch.float64, generator=gen),
             torch.randint(0, 2, (BATCH,), generator=gen))
            for _ in range(NUM_GRADS)
        ]
        for _ in range(world)
    ]  # fmt: skip


def _kwargs(case: str) -> dict:
    return dict(num_grads=NUM_GRADS, block_size=None, **CASES[case])


def _masks_and_weights(model):
    out = {}
    for t in prunable_weights(model):
        w = t.param.detach()
        w = w.full_tensor() if hasattr(w, "full_tensor") else w
        out[t.qualified_name] = (t.mask.detach().clone(), (w * t.mask).clone())
    return out


def _prune_fsdp(rank, world, shards):
    from torch.distributed.fsdp import fully_shard

    out = {}
    for case in CASES:
        model = _model(ties=case.startswith("magnitude"))
        attach_masks(model)
        fully_shard(model)
        report = prune(model, nn.CrossEntropyLoss(), shards[rank], **_kwargs(case))
        out[case] = {"report": report.to_dict(), "state": _masks_and_weights(model)}
    # bad input: a model sharded without masks attached first fails with a clear message
    model = _model(ties=False)
    fully_shard(model)
    try:
        prune(model, nn.CrossEntropyLoss(), shards[rank], 0.5, num_grads=2, block_size=None)
    except ValueError as err:
        out["no-masks"] = str(err)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fsdp2_prune_equals_single_process_masks(world):
    shards = _shards(world)
    results = run_workers(_prune_fsdp, world, shards)
    # single process: FSDP2 averages each gradient over ranks, i.e. the gradient of the mean
    # loss on the concatenation of the ranks' i-th batches (equal sizes)
    data = [
        (torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
        for i in range(NUM_GRADS)
    ]
    for case in CASES:
        model = _model(ties=case.startswith("magnitude"))
        attach_masks(model)  # as on the ranks: zeros under a mask count as pruned at the start
        ref_report = prune(model, nn.CrossEntropyLoss(), data, **_kwargs(case))
        expected = _masks_and_weights(model)
        for res in results:
            got = res[case]
            assert got["report"]["steps"] == ref_report.steps, case
            assert got["report"]["update"] == ref_report.update
            assert got["report"]["damp"] == pytest.approx(ref_report.damp, rel=1e-12)
            assert got["report"]["sparsity"] == ref_report.sparsity
            for name, (mask, w) in expected.items():
                assert torch.equal(got["state"][name][0], mask), f"{case}: mask of {name}"
                err = (got["state"][name][1] - w).abs().max() / w.abs().max()
                assert err <= 1e-10, f"{case}: weights of {name}, relative error {err:.1e}"
        assert all(
            torch.equal(r[case]["state"][n][1], results[0][case]["state"][n][1])
            for r in results
            for n in expected
        )
    for res in results:
        assert "attach_masks" in res["no-masks"]


def test_sharded_prune_rejects_what_it_cannot_do():
    from curvopt.prune.sharded import check_sharded_arguments

    with pytest.raises(ValueError, match="block_size=None"):
        check_sharded_arguments("mfac", 128)
    with pytest.raises(ValueError, match="method='obs'"):
        check_sharded_arguments("obs", None)
    check_sharded_arguments("magnitude", 128)  # no blocks involved: fine
