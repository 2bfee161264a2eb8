"""Newton's method with lazy Hessians (Doikov, Chayti, Jaggi, ICML 2023).

The curvature is recomputed only every ``m`` accepted steps (snapshot ``z``), the
gradient at every step.  The snapshot's eigendecomposition ``H(z) = U diag(s) U^T``
is computed once and reused: every lazy step (and every retry with another ``M``)
costs ``O(n^2)`` (``c = U^T g``, a secular equation in ``O(n)`` and ``h = U y``).

* cubic (Algorithm 1): ``h = argmin g^T h + 1/2 h^T H(z) h + (M/6)||h||^3``;
* gradient-regularized (Algorithm 2, convex): ``h = -(H(z) + lam I)^{-1} g`` with
  ``lam = sqrt(M ||g||)`` (``m = 1`` is Mishchenko's regularized Newton).

The paper's theory takes ``M`` proportional to ``m L``; here ``M`` is found
adaptively (the notes' rule, since the paper's Algorithm 3 test could not be
verified): keep ``M`` across steps, halve it after an accepted step, double it and
re-solve (same snapshot, no new factorization) while the sufficient-decrease test
fails.  The tests are the ones exact steps satisfy when ``M >= L``:
``f(x) - f(x+h) >= M ||h||^3 / 12`` (cubic: the model is an upper bound and
``m_M(h) <= -M||h||^3/12``) and ``f(x) - f(x+h) >= lam ||h||^2 / 2`` (regularized,
convex: the exact bound is ``5/6 lam ||h||^2``).  If ``max_tries`` doublings fail with
a stale snapshot, the snapshot is refreshed at the current point and the search
repeated before giving up.

``m = n`` (the default) balances the ``O(n^3)`` factorization against ``n`` lazy
``O(n^2)`` steps: the paper's optimal frequency.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._oracle import Objective, Run, check_max_tries, check_positive, rounding_level
from ._result import OptimizeResult
from .cubic import EigCubicSubproblem

__all__ = ["lazy_cubic_newton", "lazy_regularized_newton"]


def _lazy(kind: str, f, x0, *, m, M0, M_min, max_tries, curvature, gtol, ftol, f_star,
          maxiter, callback, dtype) -> OptimizeResult:
    obj = Objective(f, x0, curvature, dtype)
    name = "lazy_cubic_newton" if kind == "cubic" else "lazy_regularized_newton"
    run = Run(obj, name, gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback)
    if m is None:
        m = obj.n
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (curvature refresh period) must be an integer >= 1, got {m!r}.")
    check_max_tries(max_tries)
    M = check_positive("M0", M0)
    M_min = check_positive("M_min", M_min)
    x, fx, g, gn = obj.start()
    run.record(x, fx, gn, M)
    snapshot = None  # (s, U)
    since = 0
    success, message = False, ""

    def refresh() -> tuple[Tensor, Tensor]:
        H = obj.as_dense(obj.curvature(x, dense_hint=True))
        s, U = torch.linalg.eigh(H)
        obj.nfact += 1
        return s, U

    while True:
        stop = run.stop(fx, gn)
        if stop is not None:
            success, message = stop
            break
        if snapshot is None or since >= m:
            snapshot, since = refresh(), 0
        accepted = None
        for _attempt in range(2):
            sub = EigCubicSubproblem(snapshot[0], snapshot[1], g)
            for _ in range(max_tries):
                if kind == "cubic":
                    st = sub.solve(M)
                    h, need = st.step, M * st.radius**3 / 12.0
                else:
                    lam = math.sqrt(M * gn)
                    if sub.min_eigenvalue + lam <= 0:
                        M *= 2.0
                        continue
                    h = sub.solve_regularized(lam)
                    need = 0.5 * lam * float(h @ h)
                xt = x + h
                # value and gradient at the trial point: tries are usually accepted (M is
                # halved after each success), and the gradient is reused at the new iterate
                ft, gt = obj.value_and_grad(xt)
                if math.isfinite(ft) and fx - ft >= need:
                    accepted = (xt, (ft, gt))
                    break
                if math.isfinite(ft) and abs(ft - fx) <= rounding_level(fx, obj.dtype):
                    # decrease below the rounding level of f: judge by the gradient
                    if float(torch.linalg.vector_norm(gt)) <= gn:
                        accepted = (xt, (ft, gt))
                        break
                M *= 2.0
            if accepted is not None or since == 0:
                break
            snapshot, since = refresh(), 0  # stale snapshot: refresh once and retry
            M = check_positive("M0", M0)
        if accepted is None:
            message = f"no acceptable step after {max_tries} doublings of M (M = {M:.3e})"
            break
        x, (fx, g) = accepted
        gn = float(torch.linalg.vector_norm(g))
        M = max(M / 2.0, M_min)
        since += 1
        run.nit += 1
        if run.record(x, fx, gn, M):
            message = "stopped by callback"
            break
    return run.result(x, fx, gn, success, message)


_DOC_ARGS = """
    Args:
        f: ``x -> scalar tensor`` (torch; gradients by autograd).
        x0: starting point (floating tensor, any shape; device is kept).
        m: curvature refresh period in accepted steps (default: the dimension ``n``;
            ``m = 1`` recomputes the curvature every step).
        M0: initial regularization constant; M_min: floor after halving.
        max_tries: doublings of ``M`` per step (then one snapshot refresh and retry).
        curvature: ``None``/``"hessian"``, ``"dense_hessian"`` or a factory
            ``x -> LinearOperator | Tensor`` (densified: lazy steps need the eigenbasis).
        gtol: stop when ``||grad f|| <= gtol``; ftol, f_star: stop when ``f - f_star <= ftol``.
        maxiter: iteration limit (accepted steps).
        callback: ``info -> bool | None`` after every iteration; ``True`` stops.
        dtype: working dtype (default float64; ``None`` keeps ``x0``'s).

    Returns:
        :class:`~solvers.OptimizeResult`: ``nhev`` snapshots, ``nfact``
        eigendecompositions, ``ngev`` gradients reported separately; ``history.reg``
        holds ``M``.
"""


def lazy_cubic_newton(
    f: Callable[[Tensor], Tensor], x0: Tensor, *, m: int | None = None, M0: float = 1.0,
    M_min: float = 1e-10, max_tries: int = 60, curvature=None, gtol: float = 1e-8,
    ftol: float = 1e-8, f_star: float | None = None, maxiter: int = 1000, callback=None,
    dtype: torch.dtype | None = torch.float64,
) -> OptimizeResult:
    return _lazy("cubic", f, x0, m=m, M0=M0, M_min=M_min, max_tries=max_tries, curvature=curvature,
                 gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback, dtype=dtype)


def lazy_regularized_newton(
    f: Callable[[Tensor], Tensor], x0: Tensor, *, m: int | None = None, M0: float = 1.0,
    M_min: float = 1e-10, max_tries: int = 60, curvature=None, gtol: float = 1e-8,
    ftol: float = 1e-8, f_star: float | None = None, maxiter: int = 1000, callback=None,
    dtype: torch.dtype | None = torch.float64,
) -> OptimizeResult:
    return _lazy("regularized", f, x0, m=m, M0=M0, M_min=M_min, max_tries=max_tries, curvature=curvature,
                 gtol=gtol, ftol=ftol, f_star=f_star, maxiter=maxiter, callback=callback, dtype=dtype)


lazy_cubic_newton.__doc__ = (
    "Lazy-Hessian cubic Newton: cubic steps with the curvature of the last snapshot.\n"
    "\n    Cost per step: ``O(n^2)`` plus one value and gradient per try (usually one try);\n"
    "    per snapshot (every ``m`` steps): one curvature build and one ``eigh``.\n" + _DOC_ARGS
)
lazy_regularized_newton.__doc__ = (
    "Lazy-Hessian gradient-regularized Newton: ``h = -(H(z) + sqrt(M ||g||) I)^{-1} g``.\n"
    "\n    For convex problems (``H(z) + lam I`` must be positive definite, otherwise ``M``\n"
    "    is doubled).  Cost as for :func:`lazy_cubic_newton`.\n" + _DOC_ARGS
)
