"""BackPACK-backed diagonals against dense diagonals (double backward / explicit J^T Lambda J)."""

import math

import pytest
import torch
from torch import nn

from curvature import DiagonalOperator
from curvature.backpack import ggn_diagonal, hessian_diagonal
from dense_truth import dense_ggn, dense_hessian, dense_jacobian, rel_err
from models import make_case

EXACT = 1e-10


@pytest.mark.parametrize("name,red", [("mlp", "mean"), ("mlp", "sum"), ("cnn", "mean"), ("regression", "mean"),
                                      ("regression", "sum")])
def test_exact_diagonals_equal_dense(name, red):
    model, loss_fn, (X, y) = make_case(name, n=8, reduction=red)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]  # unequal batches: weights must be right
    dg = ggn_diagonal(model, loss_fn, batches)
    dh = hessian_diagonal(model, loss_fn, batches)
    assert isinstance(dg, DiagonalOperator) and dg.param_shapes == [p.shape for p in model.parameters()]
    assert rel_err(dg.diag, dense_ggn(model, loss_fn, X, y).diagonal()) < EXACT
    assert rel_err(dh.diag, dense_hessian(model, loss_fn, X, y).diagonal()) < EXACT


def _mc_diag_variance(model, X):
    """E||d_hat - d||^2 for one sampled label per example (CE mean), enumerating the labels."""
    n_par = sum(p.numel() for p in model.parameters())
    J = dense_jacobian(model, X).reshape(X.shape[0], -1, n_par)
    with torch.no_grad():
        p = torch.softmax(model.eval()(X), 1)
    N, C = p.shape
    total = 0.0
    for i in range(N):
        exact = ((J[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i]))) * J[i].T).sum(1) / N
        for k in range(C):
            r = p[i] - torch.nn.functional.one_hot(torch.tensor(k), C).double()
            total += float(p[i, k]) * float((((J[i].T @ r) ** 2) / N - exact).pow(2).sum())
    return total


def test_mc_diagonal_converges_with_derived_tolerance_and_is_reproducible():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    exact = dense_ggn(model, loss_fn, X, y).diagonal()
    sigma2 = _mc_diag_variance(model, X)
    state = torch.get_rng_state()
    for M in (4, 256):
        d = ggn_diagonal(model, loss_fn, (X, y), kind="mc", mc_samples=M, seed=1).diag
        # E||d_M - d||^2 = sigma2 / M; Chebyshev bound with failure probability 1e-3
        assert float((d - exact).norm()) <= math.sqrt(sigma2 / (M * 1e-3))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    a = ggn_diagonal(model, loss_fn, (X, y), kind="mc", seed=3).diag
    b = ggn_diagonal(model, loss_fn, (X, y), kind="mc", seed=3).diag
    c = ggn_diagonal(model, loss_fn, (X, y), kind="mc", seed=4).diag
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_user_model_untouched_and_parameter_subset():
    model, loss_fn, (X, y) = make_case("cnn", n=6)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    params = [model[5].weight, model[2].bias]
    d = ggn_diagonal(model, loss_fn, (X, y), params=params)
    assert [m.training for m in model.modules()] == [True] * len(list(model.modules()))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert hooks == [(len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
                     for m in model.modules()]
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[0].bias.grad is None
    assert not any(hasattr(p, "diag_ggn_exact") for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    truth = dense_ggn(model, loss_fn, X, y, params=params).diagonal()
    assert d.param_shapes == [p.shape for p in params]
    assert rel_err(d.diag, truth) < EXACT


def test_errors():
    model, loss_fn, (X, y) = make_case("mlp", n=6)
    with pytest.raises(NotImplementedError, match="HuberLoss"):
        ggn_diagonal(model, nn.HuberLoss(), (X, y))
    with pytest.raises(ValueError, match="reduction='none'"):
        hessian_diagonal(model, nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="kind must be"):
        ggn_diagonal(model, loss_fn, (X, y), kind="empirical")
    with pytest.raises(ValueError, match="data is empty"):
        ggn_diagonal(model, loss_fn, [])


class _CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x)


def test_unsupported_models_and_losses_raise_clear_errors_up_front():
    """Unsupported layers / custom modules / multi-output BCE: a NotImplementedError naming them and the
    alternatives, raised before BackPACK's backward (its raw errors never surface)."""
    _, loss_fn, (X, y) = make_case("mlp", n=6)
    layernorm = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    for fn in (ggn_diagonal, hessian_diagonal):
        with pytest.raises(NotImplementedError, match=r"'1' \(torch\.nn\.modules\.normalization\.LayerNorm\)"
                                                     r".*\.diagonal\(\).*hutchinson_diagonal"):
            fn(layernorm, loss_fn, (X, y))
        with pytest.raises(NotImplementedError, match=r"'<model>' \(.*_CustomNet\).*custom nn\.Module"):
            fn(_CustomNet().double(), loss_fn, (X, y))
    with pytest.raises(NotImplementedError, match="Hessian.*BatchNorm1d|BatchNorm1d.*HessianOperator"):
        hessian_diagonal(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double(),
                         loss_fn, (X, y))
    multi = nn.Sequential(nn.Linear(5, 3)).double()
    yb = torch.rand(6, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"one logit per example.*\(6, 3\).*GGNOperator"):
        ggn_diagonal(multi, nn.BCEWithLogitsLoss(), (X, yb))
    with pytest.raises(NotImplementedError, match="class weights"):
        ggn_diagonal(multi, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)), (X, y))
    # the single-logit BCE that BackPACK does support still gives the dense diagonal
    single = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    bce, y1 = nn.BCEWithLogitsLoss(), torch.rand(6, 1, dtype=torch.float64)
    assert rel_err(ggn_diagonal(single, bce, (X, y1)).diag, dense_ggn(single, bce, X, y1).diagonal()) < EXACT
    assert rel_err(hessian_diagonal(single, bce, (X, y1)).diag, dense_hessian(single, bce, X, y1).diagonal()) < EXACT


def test_cached_extended_copy_follows_every_change_of_the_model():
    """The BackPACK copy is cached per model: values are shared, structural changes rebuild it."""
    import gc

    from curvature import backpack as cb

    model, loss_fn, (X, y) = make_case("mlp", n=6)

    def check():
        d = ggn_diagonal(model, loss_fn, (X, y)).diag
        assert rel_err(d, dense_ggn(model, loss_fn, X, y).diagonal()) < EXACT
        assert rel_err(hessian_diagonal(model, loss_fn, (X, y)).diag,
                       dense_hessian(model, loss_fn, X, y).diagonal()) < EXACT

    check()
    work = cb._EXTENDED[model]["work"]
    with torch.no_grad():  # an optimizer step: in place, the copy shares the storage
        for p in model.parameters():
            p.mul_(0.7).add_(0.05)
    check()
    assert cb._EXTENDED[model]["work"] is work  # no rebuild for new values
    model[0].weight.data = model[0].weight.data.clone() * 1.3  # storage swapped through .data
    check()
    model[2].weight = nn.Parameter(model[2].weight.detach() * -0.5)  # parameter re-assigned
    check()
    model[1] = nn.Sigmoid()  # module replaced
    check()
    assert cb._EXTENDED[model]["work"] is not work
    handle = model[3].register_forward_hook(lambda m, i, o: 2 * o)  # BackPACK would ignore it: refused
    with pytest.raises(NotImplementedError, match=r"Module\(s\) \['3'\] have hooks"):
        ggn_diagonal(model, loss_fn, (X, y))
    handle.remove()
    check()
    ref = __import__("weakref").ref(model)
    del model, work
    gc.collect()
    assert ref() is None  # the cache does not keep the user's model alive


def test_ignored_or_soft_targets_are_refused_not_silently_wrong():
    """BackPACK's CE curvature counts every target: ignored targets / probabilities / smoothing are refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    for loss_fn, y in ((nn.CrossEntropyLoss(), torch.tensor([0, -100, 1, 2, 3])),
                       (nn.CrossEntropyLoss(label_smoothing=0.1), torch.tensor([0, 1, 1, 2, 3])),
                       (nn.CrossEntropyLoss(), torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1))):
        for f in (ggn_diagonal, hessian_diagonal):
            with pytest.raises(NotImplementedError, match="ignore_index"):
                f(model, loss_fn, (X, y))
