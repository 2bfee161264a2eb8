"""Precision rules shared by the estimators: working dtype and the products' rounding.

Operators may work in float64, float32, float16 or bfloat16.  The estimators do their
small dense algebra (projected matrices, tridiagonal eigenproblems, QR of sketches) in a
*working dtype* that LAPACK supports and that does not add rounding of its own
(``working_dtype``), and they account for the rounding of the *products* ``A @ V``,
which no bookkeeping can undo.

Rounding of the products (an estimate, not a rigorous bound).  ``u`` is the unit
roundoff (``eps / 2``: 1.1e-16 float64, 6.0e-8 float32, 4.9e-4 float16, 3.9e-3
bfloat16).  Two estimates of ``e ~ ||fl(A v) - A v||`` for a unit vector ``v``:

* the model ``product_rounding(n, dtype, anorm) = sqrt(n) u anorm`` (each entry is a sum
  of ``~n`` rounded terms whose errors add up like a random walk), a pessimistic
  estimate used where nothing is measured (power iteration);
* the measurement ``measured_rounding(F, n, dtype, anorm)`` from the products a Krylov
  method stores anyway: for a symmetric ``A`` the projected matrix ``F = V^T W``
  (``W = fl(A V)``) is exactly symmetric in exact arithmetic, so its skew part is pure
  product rounding; an error of norm ``e`` in a random direction has components
  ``~e / sqrt(n)`` along each basis vector, hence ``e ~ sqrt(n / 2) rms(F_ij - F_ji)``.
  The skew part cannot see a *systematic* error (a product evaluated in ``dtype`` is
  close to the exact product of a nearby operator: the float32 forward pass of a
  network has activations a few roundings off), so the estimate is floored at
  ``SYSTEMATIC_ROUNDINGS * u * anorm`` (4 roundings).  On the float32 Hessians of the
  test MLPs the eigenvalue errors against float64 are 1-2 ``u anorm``, inside it.

Residuals computed from stored products are exact for those products; against the true
operator they are uncertain by ``e``, and so are eigenvalues (Weyl), which is why
``top_eigenvalues`` adds ``e`` to its error bounds and refuses to call a pair converged
to a tolerance below it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["working_dtype", "unit_roundoff", "product_rounding", "measured_rounding", "LOW_PRECISION"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
SYSTEMATIC_ROUNDINGS = 4.0  # floor of the rounding estimate, in units of u * anorm


def working_dtype(dtype: torch.dtype, *, small: bool = False) -> torch.dtype:
    """The dtype for dense bookkeeping next to products in ``dtype``.

    Args:
        dtype: the operator's dtype.
        small: ``True`` for ``O(m^2)``/``O(m^3)`` problems (projected matrices, tridiagonal
            eigenproblems), which are done in float64 for every floating dtype below it.

    Returns:
        ``float64`` for small problems; for ``[n, m]`` data ``float32`` for 16-bit
        operators (LAPACK has no half-precision kernels) and ``dtype`` otherwise.
    """
    if small:
        return torch.float64 if dtype in (torch.float32,) + LOW_PRECISION else dtype
    return torch.float32 if dtype in LOW_PRECISION else dtype


def default_tolerance(dtype: torch.dtype) -> float:
    """The eigen tolerance used when ``tol=None``: 1e-6 in float64, 1e-5 in float32, 3e-2 in 16 bits.

    A relative residual below about ``10 sqrt(n) u`` cannot be shown by products rounded in
    ``dtype`` (``u`` its unit roundoff; measured: float32 residuals stop near 6e-7 of ``||A||``
    on a 676-parameter Hessian), so a float64-sized default would report float32 pairs as
    unconverged.  Pass ``tol=`` explicitly to ask for more (and be told when it cannot be met).
    """
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 1e-5
    return 3e-2


def unit_roundoff(dtype: torch.dtype) -> float:
    """``eps / 2`` of a floating dtype."""
    return torch.finfo(dtype).eps / 2


def product_rounding(n: int, dtype: torch.dtype, anorm: float) -> float:
    """Modelled norm of a product's rounding error for a unit vector: ``sqrt(n) u anorm``."""
    return math.sqrt(n) * unit_roundoff(dtype) * anorm


def measured_rounding(F: Tensor, n: int, dtype: torch.dtype, anorm: float) -> float:
    """Product rounding estimated from the skew part of ``F = V^T fl(A V)`` (``[m, m]``).

    Returns ``max(sqrt(n / 2) * rms(F - F^T), SYSTEMATIC_ROUNDINGS * u * anorm)``
    (off-diagonal rms; the floor alone when ``m < 2``).  ``O(m^2)``, no product.
    """
    m = F.shape[0]
    floor = SYSTEMATIC_ROUNDINGS * unit_roundoff(dtype) * anorm
    if m < 2:
        return floor
    S = F - F.T
    rms = float(S.square().sum()) / (m * (m - 1))
    return max(math.sqrt(n / 2 * rms), floor)


def matmat_in(op, X: Tensor, dtype: torch.dtype) -> Tensor:
    """``op @ X`` with ``X`` and the result in ``dtype`` (the product runs in ``op.dtype``)."""
    Y = op.matmat(X if X.dtype == op.dtype else X.to(op.dtype))
    return Y if Y.dtype == dtype else Y.to(dtype)
