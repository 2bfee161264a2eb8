"""ScaledGD (Tong, Ma & Chi 2021) and ScaledGD(lambda) (Xu, Shen, Chi & Ma 2023).

For a low-rank factorization ``X = L R^T`` (or ``X = Y Y^T`` in the PSD case) the
gradient of each factor is preconditioned by the inverse Gram matrix of the other::

    L+ = L - eta * grad_L f (R^T R + lam I)^{-1}
    R+ = R - eta * grad_R f (L^T L + lam I)^{-1}        (simultaneous; both use the old L, R)
    Y+ = Y - eta * grad_Y f (Y^T Y + lam I)^{-1}        (PSD, ScaledGD(lambda) with lam > 0)

which makes the iteration invariant to the balance of the factors and removes the
dependence of the rate on the condition number kappa.  The extra cost is an ``r x r``
Cholesky factorization and two triangular solves with ``n x r`` right-hand sides per
factor: ``O(n r^2 + r^3)``, small next to the ``O(m n^2)`` sensing operator.

Two faces, one core (:func:`scaled_gd_preconditioner`, a ``curvature.LinearOperator``):

* :func:`scaled_gd` / :func:`factored_gd`: functional solvers on a
  :mod:`solvers.matrix_problems` problem, returning a :class:`ScaledGDResult` with the
  per-iteration relative error, loss and time;
* :class:`ScaledGD`: a ``torch.optim.Optimizer`` over factor tensors, for losses you
  write yourself and differentiate with autograd.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvature import LinearOperator

from .matrix_problems import LowRankProblem, MatrixSensingProblem, small_random_init, spectral_init

__all__ = [
    "FactorPreconditioner",
    "scaled_gd_preconditioner",
    "ScaledGDResult",
    "scaled_gd",
    "factored_gd",
    "scaled_gd_lockstep",
    "ScaledGD",
]


class FactorPreconditioner(LinearOperator):
    """``G -> G (F^T F + lam I)^{-1}`` on a flattened ``[num_rows, r]`` factor gradient.

    The operator is ``I_{num_rows} (x) (F^T F + lam I)^{-1}`` on the row-major flattening
    (``G.reshape(-1)``), symmetric positive definite; size ``num_rows * r``.  It is
    applied exactly through a Cholesky factor of the ``r x r`` matrix (computed once);
    ``solve`` multiplies by ``F^T F + lam I`` (exact inverse).

    Args:
        other_factor: ``F``, shape ``[n_other, r]`` (``R`` when preconditioning ``L``'s
            gradient, ``L`` for ``R``'s, ``Y`` itself in the PSD case).
        damping: ``lam >= 0``.
        num_rows: rows of the factor being preconditioned (default ``n_other``).

    Raises:
        ValueError: negative/non-finite damping, or a singular ``F^T F + lam I``.
    """

    def __init__(self, other_factor: Tensor, damping: float = 0.0, num_rows: int | None = None) -> None:
        if not isinstance(other_factor, Tensor) or other_factor.dim() != 2:
            raise ValueError("The factor must be a 2-d tensor [n, r].")
        damping = float(damping)
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping (lambda) must be finite and >= 0, got {damping}.")
        F = other_factor.detach()
        r = F.shape[1]
        n = F.shape[0] if num_rows is None else int(num_rows)
        super().__init__((n * r, n * r), dtype=F.dtype, device=F.device, is_symmetric=True,
                         param_shapes=[torch.Size((n, r))])
        self.rows, self.rank, self.damping = n, r, damping
        self.gram = F.T @ F + damping * torch.eye(r, dtype=F.dtype, device=F.device)
        chol, info = torch.linalg.cholesky_ex(self.gram)
        if int(info) != 0 or not bool(torch.isfinite(chol).all()):
            raise ValueError("F^T F + lambda I is singular or not finite (rank-deficient factor); "
                             "use damping > 0 (ScaledGD(lambda)).")
        self._chol = chol

    def apply(self, G: Tensor) -> Tensor:
        """``G (F^T F + lam I)^{-1}`` for ``G`` of shape ``[num_rows, r]`` (no flattening)."""
        if tuple(G.shape) != (self.rows, self.rank):
            raise ValueError(f"Dimension mismatch: gradient of shape {tuple(G.shape)}, expected "
                             f"{(self.rows, self.rank)}.")
        return torch.cholesky_solve(G.T, self._chol).T

    def _matmat(self, X: Tensor) -> Tensor:
        n, r, k = self.rows, self.rank, X.shape[1]
        Y = X.reshape(n, r, k).permute(1, 0, 2).reshape(r, n * k)
        Z = torch.cholesky_solve(Y, self._chol)
        return Z.reshape(r, n, k).permute(1, 0, 2).reshape(n * r, k)

    def _solve_exact(self, B: Tensor) -> Tensor:
        n, r, k = self.rows, self.rank, B.shape[1]
        Y = B.reshape(n, r, k).permute(1, 0, 2).reshape(r, n * k)
        return (self.gram @ Y).reshape(r, n, k).permute(1, 0, 2).reshape(n * r, k)


def scaled_gd_preconditioner(other_factor: Tensor, damping: float = 0.0,
                             num_rows: int | None = None) -> FactorPreconditioner:
    """ScaledGD's preconditioner ``G -> G (F^T F + damping I)^{-1}`` as a LinearOperator.

    ``scaled_gd_preconditioner(R, lam, num_rows=L.shape[0]) @ L.grad.reshape(-1)`` is the
    ScaledGD direction for ``L`` (see :class:`FactorPreconditioner`).
    """
    return FactorPreconditioner(other_factor, damping, num_rows)


# ---------------------------------------------------------------------------------------------
@dataclass
class ScaledGDResult:
    """Result of :func:`scaled_gd` / :func:`factored_gd`.

    Attributes:
        factors: ``(L, R)``, or ``(Y,)`` in the PSD case (the last finite iterate).
        X: the estimate ``L R^T`` (``Y Y^T``).
        nit: iterations performed.
        converged: the stopping metric fell below ``tol``.
        relative_errors: per iteration (index 0 = initialization) ``||X - X*||/||X*||``,
            or the relative residual ``sqrt(f(X)/f(0))`` when the truth is unknown.
        losses: ``f(X)`` per iteration.
        times: cumulative seconds spent in updates (metric evaluation excluded).
        method, message: what ran and why it stopped.
    """

    factors: tuple
    X: Tensor
    nit: int
    converged: bool
    relative_errors: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    times: list = field(default_factory=list)
    method: str = "scaled_gd"
    message: str = ""

    @property
    def L(self) -> Tensor:
        return self.factors[0]

    @property
    def R(self) -> Tensor:
        return self.factors[-1]

    def iterations_to(self, tol: float) -> int | None:
        """First iteration whose metric is ``<= tol`` (``None`` if never)."""
        for i, e in enumerate(self.relative_errors):
            if e <= tol:
                return i
        return None


class _Run:
    """One ScaledGD / GD trajectory as a state machine: ``step(Z)`` applies one update given
    ``Z = grad f(X)`` at the current iterate, so :func:`scaled_gd` (one problem) and
    :func:`scaled_gd_lockstep` (many problems sharing one sensing design, gradients in one
    batched product) run the same update and record the same history."""

    def __init__(self, problem: LowRankProblem, rank: int, *, eta: float = 0.5, damping: float = 0.0,
                 maxiter: int = 1000, tol: float = 1e-10, init="spectral", init_scale: float = 1e-3,
                 psd: bool | None = None, preconditioned: bool = True, sigma_max: float | None = None,
                 seed: int = 0, callback: Callable[[int, tuple], None] | None = None) -> None:
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a positive finite step size, got {eta}.")
        if not (math.isfinite(float(damping)) and damping >= 0):
            raise ValueError(f"damping (lambda) must be >= 0, got {damping}.")
        if int(maxiter) < 0:
            raise ValueError(f"maxiter must be >= 0, got {maxiter}.")
        psd = problem.symmetric if psd is None else bool(psd)
        n1, n2 = problem.shape
        if psd and n1 != n2:
            raise ValueError(f"psd=True needs a square problem, got {problem.shape}.")
        dt, dev = problem.dtype, problem.device
        if isinstance(init, str):
            if init == "spectral":
                factors = (spectral_init(problem, rank, psd=True),) if psd else spectral_init(problem, rank)
            elif init == "random":
                if not psd:
                    raise ValueError("init='random' is the PSD ScaledGD(lambda) initialization; use psd=True.")
                factors = (small_random_init(n1, rank, scale=init_scale, seed=seed, dtype=dt, device=dev),)
            else:
                raise ValueError(f"Unknown init {init!r}; use 'spectral', 'random' or a tuple of tensors.")
        else:
            factors = tuple(t.detach().clone().to(dtype=dt, device=dev) for t in init)
        factors = tuple(factors)
        _check_factors(factors, (n1,) if psd else (n1, n2), rank)
        step = eta
        if not preconditioned:
            if sigma_max is None:
                if problem.X_star is not None:
                    sigma_max = float(torch.linalg.matrix_norm(problem.X_star, ord=2))
                else:
                    sigma_max = float(torch.linalg.matrix_norm(problem.spectral_matrix(), ord=2))
            step = eta / sigma_max
        self.problem, self.psd, self.step_size, self.damping = problem, psd, step, float(damping)
        self.preconditioned, self.maxiter, self.tol, self.callback = preconditioned, int(maxiter), tol, callback
        self.factors = factors
        self.X = self._to_X(factors)
        # with a known truth the stopping metric needs no pass over a sensing design; the loss
        # of each iterate is then filled in from the residual of the next gradient (``loss=``)
        self._lazy_loss = problem.X_star is not None
        self.f0 = 0.0 if self._lazy_loss else problem.loss(torch.zeros(n1, n2, dtype=dt, device=dev))
        err, loss = self._metric(self.X)
        method = ("scaled_gd" if damping == 0 else "scaled_gd_lambda") if preconditioned else "gd"
        self.result = ScaledGDResult(factors, self.X, 0, err <= tol, [err], [loss], [0.0], method=method)
        self.elapsed = 0.0

    def _to_X(self, fs):
        return fs[0] @ fs[0].T if self.psd else fs[0] @ fs[1].T

    def _metric(self, X: Tensor) -> tuple[float, float]:
        if self._lazy_loss:
            return self.problem.relative_error(X), math.nan
        loss = self.problem.loss(X)
        return (math.sqrt(max(loss, 0.0) / self.f0) if self.f0 > 0 else 0.0), loss

    @property
    def active(self) -> bool:
        """More updates to do (not converged, not stopped, below ``maxiter``)."""
        res = self.result
        return not res.converged and not res.message and res.nit < self.maxiter

    def step(self, Z: Tensor, loss: float | None = None) -> None:
        """One update from ``Z = grad f(self.X)``; ``loss = f(self.X)`` if already known."""
        res = self.result
        if loss is not None and self._lazy_loss:
            res.losses[-1] = float(loss)
        t0 = time.perf_counter()
        if self.psd:
            (Y,) = self.factors
            G = 0.5 * (Z + Z.T) @ Y
            if self.preconditioned:
                G = scaled_gd_preconditioner(Y, self.damping).apply(G)
            new = (Y - self.step_size * G,)
        else:
            L, R = self.factors
            GL, GR = Z @ R, Z.T @ L
            if self.preconditioned:
                GL = scaled_gd_preconditioner(R, self.damping, num_rows=L.shape[0]).apply(GL)
                GR = scaled_gd_preconditioner(L, self.damping, num_rows=R.shape[0]).apply(GR)
            new = (L - self.step_size * GL, R - self.step_size * GR)
        self.elapsed += time.perf_counter() - t0
        if not all(bool(torch.isfinite(t).all()) for t in new):
            res.message = f"diverged at iteration {res.nit + 1} (non-finite iterate); returning the last finite one"
            return
        self.factors = new
        self.X = self._to_X(new)
        err, f = self._metric(self.X)
        res.relative_errors.append(err)
        res.losses.append(f)
        res.times.append(self.elapsed)
        res.nit += 1
        res.converged = err <= self.tol
        if self.callback is not None:
            self.callback(res.nit, new)

    def finish(self) -> ScaledGDResult:
        res = self.result
        if self._lazy_loss and math.isnan(res.losses[-1]):
            res.losses[-1] = self.problem.loss(self.X)
        res.factors, res.X = self.factors, self.X
        if not res.message:
            res.message = (f"relative error {res.relative_errors[-1]:.3e} <= tol {self.tol:g}" if res.converged
                           else f"maxiter {self.maxiter} reached (relative error {res.relative_errors[-1]:.3e})")
        return res


def scaled_gd(problem: LowRankProblem, rank: int, *, eta: float = 0.5, damping: float = 0.0,
              maxiter: int = 1000, tol: float = 1e-10, init="spectral", init_scale: float = 1e-3,
              psd: bool | None = None, preconditioned: bool = True, sigma_max: float | None = None,
              seed: int = 0, callback: Callable[[int, tuple], None] | None = None) -> ScaledGDResult:
    """ScaledGD / ScaledGD(lambda) (or plain GD with ``preconditioned=False``) on a low-rank problem.

    Args:
        problem: a :class:`~solvers.matrix_problems.LowRankProblem` (sensing, completion).
        rank: the factor width ``r`` (``r' > r`` = overparameterization).
        eta: step size (paper: 0.5 for ScaledGD; GD uses ``eta / sigma_max``).
        damping: ``lambda >= 0`` (``> 0`` for ScaledGD(lambda) from a small random init).
        maxiter, tol: stop after ``maxiter`` updates or when the relative error (or the
            relative residual without truth) is ``<= tol``.
        init: ``"spectral"`` (top-r SVD, Tong et al.), ``"random"`` (``init_scale * G``,
            ``G_ij ~ N(0, 1/n)``, Xu et al.; PSD only) or a tuple of factor tensors.
        psd: optimize ``Y Y^T`` (default: ``problem.symmetric``); the loss is then
            ``1/2 f(Y Y^T)`` (``1/4 ||A(Y Y^T) - y||^2`` for sensing), gradient ``sym(Z) Y``.
        preconditioned: ``False`` gives the GD baseline with step ``eta / sigma_max``.
        sigma_max: GD's scale (default: ``sigma_max(X*)`` if known, else the top
            singular value of the spectral matrix).
        seed: for ``init="random"``.
        callback: ``callback(iteration, factors)`` after every update.

    Returns:
        :class:`ScaledGDResult`.  The solver stops early (``converged=False``, message
        "diverged") if an iterate becomes non-finite; the last finite one is returned.

    Cost per iteration: one ``loss_and_gradient`` (sensing: two passes over the
    ``m x n1 n2`` design, which also give the loss; completion: ``O(n1 n2 r)``), plus
    ``O((n1 + n2) r^2 + r^3)`` for the preconditioners.  Without a truth ``X_star`` the
    relative-residual metric costs one more pass per iteration.  To run several problems
    that share one sensing design, use :func:`scaled_gd_lockstep`.
    """
    run = _Run(problem, rank, eta=eta, damping=damping, maxiter=maxiter, tol=tol, init=init,
               init_scale=init_scale, psd=psd, preconditioned=preconditioned, sigma_max=sigma_max, seed=seed,
               callback=callback)
    while run.active:
        loss, Z = problem.loss_and_gradient(run.X)
        run.step(Z, loss)
    return run.finish()


def scaled_gd_lockstep(problems: Sequence[MatrixSensingProblem], rank: int,
                       runs: Sequence[dict]) -> list[ScaledGDResult]:
    """Several :func:`scaled_gd` / :func:`factored_gd` runs on sensing problems that share one
    design, advanced together so that each iteration reads the design twice for all of them.

    ``A(X)`` and ``A*(r)`` of the runs still active are computed as one ``[m, n1 n2] @
    [n1 n2, k]`` product each (memory-bound: about the cost of a single run's product),
    instead of ``k`` separate passes.  The iterates, losses and errors are those of the
    separate runs (the same floating-point operations up to the order of summation in
    the matrix products).

    Args:
        problems: :class:`~solvers.matrix_problems.MatrixSensingProblem` s with the same
            design (``p.same_design(problems[0])``; e.g. from
            :func:`~solvers.matrix_problems.matrix_sensing_family`).
        rank: factor width of every run.
        runs: one dict per run: ``"problem"`` (index into ``problems``) plus the keyword
            arguments of :func:`scaled_gd` (``preconditioned=False`` for GD; its ``eta`` is
            then divided by ``sigma_max``, as in :func:`factored_gd`).

    Returns:
        one :class:`ScaledGDResult` per entry of ``runs``, in order.

    Raises:
        ValueError: problems with different designs, or a run naming no valid problem.
    """
    problems = list(problems)
    if not problems:
        raise ValueError("scaled_gd_lockstep needs at least one problem.")
    for p in problems:
        if not isinstance(p, MatrixSensingProblem) or not p.same_design(problems[0]):
            raise ValueError("scaled_gd_lockstep needs sensing problems that share one design "
                             "(build them with matrix_sensing_family); run the others with scaled_gd.")
    states = []
    for spec in runs:
        spec = dict(spec)
        idx = spec.pop("problem", None)
        if not isinstance(idx, int) or not 0 <= idx < len(problems):
            raise ValueError(f"each run needs 'problem': an index in [0, {len(problems)}), got {idx!r}.")
        states.append((idx, _Run(problems[idx], rank, **spec)))
    design = problems[0]
    while True:
        live = [(i, r) for i, r in states if r.active]
        if not live:
            break
        X = torch.stack([r.X for _, r in live])
        Y = torch.stack([problems[i].y for i, _ in live])
        residual = design.apply(X) - Y  # [k, m]
        Z = design.adjoint(residual)  # [k, n1, n2]
        losses = 0.5 * (residual * residual).sum(dim=1)
        for k, (_, r) in enumerate(live):
            r.step(Z[k], float(losses[k]))
    return [r.finish() for _, r in states]


def factored_gd(problem: LowRankProblem, rank: int, *, eta: float = 0.5, **kwargs) -> ScaledGDResult:
    """Plain factored GD with the paper's step ``eta / sigma_max`` (see :func:`scaled_gd`)."""
    return scaled_gd(problem, rank, eta=eta, preconditioned=False, **kwargs)


def _check_factors(factors: Sequence[Tensor], rows: Sequence[int], rank: int) -> None:
    if len(factors) != len(rows):
        raise ValueError(f"Expected {len(rows)} factor(s), got {len(factors)}.")
    for i, (f, n) in enumerate(zip(factors, rows)):
        if f.dim() != 2 or f.shape[0] != n or f.shape[1] != rank:
            raise ValueError(f"Factor {i} has shape {tuple(f.shape)}; expected ({n}, {rank}) "
                             "(mismatched factor shapes).")


# ---------------------------------------------------------------------------------------------
class ScaledGD(Optimizer):
    """ScaledGD / ScaledGD(lambda) as a ``torch.optim.Optimizer`` over factor tensors.

    Each param group holds either two factors ``[L, R]`` (``X = L R^T``, shapes
    ``[n1, r]`` and ``[n2, r]``) or one factor ``[Y]`` (``X = Y Y^T``).  A step computes
    both directions from the *old* factors, then updates::

        L <- L - lr * L.grad (R^T R + damping I)^{-1}
        R <- R - lr * R.grad (L^T L + damping I)^{-1}
        Y <- Y - lr * Y.grad (Y^T Y + damping I)^{-1}

    The preconditioners are :func:`scaled_gd_preconditioner` operators (exact Cholesky
    solves, ``O(n r^2 + r^3)`` per factor); :meth:`preconditioners` returns them.

    Args:
        params: ``[L, R]``, ``[Y]`` or a list of such groups (dicts with ``"params"``).
        lr: step size ``eta >= 0`` (paper: 0.5).
        damping: ``lambda >= 0``; required ``> 0`` when a factor can be rank-deficient
            (small random initialization, overparameterization).

    Raises:
        ValueError: bad hyperparameters or factor shapes (at construction), a singular
            Gram matrix with ``damping=0`` (at the step).
        FloatingPointError: a non-finite gradient or direction (nothing is written).
    """

    def __init__(self, params, lr: float = 0.5, damping: float = 0.0) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0).")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"Invalid damping (lambda): {damping} (must be >= 0).")
        super().__init__(params, dict(lr=lr, damping=damping))
        for group in self.param_groups:
            ps = group["params"]
            if len(ps) not in (1, 2):
                raise ValueError(f"A ScaledGD param group holds [L, R] or [Y]; got {len(ps)} tensors.")
            if any(p.dim() != 2 for p in ps):
                raise ValueError("ScaledGD factors must be 2-d tensors [n, r].")
            if len(ps) == 2 and ps[0].shape[1] != ps[1].shape[1]:
                raise ValueError(f"Mismatched factor shapes: L is {tuple(ps[0].shape)}, R is {tuple(ps[1].shape)} "
                                 "(they need the same number of columns r).")
            if group["damping"] < 0 or group["lr"] < 0:
                raise ValueError("lr and damping must be >= 0 in every group.")

    def preconditioners(self) -> list[list[FactorPreconditioner]]:
        """The current preconditioner of every factor (per group)."""
        out = []
        for group in self.param_groups:
            ps, lam = group["params"], group["damping"]
            if len(ps) == 2:
                L, R = ps
                out.append([scaled_gd_preconditioner(R, lam, num_rows=L.shape[0]),
                            scaled_gd_preconditioner(L, lam, num_rows=R.shape[0])])
            else:
                out.append([scaled_gd_preconditioner(ps[0], lam)])
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """One simultaneous preconditioned step; returns the closure's loss (if any)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = []
        for group, precs in zip(self.param_groups, self.preconditioners()):
            for p, P in zip(group["params"], precs):
                if p.grad is None:
                    continue
                if not bool(torch.isfinite(p.grad).all()):
                    raise FloatingPointError("ScaledGD.step: a factor gradient has NaN/inf entries; "
                                             "no parameter was changed.")
                d = P.apply(p.grad)
                if not bool(torch.isfinite(d).all()):
                    raise FloatingPointError("ScaledGD.step: the preconditioned direction is not finite "
                                             "(ill-conditioned factor? increase damping); nothing changed.")
                updates.append((p, d, group["lr"]))
        for p, d, lr in updates:
            p.add_(d, alpha=-lr)
        return loss
