"""CAPOGRPOTrainer with TRL's rollout_func: accepted; an env_mask is refused at the generation
that brings it, before anything is trained on it.

TRL 1.16's rollout function returns ``prompt_ids``, ``completion_ids``, ``logprobs`` and optional
extra fields; an ``env_mask`` among them becomes TRL's ``tool_mask``, which CAPO's model of the
token weights does not cover. Whether a rollout function returns one is only known once it ran.
"""

import math

import pytest
import torch

pytest.importorskip("trl")

import trl_helpers as th  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from curvopt.integrations.trl import CAPOGRPOTrainer  # noqa: E402

INF = {"capo_tau_h": math.inf, "capo_tau_f": math.inf}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


def _rollout(env_mask=False, seen=None):
    """Random digit completions of random lengths (so that rewards differ within a group)."""

    def rollout(prompts, trainer):
        g = torch.Generator().manual_seed(1000 * trainer.state.global_step + len(prompts))
        tok = trainer.processing_class
        out = {"prompt_ids": [tok(p)["input_ids"] for p in prompts]}
        out["completion_ids"] = [
            torch.randint(0, 10, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 6, (len(prompts),), generator=g)
        ]
        out["logprobs"] = [[0.0] * len(ids) for ids in out["completion_ids"]]
        if env_mask:
            out["env_mask"] = [[1] * (len(ids) - 1) + [0] for ids in out["completion_ids"]]
        if seen is not None:
            seen.append(len(prompts))
        return out

    return rollout


def test_rollout_function_without_mask_equals_trl_bit_for_bit(tmp_path):
    cfg = {"max_steps": 2}
    ref = th.trainer(GRPOTrainer, tmp_path, rollout_func=_rollout(), cfg=cfg)
    ref.train()
    capo = th.trainer(
        CAPOGRPOTrainer, tmp_path, rollout_func=_rollout(), cfg=cfg, capo_predict_step=True, **INF
    )
    capo.train()
    assert [h["loss"] for h in capo.state.log_history[:2]] == [
        h["loss"] for h in ref.state.log_history[:2]
    ]
    assert capo.state.log_history[0]["capo/predicted_step_kl"] > 0
    assert ref.state.log_history[0]["grad_norm"] > 0  # the rollouts did train
    for (name, a), b in zip(ref.model.named_parameters(), capo.model.parameters()):
        assert torch.equal(a, b), name


def test_rollout_function_without_mask_is_masked_by_capo(tmp_path):
    capo = th.trainer(
        CAPOGRPOTrainer, tmp_path, rollout_func=_rollout(), cfg={"max_steps": 1}, capo_tau_f=0.0
    )
    capo.train()
    assert capo.state.log_history[0]["capo/rejected_fraction"] == 1.0  # tau_f = 0 keeps none


def test_env_mask_is_refused_at_the_first_generation_before_training(tmp_path):
    seen = []
    capo = th.trainer(
        CAPOGRPOTrainer,
        tmp_path,
        rollout_func=_rollout(env_mask=True, seen=seen),
        cfg={"max_steps": 1},
        capo_tau_f=1e-4,
    )
    before = [p.detach().clone() for p in capo.model.parameters()]
    with pytest.raises(ValueError, match="env_mask.*Nothing was trained on it"):
        capo.train()
    assert len(seen) == 1  # the first generation
    assert capo.state.global_step == 0
    for a, p in zip(before, capo.model.parameters()):
        assert torch.equal(a, p)
