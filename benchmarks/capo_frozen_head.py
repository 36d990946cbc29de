"""How exact is the whole-model JVP predictor for a LoRA-on-body step with a frozen head?

On the tiny GPT-2 of the TRL tests (float64, LoRA r=2 on ``c_attn``, the head frozen), one
GRPO-like step (loss ``-mean_t A_b log pi(a_t)`` over random sequences, random advantages) is
taken by SGD or Adam at several learning rates. For each, the table gives the mean KL over the
tokens predicted by :func:`curvopt.capo.whole_model.predict_step_kl` (one JVP on the step read
off a trial step) against the exact mean ``KL(pi_old || pi_new)`` after the real step, and the
relative error of the first-order logit change ``||u - (z_new - z_old)|| / ||z_new - z_old||``.

Run: ``PYTHONPATH=. python benchmarks/capo_frozen_head.py`` (about 10 s on a CPU).
"""

from __future__ import annotations

import argparse

import peft
import torch

from curvopt.bench.tasks.trl_addition import tiny_gpt2
from curvopt.capo.whole_model import logit_change, token_kl, trial_step


def _model(seed: int):
    torch.manual_seed(seed)
    base = tiny_gpt2(seed=seed).double()
    base.set_attn_implementation("eager")  # forward-mode AD has no SDPA rule
    cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn"])
    model = peft.get_peft_model(base, cfg)
    for p in model.base_model.model.transformer.h[0].attn.c_attn.lora_B.parameters():
        torch.nn.init.normal_(p, std=0.1)  # a trained adapter (peft starts with B = 0)
    return model


def row(seed: int, opt_name: str, lr: float) -> dict:
    model = _model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 12, (8, 12), generator=g)
    adv = torch.randn(8, 1, generator=g, dtype=torch.float64)
    logits_of = lambda: model(input_ids=ids).logits[:, :-1]  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    assert not model.get_output_embeddings().weight.requires_grad
    opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.Adam)(params, lr=lr)
    logp = torch.log_softmax(logits_of(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (-(adv * logp).mean()).backward()
    step = trial_step(opt, params)
    z, u = logit_change(model, step, ids, output_fn=lambda out: out.logits[:, :-1])
    predicted = float(token_kl(z, u).mean())
    opt.step()
    with torch.no_grad():
        new = logits_of()
    old_lp, new_lp = torch.log_softmax(z, -1), torch.log_softmax(new, -1)
    actual = float((old_lp.exp() * (old_lp - new_lp)).sum(-1).mean())
    change = new - z
    return {
        "opt": opt_name,
        "lr": lr,
        "predicted_kl": predicted,
        "actual_kl": actual,
        "kl_rel_err": abs(predicted / actual - 1),
        "logit_rel_err": float((u - change).norm() / change.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    grid = {"sgd": (1e-2, 1e-1, 1.0, 3.0), "adam": (1e-4, 1e-3, 1e-2, 3e-2)}
    print(
        "| optimizer | lr | predicted KL | actual KL | KL rel. err (max over seeds) |"
        " logit-change rel. err |"
    )
    print("|---|---|---|---|---|---|")
    for name, lrs in grid.items():
        for lr in lrs:
            rows = [row(s, name, lr) for s in range(args.seeds)]
            mid = sorted(rows, key=lambda r: r["kl_rel_err"])[len(rows) // 2]
            print(
                f"| {name} | {lr:g} | {mid['predicted_kl']:.3e} | {mid['actual_kl']:.3e} | "
                f"{max(r['kl_rel_err'] for r in rows):.2%} | "
                f"{max(r['logit_rel_err'] for r in rows):.2%} |"
            )


if __name__ == "__main__":
    main()
