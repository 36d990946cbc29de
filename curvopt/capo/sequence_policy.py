"""A tiny autoregressive token policy (GRU) for the GRPO loop and CAPO.

The GRPO loop (:mod:`curvopt.capo.grpo`) needs two things from a policy: ``hidden_states(tokens)``
giving the final hidden state ``h`` at every position (``(B, L, H)``, causal: position ``i`` has
seen ``tokens[:, : i + 1]``) and a last layer ``head`` (``nn.Linear``) with
``logits = head(h)`` predicting the next token. CAPO's curvature model is built on exactly this
``h`` and ``head``. Any module with these two members works; :class:`GRUPolicy` is a small one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GRUPolicy(nn.Module):
    """Embedding -> GRU -> LayerNorm -> linear head over the vocabulary.

    Args:
        vocab_size: Number of tokens ``V``.
        hidden_size: GRU width ``H``.
        num_layers: GRU layers.

    Example:
        >>> pol = GRUPolicy(vocab_size=12, hidden_size=16)
        >>> pol.hidden_states(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 16])
        >>> pol(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 12])
    """

    def __init__(self, vocab_size: int, hidden_size: int = 64, num_layers: int = 1):
        super().__init__()
        if vocab_size < 2 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"need vocab_size >= 2, hidden_size >= 1, num_layers >= 1; got {vocab_size}, "
                f"{hidden_size}, {num_layers}"
            )
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.rnn = nn.GRU(hidden_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)

    def hidden_states(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` token ids -> ``(B, L, H)`` final hidden states."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
        out, _ = self.rnn(self.embed(tokens))
        return self.norm(out)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` token ids -> ``(B, L, V)`` next-token logits."""
        return self.head(self.hidden_states(tokens))


@torch.no_grad()
def sample_tokens(
    policy: nn.Module,
    prompts: Tensor,
    num_tokens: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Sample ``num_tokens`` continuation tokens for each prompt row.

    Args:
        policy: Has ``hidden_states`` and ``head`` (see the module docstring).
        prompts: ``(B, Lp)`` token ids.
        num_tokens: Completion length ``T``.
        generator: Random generator for reproducible sampling.
        temperature: Softmax temperature ``> 0``.

    Returns:
        ``(B, T)`` sampled token ids.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    seq = prompts
    out = []
    for _ in range(num_tokens):
        logits = policy.head(policy.hidden_states(seq)[:, -1]) / temperature
        probs = torch.softmax(logits.float(), dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator)
        out.append(tok)
        seq = torch.cat([seq, tok], 1)
    return torch.cat(out, 1)
