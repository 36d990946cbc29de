"""CAPO's token mask and its loss wrapper, at their long-standing import path.

:class:`CAPOMasker` (the per-token curvature model and keep rule) lives in
:mod:`curvopt.capo.token_mask`, :class:`CAPOLoss` (the mask around a token-level loss) in
:mod:`curvopt.capo.loss`; both, and the direction models, are importable from here.

Example:
    >>> from curvopt.capo.masker import CAPOLoss, CAPOMasker
    >>> CAPOMasker(tau_h=1e-2, tau_f=1e-4).level
    'token'
"""

from .loss import CAPOLoss
from .token_mask import (
    AdamDirection,
    AdamOptimizerDirection,
    CAPOMask,
    CAPOMasker,
    SGDDirection,
    SGDOptimizerDirection,
    calibrate_thresholds,
    direction_for,
)

__all__ = [
    "AdamDirection",
    "AdamOptimizerDirection",
    "CAPOLoss",
    "CAPOMask",
    "CAPOMasker",
    "SGDDirection",
    "SGDOptimizerDirection",
    "calibrate_thresholds",
    "direction_for",
]
