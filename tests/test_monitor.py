"""SharpnessMonitor: exact values against dense Hessians, no effect on training, rules, exports."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from torch import nn

from estimators.monitor import SharpnessMonitor
from estimators.sharpness import optimizer_preconditioner
from tests.dense_truth import dense_gradient, dense_hessian
from tests.models import make_case

EPS = torch.finfo(torch.float64).eps


def _gd_step(model, loss_fn, X, y, opt):
    opt.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()
    return loss


def test_tracked_sharpness_equals_dense_eigvalsh_at_every_measurement():
    model, loss_fn, (X, y) = make_case("mlp", n=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = SharpnessMonitor(model, loss_fn, (X, y), opt, every=3, k=2, tol=1e-8,
                           track_grad_alignment=True)
    checked = 0
    for t in range(13):
        rec = mon.step(t)
        if rec is not None:
            H = dense_hessian(model, loss_fn, X, y)
            w, V = torch.linalg.eigh(H)
            scale = float(w.abs().max())
            # eigenvalue error <= residual; the Lanczos residual is below tol * |theta|
            for i in range(2):
                assert abs(rec.eigenvalues[i] - float(w[-1 - i])) <= 1e-8 * scale + 1e3 * EPS * scale
            assert rec.sharpness == rec.eigenvalues[0]
            assert rec.threshold == pytest.approx(2 / 0.5) and rec.ratio == pytest.approx(rec.sharpness / 4.0)
            g = dense_gradient(model, loss_fn, X, y)
            assert rec.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
            assert rec.loss == pytest.approx(loss_fn(model(X), y).item(), rel=1e-12)
            # alignment with the exact top-2 subspace; eigenvector error <= residual / gap
            Vk = V[:, -2:]
            exact = float((Vk.T @ g).norm() / g.norm())
            gap = float(w[-2] - w[-3])
            assert abs(rec.grad_alignment - exact) <= 4 * 1e-8 * scale / gap + 1e-12
            checked += 1
        _gd_step(model, loss_fn, X, y, opt)
    assert checked == 5 and [r.step for r in mon.history] == [0, 3, 6, 9, 12]


def test_warm_started_monitor_agrees_with_cold_and_uses_fewer_products():
    model, loss_fn, (X, y) = make_case("regression", n=16)
    model_b = copy.deepcopy(model)
    runs = {}
    for warm, m in ((True, model), (False, model_b)):
        opt = torch.optim.SGD(m.parameters(), lr=0.3)
        mon = SharpnessMonitor(m, loss_fn, (X, y), opt, every=2, tol=1e-8, warm_start=warm)
        for t in range(20):
            mon.step(t)
            _gd_step(m, loss_fn, X, y, opt)
        runs[warm] = mon
    scale = max(abs(r.sharpness) for r in runs[False].history)
    for a, b in zip(runs[True].history, runs[False].history):
        assert abs(a.sharpness - b.sharpness) <= 2e-8 * scale
    warm_mv = [r.num_matvecs for r in runs[True].history[1:]]
    cold_mv = [r.num_matvecs for r in runs[False].history[1:]]
    assert sum(warm_mv) < sum(cold_mv)


def test_preconditioned_monitor_matches_dense_and_adam_threshold():
    model, loss_fn, (X, y) = make_case("regression", n=16)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=0.01)
    mon = SharpnessMonitor(model, loss_fn, (X, y), opt, every=4, preconditioned=True, tol=1e-8)
    with pytest.raises(ValueError, match="no state"):
        mon.measure(0)
    mon.history.clear()
    for t in range(1, 13):
        _gd_step(model, loss_fn, X, y, opt)
        rec = mon.step(t)
        if rec is not None:
            H = dense_hessian(model, loss_fn, X, y)
            d = optimizer_preconditioner(opt, params).rsqrt()
            lam = float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1])
            assert abs(rec.preconditioned_sharpness - lam) <= 1e-8 * lam + 1e3 * EPS * lam
            assert rec.preconditioned_threshold == pytest.approx(3.8 / (0.1 * 0.01))
            assert rec.threshold is None  # raw sharpness has no threshold under Adam
    assert len(mon.history) == 3
    with pytest.raises(ValueError, match="adaptive optimizer"):
        SharpnessMonitor(model, loss_fn, (X, y), torch.optim.SGD(params, lr=0.1), preconditioned=True)


def _train(model, loss_fn, X, y, opt, steps, monitor=None, seed=0):
    torch.manual_seed(seed)
    model.train()
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(t)
    return torch.get_rng_state()


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum"])
def test_monitor_does_not_change_training(opt_name):
    """BatchNorm + dropout in train mode, an optimizer with state: bit-identical with and without."""
    model_a, loss_fn, (X, y) = make_case("batchnorm", n=16)
    model_b = copy.deepcopy(model_a)

    def make(m):
        if opt_name == "adam":
            return torch.optim.Adam(m.parameters(), lr=0.01)
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    opt_a, opt_b = make(model_a), make(model_b)
    rng_a = _train(model_a, loss_fn, X, y, opt_a, 12)
    mon = SharpnessMonitor(model_b, loss_fn, (X, y), opt_b, every=3, k=2, track_grad_alignment=True,
                           preconditioned=(opt_name == "adam"), seed=5)
    rng_b = _train(model_b, loss_fn, X, y, opt_b, 12, monitor=mon)
    assert len(mon.history) == 4 and all(r.sharpness == r.sharpness for r in mon.history)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(pa.grad, pb.grad)
    for ba, bb in zip(model_a.buffers(), model_b.buffers()):
        assert torch.equal(ba, bb)
    assert torch.equal(rng_a, rng_b)
    assert model_b.training and all(m.training for m in model_b.modules())
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for key in sa:
        for name, v in sa[key].items():
            assert torch.equal(v, sb[key][name]) if isinstance(v, torch.Tensor) else v == sb[key][name]


def test_budget_bounds_the_cost_and_marks_unconverged():
    model, loss_fn, (X, y) = make_case("mlp", n=16)
    mon = SharpnessMonitor(model, loss_fn, (X, y), every=1, k=2, tol=1e-12, max_matvecs=4)
    for t in range(3):
        rec = mon.step(t)
        assert rec.num_matvecs <= 4
    assert not mon.history[0].converged
    with pytest.raises(ValueError, match="max_matvecs"):
        SharpnessMonitor(model, loss_fn, (X, y), k=3, max_matvecs=2)
    with pytest.raises(ValueError, match="every"):
        SharpnessMonitor(model, loss_fn, (X, y), every=0)


def test_threshold_follows_the_lr_schedule_and_fixed_threshold():
    model, loss_fn, (X, y) = make_case("regression", n=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    mon = SharpnessMonitor(model, loss_fn, (X, y), opt, every=2)
    for t in range(6):
        mon.step(t)
        _gd_step(model, loss_fn, X, y, opt)
        sched.step()
    assert [r.threshold for r in mon.history] == pytest.approx([2 / 0.2, 2 / 0.1, 2 / 0.05])
    assert [r.lr for r in mon.history] == pytest.approx([0.2, 0.1, 0.05])
    fixed = SharpnessMonitor(model, loss_fn, (X, y), threshold=3.0)
    rec = fixed.step(0)
    assert rec.threshold == 3.0 and rec.lr is None and rec.ratio == pytest.approx(rec.sharpness / 3.0)


def _fake(mon, values, thresholds):
    """Fill a monitor's history with prescribed sharpness values (tests the rules only)."""
    from estimators.monitor import SharpnessRecord

    mon.history[:] = [SharpnessRecord(step=10 * i, loss=1.0, sharpness=v, eigenvalues=[v], residual=0.0,
                                      converged=True, threshold=thr, ratio=v / thr,
                                      preconditioned_sharpness=None, preconditioned_threshold=None,
                                      preconditioned_ratio=None, grad_norm=1.0, grad_alignment=None,
                                      lr=None, num_matvecs=3, num_gradients=1, seconds=0.0)
                      for i, (v, thr) in enumerate(zip(values, thresholds))]


def test_onset_and_sharpening_rules():
    model, loss_fn, (X, y) = make_case("regression", n=8)
    mon = SharpnessMonitor(model, loss_fn, (X, y), threshold=10.0)
    _fake(mon, [5.0, 6.0, 8.0, 9.4, 9.6, 10.3, 9.8, 10.1], [10.0] * 8)
    assert mon.eos_onset_index == 4 and mon.eos_onset == 40  # first >= 0.95 * 10
    assert mon.progressive_sharpening
    assert mon.eos_ratio_median() == pytest.approx(float(torch.tensor([0.96, 1.03, 0.98, 1.01]).median()))
    _fake(mon, [5.0, 4.0, 3.0, 3.5], [10.0] * 4)
    assert mon.eos_onset is None and not mon.progressive_sharpening and mon.eos_ratio_median() is None
    _fake(mon, [5.0, 5.1, 5.2, 5.3], [10.0] * 4)  # rising, but by less than 10 %
    assert not mon.progressive_sharpening


def test_exports_roundtrip(tmp_path):
    model, loss_fn, (X, y) = make_case("mlp", n=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = SharpnessMonitor(model, loss_fn, (X, y), opt, every=2, k=2, track_grad_alignment=True)
    for t in range(6):
        mon(t, loss=loss_fn(model(X), y).item())
        _gd_step(model, loss_fn, X, y, opt)
    mon.to_csv(tmp_path / "s.csv")
    mon.to_json(tmp_path / "s.json")
    mon.save_plot(tmp_path / "s.png")
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == 3
    for row, rec in zip(rows, mon.history):
        assert float(row["sharpness"]) == rec.sharpness
        assert [float(e) for e in row["eigenvalues"].split(";")] == rec.eigenvalues
        assert float(row["threshold"]) == rec.threshold and int(row["step"]) == rec.step
    js = json.load(open(tmp_path / "s.json"))
    assert [h["sharpness"] for h in js["history"]] == [r.sharpness for r in mon.history]
    assert js["summary"]["total_matvecs"] == sum(r.num_matvecs for r in mon.history)
    assert open(tmp_path / "s.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_guard_vectors_catch_eigenvalue_crossings():
    """EoS toy at lr 0.4: after the catapult (~step 270) the top eigenvector changes.

    Warm-starting from the previous top vector alone converges on what is now the
    *second* eigenvector (its residual is tiny) and reports a value 6 % low at step 340;
    with one guard vector (the default) every measurement matches the dense Hessian.
    """
    from estimators.eos import HalfMSELoss, chebyshev_data, tanh_regression_net

    X, y = chebyshev_data()
    loss_fn = HalfMSELoss()
    results = {}
    for guard in (1, 0):
        model = tanh_regression_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.4)
        mon = SharpnessMonitor(model, loss_fn, (X, y), opt, every=20, guard=guard, tol=1e-6)
        errs = {}
        for t in range(341):
            rec = mon.step(t)
            if rec is not None and (t >= 280 or t == 0) and (guard == 1 or t == 340):
                lam = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, y))[-1])
                errs[t] = abs(rec.sharpness - lam) / lam
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
        results[guard] = errs
    assert max(results[1].values()) <= 1e-6 + 1e-12  # residual bound, tol = 1e-6
    assert len(results[1]) == 5
    assert results[0][340] > 0.01  # the documented failure without guard vectors


def test_param_groups_with_different_lr_are_refused_at_construction():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    ps = list(model.parameters())
    opt = torch.optim.SGD([{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.01}])
    with pytest.raises(ValueError, match="disagree on 'lr'"):
        SharpnessMonitor(model, nn.MSELoss(), (X, y), opt, every=1)
    # a fixed threshold needs no single lr
    SharpnessMonitor(model, nn.MSELoss(), (X, y), opt, every=1, threshold=20.0)
