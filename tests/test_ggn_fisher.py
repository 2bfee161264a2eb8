"""GGNOperator and FisherOperator against explicit J^T Lambda J, per-example gradients, MC theory."""

import math

import pytest
import torch
from torch import nn

from curvature import FisherOperator, GGNOperator, block_diagonal
from curvature.losses import sample_output_gradients
from dense_truth import (
    dense_empirical_fisher,
    dense_ggn,
    dense_jacobian,
    dense_lowrank_fisher,
    dense_output_hessian,
    flat,
    rel_err,
    trainable,
)
from models import make_case, mlp, classification_data

EXACT = 1e-10  # float64, same terms summed in a different order (see test_hessian.py)


CASES = [("mlp", "mean"), ("cnn", "mean"), ("layernorm", "mean"), ("regression", "mean"),
         ("regression", "sum"), ("bce", "mean"), ("bce", "sum"), ("mlp", "sum")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{b}" for a, b in CASES])
def case(request):
    name, red = request.param
    model, loss_fn, (X, y) = make_case(name, n=8, reduction=red)
    return model, loss_fn, X, y, dense_ggn(model, loss_fn, X, y)


def test_closed_form_output_hessian_matches_autograd():
    """The truth's closed forms against autograd's Hessian w.r.t. the output."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    targets = {nn.CrossEntropyLoss: torch.randint(0, 3, (4,), generator=g),
               nn.MSELoss: torch.randn(4, 3, generator=g, dtype=torch.float64),
               nn.BCEWithLogitsLoss: torch.randint(0, 2, (4, 3), generator=g).double()}
    for cls, y in targets.items():
        for red in ("mean", "sum"):
            lf = cls(reduction=red)
            H = torch.autograd.functional.hessian(lambda z: lf(z.reshape(4, 3), y), z.reshape(-1))
            assert rel_err(dense_output_hessian(lf, z), H) < EXACT


def test_ggn_products_equal_dense(case):
    model, loss_fn, X, y, G = case
    op = GGNOperator(model, loss_fn, (X, y))
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(G.shape[0], generator=gen, dtype=torch.float64)
    V = torch.randn(G.shape[0], 3, generator=gen, dtype=torch.float64)
    assert rel_err(op @ v, G @ v) < EXACT
    assert rel_err(op @ V, G @ V) < EXACT
    assert rel_err(flat(op @ op.unflatten(v)), G @ v) < EXACT
    assert rel_err(op.to_dense(), G) < EXACT
    batched = GGNOperator(model, loss_fn, (X, y), batched=True)
    assert rel_err(batched @ V, G @ V) < EXACT
    for jvp in ("forward", "reverse"):
        other = GGNOperator(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])], jvp=jvp)
        assert rel_err(other @ V, G @ V) < EXACT
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    assert op.jvp == ("forward" if conv else "reverse")


def test_exact_fisher_equals_ggn(case):
    model, loss_fn, X, y, G = case
    assert rel_err(FisherOperator(model, loss_fn, (X, y), kind="exact").to_dense(), G) < EXACT


def test_empirical_fisher_equals_per_example_outer_products(case):
    model, loss_fn, X, y, G = case
    EF = dense_empirical_fisher(model, loss_fn, X, y)
    assert rel_err(FisherOperator(model, loss_fn, (X, y), kind="empirical").to_dense(), EF) < EXACT


def test_empirical_fisher_mean_is_one_over_n_sum_for_cross_entropy():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    model.eval()
    G = torch.stack([flat(torch.autograd.grad(loss_fn(model(X[i:i + 1]), y[i:i + 1]), list(model.parameters())))
                     for i in range(8)])  # per-example gradients of the per-example (mean = sum) loss
    EF = FisherOperator(model, loss_fn, (X, y), kind="empirical").to_dense()
    assert rel_err(EF, G.T @ G / 8) < EXACT


@pytest.mark.parametrize("name,red", [("mlp", "mean"), ("regression", "sum"), ("bce", "mean")])
def test_mc_fisher_equals_dense_for_its_own_samples(name, red):
    model, loss_fn, (X, y) = make_case(name, n=8, reduction=red)
    op = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=3, seed=11)
    with torch.no_grad():
        z = model.eval()(X)
    S = sample_output_gradients(loss_fn, z, red, 3, op._batch_generator(0))
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # each sample is sqrt(c/M) (p - onehot)
        resid = torch.softmax(z, 1) - S / math.sqrt(1 / 8 / 3)
        assert torch.allclose(resid.sum(-1), torch.ones(3, 8, dtype=z.dtype))
        assert bool(((resid.abs() < 1e-12) | ((resid - 1).abs() < 1e-12)).all())
    truth = dense_lowrank_fisher(model, X, S)
    D = op.to_dense()
    assert rel_err(D, truth) < EXACT
    assert torch.equal(D, op.to_dense())  # one fixed matrix for the operator's lifetime


def _mc_variance(model, loss_fn, X):
    """E||Lambda_hat-based A - G||_F^2 for one sample per example, by enumerating labels (CE)."""
    J = dense_jacobian(model, X).reshape(X.shape[0], -1, sum(p.numel() for p in trainable(model)))
    with torch.no_grad():
        p = torch.softmax(model(X), 1)
    N, C = p.shape
    c = 1.0 / N
    total = 0.0
    for n in range(N):
        Lam = c * (torch.diag(p[n]) - torch.outer(p[n], p[n]))
        for k in range(C):
            r = p[n] - torch.nn.functional.one_hot(torch.tensor(k), C).double()
            D = J[n].T @ (c * torch.outer(r, r) - Lam) @ J[n]
            total += float(p[n, k]) * float((D**2).sum())
    return total


@pytest.mark.parametrize("M", [8, 512])
def test_mc_fisher_converges_to_ggn(M):
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    G = dense_ggn(model, loss_fn, X, y)
    F = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=M, seed=3).to_dense()
    sigma2 = _mc_variance(model, loss_fn, X)  # examples independent: variances add
    # E||F_M - G||_F^2 = sigma2 / M; Chebyshev: P(err > sqrt(sigma2 / (M delta))) <= delta
    delta = 1e-3
    assert float((F - G).norm()) <= math.sqrt(sigma2 / (M * delta))
    assert float((F - G).norm()) > 0  # it is an estimate, not the exact matrix


def test_mc_fisher_seed_generator_and_global_rng():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    state = torch.get_rng_state()
    a = FisherOperator(model, loss_fn, (X, y), seed=5).to_dense()
    b = FisherOperator(model, loss_fn, (X, y), seed=5).to_dense()
    c = FisherOperator(model, loss_fn, (X, y), seed=6).to_dense()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    assert torch.equal(a, b) and rel_err(a, c) > 1e-3
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    d = FisherOperator(model, loss_fn, (X, y), generator=g1).to_dense()
    e = FisherOperator(model, loss_fn, (X, y), generator=g2).to_dense()
    assert torch.equal(d, e)
    with pytest.raises(ValueError, match="seed= or generator="):
        FisherOperator(model, loss_fn, (X, y), seed=1, generator=g1)


def _autograd_ggn(model, loss_fn, X, y):
    J = dense_jacobian(model, X)
    with torch.no_grad():
        z = model.eval()(X)
    Hz = torch.autograd.functional.hessian(lambda zz: loss_fn(zz.reshape(z.shape), y), z.reshape(-1))
    return J.T @ Hz @ J


def test_ggn_autograd_fallback_for_other_losses():
    model = mlp()
    X, y = classification_data(8)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
    assert rel_err(GGNOperator(model, weighted, (X, y)).to_dense(), _autograd_ggn(model, weighted, X, y)) < EXACT
    target = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def logcosh(z, t):  # a plain function: no 'reduction' attribute
        return torch.log(torch.cosh(z - t)).sum()

    op = GGNOperator(model, logcosh, (X, target))
    assert rel_err(op.to_dense(), _autograd_ggn(model, logcosh, X, target)) < EXACT


def test_block_diagonal_ggn_and_fisher():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    G = dense_ggn(model, loss_fn, X, y)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in model if list(layer.parameters())]
    mask = torch.block_diag(*[torch.ones(s, s, dtype=G.dtype) for s in sizes])
    B = block_diagonal(GGNOperator, model, loss_fn, [(X[:5], y[:5]), (X[5:], y[5:])])
    assert B.names == ["0", "2", "4"]
    assert rel_err(B.to_dense(), G * mask) < EXACT
    Bf = block_diagonal(FisherOperator, model, loss_fn, (X, y), kind="exact", grouping="parameter", jvp="forward")
    assert len(Bf.blocks) == 6
    D = Bf.to_dense()
    sizes_p = [p.numel() for p in model.parameters()]
    mask_p = torch.block_diag(*[torch.ones(s, s, dtype=G.dtype) for s in sizes_p])
    assert rel_err(D, G * mask_p) < EXACT


def test_output_hessian_sqrt_factor():
    from curvature.losses import output_hessian_sqrt

    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for lf in (nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss()):
        S = output_hessian_sqrt(lf, z, lf.reduction)  # [C', B, C]
        Lam = torch.block_diag(*[S[:, b, :].T @ S[:, b, :] for b in range(4)])
        assert rel_err(Lam, dense_output_hessian(lf, z)) < EXACT


def test_cross_entropy_with_trailing_dims():
    """Per-position classification ([B, C, L] logits, [B, L] targets): closed form, MC, EF."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Conv1d(3, 3, 1)).double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 2, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5, 4), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    G = _autograd_ggn(model, loss_fn, X, y)
    assert rel_err(GGNOperator(model, loss_fn, (X, y)).to_dense(), G) < EXACT
    assert rel_err(FisherOperator(model, loss_fn, (X, y), kind="exact").to_dense(), G) < EXACT
    op = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=2, seed=1)
    with torch.no_grad():
        z = model(X)
    S = sample_output_gradients(loss_fn, z, "mean", 2, op._batch_generator(0))  # [M, B, C, L]
    onehot = torch.softmax(z, 1).unsqueeze(0) - S / math.sqrt(1 / 20 / 2)
    assert torch.allclose(onehot.sum(2), torch.ones(2, 5, 4, dtype=z.dtype))  # a one-hot per position
    J = dense_jacobian(model, X)  # rows in z's (B, C, L) order
    Sf = S.reshape(2, 5, -1)
    Lam = torch.block_diag(*[Sf[:, b].T @ Sf[:, b] for b in range(5)])
    assert rel_err(op.to_dense(), J.T @ Lam @ J) < EXACT
    EF = dense_empirical_fisher(model, loss_fn, X, y)  # c = 1 / (B L) for mean over B and L
    assert rel_err(FisherOperator(model, loss_fn, (X, y), kind="empirical").to_dense(), EF) < EXACT
