"""Drop-in ``torch.optim`` optimizers built on curvopt's curvature machinery."""

from curvopt.optim.gns_newton import GNSNewton
from curvopt.optim.mfac import MFAC
from curvopt.optim.nharpg import HARPG, NHARPG
from curvopt.optim.npg import NPG
from curvopt.optim.npg_igt import NPGIGT

__all__ = ["GNSNewton", "HARPG", "MFAC", "NHARPG", "NPG", "NPGIGT"]
