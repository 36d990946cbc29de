"""rl."""

# CAPO (issue 10): curvature-aware token masking and a small GRPO loop.
from .capo import CAPOLoss, CAPOMask, CAPOMasker, calibrate_thresholds  # noqa: F401
from .grpo import GRPOTrainer, group_advantages  # noqa: F401
