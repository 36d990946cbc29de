"""CAPOGRPOTrainer on peft (LoRA) models.

LoRA on the body with the full head trained (``modules_to_save=['lm_head']``) is supported:
CAPO models the trained copy of the head exactly as it models a plain head. A frozen head (LoRA
on the body only) is refused when the trainer is built; TRL itself refuses LoRA on ``lm_head``.
"""

import math

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import trl_helpers as th  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402

INF = {"capo_tau_h": math.inf, "capo_tau_f": math.inf}


def _lora(**kw):
    return peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn"], **kw)


def _peft_model(**kw):
    torch.manual_seed(0)  # LoRA's A factors are random
    return peft.get_peft_model(th.model(), _lora(**kw))


def _no_generation(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("generated before refusing")

    monkeypatch.setattr(CAPOGRPOTrainer, "_generate_and_score_completions", boom)


def test_lora_body_trained_head_equals_trl_bit_for_bit_with_infinite_thresholds(tmp_path):
    cfg = {"max_steps": 1, "loss_type": "grpo"}
    ref = th.trainer(GRPOTrainer, tmp_path, model=_peft_model(modules_to_save=["lm_head"]), cfg=cfg)
    ref.train()
    capo = th.trainer(
        CAPOGRPOTrainer,
        tmp_path,
        model=_peft_model(modules_to_save=["lm_head"]),
        cfg=cfg,
        capo_predict_step=True,
        **INF,
    )
    copies = capo.model.get_output_embeddings().modules_to_save
    assert capo.capo_head is copies["default"]
    capo.train()
    log = capo.state.log_history[0]
    assert log["loss"] == ref.state.log_history[0]["loss"]
    assert log["capo/predicted_step_kl"] > 0
    trained = 0
    for (name, a), b in zip(ref.model.named_parameters(), capo.model.parameters()):
        assert torch.equal(a, b), name
        trained += a.requires_grad
    assert trained > 2
    untouched = _peft_model(modules_to_save=["lm_head"])
    assert not torch.equal(
        untouched.get_output_embeddings().weight, capo.model.get_output_embeddings().weight
    )


@pytest.mark.parametrize("scope", ["policy_gradient", "all"])
def test_lora_mask_gates_the_trained_heads_tokens(tmp_path, scope):
    """A tau_f between the predictions rejects some tokens; at ratio 1 the gradient of the loss in
    the per-token log-probabilities is -w_t A_t, zero on the rejected tokens."""
    captured = {}

    class Probe(CAPOGRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if out[0].requires_grad:
                out[0].retain_grad()
                captured["logps"] = out[0]
            return out

    trainer = th.trainer(
        Probe,
        tmp_path,
        model=_peft_model(modules_to_save=["lm_head"]),
        cfg={"loss_type": "grpo"},
        capo_predict_step=True,
        capo_mask_scope=scope,
        **INF,
    )
    torch.manual_seed(1)
    inputs = th.batch(trainer)
    trainer.compute_loss(trainer.model, inputs)
    seen = trainer._capo_window.pop()
    head = trainer.capo_head
    _, dkl = trainer.capo_masker.predict(
        head.weight,
        seen["hidden"],
        inputs["completion_ids"],
        inputs["advantages"],
        trainer._capo_lr(),
        head.bias,
        mask=seen["valid"],
    )
    informative = seen["valid"] & (inputs["advantages"][:, None] != 0)
    assert bool((dkl[informative] > 0).all())  # the trained head does move the policy
    trainer.capo_masker.tau_f = float(dkl[informative].median())
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, inputs).backward()
    keep = trainer._capo_window[-1]["keep"]
    assert 0 < int(keep.sum()) < int(informative.sum())
    g = captured["logps"].grad
    w = trainer._capo_window[-1]["weights"]
    assert torch.allclose(g, -w * inputs["advantages"][:, None], rtol=1e-5, atol=1e-9)
    assert torch.all(g[~keep] == 0)


def test_frozen_head_is_refused_when_built(tmp_path, monkeypatch):
    _no_generation(monkeypatch)
    with pytest.raises(ValueError, match="modules_to_save=\\['lm_head'\\]"):
        th.trainer(CAPOGRPOTrainer, tmp_path, model=_peft_model(), capo_tau_f=1e-4)
    # the same through TRL's peft_config= (TRL wraps the model)
    with pytest.raises(ValueError, match="output layer is frozen"):
        th.trainer(CAPOGRPOTrainer, tmp_path, peft_config=_lora(), capo_tau_f=1e-4)


def test_lora_on_the_head_is_refused_when_built(tmp_path, monkeypatch):
    _no_generation(monkeypatch)
    model = peft.get_peft_model(
        th.model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "lm_head"])
    )
    with pytest.raises(ValueError, match="lm_head"):
        th.trainer(CAPOGRPOTrainer, tmp_path, model=model, capo_tau_f=1e-4)
