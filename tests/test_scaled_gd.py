"""ScaledGD / ScaledGD(lambda): preconditioner against dense truth, steps against closed forms,
and the published Figure-2 behaviour of Tong, Ma & Chi (2021) at reduced (default) and full
(slow) sizes."""

from __future__ import annotations

import math

import pytest
import torch

from solvers import (
    MatrixCompletionProblem,
    MatrixSensingProblem,
    ScaledGD,
    factored_gd,
    low_rank_ground_truth,
    matrix_completion_problem,
    matrix_sensing_family,
    matrix_sensing_problem,
    scaled_gd,
    scaled_gd_lockstep,
    scaled_gd_preconditioner,
    spectral_init,
)

KAPPAS = (1, 5, 10, 20)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ preconditioner
def test_preconditioner_is_kron_identity_inverse_gram():
    R = _rand(7, 3, seed=1)
    lam = 0.3
    P = scaled_gd_preconditioner(R, lam, num_rows=5)
    M_inv = torch.linalg.inv(R.T @ R + lam * torch.eye(3, dtype=torch.float64))
    dense = torch.kron(torch.eye(5, dtype=torch.float64), M_inv.contiguous())  # row-major vec(G M^{-1}) = (I (x) M^{-T}) vec(G)
    torch.testing.assert_close(P.to_dense(), dense, rtol=1e-12, atol=1e-14)
    assert P.shape == (15, 15) and P.is_symmetric
    G = _rand(5, 3, seed=2)
    torch.testing.assert_close(P.apply(G), G @ M_inv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((P @ [G])[0], G @ M_inv, rtol=1e-12, atol=1e-14)
    # exact solve multiplies by the Gram matrix
    torch.testing.assert_close(P.solve(G.reshape(-1)), (G @ (R.T @ R + lam * torch.eye(3, dtype=torch.float64))).reshape(-1))


def test_preconditioner_errors():
    with pytest.raises(ValueError, match="damping"):
        scaled_gd_preconditioner(_rand(4, 2), -1.0)
    with pytest.raises(ValueError, match="singular"):
        scaled_gd_preconditioner(torch.zeros(4, 2, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="Dimension mismatch"):
        scaled_gd_preconditioner(_rand(4, 2)).apply(_rand(4, 3))


# ------------------------------------------------------------------ the optimizer
def test_optimizer_step_equals_closed_form_asymmetric_and_psd():
    M = _rand(6, 5, seed=3)
    L, R = _rand(6, 2, seed=4).requires_grad_(), _rand(5, 2, seed=5).requires_grad_()
    lr, lam = 0.4, 0.05
    opt = ScaledGD([L, R], lr=lr, damping=lam)
    for _ in range(3):
        L0, R0 = L.detach().clone(), R.detach().clone()
        opt.zero_grad()
        (0.5 * ((L @ R.T - M) ** 2).sum()).backward()
        opt.step()
        E = L0 @ R0.T - M  # grad_L = E R, grad_R = E^T L
        I = torch.eye(2, dtype=torch.float64)
        L_ref = L0 - lr * torch.linalg.solve(R0.T @ R0 + lam * I, (E @ R0).T).T
        R_ref = R0 - lr * torch.linalg.solve(L0.T @ L0 + lam * I, (E.T @ L0).T).T
        torch.testing.assert_close(L.detach(), L_ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(R.detach(), R_ref, rtol=1e-12, atol=1e-13)
    S = _rand(6, 6, seed=6)
    S = S @ S.T
    Y = _rand(6, 3, seed=7).requires_grad_()
    opt = ScaledGD([Y], lr=lr, damping=lam)
    Y0 = Y.detach().clone()
    opt.zero_grad()
    (0.25 * ((Y @ Y.T - S) ** 2).sum()).backward()
    opt.step()
    G = (Y0 @ Y0.T - S) @ Y0
    ref = Y0 - lr * G @ torch.linalg.inv(Y0.T @ Y0 + lam * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Y.detach(), ref, rtol=1e-12, atol=1e-13)


def test_scaled_gd_is_invariant_to_factor_rebalancing():
    """With lambda = 0 the iterates X = L R^T do not depend on L -> L Q, R -> R Q^{-T} (Tong et al.)."""
    P = matrix_sensing_problem(12, 2, 5, seed=0)
    L0, R0 = spectral_init(P, 2)
    Q = torch.tensor([[3.0, 1.0], [0.0, 0.2]], dtype=torch.float64)
    a = scaled_gd(P, 2, maxiter=15, tol=0, init=(L0, R0))
    b = scaled_gd(P, 2, maxiter=15, tol=0, init=(L0 @ Q, R0 @ torch.linalg.inv(Q).T))
    torch.testing.assert_close(a.X, b.X, rtol=1e-9, atol=1e-11)
    # GD is not invariant: the unbalanced start changes its iterates
    c = factored_gd(P, 2, maxiter=15, tol=0, init=(L0, R0))
    d = factored_gd(P, 2, maxiter=15, tol=0, init=(L0 @ Q, R0 @ torch.linalg.inv(Q).T))
    assert float((c.X - d.X).norm()) > 1e-3


def test_functional_and_optimizer_faces_agree():
    P = matrix_sensing_problem(10, 2, 3, seed=2)
    L0, R0 = spectral_init(P, 2)
    res = scaled_gd(P, 2, eta=0.5, maxiter=6, tol=0, init=(L0, R0))
    L, R = L0.clone().requires_grad_(), R0.clone().requires_grad_()
    opt = ScaledGD([L, R], lr=0.5)
    for _ in range(6):
        opt.zero_grad()
        (0.5 * ((P.A @ (L @ R.T).reshape(-1) - P.y) ** 2).sum()).backward()
        opt.step()
    torch.testing.assert_close(L.detach(), res.L, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(R.detach(), res.R, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- problems
def test_sensing_design_is_near_isometric_and_storage_modes_agree():
    dense = MatrixSensingProblem((6, 5), 3000, X_star=_rand(6, 5, seed=8), seed=3, chunk_size=700)
    lazy = MatrixSensingProblem((6, 5), 3000, X_star=_rand(6, 5, seed=8), seed=3, chunk_size=700,
                                storage="on_the_fly")
    X = _rand(6, 5, seed=9)
    torch.testing.assert_close(lazy.apply(X), dense.apply(X), rtol=1e-12, atol=1e-12)
    r = _rand(3000, seed=10)
    torch.testing.assert_close(lazy.adjoint(r), dense.adjoint(r), rtol=1e-12, atol=1e-12)
    # entries N(0, 1/m): E ||A(X)||^2 = ||X||^2, relative std sqrt(2/m) for a fixed X
    ratio = float(dense.apply(X).norm() ** 2 / X.norm() ** 2)
    assert abs(ratio - 1) < 5 * math.sqrt(2 / 3000)
    entries = dense.A.reshape(-1)
    assert abs(float(entries.var()) * 3000 - 1) < 5 * math.sqrt(2 / entries.numel())
    # adjoint: <A(X), r> = <X, A*(r)>
    assert float(dense.apply(X) @ r) == pytest.approx(float((X * dense.adjoint(r)).sum()), rel=1e-12)


def test_batched_products_shared_design_and_loss_and_gradient():
    P = MatrixSensingProblem((6, 5), 400, X_star=_rand(6, 5, seed=1), seed=4, chunk_size=150)
    lazy = MatrixSensingProblem((6, 5), 400, X_star=_rand(6, 5, seed=1), seed=4, chunk_size=150, storage="on_the_fly")
    Xs, rs = _rand(3, 6, 5, seed=2), _rand(3, 400, seed=3)
    for prob in (P, lazy):  # a stack of k is k single products, for both storages
        torch.testing.assert_close(prob.apply(Xs), torch.stack([P.A @ X.reshape(-1) for X in Xs]),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(prob.adjoint(rs), torch.stack([(r @ P.A).reshape(6, 5) for r in rs]),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="Dimension mismatch"):
        P.adjoint(_rand(3, 399, seed=0))
    # (f, grad f) at once: the loss and gradient computed separately, and 1/2 ||A(X) - y||^2 by hand
    X = _rand(6, 5, seed=5)
    f, Z = P.loss_and_gradient(X)
    assert f == pytest.approx(0.5 * float(((P.A @ X.reshape(-1) - P.y) ** 2).sum()), rel=1e-13)
    torch.testing.assert_close(Z, P.residual_gradient(X), rtol=0, atol=0)
    C = MatrixCompletionProblem(_rand(6, 5, seed=1), p=0.5, seed=0)
    f, Z = C.loss_and_gradient(X)
    assert f == C.loss(X) and torch.equal(Z, C.residual_gradient(X))
    # a family shares ONE design tensor, the one each problem would draw alone
    fam = matrix_sensing_family(8, 2, (1, 5, 20), seed=3)
    assert all(q.A is fam[0].A for q in fam) and len({id(q.y) for q in fam}) == 3
    alone = matrix_sensing_problem(8, 2, 5, seed=3)
    assert torch.equal(alone.A, fam[1].A) and torch.equal(alone.y, fam[1].y)
    with pytest.raises(ValueError, match="same shape, num_measurements"):
        MatrixSensingProblem((8, 8), 81, X_star=_rand(8, 8), seed=4, design=fam[0])  # another m


@pytest.mark.parametrize("psd", [False, True])
def test_lockstep_equals_separate_runs(psd):
    """Eight runs (ScaledGD / GD / ScaledGD(lambda), kappa in 1..20) advanced together give the
    separate runs' iterates, error and loss histories and iteration counts."""
    kappas = (1, 5, 20)
    if psd:
        fam = matrix_sensing_family(12, 2, kappas, num_measurements=500, psd=True, seed=1)
        specs = [dict(eta=0.3, damping=1.0 / k, init="random", init_scale=1e-6, maxiter=200, tol=1e-6) for k in kappas]
        specs += [dict(eta=0.3, init="random", init_scale=1e-6, maxiter=80, tol=1e-6, preconditioned=False)]
        rank = 3
    else:
        fam = matrix_sensing_family(12, 2, kappas, seed=1)
        specs = [dict(eta=0.5, maxiter=300, tol=1e-11, preconditioned=pre) for _ in kappas for pre in (True, False)]
        rank = 2
    runs = [dict(spec, problem=i % len(kappas)) for i, spec in enumerate(specs)]
    together = scaled_gd_lockstep(fam, rank, runs)
    for run, got in zip(runs, together):
        spec = {k: v for k, v in run.items() if k != "problem"}
        want = scaled_gd(fam[run["problem"]], rank, **spec)
        assert (got.nit, got.converged, got.method) == (want.nit, want.converged, want.method)
        assert got.iterations_to(spec["tol"]) == want.iterations_to(spec["tol"])
        for a, b in zip(got.factors, want.factors):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(torch.tensor(got.relative_errors), torch.tensor(want.relative_errors),
                                   rtol=1e-7, atol=1e-13)
        # every loss is 1/2 ||A(X_t) - y||^2 of that iterate (filled in from the next gradient's residual)
        torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-6, atol=1e-24)
    assert any(r.converged for r in together) and not all(r.nit == together[0].nit for r in together)
    with pytest.raises(ValueError, match="share one design"):
        scaled_gd_lockstep([fam[0], matrix_sensing_problem(12, 2, 5, seed=2, psd=psd,
                                                           num_measurements=fam[0].m)], rank, runs)
    with pytest.raises(ValueError, match="'problem'"):
        scaled_gd_lockstep(fam, rank, [dict(eta=0.5)])


def test_ground_truth_and_spectral_init():
    X, L, R, s = low_rank_ground_truth(30, 20, 4, kappa=10, seed=1)
    sv = torch.linalg.svdvals(X)[:5]
    torch.testing.assert_close(sv[:4], torch.linspace(1, 0.1, 4, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert float(sv[4]) < 1e-12
    torch.testing.assert_close(L @ R.T, X)
    # full observation (p = 1): the spectral initialization is exact
    C = MatrixCompletionProblem(X, p=1.0)
    L0, R0 = spectral_init(C, 4)
    torch.testing.assert_close(L0 @ R0.T, X, rtol=1e-10, atol=1e-12)


def test_bad_input_raises():
    L, R = torch.zeros(5, 3, requires_grad=True), torch.zeros(6, 2, requires_grad=True)
    with pytest.raises(ValueError, match="Mismatched factor shapes"):
        ScaledGD([L, R])
    with pytest.raises(ValueError, match="Invalid damping"):
        ScaledGD([L], damping=-0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ScaledGD([L], lr=-1.0)
    y = torch.ones(20, dtype=torch.float64)
    y[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        MatrixSensingProblem((3, 3), 20, y=y)
    with pytest.raises(ValueError, match="Dimension mismatch"):
        MatrixSensingProblem((3, 3), 20, y=torch.ones(19, dtype=torch.float64))
    P = matrix_sensing_problem(8, 2, 2, seed=0)
    with pytest.raises(ValueError, match="mismatched factor shapes"):
        scaled_gd(P, 2, init=(torch.zeros(8, 2, dtype=torch.float64), torch.zeros(8, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="damping"):
        scaled_gd(P, 2, damping=-1.0)
    with pytest.raises(ValueError, match="eta"):
        scaled_gd(P, 2, eta=-0.5)
    # a singular Gram matrix without damping, and a NaN gradient: nothing is written
    Z = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    W = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    opt = ScaledGD([Z, W], lr=0.1)
    Z.grad, W.grad = torch.ones(4, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        opt.step()
    A = _rand(4, 2, seed=1).requires_grad_()
    opt = ScaledGD([A], lr=0.1, damping=0.1)
    A0 = A.detach().clone()
    A.grad = torch.full((4, 2), float("nan"), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        opt.step()
    assert torch.equal(A.detach(), A0)


# ------------------------------------------------------- Figure 2, reduced sizes
def _iterations(problem_fn, rank, maxiter_gd):
    out = {}
    for kappa in KAPPAS:
        P = problem_fn(kappa)
        s = scaled_gd(P, rank, eta=0.5, maxiter=600, tol=1e-10)
        g = factored_gd(P, rank, eta=0.5, maxiter=maxiter_gd, tol=1e-10)
        out[kappa] = (s.iterations_to(1e-10), g.iterations_to(1e-10))
    return out


def _check_figure2(its, maxiter_gd):
    sgd = [its[k][0] for k in KAPPAS]
    gd = [its[k][1] if its[k][1] is not None else maxiter_gd + 1 for k in KAPPAS]
    assert all(s is not None for s in sgd), its
    assert max(sgd) <= 1.15 * min(sgd), its  # ScaledGD: nearly the same for every kappa
    assert all(b > a for a, b in zip(gd, gd[1:])), its  # GD: grows with kappa
    assert gd[-1] >= 4 * sgd[-1], its  # and is several times slower at kappa = 20
    assert gd[0] <= 1.5 * sgd[0], its  # while at kappa = 1 the two are alike


def test_figure2_sensing_reduced():
    its = _iterations(lambda k: matrix_sensing_problem(30, 3, k, seed=0), 3, 1500)
    _check_figure2(its, 1500)


def test_figure2_completion_reduced():
    its = _iterations(lambda k: matrix_completion_problem(200, 5, k, p=0.2, seed=0), 5, 1500)
    _check_figure2(its, 1500)


# ------------------------------------------------------- Figure 2, published sizes
@pytest.mark.slow
def test_figure2_sensing_published_size():
    """n = 200, r = 10, m = 5nr = 10 000: one dense float64 design (3.2 GB) for all kappas, the
    eight runs in lockstep, to the authors' tolerance 1e-14 (about half an hour on 2 cores)."""
    fam = matrix_sensing_family(200, 10, KAPPAS, seed=0)
    res = scaled_gd_lockstep(fam, 10, [dict(problem=i, eta=0.5, maxiter=1000, tol=1e-14, preconditioned=pre)
                                       for i in range(len(KAPPAS)) for pre in (True, False)])
    its = {k: (res[2 * i].iterations_to(1e-14), res[2 * i + 1].iterations_to(1e-14)) for i, k in enumerate(KAPPAS)}
    print("sensing n=200 iterations to 1e-14 (ScaledGD, GD):", its)
    sgd = [its[k][0] for k in KAPPAS]
    assert None not in sgd and max(sgd) <= 1.15 * min(sgd), its  # ScaledGD: kappa-independent
    assert its[1][1] is not None and its[1][1] <= 1.5 * sgd[0], its  # GD alike at kappa = 1
    assert all(its[k][1] is None for k in KAPPAS[1:]), its  # and not within 1000 for kappa >= 5
    gd_final = [res[2 * i + 1].relative_errors[-1] for i in range(1, len(KAPPAS))]
    assert all(b > 10 * a for a, b in zip(gd_final, gd_final[1:])), gd_final  # GD slows down with kappa


@pytest.mark.slow
def test_figure2_completion_published_size():
    its = _iterations(lambda k: matrix_completion_problem(1000, 10, k, p=0.2, seed=0), 10, 1000)
    print("completion n=1000 iterations to 1e-10 (ScaledGD, GD):", its)
    _check_figure2(its, 1000)


# ----------------------------------------------------- ScaledGD(lambda), overparameterized
@pytest.mark.parametrize("kappa", [10, 100])
def test_scaled_gd_lambda_overparameterized_psd_sensing(kappa):
    """r = 2, r' = 3, small random init alpha = 1e-12 (Xu et al. 2023; notes R3: the error floor
    from the spurious direction scales with alpha), lambda = sigma_min(M*), eta = 0.3; GD uses 0.3 / sigma_max."""
    P = matrix_sensing_problem(10, 2, kappa, num_measurements=4000, psd=True, seed=0)
    s = scaled_gd(P, 3, eta=0.3, damping=1.0 / kappa, init="random", init_scale=1e-12, maxiter=400, tol=1e-8)
    g = factored_gd(P, 3, eta=0.3, init="random", init_scale=1e-12, maxiter=1200, tol=1e-8)
    assert s.converged and s.relative_errors[-1] <= 1e-8
    gd_its = g.iterations_to(1e-8) or 1201
    assert gd_its >= 5 * s.nit, (s.nit, gd_its, g.relative_errors[-1])
    # the spurious third direction stays at the initialization's scale
    sv = torch.linalg.svdvals(s.factors[0])
    assert float(sv[2]) < 1e-6


@pytest.mark.slow
def test_scaled_gd_lambda_published_size_needs_enough_measurements():
    """n = 100, r* = 3, r' = 5, kappa = 100, alpha = 1e-12, eta = 0.3, 1000 iterations (the
    REPRODUCTIONS.md stall study).  At m = 10 n r* = 3000 the two overparameterized directions
    grow out of the small initialization and then shrink only at the sublinear rate
    s^2 ~ lambda / (2 eta t): the final error is set by lambda, not by the initialization.  At
    m = 40 n r* = 12 000 they stay near the initialization and the run reaches 1e-8."""
    T, eta, sigma_min = 1000, 0.3, 0.01
    for m, lams in ((3000, (1.0, 0.1)), (12000, (1.0,))):
        (P,) = matrix_sensing_family(100, 3, (100,), num_measurements=m, psd=True, seed=0)
        res = scaled_gd_lockstep([P], 5, [dict(problem=0, eta=eta, damping=lam * sigma_min, init="random",
                                               init_scale=1e-12, maxiter=T, tol=1e-8) for lam in lams])
        for lam, r in zip(lams, res):
            extra = torch.linalg.svdvals(r.factors[0])[3:] ** 2  # eigenvalues 4, 5 of Y^T Y
            if m == 3000:
                assert not r.converged
                assert 0.5 <= float(extra[0]) / (lam * sigma_min / (2 * eta * T)) <= 3, (lam, extra)
            else:
                assert r.converged and float(extra[0]) < 1e-9, (r.relative_errors[-1], extra)
