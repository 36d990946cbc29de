"""capo_kl_budget: the step is scaled so that its predicted whole-model KL fits the budget."""

import math

import pytest
import torch

pytest.importorskip("trl")

import trl_helpers as th  # noqa: E402

from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402


class _Recorder(CAPOGRPOTrainer):
    """Keeps, at the optimizer step, the parameters and the window before the step and the trial
    step the budget was fitted with."""

    def _capo_fit_budget(self, optimizer, args, kwargs):
        if not self._capo_in_trial and self._capo_budget_window:
            self.rec_before = [p.detach().clone() for p in self._capo_trainable()]
            self.rec_window = list(self._capo_budget_window)
            self.rec_lr = [g["lr"] for g in optimizer.param_groups]
        super()._capo_fit_budget(optimizer, args, kwargs)

    def _capo_trial_step(self, optimizer):
        self.rec_trial = super()._capo_trial_step(optimizer)
        return self.rec_trial


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_the_scaled_step_realizes_the_budget(tmp_path, optim):
    budget = 1e-4
    trainer = th.trainer(
        _Recorder,
        tmp_path,
        model=th.model().double(),
        cfg={"max_steps": 1, "learning_rate": 0.05, "optim": optim},
        capo_kl_budget=budget,
    )
    model = trainer.model
    trainer.train()
    log = trainer.state.log_history[0]
    scale, predicted = log["capo/kl_budget_scale"], log["capo/predicted_whole_kl"]
    assert scale < 0.5 and predicted > 4 * budget  # the budget binds at this lr
    # the real step is the trial step scaled by s (both optimizers' steps are linear in the lr)
    after = [p.detach() for p in trainer._capo_trainable()]
    moved = [a - b for a, b in zip(after, trainer.rec_before)]
    for m, t in zip(moved, trainer.rec_trial):
        assert torch.allclose(m, scale * t, rtol=1e-6, atol=1e-12)
    # the realized whole-model KL of the step is the budget (second order: within 10 %)
    old_model = th.model().double()
    with torch.no_grad():
        for p, b in zip([p for p in old_model.parameters()], trainer.rec_before):
            p.copy_(b)
    kl, n = 0.0, 0
    for mb in trainer.rec_window:
        ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
        att = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
        T = mb["completion_ids"].shape[1]
        valid = mb["completion_mask"].bool()
        with torch.no_grad():
            old = torch.log_softmax(old_model(input_ids=ids, attention_mask=att).logits, -1)
            new = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits, -1)
        per = (old.exp() * (old - new)).sum(-1)[:, -T - 1 : -1]
        kl += float(per[valid].sum())
        n += int(valid.sum())
    realized = kl / n
    assert realized == pytest.approx(budget, rel=0.1)


def test_trial_step_leaves_parameters_and_optimizer_state_alone(tmp_path):
    trainer = th.trainer(
        _Recorder, tmp_path, cfg={"max_steps": 2, "learning_rate": 0.05}, capo_kl_budget=1e3
    )
    trainer.train()
    # a budget that never binds: the steps are the optimizer's own (scale 1), so the state
    # after two steps equals plain training's, which the bit-identity below checks
    assert all(h.get("capo/kl_budget_scale", 1.0) == 1.0 for h in trainer.state.log_history)
    plain = th.trainer(CAPOGRPOTrainer, tmp_path, cfg={"max_steps": 2, "learning_rate": 0.05})
    plain.train()
    for a, b in zip(trainer.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)
    sa, sb = trainer.optimizer.state_dict()["state"], plain.optimizer.state_dict()["state"]
    for k in sb:
        for name in sb[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1e-3, ValueError), (math.nan, ValueError), (0.0, ValueError), (math.inf, ValueError)]
    + [("1e-3", TypeError), (True, TypeError)],
)
def test_bad_budgets_are_refused(tmp_path, value, error):
    with pytest.raises(error, match="capo_kl_budget must be"):
        th.trainer(CAPOGRPOTrainer, tmp_path, capo_kl_budget=value)


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_budget_with_sharded_parameters_is_refused_when_built(tmp_path, monkeypatch, backend):
    """FSDP/DeepSpeed shard the parameters, which forward-mode AD cannot differentiate through;
    the trainer refuses the budget when built (the flags are set as accelerate would)."""
    from transformers import Trainer

    create = Trainer.create_accelerator_and_postprocess

    def sharded(self):
        create(self)
        setattr(self, f"is_{backend}_enabled", True)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", sharded)
    with pytest.raises(ValueError, match=f"capo_kl_budget does not support {backend}"):
        th.trainer(CAPOGRPOTrainer, tmp_path, capo_kl_budget=1e-3)
