"""CAPOConfig (YAML, TrlParser, parse_dict) and the refusals when the trainer is built."""

import math

import pytest
import torch

pytest.importorskip("trl")

import trl_helpers as th  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402
from trl import TrlParser  # noqa: E402

from curvopt.integrations.trl import CAPOConfig, CAPOGRPOTrainer  # noqa: E402


def _no_generation(monkeypatch):
    """Fail the test if anything is generated (refusals must come before any generation)."""

    def boom(*args, **kwargs):
        raise AssertionError("generated before refusing")

    monkeypatch.setattr(CAPOGRPOTrainer, "_generate_and_score_completions", boom)


def test_config_fields_are_read_and_keywords_win(tmp_path):
    args = th.config(
        tmp_path,
        cls=CAPOConfig,
        capo_tau_f=1e-4,
        capo_tau_h=0.01,
        capo_symmetric=False,
        capo_top_k=7,
        capo_mask_scope="all",
        capo_penalty="delta_kl",
        capo_penalty_coef=2.0,
    )
    trainer = th.trainer(CAPOGRPOTrainer, tmp_path, args=args)
    m = trainer.capo_masker
    assert (m.tau_f, m.tau_h, m.symmetric, m.top_k) == (1e-4, 0.01, False, 7)
    assert trainer.capo_mask_scope == "all"
    assert (trainer.capo_penalty.kind, trainer.capo_penalty.coef) == ("delta_kl", 2.0)
    assert trainer.capo_predict_step  # CAPO is on
    trainer = th.trainer(
        CAPOGRPOTrainer, tmp_path, args=args, capo_tau_f=math.inf, capo_mask_scope="policy_gradient"
    )
    assert trainer.capo_masker.tau_f == math.inf and trainer.capo_masker.tau_h == 0.01
    assert trainer.capo_mask_scope == "policy_gradient"


def test_trl_parser_yaml_and_parse_dict(tmp_path):
    yaml = tmp_path / "capo.yaml"
    yaml.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\ncapo_tau_f: 1.0e-4\ncapo_symmetric: false\n"
        "capo_mask_scope: all\ncapo_top_k: 50\n"
    )
    (cfg,) = TrlParser((CAPOConfig,)).parse_args_and_config(
        args=["--config", str(yaml), "--capo_tau_h", "0.01"]
    )
    assert isinstance(cfg, CAPOConfig)
    assert (cfg.capo_tau_f, cfg.capo_tau_h, cfg.capo_symmetric) == (1e-4, 0.01, False)
    assert (cfg.capo_mask_scope, cfg.capo_top_k) == ("all", 50)
    (cfg,) = TrlParser((CAPOConfig,)).parse_args_and_config(
        args=["--output_dir", str(tmp_path), "--use_cpu", "--capo_symmetric", "False"]
    )
    assert cfg.capo_symmetric is False and cfg.capo_tau_f == math.inf
    (cfg,) = HfArgumentParser(CAPOConfig).parse_dict(
        {"output_dir": str(tmp_path), "use_cpu": True, "capo_tau_f": 0.5, "capo_level": "sequence"}
    )
    assert cfg.capo_tau_f == 0.5 and cfg.capo_level == "sequence"


@pytest.mark.parametrize(
    ("setting", "value", "error", "match"),
    [
        ("capo_symmetric", "False", TypeError, "capo_symmetric must be a bool"),
        ("capo_predict_step", 1, TypeError, "capo_predict_step must be a bool"),
        ("capo_tau_f", "1e-4", TypeError, "capo_tau_f must be a number"),
        ("capo_tau_h", True, TypeError, "capo_tau_h must be a number"),
        ("capo_tau_f", math.nan, ValueError, "capo_tau_f must be a number >= 0"),
        ("capo_tau_h", -1.0, ValueError, "capo_tau_h must be a number >= 0"),
        ("capo_penalty_coef", math.nan, ValueError, "capo_penalty_coef must be a finite number"),
        ("capo_top_k", 2.5, TypeError, "capo_top_k must be a positive int"),
        ("capo_mask_scope", "tokens", ValueError, "capo_mask_scope must be one of"),
    ],
)
def test_bad_settings_are_refused_when_built(tmp_path, monkeypatch, setting, value, error, match):
    _no_generation(monkeypatch)
    with pytest.raises(error, match=match):
        th.trainer(CAPOGRPOTrainer, tmp_path, **{setting: value})
    with pytest.raises(error, match=match):
        th.config(tmp_path, cls=CAPOConfig, **{setting: value})


def test_tools_and_environments_are_refused_when_built(tmp_path, monkeypatch):
    """They always bring tool masks. (A rollout function may not: tests/integrations/
    test_capo_trl_rollout.py.)"""
    _no_generation(monkeypatch)

    def add(a: int, b: int) -> int:
        """Adds.

        Args:
            a: first
            b: second
        """
        return a + b

    class Env:
        def reset(self, **kwargs):
            return None

    for kw in (
        {"tools": [add]},
        {"environment_factory": Env},
    ):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"does not support {name}="):
            th.trainer(CAPOGRPOTrainer, tmp_path, capo_tau_f=1e-4, **kw)


def test_logit_scale_one_is_accepted_other_scales_refused(tmp_path):
    model = th.model()
    model.config.logit_scale = 1.0
    th.trainer(CAPOGRPOTrainer, tmp_path, model=model, capo_tau_f=1e-4)
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        th.trainer(CAPOGRPOTrainer, tmp_path, model=model, capo_tau_f=1e-4)
    del model.config.logit_scale
    model.config.logits_scaling = 1
    th.trainer(CAPOGRPOTrainer, tmp_path, model=model, capo_tau_f=1e-4)


def test_off_means_off_no_pass_and_no_hook(tmp_path, monkeypatch):
    """Infinite thresholds and no penalty: no CAPO pass, no backbone hook, no step hook."""
    trainer = th.trainer(CAPOGRPOTrainer, tmp_path, cfg={"max_steps": 1})
    assert not trainer.capo_active and not trainer.capo_predict_step

    def boom(*args, **kwargs):
        raise AssertionError("CAPO ran while off")

    monkeypatch.setattr(CAPOGRPOTrainer, "_capo_apply", boom)
    monkeypatch.setattr(CAPOGRPOTrainer, "_capo_before_step", boom)
    calls = []
    original = torch.nn.Module.register_forward_hook

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", spy)
    trainer.train()
    assert trainer.state.log_history[0]["capo/rejected_fraction"] == 0.0
    assert "GPT2Model" not in calls
