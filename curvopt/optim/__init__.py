"""Drop-in ``torch.optim`` optimizers built on curvopt's curvature machinery."""

from curvopt.optim.gns_newton import GNSNewton
from curvopt.optim.mfac import MFAC

__all__ = ["GNSNewton", "MFAC"]
