"""Extreme eigenpairs (top_eigenvalues, power_iteration) against torch.linalg.eigvalsh (float64)."""

import warnings

import pytest
import torch

from curvature import CallableOperator, ConvergenceWarning, DenseOperator, HessianOperator
from dense_truth import dense_hessian
from estimators import power_iteration, top_eigenvalues
from models import make_case
from spectra import operator_with_spectrum

EPS = torch.finfo(torch.float64).eps
N = 200


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spectrum(name):
    g = _gen(11)
    bulk = torch.rand(N, generator=g, dtype=torch.float64)
    if name == "clustered":  # five eigenvalues within 1e-3 of each other at the top
        lam = torch.cat([10 + 1e-4 * torch.arange(5.0, dtype=torch.float64), bulk[: N - 5]])
    elif name == "large_gap":
        lam = torch.cat([torch.tensor([1e4, 5e3, 2e3, 1e3, 500.0], dtype=torch.float64), bulk[: N - 5]])
    elif name == "tiny_gap":  # relative gap 1e-7 between the top two
        lam = torch.cat([torch.tensor([5.0, 5.0 - 5e-7, 4.0, 3.9, 3.0], dtype=torch.float64), bulk[: N - 5]])
    elif name == "negative":  # indefinite, the largest magnitudes are negative
        lam = torch.cat([torch.tensor([-20.0, -15.0, 12.0, -9.0, 7.0, 5.0], dtype=torch.float64), 4 * bulk[: N - 6] - 2])
    elif name == "rank_deficient":  # rank 30, PSD
        lam = torch.cat([torch.linspace(1, 8, 30, dtype=torch.float64) ** 2, torch.zeros(N - 30, dtype=torch.float64)])
    else:
        raise ValueError(name)
    return lam


def _truth(lam, which, k):
    if which == "LA":
        return torch.sort(lam, descending=True).values[:k]
    if which == "SA":
        return torch.sort(lam).values[:k]
    return lam[torch.argsort(lam.abs(), descending=True)][:k]


def _check(op, res, truth, tol):
    """Eigenvalues to the requested tolerance, eigenvectors by their residual (recomputed densely)."""
    A = op.matrix if isinstance(op, DenseOperator) else op.to_dense()
    anorm = float(torch.linalg.matrix_norm(A, 2))
    lam, X = res.eigenvalues, res.eigenvectors
    assert res.all_converged
    # the documented test: ||A x - theta x|| <= max(tol max(|theta|, eps^(2/3) anorm), 50 eps anorm)
    floor = torch.clamp(tol * torch.clamp(lam.abs(), min=EPS ** (2 / 3) * anorm), min=50 * EPS * anorm)
    true_res = (A @ X - X * lam).norm(dim=0)
    assert (true_res <= 1.01 * floor + 1e-13 * anorm).all()
    assert torch.allclose(true_res, res.residuals, rtol=1e-3, atol=1e-13 * anorm)
    # eigenvalue error <= residual (Weyl/Kahan), hence <= tol relative
    err = (lam - truth).abs()
    assert (err <= 1.01 * floor + 1e-13 * anorm).all(), (err, floor)
    assert (X.T @ X - torch.eye(X.shape[1], dtype=X.dtype)).abs().max() < 1e-10


@pytest.mark.parametrize("name", ["clustered", "large_gap", "tiny_gap", "negative", "rank_deficient"])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_prescribed_spectra(name, which):
    lam = _spectrum(name)
    op, _ = operator_with_spectrum(lam, seed=3)
    # a Krylov method from one vector sees each eigenvalue once, so the 170-fold zero
    # eigenvalue is asked for once (multiplicities: test_repeated_eigenvalue_needs_block)
    k = 5 if not (name == "rank_deficient" and which == "SA") else 1
    res = top_eigenvalues(op, k, which, tol=1e-8, seed=0)
    _check(op, res, _truth(lam, which, k), 1e-8)
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvectors.shape == (N, k)
    assert res.num_matvecs == op.num_matvecs


def test_repeated_eigenvalue_needs_block():
    lam = torch.cat([torch.full((3,), 7.0, dtype=torch.float64), torch.linspace(0, 5, N - 3, dtype=torch.float64)])
    op, _ = operator_with_spectrum(lam, seed=5)
    res = top_eigenvalues(op, 3, tol=1e-8, block_size=3, seed=1)
    _check(op, res, torch.full((3,), 7.0, dtype=torch.float64), 1e-8)


def test_block_start_finds_null_space_multiplicity():
    # block_size random start columns: a block Krylov space holds up to block_size
    # vectors per eigenspace, so the 170-fold zero is found 5 times
    lam = _spectrum("rank_deficient")
    op, _ = operator_with_spectrum(lam, seed=3)
    res = top_eigenvalues(op, 5, "SA", tol=1e-8, block_size=5, seed=0)
    _check(op, res, _truth(lam, "SA", 5), 1e-8)
    # a one-column v0 is completed by random columns to the block
    lam3 = torch.cat([torch.full((3,), 7.0, dtype=torch.float64), torch.linspace(0, 5, N - 3, dtype=torch.float64)])
    op3, _ = operator_with_spectrum(lam3, seed=5)
    v0 = torch.ones(N, dtype=torch.float64)
    res3 = top_eigenvalues(op3, 3, tol=1e-8, block_size=3, v0=v0, seed=1)
    _check(op3, res3, torch.full((3,), 7.0, dtype=torch.float64), 1e-8)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_verify_finds_missed_copies(which):
    # 5-fold 7 and 3-fold 6.999 (or their negatives): without verify the single-vector
    # Krylov space reports 6.999 among the top 5; verify merges the missed copies
    lam = torch.cat([torch.full((5,), 7.0), torch.full((3,), 6.999), torch.linspace(-1, 1, N - 8)]).double()
    lam = lam if which == "LA" else -lam
    op, _ = operator_with_spectrum(lam, seed=2)
    plain = top_eigenvalues(op, 5, which, tol=1e-10, seed=0)
    res = top_eigenvalues(op, 5, which, tol=1e-10, seed=0, verify=True)
    truth = _truth(lam, which, 5)
    _check(op, res, truth, 1e-10)
    assert res.num_matvecs > plain.num_matvecs
    # on a spectrum without ties verify changes nothing but the cost
    op2, _ = operator_with_spectrum(_spectrum("clustered"), seed=3)
    a = top_eigenvalues(op2, 5, which, tol=1e-8, seed=0)
    b = top_eigenvalues(op2, 5, which, tol=1e-8, seed=0, verify=True)
    _check(op2, b, _truth(_spectrum("clustered"), which, 5), 1e-8)
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=1e-8 * float(a.eigenvalues.abs().max()))


def test_hessian_of_small_model_both_ends():
    model, loss_fn, (X, y) = make_case("mlp", dtype=torch.float64, n=12)
    op = HessianOperator(model, loss_fn, (X, y))
    H = dense_hessian(model, loss_fn, X, y)
    ev = torch.linalg.eigvalsh(H)
    for which, truth in (("LA", ev.flip(0)[:3]), ("SA", ev[:3])):
        res = top_eigenvalues(op, 3, which, tol=1e-9, seed=0)
        dop = DenseOperator(0.5 * (H + H.T))
        lam, Xv = res.eigenvalues, res.eigenvectors
        anorm = float(ev.abs().max())
        assert ((dop.matrix @ Xv - Xv * lam).norm(dim=0) <= 1e-9 * torch.clamp(lam.abs(), min=EPS ** (2 / 3) * anorm) + 1e-12 * anorm).all()
        assert ((lam - truth).abs() <= 1e-9 * truth.abs() + 1e-12 * anorm).all()


def test_fewer_products_than_deflated_power_iteration_and_restarts():
    g = _gen(2)
    lam = torch.cat([torch.tensor([40.0, 25, 18, 14, 11, 9], dtype=torch.float64),
                     3 * torch.rand(200 - 6, generator=g, dtype=torch.float64) ** 4])
    op, _ = operator_with_spectrum(lam, seed=4)
    truth = torch.sort(lam, descending=True).values[:5]
    res = top_eigenvalues(op, 5, tol=1e-6, seed=0)
    _check(op, res, truth, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pw = power_iteration(op, 5, tol=1e-6, seed=0)
    assert ((pw.eigenvalues - truth).abs() <= pw.residuals * 1.01).all()
    assert res.num_matvecs * 3 <= pw.num_matvecs
    # a small basis forces thick restarts and still converges
    small = top_eigenvalues(op, 5, tol=1e-8, max_basis=12, seed=0)
    assert small.num_restarts > 0
    _check(op, small, truth, 1e-8)


def test_warm_start_saves_products():
    g = _gen(3)
    lam = torch.cat([torch.tensor([40.0, 25, 18, 14, 11, 9], dtype=torch.float64),
                     3 * torch.rand(400 - 6, generator=g, dtype=torch.float64) ** 4])
    op, _ = operator_with_spectrum(lam, seed=6)
    prev = top_eigenvalues(op, 5, tol=1e-8, seed=0)
    E = torch.randn(400, 400, generator=g, dtype=torch.float64) * 1e-4
    op2 = DenseOperator(op.matrix + 0.5 * (E + E.T))  # the next training step, say
    truth = torch.linalg.eigvalsh(op2.matrix).flip(0)
    cold1 = top_eigenvalues(op2, 1, tol=1e-8, seed=1)
    warm1 = top_eigenvalues(op2, 1, tol=1e-8, v0=prev.eigenvectors[:, 0])
    _check(op2, warm1, truth[:1], 1e-8)
    # the start vector is ~1e-4 from the answer instead of O(1): about half the steps
    assert warm1.num_matvecs <= 0.6 * cold1.num_matvecs
    cold5 = top_eigenvalues(op2, 5, tol=1e-8, seed=1)
    warm5 = top_eigenvalues(op2, 5, tol=1e-8, v0=prev.eigenvectors)
    _check(op2, warm5, truth[:5], 1e-8)
    assert warm5.num_matvecs < cold5.num_matvecs


def test_power_iteration_matches_eigvalsh():
    lam = torch.cat([torch.tensor([-10.0, 6.0], dtype=torch.float64), torch.linspace(-1, 1, 98, dtype=torch.float64)])
    op, _ = operator_with_spectrum(lam, seed=7)
    res = power_iteration(op, 2, tol=1e-10, seed=0)
    assert res.all_converged and res.num_matvecs == op.num_matvecs
    # |theta - lambda| <= ||r|| and here (gap >= 5) <= ||r||^2 / gap
    assert ((res.eigenvalues - torch.tensor([-10.0, 6.0], dtype=torch.float64)).abs() <= res.residuals).all()
    assert (res.error_bounds <= res.residuals).all()


@pytest.mark.parametrize("name", ["large_gap", "negative", "clustered"])
def test_eigenvalue_criterion_meets_tolerance_with_fewer_products(name):
    lam = _spectrum(name)
    op, _ = operator_with_spectrum(lam, seed=3)
    truth = _truth(lam, "LA", 5)
    fast = top_eigenvalues(op, 5, tol=1e-8, criterion="eigenvalue", seed=0)
    full = top_eigenvalues(op, 5, tol=1e-8, seed=0)
    assert fast.all_converged and fast.num_matvecs <= full.num_matvecs
    assert ((fast.eigenvalues - truth).abs() <= 1e-8 * truth.abs()).all()
    assert (fast.error_bounds <= 1e-8 * truth.abs() * 1.01).all()


def test_small_n_and_k_equals_n():
    lam = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    op, _ = operator_with_spectrum(lam, seed=0)
    res = top_eigenvalues(op, 4, "SA")
    assert torch.allclose(res.eigenvalues, torch.sort(lam).values, atol=1e-13)
    assert res.num_matvecs <= 4


def test_float32_follows_operator_dtype():
    lam = torch.cat([torch.tensor([10.0, 8.0]), torch.linspace(0, 1, 98)])
    op, _ = operator_with_spectrum(lam, seed=1, dtype=torch.float32)
    res = top_eigenvalues(op, 2, tol=1e-5)
    assert res.eigenvalues.dtype == torch.float32 and res.all_converged
    assert torch.allclose(res.eigenvalues, torch.tensor([10.0, 8.0]), rtol=1e-5)


def test_reproducibility():
    op, _ = operator_with_spectrum(_spectrum("negative"), seed=1)
    a = top_eigenvalues(op, 2, tol=1e-4, seed=5)
    b = top_eigenvalues(op, 2, tol=1e-4, seed=5)
    c = top_eigenvalues(op, 2, tol=1e-4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.seed == 5 and c.seed is None
    assert not torch.equal(a.eigenvectors.abs(), c.eigenvectors.abs())


def test_budget_exhaustion_warns_and_flags():
    op, _ = operator_with_spectrum(torch.linspace(0, 1, 300, dtype=torch.float64), seed=2)
    with pytest.warns(ConvergenceWarning, match="converged"):
        res = top_eigenvalues(op, 3, tol=1e-12, max_matvecs=10)
    assert res.num_matvecs <= 10 and not res.all_converged


def test_bad_input():
    sym, _ = operator_with_spectrum(torch.arange(6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="symmetric"):
        top_eigenvalues(DenseOperator(torch.randn(6, 6, dtype=torch.float64), is_symmetric=False))
    with pytest.raises(ValueError, match="square"):
        top_eigenvalues(DenseOperator(torch.randn(6, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="k must satisfy"):
        top_eigenvalues(sym, 7)
    with pytest.raises(ValueError, match="k must satisfy"):
        power_iteration(sym, 0)
    with pytest.raises(ValueError, match="criterion"):
        top_eigenvalues(sym, 1, criterion="loose")
    with pytest.raises(ValueError, match="which"):
        top_eigenvalues(sym, 1, which="BE")
    with pytest.raises(ValueError, match="v0"):
        top_eigenvalues(sym, 1, v0=torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="LinearOperator"):
        top_eigenvalues(torch.eye(3))
    nan_op = CallableOperator(lambda X: X * float("nan"), (6, 6), dtype=torch.float64, is_symmetric=True)
    with pytest.raises(FloatingPointError, match="NaN"):
        top_eigenvalues(nan_op)
    with pytest.raises(TypeError, match="torch.Generator"):
        top_eigenvalues(sym, 1, generator="x")  # type: ignore[arg-type]


@pytest.mark.parametrize("max_basis", [12, None])
def test_float32_basis_against_eigvalsh(max_basis):
    # float64 operator, float32 basis: the Ritz pairs meet tol against the true operator,
    # the reported residuals are those of the returned vectors, and the error bounds
    # (which carry the basis rounding) contain the eigvalsh eigenvalues
    g = _gen(2)
    lam = torch.cat([torch.tensor([40.0, 25, 18, 14, 11, 9], dtype=torch.float64),
                     3 * torch.rand(994, generator=g, dtype=torch.float64) ** 4])
    op, _ = operator_with_spectrum(lam, seed=4)
    A = op.matrix
    truth = torch.linalg.eigvalsh(A).flip(0)[:5]
    tol = 1e-5
    res = top_eigenvalues(op, 5, tol=tol, seed=0, basis_dtype=torch.float32, max_basis=max_basis)
    full = top_eigenvalues(op, 5, tol=tol, seed=0, max_basis=max_basis)
    assert res.all_converged and res.eigenvalues.dtype == torch.float64
    assert (res.num_restarts > 0) == (max_basis == 12)
    lam_r, X = res.eigenvalues, res.eigenvectors
    true_res = (A @ X - X * lam_r).norm(dim=0)
    assert (true_res <= tol * lam_r.abs()).all()
    u32 = torch.finfo(torch.float32).eps / 2
    assert torch.allclose(true_res, res.residuals, rtol=0.05, atol=10 * u32 * 40.0)
    err = (lam_r - truth).abs()
    assert (err <= res.error_bounds).all() and (res.error_bounds <= tol * truth).all()
    assert (res.error_bounds >= full.error_bounds).all()  # the basis rounding is in the bounds
    assert (X.T @ X - torch.eye(5, dtype=X.dtype)).abs().max() < 1e-6
    assert res.num_matvecs <= full.num_matvecs + 2
    # float32 operator, float32 basis: the float32 tolerance is met as with the float64 basis
    op32, _ = operator_with_spectrum(lam, seed=4, dtype=torch.float32)
    r32 = top_eigenvalues(op32, 5, tol=1e-5, seed=0, basis_dtype=torch.float32, max_basis=max_basis)
    assert r32.all_converged and r32.eigenvectors.dtype == torch.float32
    assert ((r32.eigenvalues.double() - truth).abs() <= 1e-5 * truth).all()


def test_basis_dtype_refused():
    op, _ = operator_with_spectrum(torch.arange(6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="basis_dtype"):
        top_eigenvalues(op, 1, basis_dtype=torch.float16)
    with pytest.raises(ValueError, match="basis_dtype"):
        top_eigenvalues(op, 1, basis_dtype="float32")  # type: ignore[arg-type]
