"""Pruning with Optimal Brain Surgeon: M-FAC, exact dense OBS and magnitude baselines.

Main entry point :func:`prune` (one-shot, optionally in several recomputation steps) and
:class:`GradualPruner` (pruning on a schedule during fine-tuning, masks kept applied).
"""

from .dense import DenseFisherInverse
from .gradients import collect_gradients
from .gradual import GradualPruner
from .masks import (
    DEFAULT_LAYER_TYPES,
    PrunableWeight,
    WeightMask,
    attach_masks,
    prunable_weights,
    pruned_state_dict,
    remove_masks,
    set_mask,
)
from .obs import obs_scores, obs_update_diagonal, obs_update_multi
from .pruner import prune
from .report import LayerReport, PruneReport, sparsity_report
from .schedule import CubicSchedule, one_shot_schedule

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "CubicSchedule",
    "DenseFisherInverse",
    "GradualPruner",
    "LayerReport",
    "PrunableWeight",
    "PruneReport",
    "WeightMask",
    "attach_masks",
    "collect_gradients",
    "obs_scores",
    "obs_update_diagonal",
    "obs_update_multi",
    "one_shot_schedule",
    "prunable_weights",
    "prune",
    "pruned_state_dict",
    "remove_masks",
    "set_mask",
    "sparsity_report",
]
