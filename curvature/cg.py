"""Preconditioned conjugate gradients for symmetric positive definite operators.

Written here rather than taken from ``scipy.sparse.linalg.cg`` because it must run
on torch tensors on any device, solve ``k`` right-hand sides at once (one block
product per iteration, so the operator can amortize its work over the columns), and
report convergence per column.  ``scipy.sparse.linalg.cg`` stays the reference the
tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGResult", "conjugate_gradient"]


@dataclass(frozen=True)
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes:
        x: the solution, same shape as ``b`` (``[n]`` or ``[n, k]``).
        converged: ``True`` if every column met ``||b - A x|| <= max(tol * ||b||, atol)``.
        num_iterations: CG iterations performed (each costs one block product).
        residual_norms: final residual norm per column, shape ``[k]`` (``[1]`` for a vector).
        residual_history: the largest relative residual after each iteration.
        num_matvecs: operator-vector products spent (iterations times columns, plus
            one block product per column for a nonzero ``x0``).
    """

    x: Tensor
    converged: bool
    num_iterations: int
    residual_norms: Tensor
    residual_history: list[float]
    num_matvecs: int


def conjugate_gradient(
    matmat: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> CGResult:
    """Solve ``A x = b`` by (preconditioned) conjugate gradients, column by column.

    Args:
        matmat: ``V -> A @ V`` for ``V`` of shape ``[n, k]``; ``A`` must be symmetric
            positive definite (a ``curvature.LinearOperator`` works).
        b: right-hand side, ``[n]`` or ``[n, k]``.
        x0: initial guess (default zero), same shape as ``b``.
        tol: relative tolerance; a column stops when ``||r|| <= max(tol ||b||, atol)``.
        atol: absolute tolerance.
        maxiter: iteration limit (default ``10 n``).
        preconditioner: ``R -> M^{-1} R`` for an SPD preconditioner ``M``.

    Returns:
        A :class:`CGResult`; ``converged`` is ``False`` when the budget ran out (never
        raised, as in ``scipy.sparse.linalg.cg``).  A column whose curvature along
        the search direction is not positive stops and is reported as not converged.

    Cost: one block product with ``A`` (``k`` columns) per iteration.
    """
    vector = b.dim() == 1
    B = b.unsqueeze(1) if vector else b
    n, k = B.shape
    if maxiter is None:
        maxiter = 10 * n
    X = torch.zeros_like(B) if x0 is None else (x0.unsqueeze(1) if vector else x0).clone()
    num_matvecs = 0
    R = B.clone()
    if x0 is not None:
        R = R - matmat(X)
        num_matvecs += k
    b_norm = torch.linalg.vector_norm(B, dim=0)
    threshold = torch.clamp(tol * b_norm, min=atol)
    active = torch.linalg.vector_norm(R, dim=0) > threshold
    Z = preconditioner(R) if preconditioner is not None else R
    P = Z.clone()
    rz = (R * Z).sum(0)
    history: list[float] = []
    breakdown = torch.zeros(k, dtype=torch.bool, device=B.device)
    it = 0
    while it < maxiter and bool(active.any()):
        AP = matmat(P)
        num_matvecs += k
        pAp = (P * AP).sum(0)
        bad = active & ~(pAp > 0)
        breakdown |= bad
        active &= ~bad
        alpha = torch.where(active, rz / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), 0.0)
        X = X + alpha * P
        R = R - alpha * AP
        it += 1
        r_norm = torch.linalg.vector_norm(R, dim=0)
        rel = r_norm / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        history.append(float(rel.max()))
        active &= r_norm > threshold
        if not bool(active.any()):
            break
        Z = preconditioner(R) if preconditioner is not None else R
        rz_new = (R * Z).sum(0)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), 0.0)
        P = Z + beta * P
        rz = rz_new
    r_norm = torch.linalg.vector_norm(R, dim=0)
    converged = bool(((r_norm <= threshold) & ~breakdown).all())
    return CGResult(
        x=X.squeeze(1) if vector else X,
        converged=converged,
        num_iterations=it,
        residual_norms=r_norm,
        residual_history=history,
        num_matvecs=num_matvecs,
    )
