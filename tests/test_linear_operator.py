"""The LinearOperator contract, checked against dense matrices (float64)."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import curvature as C

DT = torch.float64


def _random(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def _spd(n, seed, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    lam = torch.logspace(0, np.log10(cond), n, dtype=DT)
    return Q @ torch.diag(lam) @ Q.T


def _sym(n, seed):
    A = _random((n, n), seed)
    return A + A.T


# Each case: a lazily built operator and its dense matrix, built independently.
def _cases():
    A, B = _sym(7, 0), _sym(7, 1)
    R = _random((7, 4), 2)
    d = _random((7,), 3)
    S = _random((4, 7), 4)
    return {
        "dense_sym": (lambda: C.DenseOperator(A), A),
        "dense_rect": (lambda: C.DenseOperator(R), R),
        "diagonal": (lambda: C.DiagonalOperator(d), torch.diag(d)),
        "identity": (lambda: C.IdentityOperator(7, dtype=DT), torch.eye(7, dtype=DT)),
        "sum": (lambda: C.DenseOperator(A) + C.DenseOperator(B), A + B),
        "difference": (lambda: C.DenseOperator(A) - C.DiagonalOperator(d), A - torch.diag(d)),
        "scaled": (lambda: 2.5 * C.DenseOperator(A), 2.5 * A),
        "divided": (lambda: C.DenseOperator(A) / 4, A / 4),
        "negated": (lambda: -C.DenseOperator(R), -R),
        "composition": (lambda: C.DenseOperator(R) @ C.DenseOperator(S), R @ S),
        "transpose": (lambda: C.DenseOperator(R).T, R.T),
        "transpose_of_product": (lambda: (C.DenseOperator(R) @ C.DenseOperator(S)).T, (R @ S).T),
        "damped": (lambda: C.DenseOperator(A).damped(0.3), A + 0.3 * torch.eye(7, dtype=DT)),
        "block_diagonal": (
            lambda: C.BlockDiagonalOperator([C.DenseOperator(A[:3, :3]), C.DiagonalOperator(d[3:])]),
            torch.block_diag(A[:3, :3], torch.diag(d[3:])),
        ),
        "callable": (
            lambda: C.CallableOperator(lambda X: R @ X, (7, 4), dtype=DT, rmatmat=lambda X: R.T @ X),
            R,
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_products_match_dense(name):
    make, M = CASES[name]
    op = make()
    m, n = M.shape
    assert op.shape == (m, n)
    v = _random((n,), 10)
    V = _random((n, 3), 11)
    torch.testing.assert_close(op @ v, M @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op @ V, M @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.matvec(v), M @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), M, rtol=1e-12, atol=1e-12)
    # numpy in, numpy out
    np.testing.assert_allclose(op @ v.numpy(), (M @ v).numpy(), rtol=1e-12, atol=1e-12)
    # left multiplication v^T A
    w = _random((m,), 12)
    torch.testing.assert_close(w @ op, w @ M, rtol=1e-12, atol=1e-12)
    if m == n:
        torch.testing.assert_close(op.diagonal(), torch.diagonal(M), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_to_scipy_matches_dense(name):
    make, M = CASES[name]
    sp = make().to_scipy()
    n = M.shape[1]
    x = np.random.default_rng(0).standard_normal(n)
    X = np.random.default_rng(1).standard_normal((n, 2))
    np.testing.assert_allclose(sp @ x, M.numpy() @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sp.matmat(X), M.numpy() @ X, rtol=1e-12, atol=1e-12)
    y = np.random.default_rng(2).standard_normal(M.shape[0])
    np.testing.assert_allclose(sp.rmatvec(y), M.numpy().T @ y, rtol=1e-12, atol=1e-12)


def test_eigsh_on_scipy_view_reproduces_eigvalsh():
    A = _sym(40, 5)
    op = C.DenseOperator(A)
    vals = spla.eigsh(op.to_scipy(), k=4, which="LA", tol=1e-12)[0]
    np.testing.assert_allclose(np.sort(vals), torch.linalg.eigvalsh(A)[-4:].numpy(), rtol=1e-10)


def test_scipy_cg_and_lsmr_on_scipy_view():
    P = _spd(30, 6)
    b = _random((30,), 7)
    x_true = torch.linalg.solve(P, b).numpy()
    x, info = spla.cg(C.DenseOperator(P).to_scipy(), b.numpy(), rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(x, x_true, rtol=1e-8)
    R = _random((30, 10), 8)
    y = _random((30,), 9)
    x_ls = spla.lsmr(C.DenseOperator(R).to_scipy(), y.numpy(), atol=1e-14, btol=1e-14)[0]
    np.testing.assert_allclose(x_ls, torch.linalg.lstsq(R, y.unsqueeze(1)).solution.squeeze(1).numpy(), rtol=1e-8)


def test_symmetry_flags_propagate():
    A = C.DenseOperator(_sym(5, 0))
    R = C.DenseOperator(_random((5, 5), 1))
    assert A.is_symmetric and not R.is_symmetric
    assert (A + A).is_symmetric and (3 * A).is_symmetric and A.damped(1.0).is_symmetric
    assert not (A + R).is_symmetric
    assert not (A @ A).is_symmetric  # composition is not assumed symmetric


def test_num_matvecs_counts_columns():
    A = C.DenseOperator(_sym(6, 0))
    A @ _random((6,), 1)
    A @ _random((6, 4), 2)
    assert A.num_matvecs == 5
    S = A + A
    S @ _random((6, 3), 3)
    assert S.num_matvecs == 3 and A.num_matvecs == 5 + 6
    A.reset_num_matvecs()
    assert A.num_matvecs == 0


def test_param_format_round_trip():
    shapes = [torch.Size([2, 3]), torch.Size([3]), torch.Size([])]
    M = _sym(10, 4)
    op = C.DenseOperator(M, param_shapes=shapes)
    v = _random((10,), 5)
    pv = C.unflatten(v, shapes)
    assert [p.shape for p in pv] == shapes
    out = op @ pv
    assert [o.shape for o in out] == shapes
    torch.testing.assert_close(C.flatten(out, shapes), M @ v)
    V = _random((10, 2), 6)
    outV = op @ C.unflatten(V, shapes)
    assert [o.shape for o in outV] == [s + (2,) for s in shapes]
    torch.testing.assert_close(C.flatten(outV, shapes), M @ V)
    with pytest.raises(ValueError, match="shape"):
        op @ [torch.zeros(3, 2, dtype=DT), torch.zeros(3, dtype=DT), torch.zeros((), dtype=DT)]
    with pytest.raises(ValueError, match="Expected 3"):
        op @ [torch.zeros(2, 3, dtype=DT)]


def test_input_validation_errors():
    op = C.DenseOperator(_sym(4, 0))
    with pytest.raises(ValueError, match="Dimension mismatch"):
        op @ torch.zeros(5, dtype=DT)
    with pytest.raises(ValueError, match="Dimension mismatch"):
        op @ torch.zeros(4, 2, 1, dtype=DT)
    with pytest.raises(TypeError, match="dtype mismatch"):
        op @ torch.zeros(4, dtype=torch.float32)
    with pytest.raises(ValueError, match="Device mismatch"):
        op @ torch.zeros(4, dtype=DT, device="meta")
    with pytest.raises(ValueError, match="Shape mismatch"):
        op + C.DenseOperator(_sym(5, 1))
    with pytest.raises(ValueError, match="Shape mismatch"):
        op @ C.DenseOperator(_random((5, 5), 1))
    with pytest.raises(TypeError, match="dtype mismatch"):
        op + C.IdentityOperator(4, dtype=torch.float32)
    with pytest.raises(ZeroDivisionError):
        op / 0
    with pytest.raises(TypeError, match="no parameter shapes"):
        op @ [torch.zeros(4, dtype=DT)]


def test_nan_in_product_raises():
    M = _sym(3, 0)
    M[0, 0] = float("nan")
    op = C.DenseOperator(M, is_symmetric=True)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        op @ torch.ones(3, dtype=DT)
    op.check_finite = False
    assert torch.isnan(op @ torch.ones(3, dtype=DT)).any()


@pytest.mark.parametrize("method", ["cg", "dense", "auto"])
def test_solve_reaches_requested_residual(method):
    P = _spd(25, 1, cond=100.0)
    op = C.DenseOperator(P) + 0.0 * C.IdentityOperator(25, dtype=DT)  # hide the exact solve
    b = _random((25,), 2)
    x = op.solve(b, method=method, tol=1e-10)
    assert torch.linalg.vector_norm(P @ x - b) <= 1e-10 * torch.linalg.vector_norm(b) * 1.0001
    B = _random((25, 3), 3)
    X = op.solve(B, method=method, tol=1e-10)
    assert (torch.linalg.vector_norm(P @ X - B, dim=0) <= 1e-10 * torch.linalg.vector_norm(B, dim=0) * 1.0001).all()


def test_damped_cg_solve_matches_dense_inverse_and_reports():
    A = _spd(20, 4, cond=1e3)
    lam = 0.5
    op = C.DenseOperator(A).damped(lam)
    b = _random((20,), 5)
    x, info = op.solve(b, method="cg", tol=1e-12, full_output=True)
    torch.testing.assert_close(x, torch.linalg.solve(A + lam * torch.eye(20, dtype=DT), b), rtol=1e-9, atol=1e-12)
    # n iterations suffice in exact arithmetic; rounding costs a few more at tol=1e-12
    assert info.converged and info.num_iterations <= 3 * 20
    assert info.num_matvecs == info.num_iterations
    assert info.residual_norms.item() <= 1e-12 * torch.linalg.vector_norm(b).item() * 1.0001


def test_cg_reports_non_convergence_honestly():
    A = _spd(50, 6, cond=1e6)
    op = C.DenseOperator(A) + 0.0 * C.IdentityOperator(50, dtype=DT)
    b = _random((50,), 7)
    with pytest.warns(C.ConvergenceWarning, match="stopped after 3 iterations"):
        x, info = op.solve(b, method="cg", tol=1e-12, maxiter=3, full_output=True)
    assert not info.converged and info.num_iterations == 3
    true_res = torch.linalg.vector_norm(A @ x - b)
    torch.testing.assert_close(info.residual_norms[0], true_res, rtol=1e-6, atol=1e-12)


def test_cg_with_preconditioner_and_warm_start():
    A = _spd(40, 8, cond=1e4)
    D = torch.diag(torch.logspace(0, 3, 40, dtype=DT))
    M = D @ A @ D  # badly scaled; Jacobi preconditioning fixes the scaling
    op = C.DenseOperator(M) + 0.0 * C.IdentityOperator(40, dtype=DT)
    b = _random((40,), 9)
    jacobi = C.DiagonalOperator(torch.diagonal(M)).inverse()
    x_plain, i_plain = op.solve(b, method="cg", tol=1e-10, full_output=True, maxiter=2000)
    x_pre, i_pre = op.solve(b, method="cg", tol=1e-10, full_output=True, preconditioner=jacobi)
    x_true = torch.linalg.solve(M, b)
    torch.testing.assert_close(x_pre, x_true, rtol=1e-6, atol=1e-9)
    assert i_pre.num_iterations < i_plain.num_iterations
    x_warm, i_warm = op.solve(b, method="cg", tol=1e-10, full_output=True, x0=x_pre, preconditioner=jacobi)
    assert i_warm.num_iterations <= 2


def test_exact_solves_and_inverse_operator():
    d = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    D = C.DiagonalOperator(d)
    b = torch.tensor([1.0, 1.0, 1.0], dtype=DT)
    torch.testing.assert_close(D.solve(b, method="exact"), b / d)
    torch.testing.assert_close((2 * D).solve(b), b / (2 * d))
    torch.testing.assert_close(D.inverse() @ b, b / d)
    torch.testing.assert_close(D.inverse().to_dense(), torch.diag(1 / d))
    A = _spd(6, 3)
    inv = C.DenseOperator(A).inverse()
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(A), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no exact solve"):
        (C.DenseOperator(A) + C.DenseOperator(A)).solve(torch.ones(6, dtype=DT), method="exact")
    R = C.DenseOperator(_random((6, 6), 1))
    with pytest.raises(ValueError, match="symmetric positive definite"):
        (R + R).solve(torch.ones(6, dtype=DT), method="cg")


def test_block_diagonal_names_and_solve():
    A = _spd(4, 0)
    d = torch.tensor([2.0, 3.0], dtype=DT)
    op = C.BlockDiagonalOperator([C.DenseOperator(A), C.DiagonalOperator(d)], names=["layer1", "layer2"])
    assert op.names == ["layer1", "layer2"] and op.sizes == [4, 2]
    b = _random((6,), 1)
    dense = torch.block_diag(A, torch.diag(d))
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(dense, b), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not square"):
        C.BlockDiagonalOperator([C.DenseOperator(_random((2, 3), 0))])


def test_function_hessian_matches_closed_form_and_fd():
    # f(x) = sum(x^4)/4 + x0 x1 + log(1 + exp(a^T x))
    a = _random((5,), 0)

    def f(x):
        return (x**4).sum() / 4 + x[0] * x[1] + torch.nn.functional.softplus(a @ x)

    x = _random((5,), 1)
    H = C.FunctionHessianOperator(f, x)
    s = torch.sigmoid(a @ x)
    closed = torch.diag(3 * x**2) + s * (1 - s) * torch.outer(a, a)
    closed[0, 1] += 1
    closed[1, 0] += 1
    torch.testing.assert_close(H.to_dense(), closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H.gradient, x**3 + s * a + torch.tensor([x[1], x[0], 0, 0, 0], dtype=DT))

    # central finite differences of the gradient
    def grad(z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(f(z), z)[0]

    eps = 1e-5
    fd = torch.stack([(grad(x + eps * e) - grad(x - eps * e)) / (2 * eps) for e in torch.eye(5, dtype=DT)], 1)
    torch.testing.assert_close(H.to_dense(), fd, rtol=1e-7, atol=1e-7)
    # x is not modified, the operator is frozen at x
    x += 1.0
    torch.testing.assert_close(H.to_dense(), closed, rtol=1e-12, atol=1e-12)


def test_function_hessian_errors_and_linear_function():
    with pytest.raises(ValueError, match="scalar"):
        C.FunctionHessianOperator(lambda x: x * 2, torch.ones(3, dtype=DT))
    with pytest.raises(TypeError, match="floating-point"):
        C.FunctionHessianOperator(lambda x: x.sum(), torch.ones(3, dtype=torch.int64))
    H = C.FunctionHessianOperator(lambda x: (2 * x).sum(), torch.ones(3, dtype=DT))
    torch.testing.assert_close(H.to_dense(), torch.zeros(3, 3, dtype=DT))


def test_all_finite_decides_by_one_sum_and_falls_back_when_the_sum_overflows():
    from curvature.linear_operator import all_finite

    x = torch.ones(1000)
    assert all_finite(x)
    big = torch.full((10,), 3e38)  # finite entries whose float32 sum overflows: the elementwise check decides
    assert not bool(torch.isfinite(big.sum())) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[7] = bad
        assert not all_finite(y)
        big[3] = bad
        assert not all_finite(big)
        big[3] = 3e38
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # a NaN sum
    assert all_finite(torch.arange(5)) and all_finite(torch.empty(0)) and all_finite(torch.zeros(2, dtype=torch.complex64))
    assert not all_finite(torch.tensor([complex(1.0, float("nan"))]))
    assert all_finite(torch.ones(3, requires_grad=True))
    # several tensors, one read: mixed dtypes, and the non-finite one among finite ones
    assert all_finite(x, torch.ones(2, dtype=torch.float64), torch.arange(3), big)
    assert not all_finite(x, torch.tensor([1.0, float("nan")], dtype=torch.float64)) and all_finite()
