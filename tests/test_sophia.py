"""Sophia and its diagonal curvature estimators, checked against closed forms and dense truth."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature import DenseOperator, DiagonalOperator
from solvers import GNBEstimator, HutchinsonEstimator, Sophia
from solvers.curvature_estimators import rademacher


Z = 5.0  # z-score for Monte-Carlo checks: a false failure has probability < 1e-6 per coordinate


# --------------------------------------------------------------------------- probes
def test_rademacher_probes_are_pm1_with_equal_probability():
    g = torch.Generator().manual_seed(3)
    n = 200_000
    u = rademacher((n,), generator=g, dtype=torch.float64, device="cpu")
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    plus = int((u == 1).sum())
    # Binomial(n, 1/2): standard deviation sqrt(n)/2
    assert abs(plus - n / 2) < Z * math.sqrt(n) / 2
    # consecutive entries independent: P(u_i = u_{i+1}) = 1/2
    same = int((u[1:] == u[:-1]).sum())
    assert abs(same - (n - 1) / 2) < Z * math.sqrt(n - 1) / 2


# ------------------------------------------------------------------- Hutchinson
def test_hutchinson_exact_on_separable_quadratic():
    a = torch.tensor([3.0, -1.5, 0.25, 7.0, 0.0], dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    est = HutchinsonEstimator([x], seed=0)
    # u * (A u) = a * u^2 = a exactly for +-1 probes (one probe suffices)
    h = est.estimate(lambda: 0.5 * (a * x**2).sum() + x.sum())
    assert isinstance(h, DiagonalOperator)
    torch.testing.assert_close(h.diag, a, rtol=0, atol=1e-15)
    torch.testing.assert_close(est.last_grads[0], a * x.detach() + 1)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_converges_to_hessian_diagonal(distribution):
    g = torch.Generator().manual_seed(1)
    n = 6
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = B @ B.T - 2 * torch.eye(n, dtype=torch.float64)  # indefinite
    x = torch.randn(n, dtype=torch.float64, generator=g).requires_grad_(True)
    # through the loss (double backward) and through a LinearOperator
    M = 400
    est = HutchinsonEstimator([x], distribution=distribution, num_probes=M, seed=2)
    h_loss = est.estimate_tensors(lambda: 0.5 * x @ A @ x + torch.sin(x).sum() * 0)[0]
    M2 = 20_000
    est2 = HutchinsonEstimator([x], distribution=distribution, num_probes=M2, seed=5)
    h_op = est2.estimate(DenseOperator(A)).diag
    off = (A**2).sum(1) - torch.diagonal(A) ** 2
    var = off + (2 * torch.diagonal(A) ** 2 if distribution == "gaussian" else 0)
    for h, m in ((h_loss, M), (h_op, M2)):
        err = (h - torch.diagonal(A)).abs()
        assert bool((err <= Z * torch.sqrt(var / m)).all()), (err, torch.sqrt(var / m))


# -------------------------------------------------------------------------- GNB
def _softmax_regression(seed=0, N=8, D=3, C=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    model = nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, D, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return model, X, y


def _ggn_diag_dense(model, X, loss):
    """diag((1/N) sum_n J_n^T Lambda_n J_n) from explicit Jacobians (independent truth)."""
    params = dict(model.named_parameters())
    names = list(params)

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (X,))

    Js = torch.autograd.functional.jacobian(f, tuple(params.values()))  # each [N, C, *p.shape]
    z = model(X).detach()
    N, C = z.shape
    J = torch.cat([j.reshape(N, C, -1) for j in Js], dim=2)  # [N, C, P]
    if loss == "ce":
        p = torch.softmax(z, -1)
        Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:  # F.mse_loss mean over N*C entries: per row (1/C)||z-y||^2 -> (2/C) I, and 1/N outside
        Lam = (2.0 / C) * torch.eye(C, dtype=z.dtype).expand(N, C, C)
    G = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J) / N
    return torch.diagonal(G)


def _mc_mean_se(est, data, M):
    samples = torch.stack([est.estimate(data).diag for _ in range(M)])
    return samples.mean(0), samples.std(0) / math.sqrt(M)


def test_gnb_ce_converges_to_ggn_diagonal_true_labels_do_not():
    model, X, y = _softmax_regression()
    truth = _ggn_diag_dense(model, X, "ce")
    # closed form for softmax regression: W[c,d]: mean_n p_c(1-p_c) x_d^2, b[c]: mean_n p_c(1-p_c)
    p = torch.softmax(model(X).detach(), -1)
    closed = torch.cat([((p * (1 - p)).T @ X**2 / X.shape[0]).reshape(-1), (p * (1 - p)).mean(0)])
    torch.testing.assert_close(truth, closed, rtol=1e-12, atol=1e-14)
    est = GNBEstimator(model, "ce", seed=0)
    mean, se = _mc_mean_se(est, (X, y), 3000)
    assert bool(((mean - truth).abs() <= Z * se + 1e-12).all())
    # the same formula with the data labels: N * (mean gradient)^2, not the GGN diagonal
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    true_label = X.shape[0] * torch.cat([model.weight.grad.reshape(-1), model.bias.grad]) ** 2
    assert float((true_label - truth).norm() / truth.norm()) > 0.3
    assert bool(((true_label - truth).abs() > Z * se).any())


def test_gnb_mse_converges_to_ggn_diagonal_of_linear_regression():
    g = torch.Generator().manual_seed(4)
    N, D, C = 10, 3, 2
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    model = nn.Linear(D, C).double()
    # linear model + MSE: GGN = Hessian = (2/(N C)) sum_n x x^T per output; diag closed form
    truth = torch.cat([(2.0 / (N * C)) * (X**2).sum(0).repeat(C), torch.full((C,), 2.0 / C, dtype=torch.float64)])
    torch.testing.assert_close(_ggn_diag_dense(model, X, "mse"), truth, rtol=1e-12, atol=1e-14)
    est = GNBEstimator(model, "mse", seed=1)
    mean, se = _mc_mean_se(est, X, 3000)
    assert bool(((mean - truth).abs() <= Z * se).all())


def test_gnb_estimator_is_reproducible_and_leaves_grads_alone():
    model, X, y = _softmax_regression(1)
    a = GNBEstimator(model, "ce", seed=7).estimate_tensors(X)
    b = GNBEstimator(model, "ce", seed=7).estimate_tensors(X)
    c = GNBEstimator(model, "ce", seed=8).estimate_tensors(X)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    assert all(p.grad is None for p in model.parameters())
    assert all(bool((t >= 0).all()) for t in a)


# ------------------------------------------------------------------ the update
def _closed_form_sophia(x0, a, b, T, *, lr, beta1, beta2, gamma, wd, eps, k):
    """Sophia in numpy on f(x) = 1/2 sum a x^2 + b x with the exact diagonal a as estimate."""
    x = x0.copy()
    m = np.zeros_like(x)
    h = np.zeros_like(x)
    xs = []
    for t in range(1, T + 1):
        g = a * x + b
        x = x * (1 - lr * wd)
        m = beta1 * m + (1 - beta1) * g
        x = x - lr * np.clip(m / (np.maximum(gamma * h, 0) + eps), -1, 1)
        if t % k == 0:
            h = beta2 * h + (1 - beta2) * a
        xs.append(x.copy())
    return xs


@pytest.mark.parametrize("foreach", [True, False])
def test_update_equals_closed_form_step_by_step(foreach):
    rng = np.random.default_rng(0)
    a = np.array([4.0, 0.5, -0.3, 2.0, 10.0, 1e-3])
    b = rng.standard_normal(6)
    x0 = rng.standard_normal(6)
    hp = dict(lr=0.05, beta1=0.9, beta2=0.8, gamma=0.5, wd=0.1, eps=1e-12, k=3)
    ref = _closed_form_sophia(x0, a, b, 15, **hp)
    x = torch.tensor(x0, requires_grad=True)
    at, bt = torch.tensor(a), torch.tensor(b)
    est = HutchinsonEstimator([x], seed=0)  # exact on a separable quadratic
    opt = Sophia([x], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), rho=hp["gamma"], weight_decay=hp["wd"],
                 eps=hp["eps"], estimator=est, update_interval=hp["k"], foreach=foreach)

    def loss_fn():
        return 0.5 * (at * x**2).sum() + (bt * x).sum()

    for t in range(15):
        opt.zero_grad()
        loss_fn().backward()
        opt.step(curvature_input=loss_fn)
        np.testing.assert_allclose(x.detach().numpy(), ref[t], rtol=1e-12, atol=1e-14)
    # the estimates at the parameters after steps 3, 6, 9, 12 are taken at the start of steps 4, 7,
    # 10, 13 (same parameters, same numbers); the one after step 15 is due at step 16
    assert opt.num_curvature_updates == 4


def test_first_k_steps_are_sign_momentum_and_steps_are_clipped():
    g = torch.Generator().manual_seed(2)
    k, lr, beta1 = 4, 0.01, 0.9
    x = torch.randn(50, dtype=torch.float64, generator=g).requires_grad_(True)
    A = torch.randn(50, 50, dtype=torch.float64, generator=g)
    A = A @ A.T / 50
    est = HutchinsonEstimator([x], seed=1)
    gamma = 20.0
    opt = Sophia([x], lr=lr, betas=(beta1, 0.9), rho=gamma, weight_decay=0.0, estimator=est, update_interval=k)
    m = torch.zeros_like(x)

    def loss_fn():
        return 0.5 * x @ A @ x + 10 * x.sum()

    for t in range(1, 14):  # step 13 refreshes; the win rate is checked at step 14 (no refresh)
        opt.zero_grad()
        loss_fn().backward()
        grad = x.grad.clone()
        before = x.detach().clone()
        opt.step(curvature_input=loss_fn)
        delta = x.detach() - before
        m = beta1 * m + (1 - beta1) * grad
        assert float(delta.abs().max()) <= lr * (1 + 1e-12)  # every coordinate moves at most lr
        if t <= k:  # no curvature yet: h = 0, every coordinate is clipped
            torch.testing.assert_close(delta, -lr * torch.sign(m), rtol=0, atol=1e-15)
            assert opt.last_win_rate == 0.0
    # the reported win rate is the fraction |m| < gamma h of the step's own (m, h), recomputed here
    # independently for a step with no refresh due
    st = opt.state[x]
    opt.zero_grad()
    loss_fn().backward()
    m_next = beta1 * st["exp_avg"] + (1 - beta1) * x.grad
    expected = float(((m_next / (torch.clamp(gamma * st["hessian"], min=0) + 1e-15)).abs() < 1).double().mean())
    opt.step(curvature_input=loss_fn)
    assert opt.last_win_rate == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1


# ------------------------------------------------------------- state and paths
def _tiny_classifier(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))
    g = torch.Generator().manual_seed(seed + 100)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(30)]
    return model, data


def _train(model, opt, data, steps):
    for X, y in data[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step(curvature_input=X)


def test_state_dict_restore_continues_bit_identically():
    model, data = _tiny_classifier(0)
    opt = Sophia(model.parameters(), lr=0.01, rho=0.05, estimator=GNBEstimator(model, "ce", seed=0),
                 update_interval=3)
    _train(model, opt, data, 7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    snapshot = copy.deepcopy(model)
    _train(model, opt, data[7:], 13)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(snapshot)
    model2.load_state_dict(ckpt["model"])
    opt2 = Sophia(model2.parameters(), lr=0.01, rho=0.05, estimator=GNBEstimator(model2, "ce", seed=12345),
                  update_interval=3)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.num_steps == 7 and opt2.num_curvature_updates == 2
    _train(model2, opt2, data[7:], 13)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    # without the saved RNG state (different seed) the runs differ: the RNG state matters
    model3 = copy.deepcopy(snapshot)
    opt3 = Sophia(model3.parameters(), lr=0.01, rho=0.05, estimator=GNBEstimator(model3, "ce", seed=12345),
                  update_interval=3)
    sd = dict(ckpt["opt"])
    sd["sophia"] = dict(sd["sophia"], estimator_rng_state=None)
    opt3.load_state_dict(sd)
    _train(model3, opt3, data[7:], 13)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), model3.parameters()))


def test_foreach_and_single_tensor_paths_agree():
    runs = []
    for foreach in (True, False):
        model, data = _tiny_classifier(1)
        groups = [{"params": list(model[0].parameters()), "lr": 0.02},
                  {"params": list(model[2].parameters()), "weight_decay": 0.0, "rho": 0.1}]
        opt = Sophia(groups, lr=0.01, rho=0.05, weight_decay=0.2, estimator=GNBEstimator(model, "ce", seed=0),
                     update_interval=4, foreach=foreach)
        _train(model, opt, data, 25)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.last_win_rates))
    (pa, wa), (pb, wb) = runs
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert wa == wb and 0 < max(wa) < 1


# ------------------------------------------------------------------- bad input
def test_bad_hyperparameters_raise():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        Sophia(p, lr=-1e-3)
    with pytest.raises(ValueError, match="rho/gamma"):
        Sophia(p, rho=0.0)
    with pytest.raises(ValueError, match="beta1"):
        Sophia(p, betas=(1.0, 0.99))
    with pytest.raises(ValueError, match="weight_decay"):
        Sophia(p, weight_decay=-0.1)
    with pytest.raises(ValueError, match="eps"):
        Sophia(p, eps=0.0)
    with pytest.raises(TypeError, match="DiagonalCurvatureEstimator"):
        Sophia(p, estimator=object())
    with pytest.raises(ValueError, match="Unknown loss"):
        GNBEstimator(nn.Linear(2, 2), loss="hinge")
    with pytest.raises(ValueError, match="Unknown probe distribution"):
        HutchinsonEstimator(p, distribution="uniform")
    with pytest.raises(ValueError, match="seed= or generator="):
        HutchinsonEstimator(p, seed=1, generator=torch.Generator())


def test_nonfinite_gradients_and_curvature_never_reach_parameters():
    x = torch.ones(4, requires_grad=True)
    opt = Sophia([x], lr=0.1, estimator=HutchinsonEstimator([x], seed=0), update_interval=2)
    x.grad = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        opt.step(curvature_input=lambda: (x**2).sum())
    assert torch.equal(x.detach(), torch.ones(4))
    opt_skip = Sophia([x], lr=0.1, nonfinite="skip", update_interval=None)
    x.grad = torch.tensor([1.0, float("inf"), 0.0, 1.0])
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt_skip.step()
    assert torch.equal(x.detach(), torch.ones(4)) and opt_skip.num_skipped_steps == 1
    opt_skip.update_curvature([torch.full((4,), 2.0)])
    h_before = opt_skip.state[x]["hessian"].clone()
    torch.testing.assert_close(h_before, torch.full((4,), (1 - 0.99) * 2.0))
    with pytest.raises(FloatingPointError, match="curvature estimate"):
        opt_skip.update_curvature([torch.tensor([1.0, float("nan"), 1.0, 1.0])])
    assert torch.equal(opt_skip.state[x]["hessian"], h_before)
    # a refresh step without the estimator's input
    x.grad = torch.ones(4)
    opt.step(curvature_input=lambda: (x**2).sum())
    opt.step(curvature_input=lambda: (x**2).sum())
    assert opt.needs_curvature()
    with pytest.raises(ValueError, match="curvature_input"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        HutchinsonEstimator([x], seed=0).estimate(lambda: x * 2)


def test_external_curvature_as_diagonal_operator():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = Sophia([x], lr=1.0, betas=(0.0, 0.5), rho=1.0, weight_decay=0.0, update_interval=None)
    opt.update_curvature(DiagonalOperator(torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64)))
    x.grad = torch.tensor([1.0, -1.0, 100.0], dtype=torch.float64)
    opt.step()
    # h = 0.5 * 4 = 2 -> step = clip(g / 2, 1) = [0.5, -0.5, 1]
    torch.testing.assert_close(x.detach(), torch.tensor([-0.5, 0.5, -1.0], dtype=torch.float64))
    assert opt.last_win_rate == pytest.approx(2 / 3)


# ------------------------------------------------------------- a language model
def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "sophia_char_lm.py"
    spec = importlib.util.spec_from_file_location("sophia_char_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sophia_decreases_char_lm_loss():
    ex = _load_example()
    res = ex.run_training("sophia", lr=3e-3, setting="fast", seed=0, steps=40)
    first, last = res["loss"][0], float(np.mean(res["loss"][-5:]))
    # uniform over the vocabulary is log(V); the loss must fall well below where it started
    assert first == pytest.approx(math.log(res["vocab_size"]), rel=0.15)
    assert last < first - 0.5


# ------------------------------------------------------------- failure behaviour
def _sophia_snapshot(opt, x):
    st = opt.state[x]
    return (x.detach().clone(), st["exp_avg"].clone(), st["hessian"].clone(), st["step"].clone(),
            opt.num_steps, opt.num_curvature_updates, opt.estimator.get_rng_state().clone())


def _same(a, b):
    return all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(a, b))


def test_nonfinite_curvature_estimate_raises_before_anything_is_written():
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    good = lambda: (x**2).sum()  # noqa: E731
    bad = lambda: (x**2).sum() * torch.tensor(float("nan"), dtype=torch.float64)  # NaN Hessian  # noqa: E731
    opt = Sophia([x], lr=0.1, weight_decay=0.1, estimator=HutchinsonEstimator([x], seed=0), update_interval=2)
    for _ in range(2):
        x.grad = 2 * x.detach()
        opt.step(curvature_input=good)
    assert opt.needs_curvature()
    before = _sophia_snapshot(opt, x)
    x.grad = 2 * x.detach()
    with pytest.raises(FloatingPointError, match="curvature estimate has NaN/inf"):
        opt.step(curvature_input=bad)
    assert _same(_sophia_snapshot(opt, x), before)  # parameters, buffers, counters and RNG as before
    # the step then succeeds with a finite estimate, exactly as if the failed call never happened
    twin = copy.deepcopy(opt)
    opt.step(curvature_input=good)
    xt = twin.param_groups[0]["params"][0]
    xt.grad = 2 * xt.detach()
    twin.step(curvature_input=lambda: (xt**2).sum())
    assert torch.equal(x.detach(), xt.detach()) and opt.num_curvature_updates == 1
    # nonfinite="skip": warned, counted, nothing written, the refresh is retried at the next step
    opt_skip = Sophia([x], lr=0.1, estimator=HutchinsonEstimator([x], seed=0), update_interval=1,
                      nonfinite="skip")
    x.grad = 2 * x.detach()
    opt_skip.step(curvature_input=good)
    before = _sophia_snapshot(opt_skip, x)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt_skip.step(curvature_input=bad)
    assert _same(_sophia_snapshot(opt_skip, x), before) and opt_skip.num_skipped_steps == 1
    assert opt_skip.needs_curvature()


def test_finite_gradient_with_overflowing_norm_is_not_called_nonfinite():
    # float32 entries 1e30: the squared norm overflows to inf, every entry is finite
    x = torch.zeros(4, dtype=torch.float32, requires_grad=True)
    opt = Sophia([x], lr=0.5, betas=(0.0, 0.5), rho=1.0, weight_decay=0.0, update_interval=None)
    x.grad = torch.tensor([1e30, -1e30, 3e29, 0.0])
    opt.step()
    torch.testing.assert_close(x.detach(), torch.tensor([-0.5, 0.5, -0.5, 0.0]))  # h = 0: sign steps
    opt.update_curvature([torch.full((4,), 1e30)])  # a finite estimate with an overflowing norm
    torch.testing.assert_close(opt.state[x]["hessian"], torch.full((4,), 0.5e30))
    x.grad = torch.tensor([float("inf"), 0.0, 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="gradient has NaN/inf"):
        opt.step()


def test_sophia_without_estimator_is_refused_or_warns_in_manual_mode():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="needs a curvature estimator"):
        Sophia([x], lr=1e-3)
    opt = Sophia([x], lr=1e-3, update_interval=None)  # manual mode: curvature through update_curvature
    x.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(99):
            opt.step()
    with pytest.warns(RuntimeWarning, match="100 steps without any curvature"):
        opt.step()
    # after one update_curvature call manual mode is silent
    opt2 = Sophia([x], lr=1e-3, update_interval=None)
    opt2.update_curvature([torch.ones(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(120):
            opt2.step()


# ------------------------------------------------------------- the official recipe
def test_official_lr_schedule_closed_form():
    from solvers import official_lr

    kw = dict(lr=6e-4, warmup_iters=200, lr_decay_iters=1200, min_lr=1.5e-5)
    assert official_lr(0, **kw) == 0.0  # the official warmup starts at 0
    assert official_lr(100, **kw) == pytest.approx(3e-4, rel=1e-15)
    assert official_lr(200, **kw) == pytest.approx(6e-4, rel=1e-15)
    assert official_lr(700, **kw) == pytest.approx((6e-4 + 1.5e-5) / 2, rel=1e-14)  # cosine midpoint
    assert official_lr(1200, **kw) == pytest.approx(1.5e-5, rel=1e-14)
    assert official_lr(5000, **kw) == 1.5e-5


class _OfficialSophiaG:
    """The update of Liuhong99/Sophia ``sophia.py`` (``SophiaG.step``, ``update_hessian``), line for line."""

    def __init__(self, groups, lr, betas, rho, weight_decay):
        self.param_groups = [dict(g, lr=lr, betas=betas, rho=rho) for g in groups]
        self.state = {}

    @torch.no_grad()
    def update_hessian(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(p, {"exp_avg": torch.zeros_like(p), "hessian": torch.zeros_like(p)})
                st["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, bs):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(p, {"exp_avg": torch.zeros_like(p), "hessian": torch.zeros_like(p)})
                p.mul_(1 - group["lr"] * group["weight_decay"])
                st["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (st["exp_avg"].abs() / (group["rho"] * bs * st["hessian"] + 1e-15)).clamp(None, 1)
                p.addcmul_(st["exp_avg"].sign(), ratio, value=-group["lr"])

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def _official_groups(model, weight_decay):
    """GPT.configure_optimizers of the official model.py, independently of official_param_groups."""
    decay, no_decay = set(), set()
    for mn, m in model.named_modules():
        for pn, _ in m.named_parameters(recurse=False):
            fpn = f"{mn}.{pn}" if mn else pn
            if pn.endswith("bias"):
                no_decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, nn.Linear):
                decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, (nn.LayerNorm, nn.Embedding)):
                no_decay.add(fpn)
    decay.remove("lm_head.weight")  # tied to the token embedding
    pd = dict(model.named_parameters())
    return [{"params": [pd[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [pd[n] for n in sorted(no_decay) if n in pd], "weight_decay": 0.0}]


def test_sophiag_recipe_equals_the_official_training_loop():
    from solvers import SophiaGRecipe, official_param_groups

    ex = _load_example()
    train, _, V = ex.make_data(seed=0, train_sentences=200)
    cfg = ex.GPTConfig(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    ours = ex.GPT(cfg).double()
    theirs = copy.deepcopy(ours)
    B, T, iters, k, warmup, lr, min_lr, wd, rho, clip = 4, 8, 32, 10, 5, 2e-2, 1e-3, 0.2, 0.05, 1.0
    g_ours, g_theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    recipe = SophiaGRecipe(ours, lambda: ex.get_batch(train, B, T, g_ours), lr=lr, rho=rho, weight_decay=wd,
                           update_interval=k, grad_clip=clip, max_iters=iters, warmup_iters=warmup, min_lr=min_lr,
                           seed=11)
    # the weight-decay split is the official one
    names = {id(p): n for n, p in ours.named_parameters()}
    ref_names = {id(p): n for n, p in theirs.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in official_param_groups(ours, wd)] == \
        [[ref_names[id(p)] for p in g["params"]] for g in _official_groups(theirs, wd)]
    # the official loop of train_sophiag.py, with its get_lr and the same label sampler (seed 11)
    off = _OfficialSophiaG(_official_groups(theirs, wd), lr, (0.965, 0.99), rho, wd)
    labels = torch.Generator().manual_seed(11)
    bs = B * T

    def get_lr(it):
        if it < warmup:
            return lr * it / warmup
        ratio = (it - warmup) / (iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    X, Y = ex.get_batch(train, B, T, g_theirs)
    for it in range(iters):
        for group in off.param_groups:
            group["lr"] = get_lr(it)
        logits = theirs(X)
        loss = F.cross_entropy(logits.view(-1, V), Y.view(-1), ignore_index=-1)
        X, Y = ex.get_batch(train, B, T, g_theirs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip)
        off.step(bs=bs)
        off.zero_grad()
        if it % k == k - 1:
            logits = theirs(X)
            X, Y = ex.get_batch(train, B, T, g_theirs)
            with torch.no_grad():  # inverse-CDF sampling from the model's predictive distribution
                cdf = torch.softmax(logits.reshape(-1, V).float(), -1).cumsum(-1)
                u = torch.rand(cdf.shape[0], 1, generator=labels, dtype=cdf.dtype)
                y_sample = (cdf < u).sum(-1).clamp(max=V - 1)
            F.cross_entropy(logits.view(-1, V), y_sample, ignore_index=-1).backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip)
            off.update_hessian()
            off.zero_grad()
        loss_ours = recipe.step()
        assert float(loss_ours) == pytest.approx(float(loss.detach()), rel=1e-12, abs=1e-12)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-11)
    assert recipe.optimizer.num_curvature_updates == 3  # after iterations 9, 19, 29
    for p, q in zip(ours.parameters(), theirs.parameters()):  # ours stores h = bs * official h
        torch.testing.assert_close(recipe.optimizer.state[p]["hessian"], bs * off.state[q]["hessian"],
                                   rtol=1e-11, atol=1e-13)
    assert 0 < recipe.optimizer.last_win_rate < 1
