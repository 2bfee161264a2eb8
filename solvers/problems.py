"""Test problems with closed-form Hessians and the approximations the GNS paper uses.

Every problem has ``f(x)`` (torch, differentiable), ``x0``, ``f_star`` (``None`` when
unknown), ``hessian(x)`` in closed form (dense ``[n, n]``), and ``curvature(kind)``
returning a factory ``x -> LinearOperator`` for ``solvers.minimize(curvature=...)``.
Closed forms make dense curvature cheap (``O(N n^2)`` for logistic regression
instead of ``n`` Hessian-vector products); the tests check every one against double
backward.

* :class:`LogisticRegression` (``make_logistic_regression``): mean logistic loss
  plus ``l2/2 ||x||^2``; ``"empirical_fisher"`` is the mean outer product of the
  per-example gradients (the paper's Fisher-type approximation).
* :class:`LogSumExp` (``make_logsumexp``): ``mu log sum exp((a_i^T x - b_i)/mu)``;
  ``"weighted_gauss_newton"`` drops the rank-one term ``-(1/mu) g g^T``.
* :class:`PowerResidual`: ``(1/p)||u(x)||^p`` for a residual ``u`` with Jacobian
  ``J``; ``"gauss_newton"`` drops ``||u||^{p-2} sum_i u_i grad^2 u_i``; for linear
  ``u = Ax - b`` (``make_pnorm_equations``) ``"fisher"`` keeps only the rank-one term
  ``(p-2)/||u||^p grad f grad f^T`` (a :class:`~solvers.gns.RankOneOperator`).
  ``make_rosenbrock_residual`` and ``make_chebyshev_rosenbrock`` are the notebook's
  nonlinear residuals.
* :class:`Rosenbrock`: ``(a - x1)^2 + b (x2 - x1^2)^2``.

Data follow the GNS notebook settings (uniform ``[-1, 1]`` entries from a seeded
``numpy.random.RandomState``).  :func:`make_logsumexp_authors` rebuilds the notebook's
LogSumExp instance call by call (its transpose and its metric);
``make_pnorm_equations(100, 200, seed=3124)`` and ``make_chebyshev_rosenbrock(1000,
seed=3124)`` are already the notebook's draws (``uniform(-1, 1)`` computes ``-1 + 2u``,
bit-equal to the notebook's ``rand() * 2 - 1``; ``uniform(0, 1)`` equals ``rand()``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from curvature import DenseOperator, LinearOperator

from .gns import RankOneOperator

__all__ = [
    "Problem",
    "LogisticRegression",
    "LogSumExp",
    "PowerResidual",
    "Rosenbrock",
    "make_logistic_regression",
    "make_logsumexp",
    "make_logsumexp_authors",
    "make_pnorm_equations",
    "make_rosenbrock_residual",
    "make_chebyshev_rosenbrock",
]


class Problem:
    """Base: subclasses define ``f``, ``hessian`` and the names in ``curvature_kinds``."""

    curvature_kinds: tuple[str, ...] = ("hessian",)
    x0: Tensor
    f_star: float | None = None

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.f(x)

    def hessian(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def gradient(self, x: Tensor) -> Tensor:
        """``grad f(x)`` by autograd (flat)."""
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.f(xr), xr)
        return g

    def curvature(self, kind: str = "hessian") -> Callable[[Tensor], LinearOperator]:
        """A factory ``x -> LinearOperator`` of the named curvature (see ``curvature_kinds``)."""
        if kind not in self.curvature_kinds:
            raise ValueError(f"Unknown curvature {kind!r} for {type(self).__name__}; choose from {self.curvature_kinds}.")
        method = getattr(self, kind)

        def factory(x: Tensor) -> LinearOperator:
            out = method(x)
            return out if isinstance(out, LinearOperator) else DenseOperator(out, is_symmetric=True)

        return factory


class LogisticRegression(Problem):
    """``f(x) = mean_i log(1 + exp(-y_i a_i^T x)) + (l2/2)||x||^2``, labels ``y_i in {-1, +1}``.

    Args:
        A: ``[N, n]`` features; y: ``[N]`` labels in ``{-1, +1}``; l2: ridge weight.
    """

    curvature_kinds = ("hessian", "empirical_fisher")

    def __init__(self, A: Tensor, y: Tensor, l2: float = 0.0) -> None:
        self.A, self.y, self.l2 = A, y.to(A.dtype), float(l2)
        self.n = A.shape[1]
        self.x0 = torch.zeros(self.n, dtype=A.dtype, device=A.device)

    def f(self, x: Tensor) -> Tensor:
        z = self.y * (self.A @ x)
        return torch.nn.functional.softplus(-z).mean() + 0.5 * self.l2 * (x @ x)

    def hessian(self, x: Tensor) -> Tensor:
        """``A^T diag(s (1 - s)) A / N + l2 I`` with ``s = sigmoid(a_i^T x)``; ``O(N n^2)``."""
        s = torch.sigmoid(self.A @ x)
        w = s * (1 - s) / self.A.shape[0]
        H = (self.A.T * w) @ self.A
        H.diagonal().add_(self.l2)
        return H

    def empirical_fisher(self, x: Tensor) -> Tensor:
        """``(1/N) sum_i grad l_i grad l_i^T + l2 I`` with the data labels: for the logistic
        loss ``grad l_i = -y_i sigmoid(-y_i a_i^T x) a_i``, so ``A^T diag(sigmoid(-z)^2) A / N``."""
        r = torch.sigmoid(-self.y * (self.A @ x))
        H = (self.A.T * (r * r / self.A.shape[0])) @ self.A
        H.diagonal().add_(self.l2)
        return H


def make_logistic_regression(n_samples: int, dim: int, *, l2: float = 0.0, cond: float = 1.0, seed: int = 0,
                             dtype: torch.dtype = torch.float64, device="cpu") -> LogisticRegression:
    """Synthetic logistic regression: ``a_i ~ N(0, diag(c)^2)`` with column scales ``c``
    log-spaced from 1 to ``1/sqrt(cond)`` (feature covariance condition number
    ``cond``), labels drawn from the model with ``w*_j ~ N(0, 1/(n c_j^2))`` (noisy
    labels, so with ``n_samples >> dim`` the data are not separable and the minimiser
    exists without ``l2``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scales = torch.logspace(0, -0.5 * np.log10(cond), dim, dtype=torch.float64)
    A = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64) * scales
    w = torch.randn(dim, generator=gen, dtype=torch.float64) / dim**0.5 / scales
    p = torch.sigmoid(A @ w)
    y = torch.where(torch.rand(n_samples, generator=gen, dtype=torch.float64) < p, 1.0, -1.0)
    return LogisticRegression(A.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device), l2)


class LogSumExp(Problem):
    """``f(x) = mu log sum_i exp((a_i^T x - b_i)/mu)`` with softmax weights ``pi``.

    Hessian ``(1/mu)(A^T diag(pi) A - (A^T pi)(A^T pi)^T)``; the weighted Gauss-Newton
    approximation keeps ``(1/mu) A^T diag(pi) A`` (error ``(1/mu) g g^T``).
    """

    curvature_kinds = ("hessian", "weighted_gauss_newton")

    def __init__(self, A: Tensor, b: Tensor, mu: float = 1.0, x0: Tensor | None = None,
                 f_star: float | None = None, metric_matrix: Tensor | None = None) -> None:
        self.A, self.b, self.mu = A, b, float(mu)
        self.n = A.shape[1]
        self.x0 = torch.ones(self.n, dtype=A.dtype, device=A.device) if x0 is None else x0
        self.f_star = f_star
        self._metric = metric_matrix

    def f(self, x: Tensor) -> Tensor:
        return self.mu * torch.logsumexp((self.A @ x - self.b) / self.mu, dim=0)

    def _pi(self, x: Tensor) -> Tensor:
        return torch.softmax((self.A @ x - self.b) / self.mu, dim=0)

    def weighted_gauss_newton(self, x: Tensor) -> Tensor:
        pi = self._pi(x)
        return (self.A.T * pi) @ self.A / self.mu

    def hessian(self, x: Tensor) -> Tensor:
        pi = self._pi(x)
        g = self.A.T @ pi
        return ((self.A.T * pi) @ self.A - torch.outer(g, g)) / self.mu

    def metric(self, ridge: float = 1e-8) -> Tensor:
        """``B = A^T A + ridge I``; after the shift that puts the minimiser at 0,
        ``A^T pi = 0`` makes a square ``A`` singular, hence the ridge.  A problem built with
        ``metric_matrix`` (:func:`make_logsumexp_authors`) returns that matrix instead."""
        if self._metric is not None:
            return self._metric
        B = self.A.T @ self.A
        B.diagonal().add_(ridge)
        return B


def make_logsumexp(n_rows: int = 1000, dim: int = 1000, *, mu: float = 1.0, seed: int = 3124,
                   dtype: torch.dtype = torch.float64, device="cpu") -> LogSumExp:
    """The notebook's LogSumExp: ``A, b ~ U[-1, 1]``, rows shifted so the minimiser is 0, ``x0 = 1``."""
    rs = np.random.RandomState(seed)
    A = rs.uniform(-1, 1, size=(n_rows, dim))
    b = rs.uniform(-1, 1, size=n_rows)
    z = -b / mu
    pi = np.exp(z - z.max())
    pi /= pi.sum()
    A = A - (A.T @ pi)[None, :]  # now grad f(0) = A^T pi - (A^T pi) sum(pi) = 0
    f_star = float(mu * (z.max() + np.log(np.exp(z - z.max()).sum())))
    At = torch.as_tensor(A, dtype=dtype, device=device)
    bt = torch.as_tensor(b, dtype=dtype, device=device)
    return LogSumExp(At, bt, mu, f_star=f_star)


def make_logsumexp_authors(dim: int = 1000, n_rows: int = 1000, *, mu: float = 1.0, seed: int = 3124,
                           dtype: torch.dtype = torch.float64, device="cpu") -> LogSumExp:
    """The LogSumExp instance of the official notebook (epfml/grad-norm-smooth, ``examples.ipynb``), call by call.

    ``np.random.seed(seed); A = rand(n, m) * 2 - 1; b = rand(m) * 2 - 1`` with ``n = dim``
    variables and ``m = n_rows`` linear pieces; the oracle is built on ``A^T`` (rows
    ``a_i`` are the *columns* of the drawn matrix) and shifted by ``g = grad f(0)`` so the
    minimiser is 0 (``create_log_sum_exp_zero_oracle``); ``f* = f(0)``; ``x0 = 1``.  The
    metric is the notebook's ``B = A A^T`` of the *unshifted* draw, with no ridge (it is
    SPD for ``m >= n`` with probability one).

    Differences from :func:`make_logsumexp` (our default): that one uses the draw itself
    as the design (no transpose) and ``B = A_shifted^T A_shifted + 1e-8 I``.
    """
    rs = np.random.RandomState(seed)  # the legacy global generator that np.random.seed seeds
    A = rs.rand(dim, n_rows) * 2 - 1
    b = rs.rand(n_rows) * 2 - 1
    design = A.T.copy()
    z = -b / mu
    pi = np.exp(z - z.max())
    pi /= pi.sum()
    design = design - (design.T @ pi)[None, :]
    f_star = float(mu * (z.max() + np.log(np.exp(z - z.max()).sum())))
    to = dict(dtype=dtype, device=device)
    return LogSumExp(torch.as_tensor(design, **to), torch.as_tensor(b, **to), mu, f_star=f_star,
                     metric_matrix=torch.as_tensor(A @ A.T, **to))


class PowerResidual(Problem):
    """``f(x) = (1/p) ||u(x)||^p`` for a residual ``u: R^n -> R^k`` (``p >= 2``).

    Args:
        residual: ``x -> u`` (torch).
        jacobian: ``x -> J`` ``[k, n]`` in closed form.
        p: the power.
        x0: starting point; f_star: optimal value if known.
        residual_hessian_sum: optional ``(x, u) -> sum_i u_i grad^2 u_i`` ``[n, n]``
            (closed form; default: zero, i.e. ``u`` linear).
    """

    curvature_kinds = ("hessian", "gauss_newton", "fisher")

    def __init__(self, residual: Callable[[Tensor], Tensor], jacobian: Callable[[Tensor], Tensor], p: float,
                 x0: Tensor, f_star: float | None = None,
                 residual_hessian_sum: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if p < 2:
            raise ValueError(f"p must be >= 2, got {p}.")
        self.residual, self.jacobian, self.p = residual, jacobian, float(p)
        self.x0, self.f_star, self.n = x0, f_star, x0.numel()
        self._rhs = residual_hessian_sum

    def f(self, x: Tensor) -> Tensor:
        u = self.residual(x)
        return torch.linalg.vector_norm(u) ** self.p / self.p

    def gauss_newton(self, x: Tensor) -> Tensor:
        """``||u||^{p-2} J^T J + (p-2) ||u||^{p-4} (J^T u)(J^T u)^T`` (the notebook's inexact Hessian)."""
        u, J = self.residual(x), self.jacobian(x)
        nu = torch.linalg.vector_norm(u)
        Jtu = J.T @ u
        H = nu ** (self.p - 2) * (J.T @ J)
        if self.p != 2:
            H = H + (self.p - 2) * nu ** (self.p - 4) * torch.outer(Jtu, Jtu)
        return H

    def hessian(self, x: Tensor) -> Tensor:
        H = self.gauss_newton(x)
        if self._rhs is not None:
            u = self.residual(x)
            H = H + torch.linalg.vector_norm(u) ** (self.p - 2) * self._rhs(x, u)
        return H

    def fisher(self, x: Tensor) -> RankOneOperator:
        """The rank-one "Fisher term" ``(p-2)/||u||^p grad f grad f^T``."""
        u, J = self.residual(x), self.jacobian(x)
        nu = torch.linalg.vector_norm(u)
        g = nu ** (self.p - 2) * (J.T @ u)
        alpha = (self.p - 2) / float(nu) ** self.p if float(nu) > 0 else 0.0
        return RankOneOperator(g, alpha)


def make_pnorm_equations(n_rows: int = 100, dim: int = 200, *, p: float = 4.0, seed: int = 0,
                         dtype: torch.dtype = torch.float64, device="cpu") -> PowerResidual:
    """``(1/p)||Ax - b||^p`` with ``A, b ~ U[-1, 1]``, ``x0 = 1``; ``f* = 0`` (``n_rows <= dim``).

    The metric of the notebook is ``problem.metric() = A^T A + 1e-8 I``.
    """
    rs = np.random.RandomState(seed)
    A = torch.as_tensor(rs.uniform(-1, 1, size=(n_rows, dim)), dtype=dtype, device=device)
    b = torch.as_tensor(rs.uniform(-1, 1, size=n_rows), dtype=dtype, device=device)
    prob = PowerResidual(lambda x: A @ x - b, lambda x: A, p,
                         torch.ones(dim, dtype=dtype, device=device), f_star=0.0 if n_rows <= dim else None)
    prob.A, prob.b = A, b
    prob.metric = lambda: A.T @ A + 1e-8 * torch.eye(dim, dtype=dtype, device=device)
    return prob


def make_rosenbrock_residual(*, p: float = 5.0, dtype: torch.dtype = torch.float64, device="cpu") -> PowerResidual:
    """``u(x) = (1 - x1, 10 (x2 - x1^2))``, ``f = (1/p)||u||^p``, ``x0 = (-2, 2)``, ``f* = 0``."""

    def u(x):
        return torch.stack([1 - x[0], 10 * (x[1] - x[0] ** 2)])

    def J(x):
        one = torch.ones((), dtype=x.dtype, device=x.device)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.stack([torch.stack([-one, zero]), torch.stack([-20 * x[0], 10 * one])])

    def rhs(x, uu):
        H = torch.zeros(2, 2, dtype=x.dtype, device=x.device)
        H[0, 0] = -20 * uu[1]
        return H

    return PowerResidual(u, J, p, torch.tensor([-2.0, 2.0], dtype=dtype, device=device), 0.0, rhs)


def make_chebyshev_rosenbrock(dim: int = 1000, *, p: float = 4.0, seed: int = 0,
                              dtype: torch.dtype = torch.float64, device="cpu") -> PowerResidual:
    """Nesterov-Chebyshev-Rosenbrock residuals ``u_1 = (1 - x_1)/2``, ``u_i = x_i - 2 x_{i-1}^2 + 1``.

    ``f = (1/p)||u||^p``, ``x0 ~ U[0, 1]^n`` (seeded), ``f* = 0`` at ``x = 1``.
    """

    def u(x):
        return torch.cat([(1 - x[:1]) / 2, x[1:] - 2 * x[:-1] ** 2 + 1])

    def J(x):
        Jm = torch.eye(dim, dtype=x.dtype, device=x.device)
        Jm[0, 0] = -0.5
        idx = torch.arange(1, dim, device=x.device)
        Jm[idx, idx - 1] = -4 * x[:-1]
        return Jm

    def rhs(x, uu):
        d = torch.zeros(dim, dtype=x.dtype, device=x.device)
        d[:-1] = -4 * uu[1:]
        return torch.diag(d)

    rs = np.random.RandomState(seed)
    x0 = torch.as_tensor(rs.uniform(0, 1, size=dim), dtype=dtype, device=device)
    return PowerResidual(u, J, p, x0, 0.0, rhs)


class Rosenbrock(Problem):
    """``f(x) = (a - x1)^2 + b (x2 - x1^2)^2``, ``x0 = (-2, 2)``, minimiser ``(a, a^2)``, ``f* = 0``."""

    def __init__(self, a: float = 1.0, b: float = 100.0, dtype: torch.dtype = torch.float64, device="cpu") -> None:
        self.a, self.b, self.n = float(a), float(b), 2
        self.x0 = torch.tensor([-2.0, 2.0], dtype=dtype, device=device)
        self.f_star = 0.0

    def f(self, x: Tensor) -> Tensor:
        return (self.a - x[0]) ** 2 + self.b * (x[1] - x[0] ** 2) ** 2

    def hessian(self, x: Tensor) -> Tensor:
        h11 = 2 - 4 * self.b * (x[1] - 3 * x[0] ** 2)
        h12 = -4 * self.b * x[0]
        return torch.stack([torch.stack([h11, h12]), torch.stack([h12, 2 * self.b + 0 * h11])])
