"""MFAC checkpoints through torch.distributed.checkpoint: save at 2 ranks, load at 3, continue."""

import os
import warnings

import torch
from dist_runs import LOAD_WORLD, SAVE_WORLD, results
from test_dist_mfac_optimizer import BATCH, full, make_data, make_model, make_opt, train

from curvopt import distributed as D

HALF = 6
FROZEN = 4  # "*_frozen": the last parameter gets no gradient in the first FROZEN steps
_SHARDED_TENSOR_NOTICE = "Please use DTensor instead and we are deprecating ShardedTensor"


GRAFTS = (None, "adam")
#: mode -> the grafts it is saved with. "*_frozen": the last parameter (the output bias) has no
#: gradient in the first FROZEN steps, so its Adam graft counts HALF - FROZEN steps and the
#: other parameters HALF: the per-parameter state differs between parameters.
MODES = {
    "zero1": GRAFTS,
    "fsdp": GRAFTS,
    "zero1_factored": (None,),
    "fsdp_skip": (None,),
    "zero1_frozen": ("adam",),
    "fsdp_frozen": ("adam",),
}


def _build(mode, world, graft=None):
    if mode.endswith("_skip"):
        net, model, _ = _build(mode.removesuffix("_skip"), world)
        kw = {} if mode.startswith("fsdp") else {"process_group": torch.distributed.group.WORLD}
        return net, model, make_opt(model, nonfinite="skip", graft=graft, **kw)
    mode = mode.removesuffix("_factored").removesuffix("_frozen")
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


def counters(opt):
    """What a resumed MFAC must restore exactly (a shifted refresh schedule hides in trajectories
    compared at a tolerance)."""
    w = opt.window
    return {
        "count": w.count,
        "since_refresh": w._since_refresh,
        "factored": w.factored,
        "skipped": int(opt.skipped_steps),
        "nonfinite_count": int(w.nonfinite_count),
    }


def train_frozen(net, model, opt, X, Y, steps, frozen):
    """``train``, but the last parameter has no gradient (``grad = None``) in the first
    ``frozen`` steps; the parameters after each step."""
    history, last = [], list(model.parameters())[-1]
    for k in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(X), Y).backward()
        if k < frozen:
            last.grad = None
        opt.step()
        history.append([full(p).clone() for p in model.parameters()])
    return history


def per_param_state(opt):
    """Per parameter: the graft's step count and the full (all ranks') ``exp_avg_sq`` and
    momentum buffer, float64, in window order (collective: every rank gets the same)."""
    shards, out = opt._shards, []
    for i, p in enumerate(shards.params):
        st = opt.state.get(p, {})
        off, n = shards.ranges[i]
        entry = {"step": float(st["step"]) if "step" in st else None}
        for name in ("exp_avg_sq", "momentum_buffer"):
            whole = torch.zeros(p.numel(), dtype=torch.float64)
            if name in st:  # each coordinate is held by exactly one rank: the sum is exact
                whole[off : off + n] = st[name].reshape(-1).to(torch.float64)
            entry[name] = D.all_reduce_sum_(whole, shards.group)
        out.append(entry)
    return out


def _special(mode, net, model, opt, X, Y, rank):
    """The extra checkpoints: a factored window ("*_factored"), a skipped step ("*_skip"), a
    parameter without a gradient in the first steps ("*_frozen")."""
    from curvopt.mfac import window as window_module

    if mode.endswith("_frozen"):
        train_frozen(net, model, opt, X, Y, HALF, FROZEN)
    elif mode.endswith("_factored"):  # every refresh check now switches to factored mode
        limit = window_module.EXPLICIT_INVERSE_LIMIT
        window_module.EXPLICIT_INVERSE_LIMIT = -1.0
        try:
            train(net, opt, X, Y, HALF)
        finally:
            window_module.EXPLICIT_INVERSE_LIMIT = limit
        assert opt.window.factored
    else:
        train(net, opt, X, Y, HALF - 1)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(X), Y).backward()
        if rank == 0:  # a NaN on one rank: every rank skips the step
            p = next(model.parameters())
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grad.view(-1)[0] = float("nan")
        opt.step()
        assert int(opt.skipped_steps) == 1


def _save(rank, world, path):
    import torch.distributed.checkpoint as dcp

    X, Y = _shard(rank, world)
    saved = {}
    for mode, grafts in MODES.items():
        for graft in grafts:
            key = f"{mode}-{graft}"
            net, model, opt = _build(mode, world, graft)
            if mode in ("zero1", "fsdp"):
                train(net, opt, X, Y, HALF)
            else:
                _special(mode, net, model, opt, X, Y, rank)
            saved[key] = counters(opt)
            if mode.endswith("_frozen"):
                saved[key + "_state"] = per_param_state(opt)
            sd = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
            dcp.save(sd, checkpoint_id=os.path.join(path, key))
    return saved


def _load_and_continue(rank, world, path):
    import torch.distributed.checkpoint as dcp

    X, Y = _shard(rank, world)
    out = {"future_warnings": []}
    for mode, grafts in MODES.items():
        for graft in grafts:
            key = f"{mode}-{graft}"
            net, model, opt = _build(mode, world, graft)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # what a user would see, every time
                sd = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
                dcp.load(sd, checkpoint_id=os.path.join(path, key))
                # the filter is DCP's notice only: the same text from elsewhere still shows
                warnings.warn(_SHARDED_TENSOR_NOTICE + " (control)", FutureWarning, stacklevel=1)
            out["future_warnings"] += [
                str(w.message) for w in caught if issubclass(w.category, FutureWarning)
            ]
            model.load_state_dict(sd["model"])
            opt.load_sharded_state_dict(sd["optim"])
            out[key + "_restored"] = counters(opt)
            if mode.endswith("_frozen"):
                out[key + "_state_restored"] = per_param_state(opt)
            if mode in ("zero1", "fsdp") or mode.endswith("_frozen"):
                out[key] = train(net, opt, X, Y, HALF)
                out[key + "_count"] = opt.window.count
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


def test_dcp_restores_per_parameter_graft_state_exactly():
    """A parameter without a gradient in the first steps: its graft step count (and Adam's
    second moment) differ from the other parameters'; each is restored as saved, bit for bit,
    at another world size, and the run continues as the one-process run does."""
    saved = [r["checkpoint_saved"] for r in results(SAVE_WORLD)]
    loaded = [r["checkpoint"] for r in results(LOAD_WORLD)]
    X, Y = make_data()
    model = make_model()
    opt = make_opt(model, graft="adam")
    reference = train_frozen(model, model, opt, X, Y, HALF, FROZEN)
    reference += train(model, opt, X, Y, HALF)
    for mode in ("zero1_frozen", "fsdp_frozen"):
        key = f"{mode}-adam"
        want = saved[0][key + "_state"]
        assert [e["step"] for e in want] == [HALF] * 3 + [HALF - FROZEN]  # they differ
        for res in saved[1:] + loaded:
            got = res.get(key + "_state", res.get(key + "_state_restored"))
            assert [e["step"] for e in got] == [e["step"] for e in want], key
            for g, w in zip(got, want):
                for name in ("exp_avg_sq", "momentum_buffer"):
                    assert torch.equal(g[name], w[name]), (key, name)
        for res in loaded:
            assert res[key + "_count"] == 2 * HALF
            for step, ref in zip(res[key], reference[HALF:]):
                for a, b in zip(step, ref):
                    rel = float((a - b).abs().max() / b.abs().max())
                    assert rel <= 1e-9, (key, rel)


def test_dcp_restores_counters_and_flags_exactly():
    """count, the refresh phase, factored mode and the skipped steps: equal, not close."""
    saved = [r["checkpoint_saved"] for r in results(SAVE_WORLD)]
    loaded = [r["checkpoint"] for r in results(LOAD_WORLD)]
    want = {k: v for k, v in saved[0].items() if not k.endswith("_state")}  # counters only
    assert all({k: s[k] for k in want} == want for s in saved)
    assert want["zero1-None"]["since_refresh"] == HALF % 4 != 0  # m = 4: between refreshes
    assert want["zero1_factored-None"]["factored"] and want["fsdp_skip-None"]["skipped"] == 1
    for res in loaded:
        assert set(res) >= {key + "_restored" for key in want}
        for key in want:
            assert res[key + "_restored"] == want[key], key


def test_dcp_load_of_a_sharded_state_dict_prints_no_sharded_tensor_deprecation():
    """DCP warns about ShardedTensor (16 times a load) when a state dict holds them; DTensor
    cannot express M-FAC's column splits, so curvopt filters exactly that notice from DCP."""
    for res in (r["checkpoint"] for r in results(LOAD_WORLD)):
        loads = sum(len(grafts) for grafts in MODES.values())
        want = [_SHARDED_TENSOR_NOTICE + " (control)"] * loads  # one per load
        assert res["future_warnings"] == want


def test_sharded_state_dict_needs_a_sharded_optimizer():
    import pytest

    model = make_model()
    with pytest.raises(ValueError, match="use state_dict"):
        make_opt(model).sharded_state_dict()
