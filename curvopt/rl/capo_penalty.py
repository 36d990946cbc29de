"""Deprecated alias of :mod:`curvopt.capo.penalty` (until curvopt 0.2.0)."""

from curvopt._deprecation import alias_module

alias_module(__name__, "curvopt.capo.penalty")
