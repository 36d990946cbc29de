"""prune() on an FSDP2-sharded model on 1-3 gloo ranks gives the single-process masks."""

import pytest
import torch
from dist_ops_cases import NUM_GRADS, PRUNE_CASES, masks_and_weights, prune_kwargs, prune_model
from dist_ops_cases import spawned as spawned_ranks
from torch import nn

from curvopt.prune import attach_masks, prune


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fsdp2_prune_equals_single_process_masks(world):
    _, shards, results = spawned_ranks(world)
    # single process: FSDP2 averages each gradient over ranks, i.e. the gradient of the mean
    # loss on the concatenation of the ranks' i-th batches (equal sizes)
    data = [
        (torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
        for i in range(NUM_GRADS)
    ]
    for case in PRUNE_CASES:
        model = prune_model(ties=case.startswith("magnitude"))
        attach_masks(model)  # as on the ranks: zeros under a mask count as pruned at the start
        ref_report = prune(model, nn.CrossEntropyLoss(), data, **prune_kwargs(case))
        expected = masks_and_weights(model)
        for res in results:
            got = res["prune"][case]
            assert got["report"]["steps"] == ref_report.steps, case
            assert got["report"]["update"] == ref_report.update
            assert got["report"]["damp"] == pytest.approx(ref_report.damp, rel=1e-12)
            assert got["report"]["sparsity"] == ref_report.sparsity
            for name, (mask, w) in expected.items():
                assert torch.equal(got["state"][name][0], mask), f"{case}: mask of {name}"
                err = (got["state"][name][1] - w).abs().max() / w.abs().max()
                assert err <= 1e-10, f"{case}: weights of {name}, relative error {err:.1e}"
            first = results[0]["prune"][case]["state"]
            assert all(torch.equal(got["state"][n][1], first[n][1]) for n in expected)
    for res in results:
        assert "attach_masks" in res["prune"]["no-masks"]
        # selecting the 50 % lowest of d random scores: exact count, only small all-reduces
        assert res["prune"]["select-count"] == round(0.5 * res["prune"]["dim"])
        calls, nbytes = res["prune"]["select-comm"]
        if world > 1:
            assert set(calls) == {"all_reduce"} and calls["all_reduce"] <= 20
            assert nbytes["all_reduce"] == calls["all_reduce"] * 255 * 8  # 255 counts a round


def test_sharded_prune_rejects_what_it_cannot_do():
    from curvopt.prune.sharded import check_sharded_arguments

    with pytest.raises(ValueError, match="block_size=None"):
        check_sharded_arguments("mfac", 128)
    with pytest.raises(ValueError, match="method='obs'"):
        check_sharded_arguments("obs", None)
    check_sharded_arguments("magnitude", 128)  # no blocks involved: fine


@pytest.mark.parametrize("world", [1, 2, 3])
def test_failed_fsdp2_prune_is_rolled_back_on_every_rank(world):
    _, _, results = spawned_ranks(world)
    for res in results:
        got = res["prune"]
        assert got["rollback-error"] == "stop at step 1"  # failed after writing step 1
        before, after = got["rollback-before"], got["rollback-after"]
        assert list(after) == list(before)
        for name, value in before.items():
            assert torch.equal(after[name], value), f"{name} changed by the failed prune"
        # the restored model prunes exactly like a fresh one
        fresh = got["mfac-global-multi"]["state"]
        for name, (mask, w) in got["rollback-then-prune"].items():
            assert torch.equal(mask, fresh[name][0]) and torch.equal(w, fresh[name][1]), name
