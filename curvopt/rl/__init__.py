"""Policy-gradient plumbing (rollouts, policies, unbiased surrogates, samplers) and CAPO masking."""

from curvopt.rl.baselines import Baseline, LinearFeatureBaseline
from curvopt.rl.capo import CAPOLoss, CAPOMask, CAPOMasker, calibrate_thresholds
from curvopt.rl.capo_penalty import CAPOPenalty
from curvopt.rl.grpo import GRPOTrainer, group_advantages
from curvopt.rl.lqr import LinearQuadraticRegulator
from curvopt.rl.policies import (
    CategoricalMLPPolicy,
    CategoricalPolicy,
    GaussianMLPPolicy,
    LinearGaussianPolicy,
    TabularSoftmaxPolicy,
    mlp,
)
from curvopt.rl.rollout import Batch, GymRollout, RolloutFn, discounted_reward_to_go
from curvopt.rl.sampler import EstimateSampler, PolicyGradientSampler, SampleRecord
from curvopt.rl.surrogates import (
    fisher_vector_product,
    importance_surrogate,
    mean_kl,
    old_distribution,
    policy_gradient,
    policy_hvp,
    trajectory_scores,
    trajectory_terms,
)
from curvopt.rl.tabular import TabularMDP

__all__ = [
    "Baseline",
    "Batch",
    "CAPOLoss",
    "CAPOMask",
    "CAPOMasker",
    "CAPOPenalty",
    "CategoricalMLPPolicy",
    "CategoricalPolicy",
    "EstimateSampler",
    "GRPOTrainer",
    "GaussianMLPPolicy",
    "GymRollout",
    "LinearFeatureBaseline",
    "LinearGaussianPolicy",
    "LinearQuadraticRegulator",
    "PolicyGradientSampler",
    "RolloutFn",
    "SampleRecord",
    "TabularMDP",
    "TabularSoftmaxPolicy",
    "calibrate_thresholds",
    "discounted_reward_to_go",
    "fisher_vector_product",
    "group_advantages",
    "importance_surrogate",
    "mean_kl",
    "mlp",
    "old_distribution",
    "policy_gradient",
    "policy_hvp",
    "trajectory_scores",
    "trajectory_terms",
]
