"""A GRPO training loop for small autoregressive policies, with optional CAPO masking.

One :meth:`GRPOTrainer.step`:

1. sample ``G`` completions of ``T`` tokens for each of ``P`` prompts (``N = P G`` rows, the
   ``G`` completions of a prompt are consecutive);
2. score them with ``reward_fn`` and form group-normalized advantages
   ``A_i = (r_i - mean_group(r)) / (std_group(r) + eps)`` (:func:`group_advantages`);
3. recompute the log-probabilities and final hidden states with gradients, build the token-level
   loss (GRPO clipped surrogate by default), masked by CAPO when a
   :class:`~curvopt.capo.masker.CAPOLoss` is given;
4. backward, update the CAPO direction model with the masked global gradient, optimizer step;
5. optionally measure the realized KL(pi_old || pi_new) of the step on the sampled tokens' positions
   (exact, over the full vocabulary), for the whole model and for the head alone.

The policy needs ``hidden_states(tokens)`` and ``head`` (see :mod:`curvopt.capo.sequence_policy`).

Example:
    >>> from curvopt.bench.tasks.addition import AdditionTask
    >>> from curvopt.capo.sequence_policy import GRUPolicy
    >>> task = AdditionTask(max_operand=9)
    >>> pol = GRUPolicy(task.vocab_size, 16)
    >>> trainer = GRPOTrainer(pol, torch.optim.Adam(pol.parameters(), 1e-3), group_size=4)
    >>> prompts, answers = task.sample(2)
    >>> out = trainer.step(prompts, task.answer_len,
    ...                    lambda c: task.reward(c, answers.repeat_interleave(4, 0)))
    >>> float(out['reward']) <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .lora_head import is_lora_head
from .loss import CAPOLoss
from .sequence_policy import sample_tokens
from .token_losses import grpo_loss


def group_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-normalized advantages for consecutive groups of ``group_size`` completions.

    Args:
        rewards: ``(N,)`` with ``N`` a multiple of ``group_size``.
        group_size: Completions per prompt ``G`` (``>= 2``).
        normalize_std: Divide by the group's standard deviation (GRPO); False gives the
            mean-centered Dr.GRPO advantages.
        eps: Added to the standard deviation.

    Returns:
        ``(N,)`` advantages; a group with equal rewards gets zeros.

    Example:
        >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, normalize_std=False)
        tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a vector (N,), got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide N={rewards.shape[0]}, got {group_size}"
        )
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def _kl_rows(logits_old: Tensor, logits_new: Tensor) -> Tensor:
    """Exact KL(softmax(old) || softmax(new)) per row."""
    lp_old = torch.log_softmax(logits_old, -1)
    lp_new = torch.log_softmax(logits_new, -1)
    return (lp_old.exp() * (lp_old - lp_new)).sum(-1)


class GRPOTrainer:
    """GRPO on a small token policy; CAPO masking when ``capo`` is given.

    Args:
        policy: Module with ``hidden_states(tokens)`` and ``head`` (an ``nn.Linear``, or a peft
            LoRA adapter on one: :mod:`curvopt.capo.lora_head`).
        optimizer: Any :mod:`torch.optim` optimizer over the policy's parameters.
        loss_fn: Token-level loss ``(logprobs, old_logprobs, advantages, mask) -> scalar``.
        group_size: Completions per prompt ``G``.
        capo: Optional :class:`~curvopt.capo.masker.CAPOLoss` (its ``loss_fn`` is used instead of
            ``loss_fn``).
        normalize_std: Divide advantages by the group standard deviation.
        num_iterations: Optimizer steps per batch of samples (``mu``; the ratio to the sampling
            policy is 1 in the first).
        track_kl: Measure the realized KL of each step (one extra forward pass) and, with CAPO,
            its prediction of the step's KL (diagnostics; off for timing).
        generator: Random generator for sampling.
    """

    def __init__(
        self,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., Tensor] = grpo_loss,
        group_size: int = 8,
        capo: CAPOLoss | None = None,
        normalize_std: bool = True,
        num_iterations: int = 1,
        track_kl: bool = True,
        generator: torch.Generator | None = None,
    ):
        head = getattr(policy, "head", None)
        if not (
            hasattr(policy, "hidden_states") and (isinstance(head, nn.Linear) or is_lora_head(head))
        ):
            raise TypeError(
                "policy must have hidden_states(tokens) and an nn.Linear head (or a LoRA "
                "adapter on one)"
            )
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {group_size}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {num_iterations}")
        if capo is not None and capo.head is not policy.head:
            raise ValueError("capo must be built on the policy's head")
        self.policy = policy
        self.optimizer = optimizer
        self.loss_fn = loss_fn if capo is None else capo.loss_fn
        self.group_size = group_size
        self.capo = capo
        self.normalize_std = normalize_std
        self.num_iterations = num_iterations
        self.track_kl = track_kl
        self.generator = generator

    def _forward(self, seq: Tensor, Lp: int, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.policy.hidden_states(seq[:, :-1])[:, Lp - 1 :]
        logits = self.policy.head(h)
        logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
        return h, logits, logp

    def step(
        self, prompts: Tensor, num_tokens: int, reward_fn: Callable[[Tensor], Tensor]
    ) -> dict[str, Tensor]:
        """One GRPO iteration on a batch of prompts.

        Args:
            prompts: ``(P, Lp)`` prompt tokens.
            num_tokens: Completion length ``T``.
            reward_fn: ``(P G, T)`` completions -> ``(P G,)`` rewards (prompt-major rows).

        Returns:
            0-d tensors: ``reward`` (mean), ``loss``, ``entropy`` (mean per token),
            ``rejected_fraction``, ``predicted_kl`` and ``predicted_delta_j`` (CAPO's last-layer
            model of the step's mean KL and of the change of the batch surrogate with token-mean
            weights; NaN without CAPO or ``track_kl``), ``realized_kl`` and ``realized_head_kl``
            (the step's mean KL for the whole model and for the head alone on the old hidden
            states; NaN when ``track_kl`` is off), ``mean_delta_kl_all``/``_kept`` and
            ``mean_abs_delta_j_all``/``_kept`` (CAPO's token predictions averaged over all valid
            tokens and over the kept ones; NaN without CAPO), ``penalty`` (the CAPO penalty term
            of the first iteration's loss; NaN without one).
        """
        G, Lp = self.group_size, prompts.shape[1]
        rep = prompts.repeat_interleave(G, 0)
        completions = sample_tokens(self.policy, rep, num_tokens, self.generator)
        rewards = reward_fn(completions).float()
        if rewards.shape != (rep.shape[0],):
            raise ValueError(f"reward_fn must return shape ({rep.shape[0]},), got {rewards.shape}")
        adv = group_advantages(rewards, G, self.normalize_std)
        seq = torch.cat([rep, completions], 1)
        valid = torch.ones_like(completions, dtype=torch.bool)
        nan = torch.tensor(float("nan"))
        out = {"reward": rewards.mean(), "rejected_fraction": torch.tensor(0.0)}
        capo_keys = ("mean_delta_kl_all", "mean_delta_kl_kept")
        capo_keys += ("mean_abs_delta_j_all", "mean_abs_delta_j_kept")
        out.update(dict.fromkeys(("predicted_kl", "predicted_delta_j", "penalty") + capo_keys, nan))
        old_logp = None
        for it in range(self.num_iterations):
            h, logits, logp = self._forward(seq, Lp, completions)
            if it == 0:
                old_logp, old_logits, old_h = logp.detach(), logits.detach(), h.detach()
                p = torch.softmax(old_logits, -1)
                out["entropy"] = -(p * torch.log_softmax(old_logits, -1)).sum(-1).mean()
            if self.capo is None:
                loss = self.loss_fn(logp, old_logp, adv, valid)
            else:
                # h with its graph: a CAPO penalty differentiates through it (the mask does not)
                loss, m = self.capo(logp, old_logp, adv, valid, h, completions)
                if it == 0:
                    st = m.stats()
                    out["rejected_fraction"] = st["rejected_fraction"]
                    if m.penalty is not None:
                        out["penalty"] = m.penalty
                    out.update({k: st[k] for k in capo_keys})
            self.optimizer.zero_grad()
            loss.backward()
            if self.capo is not None:
                if it == 0 and self.track_kl:
                    pred = self.capo.predict_step(old_h, completions, adv)
                    out["predicted_kl"], out["predicted_delta_j"] = pred["kl"], pred["delta_j"]
                self.capo.update_direction()
            self.optimizer.step()
            if it == 0:
                out["loss"] = loss.detach()
        out["realized_kl"] = out["realized_head_kl"] = nan
        if self.track_kl:
            with torch.no_grad():
                _, new_logits, _ = self._forward(seq, Lp, completions)
                out["realized_kl"] = _kl_rows(old_logits, new_logits).mean()
                out["realized_head_kl"] = _kl_rows(old_logits, self.policy.head(old_h)).mean()
        return out
