"""CAPO inside TRL: :class:`CAPOGRPOTrainer`, a drop-in subclass of ``trl.GRPOTrainer``.

CAPO (:mod:`curvopt.capo.masker`) only selects data: per token it predicts, from the policy's final
hidden state ``h_t``, its output layer ``W`` (``model.get_output_embeddings()``, any
``nn.Linear``, tied or not) and the trainer's real optimizer, the change ``Delta J_t`` of the
objective and ``Delta KL_t`` of the policy that the token's gradient would cause, and keeps the
token iff ``|Delta J_t| < tau_H`` and ``Delta KL_t < tau_F``. The loss form, its normalization
and all of TRL's options stay TRL's.

**Mask scope** (``capo_mask_scope``). ``"policy_gradient"`` (the default): the keep mask gates
only the policy-gradient (advantage) term. TRL's per-token loss is
``l_t = pg_t(A) + beta kl_t`` and its loss ``agg_m(l) - c H_m`` with ``m`` TRL's completion mask;
CAPO hands TRL the advantages ``A_{b,t} = A_b keep_{b,t}`` (shape ``(B, T)``, which TRL
accepts), and every supported loss type's ``pg_t`` is exactly zero, value and gradient, at a zero
advantage. So a rejected token keeps its KL penalty and entropy bonus, the normalizers are TRL's
(over ``m``), and TRL's ``entropy``/``kl`` metrics, the top-entropy filter, the off-policy mask
and the adaptive entropy controller see ``m``. (TRL's ``clip_ratio/*`` metrics count a rejected
token as unclipped: its advantage term is gone.) ``"all"``: the keep mask multiplies TRL's
completion mask before TRL's loss (the CAPO recipe, whose ``beta = 0`` and no entropy bonus make
the two scopes differ only in the normalizer): a rejected token loses every term.

**Off means off.** With both thresholds infinite and no active penalty the loss is computed by
``trl.GRPOTrainer`` alone (no hook, no extra pass, no step prediction unless
``capo_predict_step=True``); ``capo/rejected_fraction`` is logged as 0.

**How it hooks in.** ``_compute_loss`` hands TRL a private copy of the completion mask (TRL's
buffered batch is never changed). During TRL's own forward pass a forward hook on the backbone
(``model.base_model``) records its last hidden state (TRL's fused LM head reads the head's
weight directly; there is no extra forward of the transformer), and right
after the forward, before TRL forms the loss, the CAPO mask is computed in one no-grad pass over
last-layer quantities, chunked over tokens (memory ``O(chunk K H)``; no extra backward), and
applied to the advantages (or, scope ``"all"``, multiplied into that mask in place). TRL
divides the logits by its ``temperature``; the model does the same
(:meth:`~curvopt.capo.masker.CAPOMasker.predict`). With both thresholds infinite the loss and
gradients equal ``trl.GRPOTrainer``'s bit for bit.

**Optimizer.** The update is modeled from the trainer's real optimizer
(:func:`~curvopt.capo.direction.direction_for`: ``torch.optim.SGD`` with momentum, dampening,
nesterov and weight decay, ``Adam``/``AdamW`` with coupled or decoupled decay and AMSGrad),
reading its hyperparameters, learning rate and state (moments, buffers, step) as they are before
the coming step. Any other optimizer raises a ``TypeError`` when the trainer is built (an
optimizer passed in ``optimizers=``) or when training creates it (``args.optim``).

**Loss types.** ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo`` (TRL's default), ``cispo`` and ``sapo``
with ``importance_sampling_level="token"``: all are token-level and their gradient at ratio 1 is
the token's ``A grad log pi`` times its token weight ``w_t`` (``cispo``: times
``min(1, epsilon_high)``, its clamp of the detached ratio), which is what CAPO models. ``luspo``,
``vespo`` and sequence-level importance sampling are refused (their weights couple the tokens of a
completion), as are Liger's fused loss and tool/environment masks: ``tools=`` and
``environment_factory=`` are refused when the trainer is built. A ``rollout_func=`` is accepted;
its ``env_mask`` (TRL's ``tool_mask``) can only be seen once it ran, so the first generation
whose output carries one raises a ``ValueError``, before any training on it. ``dapo`` and
``cispo`` keep TRL's normalizer, the number of completion tokens of the global batch counted
before masking.

**LoRA / peft.** CAPO's per-token rule models the update of the output layer, so it needs a
trained head. With LoRA on the body and the full head trained (peft's
``modules_to_save=['lm_head']``) the head CAPO models is the adapter's trained copy (the module
whose weight the logits use): the same exact last-layer model as for a plain model. With a
frozen head (adapters on the body only) the KL budget works (its predictor is the whole-model
JVP of :mod:`curvopt.capo.whole_model`; for such a step it is within 2 % of the realized KL up
to Adam lr 1e-3 on the tiny GPT-2, ``benchmarks/capo_frozen_head.py``); thresholds, penalties
and ``capo_predict_step=True`` are refused when the trainer is built (each token's own
``Delta KL_t`` through the body would take one forward-mode pass per token). TRL 1.16 refuses a
LoRA adapter on ``lm_head`` (it reads ``lm_head.weight`` directly); the trainer says so first,
pointing to :class:`~curvopt.capo.loss.CAPOLoss`, which models such a head exactly
(:mod:`curvopt.capo.lora_head`).

**Penalties** (``capo_penalty``, off in the CAPO recipe): ``lambda sum_t w_t q_t`` with ``q_t``
the token's ``Delta KL_t``, ``Delta J_t`` or ``|Delta J_t|`` rebuilt with autograd from the
recorded final hidden states (kept with their graph) and the head, ``w_t`` the loss type's token
weights on the kept tokens (normalized over TRL's mask, or over the kept tokens in scope
``"all"``), is added to TRL's loss (:mod:`curvopt.capo.penalty`); it is
logged as ``capo/penalty`` (the term added to each micro-batch's loss).

**KL budget** (``capo_kl_budget=delta``, off by default). A trust region on the step, not a
token mask: at each optimizer step (after accumulation and clipping) the coming step
``Delta theta`` of every trainable parameter is read off a trial step of the real optimizer (the
parameters and its state are then put back), its whole-model KL over the window's completion
tokens is predicted with one forward-mode pass per micro-batch
(:func:`~curvopt.capo.whole_model.predict_step_kl`; eager attention, activation checkpointing
off for that pass), and every param group's lr is multiplied by
``s = min(1, sqrt(delta / KL_hat))`` for this step (SGD's and Adam's steps are linear in the lr,
their KL quadratic). Logged as ``capo/predicted_whole_kl`` (before scaling) and
``capo/kl_budget_scale``. Cost per step: one optimizer step, one forward-mode pass per
micro-batch, a copy of the parameters and the optimizer state. It combines with the mask.
Under data parallelism the prediction averages over every process's tokens (one scale for all);
FSDP and DeepSpeed (sharded parameters, which forward-mode AD does not support) are refused
when the trainer is built.

**Settings** come as trainer keywords or as the fields of :class:`CAPOConfig` (a
``GRPOConfig``, so TRL's YAML files, ``TrlParser`` and ``from_dict`` reach them); a keyword
wins. They are checked strictly when the trainer (or the config) is built, before any generation:
a bool must be a bool (not ``"False"``), a number a number, thresholds ``>= 0`` and not NaN.

**Logged metrics** (through the trainer's metrics, averaged per logging step):
``capo/rejected_fraction`` (of the valid completion tokens, across processes),
``capo/mean_delta_kl_all``/``_kept`` and ``capo/mean_abs_delta_j_all``/``_kept`` (token
predictions over all valid and over the kept tokens), and, at each optimizer step (a
``torch.optim`` step pre-hook, after gradient clipping and accumulation),
``capo/predicted_step_kl`` and ``capo/predicted_delta_j``: the last-layer model of the coming
step's mean KL over the completion tokens and of the change of the loss's surrogate
``sum_t w_t A_t pi_new/pi_old`` (``w_t`` the loss type's token weights over the kept tokens)
(:meth:`~curvopt.capo.masker.CAPOMasker.predict_update`).

Example:
    >>> from curvopt.integrations.trl import CAPOGRPOTrainer
    >>> CAPOGRPOTrainer.SUPPORTED_LOSS_TYPES
    ('grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo')
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from trl import GRPOConfig, GRPOTrainer

from curvopt.capo.direction import direction_for, find_param_group, unwrap_optimizer
from curvopt.capo.lora_head import is_lora_head
from curvopt.capo.masker import CAPOMasker
from curvopt.capo.penalty import CAPOPenalty
from curvopt.capo.whole_model import budget_scale, check_budget, predict_step_kl, trial_step

__all__ = ["CAPOConfig", "CAPOGRPOTrainer", "capo_settings"]


_UNSET: Any = object()  # a keyword not given (the CAPOConfig field or the default applies)

MASK_SCOPES = ("policy_gradient", "all")

#: Every CAPO setting, its default, and its kind (checked strictly: a bool must be a bool, a
#: number a number; YAML / ``TrlParser`` already turn ``"false"`` into ``False`` for bool fields).
_SETTINGS: dict[str, tuple[Any, str]] = {
    "capo_tau_h": (math.inf, "threshold"),
    "capo_tau_f": (math.inf, "threshold"),
    "capo_symmetric": (True, "bool"),
    "capo_top_k": (200, "int_or_none"),
    "capo_level": ("token", "str"),
    "capo_chunk_size": (None, "int_or_none"),
    "capo_predict_step": (None, "bool_or_none"),
    "capo_penalty": ("none", "str"),
    "capo_penalty_coef": (0.0, "number"),
    "capo_mask_scope": ("policy_gradient", "str"),
    "capo_kl_budget": (None, "budget"),
}


def _check_setting(name: str, value: Any, kind: str) -> Any:
    hint = f"pass {name}= as a Python value (or set the field of CAPOConfig)"
    if kind in ("bool", "bool_or_none"):
        if value is None and kind == "bool_or_none":
            return None
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {value!r}; {hint}")
        return value
    if kind in ("threshold", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if kind == "number" and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if math.isnan(value) or value < 0:
            raise ValueError(
                f"{name} must be a number >= 0 (math.inf switches a threshold off), got {value}"
            )
        return value
    if kind == "budget":
        return check_budget(value, name)
    if kind == "int_or_none":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TypeError(f"{name} must be a positive int or None, got {value!r}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    if name == "capo_mask_scope" and value not in MASK_SCOPES:
        raise ValueError(f"capo_mask_scope must be one of {', '.join(MASK_SCOPES)}; got {value!r}")
    return value


def capo_settings(args: Any = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """CAPO's validated settings: keyword ``overrides`` > the fields of ``args`` > the defaults.

    Args:
        args: The trainer's config; a :class:`CAPOConfig` (or anything with ``capo_*``
            attributes) provides the fields, anything else (a plain ``GRPOConfig``) none.
        overrides: ``capo_*`` keywords given to the trainer.

    Returns:
        A dict with every ``capo_*`` setting, types checked (bools are bools, numbers are
        numbers, ``>= 0`` and not NaN, scopes known).

    Raises:
        TypeError: For an unknown setting or a value of the wrong type.
        ValueError: For a negative or NaN number or an unknown mask scope.

    Example:
        >>> capo_settings(overrides={"capo_tau_f": 1e-4})["capo_mask_scope"]
        'policy_gradient'
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(_SETTINGS)
    if unknown:
        raise TypeError(f"unknown CAPO settings {sorted(unknown)}; known: {sorted(_SETTINGS)}")
    out = {}
    for name, (default, kind) in _SETTINGS.items():
        value = overrides.get(name, getattr(args, name, default))
        out[name] = _check_setting(name, value, kind)
    return out


def _trainer_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``trl.GRPOTrainer``'s arguments by name, however they were passed."""
    signature = inspect.signature(GRPOTrainer.__init__)
    return dict(signature.bind_partial(None, *args, **kwargs).arguments)


def _refuse_masks_at_construction(given: dict[str, Any]) -> None:
    for name in ("tools", "environment_factory"):
        if given.get(name):
            raise ValueError(
                f"CAPOGRPOTrainer does not support {name}=: tools and environments bring "
                "tool/environment masks (tool_mask), which CAPO's model of the token weights "
                "does not cover; use trl.GRPOTrainer for them"
            )


_MASKED_ROLLOUT = (
    "CAPOGRPOTrainer does not support tool/environment masks: this rollout_func returned an "
    "env_mask (TRL's tool_mask), which CAPO's model of the token weights does not cover. "
    "Nothing was trained on it. Return no env_mask, or use trl.GRPOTrainer"
)


def _targets_lm_head(target_modules: Any) -> bool:
    """Whether a peft ``target_modules`` (a name list, or a regex string) selects ``lm_head``."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return target_modules == "lm_head" or re.fullmatch(target_modules, "lm_head") is not None
    return any(str(t) == "lm_head" or str(t).endswith(".lm_head") for t in target_modules)


def _refuse_lora_head_at_construction(given: dict[str, Any]) -> None:
    """TRL refuses an adapter on ``lm_head``; say so, and where CAPO models it, before TRL."""
    model = given.get("model")
    on_head = isinstance(model, nn.Module) and is_lora_head(model.get_output_embeddings())
    on_head = on_head or _targets_lm_head(getattr(given.get("peft_config"), "target_modules", None))
    if on_head:
        raise ValueError(
            "a LoRA adapter on lm_head cannot be trained by TRL: trl.GRPOTrainer (1.16) refuses "
            "it, because it computes the log-probabilities from lm_head.weight directly and the "
            "adapter would never be trained. CAPO models a LoRA head exactly in curvopt's own "
            "loop: curvopt.capo.CAPOLoss(loss_fn, <the peft lora.Linear head>, optimizer, ...) "
            "(see curvopt.capo.lora_head). With TRL, put LoRA on the body and train the whole "
            "head: LoraConfig(..., modules_to_save=['lm_head'])"
        )


def _trained_head(head: nn.Module) -> nn.Module:
    """The module whose weight the policy's logits use.

    A peft ``ModulesToSaveWrapper`` (``modules_to_save=['lm_head']``) trains and uses its active
    adapter's copy; any other module is returned as is.
    """
    copies = getattr(head, "modules_to_save", None)
    if copies is None or not hasattr(head, "original_module"):
        return head
    active = head.active_adapter
    active = active if isinstance(active, str) else active[0]
    trained = copies[active]
    if head.weight is not trained.weight:
        raise TypeError(
            "peft's lm_head wrapper does not use its active adapter's copy; CAPO cannot tell "
            "which weight the logits use"
        )
    return trained


def _check_frozen_head(settings: dict[str, Any], penalty_on: bool) -> None:
    """A frozen head supports the KL budget only; refuse the per-token rule, saying why."""
    wants = [
        name
        for name, on in (
            (
                "a finite capo_tau_h/capo_tau_f",
                any(math.isfinite(settings[k]) for k in ("capo_tau_h", "capo_tau_f")),
            ),
            ("capo_penalty", penalty_on),
            ("capo_predict_step=True", settings["capo_predict_step"] is True),
        )
        if on
    ]
    if wants:
        raise ValueError(
            f"this model's output layer (lm_head) is frozen (requires_grad=False; e.g. LoRA on "
            f"the body only), and {' and '.join(wants)} needs CAPO's per-token model of the "
            "head's update: with a frozen head every token moves the policy through the body "
            "only, and predicting each token's own Delta KL_t there would take one forward-mode "
            "pass per token. With a frozen head CAPOGRPOTrainer offers capo_kl_budget= (the "
            "whole-model JVP predictor of the step's KL, curvopt.capo.whole_model). For the "
            "per-token rule, train the head: LoraConfig(..., modules_to_save=['lm_head'])"
        )


@dataclass
class CAPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` with CAPO's settings, read by :class:`CAPOGRPOTrainer`.

    Every ``capo_*`` keyword of the trainer is a field here, so the settings can come from
    TRL's YAML files, ``TrlParser`` command lines or ``from_dict``; a keyword given to the
    trainer wins over the field. Types are checked strictly when the config is built.

    Example:
        >>> cfg = CAPOConfig("/tmp/capo-doc", use_cpu=True, bf16=False, capo_tau_f=1e-4)
        >>> cfg.capo_tau_f, cfg.capo_mask_scope
        (0.0001, 'policy_gradient')
    """

    capo_tau_h: float = field(
        default=math.inf, metadata={"help": "Threshold on |Delta J_t| (inf: off)."}
    )
    capo_tau_f: float = field(default=math.inf, metadata={"help": "Threshold on Delta KL_t."})
    capo_symmetric: bool = field(
        default=True, metadata={"help": "Keep iff |Delta J| < tau_h (else 0 <= Delta J < tau_h)."}
    )
    capo_top_k: int | None = field(
        default=200, metadata={"help": "Softmax support size K of the model (None: all)."}
    )
    capo_level: str = field(
        default="token", metadata={"help": "Mask level: token, sequence or global."}
    )
    capo_chunk_size: int | None = field(
        default=None, metadata={"help": "Tokens per chunk of the no-grad pass (None: auto)."}
    )
    capo_predict_step: bool | None = field(
        default=None,
        metadata={"help": "Log each step's predicted KL / Delta J (None: iff CAPO is on)."},
    )
    capo_penalty: str = field(
        default="none", metadata={"help": "none, delta_kl, delta_j or abs_delta_j."}
    )
    capo_penalty_coef: float = field(default=0.0, metadata={"help": "Penalty coefficient."})
    capo_mask_scope: str = field(
        default="policy_gradient",
        metadata={"help": "What CAPO's mask gates: policy_gradient (default) or all."},
    )

    capo_kl_budget: float | None = field(
        default=None,
        metadata={"help": "Scale each step so its predicted whole-model KL fits (None: off)."},
    )

    def __post_init__(self):
        super().__post_init__()
        capo_settings(self)


class CAPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with CAPO's curvature-aware token mask.

    Takes every argument of ``trl.GRPOTrainer`` plus CAPO's settings as keywords.

    Args:
        *args: Passed to ``trl.GRPOTrainer``.
        capo_tau_h: Threshold on ``|Delta J_t|`` (``math.inf`` disables the rule).
        capo_tau_f: Threshold on ``Delta KL_t`` (``math.inf`` disables the rule).
        capo_symmetric: Keep iff ``|Delta J| < tau_h`` (True) or ``0 <= Delta J < tau_h``.
        capo_top_k: Size ``K`` of the per-position softmax support of the model (the authors'
            code uses 200; clipped to the vocabulary; ``None``: the whole vocabulary).
        capo_level: ``"token"`` (the CAPO recipe), ``"sequence"`` or ``"global"`` mask
            (:class:`~curvopt.capo.masker.CAPOMasker`).
        capo_chunk_size: Tokens per chunk of the no-grad pass (``None``: automatic).
        capo_predict_step: Log the predicted KL and ``Delta J`` of every optimizer step (one more
            no-grad pass over the step's hidden states, at the step). ``None`` (the default): on
            iff CAPO is on (a finite threshold or an active penalty).
        capo_penalty: ``"none"`` (the CAPO recipe), ``"delta_kl"``, ``"delta_j"`` or
            ``"abs_delta_j"``: add ``capo_penalty_coef * sum_t w_t q_t`` to TRL's loss, ``q_t``
            the token's prediction rebuilt with autograd from the policy's final hidden state and
            the head (:mod:`curvopt.capo.penalty`), ``w_t`` the loss type's token weights
            over the kept tokens. Combines with the mask (infinite thresholds: penalty only).
        capo_penalty_coef: ``lambda >= 0``; 0 switches the penalty off (TRL's loss bit for bit).
        capo_mask_scope: ``"policy_gradient"`` (default: the mask gates the advantage term only)
            or ``"all"`` (it multiplies TRL's completion mask: every term of a rejected token).
        capo_kl_budget: ``delta > 0``: scale each step's lr so that the step's predicted
            whole-model KL is at most ``delta`` (see the module's "KL budget"); None: off.
        **kwargs: Passed to ``trl.GRPOTrainer``.

    Every ``capo_*`` keyword not given is read from ``args`` when it is a :class:`CAPOConfig`.

    Raises:
        ValueError: For an unsupported loss type, sequence-level importance sampling, Liger's
            fused loss, negative or NaN thresholds, an unknown mask scope, tools or
            environments, scaled logits (a scale other than 1), a LoRA adapter on ``lm_head``
            (TRL cannot train it), thresholds or a penalty with a frozen head; at the first
            generation whose ``rollout_func`` output carries an ``env_mask``.
        TypeError: For a setting of the wrong type (a string where a bool belongs), a model
            whose output embeddings are not an ``nn.Linear``, or an optimizer CAPO has no
            model of.
    """

    SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")

    def __init__(
        self,
        *args: Any,
        capo_tau_h: float = _UNSET,
        capo_tau_f: float = _UNSET,
        capo_symmetric: bool = _UNSET,
        capo_top_k: int | None = _UNSET,
        capo_level: str = _UNSET,
        capo_chunk_size: int | None = _UNSET,
        capo_predict_step: bool | None = _UNSET,
        capo_penalty: str = _UNSET,
        capo_penalty_coef: float = _UNSET,
        capo_mask_scope: str = _UNSET,
        capo_kl_budget: float | None = _UNSET,
        **kwargs: Any,
    ):
        given = {
            "capo_tau_h": capo_tau_h,
            "capo_tau_f": capo_tau_f,
            "capo_symmetric": capo_symmetric,
            "capo_top_k": capo_top_k,
            "capo_level": capo_level,
            "capo_chunk_size": capo_chunk_size,
            "capo_predict_step": capo_predict_step,
            "capo_penalty": capo_penalty,
            "capo_penalty_coef": capo_penalty_coef,
            "capo_mask_scope": capo_mask_scope,
            "capo_kl_budget": capo_kl_budget,
        }
        parent_args = _trainer_arguments(args, kwargs)
        given = {k: v for k, v in given.items() if v is not _UNSET}
        settings = capo_settings(parent_args.get("args"), given)
        #: The validated CAPO settings (keyword > :class:`CAPOConfig` field > default).
        self.capo_options = settings
        _refuse_masks_at_construction(parent_args)
        _refuse_lora_head_at_construction(parent_args)
        # validates the thresholds, top_k, level and chunk size before the (slow) parent init
        self.capo_masker = CAPOMasker(
            settings["capo_tau_h"],
            settings["capo_tau_f"],
            top_k=settings["capo_top_k"],
            symmetric=settings["capo_symmetric"],
            chunk_size=settings["capo_chunk_size"],
            level=settings["capo_level"],
        )
        self.capo_penalty = CAPOPenalty(settings["capo_penalty"], settings["capo_penalty_coef"])
        self.capo_mask_scope = settings["capo_mask_scope"]
        #: ``delta``: the coming step is scaled so that its predicted whole-model KL is at most
        #: ``delta`` (None: off). See :meth:`_capo_fit_budget`.
        self.capo_kl_budget = settings["capo_kl_budget"]
        self._capo_budget_window: list[dict] = []
        self._capo_budget_hooks: list = []
        self._capo_lr_restore: list[float] | None = None
        self._capo_in_trial = False
        masking = math.isfinite(settings["capo_tau_h"]) or math.isfinite(settings["capo_tau_f"])
        predict = settings["capo_predict_step"]
        on = masking or self.capo_penalty.active
        self.capo_predict_step = on if predict is None else predict
        self._capo_penalty_term: Tensor | None = None
        self._capo_pending: dict | None = None
        self._capo_window: list[dict] = []
        self._capo_bound: torch.optim.Optimizer | None = None
        self._capo_hook = None
        #: The last optimizer step's predictions (``kl``, ``delta_j``) and the micro-batches'
        #: ``hidden``, ``valid`` and ``keep`` they were made from (for diagnostics and tests).
        self.capo_last_step: dict | None = None
        super().__init__(*args, **kwargs)
        if self.loss_type not in self.SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"CAPOGRPOTrainer supports the token-level loss types "
                f"{', '.join(self.SUPPORTED_LOSS_TYPES)}; got loss_type={self.loss_type!r}"
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                "CAPOGRPOTrainer needs importance_sampling_level='token' (CAPO models token-level "
                f"updates); got {self.importance_sampling_level!r}"
            )
        if getattr(self.args, "use_liger_kernel", False):
            raise ValueError("CAPOGRPOTrainer does not support use_liger_kernel (fused loss)")
        sharded = [n for n in ("fsdp", "deepspeed") if getattr(self, f"is_{n}_enabled", False)]
        if self.capo_kl_budget is not None and sharded:
            raise ValueError(
                f"capo_kl_budget does not support {sharded[0]} (sharded parameters): torch's "
                "forward-mode AD, which predicts the step's KL, has no rule for sharded "
                "parameters; use data parallelism (DDP), where the prediction averages over "
                "every process's tokens"
            )
        head = _trained_head(self.model.get_output_embeddings())
        if not isinstance(head, nn.Linear):
            raise TypeError(
                "CAPO needs a causal LM whose output layer (get_output_embeddings()) is an "
                f"nn.Linear; got {type(head).__name__}"
            )
        #: False for a frozen head (e.g. LoRA on the body only): only the KL budget applies.
        self.capo_head_trained = bool(head.weight.requires_grad)
        if not self.capo_head_trained:
            _check_frozen_head(settings, self.capo_penalty.active)
            self.capo_predict_step = False
        self.capo_head = head
        if self.capo_masker.top_k is not None:
            self.capo_masker.top_k = min(self.capo_masker.top_k, head.weight.shape[0])
        # TRL >= 1.16 scores tokens with a fused LM head that runs the backbone and then reads the
        # head's weight directly (the head module is never called): record the backbone's output.
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._capo_backbone = base.base_model
        if self._capo_backbone is base:
            raise TypeError("CAPO needs a causal LM with a separate backbone (model.base_model)")
        text_config = base.config.get_text_config()
        if getattr(text_config, "final_logit_softcapping", None) is not None:
            raise ValueError("CAPO's linear-logit model does not cover final_logit_softcapping")
        scale = next(
            (
                getattr(text_config, k)
                for k in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                if getattr(text_config, k, None) is not None
            ),
            None,
        )
        divisor = getattr(text_config, "logits_scaling", None)
        if (scale is not None and float(scale) != 1.0) or (
            divisor is not None and float(divisor) != 1.0
        ):
            raise ValueError(
                "CAPO's linear-logit model does not cover scaled logits (logit_scale="
                f"{scale}, logits_scaling={divisor}); only a scale of 1 is supported"
            )
        if self.optimizer is not None:
            self._capo_bind(self.optimizer)

    # --- optimizer ---------------------------------------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Create the optimizer as the parent does, then bind CAPO's model of its update."""
        optimizer = (
            super().create_optimizer(model) if model is not None else super().create_optimizer()
        )
        self._capo_bind(optimizer)
        return optimizer

    def _capo_bind(self, optimizer: torch.optim.Optimizer) -> None:
        opt = unwrap_optimizer(optimizer)
        if opt is self._capo_bound:
            return
        if self.capo_head_trained:  # a frozen head has no update to model (KL budget only)
            direction = direction_for(opt, self.capo_head.weight, self.capo_head.bias)
            self.capo_masker.direction = direction
        if self._capo_hook is not None:
            self._capo_hook.remove()
        self._capo_bound = opt
        for hook in self._capo_budget_hooks:
            hook.remove()
        self._capo_budget_hooks = []
        if self.capo_kl_budget is not None:  # first: the step predictions see the scaled lr
            self._capo_budget_hooks = [
                opt.register_step_pre_hook(self._capo_fit_budget),
                opt.register_step_post_hook(self._capo_restore_lr),
            ]
        if self.capo_predict_step:
            self._capo_hook = opt.register_step_pre_hook(self._capo_before_step)

    @property
    def capo_active(self) -> bool:
        """Whether CAPO changes anything: a finite threshold, an active penalty or a KL budget.

        When off, the loss is ``trl.GRPOTrainer``'s with no extra pass (unless step predictions
        were asked for with ``capo_predict_step=True``).
        """
        return self._capo_masking or self.capo_kl_budget is not None

    @property
    def _capo_masking(self) -> bool:
        m = self.capo_masker
        return math.isfinite(m.tau_h) or math.isfinite(m.tau_f) or self.capo_penalty.active

    def _capo_needs_pass(self) -> bool:
        """Whether this micro-batch's loss needs CAPO (training, an optimizer, and CAPO on)."""
        if self._capo_bound is None or not self.model.training:
            return False
        return self._capo_masking or self.capo_predict_step

    def _capo_lr(self) -> float:
        return float(find_param_group(self._capo_bound, self.capo_head.weight)["lr"])

    def _generate_and_score_completions(self, inputs):
        """TRL's generation, refusing a rollout function's ``env_mask`` before any training.

        A ``rollout_func`` may return an ``env_mask`` (TRL's ``tool_mask``) that can only be
        seen once it has run; the first generation that carries one raises a ``ValueError``.
        """
        output = super()._generate_and_score_completions(inputs)
        if "tool_mask" in output:
            raise ValueError(_MASKED_ROLLOUT)
        return output

    # --- the mask ----------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self.capo_kl_budget is not None and self.model.training and not self._capo_in_trial:
            self._capo_budget_window.append(
                {k: inputs[k] for k in ("prompt_ids", "prompt_mask", "completion_ids")}
                | {"completion_mask": inputs["completion_mask"]}
            )
        if not self._capo_needs_pass():
            if self._capo_bound is not None and self.model.training:  # no mask: rejects nothing
                self._metrics["train"]["capo/rejected_fraction"].append(0.0)
            return super()._compute_loss(model, inputs)
        inputs = dict(inputs)
        inputs["completion_mask"] = inputs["completion_mask"].clone()
        self._capo_pending = inputs
        try:
            loss = super()._compute_loss(model, inputs)
            penalty = self._capo_penalty_term
        finally:
            self._capo_pending = None
            self._capo_penalty_term = None
        if penalty is not None:
            loss = loss + penalty
            self._metrics["train"]["capo/penalty"].append(float(penalty.detach()))
        return loss

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        pending, self._capo_pending = self._capo_pending, None
        if pending is None:  # old/ref log-probs, evaluation
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        captured: list[Tensor] = []
        with_graph = self.capo_penalty.active  # the penalty differentiates through h_t

        def record(module, hook_args, output):
            h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            h = h if with_graph else h.detach()
            captured.append(h[:, :-1][:, -logits_to_keep:])

        handle = self._capo_backbone.register_forward_hook(record)
        try:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            handle.remove()
        hidden = torch.cat(captured, 0)
        mask = pending["completion_mask"]
        if hidden.shape[:2] != mask.shape:
            raise RuntimeError(
                f"captured hidden states {tuple(hidden.shape)} do not match the completion mask "
                f"{tuple(mask.shape)}"
            )
        advantages = pending["advantages"]  # TRL's, before the mask scope gates them
        keep = self._capo_apply(pending, hidden.detach())
        if with_graph:
            self._capo_penalty_term = self._capo_penalty(pending, hidden, keep, advantages)
        return out

    def _capo_penalty(
        self, inputs: dict, hidden: Tensor, keep: Tensor, advantages: Tensor
    ) -> Tensor:
        """``lambda sum_t w_t q_t`` of one micro-batch, the loss type's weights over ``keep``."""
        head = self.capo_head
        return self.capo_penalty(
            self.capo_masker,
            head.weight,
            hidden.to(head.weight.dtype),
            inputs["completion_ids"],
            advantages,
            self._capo_lr(),
            self._capo_token_weights(inputs, keep),
            head.bias,
            temperature=self.temperature,
        )

    @torch.no_grad()
    def _capo_apply(self, inputs: dict, hidden: Tensor) -> Tensor:
        """Compute one micro-batch's CAPO mask, multiply it into ``completion_mask``, return it.

        The returned tensor is the bool ``(B, T)`` mask of the kept tokens.
        """
        mask = inputs["completion_mask"]
        valid = mask.bool()
        actions = inputs["completion_ids"]
        advantages = inputs["advantages"]
        head = self.capo_head
        hidden = hidden.to(head.weight.dtype)
        out = self.capo_masker(
            head.weight,
            hidden,
            actions,
            advantages,
            self._capo_lr(),
            head.bias,
            valid,
            temperature=self.temperature,
        )
        if self.capo_mask_scope == "all":
            mask.mul_(out.keep.to(mask.dtype))
        elif not bool(out.keep[valid].all()):
            # gate the advantage only: TRL reads inputs["advantages"] after this forward, and a
            # zero advantage zeroes every supported loss type's policy-gradient term (value and
            # gradient) while the KL penalty, the entropy bonus and the metrics keep the mask
            adv = advantages[:, None] if advantages.dim() == 1 else advantages
            inputs["advantages"] = adv * out.keep.to(adv.dtype)
        stats = out.stats()
        keys = ("mean_delta_kl_all", "mean_delta_kl_kept", "mean_abs_delta_j_all")
        keys += ("mean_abs_delta_j_kept",)
        counts = torch.stack([stats["num_valid"] - stats["num_kept"], stats["num_valid"]]).float()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        values = torch.cat([counts, torch.stack([stats[k].float() for k in keys])]).tolist()
        metrics = self._metrics["train"]
        metrics["capo/rejected_fraction"].append(values[0] / max(values[1], 1.0))
        for key, value in zip(keys, values[2:]):
            metrics[f"capo/{key}"].append(value)
        if self.capo_predict_step:
            self._capo_window.append(
                {
                    "hidden": hidden,
                    "actions": actions,
                    "advantages": advantages,
                    "valid": valid,
                    "keep": out.keep,
                    "weights": self._capo_token_weights(inputs, out.keep),
                }
            )
        return out.keep

    def _capo_token_weights(self, inputs: dict, keep: Tensor) -> Tensor:
        """Weights ``w_t`` with TRL's loss ``~ -sum_t w_t A_t r_t`` for this micro-batch."""
        k = keep.float()
        # the normalizer's tokens: the kept ones when the mask gates everything, else TRL's own
        n = k if self.capo_mask_scope == "all" else inputs["completion_mask"].float()
        accum = self.current_gradient_accumulation_steps
        if self.loss_type in ("grpo", "sapo"):
            return k / n.sum(-1, keepdim=True).clamp(min=1) / (k.shape[0] * accum)
        if self.loss_type == "bnpo":
            return k / n.sum().clamp(min=1) / accum
        if self.loss_type == "dr_grpo":
            return k / (k.shape[0] * self.max_completion_length * accum)
        # dapo, cispo: TRL's normalizer, rescaled from the generation batch to one accumulation
        # window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        w = k / (normalizer * accum / self.args.steps_per_generation)
        if self.loss_type == "cispo":  # its detached ratio is clamped at epsilon_high
            w = w * min(1.0, float(self.epsilon_high))
        return w

    # --- step-level predictions ---------------------------------------------------------------

    @torch.no_grad()
    def _capo_before_step(self, optimizer, args, kwargs) -> None:
        if self._capo_in_trial:  # the KL budget's trial step
            return
        window, self._capo_window = self._capo_window, []
        head = self.capo_head
        if not window or head.weight.grad is None:
            return
        grad = head.weight.grad
        if head.bias is not None:
            gb = head.bias.grad if head.bias.grad is not None else torch.zeros_like(head.bias)
            grad = torch.cat([grad, gb[:, None]], 1)
        lr = self._capo_lr()
        kl_sum = torch.zeros((), dtype=torch.float64, device=grad.device)
        n_sum = torch.zeros((), dtype=torch.float64, device=grad.device)
        delta_j = torch.zeros((), dtype=torch.float64, device=grad.device)
        for mb in window:
            pred = self.capo_masker.predict_update(
                head.weight,
                mb["hidden"],
                -grad,
                lr,
                head.bias,
                mb["valid"],
                actions=mb["actions"],
                advantages=mb["advantages"],
                token_weights=mb["weights"],
                temperature=self.temperature,
            )
            n = mb["valid"].sum()
            kl_sum += pred["kl"].double() * n
            n_sum += n
            delta_j += pred["delta_j"].double()
        kl = kl_sum / n_sum.clamp(min=1)
        self.capo_last_step = {"kl": kl, "delta_j": delta_j, "lr": lr, "batches": window}
        self._metrics["train"]["capo/predicted_step_kl"].append(kl.item())
        self._metrics["train"]["capo/predicted_delta_j"].append(delta_j.item())

    # --- the KL budget --------------------------------------------------------------------------

    def _capo_trial_step(self, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        """The coming step of every trainable parameter, nothing changed.

        See :func:`~curvopt.capo.whole_model.trial_step` (parameters and state are put back).
        """
        self._capo_in_trial = True
        try:
            return trial_step(optimizer, self._capo_trainable())
        finally:
            self._capo_in_trial = False

    def _capo_trainable(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _capo_forward_mode(self):
        """Eager attention, no activation checkpointing, no input-grad hooks; restored after.

        Forward-mode AD supports none of the three.
        """
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        attn = base.config._attn_implementation
        checkpointing = bool(base.is_activation_checkpointing)
        if checkpointing:
            base.activation_checkpointing_disable()
        # transformers' enable_input_require_grads hooks (TRL and Trainer may each add one, and
        # only the last one's handle is kept): requires_grad_ inside a functorch transform fails
        removed = []
        for module in base.modules():
            for key, fn in list(module._forward_hooks.items()):
                if getattr(fn, "__name__", "") == "make_inputs_require_grads":
                    removed.append((module, key, fn))
                    del module._forward_hooks[key]
        if attn != "eager":
            base.set_attn_implementation("eager")
        try:
            yield
        finally:
            if attn != "eager":
                base.set_attn_implementation(attn)
            for module, key, fn in removed:
                module._forward_hooks[key] = fn
            if checkpointing:
                base.activation_checkpointing_enable(
                    activation_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                )

    @torch.no_grad()
    def _capo_predicted_whole_kl(self, step: list[Tensor]) -> Tensor:
        """Mean predicted ``KL(pi_old || pi_new)`` over the window's completion tokens (JVP)."""
        with self._capo_forward_mode():
            return self._capo_jvp_kl(step)

    def _capo_jvp_kl(self, step: list[Tensor]) -> Tensor:
        call = _LogitsOf(self.model, self.temperature)
        device = self.capo_head.weight.device
        kl_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb in self._capo_budget_window:
            ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
            att = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
            valid = mb["completion_mask"].bool()
            T = valid.shape[1]
            kl = predict_step_kl(
                call, step, ids, att, mask=valid, output_fn=lambda z, T=T: z[:, -T - 1 : -1]
            )
            n = valid.sum().double()
            kl_sum += kl.double() * n
            n_sum += n
        if self.accelerator.num_processes > 1:  # one scale for all processes (same step)
            both = self.accelerator.reduce(torch.stack([kl_sum, n_sum]), reduction="sum")
            kl_sum, n_sum = both[0], both[1]
        return kl_sum / n_sum.clamp(min=1)

    def _capo_fit_budget(self, optimizer, args, kwargs) -> None:
        """Scale the coming step's learning rates so its predicted whole-model KL fits the budget.

        With ``Delta theta`` the step the optimizer is about to take (a trial step on the real
        gradients and state) and ``KL_hat = mean_t 1/2 u_t^T (Diag(p_t) - p_t p_t^T) u_t``,
        ``u_t = J_t Delta theta`` (one forward-mode pass per micro-batch,
        :func:`~curvopt.capo.whole_model.predict_step_kl`, over the window's completion tokens),
        every param group's lr is multiplied by ``s = min(1, sqrt(delta / KL_hat))`` for this step
        (SGD's and Adam's steps are linear in the lr, their KL quadratic) and restored after it.
        """
        if self._capo_in_trial:  # its own trial step
            return
        if not self._capo_budget_window:
            return
        try:
            kl = float(self._capo_predicted_whole_kl(self._capo_trial_step(optimizer)))
        finally:
            self._capo_budget_window = []
        scale = budget_scale(kl, self.capo_kl_budget)
        self._capo_lr_restore = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * scale
        metrics = self._metrics["train"]
        metrics["capo/predicted_whole_kl"].append(kl)
        metrics["capo/kl_budget_scale"].append(scale)

    def _capo_restore_lr(self, optimizer, args, kwargs) -> None:
        if self._capo_in_trial or self._capo_lr_restore is None:
            return
        for g, lr in zip(optimizer.param_groups, self._capo_lr_restore):
            g["lr"] = lr
        self._capo_lr_restore = None


class _LogitsOf(nn.Module):
    """``(input_ids, attention_mask) -> logits / temperature`` of a causal LM (for the JVP)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits / self.temperature
