"""PyTorch's generic optimizer battery (test/test_optim.py), ported to Sophia, NewtonCG and GNSNewton.

The checks follow torch's own conventions: state_dict round trips (also through
``torch.save``/``torch.load(weights_only=True)``), deepcopy and pickle, param groups,
``zero_grad``, closures, tensor learning rates, hooks, refused layouts and complex
parameters.  Every check compares real numbers: bit-equality of trajectories that must
coincide, or parameters that must (not) have moved.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from solvers import GNSNewton, HutchinsonEstimator, NewtonCG, Sophia

NAMES = ["Sophia", "Sophia-forloop", "NewtonCG", "GNSNewton"]


def _problem(hidden=6, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    g = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    return model, X, y


def _build(name, model, lr=None, params=None):
    loss_fn = nn.MSELoss()
    params = list(model.parameters()) if params is None else params
    if name.startswith("Sophia"):
        est = HutchinsonEstimator(model, loss_fn, seed=0)
        return Sophia(params, lr=1e-2 if lr is None else lr, rho=0.1, weight_decay=0.01, estimator=est,
                      update_interval=2, foreach=name == "Sophia")
    cls = NewtonCG if name == "NewtonCG" else GNSNewton
    return cls(params, lr=1.0 if lr is None else lr, model=model, loss_fn=loss_fn)


def _step(opt, model, X, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)
        loss.backward()
        return loss

    if isinstance(opt, Sophia):
        return opt.step(closure, curvature_input=(X, y))
    return opt.step(closure, batch=(X, y))


def _loss(model, X, y):
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(X), y))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------- direction / closure
@pytest.mark.parametrize("name", NAMES)
def test_goes_right_direction_and_step_returns_closure_loss(name):
    model, X, y = _problem()
    opt = _build(name, model)
    f0 = _loss(model, X, y)
    returned = _step(opt, model, X, y)
    assert float(returned.detach()) == pytest.approx(f0, rel=1e-15)  # the loss at the starting point
    for _ in range(5):
        _step(opt, model, X, y)
    assert _loss(model, X, y) < f0


@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_for_zero_gradients(name):
    model, X, y = _problem()
    opt = _build(name, model)
    if isinstance(opt, Sophia):
        opt.param_groups[0]["weight_decay"] = 0.0
        before = _flat(model)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # m = 0: no move
        assert torch.equal(_flat(model), before)
        opt.zero_grad()
        opt.step()  # no parameter has a .grad: nothing happens
        assert torch.equal(_flat(model), before)
    else:
        with torch.no_grad():
            y0 = model(X)  # targets = current outputs: the loss and its gradient are 0
        before = _flat(model)
        opt.step(batch=(X, y0))
        assert torch.equal(_flat(model), before)


# ---------------------------------------------------------------------- state dict
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_through_torch_save_weights_only(name):
    model, X, y = _problem()
    opt = _build(name, model)
    for _ in range(3):
        _step(opt, model, X, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, _, _ = _problem(seed=5)  # different weights, overwritten below
    model2.load_state_dict(ckpt["model"])
    opt2 = _build(name, model2)
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(3):
        _step(opt, model, X, y)
        _step(opt2, model2, X, y)
    assert torch.equal(_flat(model), _flat(model2))


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_of_a_model_of_another_size_is_refused_at_load_time(name):
    small, X, y = _problem(hidden=6)
    opt = _build(name, small)
    for _ in range(2):
        _step(opt, small, X, y)
    big, _, _ = _problem(hidden=7)  # same number of tensors, other shapes
    opt_big = _build(name, big)
    with pytest.raises(ValueError, match="another size"):
        opt_big.load_state_dict(opt.state_dict())
    assert len(opt_big.state) == 0  # nothing was loaded
    _step(opt_big, big, X, y)  # and it still works


@pytest.mark.parametrize("name", ["Sophia", "NewtonCG"])
def test_load_state_dict_with_another_param_group_layout_is_refused(name):
    model, X, y = _problem()
    opt = _build(name, model)
    _step(opt, model, X, y)
    sd = opt.state_dict()
    sd_more = copy.deepcopy(sd)
    sd_more["param_groups"].append(dict(sd_more["param_groups"][0], params=[]))
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(sd_more)
    sd_short = copy.deepcopy(sd)
    sd_short["param_groups"][0]["params"] = sd_short["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(sd_short)


# ------------------------------------------------------------------ deepcopy / pickle
@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_of_model_and_optimizer_steps_identically(name):
    model, X, y = _problem()
    opt = _build(name, model)
    for _ in range(3):
        _step(opt, model, X, y)
    model2, opt2 = copy.deepcopy((model, opt))
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    assert [id(p) for p in params2] == [id(p) for p in model2.parameters()]
    for _ in range(3):
        _step(opt, model, X, y)
        _step(opt2, model2, X, y)
    assert torch.equal(_flat(model), _flat(model2))
    # torch's test_deepcopy_copies_all_public_attrs
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
    assert public(opt2) == public(opt)


@pytest.mark.parametrize("name", NAMES)
def test_pickle_of_model_and_optimizer_steps_identically(name):
    model, X, y = _problem()
    opt = _build(name, model)
    for _ in range(3):
        _step(opt, model, X, y)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    for _ in range(3):
        _step(opt, model, X, y)
        _step(opt2, model2, X, y)
    assert torch.equal(_flat(model), _flat(model2))


# -------------------------------------------------------------------- learning rate
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr_and_follows_in_place_changes(name):
    lr = 1e-2 if name.startswith("Sophia") else 0.5
    runs = []
    for as_tensor in (False, True):
        model, X, y = _problem()
        opt = _build(name, model, lr=torch.tensor(lr, dtype=torch.float64) if as_tensor else lr)
        for t in range(4):
            if t == 2:  # a scheduler's change of the value
                if as_tensor:
                    opt.param_groups[0]["lr"].fill_(lr / 2)
                else:
                    opt.param_groups[0]["lr"] = lr / 2
            _step(opt, model, X, y)
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", NAMES)
def test_bad_learning_rates_are_refused_with_the_right_message(name):
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        _build(name, model, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        _build(name, model, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        _build(name, model, lr=float("nan"))
    with pytest.raises(TypeError, match="lr must be a number"):
        _build(name, model, lr="0.1")
    if not name.startswith("Sophia"):  # lr 0 would never move: refused where the step is a Newton step
        with pytest.raises(ValueError, match="Invalid learning rate"):
            _build(name, model, lr=torch.tensor(0.0))


# ---------------------------------------------------------------------- param groups
@pytest.mark.parametrize("name", NAMES)
def test_empty_param_groups_are_refused_at_construction(name):
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="empty parameter list"):
        _build(name, model, params=[])
    with pytest.raises(ValueError, match="group 0 is empty"):
        _build(name, model, params=[{"params": []}])


def test_sophia_param_groups_options_take_effect_and_bad_groups_are_refused():
    model, X, y = _problem()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    est = HutchinsonEstimator(model, nn.MSELoss(), seed=0)
    opt = Sophia([{"params": first}, {"params": second, "lr": 0.0, "weight_decay": 0.0}], lr=1e-2,
                 estimator=est, update_interval=2)
    frozen = [p.detach().clone() for p in second]
    moving = [p.detach().clone() for p in first]
    for _ in range(3):
        _step(opt, model, X, y)
    assert all(torch.equal(p, q) for p, q in zip(second, frozen))  # lr 0, no decay: never moves
    assert not any(torch.equal(p, q) for p, q in zip(first, moving))
    with pytest.raises(ValueError, match="group 2 is empty"):
        opt.add_param_group({"params": []})
    extra = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="rho/gamma"):
        opt.add_param_group({"params": [extra], "rho": -1.0})
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == 2  # refused groups are not added


@pytest.mark.parametrize("name", ["NewtonCG", "GNSNewton"])
def test_joint_step_optimizers_refuse_several_param_groups(name):
    model, _, _ = _problem()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    with pytest.raises(ValueError, match="parameter groups"):
        _build(name, model, params=groups)


# ------------------------------------------------------------------- zero_grad, hooks
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_sets_to_none_or_to_zero(name):
    model, X, y = _problem()
    opt = _build(name, model)
    _step(opt, model, X, y)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not bool(p.grad.any()) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_step_pre_and_post_hooks_run_once_per_step_in_order(name):
    model, X, y = _problem()
    opt = _build(name, model)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    _step(opt, model, X, y)
    _step(opt, model, X, y)
    assert calls == [("pre", True), ("post", True)] * 2
    h1.remove()
    h2.remove()
    _step(opt, model, X, y)
    assert len(calls) == 4
    repr(opt)  # torch's test_optimizer_can_be_printed


# -------------------------------------------------------------- refused inputs
@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_are_refused(name):
    p = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    model = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="complex|non-floating|real"):
        if name.startswith("Sophia"):
            Sophia([p], lr=1e-3, update_interval=None)
        else:
            (NewtonCG if name == "NewtonCG" else GNSNewton)([p], model=model, loss_fn=nn.MSELoss())


def test_maximize_is_not_silently_accepted():
    model, _, _ = _problem()
    with pytest.raises(TypeError, match="maximize"):
        Sophia(model.parameters(), lr=1e-3, update_interval=None, maximize=True)
    with pytest.raises(TypeError, match="maximize"):
        NewtonCG(model.parameters(), model=model, loss_fn=nn.MSELoss(), maximize=True)
