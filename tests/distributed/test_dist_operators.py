"""Curvature operators over data shards on 1-3 gloo ranks equal the full-data operator."""

import numpy as np
import pytest
import torch
from dist_helpers import run_workers
from scipy.sparse.linalg import eigsh
from torch import nn

from curvopt.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

# samples per batch on each rank: unequal shards, and at world 3 a rank without any batch
SHARDS = {1: [[5, 3, 4]], 2: [[7], [2, 3]], 3: [[5, 4], [3], []]}
SEED = 17  # Monte-Carlo Fisher seed; rank r draws with SEED + r
CASES = [  # (name, operator class, loss, extra kwargs)
    ("hessian-ce-mean", HessianOperator, nn.CrossEntropyLoss(), {}),
    ("hessian-mse-sum", HessianOperator, nn.MSELoss(reduction="sum"), {}),
    ("ggn-ce-mean", GGNOperator, nn.CrossEntropyLoss(), {}),
    ("fisher-mse-mean", FisherOperator, nn.MSELoss(), {}),
    ("fisher-mc-ce-mean", FisherOperator, nn.CrossEntropyLoss(), {"mc_samples": 3}),
    ("ef-ce-sum", EmpiricalFisherOperator, nn.CrossEntropyLoss(reduction="sum"), {}),
]


def _problem(world):
    """A float64 MLP and 12 samples split into the rank shards of ``SHARDS[world]``."""
    gen = torch.Generator().manual_seed(world)
    torch.manual_seed(world)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(12, 4, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    targets = torch.randn(12, 3, dtype=torch.float64, generator=gen)
    shards, start = [], 0
    for sizes in SHARDS[world]:
        batches = []
        for n in sizes:
            part = slice(start, start + n)
            batches.append((X[part], labels[part], targets[part]))
            start += n
        shards.append(batches)
    return model, shards


def _data(batches, loss):
    """``(X, y)`` batches with the labels or regression targets the loss needs."""
    return [(x, t if isinstance(loss, nn.MSELoss) else c) for x, c, t in batches]


def _operator(case, model, data, **kwargs):
    _, cls, loss, extra = case
    return cls(model, loss, list(model.parameters()), data, **extra, **kwargs)


def _reference(case, model, shards):
    """The single-process dense matrix of the whole data set (MC: the documented rank mix)."""
    name, cls, loss, extra = case
    if "mc_samples" not in extra:
        data = _data([b for batches in shards for b in batches], loss)
        return _operator(case, model, data).to_dense()
    # the distributed MC Fisher is sum_r (N_r / N) F_r, F_r drawn on rank r with SEED + r
    total = sum(len(x) for batches in shards for x, _, _ in batches)
    dense = 0
    for r, batches in enumerate(shards):
        if batches:
            op = _operator(case, model, _data(batches, loss), seed=SEED + r)
            dense = dense + op.to_dense() * (op.num_data / total)
    return dense


def _products(rank, world, model, shards, V, v0):
    group = torch.distributed.group.WORLD
    out = {}
    for case in CASES:
        name, _, loss, extra = case
        kwargs = {"seed": SEED} if "mc_samples" in extra else {}
        op = _operator(case, model, _data(shards[rank], loss), process_group=group, **kwargs)
        vec = op @ V[:, 0]
        lst = op @ [t.clone() for t in _split(V[:, 0], op.params)]
        scipy_op = op.to_scipy()
        out[name] = {
            "num_data": op.num_data,
            "matmat": op @ V,
            "matvec": vec,
            "list_equals_flat": torch.equal(torch.cat([t.reshape(-1) for t in lst]), vec),
            "scipy": torch.from_numpy(scipy_op @ V[:, 1].numpy()),
            "top_eig": eigsh(scipy_op, k=1, which="LA", v0=v0, return_eigenvectors=False),
        }
    if world > 1:  # ranks passing different parameter lists fail together, without a hang
        params = list(model.parameters())[: 4 if rank == 0 else 2]
        try:
            GGNOperator(model, CASES[2][2], params, _data(shards[rank], CASES[2][2]),
                        process_group=group)  # fmt: skip
        except ValueError as err:
            out["mismatch"] = str(err)
    return out


def _split(flat, params):
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_operators_on_unequal_data_shards_equal_the_full_data_operator(world):
    model, shards = _problem(world)
    d = sum(p.numel() for p in model.parameters())
    V = torch.randn(d, 3, dtype=torch.float64)
    v0 = np.random.default_rng(world).standard_normal(d)
    results = run_workers(_products, world, model, shards, V, v0)
    for name, _, _, _ in CASES:
        dense = _reference(next(c for c in CASES if c[0] == name), model, shards)
        scale = dense.abs().max()
        first = results[0][name]
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
                assert torch.equal(other[name][key], first[key]), f"{name} {key}"
    if world > 1:
        for res in results:
            assert "different numbers of parameters" in res["mismatch"]


def test_process_group_without_initialized_distributed_is_rejected():
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match="not initialized"):
        GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data,
                    process_group=object())  # fmt: skip
