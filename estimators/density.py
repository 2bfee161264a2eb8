"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``m`` Lanczos steps give ``T_m = Y diag(theta) Y^T``; the
nodes ``theta_k`` and weights ``tau_k = Y_{1k}^2`` form the ``m``-point Gauss rule of the
spectral measure ``sum_j (v^T u_j)^2 delta_{lambda_j}``, exact for polynomials of
degree ``< 2m``.  A Gaussian probe normalized to the unit sphere has ``E[v v^T] = I/n``,
so averaging the rules over probes estimates the spectral density
``(1/n) sum_j delta_{lambda_j}`` without bias (Lin, Saad, Yang 2016; Ubaru, Chen,
Saad 2017; used on network Hessians by Ghorbani, Krishnan, Xiao 2019 and Papyan 2019).
All probes run side by side: each Lanczos step is one block product ``op @ [n, p]``.
"""

from __future__ import annotations

import torch

from curvature import LinearOperator

from ._precision import working_dtype
from ._probes import PROBE_KINDS, check_square, draw_probes, make_generator
from ._validate import check_int
from .lanczos import eigh_small, lanczos_batched
from .results import SpectralDensity

__all__ = ["spectral_density"]

_MEMORY_BUDGET = 256 * 2**20  # bytes for the Lanczos bases of one block of probes


def spectral_density(
    op: LinearOperator,
    num_probes: int = 10,
    num_steps: int = 80,
    *,
    probe: str = "gaussian",
    block_size: int | None = None,
    reorthogonalize: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of a symmetric operator's spectrum.

    Args:
        op: symmetric operator ``[n, n]``.
        num_probes: independent probes (the variance of moments falls like 1/probes).
        num_steps: Lanczos steps per probe (capped at ``n``); the rule integrates
            polynomials of degree ``< 2 num_steps`` exactly and resolves isolated
            outliers to high accuracy.
        probe: ``"gaussian"`` (default) or ``"rademacher"``/``"sphere"``; every probe is
            normalized to unit length.
        block_size: probes per block product (default: as many as fit in 256 MiB of
            Lanczos bases, ``block * (num_steps + 1) * n`` numbers).
        reorthogonalize: full reorthogonalization (default; no ghost eigenvalues).
        seed, generator: randomness.

    Returns:
        :class:`~estimators.results.SpectralDensity` with ``nodes`` and ``weights``
        ``[num_probes, num_steps]`` (float32 for 16-bit operators, whose products are
        done in their own dtype and the tridiagonal work in float32), ``evaluate(grid, sigma)``, ``moments()``,
        ``plot()``, ``save_plot(path)``.  Cost: ``num_probes * num_steps`` products (less
        if a probe's Krylov space becomes invariant).
    """
    n = check_square(op, "spectral_density", symmetric=True)
    num_probes = check_int(num_probes, "num_probes")
    m = min(check_int(num_steps, "num_steps"), n)
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe distribution {probe!r}; use one of {PROBE_KINDS}.")
    wdtype = working_dtype(op.dtype)
    if block_size is None:
        per_probe = (m + 1) * n * torch.empty((), dtype=wdtype).element_size()
        block_size = max(1, min(num_probes, _MEMORY_BUDGET // max(per_probe, 1)))
    block_size = check_int(block_size, "block_size")
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    nodes = torch.zeros(num_probes, m, dtype=wdtype, device=op.device)
    weights = torch.zeros_like(nodes)
    done = 0
    while done < num_probes:
        b = min(int(block_size), num_probes - done)
        V0 = draw_probes(op, b, probe, gen)
        alphas, betas, lengths, _ = lanczos_batched(op, V0, m, reorthogonalize=reorthogonalize)
        T = torch.diag_embed(alphas) + torch.diag_embed(betas[:, :-1], 1) + torch.diag_embed(betas[:, :-1], -1)
        if bool((lengths == m).all()):
            theta, Y = eigh_small(T)
            nodes[done:done + b] = theta
            weights[done:done + b] = Y[:, 0, :] ** 2
        else:
            for i in range(b):
                L = int(lengths[i])
                theta, Y = eigh_small(T[i, :L, :L])
                nodes[done + i, :L] = theta
                nodes[done + i, L:] = theta[-1]
                weights[done + i, :L] = Y[0] ** 2
        done += b
    return SpectralDensity(nodes=nodes, weights=weights, n=n,
                           num_matvecs=op.num_matvecs - before, seed=seed)
