"""Randomized and Krylov estimators of curvature: traces, diagonals, eigenvalues, densities.

Every estimator is a function of a ``curvature.LinearOperator`` and nothing else.
"""

from .density import spectral_density
from .diagonal import hutchinson_diagonal, xdiag
from .eigen import power_iteration, top_eigenvalues
from .lanczos import lanczos, lanczos_batched
from .results import DiagonalResult, EigenResult, LanczosResult, SpectralDensity, TraceResult
from .trace import hutchinson_trace, hutchpp_trace, xnystrace, xtrace
from .report import SpectrumReport, spectrum_report
from .block_spectra import BlockSpectra, block_spectra
from .block_report import BlockwiseReport, blockwise_spectrum_report
from .sharpness import (
    SharpnessResult,
    curvature_operator,
    is_adaptive,
    optimizer_preconditioner,
    preconditioned_sharpness,
    sharpness,
    stability_threshold,
)
from .monitor import SharpnessMonitor, SharpnessRecord
from .eos import run_edge_of_stability

__all__: list[str] = [
    "BlockSpectra",
    "block_spectra",
    "BlockwiseReport",
    "blockwise_spectrum_report",
    "top_eigenvalues",
    "power_iteration",
    "lanczos",
    "lanczos_batched",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "xnystrace",
    "hutchinson_diagonal",
    "xdiag",
    "spectral_density",
    "TraceResult",
    "DiagonalResult",
    "EigenResult",
    "LanczosResult",
    "SpectralDensity",
    "spectrum_report",
    "SpectrumReport",
    "sharpness",
    "preconditioned_sharpness",
    "optimizer_preconditioner",
    "is_adaptive",
    "curvature_operator",
    "stability_threshold",
    "SharpnessResult",
    "SharpnessMonitor",
    "SharpnessRecord",
    "run_edge_of_stability",
]
