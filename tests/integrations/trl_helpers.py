"""A tiny GPT-2 GRPO setup for the TRL integration tests: no download, a few tokens, CPU."""

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import GRPOConfig

CHARS = list("0123456789+=")


def tokenizer() -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer over digits, '+', '=', pad and eos."""
    vocab = {c: i for i, c in enumerate(CHARS + ["<pad>", "<eos>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def model(seed: int = 0, tied: bool = True, n_embd: int = 32) -> GPT2LMHeadModel:
    """Random-init GPT-2 (2 layers, no dropout); the head is tied to the embeddings by default."""
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tied,
    )
    return GPT2LMHeadModel(cfg)


def dataset(n: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, 50, (n, 2), generator=g).tolist()
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in ab]})


def reward(completions, prompts, **kwargs):
    """1 for the right sum at the start of the completion, plus a small dense term per digit."""
    out = []
    for c, p in zip(completions, prompts):
        a, b = p[:-1].split("+")
        digits = sum(ch.isdigit() for ch in c)
        out.append(float(c.startswith(str(int(a) + int(b)))) + 0.1 * digits)
    return out


def config(tmp_path, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=2,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=6,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return GRPOConfig(**base)
