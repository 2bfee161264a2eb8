"""Stochastic diagonal estimation: Hutchinson / Bekas-Kokiopoulou-Saad.

``mean_i w_i * (A w_i)`` with ``E[w w^T] = I`` is unbiased for ``diag(A)``; with
Rademacher probes entry ``j`` has variance ``sum_{l != j} A_jl^2`` per probe (zero for a
diagonal matrix), with Gaussian probes ``sum_l A_jl^2 + A_jj^2``.  Sophia-H is the
one-probe version with an EMA in place of the mean.  :func:`xdiag` (Epperly, Tropp,
Webber 2024) adds the exchangeable low-rank correction of XTrace: exact on low-rank
operators and far more accurate on spectra with outliers.

Precision: as in :mod:`estimators.trace` (float32 bookkeeping for 16-bit operators).
"""

from __future__ import annotations

import math

import torch

from curvature import LinearOperator

from ._precision import matmat_in, working_dtype
from ._probes import PROBE_KINDS, check_square, draw_probes, make_generator
from ._validate import check_int
from .results import DiagonalResult

__all__ = ["hutchinson_diagonal", "xdiag"]


def hutchinson_diagonal(
    op: LinearOperator,
    num_probes: int = 100,
    *,
    probe: str = "rademacher",
    block_size: int = 32,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> DiagonalResult:
    """Estimate ``diag(A)`` from ``num_probes`` products.

    Args:
        op: square operator ``[n, n]``.
        num_probes: probes (one product each).
        probe: ``"rademacher"`` (default; exact for diagonal matrices), ``"gaussian"``
            or ``"sphere"``.
        block_size: probes per product ``op @ [n, block_size]``.
        seed, generator: randomness.

    Returns:
        :class:`~estimators.results.DiagonalResult` with ``estimate [n]`` (the plain
        mean, unbiased for every probe kind) and ``std_error [n]`` (sample standard
        deviation per entry over ``sqrt(num_probes)``; NaN for one probe).
    """
    check_square(op, "hutchinson_diagonal")
    num_probes = check_int(num_probes, "num_probes")
    block_size = check_int(block_size, "block_size")
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe distribution {probe!r}; use one of {PROBE_KINDS}.")
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    # running mean and sum of squared deviations, combined block by block (Chan et al.):
    # no cancellation, so a diagonal matrix gives a standard error of exactly 0
    wdtype = working_dtype(op.dtype)
    mean = torch.zeros(op.shape[0], dtype=wdtype, device=op.device)
    m2 = torch.zeros_like(mean)
    s = 0
    while s < num_probes:
        b = min(int(block_size), num_probes - s)
        Om = draw_probes(op, b, probe, gen).to(wdtype)
        X = Om * matmat_in(op, Om, wdtype)
        bmean = X.mean(dim=1)
        bm2 = ((X - bmean[:, None]) ** 2).sum(dim=1)
        delta = bmean - mean
        tot = s + b
        mean = mean + delta * (b / tot)
        m2 = m2 + bm2 + delta * delta * (s * b / tot)
        s = tot
    se = (m2 / (s - 1)).sqrt() / math.sqrt(s) if s > 1 else torch.full_like(mean, float("nan"))
    return DiagonalResult(estimate=mean, std_error=se, num_matvecs=op.num_matvecs - before,
                          num_probes=s, seed=seed, method="hutchinson")


def xdiag(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    probe: str = "rademacher",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> DiagonalResult:
    """XDiag: leave-one-out low-rank + Hutchinson diagonal estimator (symmetric operators).

    With ``k = m // 2`` probes ``Omega``, ``Y = A Omega = QR``, ``Z = A Q`` and, for each
    ``i``, the projector ``P_(i)`` on ``Y`` without column ``i`` (as in
    :func:`~estimators.trace.xtrace`), the ``i``-th estimate is
    ``diag(P_(i) A) + w_i * ((I - P_(i)) A w_i)``; since ``Y = QR`` the second term is
    ``w_i * (Q s_i) / ||R^{-T} e_i||``.  The estimate is the mean over ``i`` (divided by
    the mean of ``w_i * w_i``, the Bekas normalization; 1 for Rademacher probes) and the
    standard error the spread over ``i`` divided by ``sqrt(k)``.

    Args:
        op: symmetric operator ``[n, n]``.
        num_matvecs: products ``m >= 4`` (``2 (m // 2)`` used), in two block products.
        probe: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``.
        seed, generator: randomness.

    Returns:
        :class:`~estimators.results.DiagonalResult` with ``method="xdiag"``.
    """
    n = check_square(op, "xdiag", symmetric=True)
    num_matvecs = check_int(num_matvecs, "num_matvecs", minimum=4)
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe distribution {probe!r}; use one of {PROBE_KINDS}.")
    k = int(num_matvecs) // 2
    if k >= n:
        raise ValueError(f"xdiag with {num_matvecs} products needs n > m/2 = {k}; use op.diagonal().")
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    wdtype = working_dtype(op.dtype)
    Om = draw_probes(op, k, probe, gen).to(wdtype)
    Y = matmat_in(op, Om, wdtype)
    Q, R = torch.linalg.qr(Y)
    Z = matmat_in(op, Q, wdtype)
    eye = torch.eye(k, dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(R, eye, upper=True).T  # columns R^{-T} e_i
    if not bool(torch.isfinite(S).all()):
        raise FloatingPointError("xdiag: the sketch A @ Omega is rank deficient; use fewer products.")
    snorm = S.norm(dim=0)
    S = S / snorm
    QS, ZS = Q @ S, Z @ S
    low = (Q * Z).sum(dim=1, keepdim=True) - QS * ZS  # diag(P_(i) A), [n, k]
    resid = Om * QS / snorm  # w_i * ((I - P_(i)) A w_i)
    D = low + resid / (Om * Om).mean(dim=1, keepdim=True)
    mean = D.mean(dim=1)
    se = D.std(dim=1) / math.sqrt(k)
    return DiagonalResult(estimate=mean, std_error=se, num_matvecs=op.num_matvecs - before,
                          num_probes=k, seed=seed, method="xdiag")
