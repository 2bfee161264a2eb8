"""Exact and Krylov solvers of the cubic-regularized Newton subproblem.

The subproblem (Nesterov and Polyak 2006; ARC's with ``sigma = M / 2``)::

    min_h  m(h) = g^T h + 1/2 h^T H h + (M/6) ||h||^3,      M > 0,

has a global minimiser characterised, even for indefinite ``H``, by
``(H + (M r / 2) I) h = -g``, ``H + (M r / 2) I`` positive semidefinite, ``r = ||h||``.

* :class:`EigCubicSubproblem` / :func:`solve_cubic_subproblem_eig`: in the
  eigenbasis ``H = U diag(s) U^T`` the condition is the secular equation
  ``||(diag(s) + lam I)^{-1} c|| = 2 lam / M`` with ``c = U^T g``, solved by
  safeguarded Newton on ``psi(lam) = 1/||y(lam)|| - M/(2 lam)`` (concave and
  increasing, so Newton from the left converges monotonically), with the hard case
  (``c`` orthogonal to the bottom eigenspace, ``s_min < 0``) handled explicitly.
  One decomposition serves any number of ``M`` and of gradients (lazy Hessians):
  each solve is ``O(n)`` per secular iteration plus two ``O(n^2)`` products with ``U``.
* :class:`LanczosCubicSubproblem` / :func:`solve_cubic_subproblem_lanczos`: only
  products with ``H`` (a :class:`curvature.LinearOperator`).  Lanczos from ``g``
  (full reorthogonalisation) builds ``Q_j``, ``T_j``; the model restricted to the
  Krylov space is solved exactly as above; the space grows until
  ``||grad m(h)|| = beta_j |e_j^T y| <= max(rtol ||g||, atol)`` (ARC's GLRT idea).
  The basis is kept, so solving again with a larger ``M`` costs no new products.
  Like every Krylov method started from ``g`` it cannot see the hard case; with
  ``g = 0`` it starts from a seeded random vector so saddles can still be left.

Small Lanczos written here (not ``estimators.lanczos``) because the subproblem needs
the basis kept and grown on demand; ``numpy``/``scipy`` do the small dense work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvature import DenseOperator, LinearOperator

__all__ = [
    "CubicStep",
    "EigCubicSubproblem",
    "LanczosCubicSubproblem",
    "solve_cubic_subproblem",
    "solve_cubic_subproblem_eig",
    "solve_cubic_subproblem_lanczos",
    "cubic_model",
    "secular_cubic",
]


@dataclass(frozen=True)
class CubicStep:
    """A solution of the cubic subproblem.

    Attributes:
        step: ``h``, shape ``[n]``, dtype/device of ``g``.
        radius: ``||h||``.
        shift: the multiplier ``lam = M r / 2`` (``(H + lam I) h = -g``).
        model_value: ``m(h) = g^T h + 1/2 h^T H h + (M/6)||h||^3`` (``<= 0``).
        hard_case: whether the hard case was taken (a bottom eigenvector was added).
        iterations: secular-equation iterations (eigenbasis) or Lanczos vectors (Krylov).
        num_matvecs: products with ``H`` spent by this solve.
        grad_model_norm: ``||grad m(h)||`` (rounding level for the eigenbasis solver;
            the Lanczos residual for the Krylov solver).
    """

    step: Tensor
    radius: float
    shift: float
    model_value: float
    hard_case: bool
    iterations: int
    num_matvecs: int
    grad_model_norm: float


def _check_M(M) -> float:
    M = float(M)
    if not math.isfinite(M) or M <= 0:
        raise ValueError(f"The cubic regularization M must be a finite number > 0, got {M}.")
    return M


def secular_cubic(s: np.ndarray, c: np.ndarray, M: float, *, tol: float = 1e-14,
                  maxiter: int = 500) -> tuple[np.ndarray, float, bool, int]:
    """Minimise ``c^T y + 1/2 sum_i s_i y_i^2 + (M/6)||y||^3`` (diagonal cubic model).

    Args:
        s: eigenvalues ``[n]`` (float64 numpy).
        c: gradient in the eigenbasis ``[n]``.
        M: regularization, ``> 0``.
        tol: relative tolerance on ``| ||y|| - 2 lam / M |``.
        maxiter: iteration limit of the safeguarded Newton iteration.

    Returns:
        ``(y, lam, hard_case, iterations)`` with ``y_i = -c_i / (s_i + lam)`` off the
        hard case and ``lam = M ||y|| / 2 >= max(0, -min(s))``.

    Cost: ``O(n)`` per iteration; typically fewer than 20 iterations.
    """
    M = _check_M(M)
    s = np.asarray(s, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    n = s.size
    s_min, s_max = float(s.min()), float(s.max())
    lam_low = max(0.0, -s_min)
    c_norm = float(np.linalg.norm(c))
    scale = max(float(np.abs(s).max()), c_norm, 1e-300)
    bottom = (s - s_min) <= 1e-12 * scale
    y = np.zeros(n)
    # ---- g = 0: a minimiser is 0 when H is PSD, else a bottom eigenvector of length -2 s_min / M
    if c_norm == 0.0:
        if s_min >= 0:
            return y, 0.0, False, 0
        y[int(np.argmin(s))] = 2.0 * lam_low / M
        return y, lam_low, True, 0
    # ---- hard case: c (numerically) orthogonal to the bottom eigenspace and the
    # pole-free solution at lam_low too short
    if s_min < 0 and float(np.linalg.norm(c[bottom])) <= 1e-13 * c_norm:
        rest = ~bottom
        y[rest] = -c[rest] / (s[rest] + lam_low)
        r_low = 2.0 * lam_low / M
        ny = float(np.linalg.norm(y))
        if ny <= r_low:
            y[int(np.flatnonzero(bottom)[0])] += math.sqrt(max(r_low * r_low - ny * ny, 0.0))
            return y, lam_low, True, 0
    # ---- easy case: the root of psi(lam) = 1/||y(lam)|| - M/(2 lam) in (lam_low, hi].
    # Work in t = lam - lam_low with d_i = (s_i + lam_low) + t: the bottom entries of
    # s + lam_low are exactly 0, so d is accurate even when t is tiny (near-hard case).
    base = s + lam_low
    if s_min < 0:
        base[bottom] = np.maximum(base[bottom], 0.0)
    t_hi = math.sqrt(M * c_norm / 2.0)
    disc = math.sqrt(s_max * s_max + 2.0 * M * c_norm)
    lower = M * c_norm / (s_max + disc) if s_max > 0 else 0.5 * (disc - s_max)
    t_lo = 0.0  # psi(lam_low+) < 0 here
    t = lower - lam_low if lower > lam_low else 1e-2 * t_hi
    if not 0 < t < t_hi:
        t = 0.5 * t_hi
    it = 0
    c2 = c * c
    tiny = np.finfo(np.float64).tiny
    for it in range(1, maxiter + 1):
        d = base + t
        if not bool((d > 0).all()):
            t = 0.5 * (t_lo + t_hi)
            continue
        y = -c / d
        ny = math.sqrt(float(y @ y))
        lam = lam_low + t
        r = 2.0 * lam / M
        if abs(ny - r) <= tol * r:
            break
        psi = 1.0 / ny - 1.0 / r
        if psi < 0:
            t_lo = t
        else:
            t_hi = t
        dpsi = float(np.sum(c2 / d**3)) / ny**3 + M / (2.0 * lam * lam)
        new = t - psi / dpsi
        if not (t_lo < new < t_hi):
            # geometric steps toward the pole while no left point is known, else bisect
            new = 1e-2 * t if t_lo == 0.0 else 0.5 * (t_lo + t_hi)
        if new == t or (t_hi - t_lo) <= 4 * np.finfo(np.float64).eps * t_hi or new <= tiny:
            t = new if new > tiny else t
            break
        t = new
    d = base + t
    if bool((d > 0).all()):
        y = -c / d
    return y, float(lam_low + t), False, it


def _model_value_diag(s: np.ndarray, c: np.ndarray, y: np.ndarray, M: float) -> float:
    ny = float(np.linalg.norm(y))
    return float(c @ y + 0.5 * np.sum(s * y * y) + M / 6.0 * ny**3)


class EigCubicSubproblem:
    """The cubic subproblem for a fixed ``H = U diag(s) U^T`` and gradient ``g``.

    Build once (``c = U^T g``, ``O(n^2)``), then :meth:`solve` for any ``M`` and
    :meth:`solve_regularized` for any quadratic regularization ``lam``.

    Args:
        eigvals: ``s``, shape ``[n]``.
        eigvecs: ``U``, shape ``[n, n]`` with orthonormal columns.
        g: gradient ``[n]``, same dtype/device as ``eigvecs``.
    """

    def __init__(self, eigvals: Tensor, eigvecs: Tensor, g: Tensor) -> None:
        if eigvecs.dim() != 2 or eigvecs.shape[0] != eigvecs.shape[1] or eigvals.shape != (eigvecs.shape[1],):
            raise ValueError(
                f"Dimension mismatch: eigvals {tuple(eigvals.shape)} and eigvecs {tuple(eigvecs.shape)} "
                "must be [n] and [n, n]."
            )
        if g.shape != (eigvecs.shape[0],):
            raise ValueError(f"Dimension mismatch: g has shape {tuple(g.shape)}, expected [{eigvecs.shape[0]}].")
        self.U = eigvecs
        self.g = g
        self.s = eigvals.detach().double().cpu().numpy()
        self.c = (eigvecs.T @ g).detach().double().cpu().numpy()

    def _to_step(self, y: np.ndarray) -> Tensor:
        return self.U @ torch.as_tensor(y, dtype=self.U.dtype, device=self.U.device)

    def solve(self, M: float) -> CubicStep:
        """Global minimiser of the cubic model with regularization ``M`` (``O(n^2)``)."""
        M = _check_M(M)
        y, lam, hard, it = secular_cubic(self.s, self.c, M)
        h = self._to_step(y)
        ny = float(np.linalg.norm(y))
        # grad m(h) in the eigenbasis: c + s y + (M/2)||y|| y  (zero up to rounding)
        resid = float(np.linalg.norm(self.c + self.s * y + 0.5 * M * ny * y))
        return CubicStep(step=h, radius=ny, shift=lam, model_value=_model_value_diag(self.s, self.c, y, M),
                         hard_case=hard, iterations=it, num_matvecs=0, grad_model_norm=resid)

    def solve_regularized(self, lam: float) -> Tensor:
        """``h = -(H + lam I)^{-1} g``; ``ValueError`` unless ``H + lam I`` is positive definite."""
        d = self.s + float(lam)
        if not bool((d > 0).all()):
            raise ValueError(
                f"H + lam I is not positive definite (lam = {lam:.3e}, min eigenvalue {self.s.min():.3e})."
            )
        return self._to_step(-self.c / d)

    @property
    def min_eigenvalue(self) -> float:
        return float(self.s.min())


def solve_cubic_subproblem_eig(eigvals: Tensor, eigvecs: Tensor, g: Tensor, M: float) -> CubicStep:
    """Solve the cubic subproblem exactly given ``H = eigvecs diag(eigvals) eigvecs^T``.

    Args:
        eigvals: ``[n]``; eigvecs: ``[n, n]`` orthonormal columns; g: ``[n]``; M: ``> 0``.

    Returns:
        A :class:`CubicStep` (hard case included).  Cost: ``O(n^2)``.
    """
    return EigCubicSubproblem(eigvals, eigvecs, g).solve(M)


class LanczosCubicSubproblem:
    """The cubic subproblem for an operator ``H`` and gradient ``g``, matrix-free.

    Args:
        op: a symmetric :class:`curvature.LinearOperator` of shape ``(n, n)``.
        g: gradient ``[n]`` in the operator's dtype/device.
        maxiter: largest Krylov dimension (default ``n``).
        seed: seed of the random start vector used when ``g = 0``.

    The Lanczos basis is kept, so repeated :meth:`solve` calls (larger ``M`` after a
    rejected step) reuse it.  Cost: one product per Lanczos vector, ``O(n j)`` for
    reorthogonalisation, ``O(j^3)`` small eigendecompositions.
    """

    def __init__(self, op: LinearOperator, g: Tensor, *, maxiter: int | None = None, seed: int = 0) -> None:
        if op.shape[0] != op.shape[1] or g.shape != (op.shape[1],):
            raise ValueError(f"Dimension mismatch: operator {op.shape}, gradient {tuple(g.shape)}.")
        self.op = op
        self.g = g
        self.n = op.shape[0]
        self.maxiter = self.n if maxiter is None else max(1, min(int(maxiter), self.n))
        self.g_norm = float(torch.linalg.vector_norm(g))
        if self.g_norm > 0:
            v = g / self.g_norm
        else:
            gen = torch.Generator(device=g.device).manual_seed(seed)
            v = torch.randn(self.n, generator=gen, dtype=g.dtype, device=g.device)
            v = v / torch.linalg.vector_norm(v)
        self.Q: list[Tensor] = [v]
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}
        self.exhausted = False
        self.num_matvecs = 0

    def _extend(self) -> None:
        j = len(self.alpha)
        q = self.Q[j]
        w = self.op.matvec(q)
        self.num_matvecs += 1
        a = float(q @ w)
        w = w - a * q
        if j > 0:
            w = w - self.beta[j - 1] * self.Q[j - 1]
        Qm = torch.stack(self.Q, dim=1)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - Qm @ (Qm.T @ w)
        b = float(torch.linalg.vector_norm(w))
        self.alpha.append(a)
        self.beta.append(b)
        tnorm = max(abs(x) for x in self.alpha + self.beta[:-1] + [1e-300])
        if b <= 1e-12 * tnorm or len(self.alpha) >= self.n:
            self.exhausted = True
        else:
            self.Q.append(w / b)

    def solve(self, M: float, *, rtol: float = 1e-6, atol: float = 0.0) -> CubicStep:
        """Grow the Krylov space until ``||grad m(h)|| <= max(rtol ||g||, atol)`` and return ``h``."""
        M = _check_M(M)
        start = self.num_matvecs
        target = max(rtol * self.g_norm, atol)
        while True:
            if not self.alpha:
                self._extend()
            j = len(self.alpha)
            T = np.diag(self.alpha) + np.diag(self.beta[: j - 1], 1) + np.diag(self.beta[: j - 1], -1)
            s, W = np.linalg.eigh(T)
            cT = np.zeros(j)
            cT[0] = self.g_norm  # q_1 = g/||g|| (or g = 0)
            y, lam, hard, _ = secular_cubic(s, W.T @ cT, M)
            z = W @ y
            resid = 0.0 if self.exhausted else self.beta[j - 1] * abs(float(z[-1]))
            if self.g_norm == 0:
                # g = 0: look for negative curvature; judge the Ritz step on the scale lam ||h||
                target = max(rtol * lam * float(np.linalg.norm(y)), atol) if lam > 0 else -1.0
            if resid <= target or self.exhausted or j >= self.maxiter:
                break
            self._extend()
        Qm = torch.stack(self.Q[:j], dim=1)
        h = Qm @ torch.as_tensor(z, dtype=self.g.dtype, device=self.g.device)
        ny = float(np.linalg.norm(y))
        return CubicStep(step=h, radius=ny, shift=lam, model_value=_model_value_diag(s, W.T @ cT, y, M),
                         hard_case=hard, iterations=j, num_matvecs=self.num_matvecs - start,
                         grad_model_norm=resid)


def solve_cubic_subproblem_lanczos(op: LinearOperator, g: Tensor, M: float, *, rtol: float = 1e-6,
                                   atol: float = 0.0, maxiter: int | None = None, seed: int = 0) -> CubicStep:
    """Solve the cubic subproblem with products of ``op`` only (Lanczos, see module doc).

    Returns:
        A :class:`CubicStep` with ``grad_model_norm <= max(rtol ||g||, atol)`` unless the
        Krylov dimension hit ``maxiter``.  Cost: ``iterations`` products with ``op``.
    """
    return LanczosCubicSubproblem(op, g, maxiter=maxiter, seed=seed).solve(M, rtol=rtol, atol=atol)


def solve_cubic_subproblem(H: Tensor | LinearOperator, g: Tensor, M: float, *, method: str = "auto",
                           rtol: float = 1e-6, maxiter: int | None = None, seed: int = 0) -> CubicStep:
    """Solve ``min_h g^T h + 1/2 h^T H h + (M/6)||h||^3``.

    Args:
        H: a symmetric ``[n, n]`` tensor or a symmetric LinearOperator.
        g: ``[n]``.
        M: ``> 0``.
        method: ``"eig"`` (dense eigendecomposition, exact, ``O(n^3)``), ``"lanczos"``
            (matrix-free) or ``"auto"`` (``"eig"`` for tensors and DenseOperators).
        rtol, maxiter, seed: for ``"lanczos"``.
    """
    if method not in ("auto", "eig", "lanczos"):
        raise ValueError(f"Unknown subproblem method {method!r}; use 'auto', 'eig' or 'lanczos'.")
    if method == "auto":
        method = "eig" if isinstance(H, (Tensor, DenseOperator)) else "lanczos"
    if method == "eig":
        Hd = H if isinstance(H, Tensor) else (H.matrix if isinstance(H, DenseOperator) else H.to_dense())
        s, U = torch.linalg.eigh(0.5 * (Hd + Hd.T))
        return solve_cubic_subproblem_eig(s, U, g, M)
    op = H if isinstance(H, LinearOperator) else DenseOperator(H, is_symmetric=True)
    return solve_cubic_subproblem_lanczos(op, g, M, rtol=rtol, maxiter=maxiter, seed=seed)


def cubic_model(H: Tensor | LinearOperator, g: Tensor, M: float, h: Tensor) -> float:
    """``g^T h + 1/2 h^T H h + (M/6)||h||^3`` (one product with ``H``)."""
    Hh = H @ h
    return float(g @ h + 0.5 * (h @ Hh) + M / 6.0 * torch.linalg.vector_norm(h) ** 3)
