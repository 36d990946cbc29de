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
