"""The tiny GPT-2 GRPO setup of the TRL integration tests (no download, CPU)."""

from trl import GRPOConfig

from curvopt.bench.tasks.trl_addition import (
    addition_prompts,
    addition_reward,
    char_tokenizer,
    tiny_gpt2,
)

tokenizer = char_tokenizer
model = tiny_gpt2
dataset = addition_prompts
reward = addition_reward


def config(tmp_path, cls=GRPOConfig, **kw) -> GRPOConfig:
    """The tiny setup's config as a ``cls`` (``GRPOConfig`` or a subclass), ``kw`` updating it."""
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
    return cls(**base)


def trainer(cls, tmp_path, model=None, optimizers=(None, None), cfg=None, args=None, **kw):
    """A ``cls`` (GRPOTrainer or a subclass) on the tiny setup; ``cfg`` updates the config
    (``args``: a ready config instead)."""
    return cls(
        model=tiny_gpt2() if model is None else model,
        reward_funcs=addition_reward,
        args=config(tmp_path, **(cfg or {})) if args is None else args,
        train_dataset=addition_prompts(),
        processing_class=char_tokenizer(),
        optimizers=optimizers,
        **kw,
    )


def batch(trainer, n=8):
    """One generated and scored micro-batch, the trainer set up as the training loop would."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(n)]
    return trainer._generate_and_score_completions(rows)


def predicted(trainer, seen, inputs, **kw):
    """The masker's ``(delta_j, delta_kl)`` for a window entry ``seen`` that the trainer recorded
    on ``inputs``, from the trainer's own head, lr and valid tokens (``kw`` to ``predict``)."""
    head = trainer.capo_head
    kw.setdefault("mask", seen["valid"])
    return trainer.capo_masker.predict(
        head.weight,
        seen["hidden"],
        inputs["completion_ids"],
        inputs["advantages"],
        trainer._capo_lr(),
        head.bias,
        **kw,
    )


def informative(seen, inputs):
    """The tokens that can move the policy: valid, in a completion with a non-zero advantage."""
    return seen["valid"] & (inputs["advantages"][:, None] != 0)
