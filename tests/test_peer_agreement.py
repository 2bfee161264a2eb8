"""Side-by-side agreement with the peers (curvlinops 3.0.1, BackPACK 1.7.1, scipy) and dense truth.

Every check compares a real number with an independent reference computed here:

* dense truth in float64 on the *concatenated* data set (never through the operators under
  test): the Hessian row by row by double backward, the GGN as ``J^T Lambda J`` with ``J``
  the output Jacobian and ``Lambda`` the autograd Hessian of the loss w.r.t. the output, and
  the empirical Fisher as ``c * sum_n g_n g_n^T`` with ``g_n`` the gradient of the
  per-example loss (``reduction="sum"`` on example ``n`` alone) and ``c`` the loss's own
  normalization (``1`` for sum; ``1/N`` for CE mean; ``1/(N C)`` for MSE/BCE mean, since
  PyTorch averages over every output entry);
* the peers run side by side on the same model and data: curvlinops' Hessian / GGN / EF
  linear operators, BackPACK's ``DiagGGNExact`` / ``DiagHessian`` run directly;
* ``torch.linalg.eigvalsh`` and ``scipy.sparse.linalg.eigsh`` for eigenvalues, exact traces for
  the randomized trace estimators, ``scipy.optimize.minimize`` for optima.

Tolerances: products in float64 of matrices with O(1) entries agree to round-off
(``1e-10`` relative); randomized estimators are checked at 5 reported standard errors (or a
Chebyshev-style bound where the estimator reports none).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse.linalg
import torch
from torch import nn

import curvature
import estimators
import solvers

DT = torch.float64
RTOL = 1e-10


# ------------------------------------------------------------------------------ fixtures
def _mlp(d_out: int, seed: int = 0, dtype=DT) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, d_out)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=dtype))
    return m


def _cnn(d_out: int, seed: int = 0, dtype=DT) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3, stride=2), nn.Sigmoid(),
                      nn.Flatten(), nn.Linear(8, d_out)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=dtype))
    return m


MODELS = {"mlp": (_mlp, (4,)), "cnn": (_cnn, (1, 7, 7))}
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss,
          "bce1": nn.BCEWithLogitsLoss}  # bce1: one logit per example (BackPACK's BCE needs [B, 1])
C_OUT = 3


def _c_out(loss: str) -> int:
    return 1 if loss == "bce1" else C_OUT


def _targets(loss: str, n: int, g: torch.Generator) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, C_OUT, (n,), generator=g)
    if loss == "mse":
        return torch.randn(n, C_OUT, generator=g, dtype=DT)
    return torch.randint(0, 2, (n, _c_out(loss)), generator=g).to(DT)


def _case(model: str, loss: str, reduction: str, batches: str):
    make, in_shape = MODELS[model]
    net = make(_c_out(loss))
    g = torch.Generator().manual_seed(1)
    sizes = [7] if batches == "single" else [3, 5, 2]
    data = []
    for b in sizes:
        data.append((torch.randn(b, *in_shape, generator=g, dtype=DT), _targets(loss, b, g)))
    loss_fn = LOSSES[loss](reduction=reduction)
    user_data = data[0] if batches == "single" else data
    return net, loss_fn, data, user_data


def _cat(data):
    return torch.cat([X for X, _ in data]), torch.cat([y for _, y in data])


def _flat_fn(model, X):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta):
        d = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return torch.func.functional_call(model, d, (X,))

    return f


def _theta(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_hessian(model, loss_fn, X, y):
    """Row by row double backward (reverse over reverse) of the loss on the whole data set."""
    f = _flat_fn(model, X)
    theta = _theta(model).requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(f(theta), y), theta, create_graph=True)
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(theta.numel())]
    return torch.stack(rows)


def dense_ggn(model, loss_fn, X, y):
    """``J^T Lambda J``: explicit Jacobian and the autograd Hessian of the loss w.r.t. the output."""
    f = _flat_fn(model, X)
    theta = _theta(model)
    J = torch.autograd.functional.jacobian(f, theta).reshape(-1, theta.numel())
    z = f(theta).detach()
    Lam = torch.autograd.functional.hessian(lambda zz: loss_fn(zz, y), z).reshape(z.numel(), z.numel())
    return J.T @ Lam @ J


def ef_normalization(loss_fn, z):
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1.0 / z.shape[0]
    return 1.0 / z.numel()


def dense_ef(model, loss_fn, X, y):
    """``c * sum_n g_n g_n^T``, ``g_n`` = gradient of the per-example summed loss."""
    f = _flat_fn(model, X)
    theta = _theta(model).requires_grad_(True)
    per = type(loss_fn)(reduction="sum")
    G = []
    for n in range(X.shape[0]):
        fn = _flat_fn(model, X[n:n + 1])
        (gn,) = torch.autograd.grad(per(fn(theta), y[n:n + 1]), theta)
        G.append(gn)
    G = torch.stack(G)
    c = ef_normalization(loss_fn, f(theta).detach())
    return c * G.T @ G


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


CASES = [(m, l, r, b) for m in MODELS for l in ("ce", "mse", "bce") for r in ("mean", "sum") for b in ("single", "batches")]
CASE_IDS = ["-".join(c) for c in CASES]

_DENSE = {}


def _dense(case, kind):
    key = (case, kind)
    if key not in _DENSE:
        net, loss_fn, data, _ = _case(*case)
        X, y = _cat(data)
        fn = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_ef}[kind]
        _DENSE[key] = fn(net, loss_fn, X, y)
    return _DENSE[key]


def _ours(kind, net, loss_fn, user_data):
    if kind == "hessian":
        return curvature.HessianOperator(net, loss_fn, user_data)
    if kind == "ggn":
        return curvature.GGNOperator(net, loss_fn, user_data)
    if kind == "fisher_exact":
        return curvature.FisherOperator(net, loss_fn, user_data, kind="exact")
    return curvature.FisherOperator(net, loss_fn, user_data, kind="empirical")


def _peer(kind, net, loss_fn, data):
    import curvlinops

    cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator,
           "fisher_exact": curvlinops.GGNLinearOperator, "ef": curvlinops.EFLinearOperator}[kind]
    return cls(net, loss_fn, list(net.parameters()), data, check_deterministic=False)


TRUTH = {"hessian": "hessian", "ggn": "ggn", "fisher_exact": "ggn", "ef": "ef"}


# ------------------------------------------------------------------ 1. operators vs truth/peer
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher_exact", "ef"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_operator_matches_dense_truth_and_curvlinops(case, kind):
    """Ours == dense truth == curvlinops 3.0.1, single batch and unequal batches [3, 5, 2].

    EF normalization decided from the math: ``c * sum_n g_n g_n^T`` with the loss's own
    ``c`` (1/(N C) for MSE/BCE mean); curvlinops 3.0.1 agrees (older versions did not).
    """
    net, loss_fn, data, user_data = _case(*case)
    before = [p.detach().clone() for p in net.parameters()]
    op = _ours(kind, net, loss_fn, user_data)
    D = _dense(case, TRUTH[kind])
    V = torch.randn(op.shape[1], 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    got = op @ V
    assert rel(got, D @ V) < RTOL
    assert rel(got, _peer(kind, net, loss_fn, data) @ V) < RTOL
    # one vector in parameter-list format too
    v = V[:, 0]
    assert rel(op @ v, D @ v) < RTOL
    # the model is left as it was
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


# CrossEntropyLoss(mean) with ignore_index / class weights averages over the *effective* count
# (sum of the weights of non-ignored targets), not over the batch size.
def _effective_case():
    net = _mlp(3)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(8, 4, generator=g, dtype=DT)
    y = torch.tensor([0, 1, 2, 1, 0, 1, 2, 2])
    V = torch.randn(sum(p.numel() for p in net.parameters()), 2, generator=g, dtype=DT)
    return net, X, y, V


def test_hessian_batches_with_ignore_index():
    net, X, y, V = _effective_case()
    lf = nn.CrossEntropyLoss(ignore_index=1)
    op = curvature.HessianOperator(net, lf, [(X[:4], y[:4]), (X[4:], y[4:])])
    assert rel(op @ V, dense_hessian(net, lf, X, y) @ V) < RTOL


def test_hessian_batches_with_class_weights():
    net, X, y, V = _effective_case()
    lf = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT))
    op = curvature.HessianOperator(net, lf, [(X[:3], y[:3]), (X[3:], y[3:])])
    assert rel(op @ V, dense_hessian(net, lf, X, y) @ V) < RTOL


def test_empirical_fisher_with_ignore_index():
    net, X, y, V = _effective_case()
    lf = nn.CrossEntropyLoss(ignore_index=1)
    theta = _theta(net).requires_grad_(True)
    per = nn.CrossEntropyLoss(reduction="sum", ignore_index=1)
    G = torch.stack([torch.autograd.grad(per(_flat_fn(net, X[n:n + 1])(theta), y[n:n + 1]), theta)[0]
                     for n in range(8)])
    EF = G.T @ G / int((y != 1).sum())
    op = curvature.FisherOperator(net, lf, (X, y), kind="empirical")
    assert rel(op @ V, EF @ V) < RTOL


def test_empirical_fisher_custom_sum_loss():
    net, X, _, V = _effective_case()
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    theta = _theta(net).requires_grad_(True)
    G = torch.stack([torch.autograd.grad(((_flat_fn(net, X[n:n + 1])(theta) - y[n:n + 1]) ** 2).sum(), theta)[0]
                     for n in range(8)])
    loss = lambda z, t: ((z - t) ** 2).sum()  # noqa: E731 - no .reduction attribute
    with pytest.raises(ValueError, match="reduction"):
        curvature.FisherOperator(net, loss, (X, y), kind="empirical")
    op = curvature.FisherOperator(net, loss, (X, y), kind="empirical", reduction="sum")
    assert rel(op @ V, (G.T @ G) @ V) < RTOL


# --------------------------------------------------------------------- BackPACK diagonals
DIAG_CASES = [(m, l, r, b) for m in MODELS for l in ("ce", "mse", "bce1") for r in ("mean", "sum")
              for b in ("single", "batches")]


def _backpack_direct(extension, net, loss_fn, data, N):
    import backpack
    from backpack import extensions

    work = backpack.extend(copy.deepcopy(net))
    lf = backpack.extend(copy.deepcopy(loss_fn))
    acc = None
    for X, y in data:
        w = X.shape[0] / N if loss_fn.reduction == "mean" else 1.0
        loss = lf(work(X), y)
        with backpack.backpack(getattr(extensions, extension)()):
            loss.backward()
        attr = "diag_ggn_exact" if extension == "DiagGGNExact" else "diag_h"
        d = torch.cat([getattr(p, attr).reshape(-1) for p in work.parameters()]) * w
        acc = d if acc is None else acc + d
        for p in work.parameters():
            p.grad = None
    return acc


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("which", ["ggn", "hessian"])
@pytest.mark.parametrize("case", DIAG_CASES, ids=["-".join(c) for c in DIAG_CASES])
def test_backpack_diagonals(case, which):
    net, loss_fn, data, user_data = _case(*case)
    N = sum(X.shape[0] for X, _ in data)
    if which == "ggn":
        ours = curvature.ggn_diagonal(net, loss_fn, user_data).diagonal()
        truth = torch.diagonal(_dense(case, "ggn"))
        direct = _backpack_direct("DiagGGNExact", net, loss_fn, data, N)
    else:
        ours = curvature.hessian_diagonal(net, loss_fn, user_data).diagonal()
        truth = torch.diagonal(_dense(case, "hessian"))
        direct = _backpack_direct("DiagHessian", net, loss_fn, data, N)
    assert rel(ours, truth) < RTOL
    assert rel(direct, truth) < RTOL


# ====================================================================== 2. estimators
def _sym(evals, seed=0, dtype=DT):
    """``Q diag(evals) Q^T`` with a Haar-random orthogonal ``Q``."""
    ev = torch.as_tensor(evals, dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=torch.Generator().manual_seed(seed), dtype=DT))
    return ((Q * ev) @ Q.T).to(dtype)


N_SPEC = 60
SPECTRA = {  # hard spectra without exact ties (ties -> see the multiplicity cases below)
    "cluster": [10.0 - 1e-3 * i for i in range(8)] + list(np.linspace(-1.03, 0.97, N_SPEC - 8)),
    "tinygap": [5.0, 5.0 - 1e-7, 5.0 - 2e-7] + list(np.linspace(-4.1, 3.9, N_SPEC - 6)) + [-5.3, -5.3 + 1e-7, -5.3 + 2e-7],
    "negative": list(-np.logspace(0, 3, 30)) + list(np.logspace(-2, 1, 30)),
    "rankdef": [0.0] * 40 + list(np.logspace(0, 2, 20)),
    "indefinite": [-100.0, 99.0, 98.5] + list(np.linspace(-3.05, 2.95, N_SPEC - 3)),
}


def _wanted(ev: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "LA":
        return ev.sort(descending=True).values[:k]
    if which == "SA":
        return ev.sort().values[:k]
    return ev[ev.abs().argsort(descending=True)][:k]


# rankdef-SA with k > 1 asks for a 40-fold zero: see test_top_eigenvalues_finds_multiplicities
EIG_CASES = [(s, w, k) for s in SPECTRA for w in ("LA", "SA", "LM") for k in (1, 5, 10)
             if not (s == "rankdef" and w == "SA" and k > 1)]


@pytest.mark.parametrize("spectrum, which, k", EIG_CASES, ids=["-".join(map(str, c)) for c in EIG_CASES])
def test_top_eigenvalues_vs_eigvalsh_and_eigsh(spectrum, which, k):
    A = _sym(SPECTRA[spectrum])
    op = curvature.DenseOperator(A)
    ev = torch.linalg.eigvalsh(A)
    anorm = float(ev.abs().max())
    before = op.num_matvecs
    r = estimators.top_eigenvalues(op, k, which, tol=1e-10, seed=0)
    assert r.num_matvecs == op.num_matvecs - before
    truth = _wanted(ev, which, k)
    # eigenvalues (residual tol 1e-10 relative -> |theta - lambda| <= r <= 1e-10 |theta| ...)
    assert torch.allclose(r.eigenvalues, truth, rtol=0, atol=1e-8 * anorm)
    # and at least as accurate as ARPACK on the same operator through to_scipy() (ARPACK
    # itself misses the 40-fold null space for SA on "rankdef": it returns 1.0, not 0)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])  # ARPACK's own start is unseeded
    ref = np.sort(scipy.sparse.linalg.eigsh(op.to_scipy(), k=k, which=which, tol=1e-12, v0=v0)[0])
    ours_err = np.abs(np.sort(r.eigenvalues.numpy()) - np.sort(truth.numpy())).max()
    arpack_err = np.abs(ref - np.sort(truth.numpy())).max()
    assert ours_err <= max(arpack_err, 1e-8 * anorm)
    # reported residuals are the true ones; vectors orthonormal; matvecs counted
    X = r.eigenvectors
    true_res = (A @ X - X * r.eigenvalues).norm(dim=0)
    assert torch.allclose(r.residuals, true_res, rtol=1e-6, atol=1e-12 * anorm)
    assert torch.allclose(X.T @ X, torch.eye(k, dtype=DT), atol=1e-10)


@pytest.mark.parametrize(
    "evals, which, k",
    [
        pytest.param([10.0] * 5 + [9.999] * 3 + list(np.linspace(-1, 1, 52)), "LA", 5),
        pytest.param([0.0] * 40 + list(np.logspace(0, 2, 20)), "SA", 5),
    ],
    ids=["LA-five-fold", "SA-null-space"],
)
def test_top_eigenvalues_finds_multiplicities(evals, which, k):
    A = _sym(evals)
    r = estimators.top_eigenvalues(curvature.DenseOperator(A), k, which, tol=1e-10, seed=0, verify=True)
    assert torch.allclose(r.eigenvalues, _wanted(torch.linalg.eigvalsh(A), which, k), atol=1e-8)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top_eigenvalues_small_and_degenerate(which):
    # n = 1, n = 2, k = n - 1, k = n, the zero operator
    A1 = torch.tensor([[3.0]], dtype=DT)
    assert torch.allclose(estimators.top_eigenvalues(curvature.DenseOperator(A1), 1, which).eigenvalues, A1[0])
    A2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=DT)  # eigenvalues 1, 3
    for k in (1, 2):
        got = estimators.top_eigenvalues(curvature.DenseOperator(A2), k, which).eigenvalues
        assert torch.allclose(got, _wanted(torch.tensor([1.0, 3.0], dtype=DT), which, k), atol=1e-12)
    ev = torch.linspace(-2, 5, 30, dtype=DT)
    A = _sym(ev)
    for k in (29, 30):
        got = estimators.top_eigenvalues(curvature.DenseOperator(A), k, which, tol=1e-10).eigenvalues
        assert torch.allclose(got, _wanted(ev, which, k), atol=1e-9)
    Z = curvature.DenseOperator(torch.zeros(5, 5, dtype=DT))
    assert torch.equal(estimators.top_eigenvalues(Z, 2, which).eigenvalues, torch.zeros(2, dtype=DT))


def test_top_eigenvalues_float32_and_warm_start():
    ev = torch.linspace(-2, 5, 30, dtype=DT)
    A = _sym(ev)
    r32 = estimators.top_eigenvalues(curvature.DenseOperator(A.float()), 3, "LA")
    assert r32.eigenvalues.dtype == torch.float32 and r32.eigenvectors.dtype == torch.float32
    # float32 products: error ~ 50 eps ||A||
    assert torch.allclose(r32.eigenvalues.double(), ev.flip(0)[:3], atol=50 * 1.2e-7 * 5)
    op = curvature.DenseOperator(A)
    cold = estimators.top_eigenvalues(op, 5, "LA", tol=1e-10, seed=0)
    warm = estimators.top_eigenvalues(op, 5, "LA", tol=1e-10, v0=cold.eigenvectors)
    # a Krylov space from a combination of 5 exact eigenvectors is invariant after 5 products
    assert warm.num_matvecs <= 6 < cold.num_matvecs
    assert torch.allclose(warm.eigenvalues, ev.flip(0)[:5], atol=1e-10)


def test_power_iteration_and_lanczos_vs_eigvalsh():
    ev = torch.cat([torch.tensor([9.0, -6.0, 4.0], dtype=DT), torch.linspace(-1, 1, 27, dtype=DT)])
    A = _sym(ev)
    op = curvature.DenseOperator(A)
    r = estimators.power_iteration(op, 2, tol=1e-12, max_iters=5000, seed=0)
    assert torch.allclose(r.eigenvalues, torch.tensor([9.0, -6.0], dtype=DT), atol=1e-9)
    lz = estimators.lanczos(op, 30, seed=0)  # full Lanczos: Ritz values = spectrum
    assert torch.allclose(lz.ritz()[0].sort().values, ev.sort().values, atol=1e-10)


def _rademacher_sigma(A: torch.Tensor, m: int) -> float:
    """Exact standard deviation of Hutchinson with m Rademacher probes."""
    return math.sqrt(2 * (float((A * A).sum()) - float((A.diagonal() ** 2).sum())) / m)


@pytest.mark.parametrize("spectrum", ["negative", "indefinite", "rankdef"])
def test_hutchinson_trace_within_exact_error(spectrum):
    A = _sym(SPECTRA[spectrum])
    op = curvature.DenseOperator(A)
    sigma = _rademacher_sigma(A, 200)
    for seed in range(3):
        r = estimators.hutchinson_trace(op, 200, seed=seed)
        assert abs(float(r.estimate) - float(A.trace())) <= 5 * sigma
        # the reported standard error estimates sigma (m = 200: within a factor 2 w.h.p.)
        assert 0.5 * sigma <= float(r.std_error) <= 2 * sigma
        assert r.num_matvecs == 200


def test_hutchpp_and_xtrace_exact_on_low_rank_dense():
    # rank 5 << m/3: the sketch captures the range, the estimate is exact up to round-off
    A = _sym([0.0] * 75 + [1.0, 2.0, 3.0, -4.0, 5.0])
    op = curvature.DenseOperator(A)
    for est in (estimators.hutchpp_trace(op, 30, seed=1), estimators.xtrace(op, 30, seed=1)):
        assert abs(float(est.estimate) - 7.0) <= 1e-10
        # Hutch++ spends its budget; XTrace stops at the sketch plus the 5-dim range
        assert est.num_matvecs == (30 if est.method == "hutch++" else 15 + 5)


def test_xtrace_exact_on_low_rank_diagonal():
    d = torch.zeros(50, dtype=DT)
    d[:5] = torch.arange(1.0, 6.0, dtype=DT)
    r = estimators.xtrace(curvature.DiagonalOperator(d), 20, seed=0)
    assert abs(float(r.estimate) - 15.0) <= 1e-10 and float(r.std_error) == 0.0
    assert r.num_matvecs == 10 + 5  # the sketch, then the 5-dimensional range
    zero = estimators.xtrace(curvature.DiagonalOperator(torch.zeros(50, dtype=DT)), 20, seed=0)
    assert float(zero.estimate) == 0.0


@pytest.mark.parametrize("method", ["hutchinson_trace", "hutchpp_trace", "xtrace"])
def test_trace_estimators_unbiased(method):
    """Mean over 60 independent seeds within 5 standard errors of the exact trace."""
    A = _sym(SPECTRA["indefinite"])
    op = curvature.DenseOperator(A)
    fn = getattr(estimators, method)
    est = torch.tensor([float(fn(op, 24, seed=s).estimate) for s in range(60)], dtype=DT)
    assert abs(float(est.mean()) - float(A.trace())) <= 5 * float(est.std()) / math.sqrt(60)


def test_hutchinson_diagonal_within_exact_error():
    A = _sym(SPECTRA["indefinite"])
    m = 400
    r = estimators.hutchinson_diagonal(curvature.DenseOperator(A), m, seed=0)
    # Rademacher: Var(est_i) = sum_{j != i} A_ij^2 / m exactly
    sigma = ((A * A).sum(dim=1) - A.diagonal() ** 2).div(m).sqrt()
    assert bool(((r.estimate - A.diagonal()).abs() <= 5 * sigma).all())
    assert r.num_matvecs == m


def test_spectral_density_moments_and_plot(tmp_path):
    ev = torch.cat([torch.linspace(-1, 1, 38, dtype=DT), torch.tensor([20.0, -15.0], dtype=DT)])
    op = curvature.DenseOperator(_sym(ev))
    d = estimators.spectral_density(op, 30, 40, seed=1)
    assert torch.allclose(d.weights.sum(dim=1), torch.ones(30, dtype=DT), atol=1e-12)
    mom, se = d.moments(4)
    truth = torch.stack([(ev ** j).mean() for j in range(5)])
    assert abs(float(mom[0]) - 1.0) <= 1e-12
    assert bool(((mom[1:] - truth[1:]).abs() <= 5 * se[1:]).all())
    # quadrature is exact per probe for degree < 2 * steps: the trace of A^2 via trace()
    assert abs(float(d.trace(lambda x: x ** 2)) / 40 - float(mom[2])) <= 1e-9 * float(mom[2])
    t, dens = d.evaluate()
    assert abs(float(torch.trapezoid(dens, t)) - 1.0) <= 1e-4
    path = tmp_path / "density.png"
    d.save_plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _model_hessian_case():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(1.5 * torch.randn(p.shape, generator=g, dtype=DT))
    X = torch.randn(20, 4, generator=g, dtype=DT)
    y = torch.randn(20, 3, generator=g, dtype=DT)
    return m, nn.MSELoss(), X, y


def test_estimators_on_model_hessian():
    m, lf, X, y = _model_hessian_case()
    Hd = dense_hessian(m, lf, X, y)
    ev = torch.linalg.eigvalsh(Hd)
    assert ev[0] < -1.0 < 1.0 < ev[-1]  # indefinite: a real test of LA vs SA
    H = curvature.HessianOperator(m, lf, (X, y))
    for which in ("LA", "SA"):
        r = estimators.top_eigenvalues(H, 3, which, tol=1e-10, seed=0)
        assert torch.allclose(r.eigenvalues, _wanted(ev, which, 3), atol=1e-8)
    r = estimators.hutchinson_trace(H, 100, seed=0)
    assert abs(float(r.estimate) - float(Hd.trace())) <= 5 * _rademacher_sigma(Hd, 100)
    s = estimators.sharpness(m, lf, (X, y), k=2)
    assert abs(s.value - float(ev[-1])) <= 1e-6 * float(ev.abs().max())


def test_sharpness_is_largest_algebraic_not_magnitude():
    # loss -mean(z^2) on a linear model: Hessian -2/N X^T X, every eigenvalue negative
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(3, 1, bias=False).double()
    X = torch.randn(10, 3, generator=g, dtype=DT)
    y = torch.zeros(10, 1, dtype=DT)
    ev = torch.linalg.eigvalsh(-2.0 / 10 * X.T @ X)
    s = estimators.sharpness(lin, lambda z, t: -(z ** 2).mean(), (X, y))
    assert abs(s.value - float(ev[-1])) <= 1e-8 * float(ev.abs().max())


def test_estimators_leave_global_rng_and_dtype():
    m, lf, X, y = _model_hessian_case()
    m32 = copy.deepcopy(m).float()
    state = torch.get_rng_state()
    for model, Xb, yb in ((m, X, y), (m32, X.float(), y.float())):
        H = curvature.HessianOperator(model, lf, (Xb, yb))
        F = curvature.FisherOperator(model, lf, (Xb, yb), kind="mc", seed=1)
        dt = next(model.parameters()).dtype
        assert H.dtype == dt and (H @ torch.ones(H.shape[0], dtype=dt)).dtype == dt
        assert (F @ torch.ones(F.shape[0], dtype=dt)).dtype == dt
        assert estimators.top_eigenvalues(H, 2).eigenvalues.dtype == dt
        assert estimators.hutchinson_trace(H, 4).estimate.dtype == dt
        assert estimators.xtrace(H, 8).estimate.dtype == dt
        assert estimators.hutchinson_diagonal(H, 4).estimate.dtype == dt
        assert estimators.spectral_density(H, 2, 5).nodes.dtype == dt
    assert torch.equal(state, torch.get_rng_state())


# ======================================================================== 3. solvers
def _rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def _logreg_problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(100, 5, generator=g, dtype=DT)
    b = (torch.rand(100, generator=g, dtype=DT) < torch.sigmoid(A @ torch.ones(5, dtype=DT))).to(DT)
    lam = 1e-2

    def f(w):
        return nn.functional.binary_cross_entropy_with_logits(A @ w, b) + 0.5 * lam * (w @ w)

    ref = scipy.optimize.minimize(
        lambda w: float(f(torch.tensor(w))), np.zeros(5),
        jac=lambda w: torch.func.grad(f)(torch.tensor(w)).numpy(), method="BFGS", options={"gtol": 1e-12})
    return f, ref.x, lam


MIN_METHODS = ["cubic_newton", "lazy_cubic_newton", "lazy_regularized_newton", "gns", "gns_gradient"]


@pytest.mark.parametrize("method", MIN_METHODS)
def test_minimize_vs_scipy_optimum(method):
    # logistic regression: lam-strongly convex, so |x - x*| <= ||grad|| / lam <= 1e-8 / 1e-2
    f, xstar, lam = _logreg_problem()
    r = solvers.minimize(f, torch.zeros(5, dtype=DT), method=method, gtol=1e-8, maxiter=500)
    assert r.success and r.grad_norm <= 1e-8
    assert np.linalg.norm(r.x.numpy() - xstar) <= 1e-8 / lam + 1e-9
    assert abs(r.fun - float(f(torch.tensor(xstar)))) <= 1e-12
    if method == "gns_gradient":
        return  # a first-order method: Rosenbrock's valley takes it >> 2000 iterations
    # Rosenbrock: optimum (1, 1); smallest Hessian eigenvalue there ~0.4, so |x - x*| <= 2.5 ||grad||
    r = solvers.minimize(_rosenbrock, torch.tensor([-1.2, 1.0], dtype=DT), method=method, gtol=1e-8, maxiter=2000)
    assert r.success
    assert np.linalg.norm(r.x.numpy() - np.ones(2)) <= 2.5 * r.grad_norm + 1e-12
    assert len(r.history.fun) >= 1 and r.nit >= 1


def test_minimize_bad_inputs_raise_clearly():
    x0 = torch.tensor([-1.2, 1.0], dtype=DT)
    with pytest.raises(ValueError, match="Unknown method"):
        solvers.minimize(_rosenbrock, x0, method="newton")
    with pytest.raises(TypeError, match="unexpected keyword"):
        solvers.minimize(_rosenbrock, x0, method="cubic_newton", foo=1)
    with pytest.raises(ValueError, match="scalar"):
        solvers.minimize(lambda x: x ** 2, x0)
    with pytest.raises(ValueError, match="not finite"):
        solvers.minimize(lambda x: (x ** 2).sum() * float("nan"), x0)


def _tiny_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g, dtype=DT)
    y = torch.sin(X @ torch.randn(4, 1, generator=g, dtype=DT))
    torch.manual_seed(1)  # the model's init only (test-local)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double(), nn.MSELoss(), X, y


def _build_opt(name, model, lf):
    if name == "NewtonCG":
        return solvers.NewtonCG(model.parameters(), model=model, loss_fn=lf, damping=1.0)
    if name == "GNSNewton":
        return solvers.GNSNewton(model.parameters(), model=model, loss_fn=lf)
    est = solvers.HutchinsonEstimator(model, lf, seed=0)
    return solvers.Sophia(model.parameters(), lr=1e-2, estimator=est, update_interval=1)


def _opt_step(name, opt, model, lf, X, y):
    def closure():
        opt.zero_grad()
        loss = lf(model(X), y)
        loss.backward()
        return loss

    if name == "Sophia":
        return opt.step(closure, curvature_input=(X, y))
    return opt.step(closure, batch=(X, y))


@pytest.mark.parametrize("name", ["NewtonCG", "GNSNewton", "Sophia"])
def test_optimizer_state_dict_round_trip_and_progress(name):
    model, lf, X, y = _tiny_regression()
    opt = _build_opt(name, model, lf)
    with torch.no_grad():
        f0 = float(lf(model(X), y))
    for _ in range(3):
        _opt_step(name, opt, model, lf, X, y)
    with torch.no_grad():
        assert float(lf(model(X), y)) < f0  # a descent method on a smooth problem
    clone = copy.deepcopy(model)
    opt2 = _build_opt(name, clone, lf)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        _opt_step(name, opt, model, lf, X, y)
        _opt_step(name, opt2, clone, lf, X, y)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_optimizers_reject_bad_hyperparameters():
    model, lf, X, y = _tiny_regression()
    with pytest.raises(ValueError, match="learning rate"):
        solvers.Sophia(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        solvers.Sophia(model.parameters(), betas=(1.5, 0.9))
    with pytest.raises(ValueError):
        solvers.NewtonCG(model.parameters(), model=model, loss_fn=lf, damping_increase=0.5)


def test_scaled_gd_recovers_low_rank_matrix():
    prob = solvers.matrix_sensing_problem(20, 2, kappa=5.0, seed=0)
    res = solvers.scaled_gd(prob, 2, maxiter=500, tol=1e-10)
    L, R = res.factors
    # recovery of the ground truth, recomputed from the factors (not the reported error)
    assert float((L @ R.T - prob.X_star).norm() / prob.X_star.norm()) <= 1e-9


# ================================================================ 4. API and usability
def test_public_names_of_the_design_contract():
    for name in ("HessianOperator", "GGNOperator", "FisherOperator", "DenseOperator", "DiagonalOperator",
                 "IdentityOperator"):
        assert hasattr(curvature, name), name
    assert callable(curvature.HessianOperator.from_function)
    for name in ("hutchinson_trace", "hutchpp_trace", "xtrace", "hutchinson_diagonal", "power_iteration",
                 "lanczos", "top_eigenvalues", "spectral_density", "sharpness", "SharpnessMonitor"):
        assert hasattr(estimators, name), name
    for name in ("minimize", "Sophia", "NewtonCG", "GNSNewton", "ScaledGD"):
        assert hasattr(solvers, name), name
    for method in ("cubic_newton", "lazy_cubic_newton", "lazy_regularized_newton", "gns", "gns_gradient"):
        assert method in solvers.METHODS
    # HessianOperator.from_function: the Hessian of a plain function, vs the closed form
    x = torch.tensor([0.3, -0.2], dtype=DT)
    H = curvature.HessianOperator.from_function(_rosenbrock, x).to_dense()
    closed = torch.tensor([[1200 * 0.09 - 400 * (-0.2) + 2, -400 * 0.3], [-400 * 0.3, 200.0]], dtype=DT)
    assert torch.allclose(H, closed, rtol=1e-12)


def test_estimator_results_are_frozen():
    import dataclasses

    op = curvature.DenseOperator(_sym(SPECTRA["indefinite"]))
    for r in (estimators.top_eigenvalues(op, 2), estimators.hutchinson_trace(op, 4), estimators.xtrace(op, 8),
              estimators.hutchpp_trace(op, 9), estimators.hutchinson_diagonal(op, 4),
              estimators.spectral_density(op, 2, 5), estimators.lanczos(op, 5),
              solvers.minimize(_rosenbrock, torch.tensor([0.0, 0.0], dtype=DT), maxiter=3)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(r, dataclasses.fields(r)[0].name, None)
