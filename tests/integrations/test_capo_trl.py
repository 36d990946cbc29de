"""CAPOGRPOTrainer against trl.GRPOTrainer on a tiny random GPT-2 (CPU, a few seconds each)."""

import math

import pytest
import torch

pytest.importorskip("trl")

import trl_helpers as th  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402

_trainer = th.trainer


@pytest.mark.parametrize("loss_type", CAPOGRPOTrainer.SUPPORTED_LOSS_TYPES)
def test_infinite_thresholds_equal_trl_bit_for_bit(tmp_path, loss_type):
    cfg = {"loss_type": loss_type, "max_steps": 1}
    ref = _trainer(GRPOTrainer, tmp_path, cfg=cfg)
    ref.train()
    capo = _trainer(CAPOGRPOTrainer, tmp_path, cfg=cfg, capo_tau_h=math.inf, capo_tau_f=math.inf)
    capo.train()
    assert capo.state.log_history[0]["loss"] == ref.state.log_history[0]["loss"]
    assert capo.state.log_history[0]["capo/rejected_fraction"] == 0.0
    for (name, a), b in zip(ref.model.named_parameters(), capo.model.parameters()):
        assert torch.equal(a, b), name
    # the step did move the model (the comparison is not between two untouched models)
    assert any(
        not torch.equal(a, b) for a, b in zip(th.model().parameters(), ref.model.parameters())
    )


class _LogpsProbe(CAPOGRPOTrainer):
    """Keeps the per-token log-probabilities of the loss's forward, to read their gradient."""

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if out[0].requires_grad:
            out[0].retain_grad()
            self.probe_logps = out[0]
        return out


_batch = th.batch


def test_masked_tokens_get_zero_gradient_and_the_loss_is_trls_on_the_kept_tokens(tmp_path):
    trainer = _trainer(
        _LogpsProbe,
        tmp_path,
        cfg={"loss_type": "grpo"},
        capo_mask_scope="all",
        capo_predict_step=True,
    )
    torch.manual_seed(0)
    inputs = _batch(trainer)
    valid = inputs["completion_mask"].bool()
    # thresholds between the observed predictions, so both rules reject some tokens
    trainer.compute_loss(trainer.model, inputs)
    seen = trainer._capo_window.pop()
    dj, dkl = th.predicted(trainer, seen, inputs, mask=valid)
    informative = valid & (inputs["advantages"][:, None] != 0)
    trainer.capo_masker.tau_f = float(dkl[informative].quantile(0.7))
    trainer.capo_masker.tau_h = float(dj[informative].abs().quantile(0.8))
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    keep = trainer._capo_window[-1]["keep"]
    assert 0 < int(keep.sum()) < int(informative.sum())
    assert torch.equal(inputs["completion_mask"].bool(), valid)  # TRL's batch is left unchanged
    loss.backward()
    g = trainer.probe_logps.grad
    assert torch.all(g[~keep] == 0)
    assert torch.all(g[keep & informative] != 0)
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    # TRL's own loss, with the kept tokens passed through its tool mask, is the same loss
    trainer.model.zero_grad()
    ref = GRPOTrainer._compute_loss(trainer, trainer.model, {**inputs, "tool_mask": keep.long()})
    ref.backward()
    assert torch.equal(loss, ref)
    for a, p in zip(grads, trainer.model.parameters()):
        assert torch.equal(a, p.grad)
    metrics = trainer._metrics["train"]
    want = 1 - float(keep.sum()) / float(valid.sum())
    assert metrics["capo/rejected_fraction"][-1] == pytest.approx(want)
    assert metrics["capo/mean_delta_kl_kept"][-1] < metrics["capo/mean_delta_kl_all"][-1]


class _RealizedHeadKL(TrainerCallback):
    """At each optimizer step: the realized KL of the head's update on the step's own hidden
    states (float64, full vocabulary) and the realized change of the loss's surrogate."""

    def __init__(self, trainer):
        self.trainer, self.rows, self.hooked = trainer, [], False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.hooked:
            return
        opt = self.trainer.capo_masker.direction.optimizer
        opt.register_step_pre_hook(self._before)
        opt.register_step_post_hook(self._after)
        self.hooked = True

    def _head(self):
        head = self.trainer.capo_head
        w = head.weight.detach().double()
        return w if head.bias is None else torch.cat([w, head.bias.detach().double()[:, None]], 1)

    def _before(self, opt, args, kwargs):
        self.before = self._head().clone()

    @torch.no_grad()
    def _after(self, opt, args, kwargs):
        last = self.trainer.capo_last_step
        after = self._head()
        kl = n = dj = 0.0
        for mb in last["batches"]:
            h = mb["hidden"].double()
            if after.shape[1] > h.shape[-1]:
                h = torch.cat([h, torch.ones_like(h[..., :1])], -1)
            h = h / self.trainer.temperature
            lp0 = torch.log_softmax(h @ self.before.T, -1)
            lp1 = torch.log_softmax(h @ after.T, -1)
            per_tok = (lp0.exp() * (lp0 - lp1)).sum(-1)
            kl += float(per_tok[mb["valid"]].sum())
            n += int(mb["valid"].sum())
            a = mb["actions"][..., None]
            ratio = torch.exp(lp1.gather(-1, a) - lp0.gather(-1, a)).squeeze(-1)
            adv = mb["advantages"].double()
            adv = adv[:, None] if adv.ndim == 1 else adv
            dj += float((mb["weights"].double() * adv * (ratio - 1)).sum())
        self.rows.append((float(last["kl"]), kl / n, float(last["delta_j"]), dj))


SETTINGS = [
    ("sgd", torch.optim.SGD, {"lr": 0.01}),
    (
        "sgd-momentum-nesterov-wd",
        torch.optim.SGD,
        {"lr": 0.005, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    ("sgd-momentum-dampening", torch.optim.SGD, {"lr": 0.02, "momentum": 0.8, "dampening": 0.5}),
    ("adam-coupled-wd", torch.optim.Adam, {"lr": 1e-3, "weight_decay": 0.1}),
    ("adamw", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1}),
    ("adamw-amsgrad", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1, "amsgrad": True}),
]


@pytest.mark.parametrize("name,cls,kw", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_predicted_step_kl_tracks_the_realized_head_kl(tmp_path, name, cls, kw):
    """Every supported optimizer setting over 5 steps: predicted / realized KL of the head's
    update within 2 % (and the batch surrogate's predicted change within 0.1 %)."""
    model = th.model(tied=name != "adamw")
    opt = cls(model.parameters(), **kw)
    cfg = {"max_steps": 5, "lr_scheduler_type": "constant", "loss_type": "grpo"}
    trainer = _trainer(
        CAPOGRPOTrainer,
        tmp_path,
        model=model,
        optimizers=(opt, None),
        cfg=cfg,
        capo_predict_step=True,
    )
    probe = _RealizedHeadKL(trainer)
    trainer.add_callback(probe)
    trainer.train()
    assert len(probe.rows) == 5
    used = 0
    for pred_kl, real_kl, pred_j, real_j in probe.rows:
        if real_kl == 0:
            continue
        used += 1
        assert pred_kl == pytest.approx(real_kl, rel=2e-2)
        assert pred_j == pytest.approx(real_j, rel=1e-3)
    assert used >= 3


@pytest.mark.parametrize("accumulation", [1, 2])
def test_default_optimizer_small_lr_within_one_percent(tmp_path, accumulation):
    """TRL's own AdamW (from GRPOConfig) at a small lr: predicted vs realized step KL within 1 %,
    also when a step accumulates two micro-batches (both enter the step's prediction)."""
    cfg = {"max_steps": 2, "learning_rate": 1e-4, "lr_scheduler_type": "constant"}
    cfg["gradient_accumulation_steps"] = accumulation
    trainer = _trainer(CAPOGRPOTrainer, tmp_path, cfg=cfg, capo_predict_step=True)
    probe = _RealizedHeadKL(trainer)
    trainer.add_callback(probe)
    trainer.train()
    assert type(trainer.capo_masker.direction.optimizer) is torch.optim.AdamW
    assert len(trainer.capo_last_step["batches"]) == accumulation
    checked = [r for r in probe.rows if r[1] > 0]
    assert checked
    for pred_kl, real_kl, *_ in checked:
        assert pred_kl == pytest.approx(real_kl, rel=1e-2)
    keys = trainer.state.log_history[0]
    for k in ("capo/rejected_fraction", "capo/predicted_step_kl", "capo/predicted_delta_j"):
        assert k in keys


def test_unsupported_settings_are_refused(tmp_path):
    model = th.model()
    for cls in (torch.optim.RMSprop, torch.optim.NAdam, torch.optim.Adagrad):
        with pytest.raises(TypeError, match="supported optimizers are torch.optim.SGD"):
            _trainer(
                CAPOGRPOTrainer, tmp_path, model=model, optimizers=(cls(model.parameters()), None)
            )
    trainer = _trainer(CAPOGRPOTrainer, tmp_path, cfg={"optim": "adafactor"})
    with pytest.raises(TypeError, match="Adafactor"):
        trainer.train()
    for cfg in (
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        {"loss_type": "vespo"},
    ):
        with pytest.raises(ValueError, match="token-level loss types"):
            _trainer(CAPOGRPOTrainer, tmp_path, cfg=cfg)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        _trainer(
            CAPOGRPOTrainer,
            tmp_path,
            cfg={"importance_sampling_level": "sequence", "loss_type": "grpo"},
        )
    with pytest.raises(ValueError, match="tau_f"):
        _trainer(CAPOGRPOTrainer, tmp_path, capo_tau_f=-1.0)
    with pytest.raises(ValueError, match="level"):
        _trainer(CAPOGRPOTrainer, tmp_path, capo_level="batch")


def test_sequence_level_mask_keeps_or_drops_whole_completions(tmp_path):
    trainer = _trainer(
        CAPOGRPOTrainer,
        tmp_path,
        cfg={"loss_type": "grpo"},
        capo_level="sequence",
        capo_predict_step=True,
    )
    torch.manual_seed(1)
    inputs = _batch(trainer)
    valid = inputs["completion_mask"].bool()
    trainer.compute_loss(trainer.model, inputs)
    dkl = trainer._capo_window.pop()
    seq_dj, seq_dkl = trainer.capo_masker.predict_groups(
        trainer.capo_head.weight,
        dkl["hidden"],
        inputs["completion_ids"],
        inputs["advantages"],
        trainer._capo_lr(),
        mask=valid,
    )
    trainer.capo_masker.tau_f = float(seq_dkl.median())
    trainer.compute_loss(trainer.model, inputs)
    keep = trainer._capo_window[-1]["keep"]
    assert torch.equal(keep, (seq_dkl < trainer.capo_masker.tau_f)[:, None] & valid)
    assert 0 < int(keep.any(1).sum()) < keep.shape[0]
