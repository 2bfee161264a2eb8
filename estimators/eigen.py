"""Extreme eigenpairs of a symmetric operator: restarted Lanczos and power iteration.

:func:`top_eigenvalues` is thick-restart Lanczos in Krylov-Schur form
(:mod:`estimators._krylov`).  It keeps an orthonormal basis ``V`` (``[m, n]``, rows)
and the relation ``A V = V F + G C^T`` (``F`` the computed projections, ``G`` the
residual block), so the residual of every Ritz pair is known exactly from ``O(m^2)``
numbers without a second copy ``A V`` and without forming residual vectors.  Each step
multiplies the residual block (from one start vector: the next Lanczos vector),
orthogonalizes the product by the local recurrence and one classical Gram-Schmidt pass
over ``V`` (a second pass only when the DGKS test asks for it).  When ``m`` reaches
``max_basis`` the method restarts from the best ``keep`` Ritz vectors by one
``[keep, m] x [m, n]`` product (no product is repeated): the Krylov-Schur / thick
restart of Stewart and Wu-Simon, memory ``max_basis`` vectors.  A warm start ``v0`` (the
previous eigenvectors, say) gives a Krylov sequence from a start vector made of the
previous eigenvectors, so a good warm start converges in a few products.

Repeated eigenvalues: a single-vector Krylov space holds one vector per eigenspace, so
a ``p``-fold eigenvalue can be reported fewer than ``p`` times.  ``block_size = b``
starts from ``b`` random columns (multiplicities up to ``b`` at no extra cost), and
``verify=True`` checks the deflated operator after convergence (about 1.8x the products
on the spectra of ``tests/spectra.py``, hence off by default).

For float32/float16/bfloat16 operators the small matrices and the residual block are
float64, and so is the basis by default: it keeps the Ritz values at the accuracy of the
products (``~1e-8`` relative on a float32 MLP Hessian) instead of losing ``~1e-6`` to
long float32 dot products.  ``basis_dtype=torch.float32`` stores the basis in float32
(half the memory and the memory traffic of the Gram-Schmidt passes): the coefficients
the rounding measurement reads are still accumulated in float64, and the rounding of the
stored vectors, modelled as ``u_32 ||A|| sqrt(1 + restarts)``, is added to ``e`` below
(so to the convergence test and the error bounds).

Convergence test (exact residuals, rounding accounted for).  With ``anorm`` the largest
``|Ritz value|`` seen (a lower bound on ``||A||_2``), ``eps`` the operator dtype's machine
epsilon, ``u = eps / 2`` and ``e`` the rounding of one product, measured from the
asymmetry of the computed projections ``F`` (:mod:`estimators._precision`; plus the
basis rounding above), Ritz pair ``(theta_i, x_i)`` is
converged when

    ||A x_i - theta_i x_i||_2 + e <= tol * max(|theta_i|, eps^(2/3) * anorm),

i.e. when the residual *against the true operator* (the residual of the stored
products plus their rounding) meets the tolerance.  The ``eps^(2/3)`` guard is ARPACK's
for eigenvalues near 0.  A tolerance below the attainable accuracy of the dtype
(``tol |theta| <= e``, e.g. ``tol = 1e-3`` in bfloat16) therefore never reports
convergence: the iteration stops once the residual reaches the rounding floor
``max(2 e, 10 u anorm)`` (further products cannot lower it), returns the
pairs with ``converged = False`` and warns.  Numerically zero eigenvalues
(``|theta| < eps^(2/3) anorm``, where a relative test is meaningless) count as converged
at the rounding floor when that floor is within ``tol * anorm``.  A residual ``r`` bounds the eigenvalue
error: some eigenvalue lies within ``r + e`` of ``theta`` and, with gap ``delta`` to the
rest of the spectrum, within ``(r + e)^2 / delta + e`` (Kato-Temple on the true
operator, whose Rayleigh quotient differs from ``theta`` by at most ``e``); the smaller
is reported as ``error_bounds``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from curvature import ConvergenceWarning, LinearOperator

from ._krylov import BASIS_DTYPES, KrylovSchur
from ._precision import (SYSTEMATIC_ROUNDINGS, default_tolerance, product_rounding, unit_roundoff,
                         working_dtype)
from ._probes import check_square, make_generator
from ._validate import check_int, check_tolerance
from .lanczos import eigh_small as _eigh_small
from .results import EigenResult

__all__ = ["top_eigenvalues", "power_iteration"]

_WHICH = ("LA", "SA", "LM")


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of ``theta`` from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _gaps(th: Tensor, theta_all: Tensor, anorm: float) -> Tensor:
    """Distance from each ``th[i]`` to the nearest other value of ``theta_all`` (``anorm`` if none)."""
    d = (theta_all[None, :] - th[:, None]).abs()
    d = torch.where(d > 0, d, torch.full_like(d, float("inf")))
    g = d.min(dim=1).values
    return torch.where(torch.isfinite(g), g, torch.as_tensor(anorm, dtype=g.dtype, device=g.device))


def _thresholds(th: Tensor, theta_all: Tensor, tol: float, eps: float, anorm: float | Tensor,
                rounding: float | Tensor, floor: float | Tensor, criterion: str,
                res: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(converge, stop)``: residual thresholds of convergence and of stopping per wanted pair.

    ``converge`` makes the bound on the true operator (stored residual plus the products'
    ``rounding``) meet ``tol``; it is ``<= 0`` where ``tol`` is below the attainable
    accuracy.  Numerically zero values (``|theta| < eps^(2/3) anorm``) also converge at
    the rounding ``floor`` when ``floor + rounding <= tol * anorm``.  ``stop`` is ``max(converge, floor)``: below the rounding floor further
    products do not lower the residual.
    """
    anorm, rounding, floor = (torch.as_tensor(x, dtype=th.dtype, device=th.device) for x in (anorm, rounding, floor))
    thr = tol * torch.clamp(th.abs(), min=eps ** (2.0 / 3.0) * anorm)
    if criterion == "eigenvalue":
        gaps = _gaps(th, theta_all, anorm)
        if res is not None:
            gaps = gaps - res
        thr = torch.maximum(thr, ((thr - rounding).clamp(min=0) * gaps.clamp(min=0)).sqrt())
    conv = thr - rounding
    # numerically zero eigenvalues (|theta| < eps^(2/3) anorm): a residual at the rounding
    # floor is the best any precision gives, and it meets tol relative to ||A|| when
    # floor + rounding <= tol * anorm
    zero = (th.abs() < eps ** (2.0 / 3.0) * anorm) & (floor + rounding <= tol * anorm)
    conv = torch.where(zero, torch.clamp(conv, min=floor), conv)
    return conv, torch.clamp(conv, min=floor)


def _error_bounds(theta_sel: Tensor, theta_all: Tensor, res: Tensor, rounding: float = 0.0) -> Tensor:
    """``min(r + e, (r + e)^2 / gap + e)`` per pair (module docstring), ``e = rounding``."""
    rt = res + rounding
    d = (theta_all[None, :] - theta_sel[:, None]).abs()
    d = torch.where(d > 0, d, torch.full_like(d, float("inf")))
    gap = d.min(dim=1).values
    kato_temple = torch.where(torch.isfinite(gap), rt**2 / gap + rounding, rt)
    return torch.minimum(rt, kato_temple)


def _keep(k: int, mb: int, b: int) -> int:
    """Ritz vectors kept at a restart of a ``mb``-vector basis: the wanted ``k`` and half the rest."""
    return min(mb - b, max(k, k + (mb - k) // 2))


def _more_wanted(a: float, b: float, which: str, margin: float) -> bool:
    """Whether ``a`` is more wanted than ``b`` by more than ``margin``."""
    if which == "LA":
        return a > b + margin
    if which == "SA":
        return a < b - margin
    return abs(a) > abs(b) + margin


def _verify_multiplicities(op, which, th, X, AX, theta, *, tol, criterion, budget, gen, max_basis):
    """Merge missed copies of repeated eigenvalues into the converged pairs (``verify=True``).

    ``th [k]``, ``X [n, k]``, ``AX [n, k]`` are the converged Ritz pairs (working dtype).
    Each round finds the best pair ``(mu, z)`` of ``P A P`` (``P = I - X X^T``) from a random
    start orthogonal to ``X``; if ``mu`` beats ``th[-1]`` by more than the convergence
    threshold, Rayleigh-Ritz on ``[X, z]`` (one product, ``A X`` is reused) gives the new
    pairs.  Returns ``(th, X, res, theta)`` with exact residuals; at most ``k`` rounds.
    """
    from curvature import CallableOperator

    n, k = X.shape
    dtype, wdtype = op.dtype, X.dtype
    eps = torch.finfo(dtype).eps
    start = op.num_matvecs
    res = (AX - X * th).norm(dim=0)
    for _ in range(k):
        left = budget - (op.num_matvecs - start)
        if left < 2:
            break
        Xo = X.to(dtype)

        # P A P + s X X^T with s less wanted than th[-1]: rounding leaks X components
        # into the Krylov space, which must not find span(X) (eigenvalue 0 of P A P)
        # as "more wanted" (e.g. SA on a positive spectrum)
        tk = float(th[-1])
        span = max(abs(tk), float(th.abs().max()), 1e-300)
        shift = tk - 2 * span if which == "LA" else tk + 2 * span if which == "SA" else 0.0

        def proj(Y: Tensor, Xo: Tensor = Xo, shift: float = shift) -> Tensor:
            C = Xo.T @ Y
            Z = op.matmat(Y - Xo @ C)
            return Z - Xo @ (Xo.T @ Z) + shift * (Xo @ C)

        defl = CallableOperator(proj, (n, n), dtype=dtype, device=op.device, is_symmetric=True)
        r0 = torch.randn(n, generator=gen, device=op.device, dtype=dtype).to(wdtype)
        r0 = r0 - X @ (X.T @ r0)
        r0 = r0 - X @ (X.T @ r0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sub = top_eigenvalues(defl, 1, which, tol=tol, max_matvecs=left - 1, v0=r0.to(dtype),
                                  generator=gen, max_basis=max_basis, criterion=criterion)
        mu = float(sub.eigenvalues[0])
        anorm = max(float(th.abs().max()), abs(mu))
        margin = max(tol * max(abs(float(th[-1])), eps ** (2.0 / 3.0) * anorm), 50 * eps * anorm)
        if not _more_wanted(mu, float(th[-1]), which, margin):
            break
        z = sub.eigenvectors[:, 0].to(wdtype)
        z = z - X @ (X.T @ z)
        z = z / z.norm()
        Az = op.matmat(z[:, None].to(dtype)).to(wdtype)
        B = torch.cat([X, z[:, None]], dim=1)
        AB = torch.cat([AX, Az], dim=1)
        Hs = B.T @ AB
        theta_s, Y = _eigh_small(0.5 * (Hs + Hs.T))
        sel = _order(theta_s, which)[:k]
        th, X, AX = theta_s[sel], B @ Y[:, sel], AB @ Y[:, sel]
        theta = torch.cat([theta, theta_s])
        res = (AX - X * th).norm(dim=0)
    return th, X, res, theta


def top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    which: str = "LA",
    *,
    tol: float | None = None,
    max_matvecs: int | None = None,
    v0: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    max_basis: int | None = None,
    block_size: int = 1,
    criterion: str = "residual",
    verify: bool = False,
    basis_dtype: torch.dtype | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        op: symmetric ``LinearOperator`` ``[n, n]`` (only ``op @ V`` is used).
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: relative residual tolerance (see the module docstring for the exact test);
            default (``None``) by dtype: 1e-6 float64, 1e-5 float32, 3e-2 bfloat16/float16
            (:func:`estimators._precision.default_tolerance`).
            ``tol = 1e-6`` gives eigenvalues to ~1e-6 relative in the worst case
            (``|theta - lambda| <= r``) and ~``tol^2 |theta| / relgap`` typically.
        max_matvecs: product budget (default ``max(1000, 20 max_basis)``); if it runs
            out a :class:`curvature.ConvergenceWarning` is issued and ``converged``
            says which pairs made it.
        v0: warm start, ``[n]`` or a block ``[n, j]`` (e.g. the previous top
            eigenvectors).  With ``block_size=1`` a block is summed (columns
            normalized) into one start vector; with ``block_size > 1`` its span is the
            first block of the basis.
        seed, generator: randomness for the default start vector (and for the rare
            random directions after an invariant subspace).
        max_basis: largest basis kept (default ``min(n, max(40, 3k + 10))``); memory is
            ``max_basis`` vectors of size ``n`` (in ``basis_dtype``).
        block_size: vectors added per step (one block product ``op @ [n, b]``);
            ``1`` is plain Lanczos and the fewest products, larger blocks help when a
            block product costs less than ``b`` single ones (GPUs, vmap).
        criterion: ``"residual"`` (default; the residual test of the module docstring)
            or ``"eigenvalue"``: stop when the eigenvalue error bound
            ``min(r_i, r_i^2 / gap_i)`` is below the same threshold, i.e.
            ``r_i <= max(thr_i, sqrt(thr_i * gap_i))``, with ``gap_i`` the distance from
            ``theta_i`` to the nearest other Ritz value minus ``r_i``.  Far fewer products
            for eigenvalues alone, but the gap comes from Ritz values: an eigenvalue the
            Krylov space has not found yet can make the bound optimistic (eigenvectors
            are then accurate only to about ``r_i / gap_i``).
        basis_dtype: dtype of the stored basis: ``None`` (default: float64 for operators in
            float32 or below, else the operator's) or ``torch.float32``/``torch.float64``.
            ``torch.float32`` halves the basis memory (``max_basis * n * 4`` bytes) and the
            bookkeeping's memory traffic; its rounding (``u_32 ||A||`` per restart, see the
            module docstring) is added to the convergence test and to ``error_bounds``,
            so tolerances below about ``1e-6 ||A|| / |theta|`` are out of reach, and the
            eigenvectors are orthonormal to about ``1e-7``.
        verify: look for missed copies of repeated eigenvalues.  A single-vector
            Krylov space holds one vector per eigenspace (copies appear only through
            rounding), so a ``p``-fold eigenvalue can be reported fewer than ``p`` times
            with every pair "converged".  With ``verify=True``, after convergence the
            best pair of the deflated operator ``P A P`` (``P = I - X X^T``, ``X`` the
            converged vectors) is computed from a fresh random start orthogonal to
            ``X``; if it is more wanted than the ``k``-th value (by more than its
            convergence threshold) it is merged by Rayleigh-Ritz on ``[X, z]`` and the
            check repeats (at most ``k`` rounds).  Each round costs one top-1 solve
            (tens of products), so it is off by default; ``block_size > 1`` (a random
            start block of ``block_size`` columns) also resolves multiplicities up to
            ``block_size`` at no extra cost.

    Returns:
        :class:`~estimators.results.EigenResult` (``eigenvalues [k]``, ``eigenvectors
        [n, k]``, ``residuals [k]``, ``error_bounds [k]``, ``converged [k]``,
        ``num_matvecs``).

    Raises:
        ValueError: non-square / non-symmetric operator, ``k`` outside ``[1, n]``,
            unknown ``which``, bad ``v0`` or ``basis_dtype``.
        FloatingPointError: the operator produced NaN/inf.
    """
    n = check_square(op, "top_eigenvalues", symmetric=True)
    if which not in _WHICH:
        raise ValueError(f"Unknown which={which!r}; use 'LA' (largest), 'SA' (smallest) or 'LM' (magnitude).")
    k = check_int(k, "k", minimum=None)
    if k < 1 or k > n:
        raise ValueError(f"k must satisfy 1 <= k <= n = {n}, got k = {k}.")
    tol = check_tolerance(default_tolerance(op.dtype) if tol is None else tol, "tol")
    if criterion not in ("residual", "eigenvalue"):
        raise ValueError(f"Unknown criterion={criterion!r}; use 'residual' or 'eigenvalue'.")
    b = check_int(block_size, "block_size")
    mb = min(n, max(40, 3 * k + 10)) if max_basis is None else min(check_int(max_basis, "max_basis"), n)
    if mb < n and mb < k + b:
        raise ValueError(f"max_basis = {mb} must be at least k + block_size = {k + b} (or n).")
    budget = max(1000, 20 * mb) if max_matvecs is None else check_int(max_matvecs, "max_matvecs")
    gen, seed_used = make_generator(seed, generator, op.device)
    dtype, device = op.dtype, op.device
    # the small dense algebra (projected matrix, Ritz vectors, residual block) in float64
    # for lower-precision operators; the basis in basis_dtype (float64 by default: it keeps
    # the Rayleigh-Ritz values at the accuracy of the products).  Floors below use the
    # operator's epsilon (the products' rounding).
    wdtype = working_dtype(dtype, small=True)
    if basis_dtype is None:
        bdtype = wdtype
    elif basis_dtype in BASIS_DTYPES:
        bdtype = basis_dtype
    else:
        raise ValueError(f"basis_dtype must be torch.float32, torch.float64 or None (float64 below a float64 "
                         f"operator's precision), got {basis_dtype!r}.")
    eps = torch.finfo(dtype).eps
    eps23 = eps ** (2.0 / 3.0)
    # the residual floor the products' rounding allows (relative to anorm; the rounding
    # itself is measured from the skew part of the coefficients F at each step)
    floor_rel = 10 * unit_roundoff(dtype)
    before = op.num_matvecs

    # ---- start block
    if v0 is None:
        # a block of b random columns: a block Krylov space holds up to b vectors
        # of each eigenspace, so multiplicities up to block_size are found
        D = torch.randn(n, min(b, mb), generator=gen, device=device, dtype=dtype).to(wdtype)
    else:
        if not isinstance(v0, Tensor) or v0.dim() not in (1, 2) or v0.shape[0] != n:
            raise ValueError(f"v0 must have shape [{n}] or [{n}, j], got {getattr(v0, 'shape', v0)}.")
        D = v0.to(device=device, dtype=wdtype)
        D = D.unsqueeze(1) if D.dim() == 1 else D
        if not bool(torch.isfinite(D).all()):
            raise ValueError("v0 contains NaN or inf.")
        if D.shape[1] > 1 and b == 1:
            # one Krylov sequence from the sum of the (normalized) columns: rich in every
            # warm direction, and measured to beat a Rayleigh-Ritz step on the block
            # (e.g. 12 vs 23 products for the top 5 after a 1e-4 perturbation)
            D = (D / D.norm(dim=0).clamp(min=torch.finfo(wdtype).tiny)).sum(dim=1, keepdim=True)
        if b > 1 and D.shape[1] < b:
            # fill the start block with random columns (multiplicities up to b)
            R = torch.randn(n, b - D.shape[1], generator=gen, device=device, dtype=dtype).to(wdtype)
            D = torch.cat([D, R], dim=1)
        D = D[:, : max(1, mb - b)]
        seed_used = seed_used if generator is None and seed is not None else None
    ks = KrylovSchur(op, mb, bdtype, wdtype)
    drop = math.sqrt(torch.finfo(wdtype).eps)
    if ks.append_fresh(D.T, drop) == 0:
        raise ValueError("v0 is zero (or numerically rank zero).")
    anorm_t = torch.zeros((), device=device, dtype=wdtype)
    u_op = unit_roundoff(dtype)
    restarts = 0

    def state(m: int):
        """Ritz pairs of H[:m, :m], the wanted ones, their residual bounds and the thresholds (on the device)."""
        nonlocal anorm_t
        theta, Y = _eigh_small(ks.H[:m, :m])
        order = _order(theta, which)
        anorm_t = torch.maximum(anorm_t, theta.abs().max())
        sel = order[: min(k, m)]
        th, Ys = theta[sel], Y[:, sel]
        res = ks.residual_norms(Ys)
        # the products' rounding (measured) plus the bookkeeping's (modelled; u_64 ||A||
        # for the default float64 basis)
        rounding = ks.rounding(n, u_op, anorm_t, SYSTEMATIC_ROUNDINGS) + ks.basis_rounding(anorm_t)
        floor = torch.maximum(2 * rounding, floor_rel * anorm_t)
        conv_thr, stop_thr = _thresholds(th, theta, tol, eps, anorm_t, rounding, floor, criterion, res)
        return theta, Y, order, th, Ys, res, rounding, floor, conv_thr, stop_thr

    while True:
        m = ks.m
        theta, Y, order, th, Ys, res, rounding, floor, conv_thr, stop_thr = state(m)
        # pairs done (converged, or at the rounding floor); at m == n Rayleigh-Ritz is exact
        conv = res <= stop_thr
        tiny = 100 * torch.finfo(wdtype).eps * anorm_t
        all_conv, breakdown = torch.stack([conv.all(), ks.residual_breakdown(tiny)]).tolist()  # one host read
        spent = op.num_matvecs - before
        if (m >= k and all_conv) or m == n or spent >= budget:
            break
        # ---- restart: keep the most wanted Ritz vectors (the relation carries them exactly)
        if m + ks.G.shape[0] > mb or (breakdown and m + b > mb):
            keep = _keep(k, mb, b)
            ks.restart(Y[:, order[:keep]])
            restarts += 1
        budget_left = budget - (op.num_matvecs - before)
        if not breakdown and ks.G.shape[0] > budget_left:
            break  # the next block does not fit in the budget
        if breakdown or ks.advance(drop, tiny) == 0:
            # invariant subspace: continue with random directions
            if ks.m >= n:
                break
            R0 = torch.randn(max(1, min(b, mb - ks.m, budget_left)), n, generator=gen, device=device, dtype=dtype)
            if ks.append_fresh(R0.to(wdtype), drop) == 0:
                break

    # ---- final Ritz pairs (residuals from the relation)
    m = ks.m
    theta, Y, order, th, Ys, res, rounding, floor, conv_thr, stop_thr = state(m)
    kk = th.shape[0]
    Xt = ks.vectors(Ys)
    nx = Xt.norm(dim=1)
    Xt, res = Xt / nx[:, None], res / nx
    X = Xt.T
    anorm, rounding, floor = float(anorm_t), float(rounding), float(floor)
    conv_thr, stop_thr = _thresholds(th, theta, tol, eps, anorm, rounding, floor, criterion, res)
    # an exactly zero residual with zero rounding (e.g. the zero operator) is exact
    exact = (res == 0) & (rounding == 0)
    conv = ((conv_thr > 0) & (res <= (torch.maximum(conv_thr, stop_thr) if m == n else conv_thr))) | exact
    if verify and kk == k and k < n and bool(conv.all()):
        th, X, res, theta = _verify_multiplicities(
            op, which, th, X, (ks.products(Ys) / nx[:, None]).T, theta, tol=tol, criterion=criterion,
            budget=budget - (op.num_matvecs - before), gen=gen, max_basis=max_basis)
        conv_thr, _ = _thresholds(th, theta, tol, eps, anorm, rounding, floor, criterion, res)
        conv = ((conv_thr > 0) & (res <= conv_thr)) | ((res == 0) & (rounding == 0))
    if kk < k or not bool(conv.all()):
        unattainable = bool(((conv_thr < floor) & ~conv).any()) and op.num_matvecs - before < budget
        rel, frel = rounding / max(anorm, 1e-300), floor / max(anorm, 1e-300)
        need = (frel + rel) / max(float(th.abs().min()) / max(anorm, 1e-300), eps23)
        of = f"{dtype} products" + (f" and a {bdtype} basis" if bdtype != wdtype else "")
        fix = "a float64 operator" + (" and basis_dtype=None" if bdtype != wdtype else "")
        why = (f": tol={tol:g} is below the attainable accuracy of {of} (residuals stop "
               f"falling at the rounding floor {frel:.1e} ||A||, the rounding is measured "
               f"at {rel:.1e} ||A||); use {fix} or tol >= {need:.1e}"
               if unattainable else f" within max_matvecs={budget}")
        warnings.warn(
            f"top_eigenvalues: {int(conv.sum())} of {k} eigenpairs converged to tol={tol:g}"
            f"{why} (largest relative residual "
            f"{float((res / th.abs().clamp(min=eps23 * max(anorm, 1e-300))).max()):.2e}).",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=th.to(dtype),
        eigenvectors=X.to(dtype),
        residuals=res.to(dtype),
        error_bounds=_error_bounds(th, theta, res, rounding).to(dtype),
        converged=conv,
        num_matvecs=op.num_matvecs - before,
        num_restarts=restarts,
        seed=seed_used,
        which=which,
    )


def power_iteration(
    op: LinearOperator,
    k: int = 1,
    *,
    tol: float | None = None,
    max_iters: int = 1000,
    v0: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Largest-magnitude eigenpairs by power iteration with deflation.

    Eigenpair ``i`` is found by power iteration on ``(I - X X^T) A (I - X X^T)`` with
    ``X`` the ``i`` pairs found before (the iterate is kept orthogonal to ``X``).  Pair
    ``i`` stops when ``||P A x - theta x|| <= tol * |theta|`` with ``P = I - X X^T``
    (the residual of the deflated operator; the reported ``residuals`` are the true
    ``||A x - theta x||``, which also carry the error of the earlier pairs) or after
    ``max_iters`` products.
    Convergence is linear with ratio ``|lambda_{i+1} / lambda_i|``: prefer
    :func:`top_eigenvalues`, which needs far fewer products; this is the baseline
    PyHessian uses.

    Args:
        op: symmetric operator ``[n, n]``.
        k: number of pairs (``1 <= k <= n``).
        tol: relative residual tolerance (default by dtype, as for :func:`top_eigenvalues`).
        max_iters: product limit per pair.
        v0: start vector ``[n]`` or ``[n, k]`` (one column per pair).
        seed, generator: randomness for the start vectors.

    Returns:
        :class:`~estimators.results.EigenResult` with ``which="LM"`` (pairs in the order
        found, i.e. by decreasing magnitude when the iteration converges); cost one
        product per iteration.
    """
    n = check_square(op, "power_iteration", symmetric=True)
    k = check_int(k, "k", minimum=None)
    if k < 1 or k > n:
        raise ValueError(f"k must satisfy 1 <= k <= n = {n}, got k = {k}.")
    tol = check_tolerance(default_tolerance(op.dtype) if tol is None else tol, "tol")
    max_iters = check_int(max_iters, "max_iters")
    gen, seed_used = make_generator(seed, generator, op.device)
    dtype, device = op.dtype, op.device
    if v0 is not None:
        if not isinstance(v0, Tensor) or v0.dim() not in (1, 2) or v0.shape[0] != n:
            raise ValueError(f"v0 must have shape [{n}] or [{n}, j], got {getattr(v0, 'shape', v0)!r}.")
        v0 = v0.to(device=device, dtype=dtype)
        v0 = v0.unsqueeze(1) if v0.dim() == 1 else v0
        if not bool(torch.isfinite(v0).all()):
            raise ValueError("v0 contains NaN or inf.")
    anorm = 0.0
    floor_rel = min(max(math.sqrt(n), 20.0), 100.0) * unit_roundoff(dtype)
    rounding_rel = product_rounding(n, dtype, 1.0)
    before = op.num_matvecs
    X = torch.zeros(n, 0, device=device, dtype=dtype)
    thetas, res, conv = [], [], []
    for i in range(k):
        if v0 is not None and i < v0.shape[1]:
            v = v0[:, i].clone()
        else:
            v = torch.randn(n, generator=gen, device=device, dtype=dtype)
        v = v - X @ (X.T @ v)
        nv = float(v.norm())
        if not nv > 0:
            which_v = f"v0[:, {i}]" if v0 is not None and i < v0.shape[1] else "the random start"
            raise ValueError(f"power_iteration: {which_v} is zero (or lies in the span of the "
                             f"{i} pairs found before); pass a nonzero start vector.")
        v = v / nv
        theta = torch.zeros((), device=device, dtype=dtype)
        r = torch.full((), float("inf"), device=device, dtype=dtype)
        ok = False
        for _ in range(max_iters):
            w = op.matvec(v)
            theta = v @ w
            r = (w - theta * v).norm()
            w = w - X @ (X.T @ w)
            anorm = max(anorm, abs(float(theta)))
            rd = float((w - theta * v).norm())
            # converged: deflated residual plus the products' rounding within tol
            ok = rd + rounding_rel * anorm <= tol * abs(float(theta))
            if ok or rd <= floor_rel * anorm:  # at the rounding floor: no further progress
                break
            nw = w.norm()
            if not nw > 0:
                break
            v = w / nw
        X = torch.cat([X, v.unsqueeze(1)], dim=1)
        thetas.append(theta)
        res.append(r)
        conv.append(ok)
    th = torch.stack(thetas)
    rs = torch.stack(res)
    cv = torch.tensor(conv, device=device)
    if not bool(cv.all()):
        warnings.warn(
            f"power_iteration: {int(cv.sum())} of {k} eigenpairs converged to tol={tol:g} "
            f"within max_iters={max_iters} (the products' rounding in {dtype} is modelled as "
            f"{rounding_rel:.1e} ||A||).",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=th,
        eigenvectors=X,
        residuals=rs,
        error_bounds=_error_bounds(th, th, rs, rounding_rel * anorm),
        converged=cv,
        num_matvecs=op.num_matvecs - before,
        num_restarts=0,
        seed=seed_used,
        which="LM",
    )
