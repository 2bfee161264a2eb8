"""NewtonCG (damped Hessian-free / Gauss-Newton / Fisher optimizer), checked against dense truth.

Dense truth is built independently of the operators: the GGN from the explicit
Jacobian of the model outputs (``torch.func.jacrev``), the Hessian by
``torch.autograd.functional.hessian`` of the loss as a function of the flat parameters,
least-squares solutions by ``torch.linalg.lstsq``.  Everything exact runs in float64.
"""

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import curvature as C
from solvers import NewtonCG
from solvers.newton_cg import diagonal_preconditioner

DT = torch.float64


# ---------------------------------------------------------------- problems
def _data(n=64, d=4, m=2, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    W = torch.randn(d, m, generator=g, dtype=DT)
    y = torch.tanh(X @ W) + noise * torch.randn(n, m, generator=g, dtype=DT)
    return X, y


def _linear(d=4, m=2, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(d, m).to(DT)


def _mlp(d=4, h=8, m=2, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, m)).to(DT)


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def _loss_of_flat(model, params, loss_fn, X, y):
    """``theta -> loss`` with ``params`` (a subset of the model's) replaced by ``theta``."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]

    def f(theta):
        return loss_fn(functional_call(model, dict(zip(keys, C.unflatten(theta, shapes))), (X,)), y)

    def out(theta):
        return functional_call(model, dict(zip(keys, C.unflatten(theta, shapes))), (X,))

    return f, out


def _dense_truth(model, params, X, y):
    """Loss, gradient, GGN (explicit Jacobians) and Hessian of the mean MSE at the params."""
    loss_fn = nn.MSELoss()
    f, out = _loss_of_flat(model, params, loss_fn, X, y)
    theta = _flat(params)
    J = jacrev(out)(theta).reshape(-1, theta.numel())  # [N*m, n]
    z = out(theta).detach()
    N_m = z.numel()
    G = 2.0 / N_m * J.T @ J  # MSE mean over N*m entries: Lambda = (2 / (N m)) I
    g = 2.0 / N_m * J.T @ (z - y).reshape(-1)
    H = torch.autograd.functional.hessian(f, theta)
    return float(f(theta).detach()), g, G, H, f


# ------------------------------------------------------------ exact steps
def test_least_squares_one_step_lands_on_lstsq_solution():
    X, y = _data(n=50, d=4, m=2)
    model = _linear()
    opt = NewtonCG(model.parameters(), model=model, loss_fn=nn.MSELoss(), damping=0.0,
                   adapt_damping=False, cg_tol=1e-14, cg_maxiter=200, warm_start=False)
    opt.step(batch=(X, y))
    A = torch.cat([X, torch.ones(50, 1, dtype=DT)], dim=1)
    sol = torch.linalg.lstsq(A, y).solution  # [5, 2]: W^T stacked on b
    assert opt.info["status"] == "accepted"
    cond = torch.linalg.cond(A.T @ A)
    tol = 1e-12 * float(cond)  # CG residual 1e-14 relative, amplified by cond(G)
    assert torch.allclose(model.weight, sol[:4].T, rtol=tol, atol=tol)
    assert torch.allclose(model.bias, sol[4], rtol=tol, atol=tol)
    assert opt.info["rho"] == pytest.approx(1.0, abs=1e-8)  # quadratic model exact


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_damped_step_equals_dense_solve(curvature):
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    f0, g, G, H, _ = _dense_truth(model, params, X, y)
    M = G if curvature == "ggn" else H
    lam = 0.1 + max(0.0, -float(torch.linalg.eigvalsh(M)[0]))  # M + lam I positive definite
    expected = -torch.linalg.solve(M + lam * torch.eye(len(g), dtype=DT), g)
    theta0 = _flat(params)
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), curvature=curvature, damping=lam,
                   cg_tol=1e-13, cg_maxiter=500, reject_increase=False)
    loss = opt.step(batch=(X, y))
    assert float(loss.detach()) == pytest.approx(f0, rel=1e-14)
    step = _flat(params) - theta0
    assert torch.allclose(step, expected, rtol=1e-9, atol=1e-11 * float(expected.norm()))
    pred = float(g @ expected + 0.5 * expected @ M @ expected)
    assert opt.info["predicted_reduction"] == pytest.approx(pred, rel=1e-9)
    assert opt.info["damping"] == lam


def test_step_over_parameter_subset_with_user_closure():
    """Only the last layer is optimized: the curvature is the GGN block of those params."""
    X, y = _data(n=40)
    model = _mlp()
    params = list(model[2].parameters())
    f0, g, G, _, _ = _dense_truth(model, params, X, y)
    lam = 0.05
    expected = -torch.linalg.solve(G + lam * torch.eye(len(g), dtype=DT), g)
    first = _flat(model[0].parameters())
    theta0 = _flat(params)
    loss_fn = nn.MSELoss()
    opt = NewtonCG(params, model=model, loss_fn=loss_fn, damping=lam, cg_tol=1e-13, cg_maxiter=300)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    opt.step(closure, batch=(X, y))
    assert opt.info["status"] == "accepted"
    assert torch.allclose(_flat(params) - theta0, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(_flat(model[0].parameters()), first)  # not the optimizer's: untouched
    # .grad holds the gradient at the starting point, not at the trial point
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in params]), g, rtol=1e-12, atol=1e-14)


def test_curvature_on_a_sub_batch():
    """Martens' setting: gradient on the batch, curvature on a part of it."""
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    _, g, _, _, _ = _dense_truth(model, params, X, y)
    _, _, G_sub, _, _ = _dense_truth(model, params, X[:10], y[:10])
    lam = 0.05
    expected = -torch.linalg.solve(G_sub + lam * torch.eye(len(g), dtype=DT), g)
    theta0 = _flat(params)
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), damping=lam, cg_tol=1e-13,
                   cg_maxiter=500, reject_increase=False)
    opt.step(batch=(X, y), curvature_batch=(X[:10], y[:10]))
    assert torch.allclose(_flat(params) - theta0, expected, rtol=1e-9, atol=1e-12)
    assert opt.info["predicted_reduction"] == pytest.approx(
        float(g @ expected + 0.5 * expected @ G_sub @ expected), rel=1e-9)


def test_exact_preconditioner_solves_in_one_cg_iteration():
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    _, g, G, _, _ = _dense_truth(model, params, X, y)
    lam = 0.05
    A = G + lam * torch.eye(len(g), dtype=DT)
    seen = []

    def precond(ps, batch, damping):
        seen.append(damping)
        return C.DenseOperator(torch.linalg.inv(A), is_symmetric=True)

    theta0 = _flat(params)
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), damping=lam, cg_tol=1e-10,
                   preconditioner=precond, reject_increase=False)
    opt.step(batch=(X, y))
    assert seen == [lam] and opt.info["cg_iterations"] == 1
    assert torch.allclose(_flat(params) - theta0, -torch.linalg.solve(A, g), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_martens_diagonal_preconditioner_matches_per_example_loop(reduction):
    X, y = _data(n=12)
    model = _mlp()
    params = list(model.parameters())[2:]  # the last layer only
    loss_fn = nn.MSELoss(reduction=reduction)
    lam = 0.3
    M_inv = diagonal_preconditioner(model, loss_fn)(params, (X, y), lam)
    sq = torch.zeros(sum(p.numel() for p in params), dtype=DT)
    for i in range(12):  # per-example gradients the slow way
        gi = torch.autograd.grad(loss_fn(model(X[i:i + 1]), y[i:i + 1]), params)
        sq += torch.cat([t.reshape(-1) for t in gi]) ** 2
    if reduction == "mean":
        sq /= 12
    assert torch.allclose(M_inv.diagonal(), (sq + lam) ** -0.75, rtol=1e-12)


def test_diagonal_preconditioner_speeds_up_truncated_cg():
    """Same CG budget, with Martens' preconditioner the GGN system is solved further."""
    X, y = _data(n=64, d=4, m=2, seed=4)
    residuals = []
    for pre in (None, diagonal_preconditioner):
        model = _mlp(seed=6)
        params = list(model.parameters())
        _, g, G, _, _ = _dense_truth(model, params, X, y)
        lam = 1e-4
        exact = -torch.linalg.solve(G + lam * torch.eye(len(g), dtype=DT), g)
        theta0 = _flat(params)
        opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), damping=lam, cg_maxiter=10,
                       reject_increase=False, preconditioner=None if pre is None else pre(model, nn.MSELoss()))
        opt.step(batch=(X, y))
        d = _flat(params) - theta0
        residuals.append(float(((G + lam * torch.eye(len(g), dtype=DT)) @ d + g).norm() / g.norm()))
        assert float(d @ (G + lam * torch.eye(len(g), dtype=DT)) @ exact) > 0
    assert residuals[1] < residuals[0]


# ---------------------------------------------------- Levenberg-Marquardt
@pytest.mark.parametrize(
    "scale, factor, accepted",
    [(1.0, 2.0 / 3.0, True),  # exact quadratic model: rho = 1 -> lambda down
     (0.6, 1.0, True),  # rho = 1/3 in [1/4, 3/4] -> unchanged
     (0.01, 1.5, False)],  # curvature 100x too small: overshoot, loss goes up -> lambda up
)
def test_rho_closed_form_and_damping_update(scale, factor, accepted):
    """Least squares is exactly quadratic, so rho has a closed form for a mis-scaled curvature."""
    X, y = _data(n=50)
    model = _linear()
    params = list(model.parameters())
    f0, g, G, _, f = _dense_truth(model, params, X, y)
    lam = 1e-3
    factory = lambda ps, batch: C.DenseOperator(scale * G, is_symmetric=True)  # noqa: E731
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), curvature=factory, damping=lam,
                   cg_tol=1e-13, cg_maxiter=200, warm_start=False)
    theta0 = _flat(params)
    opt.step(batch=(X, y))
    s = -torch.linalg.solve(scale * G + lam * torch.eye(len(g), dtype=DT), g)
    predicted = float(g @ s + 0.5 * scale * (s @ G @ s))
    actual = float(g @ s + 0.5 * (s @ G @ s))  # exact change of a quadratic
    info = opt.info
    assert info["predicted_reduction"] == pytest.approx(predicted, rel=1e-9)
    assert info["actual_reduction"] == pytest.approx(actual, rel=1e-8, abs=1e-13 * f0)
    assert info["rho"] == pytest.approx(actual / predicted, rel=1e-8)
    assert info["accepted"] is accepted
    assert opt.damping == pytest.approx(lam * factor, rel=1e-15)
    if not accepted:
        assert torch.equal(_flat(params), theta0)


def test_rho_hand_computed_on_mlp_and_damping_trajectory():
    """Nonlinear model: rho against loss differences evaluated by hand; lambda follows the rule."""
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), damping=1e-2, cg_tol=1e-12,
                   cg_maxiter=300, reject_increase=False)
    lam = 1e-2
    seen = set()
    for _ in range(6):
        f0, g, G, _, f = _dense_truth(model, params, X, y)
        theta0 = _flat(params)
        opt.step(batch=(X, y))
        s = _flat(params) - theta0
        rho = (float(f(theta0 + s)) - f0) / float(g @ s + 0.5 * s @ G @ s)
        assert opt.info["rho"] == pytest.approx(rho, rel=1e-7)
        expected = lam * (1.5 if rho < 0.25 else 2.0 / 3.0 if rho > 0.75 else 1.0)
        assert opt.damping == pytest.approx(expected, rel=1e-14)
        seen.add("up" if rho < 0.25 else "down" if rho > 0.75 else "same")
        lam = expected
    assert "down" in seen


def test_huge_step_rejected_then_damping_recovers():
    """From a poor model agreement lambda grows (boosted on repeated rejections) until steps pass."""
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    _, _, G, _, _ = _dense_truth(model, params, X, y)
    weak = lambda ps, batch: C.DenseOperator(1e-3 * G, is_symmetric=True)  # noqa: E731
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), curvature=weak, damping=1e-6,
                   damping_increase=10.0, cg_tol=1e-10, cg_maxiter=300)
    statuses, lam, in_a_row = [], 1e-6, 0
    for _ in range(8):
        opt.step(batch=(X, y))
        info = opt.info
        statuses.append(info["status"])
        if info["accepted"]:
            in_a_row = 0
            rho = info["rho"]
            lam *= 10.0 if rho < 0.25 else 2.0 / 3.0 if rho > 0.75 else 1.0
        else:
            in_a_row += 1
            lam *= 10.0**in_a_row  # k-th rejection in a row: factor increase**k
        assert opt.damping == pytest.approx(lam, rel=1e-13)
    assert statuses[:2] == ["rejected: loss increased"] * 2
    assert "accepted" in statuses


def test_warm_start_from_decayed_previous_direction():
    """One CG iteration from x0 = 0.95 d_prev, on an exact quadratic, computed by hand."""
    X, y = _data(n=50)
    model = _linear()
    params = list(model.parameters())
    _, g1, G, _, _ = _dense_truth(model, params, X, y)
    lam = 0.1
    A = G + lam * torch.eye(len(g1), dtype=DT)
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), damping=lam, adapt_damping=False,
                   cg_maxiter=1, cg_tol=1e-14)
    theta0 = _flat(params)
    opt.step(batch=(X, y))
    d1 = _flat(params) - theta0
    r = -g1  # first solve: one CG iteration from zero = the Cauchy step
    assert torch.allclose(d1, (r @ r) / (r @ A @ r) * r, rtol=1e-12, atol=1e-15)
    _, g2, _, _, _ = _dense_truth(model, params, X, y)
    theta1 = _flat(params)
    opt.step(batch=(X, y))
    x0 = 0.95 * d1
    r = -g2 - A @ x0
    expected = x0 + (r @ r) / (r @ A @ r) * r
    assert opt.info["accepted"]
    assert torch.allclose(_flat(params) - theta1, expected, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- safety
def test_nan_trial_loss_never_lands_in_parameters():
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    loss_fn = nn.MSELoss()
    calls = []
    opt = NewtonCG(params, model=model, loss_fn=loss_fn, damping=0.1, adapt_damping=False)

    def closure():
        opt.zero_grad()
        calls.append(1)
        loss = loss_fn(model(X), y)
        if len(calls) == 2:  # the trial point
            loss = loss * float("nan")
        loss.backward()
        return loss

    theta0 = _flat(params)
    _, g, _, _, _ = _dense_truth(model, params, X, y)
    opt.step(closure, batch=(X, y))
    assert opt.info["status"] == "rejected: non-finite trial loss"
    assert torch.equal(_flat(params), theta0)
    assert opt.damping == pytest.approx(0.15)  # increased even with adapt_damping=False
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    assert bool(torch.isfinite(grads).all()) and torch.allclose(grads, g, rtol=1e-12, atol=1e-15)


def test_nonfinite_curvature_rejected_and_damping_increased():
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    bad = lambda ps, batch: C.CallableOperator(  # noqa: E731
        lambda V: V * float("inf"), (n, n), dtype=DT, is_symmetric=True)
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss(), curvature=bad, damping=1e-3)
    theta0 = _flat(params)
    opt.step(batch=(X, y))
    assert opt.info["status"] == "rejected: non-finite direction"
    assert torch.equal(_flat(params), theta0)
    assert opt.damping == pytest.approx(1.5e-3)


def test_nonfinite_loss_at_start_raises_and_changes_nothing():
    X, y = _data(n=40)
    model = _mlp()
    params = list(model.parameters())
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss())
    theta0 = _flat(params)
    with pytest.raises(FloatingPointError, match="not finite; no step was taken"):
        opt.step(lambda: torch.tensor(float("nan"), dtype=DT), batch=(X, y))
    assert torch.equal(_flat(params), theta0)


# ------------------------------------------------------------ state dict
def _batches(k, seed=3):
    X, y = _data(n=32 * k, seed=seed)
    return [(X[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(k)]


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])  # MC Fisher: labels seeded by seed + step
def test_state_dict_round_trip_is_bit_identical(curvature):
    batches = _batches(6)
    model = _mlp()
    kw = dict(loss_fn=nn.MSELoss(), damping=1e-2, cg_maxiter=20, max_step_norm=1.0, curvature=curvature)
    opt = NewtonCG(model.parameters(), model=model, **kw)
    for b in batches[:3]:
        opt.step(batch=b)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_model = copy.deepcopy(model)
    for b in batches[3:]:
        opt.step(batch=b)
    buf.seek(0)
    model2 = copy.deepcopy(saved_model)
    opt2 = NewtonCG(model2.parameters(), model=model2, **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for b in batches[3:]:
        opt2.step(batch=b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.damping == opt.damping
    # the state matters: a fresh optimizer does not reproduce the continuation
    model3 = copy.deepcopy(saved_model)
    opt3 = NewtonCG(model3.parameters(), model=model3, **kw)
    for b in batches[3:]:
        opt3.step(batch=b)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), model3.parameters()))


# -------------------------------------------------------- Fisher = GGN (CE)
def test_exact_fisher_steps_equal_ggn_steps_for_cross_entropy():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (60,), generator=g)
    results = []
    for curvature, kwargs in [("ggn", None), ("fisher", {"kind": "exact"})]:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        opt = NewtonCG(model.parameters(), model=model, loss_fn=nn.CrossEntropyLoss(),
                       curvature=curvature, curvature_kwargs=kwargs, cg_tol=1e-12, cg_maxiter=200)
        for _ in range(3):
            opt.step(batch=(X, y))
        results.append(_flat(model.parameters()))
    # F = G for softmax cross-entropy (an exponential family in the logits): same steps
    assert torch.allclose(results[0], results[1], rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------- training
def test_newton_cg_beats_sgd_on_mlp_regression():
    X, y = _data(n=256, d=5, m=3, seed=7, noise=0.05)
    loss_fn = nn.MSELoss()
    iters = 15

    def run_sgd(lr):
        model = _mlp(d=5, h=16, m=3, seed=11)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(iters):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
        with torch.no_grad():
            return float(loss_fn(model(X), y))

    sgd = min(run_sgd(lr) for lr in (0.1, 0.3, 1.0, 3.0))  # best of a grid: a fair baseline
    model = _mlp(d=5, h=16, m=3, seed=11)
    opt = NewtonCG(model.parameters(), model=model, loss_fn=loss_fn, cg_maxiter=50)
    for _ in range(iters):
        opt.step(batch=(X, y))
    with torch.no_grad():
        newton = float(loss_fn(model(X), y))
    assert math.isfinite(newton) and newton < 0.5 * sgd


# ---------------------------------------------------------------- errors
def _opt(**kw):
    model = _mlp()
    base = dict(model=model, loss_fn=nn.MSELoss())
    base.update(kw)
    return NewtonCG(model.parameters(), **base)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lr=-1.0), ValueError, "Invalid learning rate"),
        (dict(lr=0.0), ValueError, "Invalid learning rate"),
        (dict(damping=-1e-3), ValueError, "Invalid damping value"),
        (dict(cg_maxiter=0), ValueError, "Invalid cg_maxiter value"),
        (dict(cg_maxiter=2.5), ValueError, "Invalid cg_maxiter value"),
        (dict(cg_tol=0.0), ValueError, "Invalid cg_tol value"),
        (dict(damping_increase=0.5), ValueError, "Invalid damping_increase"),
        (dict(damping_decrease=1.5), ValueError, "Invalid damping_decrease"),
        (dict(min_damping=1.0, max_damping=0.1), ValueError, "Invalid damping bounds"),
        (dict(max_step_norm=-1.0), ValueError, "Invalid max_step_norm"),
        (dict(warm_start_decay=2.0), ValueError, "Invalid warm_start_decay"),
        (dict(curvature="kfac"), ValueError, "unknown curvature 'kfac'"),
        (dict(curvature=3), TypeError, "curvature must be one of"),
        (dict(model=None), ValueError, "needs the model and the loss"),
        (dict(preconditioner="jacobi"), TypeError, "preconditioner must be a callable"),
    ],
)
def test_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _opt(**kwargs)


def test_bad_usage_raises():
    model = _mlp()
    with pytest.raises(ValueError, match="parameter groups"):
        NewtonCG([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                 model=model, loss_fn=nn.MSELoss())
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        NewtonCG(model.parameters(), model=model, loss_fn=nn.MSELoss())
    model[0].weight.requires_grad_(True)
    opt = NewtonCG(model.parameters(), model=model, loss_fn=nn.MSELoss())
    with pytest.raises(ValueError, match="needs a closure or a batch"):
        opt.step()
    X, y = _data(n=8)

    def closure():
        opt.zero_grad()
        loss = nn.MSELoss()(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="needs the batch"):
        opt.step(closure)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: (model(X) - y).pow(2), batch=(X, y))
    with pytest.raises(ValueError, match="pair \\(X, y\\)"):
        opt.step(batch=X)
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="must call loss.backward"):
        opt.step(lambda: nn.MSELoss()(model(X), y), batch=(X, y))
    wrong = lambda ps, batch: C.IdentityOperator(3, dtype=DT)  # noqa: E731
    opt = NewtonCG(model.parameters(), curvature=wrong)
    with pytest.raises(ValueError, match="exactly the optimizer's parameters"):
        opt.step(closure)


def test_error_in_closure_at_trial_point_restores_parameters():
    X, y = _data(n=20)
    model = _mlp()
    params = list(model.parameters())
    calls = []
    opt = NewtonCG(params, model=model, loss_fn=nn.MSELoss())

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. the user stops training during the trial evaluation
        opt.zero_grad()
        loss = nn.MSELoss()(model(X), y)
        loss.backward()
        return loss

    theta0 = _flat(params)
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure, batch=(X, y))
    assert torch.equal(_flat(params), theta0)


def test_diagonal_preconditioner_needs_a_plain_pair():
    """Per-example gradients vmap over X: a 3-entry or dict batch is refused, never read as (X1, y)."""
    X, y = _data(n=6)
    model = _mlp()
    pre = diagonal_preconditioner(model, nn.MSELoss())
    for batch in ((X, X, y), {"input": X, "labels": y}):
        with pytest.raises(ValueError, match="must be a pair"):
            pre(list(model.parameters()), batch, 1e-3)
