"""The tiny TRL addition task that the CAPO-in-TRL scripts train, built in one place.

``capo_trl.py``, ``capo_trl_off.py`` and ``capo_trl_budget.py`` train the same random-init GPT-2
(:mod:`curvopt.bench.tasks.trl_addition`) with ``GRPOConfig`` settings that differ only in the
learning rate, its schedule, the loss type and the seed: :func:`addition_trainer_kwargs` builds the
trainer's keywords, :class:`StepTimer` times each optimizer step. Import it after checking that
trl is installed.
"""

from __future__ import annotations

from typing import Any

from harness import clock
from transformers import TrainerCallback
from trl import GRPOConfig

from curvopt.bench.tasks.trl_addition import (
    addition_prompts,
    addition_reward,
    char_tokenizer,
    tiny_gpt2,
)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from ``on_step_begin`` to ``on_step_end``."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(clock() - self.t0)


def add_task_arguments(
    parser: Any, *, steps: int, completion_len: int = 8, n_embd: int = 64, n_head: bool = True
) -> None:
    """The options that :func:`addition_trainer_kwargs` reads, with this script's defaults."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-len", type=int, default=completion_len)
    parser.add_argument("--n-embd", type=int, default=n_embd)
    parser.add_argument("--n-layer", type=int, default=2)
    if n_head:
        parser.add_argument("--n-head", type=int, default=2)


def addition_trainer_kwargs(args: Any, out_dir: str, seed: int = 0, **config: Any) -> dict:
    """``model``, ``reward_funcs``, ``args``, ``train_dataset`` and ``processing_class``.

    Args:
        args: The script's options: ``steps``, ``generations``, ``batch``, ``completion_len``,
            ``n_embd``, ``n_layer`` and optionally ``n_head``.
        out_dir: ``GRPOConfig.output_dir``.
        seed: Seed of the model's initialization, the prompts and ``GRPOConfig``.
        **config: More ``GRPOConfig`` fields (``learning_rate``, ``loss_type``, ...).
    """
    cfg = GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        max_steps=args.steps,
        num_generations=args.generations,
        per_device_train_batch_size=args.batch,
        max_completion_length=args.completion_len,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        **config,
    )
    shape = dict(n_embd=args.n_embd, n_layer=args.n_layer)
    if getattr(args, "n_head", None) is not None:
        shape["n_head"] = args.n_head
    return dict(
        model=tiny_gpt2(seed=seed, **shape),
        reward_funcs=addition_reward,
        args=cfg,
        train_dataset=addition_prompts(n=args.steps * args.batch, seed=seed),
        processing_class=char_tokenizer(),
    )
