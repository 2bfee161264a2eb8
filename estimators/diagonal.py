"""Stochastic diagonal estimation: Hutchinson / Bekas-Kokiopoulou-Saad.

``mean_i w_i * (A w_i)`` with ``E[w w^T] = I`` is unbiased for ``diag(A)``; with
Rademacher probes entry ``j`` has variance ``sum_{l != j} A_jl^2`` per probe (zero for a
diagonal matrix), with Gaussian probes ``sum_l A_jl^2 + A_jj^2``.  Sophia-H is the
one-probe version with an EMA in place of the mean.
"""

from __future__ import annotations

import math

import torch

from curvature import LinearOperator

from ._probes import PROBE_KINDS, check_square, draw_probes, make_generator
from .results import DiagonalResult

__all__ = ["hutchinson_diagonal"]


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
    if isinstance(num_probes, bool) or int(num_probes) != num_probes or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}.")
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe distribution {probe!r}; use one of {PROBE_KINDS}.")
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    # running mean and sum of squared deviations, combined block by block (Chan et al.):
    # no cancellation, so a diagonal matrix gives a standard error of exactly 0
    mean = torch.zeros(op.shape[0], dtype=op.dtype, device=op.device)
    m2 = torch.zeros_like(mean)
    s = 0
    while s < num_probes:
        b = min(int(block_size), num_probes - s)
        Om = draw_probes(op, b, probe, gen)
        X = Om * op.matmat(Om)
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
