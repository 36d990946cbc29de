"""How exact is CAPO's model of a LoRA head's step? Predicted against the real optimizer step.

A peft LoRA adapter (r = 2, alpha = 3, ``B`` nonzero) on an ``nn.Linear(5, 7)`` head, float64;
one step of SGD or Adam on ``-sum_t w_t A_t log pi(a_t)`` over 12 random tokens (token-mean
``w_t``). Printed per learning rate: the largest error of the predicted logit change
``eta D_1 h + eta^2 D_2 h`` (exact up to rounding), and the predicted / true batch ``Delta J``
(``sum_t w_t A_t (ratio_t - 1)``) and mean ``KL(p_old || p_new)`` of
:meth:`~curvopt.capo.loss.CAPOLoss.predict_step` (second order: their errors fall 8x when the lr
halves).

Run: ``PYTHONPATH=. python benchmarks/capo_lora_head.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import math

import peft
import torch
from torch import nn

from curvopt.capo.loss import CAPOLoss
from curvopt.capo.token_losses import grpo_loss

V, H, R = 7, 5, 2


def _setup():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(H, V)).double()
    cfg = peft.LoraConfig(r=R, lora_alpha=3, lora_dropout=0.0, target_modules=["0"])
    lora = peft.get_peft_model(net, cfg).base_model.model[0]
    nn.init.normal_(lora.lora_B["default"].weight, std=0.5)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(3, 4, H, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (3, 4), generator=g)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    return lora, hidden, actions, adv


def row(opt_name: str, lr: float) -> dict:
    lora, hidden, actions, adv = _setup()
    params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    opt = (torch.optim.SGD if opt_name == "sgd" else torch.optim.Adam)(params, lr=lr)
    capo = CAPOLoss(grpo_loss, lora, opt, tau_h=math.inf, tau_f=math.inf)
    w = torch.full(actions.shape, 1 / actions.numel(), dtype=torch.float64)
    with torch.no_grad():
        z_old = lora(hidden)
    logp = torch.log_softmax(lora(hidden), -1).gather(-1, actions[..., None])[..., 0]
    (-(w * adv[:, None] * logp).sum()).backward()
    d1, d2 = capo.masker.direction.preview_with_second_order(capo.ascent_grad())
    pred = capo.predict_step(hidden, actions, adv, token_weights=w)
    opt.step()
    with torch.no_grad():
        z_new = lora(hidden)
    aug = torch.cat([hidden, torch.ones(*hidden.shape[:2], 1, dtype=hidden.dtype)], -1)
    change = lr * aug @ d1.T + lr**2 * aug @ d2.T
    old, new = torch.log_softmax(z_old, -1), torch.log_softmax(z_new, -1)
    ratio = (new - old).gather(-1, actions[..., None])[..., 0]
    return {
        "logit_err": float((change - (z_new - z_old)).abs().max()),
        "logit_change": float((z_new - z_old).abs().max()),
        "dj": (float(pred["delta_j"]), float((w * adv[:, None] * (ratio.exp() - 1)).sum())),
        "kl": (float(pred["kl"]), float((old.exp() * (old - new)).sum(-1).mean())),
    }


def main() -> None:
    print("| optimizer | lr | max logit err / max change | Delta J pred / true | KL pred / true |")
    print("|---|---|---|---|---|")
    for name, lrs in {"sgd": (1e-2, 5e-3, 2.5e-3), "adam": (1e-2, 5e-3, 2.5e-3)}.items():
        for lr in lrs:
            r = row(name, lr)
            print(
                f"| {name} | {lr:g} | {r['logit_err']:.1e} / {r['logit_change']:.1e} | "
                f"{r['dj'][0]:.6e} / {r['dj'][1]:.6e} | {r['kl'][0]:.4e} / {r['kl'][1]:.4e} |"
            )


if __name__ == "__main__":
    main()
