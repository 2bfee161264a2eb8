"""K-FAC on models that are not nn.Sequential: hooks, weight sharing (expand/reduce), tied weights.

Truth: curvlinops' ``KFACLinearOperator`` (an independent implementation, float64, 1e-10)
where both apply; the double-backward Hessian of deep linear networks under MSE (where the
GGN equals the Hessian and K-FAC is exact, Eschenhagen et al. 2023); the dense MC Fisher
of one datum with the same sampled labels; the dense empirical Fisher of one datum.
"""

import copy

import pytest
import torch
from torch import nn

import curvature
from curvature import FisherOperator, kfac
from dense_truth import dense_empirical_fisher, dense_ggn, dense_hessian, rel_err
from models import make_case

EXACT = 1e-10


def _mask(K):
    return torch.block_diag(*[torch.ones(b.shape, dtype=torch.float64) for b in K.blocks])


def _curvlinops_dense(model, loss_fn, data, fisher_type, approx, separate_bias, params=None):
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    op = KFACLinearOperator(model, loss_fn, params, data, fisher_type=fisher_type, kfac_approx=approx,
                            separate_weight_and_bias=separate_bias, check_deterministic=False)
    n = sum(p.numel() for p in params)
    return op @ torch.eye(n, dtype=torch.float64)


class _Residual(nn.Module):
    """``fc2(tanh(fc1(x)) + x)`` with a frozen LayerNorm in front: no Sequential anywhere."""

    def __init__(self, d=4, h=4, c=3):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, c)
        for p in self.norm.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        x = self.norm(x)
        return self.fc2(torch.tanh(self.fc1(x)) + x)


class _SeqNet(nn.Module):
    """Linear layers on ``[B, T, D]`` sequences: position-wise ``b(tanh(a(x)))``; ``pool`` averages over T."""

    def __init__(self, pool=False):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.pool = pool

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h.mean(1) if self.pool else h)


def _seq_case(loss, pool, seed=0):
    torch.manual_seed(seed)
    m = _SeqNet(pool).double()
    X = torch.randn(5, 6, 3, dtype=torch.float64)
    if loss == "mse":
        return m, nn.MSELoss(), X, torch.randn(5, 2, dtype=torch.float64) if pool else torch.randn(5, 6, 2).double()
    y = torch.randint(0, 2, (5,) if pool else (5, 6))
    return m, nn.CrossEntropyLoss(), X, y


class _CEOverPositions(nn.Module):
    """CrossEntropy wants ``[B, C, T]``: move the class dim of a position-wise net."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).transpose(1, 2)


# ------------------------------------------------------------------ agreement with curvlinops
@pytest.mark.parametrize("case", ["mlp", "cnn", "regression", "bce", "residual"])
@pytest.mark.parametrize("kind,fisher", [("kflr", "type-2"), ("empirical", "empirical")])
def test_equals_curvlinops_kfac_mlp_cnn_and_non_sequential(case, kind, fisher):
    if case == "residual":
        torch.manual_seed(0)
        model = _Residual().double()
        X, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
        loss_fn = nn.CrossEntropyLoss()
    else:
        model, loss_fn, (X, y) = make_case(case, n=7)
    for sep in (False, True):
        K = kfac(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])], kind=kind, separate_bias=sep)
        C = _curvlinops_dense(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])], fisher, "expand", sep)
        assert rel_err(K.to_dense(), C) < EXACT


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_equals_curvlinops_on_linear_layers_over_sequences(approx, loss):
    m, loss_fn, X, y = _seq_case(loss, pool=False)
    model = m if loss == "mse" else _CEOverPositions(m)
    for red in ("mean", "sum"):
        loss_fn.reduction = red
        for kind, fisher in (("kflr", "type-2"), ("empirical", "empirical")):
            K = kfac(model, loss_fn, (X, y), kind=kind, approx=approx)
            C = _curvlinops_dense(model, loss_fn, [(X, y)], fisher, approx, False)
            assert rel_err(K.to_dense(), C) < EXACT, (red, kind)


# --------------------------------------------------------------------------- exact cases
def _deep_linear(pool, seed=0):
    torch.manual_seed(seed)

    class DeepLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.l2(self.l1(x))
            return self.l3(h.mean(1) if pool else h)

    return DeepLinear().double()


def test_expand_exact_for_deep_linear_network_with_a_loss_per_position():
    model = _deep_linear(pool=False)
    X, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    H = dense_hessian(model, loss_fn, X, y)  # = GGN for a linear network under MSE
    K = kfac(model, loss_fn, (X, y), approx="expand", separate_bias=True)
    assert rel_err(K.to_dense(), H * _mask(K)) < EXACT
    R = kfac(model, loss_fn, (X, y), approx="reduce", separate_bias=True)
    assert rel_err(R.to_dense(), H * _mask(R)) > 1e-3  # reduce is not exact here


def test_reduce_exact_for_deep_linear_network_with_pooled_output():
    model = _deep_linear(pool=True)
    X, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    H = dense_hessian(model, loss_fn, X, y)
    # l1, l2 see sequences (pooled afterwards): reduce is exact; l3 sees [B, 4]: plain K-FAC, exact
    R = kfac(model, loss_fn, (X, y), approx="reduce", separate_bias=True)
    assert rel_err(R.to_dense(), H * _mask(R)) < EXACT
    E = kfac(model, loss_fn, (X, y), approx="expand", separate_bias=True)
    assert rel_err(E.to_dense(), H * _mask(E)) > 1e-3


def test_one_datum_mc_and_empirical_equal_dense_fisher_blocks():
    model, loss_fn, (X, y) = make_case("mlp", n=1)
    K = kfac(model, loss_fn, (X, y), kind="mc", mc_samples=4, seed=7)
    F = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=4, seed=7).to_dense()
    assert rel_err(K.to_dense(), F * _mask(K)) < EXACT  # the same sampled labels
    Ke = kfac(model, loss_fn, (X, y), kind="empirical")
    assert rel_err(Ke.to_dense(), dense_empirical_fisher(model, loss_fn, X, y) * _mask(Ke)) < EXACT


# --------------------------------------------------------------------------- tied weights
class _Twice(nn.Module):
    """One Linear applied to two halves of the input (a module called twice) -> a deep linear head."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(3, 4), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.cat([self.shared(x[:, :3]), self.shared(x[:, 3:])], 1))


class _Tied(nn.Module):
    """Two Linear modules holding the same weight parameter (weight tying), position-wise."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(self.enc(x))


def test_tied_weights_are_one_block_over_all_calls_as_weight_sharing_positions():
    # a module called on two inputs is weight sharing over 2 positions: the same K-FAC as the
    # network written with a sequence axis (one call on 2 positions), expand and reduce
    torch.manual_seed(0)
    tw = _Twice().double()
    X, y = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    K = kfac(tw, nn.MSELoss(), (X, y), approx="reduce")
    assert K.names == ["shared", "head"]

    class AsSequence(nn.Module):  # the same function, the two calls as positions of one call
        def __init__(self, src):
            super().__init__()
            self.shared, self.head = src.shared, src.head

        def forward(self, x):
            h = self.shared(x.reshape(-1, 2, 3))
            return self.head(h.reshape(-1, 8))

    S = kfac(AsSequence(tw), nn.MSELoss(), (X, y), approx="reduce")
    for approx in ("expand", "reduce"):
        assert rel_err(kfac(tw, nn.MSELoss(), (X, y), approx=approx).to_dense(),
                       kfac(AsSequence(tw), nn.MSELoss(), (X, y), approx=approx).to_dense()) < EXACT
    assert rel_err(K.to_dense(), S.to_dense()) < EXACT
    # a weight held by two modules: one block; deep linear, a loss per position -> expand is exact
    tied = _Tied().double()
    Xs, ys = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    Kt = kfac(tied, nn.MSELoss(), (Xs, ys))
    assert Kt.names == ["enc.weight"] and Kt.shape == (16, 16)
    # the tied block equals the expand K-FAC over the positions of both calls, computed by hand
    with torch.no_grad():
        h = tied.enc(Xs)
    x_rows = torch.cat([Xs.reshape(-1, 4), h.reshape(-1, 4)])
    A = x_rows.T @ x_rows / (3 * 10)  # E_n[(1/T) sum_t x x^T], T = 10 positions (5 per call)
    z = tied(Xs)
    c = 1.0 / z.numel()
    W = tied.enc.weight.detach()
    # output gradients per column k of sqrt(2c) I: dec's are sqrt(2c) e_k, enc's are W^T sqrt(2c) e_k
    G = 2 * c * (15 * torch.eye(4, dtype=torch.float64) + 15 * W.T @ W)
    assert rel_err(Kt.blocks[0].A, G) < EXACT and rel_err(Kt.blocks[0].B, A) < EXACT


def test_parameters_used_outside_their_modules_are_refused():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + torch.nn.functional.linear(x, self.fc.weight)

    class EmbeddingTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.emb(t)).transpose(1, 2)

    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="also used outside them"):
        kfac(Functional().double(), nn.MSELoss(), (X, y))
    et = EmbeddingTied().double()
    t = torch.randint(0, 5, (2, 4))
    with pytest.raises(ValueError, match=r"belongs to module 'emb' \(Embedding\)"):
        kfac(et, nn.CrossEntropyLoss(), (t, t))
    with pytest.raises(ValueError, match="params is empty"):
        kfac(et, nn.CrossEntropyLoss(), (t, t), params=[])


# ------------------------------------------------------------------------ failure behaviour
def test_nan_parameters_and_seed_none():
    model, loss_fn, (X, y) = make_case("mlp", n=4)
    K0 = kfac(model, loss_fn, (X, y), kind="mc", seed=0)
    assert torch.equal(kfac(model, loss_fn, (X, y), kind="mc", seed=None).to_dense(), K0.to_dense())
    d0 = curvature.ggn_diagonal(model, loss_fn, (X, y), kind="mc", seed=0).diag
    assert torch.equal(curvature.ggn_diagonal(model, loss_fn, (X, y), kind="mc", seed=None).diag, d0)
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="seed must be an int"):
            kfac(model, loss_fn, (X, y), kind="mc", seed=bad)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        curvature.ggn_diagonal(model, loss_fn, (X, y), kind="mc", seed=2**70)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    for f in (lambda: kfac(model, loss_fn, (X, y)), lambda: curvature.ggn_diagonal(model, loss_fn, (X, y)),
              lambda: curvature.hessian_diagonal(model, loss_fn, (X, y))):
        with pytest.raises(ValueError, match=r"parameter\(s\) \['2.weight'\] have NaN/inf"):
            f()
    # NaN in the data (not the parameters): refused by the data loop, naming the batch and the inputs
    model, loss_fn, (X, y) = make_case("mlp", n=4)
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Batch 0 contains NaN or inf in its inputs"):
        kfac(model, loss_fn, (X, y))


def test_model_left_as_found_and_train_mode_refusals():
    model = _Residual().double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    model.train()
    rng = torch.get_rng_state()
    before = [p.detach().clone() for p in model.parameters()]
    kfac(model, nn.CrossEntropyLoss(), (X, y), kind="mc")
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, model.parameters()))
    assert all(not m._forward_hooks for m in model.modules())
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="BatchNorm"):
        kfac(bn, nn.CrossEntropyLoss(), (X, y), mode="train")
    kfac(bn, nn.CrossEntropyLoss(), (X, y))  # eval mode: running statistics, fine
    dr = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="dropout"):
        kfac(dr, nn.CrossEntropyLoss(), (X, y), mode="train")


def test_coverage_check_in_float32_catches_a_small_extra_use_and_accepts_conv_and_joint_blocks():
    """The check compares projections of the gradient (no rebuilt g^T x); float32 rounding over many
    rows (conv positions, joint blocks) must not trip it, a 1% extra use of a weight must."""

    class Leaky(nn.Module):
        def __init__(self, alpha):
            super().__init__()
            self.fc, self.alpha = nn.Linear(6, 4), alpha

        def forward(self, x):
            return self.fc(x) + self.alpha * torch.nn.functional.linear(x, self.fc.weight)

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(256, 6, generator=g), torch.randn(256, 4, generator=g)
    kfac(Leaky(0.0), nn.MSELoss(), (X, y), kind="mc")  # no extra use: accepted
    for separate_bias in (False, True):
        with pytest.raises(ValueError, match="also used outside them"):
            kfac(Leaky(1e-2), nn.MSELoss(), (X, y), kind="mc", separate_bias=separate_bias)
    model, loss_fn, (Xc, yc) = make_case("cnn", dtype=torch.float32, n=64)
    for separate_bias in (False, True):
        K = kfac(model, loss_fn, (Xc, yc), separate_bias=separate_bias)
        K64 = kfac(copy.deepcopy(model).double(), loss_fn, (Xc.double(), yc), separate_bias=separate_bias)
        assert rel_err(K.to_dense().double(), K64.to_dense()) < 1e-4
