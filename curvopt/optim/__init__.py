"""Drop-in ``torch.optim`` optimizers built on curvopt's curvature machinery."""

from curvopt.optim.gns_newton import GNSNewton

__all__ = ["GNSNewton"]
