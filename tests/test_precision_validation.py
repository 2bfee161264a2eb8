"""Low precision and input validation of the estimators and explicit operators (issue 11, items 16-18).

Truth: eigenvalues of the *stored* low-precision matrix computed in float64
(``eigvalsh(A_lowp.double())``), float64 Hessians of the same model by double backward,
closed forms (a point spectrum integrates to one), and plain numpy copies.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from curvature.__main__ import main
from curvature import CallableOperator, ConvergenceWarning, DenseOperator, HessianOperator
from dense_truth import dense_hessian
from estimators import (
    hutchinson_diagonal, hutchinson_trace, hutchpp_trace, lanczos, power_iteration,
    spectral_density, top_eigenvalues, xdiag, xtrace,
)
from estimators.default_problem import default_problem
from models import make_case
from spectra import operator_with_spectrum


def _lam(n=200):
    lam = torch.linspace(0, 1, n, dtype=torch.float64)
    lam[-1], lam[-2] = 2.0, 1.5
    return lam


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_converged_means_what_it_says(dtype):
    op64, _ = operator_with_spectrum(_lam(), seed=0)
    A = op64.matrix.to(dtype)
    op = DenseOperator(A, is_symmetric=True)
    truth = torch.linalg.eigvalsh(A.double()).flip(0)[:2]  # the stored matrix's eigenvalues
    with pytest.warns(ConvergenceWarning, match="attainable accuracy"):
        res = top_eigenvalues(op, 2, tol=1e-4)
    assert not bool(res.converged.any())  # 1e-4 is below what 16-bit products can show
    err = (res.eigenvalues.double() - truth).abs()
    assert bool((err <= res.error_bounds.double()).all()), (err, res.error_bounds)
    # a tolerance above the rounding converges, and the bound still holds
    ok = top_eigenvalues(op, 2, tol=0.1)
    assert ok.all_converged
    err = (ok.eigenvalues.double() - truth).abs()
    assert bool((err <= ok.error_bounds.double()).all())
    assert bool((err <= 0.1 * truth).all())


def test_float32_bounds_include_the_products_rounding():
    """Dense float32 truth: the bound covers the error and is not the float64-style 1e-14."""
    model, loss_fn, (X, y) = make_case("mlp", n=12)
    H64 = dense_hessian(model, loss_fn, X, y)
    truth = torch.linalg.eigvalsh(H64).flip(0)[:3]
    m32 = copy.deepcopy(model).float()
    op = HessianOperator(m32, loss_fn, (X.float(), y))
    res = top_eigenvalues(op, 3, tol=1e-4, seed=0)
    err = (res.eigenvalues.double() - truth).abs()
    u = torch.finfo(torch.float32).eps / 2
    assert res.all_converged
    assert bool((err <= res.error_bounds.double()).all()), (err, res.error_bounds)
    assert bool((res.error_bounds.double() >= u * float(truth[0])).all())
    # power iteration's bounds carry the rounding too
    p = power_iteration(op, 1, tol=1e-4, seed=0)
    assert abs(float(p.eigenvalues[0]) - float(truth[0])) <= float(p.error_bounds[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_density_lanczos_and_traces_run_in_float32(dtype):
    op64, _ = operator_with_spectrum(_lam(120), seed=1)
    A = op64.matrix.to(dtype)
    op = DenseOperator(A, is_symmetric=True)
    A64 = A.double()
    dens = spectral_density(op, 4, 20, seed=0)
    assert dens.nodes.dtype == torch.float32
    mom, se = dens.moments(2)
    exact = torch.stack([torch.trace(torch.linalg.matrix_power(A64, j)) / 120 for j in range(3)])
    assert bool(((mom.double() - exact).abs() <= 5 * se.double() + 0.05 * exact.abs()).all()), (mom, exact)
    lz = lanczos(op, 10, seed=0)
    Q = lz.basis.double()
    assert torch.allclose(Q.T @ Q, torch.eye(10, dtype=torch.float64), atol=1e-5)
    tr = float(torch.trace(A64))
    for est in (hutchinson_trace(op, 60, seed=0), hutchpp_trace(op, 60, seed=0), xtrace(op, 60, seed=0)):
        assert est.estimate.dtype == torch.float32
        assert abs(float(est.estimate) - tr) <= 5 * float(est.std_error) + 0.05 * abs(tr)
    d = hutchinson_diagonal(op, 30, seed=0)
    x = xdiag(op, 40, seed=0)
    assert d.estimate.dtype == torch.float32 and x.estimate.dtype == torch.float32


def test_default_problem_trains_in_float16():
    prob = default_problem(num_samples=200, steps=20, dtype=torch.float16)
    ps = list(prob.model.parameters())
    assert ps[0].dtype == torch.float16 and all(bool(torch.isfinite(p).all()) for p in ps)
    assert math.isfinite(prob.train_loss) and prob.data[0].dtype == torch.float16


@pytest.mark.parametrize("value", [2.0, 0.5])
def test_point_spectrum_density_integrates_to_one(value):
    op = DenseOperator(value * torch.eye(50, dtype=torch.float64))
    dens = spectral_density(op, 3, 10, seed=0)
    sigma = dens.default_sigma()
    assert sigma >= 1e-5 * value  # relative to the spectrum's scale, not its rounding spread
    grid, phi = dens.evaluate()
    assert abs(float(torch.trapezoid(phi, grid)) - 1.0) < 1e-3
    assert abs(float(grid[phi.argmax()]) - value) < 2 * sigma
    zero = spectral_density(DenseOperator(torch.zeros(20, 20, dtype=torch.float64)), 2, 5)
    g0, p0 = zero.evaluate()
    assert zero.default_sigma() == 1e-3 and abs(float(torch.trapezoid(p0, g0)) - 1.0) < 1e-3


def test_integer_and_seed_arguments_are_validated():
    op, _ = operator_with_spectrum(torch.linspace(1, 2, 30, dtype=torch.float64), seed=0)
    for bad in (2.7, True, "2"):
        with pytest.raises(TypeError, match="k must be an integer"):
            top_eigenvalues(op, bad)
        with pytest.raises(TypeError, match="k must be an integer"):
            power_iteration(op, bad)
    with pytest.raises(TypeError, match="num_probes"):
        hutchinson_trace(op, 10.0)
    with pytest.raises(TypeError, match="num_steps"):
        spectral_density(op, 2, 5.5)
    with pytest.raises(TypeError, match="block_size"):
        hutchinson_diagonal(op, 4, block_size=True)
    with pytest.raises(ValueError, match="rtol"):
        hutchinson_trace(op, 20, rtol=-1)
    with pytest.raises(ValueError, match="atol"):
        hutchinson_trace(op, 20, atol=float("nan"))
    with pytest.raises(ValueError, match="tol"):
        top_eigenvalues(op, 1, tol=-1e-3)
    with pytest.raises(TypeError, match="seed"):
        hutchinson_trace(op, 4, seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        top_eigenvalues(op, 1, seed=True)
    with pytest.raises(ValueError, match=r"seed must lie in"):
        spectral_density(op, 2, 5, seed=2**70)
    from estimators import sharpness

    with pytest.raises(TypeError, match="k must be an integer"):
        sharpness(op, k=2.7)
    # integer-valued numpy / torch seeds are integers
    a = hutchinson_trace(op, 8, seed=np.int64(3))
    b = hutchinson_trace(op, 8, seed=torch.tensor(3))
    c = hutchinson_trace(op, 8, seed=3)
    assert torch.equal(a.samples, c.samples) and torch.equal(b.samples, c.samples) and a.seed == 3


def test_power_iteration_zero_start_says_so():
    op, _ = operator_with_spectrum(torch.linspace(1, 2, 10, dtype=torch.float64), seed=0)
    with pytest.raises(ValueError, match=r"v0\[:, 0\] is zero"):
        power_iteration(op, 1, v0=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        power_iteration(op, 1, v0=torch.full((10,), float("nan"), dtype=torch.float64))


def test_operators_are_real_floating():
    with pytest.raises(TypeError, match="real floating dtype.*int64"):
        DenseOperator(torch.eye(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="Complex operators are not supported"):
        DenseOperator(torch.eye(3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="real floating dtype"):
        CallableOperator(lambda X: X, (3, 3), dtype=torch.int32)
    op = DenseOperator(torch.eye(3, dtype=torch.float64) * 2)
    S = op.to_scipy()
    assert S.dtype == np.float64
    assert np.array_equal(S.matvec(np.ones(3)), 2 * np.ones(3))
    with pytest.raises(TypeError, match="imaginary"):
        S.matvec(np.ones(3) * 1j)


def test_callable_operator_output_shape_is_checked():
    bad = CallableOperator(lambda X: X[:-1], (5, 5), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must return \[5, 2\]"):
        bad @ torch.ones(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="must return"):
        bad.to_dense()
    wrong_dtype = CallableOperator(lambda X: X.float(), (5, 5), dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        wrong_dtype @ torch.ones(5, dtype=torch.float64)


def test_negative_stride_numpy_input():
    A = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    op = DenseOperator(A)
    x = np.arange(8.0)[::-2]  # negative stride
    assert np.array_equal(op @ x, A.numpy() @ x.copy())
    X = np.arange(16.0).reshape(4, 4)[::-1, ::-1]
    assert np.allclose(op @ X, A.numpy() @ X.copy(), rtol=0, atol=0)
    assert np.array_equal(op.to_scipy().matvec(x), A.numpy() @ x.copy())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_low_precision_dtypes(tmp_path, dtype, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        rc = main(["spectrum", "--fast", "--dtype", dtype, "--tol", "0.1", "--out", str(tmp_path),
                   "--no-progress"])
    assert rc == 0 and (tmp_path / "summary.json").exists()
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    top = summary["top_eigenvalues"]
    assert all(top["converged"]) and all(b > 0 for b in top["error_bounds"])
