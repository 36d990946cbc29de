"""A verifiable toy task for GRPO: write the sum of two numbers as digits.

Prompt ``a + b =`` with both operands written as fixed-width decimal digits; the completion is
the sum as fixed-width digits (``T = digits(2 * max_operand)`` tokens). Reward 1 for the exact
answer, else 0. Vocabulary: the digits 0-9, ``+`` (10) and ``=`` (11).

Example:
    >>> task = AdditionTask(max_operand=99)
    >>> task.encode(7, 35).tolist(), task.answer(7, 35).tolist()
    ([[0, 7, 10, 3, 5, 11]], [[0, 4, 2]])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PLUS, EQUALS = 10, 11


class AdditionTask:
    """Sum of two integers in ``[0, max_operand]``, digits in and digits out.

    Args:
        max_operand: Largest operand (``>= 1``).
    """

    vocab_size = 12

    def __init__(self, max_operand: int = 99):
        if max_operand < 1:
            raise ValueError(f"max_operand must be at least 1, got {max_operand}")
        self.max_operand = max_operand
        self.in_digits = len(str(max_operand))
        self.out_digits = len(str(2 * max_operand))

    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens."""
        return 2 * self.in_digits + 2

    @property
    def answer_len(self) -> int:
        """Number of completion tokens ``T``."""
        return self.out_digits

    @staticmethod
    def _digits(x: Tensor, width: int) -> Tensor:
        powers = 10 ** torch.arange(width - 1, -1, -1, device=x.device)
        return (x[:, None] // powers) % 10

    def encode(self, a, b) -> Tensor:
        """Prompt tokens ``(N, prompt_len)`` for operands ``a``, ``b`` (ints or ``(N,)``)."""
        a, b = torch.as_tensor(a).reshape(-1), torch.as_tensor(b).reshape(-1)
        n = a.shape[0]
        return torch.cat(
            [
                self._digits(a, self.in_digits),
                torch.full((n, 1), PLUS),
                self._digits(b, self.in_digits),
                torch.full((n, 1), EQUALS),
            ],
            1,
        )

    def answer(self, a, b) -> Tensor:
        """Correct completion tokens ``(N, answer_len)``."""
        a, b = torch.as_tensor(a).reshape(-1), torch.as_tensor(b).reshape(-1)
        return self._digits(a + b, self.out_digits)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` random prompts and their answers."""
        ab = torch.randint(0, self.max_operand + 1, (2, n), generator=generator)
        return self.encode(ab[0], ab[1]), self.answer(ab[0], ab[1])

    def reward(self, completions: Tensor, answers: Tensor) -> Tensor:
        """1.0 where a completion equals its answer exactly, else 0.0; shape ``(N,)``."""
        if completions.shape != answers.shape:
            raise ValueError(
                f"completions {tuple(completions.shape)} and answers {tuple(answers.shape)} differ"
            )
        return (completions == answers).all(1).float()


def supervised_warmstart(
    policy: nn.Module,
    task: AdditionTask,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
) -> None:
    """Teacher-forced cross-entropy on correct answers (an "SFT" start before RL).

    RL from a random policy gets almost no reward on this task; like RL on a pretrained language
    model, GRPO here starts from a policy that is sometimes right.
    """
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    Lp = task.prompt_len
    for _ in range(steps):
        prompts, answers = task.sample(batch_size, generator)
        seq = torch.cat([prompts, answers], 1)
        logits = policy(seq[:, :-1])[:, Lp - 1 :]
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), answers.reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def greedy_accuracy(
    policy: nn.Module, task: AdditionTask, prompts: Tensor, answers: Tensor
) -> float:
    """Exact-match accuracy of greedy decoding on given prompts."""
    seq = prompts
    for _ in range(task.answer_len):
        nxt = policy.head(policy.hidden_states(seq)[:, -1]).argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return float(task.reward(seq[:, prompts.shape[1] :], answers).mean())
