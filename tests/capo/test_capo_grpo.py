"""GRPO loop, group advantages, the addition task, and CAPO's whole-step KL prediction."""

import copy

import pytest
import torch

from curvopt.bench.tasks.addition import AdditionTask
from curvopt.capo.grpo import GRPOTrainer, group_advantages
from curvopt.capo.masker import CAPOLoss
from curvopt.capo.sequence_policy import GRUPolicy, sample_tokens
from curvopt.capo.token_losses import grpo_loss


def test_group_advantages_against_explicit_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (24,), generator=g).float()
    adv = group_advantages(r, 8)
    adv_dr = group_advantages(r, 8, normalize_std=False)
    for k in range(3):
        grp = r[8 * k : 8 * k + 8]
        mean, std = grp.mean(), grp.std()
        assert torch.allclose(adv_dr[8 * k : 8 * k + 8], grp - mean)
        assert torch.allclose(adv[8 * k : 8 * k + 8], (grp - mean) / (std + 1e-6))
    assert torch.equal(group_advantages(torch.ones(8), 8), torch.zeros(8))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 5)


def test_addition_task_encoding_and_reward():
    task = AdditionTask(max_operand=99)
    assert task.encode(7, 35).tolist() == [[0, 7, 10, 3, 5, 11]]
    assert task.answer(99, 99).tolist() == [[1, 9, 8]]
    p, a = task.sample(50, torch.Generator().manual_seed(1))
    # decode and check independently
    for row, ans in zip(p.tolist(), a.tolist()):
        x, y = 10 * row[0] + row[1], 10 * row[3] + row[4]
        assert 100 * ans[0] + 10 * ans[1] + ans[2] == x + y
    wrong = a.clone()
    wrong[::2, -1] = (wrong[::2, -1] + 1) % 10
    assert task.reward(wrong, a).tolist() == [0.0 if i % 2 == 0 else 1.0 for i in range(50)]
    with pytest.raises(ValueError, match="max_operand"):
        AdditionTask(0)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_predicted_step_kl_matches_realized_head_kl_for_small_lr(opt_name):
    """When only the head is trained, CAPO's whole-step model of the last layer is the actual
    update (SGD: the gradient; Adam: the same moments), so the predicted KL must match the realized
    KL of the step to second order."""
    torch.manual_seed(4)
    task = AdditionTask(max_operand=9)
    pol = GRUPolicy(task.vocab_size, 16).double()
    for p in pol.parameters():
        p.requires_grad_(False)
    for p in pol.head.parameters():
        p.requires_grad_(True)
    lr = 1e-3 if opt_name == "sgd" else 1e-4
    opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.Adam)(pol.head.parameters(), lr=lr)
    capo = CAPOLoss(grpo_loss, pol.head, opt, tau_h=float("inf"), tau_f=float("inf"))
    trainer = GRPOTrainer(
        pol, opt, group_size=8, capo=capo, generator=torch.Generator().manual_seed(0)
    )

    # a reward that varies within every group (the parity of the first answer digit), so that
    # every step moves the head: with the task's own reward an untrained policy scores 0 for a
    # whole group, the advantages vanish and the step's KL is 0 (nothing to compare)
    def parity(completions):
        return (completions[:, 0] % 2).double()

    for _ in range(3):
        prompts, _answers = task.sample(6)
        out = trainer.step(prompts, task.answer_len, parity)
        assert float(out["realized_head_kl"]) > 1e-12
        assert float(out["predicted_kl"]) == pytest.approx(float(out["realized_head_kl"]), rel=2e-2)
        # only the head moves, so the whole-model KL is the head KL
        assert float(out["realized_kl"]) == pytest.approx(float(out["realized_head_kl"]), rel=1e-6)
        assert float(out["rejected_fraction"]) == 0.0


def _completion_logp(pol, prompts, comp):
    seq = torch.cat([prompts, comp], 1)
    logits = pol(seq[:, :-1])[:, prompts.shape[1] - 1 :]
    return torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)


@pytest.mark.parametrize("with_capo", [False, True])
def test_grpo_step_is_gradient_ascent_on_its_batch_surrogate(with_capo):
    """One SGD step of the loop (ratio 1, no clipping active) changes the batch surrogate
    S = mean_i A_i mean_t log pi(a_it) by lr * ||grad S||^2 to first order, with A written out
    independently here; CAPO with an infinite threshold must not change that."""
    torch.manual_seed(6)
    task = AdditionTask(max_operand=9)
    pol = GRUPolicy(task.vocab_size, 16).double()
    lr = 1e-4
    opt = torch.optim.SGD(pol.parameters(), lr=lr)
    capo = None
    if with_capo:
        capo = CAPOLoss(grpo_loss, pol.head, opt, tau_h=float("inf"), tau_f=float("inf"))
    trainer = GRPOTrainer(
        pol, opt, group_size=8, capo=capo, generator=torch.Generator().manual_seed(2)
    )
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(3):
        prompts, _ = task.sample(6, gen)
        rep = prompts.repeat_interleave(8, 0)
        seen = {}

        def reward_fn(c, seen=seen):
            seen["c"] = c
            # a dense reward (the task's exact-match reward is ~always 0 for a random policy)
            seen["r"] = (c[:, 0] % 2 == 0).float() + (c[:, 1] < 5).float()
            seen["old"] = copy.deepcopy(pol)
            return seen["r"]

        out = trainer.step(prompts, task.answer_len, reward_fn)
        capo_only = {"predicted_kl", "predicted_delta_j", "mean_delta_kl_all"}
        capo_only |= {"mean_delta_kl_kept", "mean_abs_delta_j_all", "mean_abs_delta_j_kept"}
        for k, v in out.items():
            if k == "penalty":  # NaN without a CAPO penalty
                assert bool(torch.isnan(v)), k
                continue
            assert bool(torch.isfinite(v)) == (with_capo or k not in capo_only), k
        r = seen["r"].double().view(-1, 8)
        adv = torch.stack([(g - g.mean()) / (g.std() + 1e-6) for g in r]).reshape(-1)
        if not bool((adv != 0).any()):
            continue
        old = seen["old"]
        s_old = (adv[:, None] * _completion_logp(old, rep, seen["c"])).mean(1).mean()
        grads = torch.autograd.grad(s_old, list(old.parameters()))
        predicted = lr * sum(float((g * g).sum()) for g in grads)
        with torch.no_grad():
            s_new = (adv[:, None] * _completion_logp(pol, rep, seen["c"])).mean(1).mean()
        assert float(s_new - s_old.detach()) == pytest.approx(predicted, rel=1e-2)
        checked += 1
    assert checked == 3


def test_sampling_and_trainer_validation():
    pol = GRUPolicy(12, 8)
    x = sample_tokens(pol, torch.zeros(3, 2, dtype=torch.long), 4, torch.Generator().manual_seed(0))
    assert x.shape == (3, 4) and int(x.max()) < 12
    with pytest.raises(ValueError, match="num_tokens"):
        sample_tokens(pol, torch.zeros(3, 2, dtype=torch.long), 0)
    opt = torch.optim.SGD(pol.parameters(), 0.1)
    with pytest.raises(ValueError, match="group_size"):
        GRPOTrainer(pol, opt, group_size=1)
    other = GRUPolicy(12, 8)
    with pytest.raises(ValueError, match="head"):
        GRPOTrainer(pol, opt, capo=CAPOLoss(grpo_loss, other.head, tau_h=1.0, tau_f=1.0))
    trainer = GRPOTrainer(pol, opt, group_size=2)
    with pytest.raises(ValueError, match="reward_fn"):
        trainer.step(torch.zeros(2, 3, dtype=torch.long), 2, lambda c: torch.zeros(3))
