"""Cubic-regularized Newton subproblem: exact (eigenbasis) and Krylov (Lanczos) solvers.

Truth: the global-minimiser characterisation ``(H + (M r/2) I) h = -g``,
``H + (M r/2) I`` PSD, ``r = ||h||`` (Nesterov-Polyak 2006, Thm 3.1), brute-force
minimisation of the cubic model with scipy from many starts, and the dual identity
``min m = max_r -1/2 g^T (H + Mr/2 I)^{-1} g - M r^3/12``.
"""

import numpy as np
import pytest
import scipy.optimize
import torch

from curvature import DenseOperator
from solvers import (
    EigCubicSubproblem,
    LanczosCubicSubproblem,
    cubic_model,
    solve_cubic_subproblem,
    solve_cubic_subproblem_eig,
    solve_cubic_subproblem_lanczos,
)

DT = torch.float64


def random_problem(d, seed, spectrum=None):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    s = torch.randn(d, generator=gen, dtype=DT) * 3 if spectrum is None else torch.as_tensor(spectrum, dtype=DT)
    H = Q @ torch.diag(s) @ Q.T
    g = torch.randn(d, generator=gen, dtype=DT)
    return H, g, s, Q


def check_optimality(H, g, M, step, tol=1e-10):
    h = step.step
    r = float(torch.linalg.vector_norm(h))
    d = H.shape[0]
    K = H + 0.5 * M * r * torch.eye(d, dtype=DT)
    scale = float(torch.linalg.matrix_norm(H, 2)) * r + float(torch.linalg.vector_norm(g))
    assert float(torch.linalg.vector_norm(K @ h + g)) <= tol * scale
    assert float(torch.linalg.eigvalsh(K).min()) >= -tol * float(torch.linalg.matrix_norm(H, 2))
    assert abs(step.radius - r) <= tol * max(r, 1e-300)
    assert abs(step.shift - 0.5 * M * r) <= tol * max(step.shift, 1.0)
    assert abs(step.model_value - cubic_model(H, g, M, h)) <= tol * max(1.0, abs(step.model_value))


def brute_force(H, g, M, seed=0, starts=12):
    Hn, gn = H.numpy(), g.numpy()

    def m(v):
        return gn @ v + 0.5 * v @ Hn @ v + M / 6 * np.linalg.norm(v) ** 3

    def grad(v):
        return gn + Hn @ v + 0.5 * M * np.linalg.norm(v) * v

    rng = np.random.default_rng(seed)
    best = None
    for k in range(starts):
        v0 = rng.standard_normal(len(gn)) * 10.0 ** (k % 4 - 1)
        res = scipy.optimize.minimize(m, v0, jac=grad, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
        if best is None or res.fun < best.fun:
            best = res
    return best


@pytest.mark.parametrize("M", [1e-2, 1.0, 1e2])
@pytest.mark.parametrize("seed", [0, 1])
def test_optimality_conditions_indefinite(M, seed):
    H, g, s, _ = random_problem(50, seed)
    assert float(s.min()) < 0 < float(s.max())
    step = solve_cubic_subproblem(H, g, M)
    assert not step.hard_case
    check_optimality(H, g, M, step)


@pytest.mark.parametrize("M", [0.3, 3.0])
def test_matches_brute_force(M):
    H, g, _, _ = random_problem(8, 3)
    step = solve_cubic_subproblem(H, g, M)
    best = brute_force(H, g, M)
    # the global minimum of m: BFGS from many starts cannot go below it
    assert step.model_value <= best.fun + 1e-10 * abs(best.fun)
    assert abs(step.model_value - best.fun) <= 1e-7 * abs(best.fun)
    np.testing.assert_allclose(step.step.numpy(), best.x, rtol=0, atol=1e-5 * np.linalg.norm(best.x))


def test_dual_value_equals_model_minimum():
    H, g, _, _ = random_problem(20, 5)
    M = 2.0
    step = solve_cubic_subproblem(H, g, M)
    lam = step.shift
    r = 2 * lam / M
    K = H + lam * torch.eye(20, dtype=DT)
    dual = float(-0.5 * g @ torch.linalg.solve(K, g) - M / 12 * r**3)
    assert abs(dual - step.model_value) <= 1e-10 * abs(step.model_value)


def test_hard_case():
    # g orthogonal to the (double) bottom eigenspace, s_min < 0, small g: the hard case
    s = [-2.0, -2.0, 0.5, 1.0, 3.0, 7.0]
    H, _, _, Q = random_problem(6, 7, spectrum=s)
    g = Q[:, 2:] @ torch.tensor([1e-2, -2e-2, 1e-2, 3e-2], dtype=DT)
    M = 1.0
    step = solve_cubic_subproblem(H, g, M)
    assert step.hard_case
    assert abs(step.shift - 2.0) <= 1e-12  # lam = -s_min
    check_optimality(H, g, M, step)
    best = brute_force(H, g, M)
    assert step.model_value <= best.fun + 1e-10 * abs(best.fun)
    assert abs(step.model_value - best.fun) <= 1e-7 * abs(best.fun)


def test_near_hard_case_is_continuous():
    s = [-1.0, 0.5, 2.0, 4.0]
    H, _, _, Q = random_problem(4, 11, spectrum=s)
    g0 = Q[:, 1:] @ torch.tensor([1e-2, 1e-2, 1e-2], dtype=DT)
    M = 1.0
    hard = solve_cubic_subproblem(H, g0, M)
    for eps in (1e-4, 1e-7):
        near = solve_cubic_subproblem(H, g0 + eps * Q[:, 0], M)
        check_optimality(H, g0 + eps * Q[:, 0], M, near, tol=1e-9)
        # the minimiser moves by O(eps) (one of the two symmetric hard-case solutions)
        diff = min(float(torch.linalg.vector_norm(near.step - hard.step)),
                   float(torch.linalg.vector_norm(near.step - (hard.step - 2 * (hard.step @ Q[:, 0]) * Q[:, 0]))))
        assert diff <= 1e3 * eps


def test_zero_gradient_saddle_moves_along_negative_curvature():
    s = [-0.5, 1.0, 2.0]
    H, _, _, Q = random_problem(3, 2, spectrum=s)
    g = torch.zeros(3, dtype=DT)
    M = 4.0
    step = solve_cubic_subproblem(H, g, M)
    assert step.hard_case
    assert abs(step.radius - 2 * 0.5 / M) <= 1e-14
    assert abs(abs(float(step.step @ Q[:, 0])) - step.radius) <= 1e-12
    assert step.model_value < 0
    check_optimality(H, g, M, step)
    # PSD H and g = 0: the minimiser is 0
    assert float(torch.linalg.vector_norm(solve_cubic_subproblem(H @ H, g, M).step)) == 0.0


def test_small_M_tends_to_newton_step():
    H, g, _, _ = random_problem(10, 4, spectrum=np.linspace(1, 10, 10))
    newton = -torch.linalg.solve(H, g)
    for M in (1e-6, 1e-9):
        step = solve_cubic_subproblem(H, g, M)
        # ||h - h_N|| <= ||H^{-1}|| (M/2) r ||h||  (first-order perturbation)
        bound = 0.5 * M * step.radius**2 / 1.0
        assert float(torch.linalg.vector_norm(step.step - newton)) <= 2 * bound


def test_eig_subproblem_reuse_and_regularized_solve():
    H, g, _, _ = random_problem(12, 6)
    s, U = torch.linalg.eigh(H)
    sub = EigCubicSubproblem(s, U, g)
    for M in (0.5, 5.0):
        a = sub.solve(M)
        b = solve_cubic_subproblem_eig(s, U, g, M)
        assert torch.equal(a.step, b.step)
        check_optimality(H, g, M, a)
    lam = float(-s.min()) + 1.0
    h = sub.solve_regularized(lam)
    ref = -torch.linalg.solve(H + lam * torch.eye(12, dtype=DT), g)
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        sub.solve_regularized(float(-s.min()) - 0.1)


@pytest.mark.parametrize("M", [0.1, 10.0])
def test_lanczos_agrees_with_dense(M):
    H, g, _, _ = random_problem(60, 8)
    dense = solve_cubic_subproblem(H, g, M, method="eig")
    op = DenseOperator(H)
    lan = solve_cubic_subproblem_lanczos(op, g, M, rtol=1e-13)
    assert lan.grad_model_norm <= 1e-13 * float(torch.linalg.vector_norm(g))
    assert lan.num_matvecs == op.num_matvecs <= 60
    # model residual r -> step error <= r / lambda_min(H + lam I) (strong convexity of m near h)
    rel = float(torch.linalg.vector_norm(lan.step - dense.step) / torch.linalg.vector_norm(dense.step))
    assert rel <= 1e-8
    assert abs(lan.model_value - dense.model_value) <= 1e-10 * abs(dense.model_value)
    # the Krylov residual it reports is the true ||grad m(h)||
    h = lan.step
    true_res = float(torch.linalg.vector_norm(H @ h + g + 0.5 * M * torch.linalg.vector_norm(h) * h))
    assert abs(true_res - lan.grad_model_norm) <= 1e-9 * float(torch.linalg.vector_norm(g))


def test_lanczos_early_stop_and_basis_reuse():
    d = 120
    H, g, _, _ = random_problem(d, 9, spectrum=np.concatenate([np.linspace(1, 2, d - 3), [50.0, 80.0, 100.0]]))
    op = DenseOperator(H)
    sub = LanczosCubicSubproblem(op, g)
    first = sub.solve(1.0, rtol=1e-6)
    assert first.grad_model_norm <= 1e-6 * float(torch.linalg.vector_norm(g))
    assert first.iterations < d // 4  # clustered spectrum: few Lanczos vectors
    used = op.num_matvecs
    second = sub.solve(8.0, rtol=1e-6)  # larger M after a rejection: the basis is reused
    assert op.num_matvecs - used == second.num_matvecs <= 2
    check_optimality(H, g, 8.0, solve_cubic_subproblem(H, g, 8.0))


def test_lanczos_zero_gradient_finds_negative_curvature():
    H, _, s, _ = random_problem(30, 12)
    g = torch.zeros(30, dtype=DT)
    step = solve_cubic_subproblem_lanczos(DenseOperator(H), g, 1.0, seed=3)
    assert step.model_value < 0
    # the step is along a (Ritz) direction of negative curvature, of the hard-case length
    h = step.step
    assert float(h @ H @ h) < 0
    assert abs(step.radius - 2 * step.shift / 1.0) <= 1e-12


def test_bad_inputs():
    H, g, _, _ = random_problem(5, 0)
    with pytest.raises(ValueError, match="M must be"):
        solve_cubic_subproblem(H, g, 0.0)
    with pytest.raises(ValueError, match="M must be"):
        solve_cubic_subproblem(H, g, float("nan"))
    with pytest.raises(ValueError, match="Unknown subproblem method"):
        solve_cubic_subproblem(H, g, 1.0, method="qr")
    with pytest.raises(ValueError, match="Dimension mismatch"):
        EigCubicSubproblem(torch.ones(5, dtype=DT), torch.eye(5, dtype=DT), torch.ones(4, dtype=DT))
