"""Stochastic trace estimators: Hutchinson, Hutch++ and XTrace.

All three see the operator only through block products ``op @ V``.  With ``m``
products, Hutchinson's error falls like ``1/sqrt(m)``; Hutch++ (Meyer, Musco, Musco,
Woodruff 2021) removes a rank-``m/3`` sketch first, and XTrace (Epperly, Tropp,
Webber 2024) uses every test vector both for the sketch and for the residual estimate
(leave-one-out), which gives ``O(1/m)`` error and far better on spectra with outliers
or fast decay, plus an error estimate from the spread of the leave-one-out estimates.

Precision: probes, sketches and results are in the operator's dtype, except for
float16/bfloat16 operators, whose products run in their dtype while probes, QR and sums
use float32 (:func:`estimators._precision.working_dtype`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvature import LinearOperator

from ._precision import matmat_in, working_dtype
from ._probes import PROBE_KINDS, check_square, draw_probes, make_generator
from ._validate import check_int, check_tolerance
from .results import TraceResult

__all__ = ["hutchinson_trace", "hutchpp_trace", "xtrace", "xnystrace"]


def _std_error(samples: Tensor) -> Tensor:
    s = samples.numel()
    if s < 2:
        return torch.full((), float("nan"), dtype=samples.dtype, device=samples.device)
    return samples.std() / math.sqrt(s)


def _probes(op: LinearOperator, k: int, probe: str, gen: torch.Generator) -> Tensor:
    """``k`` probes in the working dtype (float32 for 16-bit operators)."""
    return draw_probes(op, k, probe, gen).to(working_dtype(op.dtype))


def hutchinson_trace(
    op: LinearOperator,
    num_probes: int = 100,
    *,
    probe: str = "rademacher",
    block_size: int = 32,
    rtol: float | None = None,
    atol: float | None = None,
    min_probes: int = 10,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Hutchinson's estimator ``mean_i w_i^T A w_i`` with ``E[w w^T] = I``.

    Args:
        op: square operator ``[n, n]`` (symmetry not needed).
        num_probes: probes (the maximum when a tolerance is given).
        probe: ``"rademacher"`` (entries +-1; variance ``2(||A||_F^2 - sum A_ii^2)``,
            the default), ``"gaussian"`` (variance ``2||A||_F^2``) or ``"sphere"``.
        block_size: probes per product ``op @ [n, block_size]``.
        rtol, atol: adaptive stopping: after each block (and at least ``min_probes``
            probes) stop once ``std_error <= rtol * |estimate| + atol``.
        min_probes: probes before the adaptive test is trusted.
        seed, generator: randomness (see :func:`estimators._probes.make_generator`).

    Returns:
        :class:`~estimators.results.TraceResult`; ``std_error`` is the sample standard
        deviation of the per-probe values over ``sqrt(num_probes)``.  Cost: one product
        per probe.
    """
    check_square(op, "hutchinson_trace")
    num_probes = check_int(num_probes, "num_probes")
    block_size = check_int(block_size, "block_size")
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe distribution {probe!r}; use one of {PROBE_KINDS}.")
    min_probes = check_int(min_probes, "min_probes")
    adaptive = rtol is not None or atol is not None
    rtol_ = 0.0 if rtol is None else check_tolerance(rtol, "rtol", allow_zero=True)
    atol_ = 0.0 if atol is None else check_tolerance(atol, "atol", allow_zero=True)
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    samples: list[Tensor] = []
    drawn = 0
    converged = not adaptive
    while drawn < num_probes:
        b = min(block_size, num_probes - drawn)
        Om = _probes(op, b, probe, gen)
        samples.append((Om * matmat_in(op, Om, Om.dtype)).sum(dim=0))
        drawn += b
        if adaptive and drawn >= max(2, min_probes):
            s = torch.cat(samples)
            if bool(_std_error(s) <= rtol_ * s.mean().abs() + atol_):  # the block's one host read
                converged = True
                break
    s = torch.cat(samples)
    return TraceResult(
        estimate=s.mean(), std_error=_std_error(s), num_matvecs=op.num_matvecs - before,
        num_probes=s.numel(), seed=seed, method="hutchinson", samples=s, converged=converged,
    )


def hutchpp_trace(
    op: LinearOperator,
    num_matvecs: int = 99,
    *,
    probe: str = "rademacher",
    block_size: int = 32,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Hutch++: exact trace of a rank-``m/3`` sketch plus Hutchinson on the rest.

    With ``S`` (``m/3`` probes) and ``Q = orth(A S)``: ``tr(Q^T A Q) +
    mean_i g_i^T (I - QQ^T) A (I - QQ^T) g_i`` over the remaining ``m - 2m/3`` probes
    ``g_i``.  Projecting on both sides (not relying on symmetry) is the numerically safe
    form.  For PSD ``A`` the relative error is ``O(1/m)``.

    Args:
        op: square operator.
        num_matvecs: product budget ``m >= 3``: ``m // 3`` for the sketch, ``m // 3``
            for ``A Q`` and the rest for the Hutchinson part.
        probe, block_size, seed, generator: as in :func:`hutchinson_trace`.

    Returns:
        :class:`~estimators.results.TraceResult`; ``std_error`` is the standard error of
        the Hutchinson part given the sketch.
    """
    check_square(op, "hutchpp_trace")
    m = check_int(num_matvecs, "num_matvecs", 3)
    block_size = check_int(block_size, "block_size")
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    k = m // 3
    S = _probes(op, k, probe, gen)
    Q, _ = torch.linalg.qr(matmat_in(op, S, S.dtype))
    t_low = (Q * matmat_in(op, Q, Q.dtype)).sum()
    samples = []
    rest = m - 2 * k
    drawn = 0
    while drawn < rest:
        b = min(block_size, rest - drawn)
        Gm = _probes(op, b, probe, gen)
        Gm = Gm - Q @ (Q.T @ Gm)
        AG = matmat_in(op, Gm, Gm.dtype)
        AG = AG - Q @ (Q.T @ AG)
        samples.append((Gm * AG).sum(dim=0))
        drawn += b
    s = torch.cat(samples)
    return TraceResult(
        estimate=t_low + s.mean(), std_error=_std_error(s), num_matvecs=op.num_matvecs - before,
        num_probes=k + rest, seed=seed, method="hutch++", samples=None,
    )


def xtrace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    probe: str = "sphere",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """XTrace (Epperly, Tropp, Webber 2024): exchangeable leave-one-out Hutch++.

    With ``k = m // 2`` test vectors ``Omega``, ``Y = A Omega = QR`` and for each ``i``
    the basis ``Q_(i)`` of ``Y`` without column ``i``: ``t_i = tr(Q_(i)^T A Q_(i)) +
    w_i^T (I - P_(i)) A (I - P_(i)) w_i``.  ``P_(i) = QQ^T - Q s_i s_i^T Q^T`` with
    ``s_i`` the normalized ``i``-th column of ``R^{-T}``, so all ``k`` estimates cost
    ``Z = A Q`` (``k`` more products) plus ``O(n k^2)`` algebra.  The estimate is
    ``mean_i t_i`` and the error estimate ``std(t_i) / sqrt(k)`` (it tends to be
    optimistic; the authors advise conservative tolerances).

    With ``probe="sphere"`` (default, the authors' "improved" test vectors) the
    residual term is rescaled by ``(n - k + 1) / ||(I - P_(i)) w_i||^2``, which makes it
    exact when ``A`` restricted to the complement is a multiple of the identity.

    If the sketch is numerically rank deficient (the operator has rank ``r < m/2``, as
    a network with dead units does), the trace is computed exactly on the sketch's range
    (``m/2 + r`` products, ``std_error = 0``) instead of dividing by a singular ``R``.

    Args:
        op: square operator.
        num_matvecs: product budget ``m >= 4`` (at most ``2 (m // 2)`` are used).
        probe: ``"sphere"`` (default), ``"rademacher"`` or ``"gaussian"``.
        seed, generator: randomness.

    Returns:
        :class:`~estimators.results.TraceResult` with the leave-one-out estimates in
        ``samples``.
    """
    n = check_square(op, "xtrace")
    m = check_int(num_matvecs, "num_matvecs", 4)
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe distribution {probe!r}; use one of {PROBE_KINDS}.")
    k = m // 2
    if k >= n:
        raise ValueError(
            f"xtrace with {m} products needs n > m/2 = {k}; the operator has n = {n} "
            "(compute the trace exactly with op.diagonal().sum() instead)."
        )
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    Om = _probes(op, k, probe, gen)
    Y = matmat_in(op, Om, Om.dtype)
    low_rank = _exact_low_rank_trace(op, Y, n)
    if low_rank is not None:
        t = low_rank.reshape(1)
        return TraceResult(
            estimate=low_rank, std_error=torch.zeros_like(low_rank),
            num_matvecs=op.num_matvecs - before, num_probes=k, seed=seed, method="xtrace",
            samples=t,
        )
    Q, R = torch.linalg.qr(Y)
    Z = matmat_in(op, Q, Q.dtype)
    H = Q.T @ Z
    W = Q.T @ Om
    eye = torch.eye(k, dtype=R.dtype, device=R.device)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
    S = Rinv.T
    S = S / S.norm(dim=0, keepdim=True)
    c = (S * W).sum(dim=0)  # s_i^T W_i
    U = Om - Q @ W + (Q @ S) * c
    AU = Y - Z @ W + (Z @ S) * c
    resid = (U * AU).sum(dim=0)
    if probe == "sphere":
        resid = resid * (n - k + 1) / (U * U).sum(dim=0)
    t = torch.trace(H) - (S * (H @ S)).sum(dim=0) + resid
    return TraceResult(
        estimate=t.mean(), std_error=_std_error(t), num_matvecs=op.num_matvecs - before,
        num_probes=k, seed=seed, method="xtrace", samples=t,
    )


def _exact_low_rank_trace(op: LinearOperator, Y: Tensor, n: int) -> Tensor | None:
    """``tr(A)`` exactly when the sketch ``Y = A Omega`` is rank deficient, else ``None``.

    With generic test vectors, ``rank(Y) < k`` means ``range(Y) = range(A)`` (the
    operator has rank ``r < k``), so ``A = P A`` for the projector ``P = Q_r Q_r^T`` onto
    ``range(Y)`` and ``tr(A) = tr(Q_r^T A Q_r)``: exact, at ``r`` more products.  The
    numerical rank counts singular values above ``max(n, k) eps sigma_max`` (what
    ``torch.linalg.matrix_rank`` uses), so directions below rounding are not
    amplified by ``R^{-1}`` in the leave-one-out formulas.
    """
    k = Y.shape[1]
    U, sv, _ = torch.linalg.svd(Y, full_matrices=False)
    if sv.numel() == 0 or float(sv[0]) == 0.0:
        return torch.zeros((), dtype=Y.dtype, device=Y.device)
    cutoff = max(n, k) * torch.finfo(Y.dtype).eps * sv[0]
    r = int((sv > cutoff).sum())
    if r >= k:
        return None
    Qr = U[:, :r]
    return (Qr * matmat_in(op, Qr, Qr.dtype)).sum()


def xnystrace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    probe: str = "sphere",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """XNysTrace (Epperly, Tropp, Webber 2024) for symmetric positive semi-definite operators.

    All ``k = m`` products go into one sketch ``Y = A Omega``; for each ``i`` the
    Nystrom approximation from the other columns, ``A_(i) = Y_(i) (Omega_(i)^T
    Y_(i))^{-1} Y_(i)^T``, gives ``t_i = tr(A_(i)) + w_i^T (A - A_(i)) w_i``.  With
    ``M = Omega^T Y``, ``P = M^{-1}`` and ``G = Y^T Y`` everything is closed form
    (Schur complements): ``w_i^T (A - A_(i)) w_i = 1 / P_ii`` and
    ``tr(A_(i)) = tr(PG) - 2 (PG)_ii + P_ii G_ii - (p_i^T G p_i - 2 P_ii (G p_i)_i +
    P_ii^2 G_ii) / P_ii``, ``O(n k^2)`` in all.  The sketch is stabilized with the shift
    ``nu = eps ||Y||_F / sqrt(n)`` (``A + nu I``; ``n nu`` is subtracted at the end).
    With ``probe="sphere"`` the residual term is rescaled by
    ``(n - k + 1) / ||(I - Pi_(i)) w_i||^2`` (``Pi_(i)`` the projector on the other
    test vectors), the authors' "improved" estimator.

    Args:
        op: symmetric positive semi-definite operator (PSD is assumed, not checked: a
            Cholesky failure raises).
        num_matvecs: products ``m >= 2``, all in one block.
        probe, seed, generator: as in :func:`xtrace`.

    Returns:
        :class:`~estimators.results.TraceResult` (``samples`` are the ``t_i``).
    """
    n = check_square(op, "xnystrace", symmetric=True)
    k = check_int(num_matvecs, "num_matvecs", 2)
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe distribution {probe!r}; use one of {PROBE_KINDS}.")
    if k >= n:
        raise ValueError(f"xnystrace needs n > m; the operator has n = {n} <= m = {k}.")
    gen, seed = make_generator(seed, generator, op.device)
    before = op.num_matvecs
    Om = _probes(op, k, probe, gen)
    Y = matmat_in(op, Om, Om.dtype)
    nu = torch.finfo(op.dtype).eps * Y.norm() / math.sqrt(n)
    Y = Y + nu * Om
    M = Om.T @ Y
    M = 0.5 * (M + M.T)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise ValueError(
            "xnystrace: Omega^T A Omega is not positive definite; the operator is not "
            "positive semi-definite (use xtrace for indefinite operators)."
        )
    C = L.T  # M = C^T C
    _, R = torch.linalg.qr(Y)
    eye = torch.eye(k, dtype=Y.dtype, device=Y.device)
    B = torch.linalg.solve_triangular(C, R, upper=True, left=False)  # R C^{-1}: A_hat = Q B B^T Q^T
    X = torch.linalg.solve_triangular(C, eye, upper=True).T  # columns x_i = C^{-T} e_i
    x_norm2 = (X * X).sum(dim=0)  # P_ii
    BX = B @ (X / x_norm2.sqrt())
    tr_loo = (B * B).sum() - (BX * BX).sum(dim=0)  # tr(A_hat) - ||B x_i||^2 / ||x_i||^2
    resid = 1.0 / x_norm2  # w_i^T (A - A_(i)) w_i
    if probe == "sphere":
        gram_inv = torch.cholesky_inverse(torch.linalg.cholesky(Om.T @ Om))
        resid = resid * (n - k + 1) * torch.diagonal(gram_inv)  # / ||(I - Pi_(i)) w_i||^2
    t = tr_loo + resid - n * nu
    return TraceResult(
        estimate=t.mean(), std_error=_std_error(t), num_matvecs=op.num_matvecs - before,
        num_probes=k, seed=seed, method="xnystrace", samples=t,
    )
