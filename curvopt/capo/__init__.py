"""CAPO: curvature-aware token masking and penalties for token-level LLM policy-gradient losses.

One module per idea:

* :mod:`~curvopt.capo.token_mask`: :class:`CAPOMasker` predicts each token's ``Delta J_t`` and
  ``Delta KL_t`` from a last-layer curvature model and masks the unstable tokens.
* :mod:`~curvopt.capo.loss`: :class:`CAPOLoss` wraps a token loss with it (both names are also
  importable from :mod:`~curvopt.capo.masker`, their long-standing path).
* :mod:`~curvopt.capo.direction`: models of the optimizer's step on the head (SGD, Adam, and
  models of a real ``torch.optim`` optimizer's state).
* :mod:`~curvopt.capo.lora_head`: the exact model of a LoRA adapter's low-rank update of the
  head.
* :mod:`~curvopt.capo.penalty`: ``lambda * Delta KL`` / ``lambda * Delta J`` added to the loss.
* :mod:`~curvopt.capo.token_losses`: GRPO, Dr. GRPO and REINFORCE token losses.
* :mod:`~curvopt.capo.whole_model`: the KL of a planned step through the whole network, and the
  KL budget, a whole-model trust region on the step
  (:func:`~curvopt.capo.whole_model.fit_kl_budget`).
* :mod:`~curvopt.capo.grpo` and :mod:`~curvopt.capo.sequence_policy`: a small GRPO loop and the
  policy interface it needs.

The TRL trainer (:mod:`curvopt.integrations.trl`) builds on this package; the toy tasks of the
studies are in :mod:`curvopt.bench.tasks`.

Example:
    >>> from curvopt.capo import CAPOMasker
    >>> masker = CAPOMasker(tau_h=1e-2, tau_f=1e-4, top_k=4)
    >>> masker.top_k
    4
"""

from .direction import (
    AdamDirection,
    AdamOptimizerDirection,
    SGDDirection,
    SGDOptimizerDirection,
    direction_for,
)
from .grpo import GRPOTrainer, group_advantages
from .loss import CAPOLoss
from .penalty import PENALTIES, CAPOPenalty, TokenPredictor
from .sequence_policy import GRUPolicy, sample_tokens
from .token_losses import (
    clipped_surrogate,
    dr_grpo_loss,
    grpo_loss,
    reinforce_loss,
    token_weights,
    token_weights_fn,
)
from .token_mask import CAPOMask, CAPOMasker, calibrate_thresholds
from .whole_model import (
    fit_kl_budget,
    logit_change,
    predict_step_kl,
    token_kl,
    token_kl_attributions,
    trial_step,
)

__all__ = [
    "PENALTIES",
    "AdamDirection",
    "AdamOptimizerDirection",
    "CAPOLoss",
    "CAPOMask",
    "CAPOMasker",
    "CAPOPenalty",
    "GRPOTrainer",
    "GRUPolicy",
    "SGDDirection",
    "SGDOptimizerDirection",
    "TokenPredictor",
    "calibrate_thresholds",
    "clipped_surrogate",
    "direction_for",
    "dr_grpo_loss",
    "fit_kl_budget",
    "group_advantages",
    "grpo_loss",
    "logit_change",
    "predict_step_kl",
    "reinforce_loss",
    "sample_tokens",
    "token_kl",
    "token_kl_attributions",
    "token_weights",
    "token_weights_fn",
    "trial_step",
]
