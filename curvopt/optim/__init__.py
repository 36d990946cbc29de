"""optim."""

from curvopt.optim.nharpg import HARPG, NHARPG  # noqa: F401
from curvopt.optim.npg import NPG, conjugate_gradient  # noqa: F401
from curvopt.optim.npg_igt import NPGIGT  # noqa: F401
