r"""Randomized estimators of traces, diagonals, norms and spectra of any square operator.

Each estimator takes a curvature operator (or any `curvopt.curvature.SquareOperator`, or a
dense square tensor) and a budget of matrix-vector products ``num_matvecs`` (one column of a
matrix product counts as one), and is named after its paper (one module each):

* trace: `hutchinson_trace` (Girard 1989, Hutchinson 1989), `hutchpp_trace` (Meyer et al.
  2021), `xtrace` (Epperly, Tropp, Webber 2024);
* diagonal: `hutchinson_diag` (Bekas et al. 2007), `xdiag` (Epperly et al. 2024);
* squared Frobenius norm: `hutchinson_squared_fro`;
* spectral density: `slq_spectral_density`, stochastic Lanczos quadrature (Ubaru, Chen, Saad
  2017; Papyan 2020), with `SpectralDensity.plot`.

Whenever the budget reaches the dimension ``d``, the trace, diagonal and norm estimators return
the exact value from ``d`` products with the identity columns instead (no estimate is cheaper
or better). The random vectors come from ``generator`` (a ``torch.Generator``) for
reproducible estimates.
"""

from .epperly2024xtrace import xdiag, xtrace
from .hutchinson import hutchinson_diag, hutchinson_squared_fro, hutchinson_trace
from .meyer2021hutchpp import hutchpp_trace
from .slq import SpectralDensity, slq_spectral_density

__all__ = [
    "SpectralDensity",
    "hutchinson_diag",
    "hutchinson_squared_fro",
    "hutchinson_trace",
    "hutchpp_trace",
    "slq_spectral_density",
    "xdiag",
    "xtrace",
]
