"""``solvers.minimize``: one entry point for the functional second-order minimizers.

Like ``scipy.optimize.minimize`` but for torch functions ``f: R^n -> R`` (gradients
by autograd) and with swappable curvature: every method takes ``curvature=`` (the
exact Hessian by default, or any factory ``x -> LinearOperator``: Gauss-Newton,
Fisher, a diagonal, a closed form from :mod:`solvers.problems`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._result import OptimizeResult
from .cubic_newton import arc, cubic_newton
from .gns import gns, gns_gradient, gradient_descent, super_universal_newton
from .lazy_newton import lazy_cubic_newton, lazy_regularized_newton

__all__ = ["minimize", "METHODS"]

#: method name -> minimizer function (all share ``gtol, ftol, f_star, maxiter, callback, dtype``).
METHODS: dict[str, Callable[..., OptimizeResult]] = {
    "cubic_newton": cubic_newton,
    "arc": arc,
    "lazy_cubic_newton": lazy_cubic_newton,
    "lazy_regularized_newton": lazy_regularized_newton,
    "gns": gns,
    "gns_gradient": gns_gradient,
    "super_universal_newton": super_universal_newton,
    "gradient_descent": gradient_descent,
}


def minimize(f: Callable[[Tensor], Tensor], x0: Tensor, method: str = "cubic_newton", **options) -> OptimizeResult:
    """Minimise a torch scalar function with a second-order method.

    Args:
        f: ``x -> scalar tensor`` for ``x`` shaped like ``x0``; must be differentiable
            by autograd (twice, for the default exact Hessian).
        x0: starting point: a floating-point tensor (or numpy array) of any shape.
            Iterates are float64 by default (``dtype=None`` keeps ``x0``'s) and live
            on ``x0``'s device.
        method: one of ``"cubic_newton"`` (Nesterov-Polyak, adaptive ``M``), ``"arc"``
            (Cartis-Gould-Toint), ``"lazy_cubic_newton"``, ``"lazy_regularized_newton"``
            (Doikov-Chayti-Jaggi; curvature every ``m`` steps), ``"gns"``,
            ``"gns_gradient"`` (Semenov-Jaggi-Doikov), ``"super_universal_newton"``,
            ``"gradient_descent"`` (backtracking baseline).
        **options: keyword options of the method's function (see each one), e.g.
            ``curvature=``, ``gtol=`` (default 1e-8), ``f_star=`` and ``ftol=``,
            ``maxiter=``, ``callback=``, ``m=`` (lazy), ``metric=`` (GNS).

    Returns:
        :class:`~solvers.OptimizeResult` with ``x``, ``fun``, ``grad_norm``, ``nit``,
        ``success``, ``message``, counts (``nfev``, ``ngev``, ``nhev``, ``nfact``,
        ``num_matvecs``) and the per-iteration ``history``.

    Raises:
        ValueError: unknown method, bad option values, non-scalar ``f``, non-finite
            ``f(x0)``.  TypeError: unknown option names, non-floating ``x0``.

    Example:
        >>> import torch, solvers
        >>> f = lambda x: (1 - x[0])**2 + 100 * (x[1] - x[0]**2)**2
        >>> res = solvers.minimize(f, torch.tensor([-2.0, 2.0]), method="cubic_newton")
        >>> res.success, res.x
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    fn = METHODS[method.lower()]
    try:
        return fn(f, x0, **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"minimize(method={method!r}): {err}") from None
        raise
