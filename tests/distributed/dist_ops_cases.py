"""Problems and rank-side checks of test_dist_operators.py and test_dist_prune.py.

Spawning a process costs seconds (importing torch), so both files share ONE spawn per world
size: :func:`spawned` runs the operator checks and the FSDP2 pruning checks in the same workers
and caches the results for the session; each test file compares them with its own
single-process reference.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from dist_helpers import run_workers
from scipy.sparse.linalg import eigsh
from torch import nn

from curvopt.curvature import (
    EKFACOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
)
from curvopt.distributed import CommCounter
from curvopt.prune import attach_masks, prunable_weights, prune
from curvopt.prune.sharded import ShardedWeights

# ------------------------------------------------------------------------------ operators
# samples per batch on each rank: unequal shards, and at world 3 a rank without any batch
SHARDS = {1: [[5, 3, 4]], 2: [[7], [2, 3]], 3: [[5, 4], [3], []]}
SEED = 17  # Monte-Carlo Fisher seed; rank r draws with SEED + r
OPERATOR_CASES = [  # (name, operator class, loss, extra kwargs)
    ("hessian-ce-mean", HessianOperator, nn.CrossEntropyLoss(), {}),
    ("hessian-mse-sum", HessianOperator, nn.MSELoss(reduction="sum"), {}),
    ("ggn-ce-mean", GGNOperator, nn.CrossEntropyLoss(), {}),
    ("fisher-mse-mean", FisherOperator, nn.MSELoss(), {}),
    ("fisher-mc-ce-mean", FisherOperator, nn.CrossEntropyLoss(), {"mc_samples": 3}),
    ("ef-ce-sum", EmpiricalFisherOperator, nn.CrossEntropyLoss(reduction="sum"), {}),
    # K-FAC: factors summed over the ranks equal those of the whole data set (deterministic
    # types; the MC K-FACs of KFAC_MC_CASES are checked factor by factor)
    ("kfac-ce-mean", KFACOperator, nn.CrossEntropyLoss(), {"fisher_type": "type-2"}),
    ("ekfac-mse-sum", EKFACOperator, nn.MSELoss(reduction="sum"), {"fisher_type": "type-2"}),
    (
        "kfac-ce-sum-empirical-joint",
        KFACOperator,
        nn.CrossEntropyLoss(reduction="sum"),
        {"fisher_type": "empirical", "separate_weight_and_bias": False},
    ),
]

# MC K-FAC over ranks: rank r draws its labels with SEED + r, so its factors are the mix of the
# ranks' single-process factors (Kronecker products of mixes: not a mix of dense matrices)
KFAC_MC_CASES = [
    (
        "kfac-mc-ce-mean",
        KFACOperator,
        nn.CrossEntropyLoss(),
        {"fisher_type": "mc", "mc_samples": 2},
    ),
    ("kfac-mc-ce-sum", KFACOperator, nn.CrossEntropyLoss(reduction="sum"), {"fisher_type": "mc"}),
]


def operator_problem(world: int):
    """A float64 MLP, 12 samples split into the rank shards of ``SHARDS[world]``, and inputs."""
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
    d = sum(p.numel() for p in model.parameters())
    V = torch.randn(d, 3, dtype=torch.float64, generator=gen)
    v0 = np.random.default_rng(world).standard_normal(d)
    return model, shards, V, v0


def batches_for(batches, loss):
    """``(X, y)`` batches with the labels or regression targets the loss needs."""
    return [(x, t if isinstance(loss, nn.MSELoss) else c) for x, c, t in batches]


def make_operator(case, model, data, **kwargs):
    _, cls, loss, extra = case
    return cls(model, loss, list(model.parameters()), data, **extra, **kwargs)


def _split(flat, params):
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out


def _operator_checks(rank, world, model, shards, V, v0):
    group = torch.distributed.group.WORLD
    out = {}
    for case in OPERATOR_CASES:
        name, _, loss, extra = case
        kwargs = {"seed": SEED} if "mc_samples" in extra else {}
        op = make_operator(case, model, batches_for(shards[rank], loss), process_group=group,
                           **kwargs)  # fmt: skip
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
    for case in KFAC_MC_CASES:
        name, _, loss, _ = case
        op = make_operator(case, model, batches_for(shards[rank], loss), process_group=group,
                           seed=SEED)  # fmt: skip
        out[name] = {
            "A": op.input_covariances,
            "B": op.gradient_covariances,
            "matvec": op @ V[:, 0],
        }
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    ce = nn.CrossEntropyLoss()
    try:  # operators shard the data, not the parameters: FSDP2 DTensors are refused
        data = batches_for(shards[rank], ce)
        GGNOperator(sharded, ce, list(sharded.parameters()), data, process_group=group)
    except ValueError as err:
        out["dtensor"] = str(err)
    if world > 1:  # ranks passing different parameter lists fail together, without a hang
        loss = nn.CrossEntropyLoss()
        params = list(model.parameters())[: 4 if rank == 0 else 2]
        try:
            GGNOperator(model, loss, params, batches_for(shards[rank], loss), process_group=group)
        except ValueError as err:
            out["mismatch"] = str(err)
    return out


# ------------------------------------------------------------------------------ pruning
NUM_GRADS, BATCH = 6, 3
SHORT_DATA = 2  # batches on rank 0 in the out-of-data check
PRUNE_CASES = {  # name: prune arguments (block_size=None: one M-FAC block, as sharded uses)
    "mfac-global-multi": dict(sparsity=0.6, method="mfac", steps=2, update="auto"),
    "mfac-layer-diagonal": dict(
        sparsity={"0": 0.5, "2": 0.7, "4": 0.3},
        method="mfac",
        scope="layer",
        update="diagonal",
        steps=3,
    ),
    "mfac-global-normalized": dict(
        sparsity=0.5, method="mfac", normalize=True, update="none", steps=3
    ),
    "magnitude-ties": dict(sparsity=0.55, method="magnitude", steps=2),
}


def prune_model(ties: bool) -> nn.Module:
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


def prune_shards(world: int):
    """``NUM_GRADS`` batches of ``BATCH`` samples on every rank."""
    gen = torch.Generator().manual_seed(10 + world)
    return [
        [
            (torch.randn(BATCH, 6, dtype=torch.float64, generator=gen),
             torch.randint(0, 2, (BATCH,), generator=gen))
            for _ in range(NUM_GRADS)
        ]
        for _ in range(world)
    ]  # fmt: skip


def prune_kwargs(case: str) -> dict:
    return dict(num_grads=NUM_GRADS, block_size=None, **PRUNE_CASES[case])


def masks_and_weights(model):
    """``{name: (mask, effective weights)}``, whole tensors (gathered from FSDP2 shards)."""
    out = {}
    for t in prunable_weights(model):
        w = t.param.detach()
        w = w.full_tensor() if hasattr(w, "full_tensor") else w
        out[t.qualified_name] = (t.mask.detach().clone(), (w * t.mask).clone())
    return out


def full_state(model):
    """Every parameter (whole, gathered from FSDP2 shards) and buffer of ``model``, cloned."""
    out = {}
    for name, p in model.named_parameters():
        p = p.detach()
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    for name, b in model.named_buffers():
        out[name] = b.detach().clone()
    return out


def _prune_checks(rank, world, shards):
    from torch.distributed.fsdp import fully_shard

    out = {}
    for case in PRUNE_CASES:
        model = prune_model(ties=case.startswith("magnitude"))
        attach_masks(model)
        fully_shard(model)
        report = prune(model, nn.CrossEntropyLoss(), shards[rank], **prune_kwargs(case))
        out[case] = {"report": report.to_dict(), "state": masks_and_weights(model)}
    # all or nothing: a prune that fails after its first step (on every rank) is undone on every
    # rank, and the restored model then prunes exactly like a fresh one
    model = prune_model(ties=False)
    attach_masks(model)
    fully_shard(model)
    before = full_state(model)

    def fail_after_first_step(step, steps, reached):
        raise RuntimeError(f"stop at step {step}")

    try:
        prune(
            model, nn.CrossEntropyLoss(), shards[rank], callback=fail_after_first_step,
            **prune_kwargs("mfac-global-multi"),
        )  # fmt: skip
    except RuntimeError as err:
        out["rollback-error"] = str(err)
    out["rollback-before"] = before
    out["rollback-after"] = full_state(model)
    prune(model, nn.CrossEntropyLoss(), shards[rank], **prune_kwargs("mfac-global-multi"))
    out["rollback-then-prune"] = masks_and_weights(model)
    # rank 0 runs out of data after SHORT_DATA batches, the others have NUM_GRADS: every rank
    # stops with rank 0 (an unagreed stop would leave the others in collectives of their own)
    model = prune_model(ties=False)
    attach_masks(model)
    fully_shard(model)
    data = shards[rank][:SHORT_DATA] if rank == 0 else shards[rank]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, nn.CrossEntropyLoss(), data, **prune_kwargs("mfac-global-multi"))
    out["short-data"] = {
        "report": report.to_dict(),
        "state": masks_and_weights(model),
        "warnings": [str(w.message) for w in caught],
    }
    # the global selection all-reduces counts only: no gather, payload independent of d
    model = prune_model(ties=False)
    attach_masks(model)
    fully_shard(model)
    weights = ShardedWeights(prunable_weights(model))
    gen = torch.Generator().manual_seed(rank)
    scores = torch.rand(weights.alive().numel(), dtype=torch.float64, generator=gen)
    with CommCounter() as counter:
        chosen = weights.select(scores, weights.alive(), [0.5] * 3, "global", False, 1.0, [0.0] * 3)
    out["select-comm"] = (dict(counter.calls), dict(counter.bytes))
    out["select-count"] = weights.count(chosen)
    out["dim"] = weights.dim
    # bad input: a model sharded without masks attached first fails with a clear message
    model = prune_model(ties=False)
    fully_shard(model)
    try:
        prune(model, nn.CrossEntropyLoss(), shards[rank], 0.5, num_grads=2, block_size=None)
    except ValueError as err:
        out["no-masks"] = str(err)
    return out


# ------------------------------------------------------------------------------ one spawn
def _worker(rank, world, operator_inputs, prune_inputs):
    return {
        "operators": _operator_checks(rank, world, *operator_inputs),
        "prune": _prune_checks(rank, world, prune_inputs),
    }


@functools.cache
def spawned(world: int):
    """``(operator inputs, prune inputs, per-rank results)`` of one spawn of ``world`` ranks."""
    operator_inputs = operator_problem(world)
    prune_inputs = prune_shards(world)
    results = run_workers(_worker, world, operator_inputs, prune_inputs, timeout=240)
    return operator_inputs, prune_inputs, results
