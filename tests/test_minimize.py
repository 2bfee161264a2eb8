"""``solvers.minimize``: convergence on problems with known answers, rates, saddles, safety.

Truth: closed-form minimisers of quadratics, ``scipy.optimize.minimize(method=
"trust-exact")`` on the same logistic regression, the known minimiser ``(1, 1)`` of
Rosenbrock, the known local minima ``(0, +-sqrt 2)`` of ``x^2 - y^2 + y^4/4`` and the
gradient recomputed by autograd at the returned point.
"""

import dataclasses
import math

import numpy as np
import pytest
import scipy.optimize
import torch

import solvers
from curvature import DiagonalOperator
from solvers.problems import Rosenbrock, make_logistic_regression

DT = torch.float64


SECOND_ORDER = ["cubic_newton", "arc", "lazy_cubic_newton", "lazy_regularized_newton", "gns",
                "super_universal_newton"]


def autograd_grad_norm(f, x):
    xr = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr)
    return float(torch.linalg.vector_norm(g))


@pytest.fixture(scope="module", params=[0.0, 1e-3], ids=["no_l2", "l2"])
def logistic(request):
    prob = make_logistic_regression(1000, 200, l2=request.param, seed=1)
    A, y, l2 = prob.A.numpy(), prob.y.numpy(), request.param

    def fun(w):
        z = y * (A @ w)
        return np.logaddexp(0, -z).mean() + 0.5 * l2 * w @ w

    def jac(w):
        z = y * (A @ w)
        return -(A.T @ (y * scipy.special.expit(-z))) / len(y) + l2 * w

    def hess(w):
        s = scipy.special.expit(A @ w)
        return (A.T * (s * (1 - s))) @ A / len(y) + l2 * np.eye(A.shape[1])

    ref = scipy.optimize.minimize(fun, np.zeros(200), jac=jac, hess=hess, method="trust-exact",
                                  options={"gtol": 1e-11})
    assert ref.success
    return prob, ref


def quadratic(d=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    A = Q @ torch.diag(torch.logspace(0, 2, d, dtype=DT)) @ Q.T
    b = torch.randn(d, generator=gen, dtype=DT)
    return (lambda x: 0.5 * x @ A @ x - b @ x), A, b


@pytest.mark.parametrize("method,opts", [
    ("cubic_newton", {"M0": 1e-14}),
    ("arc", {"sigma0": 1e-14}),
    ("gns", {"gamma0": 1e14}),
    ("lazy_regularized_newton", {"M0": 1e-24}),
])
def test_quadratic_solved_by_one_newton_step(method, opts):
    f, A, b = quadratic()
    res = solvers.minimize(f, torch.zeros(20, dtype=DT), method=method, gtol=1e-8, **opts)
    assert res.success and res.nit == 1
    xstar = torch.linalg.solve(A, b)
    assert float(torch.linalg.vector_norm(res.x - xstar)) <= 1e-9 * float(torch.linalg.vector_norm(xstar))


@pytest.mark.parametrize("method", SECOND_ORDER + ["gns_gradient"])
def test_logistic_regression_reaches_tight_gradient(logistic, method):
    prob, ref = logistic
    kwargs = {} if method == "gns_gradient" else {"curvature": prob.curvature("hessian")}
    res = solvers.minimize(prob.f, prob.x0, method=method, gtol=1e-8, maxiter=2000, **kwargs)
    assert res.success, res.message
    assert autograd_grad_norm(prob.f, res.x) < 1e-8
    assert math.isfinite(res.fun) and abs(res.fun - ref.fun) <= 1e-12 * max(1.0, abs(ref.fun))
    # strongly convex near the optimum: ||x - x*|| <= ||g|| / lambda_min(H(x*))
    lam_min = float(torch.linalg.eigvalsh(prob.hessian(res.x)).min())
    assert float(np.linalg.norm(res.x.numpy() - ref.x)) <= 2e-8 / lam_min + 1e-10
    assert len(res.history) == res.nit + 1
    assert res.history.grad_norm[-1] == pytest.approx(res.grad_norm)


@pytest.mark.parametrize("method,opts", [
    ("cubic_newton", {}), ("arc", {}), ("gns", {}), ("lazy_cubic_newton", {"m": 1}),
    ("cubic_newton", {"subproblem": "lanczos", "krylov_rtol": 1e-3}),
])
def test_local_superlinear_convergence(logistic, method, opts):
    prob, _ = logistic
    res = solvers.minimize(prob.f, prob.x0, method=method, curvature=prob.curvature("hessian"),
                           gtol=1e-13, maxiter=100, **opts)
    gn = np.array(res.history.grad_norm)
    ratios = gn[1:] / gn[:-1]
    # the local phase, above the rounding floor of the gradient (~1e-15 here)
    tail = ratios[(gn[:-1] < 2e-2) & (gn[1:] > 1e-14)]
    assert len(tail) >= 3
    # Newton-type local rate: the contraction factor itself goes to zero
    assert np.all(np.diff(tail) < 0)
    assert tail[-1] < 1e-2


@pytest.mark.parametrize("method", ["cubic_newton", "arc"])
def test_rosenbrock_monotone_and_solved(method):
    prob = Rosenbrock()
    res = solvers.minimize(prob.f, prob.x0, method=method, gtol=1e-10)
    assert res.success
    torch.testing.assert_close(res.x, torch.ones(2, dtype=DT), rtol=0, atol=1e-8)
    fun = np.array(res.history.fun)
    assert np.all(np.diff(fun) <= 64 * np.finfo(float).eps * np.maximum(1, fun[:-1]))


def saddle(x):
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4 / 4


def plain_newton(f, x, iters=30):
    """Undamped Newton (the reference that gets stuck): x <- x - H^{-1} g."""
    for _ in range(iters):
        xr = x.clone().requires_grad_(True)
        g = torch.autograd.grad(f(xr), xr)[0]
        H = torch.autograd.functional.hessian(f, x)
        x = x - torch.linalg.solve(H, g)
    return x


@pytest.mark.parametrize("subproblem", ["eig", "lanczos"])
def test_escapes_strict_saddle_where_newton_does_not(subproblem):
    x0 = torch.tensor([1e-3, 1e-9], dtype=DT)
    xn = plain_newton(saddle, x0)
    assert float(torch.linalg.vector_norm(xn)) < 1e-12  # Newton converges to the saddle (0, 0)
    assert float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(saddle, xn)).min()) == pytest.approx(-2.0)
    res = solvers.minimize(saddle, x0, method="cubic_newton", subproblem=subproblem, gtol=1e-10)
    assert res.success
    assert res.fun == pytest.approx(-1.0, abs=1e-12)  # minima at (0, +-sqrt 2), f = -1
    assert abs(float(res.x[0])) < 1e-8 and abs(abs(float(res.x[1])) - math.sqrt(2)) < 1e-8
    assert np.all(np.diff(res.history.fun) <= 1e-15)


@pytest.mark.parametrize("method", ["cubic_newton", "arc"])
def test_exact_saddle_with_second_order_stop(method):
    x0 = torch.zeros(2, dtype=DT)  # gradient exactly zero
    first = solvers.minimize(saddle, x0, method=method)
    assert first.success and first.nit == 0  # a first-order test stops at once
    res = solvers.minimize(saddle, x0, method=method, second_order_tol=1e-8, gtol=1e-10)
    assert res.success and res.nit > 0
    assert res.fun == pytest.approx(-1.0, abs=1e-12)
    assert float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(saddle, res.x)).min()) > 0


# ------------------------------------------------------------------------- safety
def barrier(x):
    """Minimum at x = 1 (f = 1); NaN for x <= 0, where Newton steps from 0.1 land."""
    return (x - torch.log(x)).sum()


@pytest.mark.parametrize("method", SECOND_ORDER + ["gns_gradient"])
def test_never_returns_nonfinite_x(method):
    x0 = torch.full((3,), 20.0, dtype=DT)  # full Newton step from 20 lands at x < 0 (log -> NaN)
    res = solvers.minimize(barrier, x0, method=method, maxiter=500)
    assert bool(torch.isfinite(res.x).all())
    assert res.success, res.message
    torch.testing.assert_close(res.x, torch.ones(3, dtype=DT), rtol=0, atol=1e-7)
    assert all(math.isfinite(v) for v in res.history.fun)


def test_nonfinite_curvature_raises_clearly():
    f, _, _ = quadratic(4)

    def bad(x):
        return torch.full((4, 4), float("nan"), dtype=DT)

    with pytest.raises(FloatingPointError, match="NaN or inf"):
        solvers.minimize(f, torch.zeros(4, dtype=DT), method="cubic_newton", curvature=bad)


def test_bad_options_raise():
    f, _, _ = quadratic(4)
    x0 = torch.zeros(4, dtype=DT)
    with pytest.raises(ValueError, match="Unknown method"):
        solvers.minimize(f, x0, method="bfgs")
    with pytest.raises(ValueError, match="m .* must be an integer >= 1"):
        solvers.minimize(f, x0, method="lazy_cubic_newton", m=0)
    with pytest.raises(ValueError, match="gtol must be"):
        solvers.minimize(f, x0, method="gns", gtol=-1.0)
    with pytest.raises(ValueError, match="ftol must be"):
        solvers.minimize(f, x0, method="arc", ftol=-1e-3)
    with pytest.raises(ValueError, match="maxiter must be"):
        solvers.minimize(f, x0, method="cubic_newton", maxiter=-1)
    with pytest.raises(ValueError, match="M0 must be"):
        solvers.minimize(f, x0, method="cubic_newton", M0=0.0)
    with pytest.raises(ValueError, match="gamma0 must be"):
        solvers.minimize(f, x0, method="gns", gamma0=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        solvers.minimize(f, x0, method="gns", M0=1.0)
    with pytest.raises(ValueError, match="scalar"):
        solvers.minimize(lambda x: x * 2, x0, method="cubic_newton")
    with pytest.raises(TypeError, match="floating-point"):
        solvers.minimize(f, torch.zeros(4, dtype=torch.int64), method="cubic_newton")
    with pytest.raises(ValueError, match="not finite"):
        solvers.minimize(lambda x: torch.log(x).sum(), -torch.ones(4, dtype=DT), method="gns")
    with pytest.raises(ValueError, match="Unknown curvature"):
        solvers.minimize(f, x0, method="gns", curvature="ggn")
    with pytest.raises(ValueError, match="Dimension mismatch"):
        solvers.minimize(f, x0, method="gns", curvature=lambda x: torch.eye(3, dtype=DT))


def test_callback_history_dtype_and_result():
    f, _, _ = quadratic(6)
    seen = []

    def cb(info):
        seen.append(info.nit)
        assert info.x.shape == (2, 3)
        return info.nit >= 2

    x0 = torch.zeros(2, 3, dtype=torch.float32)  # any shape; float32 in -> float64 iterates
    res = solvers.minimize(lambda x: f(x.reshape(-1)), x0, method="cubic_newton", callback=cb)
    assert seen == [1, 2] and res.nit == 2 and not res.success and "callback" in res.message
    assert res.x.shape == (2, 3) and res.x.dtype == DT and res.x.device == x0.device
    assert len(res.history) == 3 and res.history.time == sorted(res.history.time)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.nit = 5
    assert set(res.counts) == {"nfev", "ngev", "nhev", "nfact", "num_matvecs"}
    kept = solvers.minimize(lambda x: f(x.reshape(-1).double()).float(), x0, method="gns", dtype=None, gtol=1e-3)
    assert kept.x.dtype == torch.float32 and kept.success
    np_res = solvers.minimize(f, np.zeros(6), method="gns")
    assert np_res.success and np_res.x.dtype == DT


def test_f_star_gap_and_maxiter_stops():
    prob = Rosenbrock()
    res = solvers.minimize(prob.f, prob.x0, method="gns", f_star=0.0, ftol=1e-6, gtol=0.0)
    assert res.success and "f_star" in res.message and res.fun <= 1e-6
    assert res.history.fun[-2] > 1e-6  # it stopped at the first iterate inside the gap
    short = solvers.minimize(prob.f, prob.x0, method="cubic_newton", maxiter=3)
    assert short.nit == 3 and not short.success and "maximum number of iterations" in short.message


def test_diagonal_curvature_can_be_swapped_in():
    """A diagonal (Jacobi) curvature factory: the same solver, a cheaper model, still converges."""
    prob = make_logistic_regression(400, 30, l2=1e-2, cond=10.0, seed=5)
    diag = lambda x: DiagonalOperator(torch.diagonal(prob.hessian(x)).clone())  # noqa: E731
    res = solvers.minimize(prob.f, prob.x0, method="gns", curvature=diag, gtol=1e-8, maxiter=2000)
    exact = solvers.minimize(prob.f, prob.x0, method="gns", curvature=prob.curvature("hessian"), gtol=1e-8)
    assert res.success and exact.success and res.nit > exact.nit
    torch.testing.assert_close(res.x, exact.x, rtol=0, atol=1e-6)
    cub = solvers.minimize(prob.f, prob.x0, method="cubic_newton", curvature=diag, gtol=1e-8, maxiter=2000)
    assert cub.success


def test_default_curvature_is_exact_hessian_matrix_free_and_dense():
    """The default factory (double backward) and the closed form give the same iterates."""
    prob = make_logistic_regression(300, 40, l2=1e-2, seed=4)
    a = solvers.minimize(prob.f, prob.x0, method="cubic_newton", gtol=1e-10)
    b = solvers.minimize(prob.f, prob.x0, method="cubic_newton", gtol=1e-10, curvature=prob.curvature("hessian"))
    c = solvers.minimize(prob.f, prob.x0, method="gns", gtol=1e-10, curvature="hessian", linear_solver="cg",
                         cg_rtol=1e-12)
    assert a.nit == b.nit
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-10)
    torch.testing.assert_close(c.x, b.x, rtol=0, atol=1e-9)
    assert c.num_matvecs > 0 and c.nfact == 0


def test_dense_hessian_fast_path_is_exact_through_layer_norm():
    """Vmapped forward-over-reverse equals column-by-column double backward and finite differences."""
    from curvature import FunctionHessianOperator

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(7, 7, dtype=DT, generator=gen)
    c = torch.randn(7, dtype=DT, generator=gen)

    def f(x):
        return (torch.tanh(torch.nn.functional.layer_norm(W @ x, (7,))) * c).sum() + 0.1 * (x @ x) ** 2

    x = torch.randn(7, dtype=DT, generator=gen)
    H = solvers.dense_hessian(f, x)
    torch.testing.assert_close(H, FunctionHessianOperator(f, x).to_dense(), rtol=1e-10, atol=1e-12)

    def grad(z):
        zr = z.clone().requires_grad_(True)
        return torch.autograd.grad(f(zr), zr)[0]

    eps = 1e-5
    fd = torch.stack([(grad(x + eps * e) - grad(x - eps * e)) / (2 * eps) for e in torch.eye(7, dtype=DT)])
    torch.testing.assert_close(H, 0.5 * (fd + fd.T), rtol=0, atol=1e-7)  # O(eps^2) truncation
