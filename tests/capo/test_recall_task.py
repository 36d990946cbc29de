"""The large-vocabulary recall toy: reward, exact expected reward, policy body, validation."""

import pytest
import torch

from curvopt.bench.tasks.recall import PromptPositionPolicy, RecallTask, supervised_warmstart
from curvopt.capo.grpo import GRPOTrainer
from curvopt.capo.sequence_policy import sample_tokens
from curvopt.capo.token_losses import grpo_loss


def _task_policy(seed, V=40, P=6, T=3, H=5):
    torch.manual_seed(seed)
    task = RecallTask(P, V, T, seed=seed)
    return task, PromptPositionPolicy(V, H, 1 + T).double()


@pytest.mark.parametrize("seed", [0, 1])
def test_reward_is_fraction_of_correct_positions(seed):
    task, _ = _task_policy(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = task.sample(50, gen)
    assert torch.equal(answers, task.answers[prompts[:, 0]])
    comp = torch.where(torch.rand(answers.shape, generator=gen) < 0.5, answers, (answers + 1) % 40)
    expected = [
        sum(int(c == a) for c, a in zip(cr.tolist(), ar.tolist())) / task.answer_len
        for cr, ar in zip(comp, answers)
    ]
    assert task.reward(comp, answers).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_hidden_states_match_explicit_formula_and_ignore_later_tokens(seed):
    task, pol = _task_policy(seed)
    tokens = torch.randint(0, 40, (4, 4))
    h = pol.hidden_states(tokens)
    x = pol.embed.weight[tokens[:, :1]] + pol.position.weight[:4]
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + pol.norm.eps) * pol.norm.weight + pol.norm.bias
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    other = tokens.clone()
    other[:, 1:] = torch.randint(0, 40, (4, 3))
    torch.testing.assert_close(pol(other), pol(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_reward_matches_monte_carlo(seed):
    task, pol = _task_policy(seed, V=8, P=4, T=3, H=4)
    with torch.no_grad():
        pol.head.weight.mul_(3.0)  # a non-uniform policy
    gen = torch.Generator().manual_seed(seed + 7)
    prompts, answers = task.sample(20000, gen)
    comp = sample_tokens(pol, prompts, task.answer_len, gen)
    mc = task.reward(comp, answers)
    exact = task.expected_reward(pol)
    # uniform prompts: the sample mean estimates the exact value, 5 standard errors
    assert abs(float(mc.mean() - exact)) < 5 * float(mc.std()) / 20000**0.5
    # and against a dense loop over prompts and positions
    with torch.no_grad():
        probs = torch.softmax(pol(torch.cat([torch.arange(4)[:, None], task.answers], 1)), -1)
    loop = sum(
        float(probs[p, t, task.answers[p, t]]) for p in range(4) for t in range(task.answer_len)
    ) / (4 * task.answer_len)
    assert float(exact) == pytest.approx(loop, rel=1e-12)


def test_warmstart_and_small_lr_grpo_raise_the_expected_reward():
    task, pol = _task_policy(0, V=64, P=8, T=3, H=8)
    pol = pol.float()
    r0 = float(task.expected_reward(pol))
    supervised_warmstart(pol, task, 30, generator=torch.Generator().manual_seed(0))
    r1 = float(task.expected_reward(pol))
    assert r1 > r0 + 0.05
    opt = torch.optim.SGD(pol.parameters(), lr=1.0)
    trainer = GRPOTrainer(pol, opt, grpo_loss, 8, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        prompts, answers = task.sample(8, gen)
        trainer.step(prompts, 3, lambda c, a=answers: task.reward(c, a.repeat_interleave(8, 0)))
    assert float(task.expected_reward(pol)) > r1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_prompts"):
        RecallTask(num_prompts=50, vocab_size=40, answer_len=2)
    with pytest.raises(ValueError, match="answer_len"):
        RecallTask(num_prompts=4, vocab_size=40, answer_len=0)
    task = RecallTask(4, 10, 2)
    with pytest.raises(ValueError, match="differ"):
        task.reward(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_size"):
        PromptPositionPolicy(10, 0, 3)
    pol = PromptPositionPolicy(10, 4, 3)
    with pytest.raises(ValueError, match="max_len"):
        pol.hidden_states(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        pol.hidden_states(torch.zeros(4, dtype=torch.long))
