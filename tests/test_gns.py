"""Gradient-normalized smoothness methods (Semenov, Jaggi, Doikov 2025) and their test problems.

Truth: Hessians by double backward, linear solves by ``torch.linalg.solve``, the
acceptance rule re-checked from the recorded history, known optima (``f* = 0`` or
``f(0)`` by construction), and the notebook's iteration budgets (Section 1.5 of the
notes).  Full notebook sizes run under ``-m slow``.
"""

import math

import numpy as np
import pytest
import torch

import solvers
from curvature import DenseOperator, IdentityOperator
from solvers import GNSLinearSystem, Metric, RankOneOperator, gns_step
from solvers._oracle import dense_hessian
from solvers.problems import (
    Rosenbrock,
    make_chebyshev_rosenbrock,
    make_logistic_regression,
    make_logsumexp,
    make_pnorm_equations,
    make_rosenbrock_residual,
)

DT = torch.float64


def rand(n, seed):
    return torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ closed forms of the problems
def test_logsumexp_hessian_and_weighted_gauss_newton():
    prob = make_logsumexp(40, 15, mu=0.7, seed=1)
    x = 0.3 * rand(15, 0)
    H = dense_hessian(prob.f, x)
    torch.testing.assert_close(prob.hessian(x), H, rtol=1e-11, atol=1e-13)
    g = prob.gradient(x)
    # the weighted Gauss-Newton drops exactly the rank-one term -(1/mu) g g^T
    torch.testing.assert_close(prob.weighted_gauss_newton(x), H + torch.outer(g, g) / 0.7, rtol=1e-11, atol=1e-13)
    # the shifted rows put the minimiser at 0 with the stated f*
    assert float(torch.linalg.vector_norm(prob.gradient(torch.zeros(15, dtype=DT)))) < 1e-13
    assert float(prob.f(torch.zeros(15, dtype=DT))) == pytest.approx(prob.f_star, abs=1e-13)


def residual_curvature_term(prob, x):
    """``sum_i u_i grad^2 u_i`` by double backward of ``x -> <u(x), stopgrad(u)>``."""
    u0 = prob.residual(x).detach()
    return dense_hessian(lambda z: prob.residual(z) @ u0, x)


@pytest.mark.parametrize("make", [
    lambda: make_pnorm_equations(10, 20, p=4, seed=2),
    lambda: make_rosenbrock_residual(p=5),
    lambda: make_chebyshev_rosenbrock(12, p=4, seed=3),
])
def test_power_residual_hessian_gauss_newton_fisher(make):
    prob = make()
    x = prob.x0 + 0.1 * rand(prob.n, 4)
    H = dense_hessian(prob.f, x)
    torch.testing.assert_close(prob.hessian(x), H, rtol=1e-10, atol=1e-12)
    nu = float(torch.linalg.vector_norm(prob.residual(x)))
    gn_expected = H - nu ** (prob.p - 2) * residual_curvature_term(prob, x)
    torch.testing.assert_close(prob.gauss_newton(x), gn_expected, rtol=1e-10, atol=1e-12)
    F = prob.fisher(x)
    g = prob.gradient(x)
    torch.testing.assert_close(F.to_dense(), (prob.p - 2) / nu**prob.p * torch.outer(g, g), rtol=1e-11, atol=1e-13)
    v = rand(prob.n, 5)
    torch.testing.assert_close(F @ v, F.to_dense() @ v, rtol=1e-12, atol=1e-14)


def test_logistic_empirical_fisher_and_gns_with_it():
    prob = make_logistic_regression(60, 8, l2=0.1, seed=1)
    x = 0.5 * rand(8, 2)
    grads = torch.stack([
        torch.autograd.grad(torch.nn.functional.softplus(-prob.y[i] * (prob.A[i] @ xr)), xr)[0]
        for i in range(60) for xr in [x.clone().requires_grad_(True)]
    ])
    ef = grads.T @ grads / 60 + 0.1 * torch.eye(8, dtype=DT)
    torch.testing.assert_close(prob.empirical_fisher(x), ef, rtol=1e-12, atol=1e-14)
    big = make_logistic_regression(500, 50, l2=1e-3, seed=2)
    res = solvers.gns(big.f, big.x0, curvature=big.curvature("empirical_fisher"), gtol=1e-8, maxiter=500)
    assert res.success
    exact = solvers.gns(big.f, big.x0, curvature=big.curvature("hessian"), gtol=1e-8)
    assert exact.nit <= res.nit  # the approximation converges (linearly), the Hessian faster
    torch.testing.assert_close(res.x, exact.x, rtol=0, atol=1e-6)


def test_rosenbrock_hessian():
    prob = Rosenbrock()
    x = torch.tensor([-1.3, 0.7], dtype=DT)
    torch.testing.assert_close(prob.hessian(x), dense_hessian(prob.f, x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the step and the metric
def spd(n, seed, cond=100.0):
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(seed)))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ Q.T


def test_gns_step_all_paths_agree_with_dense_solve():
    n = 30
    H, B, g, lam = spd(n, 1) - 0.5 * torch.eye(n, dtype=DT), spd(n, 2, 10.0), rand(n, 3), 2.0
    ref = -torch.linalg.solve(H + lam * B, g)
    torch.testing.assert_close(gns_step(H, g, lam, B), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gns_step(DenseOperator(H), g, lam, DenseOperator(B), linear_solver="cg",
                                        cg_rtol=1e-13), ref, rtol=1e-9, atol=1e-11)
    refI = -torch.linalg.solve(H + lam * torch.eye(n, dtype=DT), g)
    torch.testing.assert_close(gns_step(H, g, lam), refI, rtol=1e-10, atol=1e-12)
    # rank one: Sherman-Morrison with B's Cholesky factor
    v = rand(n, 4)
    R = RankOneOperator(v, 0.7)
    ref1 = -torch.linalg.solve(0.7 * torch.outer(v, v) + lam * B, g)
    system = GNSLinearSystem(R, Metric(B, n, DT, torch.device("cpu")))
    assert system.mode == "sherman_morrison"
    torch.testing.assert_close(system.solve(g, lam), ref1, rtol=1e-10, atol=1e-12)
    assert system.nfact == 0
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        gns_step(-torch.eye(n, dtype=DT), g, 0.5)


def test_metric_dual_norm_and_validation():
    n = 12
    B, g = spd(n, 6), rand(n, 7)
    m = Metric(B, n, DT, torch.device("cpu"))
    assert m.dual_norm(g) == pytest.approx(math.sqrt(float(g @ torch.linalg.solve(B, g))), rel=1e-12)
    d = torch.linspace(1, 3, n, dtype=DT)
    assert Metric(d, n, DT, torch.device("cpu")).dual_norm(g) == pytest.approx(float((g * g / d).sum()) ** 0.5)
    assert Metric(IdentityOperator(n, dtype=DT), n, DT, torch.device("cpu")).dual_norm(g) == pytest.approx(
        float(torch.linalg.vector_norm(g)))
    with pytest.raises(ValueError, match="positive definite"):
        Metric(-B, n, DT, torch.device("cpu"))
    with pytest.raises(ValueError, match="Dimension mismatch"):
        Metric(B[:5, :5], n, DT, torch.device("cpu"))


# -------------------------------------------------------------------------- the search
def test_failed_cholesky_halves_gamma_then_succeeds():
    f = lambda x: 0.5 * (x @ x)  # noqa: E731
    x0 = torch.full((4,), 0.25, dtype=DT)  # ||g|| = 0.5
    neg = lambda x: -torch.eye(4, dtype=DT)  # noqa: E731  indefinite "curvature"
    res = solvers.gns(f, x0, curvature=neg, gamma0=1.0, maxiter=1)
    # lam = 0.5/gamma: gamma = 1 (lam 0.5) and 0.5 (lam 1) fail, gamma = 0.25 (lam 2) gives
    # Delta = -g/(lam - 1) = -x0: the exact minimiser; then gamma doubles to 0.5
    assert res.nfact == 3 and res.nit == 1
    torch.testing.assert_close(res.x, torch.zeros(4, dtype=DT), rtol=0, atol=1e-15)
    assert res.history.reg == [1.0, 0.5]
    stuck = solvers.gns(f, x0, curvature=neg, gamma0=1.0, max_tries=2)
    assert not stuck.success and "unchanged" in stuck.message
    assert torch.equal(stuck.x, x0) and stuck.nit == 0


def test_accepted_steps_satisfy_the_sufficient_decrease_rule():
    prob = Rosenbrock()
    res = solvers.gns(prob.f, prob.x0, curvature=prob.curvature("hessian"), gtol=1e-9)
    assert res.success
    h = res.history
    for k in range(res.nit):
        gamma_used = h.reg[k + 1] / 2  # gamma doubles after an accepted try (floor 1e-9 not reached)
        lam = h.grad_norm[k] / gamma_used
        assert h.fun[k] - h.fun[k + 1] >= h.grad_norm[k + 1] ** 2 / (8 * lam) * (1 - 1e-12)
    assert res.nit <= 60  # the notebook's budget for Rosenbrock from (-2, 2)


def test_cg_path_follows_cholesky_path():
    prob = make_logsumexp(120, 60, seed=3124)
    B = prob.metric()
    kw = dict(metric=B, curvature=prob.curvature("weighted_gauss_newton"), f_star=prob.f_star, ftol=1e-10, gtol=0.0)
    a = solvers.gns(prob.f, prob.x0, linear_solver="cholesky", **kw)
    b = solvers.gns(prob.f, prob.x0, linear_solver="cg", cg_rtol=1e-13, cg_maxiter=2000, **kw)
    assert a.success and b.success
    assert a.nit == b.nit and b.nfact == 1 and b.num_matvecs > 0  # only B was factorized
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-7)


# --------------------------------------------------------- notebook problems (CI sizes)
def test_logsumexp_exact_and_weighted_gauss_newton_converge():
    prob = make_logsumexp(200, 200, seed=3124)
    B = prob.metric()
    out = {}
    for kind in ("hessian", "weighted_gauss_newton"):
        res = solvers.gns(prob.f, prob.x0, metric=B, curvature=prob.curvature(kind), f_star=prob.f_star,
                          ftol=1e-8, maxiter=1000)
        assert res.success, res.message
        assert res.fun - prob.f_star <= 1e-8
        assert np.all(np.diff(res.history.fun) < 0)
        out[kind] = res.nit
    # the approximation costs iterations but stays in the same regime (linear, not sublinear)
    assert out["hessian"] <= out["weighted_gauss_newton"] <= 5 * out["hessian"]
    grad_only = solvers.gns_gradient(prob.f, prob.x0, metric=B, f_star=prob.f_star, maxiter=1000)
    assert grad_only.success


def test_pnorm_fisher_term_beats_exact_hessian():
    prob = make_pnorm_equations(100, 200, p=4, seed=0)
    B = prob.metric()
    exact = solvers.gns(prob.f, prob.x0, metric=B, curvature=prob.curvature("hessian"), f_star=0.0, maxiter=100)
    fisher = solvers.gns(prob.f, prob.x0, metric=B, curvature=prob.curvature("fisher"), f_star=0.0, maxiter=100)
    assert exact.success and fisher.success
    assert fisher.nit <= exact.nit  # the notebook's point: the rank-one term is enough
    assert fisher.nfact == 1  # only B; every step is Sherman-Morrison, O(n^2)
    assert exact.nfact >= exact.nit


def test_chebyshev_rosenbrock_gauss_newton_small():
    prob = make_chebyshev_rosenbrock(50, p=4, seed=0)
    gn = solvers.gns(prob.f, prob.x0, curvature=prob.curvature("gauss_newton"), f_star=0.0, maxiter=500)
    su = solvers.super_universal_newton(prob.f, prob.x0, curvature=prob.curvature("hessian"), f_star=0.0,
                                        maxiter=500)
    assert gn.success and su.success
    assert gn.fun <= 1e-8 and su.fun <= 1e-8


# ------------------------------------------------------------------ full notebook settings
@pytest.mark.slow
def test_notebook_logsumexp_full():
    prob = make_logsumexp(1000, 1000, seed=3124)
    B = prob.metric()
    for kind in ("hessian", "weighted_gauss_newton"):
        res = solvers.gns(prob.f, prob.x0, metric=B, curvature=prob.curvature(kind), f_star=prob.f_star,
                          ftol=1e-8, maxiter=1000)
        assert res.success and res.nit < 1000
    euclid = solvers.gradient_descent(prob.f, prob.x0, f_star=prob.f_star, maxiter=1000)
    assert not euclid.success  # the Euclidean gradient method does not reach 1e-8 in 1000 iterations


@pytest.mark.slow
def test_notebook_rosenbrock_gradient_method_is_slow():
    prob = Rosenbrock()
    gd = solvers.gradient_descent(prob.f, prob.x0, f_star=0.0, maxiter=5000)
    assert not gd.success and gd.fun > 1e-8  # 5000 gradient steps are not enough (notebook)
    gns = solvers.gns(prob.f, prob.x0, curvature=prob.curvature("hessian"), f_star=0.0, maxiter=60)
    assert gns.success


@pytest.mark.slow
def test_notebook_chebyshev_rosenbrock_full():
    prob = make_chebyshev_rosenbrock(1000, p=4, seed=0)
    gn = solvers.gns(prob.f, prob.x0, curvature=prob.curvature("gauss_newton"), f_star=0.0, maxiter=1000)
    su = solvers.super_universal_newton(prob.f, prob.x0, curvature=prob.curvature("hessian"), f_star=0.0,
                                        maxiter=1000)
    assert gn.success and su.success
    rr = make_rosenbrock_residual(p=5)
    for kind in ("hessian", "gauss_newton"):
        assert solvers.gns(rr.f, rr.x0, curvature=rr.curvature(kind), f_star=0.0, maxiter=1000).success
