"""Blockwise Hessian spectra: one stochastic-Lanczos-quadrature density per parameter block.

Zhang et al. (2024, "Why Transformers Need Adam: A Hessian Perspective") compare the
spectra of the diagonal Hessian blocks of a network (embedding, attention query / key /
value / output, MLP, norms, head): in transformers the blocks' spectra differ widely
("block heterogeneity"), in CNNs they look alike.  :func:`block_spectra` computes those
densities for any block-diagonal curvature operator whose blocks can be multiplied
together, e.g. ``curvature.block_diagonal(HessianOperator, model, loss_fn, data)``.

All blocks run their Lanczos recurrences in lockstep: step ``j`` multiplies the
current Lanczos vectors of *every* block (and every probe) in one block-diagonal
product, which for the curvature operators of this package is one pass over the data
(one forward and gradient graph per batch, then the block products).  Each block's
recurrence is the plain Lanczos process on its own block (normalization, three-term
recurrence and full reorthogonalization per block), so the result per block equals
:func:`estimators.spectral_density` on that block with the same probes.

Cost: ``num_steps`` block-diagonal products of ``num_probes`` columns (each counts as
``num_probes`` products of the whole operator); memory: the Lanczos bases,
``num_probes * (num_steps + 1) * n`` numbers in the operator dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvature import LinearOperator

from ._probes import make_generator
from .lanczos import eigh_small
from .results import SpectralDensity

__all__ = ["BlockSpectra", "block_spectra", "js_distance"]


@dataclass(frozen=True)
class BlockSpectra:
    """Per-block spectral densities.

    Attributes:
        names: block names (as the block-diagonal operator names them).
        sizes: parameters per block.
        densities: one :class:`~estimators.results.SpectralDensity` per block.
        num_matvecs: products of the whole block-diagonal operator (one per probe column
            and step; every block is multiplied in each).
        seed: the seed of the probes.
    """

    names: list[str]
    sizes: list[int]
    densities: list[SpectralDensity] = field(repr=False)
    num_matvecs: int
    seed: int | None

    def top_ritz_values(self) -> list[float]:
        """The largest Ritz value per block (a lower bound on the block's top eigenvalue)."""
        return [float(d.nodes.max()) for d in self.densities]

    def traces(self) -> list[float]:
        """SLQ estimates of each block's trace."""
        return [float(d.trace()) for d in self.densities]

    def js_distances(self, num_points: int = 2000) -> Tensor:
        """Pairwise Jensen-Shannon distances between the blocks' densities, ``[B, B]``.

        Every density is evaluated on one common grid (the union of the blocks' ranges)
        with its own default smoothing, normalized to a probability vector, and compared
        with :func:`js_distance` (natural log, so distances lie in ``[0, sqrt(ln 2)]``).
        This is the heterogeneity measure of Zhang et al. (2024).
        """
        lo = min(float(d.nodes.min()) for d in self.densities)
        hi = max(float(d.nodes.max()) for d in self.densities)
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        grid = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)
        probs = []
        for d in self.densities:
            sigma = max(d.default_sigma(), (hi - lo + 2 * pad) / num_points)
            _, dens = d.evaluate(grid.to(d.nodes.dtype), sigma=sigma)
            p = dens.to(torch.float64).cpu()
            probs.append(p / p.sum())
        B = len(probs)
        out = torch.zeros(B, B, dtype=torch.float64)
        for i in range(B):
            for j in range(i + 1, B):
                out[i, j] = out[j, i] = js_distance(probs[i], probs[j])
        return out

    def to_dict(self) -> dict:
        """A JSON-ready summary: per block its size, top Ritz value, trace, quadrature nodes/weights."""
        return {
            "blocks": [
                {"name": n, "num_params": s, "top_ritz_value": t, "trace": tr,
                 "nodes": d.nodes.tolist(), "weights": d.weights.tolist()}
                for n, s, t, tr, d in zip(self.names, self.sizes, self.top_ritz_values(), self.traces(),
                                          self.densities)
            ],
            "num_matvecs": self.num_matvecs,
            "seed": self.seed,
        }

    def save_plot(self, path, *, columns: int = 4, floor: float = 1e-7, title: str | None = None,
                  smoothing: float = 1 / 60) -> None:
        """A grid of log-scale density panels, one per block (PNG by extension).

        Each panel smooths its quadrature rule with a Gaussian of width ``smoothing`` times
        the block's spectral span (a few Lanczos nodes per probe would otherwise show as
        isolated spikes).
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        B = len(self.names)
        cols = min(columns, B)
        rows = math.ceil(B / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, name, size, dens in zip(axes.flat, self.names, self.sizes, self.densities):
            span = float(dens.nodes.max() - dens.nodes.min())
            sigma = smoothing * span if span > 0 else 1e-3 * max(abs(float(dens.nodes.max())), 1.0)
            lo, hi = float(dens.nodes.min()) - 4 * sigma, float(dens.nodes.max()) + 4 * sigma
            t, d = dens.evaluate(torch.linspace(lo, hi, 1500, dtype=dens.nodes.dtype), sigma=sigma)
            ax.semilogy(t.detach().cpu().numpy(), (d + floor).detach().cpu().numpy(), lw=1.0)
            ax.set_title(f"{name}  (n={size:,})", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_ylim(bottom=floor)
            ax.axvline(0.0, color="0.7", lw=0.5, zorder=0)
        for ax in list(axes.flat)[B:]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("eigenvalue", fontsize=8)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def js_distance(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon distance ``sqrt(JS(p, q))`` of two probability vectors (natural log)."""
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        mask = a > 0
        return (a[mask] * (a[mask] / b[mask]).log()).sum()

    return float((0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0).sqrt())


def _split(op: LinearOperator) -> tuple[list[str], list[int]]:
    blocks = getattr(op, "blocks", None)
    sizes = getattr(op, "sizes", None)
    if blocks is None or sizes is None:
        raise TypeError(
            "block_spectra needs a block-diagonal operator (with .blocks and .sizes), e.g. "
            "curvature.block_diagonal(HessianOperator, model, loss_fn, data); got "
            f"{type(op).__name__}."
        )
    names = list(getattr(op, "names", None) or [f"block {i}" for i in range(len(blocks))])
    return names, [int(s) for s in sizes]


def block_spectra(
    op: LinearOperator,
    num_probes: int = 4,
    num_steps: int = 40,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress=None,
) -> BlockSpectra:
    """Stochastic Lanczos quadrature of every diagonal block of a block-diagonal operator.

    Args:
        op: a symmetric block-diagonal operator with ``.blocks``, ``.sizes`` (and
            ``.names``), e.g. from :func:`curvature.block_diagonal`; ``[n, n]``.
        num_probes: Gaussian probes per block (normalized per block to unit length).
        num_steps: Lanczos steps per probe, capped per block at its size.
        seed, generator: randomness of the probes (default seed 0).
        progress: optional callable ``progress(step, num_steps)`` (e.g. a tqdm update).

    Returns:
        :class:`BlockSpectra`.  Cost: ``min(num_steps, max block size)`` products of ``op``
        with ``num_probes`` columns; blocks whose Krylov space is exhausted (small
        blocks, or an invariant subspace) stop their recurrence and are fed zeros.

    Raises:
        TypeError: ``op`` is not block-diagonal.
        ValueError: ``num_probes`` / ``num_steps`` below 1.
    """
    names, sizes = _split(op)
    for label, value in (("num_probes", num_probes), ("num_steps", num_steps)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}.")
    if not op.is_symmetric:
        raise ValueError("block_spectra needs a symmetric operator (is_symmetric=True).")
    p = int(num_probes)
    gen, seed = make_generator(seed, generator, op.device)
    steps = [min(int(num_steps), s) for s in sizes]
    m = max(steps)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    segs = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
    n = offsets[-1]
    dtype, device = op.dtype, op.device

    Q = torch.zeros(m + 1, n, p, dtype=dtype, device=device)  # Lanczos vectors, every block stacked
    q = torch.randn(n, p, generator=gen, dtype=dtype, device=device)
    for sg in segs:
        q[sg] /= torch.linalg.vector_norm(q[sg], dim=0, keepdim=True)
    Q[0] = q
    B = len(sizes)
    # recurrence coefficients and flags stay on the operator's device: no host read inside a
    # step; the loop reads one flag per step (any column still active?)
    f64 = torch.float64
    alpha = torch.zeros(B, m, p, dtype=f64, device=device)
    beta = torch.zeros(B, m, p, dtype=f64, device=device)
    length = torch.zeros(B, p, dtype=torch.long, device=device)  # steps completed per block and probe
    active = torch.ones(B, p, dtype=torch.bool, device=device)
    tiny_scale = 1e3 * torch.finfo(dtype).eps
    before = op.num_matvecs
    for j in range(m):
        W = op @ Q[j]
        for b, sg in enumerate(segs):
            if j >= steps[b]:  # this block's budget is spent (known on the host)
                active[b] = False
                continue
            act = active[b]
            w = W[sg]
            qj = Q[j, sg]
            a = (qj * w).sum(0)
            w = w - qj * a
            if j > 0:
                w = w - Q[j - 1, sg] * beta[b, j - 1].to(dtype)
            # full reorthogonalization against this block's basis, twice (CGS2)
            basis = Q[: j + 1, sg].permute(2, 1, 0)  # [p, n_b, j+1]
            for _ in range(2):
                coef = torch.einsum("pnk,np->pk", basis, w)
                w = w - torch.einsum("pnk,pk->np", basis, coef)
            nb = torch.linalg.vector_norm(w, dim=0)
            a64, nb64 = a.to(f64), nb.to(f64)
            alpha[b, j] = torch.where(act, a64, alpha[b, j])
            length[b] += act.long()
            stop = act & ((nb64 <= tiny_scale * (a64.abs() + 1.0)) | (j + 1 >= steps[b]))
            go = act & ~stop
            beta[b, j] = torch.where(go, nb64, torch.zeros_like(nb64))
            Q[j + 1, sg] = torch.where(go, w / nb.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(w))
            active[b] = go
        if progress is not None:
            progress(j + 1, m)
        if not bool(active.any()):  # the one host read per step
            break
    alpha, beta, length = alpha.cpu(), beta.cpu(), length.cpu()
    densities = []
    for b in range(B):
        nodes = torch.zeros(p, steps[b], dtype=torch.float64)
        weights = torch.zeros_like(nodes)
        for i in range(p):
            L = int(length[b, i])
            T = torch.diag(alpha[b, :L, i]) + torch.diag(beta[b, : L - 1, i], 1) + torch.diag(beta[b, : L - 1, i], -1)
            theta, Y = eigh_small(T)
            nodes[i, :L] = theta
            nodes[i, L:] = theta[-1]
            weights[i, :L] = Y[0] ** 2
        densities.append(SpectralDensity(nodes=nodes.to(dtype), weights=weights.to(dtype), n=sizes[b],
                                         num_matvecs=0, seed=seed))
    return BlockSpectra(names=names, sizes=sizes, densities=densities,
                        num_matvecs=op.num_matvecs - before, seed=seed)
