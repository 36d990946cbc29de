"""Curvature operators over data shards on 1-3 gloo ranks equal the full-data operator."""

import pytest
import torch
from dist_ops_cases import (
    KFAC_MC_CASES,
    OPERATOR_CASES,
    SEED,
    batches_for,
    make_operator,
    spawned,
)
from torch import nn

from curvopt.curvature import GGNOperator


def _reference(case, model, shards):
    """The single-process dense matrix of the whole data set (MC: the documented rank mix)."""
    _, _, loss, extra = case
    if "mc_samples" not in extra:
        data = batches_for([b for batches in shards for b in batches], loss)
        return make_operator(case, model, data).to_dense()
    # the distributed MC Fisher is sum_r (N_r / N) F_r, F_r drawn on rank r with SEED + r
    total = sum(len(x) for batches in shards for x, _, _ in batches)
    dense = 0
    for r, batches in enumerate(shards):
        if batches:
            op = make_operator(case, model, batches_for(batches, loss), seed=SEED + r)
            dense = dense + op.to_dense() * (op.num_data / total)
    return dense


@pytest.mark.parametrize("world", [1, 2, 3])
def test_operators_on_unequal_data_shards_equal_the_full_data_operator(world):
    (model, shards, V, _), _, results = spawned(world)
    for case in OPERATOR_CASES:
        name = case[0]
        dense = _reference(case, model, shards)
        scale = dense.abs().max()
        first = results[0]["operators"][name]
        assert first["num_data"] == 12
        for key, expected in [
            ("matmat", dense @ V),
            ("matvec", dense @ V[:, 0]),
            ("scipy", dense @ V[:, 1]),
        ]:
            err = (first[key] - expected).abs().max() / scale
            assert err <= 1e-12, f"{name} {key}: relative error {err:.2e}"
        assert first["list_equals_flat"]
        top = torch.linalg.eigvalsh(dense)[-1]
        assert abs(float(first["top_eig"][0]) - float(top)) <= 1e-9 * float(scale)
        for other in results[1:]:  # every rank holds the same numbers, bit for bit
            for key in ("matmat", "matvec", "scipy"):
                assert torch.equal(other["operators"][name][key], first[key]), f"{name} {key}"
    for res in results:
        assert "FSDP2-sharded DTensors" in res["operators"]["dtensor"]
    if world > 1:
        for res in results:
            assert "different numbers of parameters" in res["operators"]["mismatch"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_mc_kfac_over_ranks_mixes_the_ranks_factors(world):
    """Rank r samples with SEED + r: A = sum_r (N_r / N) A_r and, for 'mean', B likewise (for
    'sum', B = sum_r B_r), each from a single process on shard r with seed SEED + r."""
    (model, shards, V, _), _, results = spawned(world)
    total = sum(len(x) for batches in shards for x, _, _ in batches)
    for case in KFAC_MC_CASES:
        name, _, loss, _ = case
        ref_A, ref_B = {}, {}
        for r, batches in enumerate(shards):
            if not batches:
                continue
            op = make_operator(case, model, batches_for(batches, loss), seed=SEED + r)
            share = sum(len(x) for x, _, _ in batches) / total
            b_share = share if loss.reduction == "mean" else 1.0
            for key, factor in op.input_covariances.items():
                ref_A[key] = ref_A.get(key, 0) + share * factor
            for key, factor in op.gradient_covariances.items():
                ref_B[key] = ref_B.get(key, 0) + b_share * factor
        first = results[0]["operators"][name]
        assert first["A"].keys() == ref_A.keys() and first["B"].keys() == ref_B.keys()
        for got, want in [(first["A"], ref_A), (first["B"], ref_B)]:
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14)
        if world > 1:  # not the single-process MC K-FAC of the whole data set
            whole = make_operator(case, model, batches_for(
                [b for batches in shards for b in batches], loss), seed=SEED)  # fmt: skip
            assert any(not torch.allclose(first["B"][k], B)
                       for k, B in whole.gradient_covariances.items())  # fmt: skip
        for other in results[1:]:  # every rank holds the same factors and products
            assert torch.equal(other["operators"][name]["matvec"], first["matvec"])
            for key in first["B"]:
                assert torch.equal(other["operators"][name]["B"][key], first["B"][key])


def test_process_group_without_initialized_distributed_is_rejected():
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match="not initialized"):
        GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data,
                    process_group=object())  # fmt: skip
