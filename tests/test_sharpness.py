"""sharpness / preconditioned_sharpness / stability_threshold against dense truth and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg
import torch
from torch import nn

import curvature
from estimators.sharpness import (
    optimizer_preconditioner,
    preconditioned_sharpness,
    sharpness,
    stability_threshold,
)
from tests.dense_truth import dense_ggn, dense_hessian
from tests.models import make_case

EPS = torch.finfo(torch.float64).eps


def _check_top(res, evals_desc, scale):
    """Ritz values within their error bounds (plus rounding) of the true top eigenvalues."""
    k = res.eigenvalues.numel()
    slack = 1e3 * EPS * scale
    for i in range(k):
        assert abs(float(res.eigenvalues[i]) - float(evals_desc[i])) <= float(res.error_bounds[i]) + slack


@pytest.mark.parametrize("case", ["mlp", "layernorm", "regression"])
def test_sharpness_equals_dense_eigvalsh(case):
    model, loss_fn, (X, y) = make_case(case, n=12)
    H = dense_hessian(model, loss_fn, X, y)
    ev = torch.linalg.eigvalsh(H).flip(0)
    res = sharpness(model, loss_fn, (X, y), k=3, tol=1e-10)
    assert res.converged and res.kind == "hessian"
    _check_top(res, ev, float(ev.abs().max()))
    assert res.value == float(res.eigenvalues[0])
    # residuals are true residuals of the returned vectors
    R = H @ res.eigenvectors - res.eigenvectors * res.eigenvalues
    assert torch.allclose(R.norm(dim=0), res.residuals, atol=1e-12 * float(ev.abs().max()))


def test_sharpness_operator_overload_and_ggn():
    model, loss_fn, (X, y) = make_case("mlp", n=12)
    G = dense_ggn(model, loss_fn, X, y)
    evg = torch.linalg.eigvalsh(G).flip(0)
    res = sharpness(model, loss_fn, (X, y), operator="ggn", k=2, tol=1e-10)
    assert res.kind == "ggn"
    _check_top(res, evg, float(evg[0]))
    op = curvature.HessianOperator(model, loss_fn, (X, y))
    r2 = sharpness(op, tol=1e-10)
    ev = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, y))
    assert r2.kind == "operator" and r2.num_matvecs == op.num_matvecs
    assert abs(r2.value - float(ev[-1])) <= float(r2.error_bounds[0]) + 1e3 * EPS * float(ev.abs().max())
    with pytest.raises(ValueError, match="only the operator"):
        sharpness(op, loss_fn, (X, y))
    with pytest.raises(ValueError, match="operator must be one of"):
        sharpness(model, loss_fn, (X, y), operator="fisher")
    with pytest.raises(ValueError, match="v0 must be"):
        sharpness(op, v0=torch.ones(3, dtype=torch.float64))


class _Saddle(nn.Module):
    """Output ``1/2 theta^T A theta`` per example: the loss Hessian is ``A`` (indefinite)."""

    def __init__(self, A):
        super().__init__()
        self.register_buffer("A", A)
        self.theta = nn.Parameter(torch.linspace(-1, 1, A.shape[0], dtype=A.dtype))

    def forward(self, X):
        return (0.5 * self.theta @ self.A @ self.theta) * torch.ones_like(X[:, :1]) + 0 * X[:, :1]


def test_largest_algebraic_not_largest_magnitude():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    spec = torch.cat([torch.tensor([-50.0, 7.0], dtype=torch.float64), torch.linspace(-3, 3, 28, dtype=torch.float64)])
    A = Q @ torch.diag(spec) @ Q.T
    A = 0.5 * (A + A.T)
    model = _Saddle(A)
    X, y = torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    loss_fn = lambda z, t: (z - t).mean()  # noqa: E731 -- Hessian of the loss is exactly A
    H = dense_hessian(model, loss_fn, X, y)
    ev = torch.linalg.eigvalsh(H)
    assert float(ev[0]) < -45 and abs(float(ev[-1]) - 7.0) < 1e-10
    res = sharpness(model, loss_fn, (X, y), tol=1e-10)
    assert abs(res.value - float(ev[-1])) <= float(res.error_bounds[0]) + 1e3 * EPS * 50
    # the reference code's eigsh default (which='LM') reports the negative one
    op = curvature.HessianOperator(model, loss_fn, (X, y))
    lm = scipy.sparse.linalg.eigsh(op.to_scipy(), k=1, which="LM", v0=np.ones(30))[0]
    assert abs(float(lm[0]) - float(ev[0])) < 1e-8


def test_warm_start_agrees_with_cold_and_is_cheaper():
    model, loss_fn, (X, y) = make_case("mlp", n=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prev = sharpness(model, loss_fn, (X, y), k=2, tol=1e-8)
    warm_cost, cold_cost = [], []
    for _ in range(4):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        cold = sharpness(model, loss_fn, (X, y), k=2, tol=1e-8, seed=1)
        warm = sharpness(model, loss_fn, (X, y), k=2, tol=1e-8, v0=prev)
        ev = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, y)).flip(0)
        _check_top(cold, ev, float(ev.abs().max()))
        _check_top(warm, ev, float(ev.abs().max()))
        warm_cost.append(warm.num_matvecs)
        cold_cost.append(cold.num_matvecs)
        prev = warm
    assert sum(warm_cost) < sum(cold_cost)
    assert all(w < c for w, c in zip(warm_cost, cold_cost))


# ----------------------------------------------------------------------- preconditioned
def _train(model, loss_fn, X, y, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()


def _adam_P_by_hand(opt, params):
    """P reconstructed from the raw state with the formula written out independently."""
    out = []
    for p in params:
        st, grp = opt.state[p], opt.param_groups[0]
        b1, b2 = grp["betas"]
        t = int(st["step"].item())
        v = st["max_exp_avg_sq"] if grp["amsgrad"] else st["exp_avg_sq"]
        vhat = v / (1 - b2**t)
        out.append(((1 - b1**t) * (torch.sqrt(vhat) + grp["eps"])).reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}),
                                    (torch.optim.Adam, {"amsgrad": True, "eps": 1e-3})])
def test_preconditioned_sharpness_adam_matches_dense(cls, kw):
    model, loss_fn, (X, y) = make_case("mlp", n=12)
    params = list(model.parameters())
    opt = cls(params, lr=1e-2, **kw)
    _train(model, loss_fn, X, y, opt, 7)
    P = _adam_P_by_hand(opt, params)
    assert torch.allclose(optimizer_preconditioner(opt, params), P, rtol=1e-14, atol=0)
    H = dense_hessian(model, loss_fn, X, y)
    d = P.rsqrt()
    ev = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)
    res = preconditioned_sharpness(model, loss_fn, (X, y), opt, k=2, tol=1e-10)
    assert res.kind == "preconditioned"
    _check_top(res, ev, float(ev.abs().max()))
    # same eigenvalues as the generalized problem H x = lam P x (scipy, independent)
    gen = scipy.linalg.eigh(H.numpy(), np.diag(P.numpy()), eigvals_only=True)[::-1]
    assert abs(res.value - gen[0]) <= float(res.error_bounds[0]) + 1e-9 * abs(gen[0])
    # without the first-moment bias correction: P = sqrt(v_hat) + eps
    t = int(opt.state[params[0]]["step"].item())
    r2 = preconditioned_sharpness(model, loss_fn, (X, y), opt, tol=1e-10, momentum_bias_correction=False)
    assert abs(r2.value - res.value * (1 - 0.9**t)) <= 1e-8 * res.value


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    lambda p: torch.optim.RMSprop(p, lr=1e-3),
    lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True),
    lambda p: torch.optim.Adagrad(p, lr=1e-2),
])
def test_preconditioner_is_what_torch_divides_by(make):
    """One real torch step equals ``x - lr * (update numerator) / P`` with our P."""
    model, loss_fn, (X, y) = make_case("regression", n=12)
    params = list(model.parameters())
    opt = make(params)
    _train(model, loss_fn, X, y, opt, 3)
    x0 = torch.cat([p.detach().reshape(-1).clone() for p in params])
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    grad = torch.cat([p.grad.reshape(-1).clone() for p in params])
    opt.step()
    x1 = torch.cat([p.detach().reshape(-1) for p in params])
    P = optimizer_preconditioner(opt, params)
    g = opt.param_groups[0]
    if isinstance(opt, torch.optim.Adam):
        num = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params])  # raw EMA m
    else:
        num = grad
    lr = g["lr"]
    if isinstance(opt, torch.optim.Adagrad):
        t = int(opt.state[params[0]]["step"].item())
        lr = lr / (1 + (t - 1) * g["lr_decay"])
    assert torch.allclose(x1, x0 - lr * num / P, rtol=0, atol=1e-13)


def test_preconditioned_with_given_diagonal_and_dense_P():
    model, loss_fn, (X, y) = make_case("regression", n=12)
    H = dense_hessian(model, loss_fn, X, y)
    n = H.shape[0]
    g = torch.Generator().manual_seed(3)
    p = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    op = curvature.HessianOperator(model, loss_fn, (X, y))
    gen = scipy.linalg.eigh(H.numpy(), np.diag(p.numpy()), eigvals_only=True)[::-1]
    for P in (p, curvature.DiagonalOperator(p)):
        r = preconditioned_sharpness(op, P, tol=1e-10)
        assert abs(r.value - gen[0]) <= float(r.error_bounds[0]) + 1e-10 * abs(gen[0])
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    Pd = B @ B.T / n + torch.eye(n, dtype=torch.float64)
    gen = scipy.linalg.eigh(H.numpy(), Pd.numpy(), eigvals_only=True)[::-1]
    r = preconditioned_sharpness(op, curvature.DenseOperator(Pd), k=2, tol=1e-10)
    for i in range(2):
        assert abs(float(r.eigenvalues[i]) - gen[i]) <= float(r.error_bounds[i]) + 1e-10 * abs(gen[0])
    with pytest.raises(ValueError, match="positive and finite"):
        preconditioned_sharpness(op, -p)
    with pytest.raises(ValueError, match="no state"):
        preconditioned_sharpness(model, loss_fn, (X, y), torch.optim.Adam(model.parameters()))
    with pytest.raises(TypeError, match="Cannot read a diagonal"):
        preconditioned_sharpness(model, loss_fn, (X, y), torch.optim.SGD(model.parameters(), lr=0.1))


# ------------------------------------------------------------------------- thresholds
X0 = 1e-14  # tiny start: Adam/RMSprop with eps = 1 keep P = 1 + O(1e-4) up to a 1e6-fold growth


def _run_1d(opt_factory, lam, steps, warmup=100):
    """|x_T| / |x_0| for the torch optimizer on f(x) = 1/2 lam x^2 (stops once grown 1e6-fold).

    ``warmup`` steps with zero gradient first (nothing moves): Adam's bias corrections
    ``1 - b^t`` reach 1, so the measured boundary is the stationary one.
    """
    x = torch.tensor([X0], dtype=torch.float64, requires_grad=True)
    opt = opt_factory([x])
    for t in range(warmup + steps):
        opt.zero_grad()
        (0.5 * (lam if t >= warmup else 0.0) * x[0] ** 2).backward()
        opt.step()
        if abs(float(x.detach()[0])) > 1e6 * X0:
            break
    return abs(float(x.detach()[0])) / X0, opt


THRESHOLD_CASES = [
    ("gd", lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1),
    ("heavy_ball", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (2 + 1.8) / 0.1),
    ("heavy_ball_damp", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5), 3 / (0.5 * 0.1)),
    ("nesterov", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / (0.1 * 2.8)),
    ("sgd_wd", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.5), 2 / 0.1 - 0.5),
    # adaptive: eps = 1 dominates sqrt(v) for gradients <= 1e-3, so P = (1 - b1^t)(1 + O(1e-6)) is frozen
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, eps=1.0), 3.8 / (0.1 * 0.01)),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, eps=1.0), 2 / 0.01),
    ("rmsprop_mom", lambda p: torch.optim.RMSprop(p, lr=0.01, eps=1.0, momentum=0.5), 3 / 0.01),
]


@pytest.mark.parametrize("name,factory,closed_form", THRESHOLD_CASES, ids=[c[0] for c in THRESHOLD_CASES])
def test_threshold_is_the_divergence_boundary_of_the_1d_quadratic(name, factory, closed_form):
    probe = factory([torch.zeros(1, dtype=torch.float64, requires_grad=True)])
    thr = stability_threshold(probe)
    assert thr == pytest.approx(closed_form, rel=1e-12)
    # 3 % either side: the growth rate per step is O(3 %), so 1500 steps separate by many decades
    below, _ = _run_1d(factory, 0.97 * thr, 1500)
    above, _ = _run_1d(factory, 1.03 * thr, 1500)
    assert below < 1.0, f"{name}: converging side grew by {below}"
    assert above > 1e6, f"{name}: diverging side only grew by {above}"


def test_threshold_arguments_and_errors():
    assert stability_threshold(lr=0.5) == 4.0
    assert stability_threshold(lr=0.1, method="adam", beta1=0.9) == pytest.approx(380.0)
    assert stability_threshold(lr=0.1, method="nesterov", momentum=0.5) == pytest.approx(3 / (0.1 * 2))
    p1 = torch.zeros(1, requires_grad=True)
    p2 = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.2}])
    with pytest.raises(ValueError, match="disagree on 'lr'"):
        stability_threshold(opt)
    with pytest.raises(TypeError, match="No stability threshold known"):
        stability_threshold(torch.optim.LBFGS([p1]))
    with pytest.raises(ValueError, match="lr must be a positive"):
        stability_threshold(lr=0.0)
    with pytest.raises(ValueError, match="Unknown method"):
        stability_threshold(lr=0.1, method="lion")
