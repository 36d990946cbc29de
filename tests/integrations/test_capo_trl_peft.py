"""CAPOGRPOTrainer on peft (LoRA) models.

LoRA on the body with the full head trained (``modules_to_save=['lm_head']``) is supported:
CAPO models the trained copy of the head exactly as it models a plain head. With a frozen head
(LoRA on the body only) the KL budget (whole-model JVP) works and the per-token rule is refused
when the trainer is built. TRL 1.16 refuses LoRA on ``lm_head``; CAPOGRPOTrainer says so first
(CAPO models such a head in curvopt's own loop: tests/capo/test_capo_lora_head.py).
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
    _, dkl = th.predicted(trainer, seen, inputs)
    informative = th.informative(seen, inputs)
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


def test_frozen_head_refuses_the_per_token_rule_when_built(tmp_path, monkeypatch):
    _no_generation(monkeypatch)
    for kw in ({"capo_tau_f": 1e-4}, {"capo_penalty": "delta_kl", "capo_penalty_coef": 1.0}):
        with pytest.raises(ValueError, match="modules_to_save=\\['lm_head'\\]"):
            th.trainer(CAPOGRPOTrainer, tmp_path, model=_peft_model(), **kw)
    # the same through TRL's peft_config= (TRL wraps the model)
    with pytest.raises(ValueError, match="is frozen.*capo_predict_step=True"):
        th.trainer(CAPOGRPOTrainer, tmp_path, peft_config=_lora(), capo_predict_step=True)


class _BudgetRecorder(CAPOGRPOTrainer):
    """Keeps the window's log-probabilities before the step and the step's scale."""

    def _capo_fit_budget(self, optimizer, args, kwargs):
        if not self._capo_in_trial and self._capo_budget_window:
            self.rec_window = list(self._capo_budget_window)
            self.rec_old = _window_logps(self.model, self.rec_window)
        super()._capo_fit_budget(optimizer, args, kwargs)


def _window_logps(model, window):
    out = []
    with torch.no_grad():
        for mb in window:
            ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
            att = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
            T = mb["completion_ids"].shape[1]
            logits = model(input_ids=ids, attention_mask=att).logits[:, -T - 1 : -1]
            out.append(torch.log_softmax(logits, -1))
    return out


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_frozen_head_with_kl_budget_realizes_the_budget(tmp_path, optim):
    """LoRA on the body, the head frozen: the whole-model JVP predictor scales the step."""
    budget = 1e-5
    torch.manual_seed(0)
    model = peft.get_peft_model(th.model().double(), _lora())
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter (peft starts B at 0)
            torch.nn.init.normal_(p, std=0.1)
    assert not model.get_output_embeddings().weight.requires_grad
    trainer = th.trainer(
        _BudgetRecorder,
        tmp_path,
        model=model,
        cfg={
            "max_steps": 1,
            "learning_rate": 0.05 if optim == "adamw_torch" else 5.0,
            "optim": optim,
        },
        capo_kl_budget=budget,
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["capo/kl_budget_scale"] < 0.5  # the budget binds at this lr
    assert "capo/rejected_fraction" in log and log["capo/rejected_fraction"] == 0.0
    new = _window_logps(trainer.model, trainer.rec_window)
    kl, n = 0.0, 0
    for mb, old, nw in zip(trainer.rec_window, trainer.rec_old, new):
        valid = mb["completion_mask"].bool()
        per = (old.exp() * (old - nw)).sum(-1)
        kl += float(per[valid].sum())
        n += int(valid.sum())
    assert kl / n == pytest.approx(budget, rel=0.1)


def test_lora_on_the_head_is_refused_when_built_naming_trl(tmp_path, monkeypatch):
    _no_generation(monkeypatch)
    lora_head = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "lm_head"])
    with pytest.raises(ValueError, match="cannot be trained by TRL.*CAPOLoss"):
        th.trainer(CAPOGRPOTrainer, tmp_path, model=peft.get_peft_model(th.model(), lora_head))
    for target in (["c_attn", "lm_head"], "lm_head", ".*head"):
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=target)
        with pytest.raises(ValueError, match="cannot be trained by TRL"):
            th.trainer(CAPOGRPOTrainer, tmp_path, peft_config=cfg, capo_tau_f=1e-4)
