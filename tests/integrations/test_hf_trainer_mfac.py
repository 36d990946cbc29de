"""MFAC in Hugging Face's Trainer: ``optimizer_cls_and_kwargs`` and resuming from a checkpoint.

A tiny GPT-2 built from its config (eager attention, no download) trains on a fixed random token
set; a run interrupted at a checkpoint and resumed must end where the uninterrupted run ends.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from curvopt.optim import MFAC  # noqa: E402

VOCAB, SEQ, STEPS = 32, 12, 6


class TokenSet(torch.utils.data.Dataset):
    def __init__(self, n=48, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        n_positions=SEQ,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def make_trainer(out, max_steps, **opt_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    return transformers.Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=TokenSet(),
        optimizer_cls_and_kwargs=(MFAC, {"lr": 3e-3, **opt_kwargs}),
    )


def inner(trainer):
    """The MFAC instance (accelerate may wrap the optimizer)."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


@pytest.mark.parametrize("opt_kwargs", [{}, {"m": 4, "damp": 1e-3, "graft": None}])
def test_trainer_with_mfac_trains_and_resumes_exactly(tmp_path, opt_kwargs):
    full = make_trainer(tmp_path / "full", STEPS, **opt_kwargs)
    full.train()
    assert isinstance(inner(full), MFAC)
    losses = [r["loss"] for r in full.state.log_history if "loss" in r]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))

    checkpoint = tmp_path / "full" / "checkpoint-3"  # saved halfway through the same run
    assert (checkpoint / "optimizer.pt").exists()
    resumed = make_trainer(tmp_path / "resumed", STEPS, **opt_kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert inner(resumed).window.count == STEPS
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name  # bit for bit on the CPU
