"""Cubic-regularized Newton (Nesterov-Polyak 2006) and ARC (Cartis-Gould-Toint 2011).

``cubic_newton``: at ``x`` with ``g``, ``H`` take ``h = argmin m_M(h)``,
``m_M(h) = g^T h + 1/2 h^T H h + (M/6)||h||^3``; accept when the model is an upper
bound, ``f(x + h) <= f(x) + m_M(h)``, then ``M <- max(M/2, M_min)``; otherwise
``M <- 2M`` and re-solve with the same curvature (the eigendecomposition or the
Lanczos basis is reused: rejected tries cost one function value and ``O(n^2)``).
This is NP06's line search and the GNS repository's baseline.

``arc``: the same step with ``sigma = M/2`` judged by
``rho = (f(x) - f(x+h)) / (-m(h))``: accept if ``rho >= eta1`` (0.1); very successful
(``rho > eta2 = 0.9``): ``sigma <- max(min(sigma, ||g||), eps)``; successful: keep;
unsuccessful: ``sigma <- 2 sigma`` and stay at ``x`` (an unsuccessful iteration
counts as an iteration and reuses the curvature).

Both escape strict saddles: with ``H`` indefinite the global model minimiser moves
along negative curvature even when ``g = 0`` (eigenbasis solver).  Rounding: near a
solution the predicted decrease drops below the rounding level of ``f``; a step whose
value change is within that level is accepted (documented safety, not a tuned constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._oracle import (
    Objective,
    Run,
    check_max_tries,
    check_nonneg,
    check_positive,
    rounding_level,
)
from ._result import OptimizeResult
from .cubic import CubicStep, EigCubicSubproblem, LanczosCubicSubproblem

__all__ = ["cubic_newton", "arc", "CubicSubproblemBuilder"]


class CubicSubproblemBuilder:
    """Builds the cubic subproblem at an iterate, dense (eigenbasis) or matrix-free (Lanczos).

    Args:
        subproblem: ``"auto"`` (eigenbasis when the curvature is a DenseOperator or
            ``n <= DENSE_AUTO_MAX``, else Lanczos), ``"eig"`` or ``"lanczos"``.
        krylov_rtol: Lanczos stops when ``||grad m|| <= min(krylov_rtol, sqrt(||g||)) ||g||``
            (the ``sqrt`` forcing term keeps local superlinear convergence).
        krylov_maxiter: largest Krylov dimension (default ``n``).
        seed: Lanczos start vector seed when ``g = 0``.
    """

    def __init__(self, subproblem: str = "auto", krylov_rtol: float = 0.1,
                 krylov_maxiter: int | None = None, seed: int = 0) -> None:
        if subproblem not in ("auto", "eig", "lanczos"):
            raise ValueError(f"Unknown subproblem solver {subproblem!r}; use 'auto', 'eig' or 'lanczos'.")
        self.mode = {"auto": "auto", "eig": "dense", "lanczos": "matrix_free"}[subproblem]
        self.krylov_rtol = check_positive("krylov_rtol", krylov_rtol)
        self.krylov_maxiter = krylov_maxiter
        self.seed = seed

    def build(self, obj: Objective, x: Tensor, g: Tensor) -> tuple[Callable[[float], CubicStep], float | None]:
        """Return ``(solve, min_eigenvalue)``; ``solve(M)`` gives a :class:`CubicStep`."""
        op = obj.curvature(x, dense_hint=self.mode != "matrix_free")
        if obj.wants_dense(op, self.mode):
            H = obj.as_dense(op)
            s, U = torch.linalg.eigh(H)
            obj.nfact += 1
            sub = EigCubicSubproblem(s, U, g)
            return sub.solve, sub.min_eigenvalue
        lan = LanczosCubicSubproblem(op, g, maxiter=self.krylov_maxiter, seed=self.seed)
        rtol = min(self.krylov_rtol, math.sqrt(float(torch.linalg.vector_norm(g))))
        return (lambda M: lan.solve(M, rtol=rtol)), None


def _first_order_stop(run: Run, f: float, gn: float, min_eig: float | None, second_order_tol: float | None) -> str | None:
    msg = run.converged(f, gn)
    if msg is None or second_order_tol is None:
        return msg
    if min_eig is None or min_eig >= -second_order_tol:
        return msg + ("" if min_eig is None else f" and min eigenvalue {min_eig:.3e} >= -{second_order_tol:.1e}")
    return None


def cubic_newton(
    f: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    M0: float = 1.0,
    M_min: float = 1e-10,
    max_tries: int = 60,
    subproblem: str = "auto",
    krylov_rtol: float = 0.1,
    krylov_maxiter: int | None = None,
    curvature=None,
    gtol: float = 1e-8,
    ftol: float = 1e-8,
    f_star: float | None = None,
    maxiter: int = 1000,
    second_order_tol: float | None = None,
    callback=None,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
) -> OptimizeResult:
    """Cubic-regularized Newton with NP06's adaptive ``M`` (doubling on failure, halving on success).

    Args:
        f: ``x -> scalar tensor`` (torch; gradients by autograd).
        x0: starting point (floating tensor, any shape; device is kept).
        M0: initial cubic regularization; M_min: its floor after halving.
        max_tries: doublings of ``M`` allowed per iteration before giving up.
        subproblem: ``"auto"``, ``"eig"`` or ``"lanczos"`` (see :class:`CubicSubproblemBuilder`).
        krylov_rtol, krylov_maxiter: Lanczos stopping (matrix-free path).
        curvature: ``None``/``"hessian"``, ``"dense_hessian"`` or a factory ``x -> LinearOperator``.
        gtol: stop when ``||grad f|| <= gtol``; ftol, f_star: stop when ``f - f_star <= ftol``.
        maxiter: iteration limit.
        second_order_tol: if given, a first-order stop also needs
            ``lambda_min(H) >= -second_order_tol`` (eigenbasis path); otherwise the
            method keeps stepping, which moves off a saddle even with ``g = 0``.
        callback: ``info -> bool | None`` after every iteration; ``True`` stops.
        dtype: working dtype (default float64; ``None`` keeps ``x0``'s).
        seed: Lanczos start seed for ``g = 0``.

    Returns:
        :class:`~solvers.OptimizeResult`; ``history.reg`` holds ``M``.

    Cost per iteration: one curvature build, one eigendecomposition (dense path) or
    a few Lanczos products, one gradient, one function value per try.
    """
    obj = Objective(f, x0, curvature, dtype)
    run = Run(obj, "cubic_newton", gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback)
    M = check_positive("M0", M0)
    M_min = check_positive("M_min", M_min)
    check_max_tries(max_tries)
    if second_order_tol is not None:
        second_order_tol = check_nonneg("second_order_tol", second_order_tol)
    builder = CubicSubproblemBuilder(subproblem, krylov_rtol, krylov_maxiter, seed)
    x, fx, g, gn = obj.start()
    run.record(x, fx, gn, M)
    success, message = False, ""
    while True:
        msg = run.converged(fx, gn)
        if msg is not None and second_order_tol is None:
            success, message = True, msg
            break
        if run.nit >= run.maxiter:
            message = f"maximum number of iterations ({run.maxiter}) reached"
            break
        solve, min_eig = builder.build(obj, x, g)
        if msg is not None:
            msg = _first_order_stop(run, fx, gn, min_eig, second_order_tol)
            if msg is not None:
                success, message = True, msg
                break
        accepted = False
        for _ in range(max_tries):
            st = solve(M)
            xt = x + st.step
            ft = obj.value(xt)
            if math.isfinite(ft) and ft <= fx + st.model_value + rounding_level(fx, obj.dtype):
                accepted = True
                break
            M *= 2.0
        if not accepted:
            message = f"no acceptable step after {max_tries} doublings of M (M = {M:.3e})"
            break
        x = xt
        fx, g = obj.value_and_grad(x)
        gn = float(torch.linalg.vector_norm(g))
        M = max(M / 2.0, M_min)
        run.nit += 1
        if run.record(x, fx, gn, M):
            message = "stopped by callback"
            break
    return run.result(x, fx, gn, success, message)


def arc(
    f: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    sigma0: float = 1.0,
    eta1: float = 0.1,
    eta2: float = 0.9,
    gamma: float = 2.0,
    subproblem: str = "auto",
    krylov_rtol: float = 0.1,
    krylov_maxiter: int | None = None,
    curvature=None,
    gtol: float = 1e-8,
    ftol: float = 1e-8,
    f_star: float | None = None,
    maxiter: int = 1000,
    second_order_tol: float | None = None,
    callback=None,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
) -> OptimizeResult:
    """Adaptive regularization with cubics (ARC), ``m(s) = g^T s + 1/2 s^T H s + (sigma/3)||s||^3``.

    Args:
        sigma0: initial ``sigma`` (``M = 2 sigma`` in the ``M/6`` convention).
        eta1, eta2: acceptance and very-successful thresholds on ``rho``
            (``0 < eta1 <= eta2 < 1``).
        gamma: factor increasing ``sigma`` after an unsuccessful iteration (``> 1``).
        Other arguments as in :func:`cubic_newton`.

    Returns:
        :class:`~solvers.OptimizeResult`; ``history.reg`` holds ``sigma``; ``nit``
        counts unsuccessful iterations too (the curvature is then reused).
    """
    obj = Objective(f, x0, curvature, dtype)
    run = Run(obj, "arc", gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback)
    sigma = check_positive("sigma0", sigma0)
    if not (0 < eta1 <= eta2 < 1):
        raise ValueError(f"Need 0 < eta1 <= eta2 < 1, got eta1={eta1}, eta2={eta2}.")
    if not gamma > 1:
        raise ValueError(f"gamma must be > 1, got {gamma}.")
    if second_order_tol is not None:
        second_order_tol = check_nonneg("second_order_tol", second_order_tol)
    builder = CubicSubproblemBuilder(subproblem, krylov_rtol, krylov_maxiter, seed)
    eps = torch.finfo(obj.dtype).eps
    x, fx, g, gn = obj.start()
    run.record(x, fx, gn, sigma)
    success, message = False, ""
    solve, min_eig = None, None
    while True:
        msg = run.converged(fx, gn)
        if msg is not None and second_order_tol is None:
            success, message = True, msg
            break
        if run.nit >= run.maxiter:
            message = f"maximum number of iterations ({run.maxiter}) reached"
            break
        if solve is None:
            solve, min_eig = builder.build(obj, x, g)
        if msg is not None:
            msg = _first_order_stop(run, fx, gn, min_eig, second_order_tol)
            if msg is not None:
                success, message = True, msg
                break
        if sigma > 1e300:
            message = f"sigma overflowed ({sigma:.3e}): no decrease possible"
            break
        st = solve(2.0 * sigma)
        xt = x + st.step
        ft = obj.value(xt)
        pred = -st.model_value
        tiny = rounding_level(fx, obj.dtype)
        if not math.isfinite(ft):
            rho = -math.inf
        elif pred <= tiny:
            rho = 1.0 if ft <= fx + tiny else -math.inf
        else:
            rho = (fx - ft) / pred
        if rho >= eta1:
            if rho > eta2:
                sigma = max(min(sigma, gn), eps)
            x = xt
            fx, g = obj.value_and_grad(x)
            gn = float(torch.linalg.vector_norm(g))
            solve = None
        else:
            sigma *= gamma
        run.nit += 1
        if run.record(x, fx, gn, sigma):
            message = "stopped by callback"
            break
    return run.result(x, fx, gn, success, message)
