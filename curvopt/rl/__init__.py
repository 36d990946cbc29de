"""Policy-gradient estimation: rollouts, policies, samplers, unbiased surrogates, baselines.

Also the exactly solvable problems the estimators are checked on (tabular MDP, LQR and its env).
CAPO moved to :mod:`curvopt.capo`; its names are still reachable here (``curvopt.rl.CAPOLoss``,
``curvopt.rl.capo``, ...) for one release, with a ``DeprecationWarning``.
"""

from curvopt.rl.baselines import Baseline, LinearFeatureBaseline
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
    "CategoricalMLPPolicy",
    "CategoricalPolicy",
    "EstimateSampler",
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

#: names that moved to :mod:`curvopt.capo`, still served here for one release
_MOVED_TO_CAPO = frozenset(
    {
        "CAPOLoss",
        "CAPOMask",
        "CAPOMasker",
        "CAPOPenalty",
        "GRPOTrainer",
        "calibrate_thresholds",
        "group_advantages",
    }
)


def __getattr__(name: str):
    if name in _MOVED_TO_CAPO:
        from curvopt._deprecation import moved_name

        return moved_name(f"{__name__}.{name}", "curvopt.capo", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
