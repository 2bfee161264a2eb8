"""The result object every functional minimizer in ``solvers`` returns.

Modelled on ``scipy.optimize.OptimizeResult`` (``x``, ``fun``, ``nit``, ``success``,
``message``, ``nfev``...) but frozen, typed, and with the work counts second-order
methods need to be compared honestly: gradients, curvature builds and
factorizations are counted separately, because trading one for another is the
whole point of lazy Hessians and approximate curvature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["OptimizeResult", "History", "IterationInfo"]


@dataclass
class History:
    """Per-iteration record; entry ``k`` describes the iterate after ``k`` iterations.

    Attributes:
        fun: ``f(x_k)``.
        grad_norm: ``||grad f(x_k)||`` (Euclidean).
        reg: the regularization parameter in force when ``x_k`` was produced
            (``M`` for cubic methods, ``sigma`` for ARC, ``gamma`` for GNS); entry 0
            is the initial value.
        time: seconds since the start of the run.
        nhev: curvature builds so far (cumulative).
        ngev: gradients so far (cumulative).
        nfact: factorizations so far (cumulative).
    """

    fun: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    reg: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    nhev: list[int] = field(default_factory=list)
    ngev: list[int] = field(default_factory=list)
    nfact: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.fun)


@dataclass(frozen=True)
class IterationInfo:
    """What a ``callback`` receives after every iteration (``x`` is a detached copy)."""

    nit: int
    x: Tensor
    fun: float
    grad_norm: float
    reg: float


@dataclass(frozen=True)
class OptimizeResult:
    """Outcome of :func:`solvers.minimize` and the per-method minimizers.

    Attributes:
        x: the final iterate, shaped and placed like ``x0``; float64 (the default
            working dtype, as in ``scipy.optimize``) unless the minimizer was called with
            ``dtype=None``, which keeps ``x0``'s dtype.  Always finite.
        fun: ``f(x)``.
        grad_norm: ``||grad f(x)||`` (Euclidean).
        nit: iterations performed.
        success: ``True`` if a tolerance (``gtol`` or the ``f_star`` gap) was met.
        message: why the run stopped.
        method: the method name.
        nfev: function evaluations (a value-and-gradient evaluation counts once here
            and once in ``ngev``).
        ngev: gradient evaluations.
        nhev: curvature builds (exact Hessians, Gauss-Newton or Fisher matrices, ...;
            one per call of the curvature factory).
        nfact: matrix factorizations (eigendecompositions and Cholesky factorizations
            of ``n x n`` matrices).
        num_matvecs: curvature-operator products (densifying an operator costs ``n``).
        history: a :class:`History`, one entry per iterate including ``x0``.
    """

    x: Tensor
    fun: float
    grad_norm: float
    nit: int
    success: bool
    message: str
    method: str
    nfev: int
    ngev: int
    nhev: int
    nfact: int
    num_matvecs: int
    history: History

    @property
    def counts(self) -> dict[str, int]:
        """The work counts as a dict (``nfev``, ``ngev``, ``nhev``, ``nfact``, ``num_matvecs``)."""
        return {
            "nfev": self.nfev,
            "ngev": self.ngev,
            "nhev": self.nhev,
            "nfact": self.nfact,
            "num_matvecs": self.num_matvecs,
        }

    def __repr__(self) -> str:
        return (
            f"OptimizeResult(method={self.method!r}, success={self.success}, "
            f"message={self.message!r}, fun={self.fun:.6e}, grad_norm={self.grad_norm:.3e}, "
            f"nit={self.nit}, nfev={self.nfev}, ngev={self.ngev}, nhev={self.nhev}, "
            f"nfact={self.nfact}, num_matvecs={self.num_matvecs})"
        )
