"""A tiny GRPO problem for TRL: addition prompts, a character-level tokenizer, a random GPT-2.

Used by the tests, the example (``examples/capo_trl.py``) and the benchmark
(``benchmarks/capo_trl.py``) of :class:`~curvopt.integrations.trl.CAPOGRPOTrainer`; nothing is
downloaded. The prompt is ``"a+b="``, the reward is rule-based: 1 when the completion starts with
the sum's digits, plus 0.1 per digit generated (a dense term, so that a random policy's groups
are informative).

Example:
    >>> from curvopt.bench.tasks.trl_addition import addition_reward, char_tokenizer
    >>> char_tokenizer()("12+3=")["input_ids"] == [1, 2, 10, 3, 11]
    True
    >>> addition_reward(["15", "9"], ["12+3=", "1+1="])
    [1.2, 0.1]
"""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

CHARS = tuple("0123456789+=")

__all__ = ["CHARS", "addition_prompts", "addition_reward", "char_tokenizer", "tiny_gpt2"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over the characters ``0-9 + =`` plus ``<pad>`` and ``<eos>``."""
    vocab = {c: i for i, c in enumerate([*CHARS, "<pad>", "<eos>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_gpt2(
    seed: int = 0, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, tied: bool = True
) -> GPT2LMHeadModel:
    """A random-init GPT-2 over :func:`char_tokenizer`'s vocabulary, without dropout.

    Args:
        seed: Seed of the initialization.
        n_embd: Hidden size ``H``.
        n_layer: Transformer blocks.
        n_head: Attention heads.
        tied: Tie the output layer to the input embeddings (GPT-2's default).
    """
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tied,
    )
    return GPT2LMHeadModel(cfg)


def addition_prompts(n: int = 16, seed: int = 0, max_operand: int = 49) -> Dataset:
    """``n`` prompts ``"a+b="`` with operands in ``[0, max_operand]``, as a ``datasets.Dataset``."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, max_operand + 1, (n, 2), generator=g).tolist()
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in ab]})


def addition_reward(completions: list[str], prompts: list[str], **kwargs) -> list[float]:
    """1 if the completion starts with the sum, plus 0.1 per digit (TRL's reward signature)."""
    out = []
    for c, p in zip(completions, prompts):
        a, b = p[:-1].split("+")
        digits = sum(ch.isdigit() for ch in c)
        out.append(round(float(c.startswith(str(int(a) + int(b)))) + 0.1 * digits, 10))
    return out
