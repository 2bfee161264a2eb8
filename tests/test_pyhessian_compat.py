"""The PyHessian-compatible facade ``estimators.compat.pyhessian.hessian``.

Truth: dense float64 Hessians by double backward and ``torch.linalg.eigvalsh``; closed
forms for a linear model; and PyHessian 0.1 itself (installed here) on a convex model,
compared within the accuracy its own stopping rule guarantees.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dense_truth import dense_hessian
from estimators._probes import make_generator, rademacher
from estimators.compat.pyhessian import hessian


def _mlp_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
    X = torch.randn(30, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


def _saddle_problem(dtype=torch.float64):
    """Linear model with two outputs and loss ``mean((z0 - y)^2) - 5 mean(z1^2)``.

    The Hessian is ``diag(2 S, -10 S)`` over ``(w0, w1)`` with ``S = X^T X / N``: its
    largest-magnitude eigenvalue is ``-10 s_max`` (what power iteration finds), its
    largest algebraic one ``2 s_max``.
    """
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 3, generator=g, dtype=dtype) * torch.tensor([3.0, 1.5, 0.5], dtype=dtype)
    y = torch.randn(50, generator=g, dtype=dtype)
    model = nn.Linear(3, 2, bias=False).to(dtype)

    def criterion(z, t):
        return ((z[:, 0] - t) ** 2).mean() - 5 * (z[:, 1] ** 2).mean()

    return model, criterion, (X, y)


def test_eigenvalues_are_largest_algebraic_on_an_indefinite_hessian():
    model, crit, (X, y) = _saddle_problem()
    S = X.T @ X / X.shape[0]
    s = torch.linalg.eigvalsh(S)
    H = dense_hessian(model, crit, X, y)
    truth = torch.linalg.eigvalsh(H).flip(0)
    assert torch.allclose(truth[:3], 2 * s.flip(0), rtol=1e-12)  # the closed form agrees
    assert float(-10 * s[-1]) < -float(truth[0])  # the largest magnitude is the negative one
    comp = hessian(model, crit, data=(X, y), cuda=False)
    vals, vecs = comp.eigenvalues(top_n=2)
    assert isinstance(vals, list) and all(isinstance(v, float) for v in vals)
    for k in range(2):  # residual tolerance tol = 1e-3 bounds the error by 1e-3 |theta|
        assert abs(vals[k] - float(truth[k])) <= 1e-3 * abs(vals[k])
    assert len(vecs) == 2 and [v.shape for v in vecs[0]] == [p.shape for p in model.parameters()]
    for val, vec in zip(vals, vecs):
        v = torch.cat([t.reshape(-1) for t in vec])
        assert abs(float(v.norm()) - 1) < 1e-12
        assert float((H @ v - val * v).norm()) <= 1e-3 * abs(val)


def test_eigenvalues_match_eigvalsh_on_an_mlp_with_tight_tol():
    model, loss_fn, (X, y) = _mlp_problem()
    H = dense_hessian(model, loss_fn, X, y)
    truth = torch.linalg.eigvalsh(H).flip(0)
    vals, _ = hessian(model, loss_fn, data=(X, y), cuda=False).eigenvalues(maxIter=200, tol=1e-10, top_n=3)
    # residual r <= 1e-10 |theta| bounds |theta - lambda| by r
    assert np.allclose(vals, truth[:3].numpy(), rtol=2e-10, atol=0)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")  # PyHessian's own
def test_pyhessian_reports_magnitude_where_we_report_algebraic():
    pyhessian = pytest.importorskip("pyhessian")  # installed in this environment (bench extra)
    model, crit, (X, y) = _saddle_problem(torch.float32)
    s = torch.linalg.eigvalsh(X.double().T @ X.double() / X.shape[0])
    torch.manual_seed(0)
    ph_vals, _ = pyhessian.hessian(model, crit, data=(X, y), cuda=False).eigenvalues(top_n=1)
    model.zero_grad(set_to_none=True)
    ours, _ = hessian(model, crit, data=(X, y), cuda=False).eigenvalues(top_n=1)
    # power iteration ratio (s2/s1)^2 per step: PyHessian's 1e-3 rule leaves < 1e-2 relative error
    assert abs(ph_vals[0] - float(-10 * s[-1])) <= 1e-2 * float(10 * s[-1])
    assert abs(ours[0] - float(2 * s[-1])) <= 1e-3 * float(2 * s[-1]) + 1e-5


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")  # PyHessian's own
def test_side_by_side_with_pyhessian_on_a_convex_model():
    pyhessian = pytest.importorskip("pyhessian")
    g = torch.Generator().manual_seed(5)
    X = torch.randn(200, 6, generator=g) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.3, 0.2])
    y = torch.randn(200, 1, generator=g)
    model = nn.Linear(6, 1)
    crit = nn.MSELoss()
    # Hessian = 2 [X 1]^T [X 1] / N (PSD); eigenvalues in closed form
    A = torch.cat([X, torch.ones(200, 1)], dim=1).double()
    lam = torch.linalg.eigvalsh(2 * A.T @ A / 200).flip(0)
    tol = 1e-3
    torch.manual_seed(0)
    ph_vals, _ = pyhessian.hessian(model, crit, data=(X, y), cuda=False).eigenvalues(tol=tol, top_n=2)
    model.zero_grad(set_to_none=True)
    ours, _ = hessian(model, crit, data=(X, y), cuda=False).eigenvalues(tol=tol, top_n=2)
    for k in range(2):
        # PyHessian stops when the Rayleigh quotient changes by < tol relative and returns
        # the previous quotient: with rho = lam_{k+1}/lam_k the error e_j ~ c rho^(2j) of
        # that one is change / (1 - rho^2) < tol lam / (1 - rho^2).
        rho2 = float(lam[k + 1] / lam[k]) ** 2
        ph_bound = tol / (1 - rho2) * float(lam[k])
        assert abs(ph_vals[k] - float(lam[k])) <= ph_bound + 1e-5 * float(lam[k])
        assert abs(ours[k] - float(lam[k])) <= tol * float(lam[k]) + 1e-5 * float(lam[k])
        assert abs(ours[k] - ph_vals[k]) <= ph_bound + tol * float(lam[k]) + 2e-5 * float(lam[k])


def test_trace_samples_are_exact_quadratic_forms_and_mean_is_within_error():
    model, loss_fn, (X, y) = _mlp_problem()
    H = dense_hessian(model, loss_fn, X, y)
    comp = hessian(model, loss_fn, data=(X, y), cuda=False, seed=7)
    samples = comp.trace()
    assert isinstance(samples, list) and all(isinstance(s, float) for s in samples)
    # the same seeded Rademacher probes, regenerated: every sample is v^T H v exactly
    gen, _ = make_generator(7, None, "cpu")
    for s in samples:
        v = rademacher(H.shape[0], 1, generator=gen, dtype=H.dtype, device="cpu")[:, 0]
        assert abs(s - float(v @ H @ v)) <= 1e-10 * float(H.abs().sum())
    # PyHessian's stopping rule (with abs): stops at the first settled running mean
    means = np.cumsum(samples) / np.arange(1, len(samples) + 1)
    prev = np.concatenate([[0.0], means[:-1]])
    settled = np.abs(means - prev) / (np.abs(prev) + 1e-6) < 1e-3
    assert len(samples) == 100 or (settled[-1] and not settled[:-1].any())
    se = np.std(samples, ddof=1) / np.sqrt(len(samples))
    assert abs(np.mean(samples) - float(torch.trace(H))) <= 4 * se
    one_by_one = comp.trace(block_size=1)  # same probes, one product each: same samples up to rounding
    assert len(one_by_one) == len(samples) and np.allclose(one_by_one, samples, rtol=1e-12, atol=0)
    assert comp.trace(seed=8) != samples


def test_density_weights_sum_to_one_and_nodes_lie_in_the_spectrum():
    model, loss_fn, (X, y) = _mlp_problem()
    H = dense_hessian(model, loss_fn, X, y)
    ev = torch.linalg.eigvalsh(H)
    comp = hessian(model, loss_fn, data=(X, y), cuda=False)
    eig_full, w_full = comp.density(iter=20, n_v=3)
    assert len(eig_full) == len(w_full) == 3
    slack = 1e-10 * float(ev.abs().max())
    for nodes, w in zip(eig_full, w_full):
        assert len(nodes) == len(w) == 20 and all(isinstance(x, float) for x in nodes)
        assert abs(sum(w) - 1) < 1e-12
        assert float(ev[0]) - slack <= min(nodes) and max(nodes) <= float(ev[-1]) + slack
    # iter >= n: the full Lanczos run reproduces the spectrum (nodes = eigenvalues)
    nodes, _ = (lst[0] for lst in comp.density(iter=500, n_v=1))
    assert len(nodes) <= H.shape[0]
    for x in nodes:
        assert float((ev - x).abs().min()) <= 1e-8 * float(ev.abs().max())


def test_dataloader_equals_single_batch_and_model_left_as_it_was():
    model, loss_fn, (X, y) = _mlp_problem()
    model.train()
    loader = [(X[:20], y[:20]), (X[20:], y[20:])]
    a, _ = hessian(model, loss_fn, dataloader=loader, cuda=False).eigenvalues(tol=1e-10, top_n=2, maxIter=200)
    b, _ = hessian(model, loss_fn, data=(X, y), cuda=False).eigenvalues(tol=1e-10, top_n=2, maxIter=200)
    assert np.allclose(a, b, rtol=1e-9, atol=0)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_cuda_flag_uses_the_models_device_or_warns():
    model, loss_fn, data = _mlp_problem()
    assert hessian(model, loss_fn, data=data, cuda=False).device == "cpu"
    if torch.cuda.is_available():
        comp = hessian(model, loss_fn, data=data, cuda=True)
        assert comp.device.startswith("cuda") and next(model.parameters()).is_cuda
    else:
        with pytest.warns(RuntimeWarning, match="CUDA is not available"):
            comp = hessian(model, loss_fn, data=data, cuda=True)
        assert comp.device == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model already placed decides, with no warning
        hessian(model, loss_fn, data=data, cuda=False)


def test_bad_input_raises_clearly():
    model, loss_fn, data = _mlp_problem()
    with pytest.raises(ValueError, match="needs data"):
        hessian(model, loss_fn, cuda=False)
    with pytest.raises(ValueError, match="not both"):
        hessian(model, loss_fn, data=data, dataloader=[data], cuda=False)
    with pytest.raises(ValueError, match="one batch"):
        hessian(model, loss_fn, data=[data, data, data], cuda=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hessian(lambda x: x, loss_fn, data=data, cuda=False)
    comp = hessian(model, loss_fn, data=data, cuda=False)
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        comp.eigenvalues(top_n=0)
    with pytest.raises(ValueError, match="iter and n_v"):
        comp.density(iter=0)
