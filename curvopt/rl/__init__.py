"""rl."""

from curvopt.rl.baselines import Baseline, LinearFeatureBaseline
from curvopt.rl.policies import (
    CategoricalMLPPolicy,
    CategoricalPolicy,
    GaussianMLPPolicy,
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
    "CategoricalMLPPolicy",
    "CategoricalPolicy",
    "EstimateSampler",
    "GaussianMLPPolicy",
    "GymRollout",
    "LinearFeatureBaseline",
    "PolicyGradientSampler",
    "RolloutFn",
    "SampleRecord",
    "TabularMDP",
    "TabularSoftmaxPolicy",
    "discounted_reward_to_go",
    "fisher_vector_product",
    "importance_surrogate",
    "mean_kl",
    "mlp",
    "old_distribution",
    "policy_gradient",
    "policy_hvp",
    "trajectory_scores",
    "trajectory_terms",
]
