"""Small frozen result objects returned by the estimators.

Each carries the estimate, an error measure, ``num_matvecs`` (operator products
spent, counted on the operator) and the ``seed`` used (``None`` when the caller
passed a generator, or when the method drew nothing random).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "TraceResult",
    "DiagonalResult",
    "EigenResult",
    "LanczosResult",
    "SpectralDensity",
]


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimate of ``tr(A)`` (0-d tensor).
        std_error: estimated standard error of ``estimate`` (0-d tensor); for Hutch++
            it is the standard error of the Hutchinson part given the sketch, for
            XTrace the leave-one-out error estimate of Epperly, Tropp and Webber.
        num_matvecs: operator products spent.
        num_probes: random test vectors used.
        seed: the seed (``None`` if a generator was passed).
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"xnystrace"``.
        samples: the per-probe (Hutchinson) or leave-one-out (XTrace) estimates whose
            mean is ``estimate`` (``None`` for Hutch++).
        converged: whether an adaptive tolerance (``rtol``/``atol``) was met (``True``
            when none was asked for).
    """

    estimate: Tensor
    std_error: Tensor
    num_matvecs: int
    num_probes: int
    seed: int | None
    method: str
    samples: Tensor | None = field(default=None, repr=False)
    converged: bool = True

    def __float__(self) -> float:
        return float(self.estimate)


@dataclass(frozen=True)
class DiagonalResult:
    """A diagonal estimate.

    Attributes:
        estimate: ``[n]`` estimate of ``diag(A)``.
        std_error: ``[n]`` standard error per entry (sample standard deviation of the
            per-probe values over ``sqrt(num_probes)``).
        num_matvecs, num_probes, seed, method: as in :class:`TraceResult`.
    """

    estimate: Tensor
    std_error: Tensor
    num_matvecs: int
    num_probes: int
    seed: int | None
    method: str = "hutchinson"


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs.

    Attributes:
        eigenvalues: ``[k]`` Ritz values, ordered as requested (``"LA"``/``"LM"``:
            descending by value / magnitude; ``"SA"``: ascending).
        eigenvectors: ``[n, k]`` orthonormal Ritz vectors.
        residuals: ``[k]`` residual norms ``||A x_i - theta_i x_i||_2`` of the stored
            products (for ``top_eigenvalues``: from its Krylov-Schur relation, exact up
            to the bookkeeping's rounding; not estimated).
        error_bounds: ``[k]`` bounds on ``|theta_i - lambda|`` for the nearest true
            eigenvalue: ``min(r_i, r_i^2 / gap_i)`` with ``gap_i`` the distance to the
            other Ritz values (Kato-Temple / Saad; approximate as the gap uses Ritz values).
        converged: ``[k]`` bool, residual below the documented threshold.
        num_matvecs: operator products spent.
        num_restarts: restarts (Lanczos) or iterations (power iteration).
        seed: the seed (``None`` if a generator or a full ``v0`` was given).
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor = field(repr=False)
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_matvecs: int
    num_restarts: int
    seed: int | None
    which: str

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass(frozen=True)
class LanczosResult:
    """A Lanczos tridiagonalization ``A Q = Q T + beta_m q_{m+1} e_m^T``.

    Attributes:
        basis: ``[n, m]`` orthonormal Lanczos vectors ``Q``.
        alphas: ``[m]`` diagonal of ``T``.
        betas: ``[m]`` off-diagonals: ``betas[:-1]`` are the sub-diagonal of ``T``,
            ``betas[-1]`` is ``beta_m``, the norm of the remainder.
        next_vector: ``[n]`` ``q_{m+1}`` (zeros if the process stopped on an invariant
            subspace, where ``beta_m`` is 0).
        num_matvecs: operator products spent (``m``).
        seed: the seed (``None`` if ``v0`` or a generator was given).
    """

    basis: Tensor = field(repr=False)
    alphas: Tensor
    betas: Tensor
    next_vector: Tensor
    num_matvecs: int
    seed: int | None

    @property
    def num_steps(self) -> int:
        return int(self.alphas.shape[0])

    def tridiagonal(self) -> Tensor:
        """The ``[m, m]`` symmetric tridiagonal matrix ``T = Q^T A Q``."""
        off = self.betas[:-1]
        return torch.diag(self.alphas) + torch.diag(off, 1) + torch.diag(off, -1)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``[m]`` (ascending) and Ritz vectors ``[n, m]`` = ``Q Y``."""
        theta, Y = torch.linalg.eigh(self.tridiagonal())
        return theta, self.basis @ Y


@dataclass(frozen=True)
class SpectralDensity:
    """A spectral density by stochastic Lanczos quadrature.

    For probe ``l`` the quadrature rule ``(nodes[l], weights[l])`` satisfies
    ``sum_k weights[l, k] f(nodes[l, k]) = v_l^T f(A) v_l`` for polynomials ``f`` of
    degree ``< 2 num_steps`` (``v_l`` the unit probe), and ``E[v v^T] = I / n``, so
    ``mean_l sum_k weights[l, k] f(nodes[l, k])`` estimates ``tr f(A) / n`` without bias.

    Attributes:
        nodes: ``[num_probes, num_steps]`` Ritz values per probe (a probe whose Lanczos
            run stopped early on an invariant subspace has zero weights after it).
        weights: ``[num_probes, num_steps]``; each row sums to 1.
        n: the operator's dimension.
        num_matvecs: operator products spent.
        seed: the seed (``None`` if a generator was given).
    """

    nodes: Tensor
    weights: Tensor
    n: int
    num_matvecs: int
    seed: int | None

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def default_sigma(self) -> float:
        """``max(2e-3 * span, 1e-4 * scale)``, ``span = max node - min node``, ``scale = max |node|``.

        The floor relative to the spectrum's scale keeps a point spectrum (``2 I``, whose
        nodes differ only by rounding) from getting a kernel far narrower than any grid
        can resolve; an all-zero spectrum gets ``1e-3``.  The default grid then resolves
        the kernel and the density integrates to 1 on it.
        """
        span = float(self.nodes.max() - self.nodes.min())
        scale = float(self.nodes.abs().max())
        sigma = max(2e-3 * span, 1e-4 * scale)
        return sigma if sigma > 0 else 1e-3

    def default_grid(self, num_points: int = 10_000) -> Tensor:
        """``num_points`` points over the nodes' range padded by ``5 sigma``."""
        from ._validate import check_int

        num_points = check_int(num_points, "num_points", minimum=2)
        s = self.default_sigma()
        lo, hi = float(self.nodes.min()) - 5 * s, float(self.nodes.max()) + 5 * s
        return torch.linspace(lo, hi, num_points, dtype=self.nodes.dtype, device=self.nodes.device)

    def evaluate(self, grid: Tensor | None = None, sigma: float | None = None) -> tuple[Tensor, Tensor]:
        """The Gaussian-smoothed density on ``grid``.

        ``phi(t) = mean_l sum_k weights[l, k] N(t; nodes[l, k], sigma^2)``, which
        integrates to 1 over the real line.

        Args:
            grid: ``[g]`` points (default :meth:`default_grid`).
            sigma: kernel standard deviation (default :meth:`default_sigma`).

        Returns:
            ``(grid, density)``, both ``[g]``.
        """
        if grid is None:
            grid = self.default_grid()
        grid = torch.as_tensor(grid, dtype=self.nodes.dtype, device=self.nodes.device).reshape(-1)
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        nodes = self.nodes.reshape(-1)
        w = self.weights.reshape(-1) / self.num_probes
        keep = w > 0
        nodes, w = nodes[keep], w[keep]
        dens = torch.zeros_like(grid)
        norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
        for start in range(0, nodes.numel(), 256):  # bounded memory: [g, 256] at a time
            d = (grid.unsqueeze(1) - nodes[start:start + 256].unsqueeze(0)) / sigma
            dens += (torch.exp(-0.5 * d * d) * w[start:start + 256]).sum(dim=1) * norm
        return grid, dens

    def moments(self, orders: int = 4) -> tuple[Tensor, Tensor]:
        """Estimates of the normalized moments ``tr(A^j) / n`` for ``j = 0..orders``.

        Returns:
            ``(moments, std_errors)``, both ``[orders + 1]``; exact per probe for
            ``j < 2 num_steps`` (Gauss quadrature), so the error is the probe variance.
        """
        powers = torch.stack([(self.weights * self.nodes**j).sum(dim=1) for j in range(orders + 1)], dim=1)
        mean = powers.mean(dim=0)
        p = self.num_probes
        se = powers.std(dim=0) / math.sqrt(p) if p > 1 else torch.full_like(mean, float("nan"))
        return mean, se

    def trace(self, fn=lambda x: x) -> Tensor:
        """``n * mean_l sum_k weights f(nodes)``: an estimate of ``tr f(A)``."""
        return self.n * (self.weights * fn(self.nodes)).sum(dim=1).mean()

    def plot(self, ax=None, *, grid: Tensor | None = None, sigma: float | None = None,
             floor: float = 1e-7, **plot_kwargs):
        """Plot the density on a log y-axis (outliers stay visible next to the bulk).

        Args:
            ax: a matplotlib axis (default: a new figure).
            grid, sigma: passed to :meth:`evaluate`.
            floor: added to the density before taking logs (PyHessian uses 1e-7).

        Returns:
            The axis.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        t, d = self.evaluate(grid, sigma)
        ax.semilogy(t.detach().cpu().numpy(), (d + floor).detach().cpu().numpy(), **plot_kwargs)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.set_title(f"SLQ spectral density ({self.num_probes} probes, {self.nodes.shape[1]} steps)")
        return ax

    def save_plot(self, path, **kwargs) -> None:
        """Write :meth:`plot` to ``path`` (PNG by extension), using the Agg backend."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        self.plot(ax, **kwargs)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
