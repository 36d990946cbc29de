"""prune() on an FSDP2-sharded model on 1-3 gloo ranks gives the single-process masks."""

import pytest
import torch
from dist_ops_cases import (
    NUM_GRADS,
    PRUNE_CASES,
    SHORT_DATA,
    masks_and_weights,
    prune_kwargs,
    prune_model,
)
from dist_ops_cases import spawned as spawned_ranks
from torch import nn

from curvopt.prune import attach_masks, prunable_weights, prune


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


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_out_of_data_stops_every_rank_with_it(world):
    """Rank 0 has 2 batches, the others 6: all ranks use 2 gradients (the single-process masks
    on the first 2 concatenated batches) and warn."""
    _, shards, results = spawned_ranks(world)
    data = [
        (torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
        for i in range(SHORT_DATA)
    ]
    model = prune_model(ties=False)
    attach_masks(model)
    with pytest.warns(UserWarning, match=f"only {SHORT_DATA} of the {NUM_GRADS} gradients"):
        ref_report = prune(model, nn.CrossEntropyLoss(), data, **prune_kwargs("mfac-global-multi"))
    expected = masks_and_weights(model)
    for res in results:
        got = res["prune"]["short-data"]
        assert any(f"only {SHORT_DATA} of the {NUM_GRADS}" in w for w in got["warnings"])
        assert got["report"]["damp"] == pytest.approx(ref_report.damp, rel=1e-12)
        for name, (mask, w) in expected.items():
            assert torch.equal(got["state"][name][0], mask), f"mask of {name}"
            err = (got["state"][name][1] - w).abs().max() / w.abs().max()
            assert err <= 1e-10, f"weights of {name}, relative error {err:.1e}"


def test_sharded_prune_rejects_what_it_cannot_do():
    from curvopt.prune.sharded import check_sharded_arguments

    with pytest.raises(ValueError, match="block_size=None"):
        check_sharded_arguments("mfac", 128)
    with pytest.raises(ValueError, match="method='obs'"):
        check_sharded_arguments("obs", None)
    check_sharded_arguments("layerwise", None)  # per-layer Hessians: sharded rows are fine
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


# ------------------------------------------------------------------------------ N:M patterns
class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` in miniature: weight ``(in, out)``, sharded by inputs."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


NM_TYPES = (nn.Linear, Conv1D)
NM_CASES = {  # name: (model with a Conv1D?, prune arguments)
    "mfac-2:4": (False, dict(method="mfac", steps=2, update="auto")),
    "mfac-1:4-diagonal": (False, dict(method="mfac", steps=1, update="diagonal")),
    "magnitude-2:4-conv1d": (True, dict(method="magnitude", steps=2)),
}


def nm_model(conv1d: bool) -> nn.Module:
    """Rows 12 and 2 (uneven shards; at 3 ranks one without rows); or a Conv1D with 8 inputs."""
    torch.manual_seed(5)
    last = Conv1D(2, 8) if conv1d else nn.Linear(12, 2)
    return nn.Sequential(nn.Linear(8, 8 if conv1d else 12), nn.Tanh(), last).double()


# layer-wise OBS (per-layer input Hessians) and bf16 M-FAC gradients: no pattern unless named
LW_CASES = {
    "layerwise-50%": (False, dict(method="layerwise", scope="layer", steps=2)),
    "layerwise-2:4": (False, dict(method="layerwise", steps=2)),
    "layerwise-50%-conv1d": (True, dict(method="layerwise", scope="layer", steps=2)),
    "layerwise-2:4-conv1d": (True, dict(method="layerwise", steps=2)),
    "mfac-bf16-grads": (False, dict(method="mfac", steps=2, grad_dtype=torch.bfloat16)),
    "mfac-bf16-grads-2:4": (False, dict(method="mfac", steps=2, grad_dtype=torch.bfloat16)),
}


def nm_kwargs(case: str, cases: dict | None = None) -> dict:
    kw = (cases or {**NM_CASES, **LW_CASES})[case][1]
    pattern = "1:4" if "1:4" in case else "2:4" if "2:4" in case else None
    sparsity = 0.75 if pattern == "1:4" else 0.5
    return dict(sparsity=sparsity, pattern=pattern, num_grads=NUM_GRADS, block_size=None, **kw)


def nm_shards(world: int):
    gen = torch.Generator().manual_seed(20 + world)
    return [
        [
            (torch.randn(3, 8, dtype=torch.float64, generator=gen),
             torch.randint(0, 2, (3,), generator=gen))
            for _ in range(NUM_GRADS)
        ]
        for _ in range(world)
    ]  # fmt: skip


def nm_state(model):
    out = {}
    for t in prunable_weights(model, layer_types=NM_TYPES):
        w = t.param.detach()
        w = w.full_tensor() if hasattr(w, "full_tensor") else w
        out[t.qualified_name] = (t.mask.detach().clone(), (w * t.mask).clone())
    return out


def _nm_worker(rank, world, shards, cases=None):
    from torch.distributed.fsdp import fully_shard

    cases = NM_CASES if cases is None else cases
    out = {}
    for case in cases:
        model = nm_model(cases[case][0])
        attach_masks(model, layer_types=NM_TYPES)
        fully_shard(model)
        before = nm_state(model)
        kw = nm_kwargs(case, cases)
        try:
            report = prune(model, nn.CrossEntropyLoss(), shards[rank], layer_types=NM_TYPES, **kw)
            out[case] = {"report": report.to_dict(), "state": nm_state(model)}
        except ValueError as err:
            out[case] = {"error": str(err), "before": before, "state": nm_state(model)}
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_nm_prune_equals_single_process(world):
    from dist_helpers import run_workers

    shards = nm_shards(world)
    results = run_workers(_nm_worker, world, shards, timeout=240)
    data = [
        (torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
        for i in range(NUM_GRADS)
    ]
    for case in NM_CASES:
        model = nm_model(NM_CASES[case][0])
        attach_masks(model, layer_types=NM_TYPES)
        kw = nm_kwargs(case)
        ref = prune(model, nn.CrossEntropyLoss(), data, layer_types=NM_TYPES, **kw)
        expected = nm_state(model)
        for t in prunable_weights(model, layer_types=NM_TYPES):  # the pattern holds
            w = expected[t.qualified_name][1]
            rows = w.T if isinstance(t.module, Conv1D) else w
            assert int((rows.reshape(-1, 4) != 0).sum(1).max()) <= (1 if "1:4" in case else 2)
        for res in results:
            got = res[case]
            if case.endswith("conv1d") and world == 3:  # 8 input rows over 3 ranks: 3, 3, 2
                assert "splits groups of m=4" in got["error"]
                for name, (mask, w) in got["before"].items():
                    assert torch.equal(got["state"][name][0], mask)
                    assert torch.equal(got["state"][name][1], w)
                continue
            assert got["report"]["steps"] == ref.steps and got["report"]["update"] == ref.update
            assert got["report"]["pattern"] == kw["pattern"]
            for name, (mask, w) in expected.items():
                assert torch.equal(got["state"][name][0], mask), f"{case}: mask of {name}"
                err = (got["state"][name][1] - w).abs().max() / w.abs().max()
                assert err <= 1e-10, f"{case}: weights of {name}, relative error {err:.1e}"


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_layerwise_and_bf16_grads_equal_single_process(world):
    """Layer-wise OBS on sharded rows (Linear: outputs, Conv1D: inputs, uneven; at 3 ranks one
    rank holds no row of the last Linear) and M-FAC with bf16 gradients give the single-process
    masks and weights of the concatenated data."""
    from dist_helpers import run_workers

    shards = nm_shards(world)
    results = run_workers(_nm_worker, world, shards, LW_CASES, timeout=240)
    data = [
        (torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
        for i in range(NUM_GRADS)
    ]
    for case, (conv1d, _) in LW_CASES.items():
        model = nm_model(conv1d)
        attach_masks(model, layer_types=NM_TYPES)
        kw = nm_kwargs(case)
        ref = prune(model, nn.CrossEntropyLoss(), data, layer_types=NM_TYPES, **kw)
        expected = nm_state(model)
        assert ref.sparsity == pytest.approx(0.5)
        # bf16 G: the ranks' gradients are sums in another order, rounded to 8 bits; the
        # products accumulate in float32
        tol = 1e-4 if "bf16" in case else 1e-10
        for res in results:
            got = res[case]
            if case.endswith("2:4-conv1d") and world == 3:  # 8 input rows over 3 ranks: 3, 3, 2
                assert "splits groups of m=4" in got["error"]
                continue
            assert "error" not in got, got.get("error")
            assert got["report"]["steps"] == ref.steps and got["report"]["update"] == ref.update
            damp_tol = 1e-12 if tol < 1e-9 else tol
            assert got["report"]["damp"] == pytest.approx(ref.damp, rel=damp_tol), case
            for name, (mask, w) in expected.items():
                assert torch.equal(got["state"][name][0], mask), f"{case}: mask of {name}"
                err = (got["state"][name][1] - w).abs().max() / w.abs().max()
                assert err <= tol, f"{case}: weights of {name}, relative error {err:.1e}"
