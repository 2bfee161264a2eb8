"""GNSNewton (gradient-regularized Newton with the adaptive gamma search), against dense truth.

Truth: the GGN from explicit Jacobians, dense solves with ``torch.linalg.solve``, the
logistic-regression minimizer from ``scipy.optimize.minimize(method="trust-exact")``
on a closed-form numpy objective, and the sufficient-decrease test re-evaluated by
hand at the accepted points.
"""

import copy
import io
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn
from torch.func import functional_call, jacrev

import curvature as C
from solvers import GNSNewton
from solvers.gns_newton import sufficient_decrease

DT = torch.float64


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def _logistic_data(n=200, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    p = torch.sigmoid(X @ w)
    y = (torch.rand(n, generator=g, dtype=DT) < p).to(DT).unsqueeze(1)  # noisy: not separable
    return X, y


def _regression_data(n=40, d=4, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.tanh(X @ torch.randn(d, m, generator=g, dtype=DT)) + 0.1 * torch.randn(n, m, generator=g, dtype=DT)
    return X, y


def _mlp(d=4, h=8, m=2, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, m)).to(DT)


def _functions(model, X, y, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def out(theta):
        return functional_call(model, dict(zip(names, C.unflatten(theta, shapes))), (X,))

    def f(theta):
        return loss_fn(out(theta), y)

    return f, out


def _loss_grad(f, theta):
    theta = theta.clone().requires_grad_(True)
    val = f(theta)
    (g,) = torch.autograd.grad(val, theta)
    return float(val.detach()), g


def _dense_ggn_mse(model, X, y):
    f, out = _functions(model, X, y, nn.MSELoss())
    theta = _flat(model.parameters())
    J = jacrev(out)(theta).reshape(-1, theta.numel())
    z = out(theta).detach()
    G = 2.0 / z.numel() * J.T @ J
    g = 2.0 / z.numel() * J.T @ (z - y).reshape(-1)
    return f, theta, G, g


# ------------------------------------------------------------ convergence
def test_logistic_regression_superlinear_to_scipy_minimizer():
    X, y = _logistic_data()
    torch.manual_seed(3)
    model = nn.Linear(5, 1).to(DT)
    loss_fn = nn.BCEWithLogitsLoss()
    f, _ = _functions(model, X, y, loss_fn)
    opt = GNSNewton(model.parameters(), model=model, loss_fn=loss_fn, curvature="ggn",
                    cg_tol=1e-12, cg_maxiter=50)
    norms, accepted_by_test = [], 0
    for _ in range(30):
        theta0 = _flat(model.parameters())
        f0, g0 = _loss_grad(f, theta0)
        norms.append(float(g0.norm()))
        if norms[-1] < 1e-13:
            break
        opt.step(batch=(X, y))
        info = opt.info
        assert info["grad_norm"] == pytest.approx(norms[-1], rel=1e-12)
        assert info["lam"] == pytest.approx(norms[-1] / info["gamma"], rel=1e-14)
        if info["accepted"]:  # the test the search claims, re-evaluated by hand
            f1, g1 = _loss_grad(f, _flat(model.parameters()))
            rhs = float(g1.norm()) ** 2 / (8 * info["lam"])
            below_rounding = abs(f1 - f0) <= 64 * 2.0**-52 * max(1.0, abs(f0))
            # the test, or (at the rounding floor of f only) a change below rounding and a halved gradient
            assert f0 - f1 >= rhs * (1 - 1e-12) or (below_rounding and float(g1.norm()) <= 0.5 * norms[-1])
            accepted_by_test += f0 - f1 >= rhs * (1 - 1e-12)
        else:
            assert torch.equal(_flat(model.parameters()), theta0)
    assert norms[-1] < 1e-10
    assert accepted_by_test >= len(norms) - 2
    # superlinear: the contraction factor of the gradient norm tends to zero
    late = [b / a for a, b in zip(norms, norms[1:]) if a < 1e-3 and b > 0]
    assert len(late) >= 2 and late[-1] < 1e-2 and late[-1] < late[0]

    Xn, yn = X.numpy(), y.numpy().ravel()
    A = np.hstack([Xn, np.ones((len(Xn), 1))])

    def fun(w):
        z = A @ w
        return np.mean(np.logaddexp(0, z) - yn * z)

    def jac(w):
        return A.T @ (1 / (1 + np.exp(-(A @ w))) - yn) / len(yn)

    def hess(w):
        s = 1 / (1 + np.exp(-(A @ w)))
        return (A * (s * (1 - s))[:, None]).T @ A / len(yn)

    ref = scipy.optimize.minimize(fun, np.zeros(6), jac=jac, hess=hess, method="trust-exact",
                                  options={"gtol": 1e-12})
    ours = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    assert np.allclose(ours, ref.x, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------- exact step
@pytest.mark.parametrize("with_metric", [False, True])
def test_first_step_equals_dense_regularized_newton_step(with_metric):
    X, y = _regression_data()
    model = _mlp()
    f, theta0, G, g = _dense_ggn_mse(model, X, y)
    n = len(g)
    if with_metric:
        d = torch.linspace(0.5, 2.0, n, dtype=DT)
        metric, B, dual = C.DiagonalOperator(d), torch.diag(d), float(torch.sqrt(g @ (g / d)))
    else:
        metric, B, dual = None, torch.eye(n, dtype=DT), float(g.norm())
    gamma0 = 0.5
    opt = GNSNewton(model.parameters(), model=model, loss_fn=nn.MSELoss(), gamma0=gamma0,
                    metric=metric, cg_tol=1e-13, cg_maxiter=n)
    opt.step(batch=(X, y))
    info = opt.info
    assert info["accepted"] and info["tries"] == 1
    lam = dual / gamma0
    assert info["lam"] == pytest.approx(lam, rel=1e-13)
    expected = -torch.linalg.solve(G + lam * B, g)
    assert torch.allclose(_flat(model.parameters()) - theta0, expected, rtol=1e-9, atol=1e-12)
    assert opt.gamma == 2 * gamma0  # optimistic doubling after success


def test_gamma_halves_until_the_test_passes():
    """Curvature 1e4x too small: the first tries overshoot, gamma halves (lambda doubles)."""
    X, y = _regression_data()
    model = _mlp()
    f, theta0, G, g = _dense_ggn_mse(model, X, y)
    weak = lambda ps, batch: C.DenseOperator(1e-4 * G, is_symmetric=True)  # noqa: E731
    gamma0 = 100.0
    opt = GNSNewton(model.parameters(), model=model, loss_fn=nn.MSELoss(), curvature=weak,
                    gamma0=gamma0, cg_tol=1e-13, cg_maxiter=len(g))
    opt.step(batch=(X, y))
    info = opt.info
    assert info["accepted"] and info["tries"] > 2
    assert info["gamma"] == gamma0 / 2 ** (info["tries"] - 1)
    assert opt.gamma == 2 * info["gamma"]
    lam = float(g.norm()) / info["gamma"]
    # the accepted step solves the shifted system for its own lambda (one Krylov basis)
    expected = -torch.linalg.solve(1e-4 * G + lam * torch.eye(len(g), dtype=DT), g)
    step = _flat(model.parameters()) - theta0
    assert torch.allclose(step, expected, rtol=1e-8, atol=1e-12)
    f1, g1 = _loss_grad(f, theta0 + step)
    f0, _ = _loss_grad(f, theta0)
    assert sufficient_decrease(f0, f1, float(g1.norm()), lam)
    # the try before (lambda / 2) fails the test, by hand
    prev = -torch.linalg.solve(1e-4 * G + lam / 2 * torch.eye(len(g), dtype=DT), g)
    fp, gp = _loss_grad(f, theta0 + prev)
    assert not sufficient_decrease(f0, fp, float(gp.norm()), lam / 2)


def test_all_tries_fail_leaves_parameters_unchanged():
    X, y = _regression_data()
    model = _mlp()
    _, theta0, G, _ = _dense_ggn_mse(model, X, y)
    weak = lambda ps, batch: C.DenseOperator(1e-6 * G, is_symmetric=True)  # noqa: E731
    opt = GNSNewton(model.parameters(), model=model, loss_fn=nn.MSELoss(), curvature=weak,
                    gamma0=1e6, max_tries=2)
    opt.step(batch=(X, y))
    assert not opt.info["accepted"] and opt.info["tries"] == 2
    assert torch.equal(_flat(model.parameters()), theta0)
    assert opt.gamma == 1e6 / 4


# ---------------------------------------------------------------- safety
@pytest.mark.parametrize("nan_calls, accepted", [({2}, True), (set(range(2, 100)), False)])
def test_nan_trial_points_never_land_in_parameters(nan_calls, accepted):
    X, y = _regression_data()
    model = _mlp()
    loss_fn = nn.MSELoss()
    calls = []
    opt = GNSNewton(model.parameters(), model=model, loss_fn=loss_fn, max_tries=5)

    def closure():
        opt.zero_grad()
        calls.append(1)
        loss = loss_fn(model(X), y)
        if len(calls) in nan_calls:
            loss = loss * float("nan")
        loss.backward()
        return loss

    theta0 = _flat(model.parameters())
    opt.step(closure, batch=(X, y))
    theta1 = _flat(model.parameters())
    assert bool(torch.isfinite(theta1).all())
    assert opt.info["accepted"] is accepted
    if accepted:
        assert opt.info["tries"] == 2  # the NaN try was rejected, the next one passed
    else:
        assert torch.equal(theta1, theta0) and opt.info["tries"] == 5
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


# ------------------------------------------------------------ state dict
def test_state_dict_round_trip_is_bit_identical():
    X, y = _regression_data(n=192)
    batches = [(X[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(6)]
    model = _mlp()
    kw = dict(loss_fn=nn.MSELoss(), cg_maxiter=20, gamma0=10.0)
    opt = GNSNewton(model.parameters(), model=model, **kw)
    for b in batches[:3]:
        opt.step(batch=b)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = copy.deepcopy(model)
    for b in batches[3:]:
        opt.step(batch=b)
    buf.seek(0)
    model2 = copy.deepcopy(saved)
    opt2 = GNSNewton(model2.parameters(), model=model2, **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.gamma != 10.0  # the adapted gamma came back
    for b in batches[3:]:
        opt2.step(batch=b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.gamma == opt.gamma


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lr=-1.0), ValueError, "Invalid learning rate"),
        (dict(gamma0=0.0), ValueError, "Invalid gamma0 value"),
        (dict(gamma_min=2.0, gamma_max=1.0), ValueError, "Invalid gamma bounds"),
        (dict(max_tries=0), ValueError, "Invalid max_tries value"),
        (dict(cg_maxiter=0), ValueError, "Invalid cg_maxiter value"),
        (dict(cg_tol=-1.0), ValueError, "Invalid cg_tol value"),
        (dict(curvature="kfac"), ValueError, "unknown curvature"),
        (dict(metric=C.IdentityOperator(3, dtype=DT)), ValueError, "metric must be a symmetric"),
        (dict(metric=torch.eye(3)), TypeError, "metric must be a curvature.LinearOperator"),
        (dict(loss_fn=None), ValueError, "needs the model and the loss"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    model = _mlp()
    base = dict(model=model, loss_fn=nn.MSELoss())
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        GNSNewton(model.parameters(), **base)


def test_bad_usage_raises():
    model = _mlp()
    with pytest.raises(ValueError, match="parameter groups"):
        GNSNewton([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                  model=model, loss_fn=nn.MSELoss())
    opt = GNSNewton(model.parameters(), model=model, loss_fn=nn.MSELoss())
    with pytest.raises(ValueError, match="needs a closure or a batch"):
        opt.step()
    X, y = _regression_data(n=8)
    theta0 = _flat(model.parameters())
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step(lambda: torch.tensor(math.inf, dtype=DT), batch=(X, y))
    assert torch.equal(_flat(model.parameters()), theta0)


def test_error_in_closure_at_trial_point_restores_parameters():
    X, y = _regression_data(n=20)
    model = _mlp()
    calls = []
    opt = GNSNewton(model.parameters(), model=model, loss_fn=nn.MSELoss())

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader died")
        opt.zero_grad()
        loss = nn.MSELoss()(model(X), y)
        loss.backward()
        return loss

    theta0 = _flat(model.parameters())
    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(closure, batch=(X, y))
    assert torch.equal(_flat(model.parameters()), theta0)
