"""CAPO's mask scope: by default it gates only the policy-gradient term of TRL's loss.

The reference is TRL's loss rebuilt here from TRL's own per-token pieces (its log-probabilities
and entropies, the reference log-probabilities, its documented formulas per loss type), in
float64, with the CAPO mask multiplied into the advantage term only.
"""

import math

import pytest
import torch

pytest.importorskip("trl")

import trl_helpers as th  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402

INF = {"capo_tau_h": math.inf, "capo_tau_f": math.inf}
BETA, ENT = 0.3, 0.05


def _setup(tmp_path, loss_type, scope, seed=0):
    """A float64 trainer with beta > 0 and an entropy bonus, one batch, and a tau_f rejecting
    about half of the informative tokens."""
    cfg = {"loss_type": loss_type, "entropy_coef": ENT, "steps_per_generation": 2}
    trainer = th.trainer(
        CAPOGRPOTrainer,
        tmp_path,
        model=th.model().double(),
        cfg=cfg,
        capo_mask_scope=scope,
        capo_predict_step=True,
        **INF,
    )
    torch.manual_seed(seed)
    inputs = th.batch(trainer)
    # beta > 0 without a second model to load: TRL reads self.beta and the batch's reference
    # log-probabilities, here the policy's own moved a little
    trainer.beta = BETA
    with torch.no_grad():
        logps = _trl_pieces(trainer, inputs)[0]
    g = torch.Generator().manual_seed(seed)
    noise = 0.2 * torch.randn(logps.shape, generator=g, dtype=logps.dtype)
    inputs["ref_per_token_logps"] = (logps + noise).detach()
    trainer.compute_loss(trainer.model, inputs)
    seen = trainer._capo_window.pop()
    _, dkl = th.predicted(trainer, seen, inputs)
    trainer.capo_masker.tau_f = float(dkl[th.informative(seen, inputs)].median())
    return trainer, inputs


def _trl_pieces(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    out = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, ids, att, T, compute_entropy=True
    )
    return out[0], out[1]


def _reference_loss(trainer, inputs, keep, pg_mask_only=True):
    """TRL's loss from its pieces, ``keep`` gating the advantage term only (or everything)."""
    logps, entropies = _trl_pieces(trainer, inputs)
    m = inputs["completion_mask"].to(logps.dtype)
    k = keep.to(logps.dtype)
    if not pg_mask_only:
        m = m * k
    A = inputs["advantages"][:, None].to(logps.dtype)
    r = torch.exp(logps - logps.detach())
    lt = trainer.loss_type
    el, eh = trainer.epsilon_low, trainer.epsilon_high
    if lt == "cispo":
        pg = -torch.clamp(r, max=eh).detach() * A * logps
    elif lt == "sapo":
        args = trainer.args
        tau = torch.where(A > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
        pg = -torch.sigmoid(tau * (r - 1)) * 4 / tau * A
    else:
        pg = -torch.min(r * A, torch.clamp(r, 1 - el, 1 + eh) * A)
    d = inputs["ref_per_token_logps"] - logps
    kl = torch.exp(d) - d - 1
    if trainer.args.use_bias_correction_kl:
        kl = kl * r
    per = k * pg + trainer.beta * kl
    if lt in ("grpo", "sapo"):
        loss = ((per * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif lt == "bnpo":
        loss = (per * m).sum() / m.sum().clamp(min=1)
    elif lt == "dr_grpo":
        loss = (per * m).sum() / (per.shape[0] * trainer.max_completion_length)
    else:
        norm = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.args.steps_per_generation
        loss = (per * m).sum() / norm
    return loss - ENT * (entropies * m).sum() / m.sum().clamp(min=1), entropies, kl, m


@pytest.mark.parametrize("loss_type", CAPOGRPOTrainer.SUPPORTED_LOSS_TYPES)
def test_policy_gradient_scope_is_trls_loss_with_the_mask_on_the_advantage_term(
    tmp_path, loss_type
):
    trainer, inputs = _setup(tmp_path, loss_type, "policy_gradient")
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    metrics = trainer._metrics["train"]
    for key in ("entropy", "kl"):
        metrics[key].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, params)
    keep = trainer._capo_window[-1]["keep"]
    valid = inputs["completion_mask"].bool()
    assert 0 < int(keep.sum()) < int(valid.sum())
    assert torch.equal(inputs["completion_mask"].bool(), valid)  # TRL's batch is unchanged
    ref, entropies, kl, m = _reference_loss(trainer, inputs, keep)
    ref_grads = torch.autograd.grad(ref, params)
    assert float(loss) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-12)
    # the rejected tokens keep their KL penalty and entropy bonus: the "all" loss differs
    other, *_ = _reference_loss(trainer, inputs, keep, pg_mask_only=False)
    assert abs(float(other) - float(ref)) > 1e-6
    # TRL's metrics see TRL's completion mask, not the kept tokens
    want_h = float((entropies * m).sum() / m.sum())
    assert metrics["entropy"][-1] == pytest.approx(want_h, rel=1e-10)
    assert metrics["kl"][-1] == pytest.approx(float((kl * m).sum() / m.sum()), rel=1e-10)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_all_scope_is_trls_loss_on_the_kept_tokens(tmp_path, loss_type):
    trainer, inputs = _setup(tmp_path, loss_type, "all", seed=1)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, params)
    keep = trainer._capo_window[-1]["keep"]
    assert 0 < int(keep.sum()) < int(inputs["completion_mask"].sum())
    ref, *_ = _reference_loss(trainer, inputs, keep, pg_mask_only=False)
    ref_grads = torch.autograd.grad(ref, params)
    assert float(loss) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-12)


def test_every_token_rejected_keeps_the_kl_penalty_and_the_entropy_bonus(tmp_path):
    """The issue's case: with every token rejected the loss is TRL's KL and entropy terms and
    ``entropy`` is logged over all tokens (scope "all": loss 0, entropy logged as 0)."""
    trainer, inputs = _setup(tmp_path, "grpo", "policy_gradient", seed=2)
    trainer.capo_masker.tau_f = 0.0  # Delta KL >= 0: nothing is kept
    metrics = trainer._metrics["train"]
    loss = trainer.compute_loss(trainer.model, inputs)
    assert not bool(trainer._capo_window[-1]["keep"].any())
    entropy = metrics["entropy"][-1]
    ref = GRPOTrainer._compute_loss(
        trainer, trainer.model, {**inputs, "advantages": torch.zeros_like(inputs["advantages"])}
    )
    assert float(loss) == float(ref) != 0
    assert metrics["entropy"][-1] == entropy > 0
    trainer.capo_mask_scope = "all"
    assert float(trainer.compute_loss(trainer.model, inputs)) == 0.0
    assert metrics["entropy"][-1] == 0.0


def test_bad_mask_scope_is_refused(tmp_path):
    with pytest.raises(ValueError, match="capo_mask_scope must be one of policy_gradient, all"):
        th.trainer(CAPOGRPOTrainer, tmp_path, capo_mask_scope="tokens")


@pytest.mark.parametrize("scope", ["policy_gradient", "all"])
def test_penalty_with_a_mask_uses_trls_advantages_and_the_kept_tokens(tmp_path, scope):
    """Mask and penalty together: the penalty is lambda sum_t w_t q_t with TRL's own advantages
    (not the gated ones) and the weights over the kept tokens."""
    lam = 3.0
    trainer, inputs = _setup(tmp_path, "grpo", scope, seed=3)
    trainer.capo_penalty.kind, trainer.capo_penalty.coef = "delta_kl", lam
    trainer.compute_loss(trainer.model, inputs)
    seen = trainer._capo_window[-1]
    keep = seen["keep"]
    assert 0 < int(keep.sum()) < int(seen["valid"].sum())
    pen = trainer._metrics["train"]["capo/penalty"][-1]
    _, dkl = th.predicted(trainer, seen, inputs)
    assert pen == pytest.approx(lam * float((seen["weights"] * dkl).sum()), rel=1e-9)
    assert float((seen["weights"][~keep]).abs().sum()) == 0
