"""CAPOGRPOTrainer's penalty variants against trl.GRPOTrainer on a tiny random GPT-2 (CPU)."""

import math

import pytest
import torch

pytest.importorskip("trl")

import trl_helpers as th  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from curvopt.capo.penalty import CAPOPenalty  # noqa: E402
from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402

INF = {"capo_tau_h": math.inf, "capo_tau_f": math.inf}


def test_zero_coefficient_equals_trl_and_a_positive_one_trains_differently(tmp_path):
    cfg = {"loss_type": "grpo", "max_steps": 2}
    ref = th.trainer(GRPOTrainer, tmp_path, cfg=cfg)
    ref.train()
    zero = th.trainer(
        CAPOGRPOTrainer, tmp_path, cfg=cfg, capo_penalty="delta_kl", capo_penalty_coef=0.0, **INF
    )
    zero.train()
    for a, b in zip(ref.state.log_history[:2], zero.state.log_history[:2]):
        assert a["loss"] == b["loss"]
    assert "capo/penalty" not in zero.state.log_history[0]
    for (name, a), b in zip(ref.model.named_parameters(), zero.model.parameters()):
        assert torch.equal(a, b), name
    # the penalty on (a TRL run): logged, positive, and the trained model differs from TRL's
    on = th.trainer(
        CAPOGRPOTrainer, tmp_path, cfg=cfg, capo_penalty="delta_kl", capo_penalty_coef=1e4, **INF
    )
    on.train()
    logs = on.state.log_history[:2]
    assert all(log["capo/penalty"] > 0 for log in logs)
    assert all(math.isfinite(log["loss"]) for log in logs)
    assert any(not torch.equal(a, b) for a, b in zip(ref.model.parameters(), on.model.parameters()))


def _loss_and_grads(loss, params):
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("kind", ["delta_kl", "delta_j"])
def test_penalty_is_added_to_trls_loss_with_its_gradient(tmp_path, loss_type, kind):
    """CAPO's loss minus TRL's loss is the penalty of the predictions (no grad), and its gradient
    is that of the penalty rebuilt here from an own forward pass of the backbone."""
    lam = 5.0
    trainer = th.trainer(
        CAPOGRPOTrainer,
        tmp_path,
        model=th.model().double(),  # float64: the difference of two losses' gradients is exact
        cfg={"loss_type": loss_type, "temperature": 0.7},
        capo_penalty=kind,
        capo_penalty_coef=lam,
        **INF,
    )
    torch.manual_seed(0)
    inputs = th.batch(trainer)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    loss, grads = _loss_and_grads(trainer.compute_loss(model, inputs), params)
    seen = trainer._capo_window[-1]
    pen = trainer._metrics["train"]["capo/penalty"][-1]
    ref, ref_grads = _loss_and_grads(GRPOTrainer._compute_loss(trainer, model, inputs), params)
    assert float(loss - ref) == pytest.approx(pen, rel=1e-9)
    head = trainer.capo_head
    dj, dkl = th.predicted(trainer, seen, inputs, temperature=0.7)
    q = dkl if kind == "delta_kl" else dj
    assert pen == pytest.approx(lam * float((seen["weights"] * q).sum()), rel=1e-6)
    assert pen != 0
    # the penalty's gradient, from hidden states of an own forward of the backbone
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    h = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1][:, -T:]
    own = CAPOPenalty(kind, lam)(
        trainer.capo_masker,
        head.weight,
        h,
        inputs["completion_ids"],
        inputs["advantages"],
        trainer._capo_lr(),
        seen["weights"],
        head.bias,
        temperature=0.7,
    )
    own_grads = torch.autograd.grad(own, params, allow_unused=True)
    moved = 0
    for g, r, o in zip(grads, ref_grads, own_grads):
        if o is None:
            assert g is None or torch.equal(g, r)
            continue
        moved += 1
        assert torch.allclose(g - r, o, rtol=1e-6, atol=1e-9 * float(o.abs().max()))
    assert moved == len(params)  # through h_t the penalty reaches every parameter


@pytest.mark.parametrize("scope", [None, "policy_gradient", "all"])
@pytest.mark.parametrize("loss_type", CAPOGRPOTrainer.SUPPORTED_LOSS_TYPES)
def test_token_weights_are_trls(tmp_path, loss_type, scope):
    """The weights the penalty (and the step prediction) average with: at ratio 1 the gradient of
    TRL's loss in the per-token log-probabilities is -w_t A_t (steps_per_generation = 2 makes
    dapo/cispo's normalizer differ from the accumulation window). ``scope``: a finite threshold
    rejecting about half of the informative tokens, the mask gating that scope (None: no mask).

    Three micro-batches per step (every loss type divides by the accumulation), and completions
    cut to 4 of the 6 allowed tokens (dr_grpo divides by ``max_completion_length``, not by the
    padded length)."""
    captured = {}

    class Probe(CAPOGRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if out[0].requires_grad:
                out[0].retain_grad()
                captured["logps"] = out[0]
            return out

    cfg = {"loss_type": loss_type, "steps_per_generation": 2}
    extra = {"capo_mask_scope": scope} if scope else {}
    trainer = th.trainer(Probe, tmp_path, cfg=cfg, capo_predict_step=True, **INF, **extra)
    torch.manual_seed(1)
    inputs = th.batch(trainer)
    trainer.current_gradient_accumulation_steps = 3
    short = 4  # as if no completion of this micro-batch were longer: TRL pads to the longest
    assert trainer.max_completion_length == inputs["completion_ids"].shape[1] > short
    for key in ("completion_ids", "completion_mask", "old_per_token_logps"):
        if inputs.get(key) is not None:
            inputs[key] = inputs[key][:, :short]
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    if scope:
        trainer.compute_loss(trainer.model, inputs)
        seen = trainer._capo_window.pop()
        _, dkl = th.predicted(trainer, seen, inputs)
        trainer.capo_masker.tau_f = float(dkl[th.informative(seen, inputs)].median())
        trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, inputs).backward()
    keep = trainer._capo_window[-1]["keep"]
    if scope:
        assert 0 < int(keep.sum()) < int(inputs["completion_mask"].sum())
    w = trainer._capo_window[-1]["weights"]
    adv = inputs["advantages"][:, None]
    g = captured["logps"].grad
    assert bool((adv != 0).any())
    assert torch.allclose(g, -w * adv, rtol=1e-5, atol=1e-9)


def test_bad_penalty_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="penalty must be one of"):
        th.trainer(CAPOGRPOTrainer, tmp_path, capo_penalty="kl", capo_penalty_coef=1.0)
    with pytest.raises(ValueError, match="penalty_coef must be a finite number >= 0"):
        th.trainer(CAPOGRPOTrainer, tmp_path, capo_penalty="delta_j", capo_penalty_coef=-1.0)
