"""Lazy-Hessian Newton (Doikov, Chayti, Jaggi 2023): work counts, accuracy, nonconvex behaviour.

Truth: the closed-form logistic-regression Hessian checked against double backward,
the gradient recomputed by autograd at the returned point, scipy's trust-exact
optimum, and the known minima of the saddle function ``x^2 - y^2 + y^4/4``.
"""

import math

import numpy as np
import pytest
import torch

import solvers
from solvers._oracle import dense_hessian
from solvers.problems import Rosenbrock, make_logistic_regression

DT = torch.float64


@pytest.fixture(scope="module")
def logistic():
    return make_logistic_regression(1000, 200, l2=0.0, seed=2)


def test_closed_form_logistic_hessian_matches_double_backward():
    prob = make_logistic_regression(80, 12, l2=0.3, seed=5)
    x = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prob.hessian(x), dense_hessian(prob.f, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["lazy_cubic_newton", "lazy_regularized_newton"])
def test_m_equal_d_needs_several_times_fewer_hessians(logistic, method):
    prob = logistic
    lazy = solvers.minimize(prob.f, prob.x0, method=method, curvature=prob.curvature("hessian"), gtol=1e-8)
    full = solvers.minimize(prob.f, prob.x0, method=method, m=1, curvature=prob.curvature("hessian"), gtol=1e-8)
    for res in (lazy, full):
        assert res.success
        xr = res.x.clone().requires_grad_(True)
        assert float(torch.linalg.vector_norm(torch.autograd.grad(prob.f(xr), xr)[0])) < 1e-8
        assert res.nfact == res.nhev  # one eigendecomposition per snapshot, none per lazy step
        assert res.ngev >= res.nit + 1
    assert full.nhev == full.nit  # m = 1: a fresh Hessian every step
    assert 3 * lazy.nhev <= full.nhev
    assert lazy.nit > full.nit  # the price: more (cheap) steps


def test_snapshot_schedule(logistic):
    prob = logistic
    m = 3
    res = solvers.minimize(prob.f, prob.x0, method="lazy_cubic_newton", m=m,
                           curvature=prob.curvature("hessian"), gtol=1e-8)
    assert res.success
    # a snapshot at steps 0, m, 2m, ... (plus a refresh only if a stale search fails)
    assert res.nhev >= math.ceil(res.nit / m)
    nh = np.array(res.history.nhev)
    assert nh[0] == 0 and nh[1] == 1
    assert np.all(np.diff(nh[1:]) <= 1)


def test_default_m_is_dimension():
    prob = make_logistic_regression(400, 30, l2=1e-3, seed=3)
    res = solvers.minimize(prob.f, prob.x0, method="lazy_cubic_newton", curvature=prob.curvature("hessian"))
    assert res.success and res.nit > 30
    nh = res.history.nhev  # entry k: snapshots used up to iteration k
    assert nh[1] == nh[30] == 1 and nh[31] == 2  # refreshed after exactly n = 30 steps
    assert res.nhev == res.nfact == math.ceil(res.nit / 30)


def saddle(x):
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4 / 4


def test_lazy_cubic_escapes_saddle_with_stale_curvature():
    res = solvers.minimize(saddle, torch.tensor([1e-3, 1e-9], dtype=DT), method="lazy_cubic_newton",
                           gtol=1e-10, maxiter=500)
    assert res.success
    assert res.fun == pytest.approx(-1.0, abs=1e-12)
    assert abs(abs(float(res.x[1])) - math.sqrt(2)) < 1e-8
    assert np.all(np.diff(res.history.fun) <= 1e-15)  # the decrease test makes it monotone


def test_lazy_cubic_rosenbrock_monotone():
    prob = Rosenbrock()
    res = solvers.minimize(prob.f, prob.x0, method="lazy_cubic_newton", gtol=1e-9, maxiter=2000)
    assert res.success
    torch.testing.assert_close(res.x, torch.ones(2, dtype=DT), rtol=0, atol=1e-7)
    fun = np.array(res.history.fun)
    assert np.all(np.diff(fun) <= 64 * np.finfo(float).eps * np.maximum(1, fun[:-1]))


def test_regularized_needs_positive_definite_shift():
    """Indefinite snapshot: M is doubled until H + sqrt(M||g||) I is positive definite."""
    res = solvers.minimize(saddle, torch.tensor([0.5, 0.3], dtype=DT), method="lazy_regularized_newton",
                           gtol=1e-9, maxiter=500)
    assert bool(torch.isfinite(res.x).all())
    assert np.all(np.diff(res.history.fun) <= 1e-15)
    assert res.success


def test_lazy_bad_options():
    prob = Rosenbrock()
    with pytest.raises(ValueError, match="m .* must be an integer >= 1"):
        solvers.lazy_cubic_newton(prob.f, prob.x0, m=0)
    with pytest.raises(ValueError, match="m .* must be an integer >= 1"):
        solvers.lazy_regularized_newton(prob.f, prob.x0, m=2.5)
    with pytest.raises(ValueError, match="max_tries"):
        solvers.lazy_cubic_newton(prob.f, prob.x0, max_tries=0)
