"""GRPO with CAPO inside TRL on a tiny random GPT-2 (CPU, about a minute).

    python examples/capo_trl.py --steps 20 --tau-f 2e-2 --tau-h 0.5

CAPOGRPOTrainer takes every argument of trl.GRPOTrainer plus CAPO's thresholds; it masks, per
token, the updates whose predicted KL change (tau_f) or objective change (tau_h) is too large,
and logs the rejected fraction and its predictions of each optimizer step next to TRL's metrics.
The task: prompts "a+b=", reward 1 for the right sum plus 0.1 per digit.

Thresholds are model- and lr-specific (the paper's tau_F = 1e-4, tau_H = 0.01 belong to a 7B model
at lr 1.5e-5; curvopt.capo.masker.calibrate_thresholds sets them from percentiles instead). Here the
first step is usually rejected whole: a fresh Adam's first step is sign-like (every entry of the
head moves by about lr), which the model predicts as a large KL change.

``--penalty delta_kl --penalty-coef 10`` adds CAPO's penalty variant (lambda times the predicted
per-token KL change, averaged like the loss, with its gradient) to TRL's loss; it combines with
the mask (``--tau-f inf --tau-h inf``: the penalty alone).

``--kl-budget 1e-2`` scales each step's lr so that its predicted whole-model KL fits the budget
(a trust region on the step; with ``--tau-f inf --tau-h inf`` alone). ``--mask-scope all`` lets
the mask gate every term of a rejected token instead of its policy-gradient term only.
"""

import argparse
import tempfile

from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig

from curvopt.bench.tasks.trl_addition import (
    addition_prompts,
    addition_reward,
    char_tokenizer,
    tiny_gpt2,
)
from curvopt.integrations.trl import CAPOGRPOTrainer


class PrintProgress(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            print(
                f"step {state.global_step:3d}  reward {logs['reward']:.3f}  "
                f"rejected {logs['capo/rejected_fraction']:.3f}  "
                f"predicted step KL {logs.get('capo/predicted_step_kl', float('nan')):.2e}"
                + (f"  penalty {logs['capo/penalty']:.2e}" if "capo/penalty" in logs else "")
                + (
                    f"  lr scale {logs['capo/kl_budget_scale']:.3f}"
                    if "capo/kl_budget_scale" in logs
                    else ""
                )
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tau-h", type=float, default=0.5, help="threshold on |dJ_t| (inf: off)")
    ap.add_argument("--tau-f", type=float, default=2e-2, help="threshold on dKL_t (inf: off)")
    ap.add_argument("--penalty", default="none", help="none, delta_kl, delta_j or abs_delta_j")
    ap.add_argument("--penalty-coef", type=float, default=0.0, help="lambda >= 0")
    ap.add_argument("--kl-budget", type=float, default=None, help="whole-model KL per step")
    ap.add_argument("--mask-scope", default="policy_gradient", help="policy_gradient or all")
    args = ap.parse_args()
    if args.penalty != "none" and args.penalty_coef <= 0:
        ap.error(f"--penalty {args.penalty} needs --penalty-coef > 0 (with 0 it would be off)")
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            max_steps=args.steps,
            learning_rate=args.lr,
            num_generations=4,
            per_device_train_batch_size=16,
            max_completion_length=6,
            loss_type="grpo",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = CAPOGRPOTrainer(
            model=tiny_gpt2(seed=0, n_embd=64),
            reward_funcs=addition_reward,
            args=config,
            train_dataset=addition_prompts(n=16 * args.steps),
            processing_class=char_tokenizer(),
            capo_tau_h=args.tau_h,
            capo_tau_f=args.tau_f,
            capo_penalty=args.penalty,
            capo_penalty_coef=args.penalty_coef,
            capo_kl_budget=args.kl_budget,
            capo_mask_scope=args.mask_scope,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(PrintProgress())
        trainer.train()


if __name__ == "__main__":
    main()
