r"""A large-vocabulary recall toy for GRPO where the output head dominates the step's KL.

**Task.** Each of ``num_prompts`` prompts (a single token) has a fixed secret answer of ``T``
tokens drawn from a vocabulary of ``V`` tokens. The reward of a completion ``c`` is the fraction of
positions it gets right, ``r = (1/T) Σ_t [c_t = y_t]`` (partial credit, so every group carries a
signal, and the wrong tokens of a completion that scored above its group mean share its positive
advantage: a few rare tokens with a large ``|A|``).

**Policy.** :class:`PromptPositionPolicy` has a deliberately small body: the hidden state at
completion position ``t`` is ``h_t = LayerNorm(E[prompt] + P[t])`` (a prompt embedding plus a
position embedding, ``H`` numbers each), followed by a linear head over the ``V`` tokens. Of the
trainable weights only the head's ``V (H + 1)`` and the used prompts' embedding rows get
gradients, and (measured in ``benchmarks/capo_recall.py``) the head carries most of a step's KL:
the case CAPO's last-layer curvature model is built for. The ``H``-dimensional hidden states of
different prompts overlap, so a large head update driven by one prompt's tokens also moves the
other prompts' policies.

Example:
    >>> task = RecallTask(num_prompts=8, vocab_size=64, answer_len=3, seed=0)
    >>> prompts, answers = task.sample(4, torch.Generator().manual_seed(0))
    >>> prompts.shape, answers.shape
    (torch.Size([4, 1]), torch.Size([4, 3]))
    >>> task.reward(answers, answers).tolist()
    [1.0, 1.0, 1.0, 1.0]
    >>> pol = PromptPositionPolicy(task.vocab_size, hidden_size=8, max_len=1 + task.answer_len)
    >>> pol(torch.cat([prompts, answers], 1)).shape
    torch.Size([4, 4, 64])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RecallTask:
    """Recall a fixed random answer per prompt; partial-credit reward.

    Args:
        num_prompts: Number of distinct prompts (``2 <= num_prompts <= vocab_size``); prompt ``i``
            is the token ``i``.
        vocab_size: ``V`` (``>= 2``).
        answer_len: ``T`` (``>= 1``).
        seed: Seed of the secret answers.
    """

    prompt_len = 1

    def __init__(self, num_prompts: int, vocab_size: int, answer_len: int, seed: int = 0):
        if vocab_size < 2 or not 2 <= num_prompts <= vocab_size or answer_len < 1:
            raise ValueError(
                "need vocab_size >= 2, 2 <= num_prompts <= vocab_size and answer_len >= 1; got "
                f"num_prompts={num_prompts}, vocab_size={vocab_size}, answer_len={answer_len}"
            )
        self.num_prompts = num_prompts
        self.vocab_size = vocab_size
        self.answer_len = answer_len
        gen = torch.Generator().manual_seed(seed)
        self.answers = torch.randint(0, vocab_size, (num_prompts, answer_len), generator=gen)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` random prompts ``(n, 1)`` and their answers ``(n, T)``."""
        idx = torch.randint(0, self.num_prompts, (n,), generator=generator)
        return idx[:, None], self.answers[idx]

    def reward(self, completions: Tensor, answers: Tensor) -> Tensor:
        """Fraction of correct positions per row, shape ``(N,)``."""
        if completions.shape != answers.shape:
            raise ValueError(
                f"completions {tuple(completions.shape)} and answers {tuple(answers.shape)} differ"
            )
        return (completions == answers).float().mean(1)

    @torch.no_grad()
    def expected_reward(self, policy: nn.Module) -> Tensor:
        """Exact expected reward ``(1/(P T)) Σ_p Σ_t π_t(y_{p,t} | p)`` over uniform prompts.

        Exact for policies whose completion tokens are independent given the prompt (such as
        :class:`PromptPositionPolicy`): the reward is a mean of per-position indicators.
        """
        prompts = torch.arange(self.num_prompts)[:, None]
        seq = torch.cat([prompts, self.answers], 1)[:, :-1]
        probs = torch.softmax(policy(seq), -1)
        return probs.gather(-1, self.answers[..., None]).mean()


class PromptPositionPolicy(nn.Module):
    """``h_t = LayerNorm(E[tokens[:, 0]] + P[t])``, logits ``= head(h_t)``.

    The hidden state at position ``t`` depends only on the first (prompt) token and ``t``, so the
    policy is causal and the completion tokens are conditionally independent given the prompt.
    It has the ``hidden_states``/``head`` interface of :mod:`curvopt.capo.sequence_policy`.

    Args:
        vocab_size: ``V``.
        hidden_size: ``H``.
        max_len: Longest input sequence (prompt plus completion).
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_len: int):
        super().__init__()
        if vocab_size < 2 or hidden_size < 1 or max_len < 1:
            raise ValueError(
                f"need vocab_size >= 2, hidden_size >= 1, max_len >= 1; got {vocab_size}, "
                f"{hidden_size}, {max_len}"
            )
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.position = nn.Embedding(max_len, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)

    def hidden_states(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` token ids -> ``(B, L, H)``."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
        L = tokens.shape[1]
        if L > self.position.num_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_len={self.position.num_embeddings}")
        pos = self.position(torch.arange(L, device=tokens.device))
        return self.norm(self.embed(tokens[:, :1]) + pos)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` token ids -> ``(B, L, V)`` next-token logits."""
        return self.head(self.hidden_states(tokens))


def supervised_warmstart(
    policy: nn.Module,
    task: RecallTask,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-2,
    generator: torch.Generator | None = None,
) -> None:
    """Teacher-forced cross-entropy on the answers (a partial "SFT" start before RL)."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        prompts, answers = task.sample(batch_size, generator)
        seq = torch.cat([prompts, answers], 1)
        logits = policy(seq[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), answers.reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
