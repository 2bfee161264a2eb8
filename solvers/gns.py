"""Gradient-normalized smoothness (GNS) methods (Semenov, Jaggi, Doikov 2025).

Gradient-regularized Newton with approximate curvature and an adaptive search over
the gradient-normalized smoothness ``gamma`` (the official repository's
``grad_norm_smooth``, with the safety of the notes)::

    lam   = ||g||_* / gamma                  (dual norm in the metric B: sqrt(g^T B^{-1} g))
    Delta = -(H + lam B)^{-1} g              (Cholesky; CG when H is matrix-free;
                                              Sherman-Morrison when H is rank one)
    accept if  f(x) - f(x + Delta) >= ||grad f(x + Delta)||_*^2 / (8 lam):
        gamma <- max(2 gamma, gamma_min)     (optimistic: next iteration starts larger)
    else gamma <- gamma / 2 and retry (a failed factorization also halves gamma)

Up to ``max_tries`` tries per iteration reuse the same curvature; if all fail the
iterate is left unchanged and the run stops (``success=False``).  The trial
gradient is reused at the accepted point, so a try costs one solve, one function
value and one gradient.

Also here: :func:`gns_gradient` (``x+ = x - B^{-1} g / lam``, same search),
:func:`super_universal_newton` (Doikov-Mishchenko-Nesterov 2024 rule as in the same
repository: ``lam = H ||g||_*^alpha``, accept if ``<g+, -Delta> >= ||g+||_*^2/(4 lam)``
then ``H <- max(H/4, H_min)``, else ``H <- 4H``), :func:`gradient_descent` (a
backtracking gradient method in the metric ``B``, the notebook's baseline), the
reusable :func:`gns_step`, :class:`Metric` and :class:`RankOneOperator`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from curvature import DenseOperator, DiagonalOperator, IdentityOperator, LinearOperator
from curvature.linear_operator import ConvergenceWarning

from ._oracle import (
    DENSE_AUTO_MAX,
    Objective,
    Run,
    check_max_tries,
    check_positive,
    rounding_level,
)
from ._result import OptimizeResult

__all__ = [
    "Metric",
    "RankOneOperator",
    "GNSLinearSystem",
    "gns_step",
    "gns",
    "gns_gradient",
    "super_universal_newton",
    "gradient_descent",
]


class RankOneOperator(LinearOperator):
    """``alpha v v^T`` (``v`` of shape ``[n]``, ``alpha >= 0``): a Fisher-type rank-one curvature.

    GNS solves ``(alpha v v^T + lam B) Delta = -g`` with it by Sherman-Morrison in
    ``O(n^2)`` (two solves with ``B``'s Cholesky factor), no ``n x n`` factorization.
    """

    def __init__(self, v: Tensor, alpha: float = 1.0) -> None:
        if v.dim() != 1:
            raise ValueError(f"RankOneOperator needs a vector v [n], got shape {tuple(v.shape)}.")
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}.")
        n = v.shape[0]
        super().__init__((n, n), dtype=v.dtype, device=v.device, is_symmetric=True)
        self.v = v
        self.alpha = alpha

    def _matmat(self, X: Tensor) -> Tensor:
        return self.alpha * torch.outer(self.v, self.v @ X) if X.dim() == 2 else self.alpha * self.v * (self.v @ X)

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        return self.alpha * torch.outer(self.v, self.v)

    def diagonal(self, chunk_size: int = 256) -> Tensor:
        return self.alpha * self.v * self.v


class Metric:
    """The metric ``B`` (SPD) of GNS: ``||h|| = sqrt(h^T B h)``, ``||g||_* = sqrt(g^T B^{-1} g)``.

    Args:
        metric: ``None`` (identity), an SPD ``[n, n]`` tensor or DenseOperator
            (Cholesky once, ``O(n^3)``; each inverse product ``O(n^2)``), a positive
            DiagonalOperator, or any SPD LinearOperator (inverse products by CG).
        n, dtype, device: the problem's.
    """

    def __init__(self, metric, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.kind = "identity"
        self.chol = None
        self.op: LinearOperator = IdentityOperator(n, dtype=dtype, device=device)
        self.matrix: Tensor | None = None
        self.diag: Tensor | None = None
        if metric is None or isinstance(metric, IdentityOperator):
            return
        if isinstance(metric, Tensor):
            if metric.dim() == 1:
                metric = DiagonalOperator(metric.to(dtype))
            else:
                metric = DenseOperator(metric.to(dtype), is_symmetric=True)
        if not isinstance(metric, LinearOperator):
            raise TypeError(f"metric must be None, a tensor or a LinearOperator, got {type(metric).__name__}.")
        if metric.shape != (n, n):
            raise ValueError(f"Dimension mismatch: metric has shape {metric.shape}, the problem has n = {n}.")
        self.op = metric
        if isinstance(metric, DiagonalOperator):
            if not bool((metric.diag > 0).all()):
                raise ValueError("The metric must be positive definite: its diagonal has entries <= 0.")
            self.kind, self.diag = "diagonal", metric.diag
        elif isinstance(metric, DenseOperator):
            B = 0.5 * (metric.matrix + metric.matrix.T)
            L, info = torch.linalg.cholesky_ex(B)
            if int(info) != 0 or not bool(torch.isfinite(L).all()):
                raise ValueError("The metric must be symmetric positive definite (its Cholesky factorization failed).")
            self.kind, self.matrix, self.chol = "dense", B, L
        else:
            self.kind = "operator"

    def inv(self, v: Tensor) -> Tensor:
        """``B^{-1} v``."""
        if self.kind == "identity":
            return v
        if self.kind == "diagonal":
            return v / self.diag
        if self.kind == "dense":
            return torch.cholesky_solve(v.unsqueeze(1), self.chol).squeeze(1)
        return self.op.solve(v, method="cg", tol=1e-12)

    def dual_norm(self, g: Tensor) -> float:
        """``sqrt(g^T B^{-1} g)``."""
        return math.sqrt(max(float(g @ self.inv(g)), 0.0))


class GNSLinearSystem:
    """Solves ``(H + lam B) Delta = -g`` for one curvature ``H`` and many ``lam``.

    Args:
        H: the curvature (a LinearOperator; a :class:`RankOneOperator` takes the
            Sherman-Morrison path; a DenseOperator the Cholesky path).
        metric: a :class:`Metric`.
        linear_solver: ``"auto"`` (Sherman-Morrison for rank one, Cholesky when
            ``dense``, else CG), ``"cholesky"``, ``"cg"``.
        dense: the dense matrix of ``H`` if already known.
        cg_rtol, cg_maxiter: CG tolerances.

    Attributes:
        nfact: factorizations performed; num_matvecs: CG products.
    """

    def __init__(self, H: LinearOperator, metric: Metric, linear_solver: str = "auto",
                 dense: Tensor | None = None, cg_rtol: float = 1e-8, cg_maxiter: int | None = None) -> None:
        if linear_solver not in ("auto", "cholesky", "cg"):
            raise ValueError(f"Unknown linear_solver {linear_solver!r}; use 'auto', 'cholesky' or 'cg'.")
        self.H, self.metric = H, metric
        self.nfact = 0
        self.num_matvecs = 0
        self.cg_rtol, self.cg_maxiter = cg_rtol, cg_maxiter
        if isinstance(H, RankOneOperator) and linear_solver == "auto" and metric.kind != "operator":
            self.mode = "sherman_morrison"
            self.Binv_v = metric.inv(H.v)
            self.v_Binv_v = float(H.v @ self.Binv_v)
        elif linear_solver == "cg" or (linear_solver == "auto" and dense is None and not isinstance(H, DenseOperator)):
            self.mode = "cg"
        else:
            self.mode = "cholesky"
            self.dense = dense if dense is not None else (H.matrix if isinstance(H, DenseOperator) else H.to_dense())

    def solve(self, g: Tensor, lam: float) -> Tensor | None:
        """``-(H + lam B)^{-1} g``, or ``None`` if the system is not (numerically) positive definite."""
        m = self.metric
        if self.mode == "sherman_morrison":
            # (a v v^T + lam B)^{-1} g = (B^{-1} g - a B^{-1}v (v^T B^{-1} g) / (lam + a v^T B^{-1} v)) / lam
            Binv_g = m.inv(g)
            a = self.H.alpha
            denom = lam + a * self.v_Binv_v
            if not denom > 0:
                return None
            x = (Binv_g - (a * float(self.H.v @ Binv_g) / denom) * self.Binv_v) / lam
            return -x
        if self.mode == "cholesky":
            K = self.dense.clone()
            if m.kind == "identity":
                K.diagonal().add_(lam)
            elif m.kind == "diagonal":
                K.diagonal().add_(lam * m.diag)
            elif m.kind == "dense":
                K += lam * m.matrix
            else:
                K += lam * m.op.to_dense()
            L, info = torch.linalg.cholesky_ex(K)
            self.nfact += 1
            if int(info) != 0 or not bool(torch.isfinite(L).all()):
                return None
            return -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        A = self.H + lam * m.op
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            try:
                x, info = A.solve(g, method="cg", tol=self.cg_rtol, maxiter=self.cg_maxiter, full_output=True)
            except FloatingPointError:
                return None
        self.num_matvecs += info.num_matvecs
        if not info.converged or not bool(torch.isfinite(x).all()):
            return None
        return -x


def gns_step(H: Tensor | LinearOperator, g: Tensor, lam: float, metric=None, *,
             linear_solver: str = "auto", cg_rtol: float = 1e-8) -> Tensor:
    """The gradient-regularized Newton step ``-(H + lam B)^{-1} g``.

    Args:
        H: ``[n, n]`` tensor or LinearOperator (PSD, or at least ``H + lam B`` SPD).
        g: ``[n]``.
        lam: ``> 0`` (GNS takes ``||g||_* / gamma``).
        metric: ``None`` (identity), a tensor or an SPD LinearOperator (or a :class:`Metric`).
        linear_solver: ``"auto"``, ``"cholesky"`` or ``"cg"``.

    Raises:
        torch.linalg.LinAlgError: if ``H + lam B`` is not positive definite.
    """
    lam = check_positive("lam", lam)
    if isinstance(H, Tensor):
        H = DenseOperator(H, is_symmetric=True)
    n = H.shape[0]
    met = metric if isinstance(metric, Metric) else Metric(metric, n, g.dtype, g.device)
    out = GNSLinearSystem(H, met, linear_solver, cg_rtol=cg_rtol).solve(g, lam)
    if out is None:
        raise torch.linalg.LinAlgError(f"H + lam B is not positive definite (lam = {lam:.3e}).")
    return out


def _gns_loop(rule: str, f, x0, *, curvature, metric, reg0, reg_min, max_tries, linear_solver,
              cg_rtol, cg_maxiter, gtol, ftol, f_star, maxiter, callback, dtype, alpha=1.0) -> OptimizeResult:
    names = {"gns": "gns", "gradient": "gns_gradient", "super_universal": "super_universal_newton"}
    obj = Objective(f, x0, curvature, dtype)
    run = Run(obj, names[rule], gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback)
    reg = check_positive("gamma0" if rule != "super_universal" else "H0", reg0)
    reg_min = check_positive("gamma_min" if rule != "super_universal" else "H_min", reg_min)
    check_max_tries(max_tries)
    if linear_solver not in ("auto", "cholesky", "cg"):
        raise ValueError(f"Unknown linear_solver {linear_solver!r}; use 'auto', 'cholesky' or 'cg'.")
    if cg_rtol is not None:
        check_positive("cg_rtol", cg_rtol)
    met = metric if isinstance(metric, Metric) else Metric(metric, obj.n, obj.dtype, obj.device)
    if met.kind == "dense":
        obj.nfact += 1
    x, fx, g, gn = obj.start()
    gd = met.dual_norm(g)
    run.record(x, fx, gn, reg)
    success, message = False, ""
    while True:
        stop = run.stop(fx, gn)
        if stop is not None:
            success, message = stop
            break
        system = None
        Binv_g = None
        if rule == "gradient":
            Binv_g = met.inv(g)
        else:
            want_dense = linear_solver == "cholesky" or (linear_solver == "auto" and obj.n <= DENSE_AUTO_MAX)
            op = obj.curvature(x, dense_hint=want_dense)
            dense = obj.as_dense(op) if (want_dense and not isinstance(op, RankOneOperator)) else None
            rtol = cg_rtol if cg_rtol is not None else min(0.1, math.sqrt(gd))
            system = GNSLinearSystem(op, met, linear_solver, dense=dense, cg_rtol=rtol, cg_maxiter=cg_maxiter)
        accepted = None
        for _ in range(max_tries):
            lam = gd / reg if rule != "super_universal" else reg * gd**alpha
            if rule == "gradient":
                step = -Binv_g / lam
            else:
                nf0 = system.nfact
                step = system.solve(g, lam)
                obj.nfact += system.nfact - nf0
                if step is None:  # not positive definite: more regularization
                    reg = max(reg / 2, reg_min) if rule != "super_universal" else 4 * reg
                    continue
            xt = x + step
            ft, gt = obj.value_and_grad(xt)
            if not (math.isfinite(ft) and bool(torch.isfinite(gt).all())):
                reg = reg / 2 if rule != "super_universal" else 4 * reg
                continue
            gtd = met.dual_norm(gt)
            if rule == "super_universal":
                ok = float(-(gt @ step)) >= gtd**2 / (4 * lam)
            else:
                ok = fx - ft >= gtd**2 / (8 * lam)
            if not ok and abs(ft - fx) <= rounding_level(fx, obj.dtype) and gtd <= 0.5 * gd:
                ok = True  # decrease below the rounding level of f; the gradient halved
            if ok:
                accepted = (xt, ft, gt, gtd)
                reg = max(2 * reg, reg_min) if rule != "super_universal" else max(reg / 4, reg_min)
                break
            reg = reg / 2 if rule != "super_universal" else 4 * reg
        if accepted is None:
            message = f"no acceptable step in {max_tries} tries (x left unchanged)"
            break
        x, fx, g, gd = accepted
        gn = float(torch.linalg.vector_norm(g))
        run.nit += 1
        if run.record(x, fx, gn, reg):
            message = "stopped by callback"
            break
    return run.result(x, fx, gn, success, message)


_COMMON = """
        curvature: ``None``/``"hessian"`` (exact Hessian), ``"dense_hessian"``, or a
            factory ``x -> LinearOperator | Tensor`` (Gauss-Newton, Fisher, weighted
            Gauss-Newton, a :class:`RankOneOperator`, ...).  It must be PSD (or
            ``H + lam B`` SPD); otherwise the factorization fails and more
            regularization is tried.
        metric: ``B`` (``None`` = identity; SPD tensor or LinearOperator).
        max_tries: tries per iteration (each: one solve, one value and gradient).
        linear_solver: ``"auto"`` (Sherman-Morrison for a RankOneOperator; Cholesky
            when the curvature is dense or ``n <= 500``; otherwise CG on
            ``H + lam B``), ``"cholesky"`` or ``"cg"``.
        cg_rtol: CG relative tolerance (default ``min(0.1, sqrt(||g||_*))``); cg_maxiter.
        gtol: stop when ``||grad f|| <= gtol`` (Euclidean); ftol, f_star: stop when
            ``f - f_star <= ftol``.
        maxiter, callback, dtype: as in :func:`solvers.minimize`.
"""


def gns(f: Callable[[Tensor], Tensor], x0: Tensor, *, curvature=None, metric=None, gamma0: float = 1.0,
        gamma_min: float = 1e-9, max_tries: int = 40, linear_solver: str = "auto", cg_rtol: float | None = None,
        cg_maxiter: int | None = None, gtol: float = 1e-8, ftol: float = 1e-8, f_star: float | None = None,
        maxiter: int = 1000, callback=None, dtype: torch.dtype | None = torch.float64) -> OptimizeResult:
    return _gns_loop("gns", f, x0, curvature=curvature, metric=metric, reg0=gamma0, reg_min=gamma_min,
                     max_tries=max_tries, linear_solver=linear_solver, cg_rtol=cg_rtol, cg_maxiter=cg_maxiter,
                     gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback, dtype=dtype)


def gns_gradient(f: Callable[[Tensor], Tensor], x0: Tensor, *, metric=None, gamma0: float = 1.0,
                 gamma_min: float = 1e-9, max_tries: int = 40, gtol: float = 1e-8, ftol: float = 1e-8,
                 f_star: float | None = None, maxiter: int = 1000, callback=None,
                 dtype: torch.dtype | None = torch.float64) -> OptimizeResult:
    return _gns_loop("gradient", f, x0, curvature=None, metric=metric, reg0=gamma0, reg_min=gamma_min,
                     max_tries=max_tries, linear_solver="auto", cg_rtol=None, cg_maxiter=None,
                     gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback, dtype=dtype)


def super_universal_newton(f: Callable[[Tensor], Tensor], x0: Tensor, *, curvature=None, metric=None,
                           H0: float = 1.0, H_min: float = 1e-5, alpha: float = 1.0, max_tries: int = 40,
                           linear_solver: str = "auto", cg_rtol: float | None = None,
                           cg_maxiter: int | None = None, gtol: float = 1e-8, ftol: float = 1e-8,
                           f_star: float | None = None, maxiter: int = 1000, callback=None,
                           dtype: torch.dtype | None = torch.float64) -> OptimizeResult:
    alpha = check_positive("alpha", alpha)
    return _gns_loop("super_universal", f, x0, curvature=curvature, metric=metric, reg0=H0, reg_min=H_min,
                     max_tries=max_tries, linear_solver=linear_solver, cg_rtol=cg_rtol, cg_maxiter=cg_maxiter,
                     gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback, dtype=dtype,
                     alpha=alpha)


gns.__doc__ = """Gradient-regularized Newton with the adaptive GNS search (see the module docstring).

    Args:
        f: ``x -> scalar tensor`` (torch; gradients by autograd).
        x0: starting point (floating tensor, any shape; device is kept).
        gamma0: initial gradient-normalized smoothness; gamma_min: its floor.""" + _COMMON + """
    Returns:
        :class:`~solvers.OptimizeResult`; ``history.reg`` holds ``gamma``.
    """
gns_gradient.__doc__ = """Gradient method with the GNS step size: ``x+ = x - B^{-1} g / lam``, ``lam = ||g||_*/gamma``.

    Same acceptance test and doubling/halving of ``gamma`` as :func:`gns`; no curvature.

    Args:
        f, x0, gamma0, gamma_min, metric, max_tries, gtol, ftol, f_star, maxiter,
        callback, dtype: as in :func:`gns`.
    """
super_universal_newton.__doc__ = """Super-universal Newton: ``lam = H ||g||_*^alpha``, accept if
    ``<g+, -Delta> >= ||g+||_*^2 / (4 lam)`` then ``H <- max(H/4, H_min)``, else ``H <- 4H``.

    Args:
        H0, H_min, alpha: the regularization constant, its floor and the exponent.""" + _COMMON + """
    Returns:
        :class:`~solvers.OptimizeResult`; ``history.reg`` holds ``H``.
    """


def gradient_descent(f: Callable[[Tensor], Tensor], x0: Tensor, *, metric=None, L0: float = 1.0,
                     max_tries: int = 60, gtol: float = 1e-8, ftol: float = 1e-8, f_star: float | None = None,
                     maxiter: int = 10000, callback=None,
                     dtype: torch.dtype | None = torch.float64) -> OptimizeResult:
    """Gradient method with backtracking on ``L`` in the metric ``B`` (a baseline).

    ``x+ = x - B^{-1} g / L``, accepted if ``f(x+) <= f(x) - ||g||_*^2 / (2L)`` (then
    ``L <- L/2``), else ``L <- 2L``.  Each try costs one function value; each
    accepted step one gradient.

    Args:
        L0: initial Lipschitz estimate; metric, max_tries, gtol, ftol, f_star, maxiter,
        callback, dtype: as in :func:`gns`.

    Returns:
        :class:`~solvers.OptimizeResult`; ``history.reg`` holds ``L``.
    """
    obj = Objective(f, x0, None, dtype)
    run = Run(obj, "gradient_descent", gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback)
    L = check_positive("L0", L0)
    check_max_tries(max_tries)
    met = metric if isinstance(metric, Metric) else Metric(metric, obj.n, obj.dtype, obj.device)
    if met.kind == "dense":
        obj.nfact += 1
    x, fx, g, gn = obj.start()
    run.record(x, fx, gn, L)
    success, message = False, ""
    while True:
        stop = run.stop(fx, gn)
        if stop is not None:
            success, message = stop
            break
        d = met.inv(g)
        gd2 = float(g @ d)
        ok = False
        fg = None
        for _ in range(max_tries):
            xt = x - d / L
            ft = obj.value(xt)
            if math.isfinite(ft) and ft <= fx - gd2 / (2 * L):
                ok = True
                break
            if math.isfinite(ft) and abs(ft - fx) <= rounding_level(fx, obj.dtype):
                # predicted decrease below the rounding level of f: judge by the gradient
                fg = obj.value_and_grad(xt)
                if float(torch.linalg.vector_norm(fg[1])) < gn:
                    ok = True
                    break
                fg = None
            L *= 2
        if not ok:
            message = f"no acceptable step after {max_tries} doublings of L"
            break
        x = xt
        fx, g = fg if fg is not None else obj.value_and_grad(x)
        gn = float(torch.linalg.vector_norm(g))
        L = L / 2
        run.nit += 1
        if run.record(x, fx, gn, L):
            message = "stopped by callback"
            break
    return run.result(x, fx, gn, success, message)
