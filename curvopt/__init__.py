"""curvopt: cheap, drop-in second-order optimization for PyTorch."""

__version__ = "0.1.0"
