"""Lanczos invariants against dense linear algebra (float64)."""

import pytest
import torch

from curvature import CallableOperator, DenseOperator
from estimators import lanczos, lanczos_batched
from spectra import operator_with_spectrum

EPS = torch.finfo(torch.float64).eps


def _op(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.tensor([9.0, 7.0, -6.0]), torch.rand(n - 3, generator=g) * 2 - 1]).double()
    return operator_with_spectrum(lam, seed)[0], lam


def test_basis_orthonormal_and_three_term_relation():
    op, lam = _op()
    m = 40
    res = lanczos(op, m, seed=3)
    Q, T = res.basis, res.tridiagonal()
    assert Q.shape == (120, m) and res.num_matvecs == m
    assert (Q.T @ Q - torch.eye(m, dtype=Q.dtype)).abs().max() < 100 * EPS * m
    A = op.matrix
    e_m = torch.zeros(m, dtype=Q.dtype)
    e_m[-1] = 1
    remainder = A @ Q - Q @ T - res.betas[-1] * torch.outer(res.next_vector, e_m)
    assert remainder.norm() < 100 * EPS * torch.linalg.matrix_norm(A, 2) * m
    assert (Q.T @ A @ Q - T).abs().max() < 100 * EPS * lam.abs().max() * m
    assert abs(float(res.next_vector @ Q[:, -1])) < 100 * EPS * m


def test_ritz_values_interlace_true_eigenvalues():
    op, lam = _op(seed=1)
    n, m = 120, 25
    theta = torch.linalg.eigvalsh(lanczos(op, m, seed=1).tridiagonal()).flip(0)  # descending
    ev = torch.sort(lam, descending=True).values
    tol = 1e-10 * float(ev.abs().max())
    for i in range(m):  # Cauchy interlacing: lambda_{i+n-m} <= theta_i <= lambda_i
        assert ev[i + n - m] - tol <= theta[i] <= ev[i] + tol


def test_invariant_subspace_stops_early_with_exact_ritz_values():
    lam = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, -2.0, 0.5, 0.5] * 5, dtype=torch.float64)
    op, _ = operator_with_spectrum(lam, 2)
    res = lanczos(op, 30, seed=0)
    assert res.num_steps == 4  # four distinct eigenvalues: the Krylov space is invariant
    assert float(res.betas[-1]) == 0.0 and float(res.next_vector.abs().max()) == 0.0
    theta, _ = res.ritz()
    assert torch.allclose(theta, torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=torch.float64), atol=1e-12)


def test_batched_processes_match_single_runs_and_use_block_products():
    op, _ = _op(seed=4)
    V0 = torch.randn(120, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []
    wrapped = CallableOperator(lambda X: (calls.append(X.shape[1]), op.matrix @ X)[1], op.shape,
                               dtype=op.dtype, is_symmetric=True)
    alphas, betas, lengths, _ = lanczos_batched(wrapped, V0, 15)
    assert calls == [3] * 15 and wrapped.num_matvecs == 45
    for i in range(3):
        single = lanczos(op, 15, v0=V0[:, i])
        assert torch.allclose(alphas[i], single.alphas, atol=1e-12)
        assert torch.allclose(betas[i], single.betas, atol=1e-12)


def test_without_reorthogonalization_tridiagonal_still_matches_early_steps():
    op, _ = _op(seed=5)
    v0 = torch.ones(120, dtype=torch.float64)
    a1, b1, _, _ = lanczos_batched(op, v0[:, None], 8, reorthogonalize=False)
    full = lanczos(op, 8, v0=v0)
    assert torch.allclose(a1[0], full.alphas, atol=1e-10)
    assert torch.allclose(b1[0], full.betas, atol=1e-10)


def test_reproducible_and_seed_dependent():
    op, _ = _op()
    a = lanczos(op, 10, seed=7)
    b = lanczos(op, 10, seed=7)
    c = lanczos(op, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.alphas, b.alphas) and a.seed == 7
    assert not torch.allclose(a.alphas, c.alphas) and c.seed is None


def test_bad_input():
    op, _ = _op()
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(DenseOperator(torch.randn(5, 5, dtype=torch.float64), is_symmetric=False), 3)
    with pytest.raises(ValueError, match="square"):
        lanczos(DenseOperator(torch.randn(5, 4, dtype=torch.float64)), 3)
    with pytest.raises(ValueError, match="num_steps"):
        lanczos(op, 0)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(op, 3, v0=torch.zeros(120, dtype=torch.float64))
    nan_op = CallableOperator(lambda X: X * float("nan"), (6, 6), dtype=torch.float64, is_symmetric=True)
    with pytest.raises(FloatingPointError, match="NaN"):
        lanczos(nan_op, 3)
