"""The data loop: inference mode, fingerprints, random forwards, the global RNG, the cache, NaN data."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from curvature import FisherOperator, GGNOperator, HessianOperator, ggn_diagonal
from dense_truth import dense_empirical_fisher, dense_gradient, dense_ggn, dense_hessian, rel_err
from models import batchnorm_dropout, classification_data, make_case, mlp

EXACT = 1e-10


def _v(op, seed=0):
    return torch.randn(op.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ inference mode / no_grad
def test_inference_mode_refused_with_a_message_and_no_grad_is_exact():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    H = HessianOperator(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])])
    v = _v(H)
    truth = dense_hessian(model, loss_fn, X, y)
    for call in (lambda: H @ v, H.loss_and_gradient, lambda: GGNOperator(model, loss_fn, (X, y)) @ v,
                 lambda: ggn_diagonal(model, loss_fn, (X, y))):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            call()
    with torch.no_grad():
        assert rel_err(H @ v, truth @ v) < EXACT
        _, g = H.loss_and_gradient()
    assert rel_err(g, dense_gradient(model, loss_fn, X, y)) < EXACT


def test_inference_tensors_as_batches_work_and_as_parameters_are_refused():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    with torch.inference_mode():
        Xi, yi = X.clone(), y.clone()
    truth = dense_hessian(model, loss_fn, X, y)
    for data in ((Xi, yi), DataLoader(TensorDataset(Xi, yi), batch_size=3)):
        assert rel_err(HessianOperator(model, loss_fn, data).to_dense(), truth) < EXACT
    with torch.inference_mode():
        frozen = mlp()
    with pytest.raises(ValueError, match="inference tensors"):
        HessianOperator(frozen, loss_fn, (X, y))
    # the remedy the message gives works
    frozen.load_state_dict({k: v.clone() for k, v in frozen.state_dict().items()}, assign=True)
    assert rel_err(HessianOperator(frozen, loss_fn, (X, y)).to_dense(), truth) < EXACT


# ------------------------------------------------------------------ fingerprints
class _RandomFlip(Dataset):
    """Horizontal flip of each image with probability 1/2 (its own generator): sums are unchanged."""

    def __init__(self, X, y):
        self.X, self.y, self.g = X, y, torch.Generator().manual_seed(0)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        flip = bool(torch.rand((), generator=self.g) < 0.5)
        return (self.X[i].flip(-1) if flip else self.X[i]), self.y[i]


def test_sum_preserving_augmentation_is_detected():
    model, loss_fn, (X, y) = make_case("cnn", n=8)
    op = GGNOperator(model, loss_fn, DataLoader(_RandomFlip(X, y), batch_size=4))
    with pytest.raises(RuntimeError, match="data changed between passes"):
        for _ in range(3):  # (a pass may, by chance, flip the same images as the construction scan)
            op @ _v(op)


def test_permutation_inside_a_batch_refused_for_mc_fisher_accepted_otherwise():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    batches = [(X[:4].clone(), y[:4].clone()), (X[4:].clone(), y[4:].clone())]
    mc = FisherOperator(model, loss_fn, batches, kind="mc", seed=3)
    H = HessianOperator(model, loss_fn, batches)
    v = _v(H)
    ref = H @ v
    perm = torch.tensor([2, 0, 3, 1])
    batches[0] = (batches[0][0][perm], batches[0][1][perm])  # same examples, other positions
    with pytest.raises(RuntimeError, match="same order"):
        mc @ v
    assert rel_err(H @ v, ref) < 1e-13  # the Hessian does not depend on positions: accepted


def test_train_mode_batchnorm_refuses_a_reshuffle_but_accepts_reordered_batches():
    model = batchnorm_dropout()
    model[3].p = 0.0
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(8, (4,), 3)
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    op = HessianOperator(model, loss_fn, batches, mode="train")
    v = _v(op)
    ref = op @ v
    batches.reverse()  # the same batches in another order: the same matrix
    assert rel_err(op @ v, ref) < 1e-13
    mixed = torch.tensor([0, 5, 2, 7, 4, 1, 6, 3])  # examples swapped across batches: batch statistics change
    batches[:] = [(X[mixed[:4]], y[mixed[:4]]), (X[mixed[4:]], y[mixed[4:]])]
    with pytest.raises(RuntimeError, match="mode='train'"):
        op @ v
    # eval mode: the data set is the same, so the same matrix, accepted
    ev = HessianOperator(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])])
    ev_ref = ev @ v
    ev._loop.data[:] = batches
    assert rel_err(ev @ v, ev_ref) < 1e-12


def test_nan_in_data_is_named():
    model, loss_fn, (X, y) = make_case("regression", n=8)
    Xn = X.clone()
    Xn[5, 1] = float("nan")
    with pytest.raises(ValueError, match="Batch 1 contains NaN or inf in its inputs"):
        HessianOperator(model, loss_fn, DataLoader(TensorDataset(Xn, y), batch_size=4))
    yn = y.clone()
    yn[0, 0] = float("inf")
    with pytest.raises(ValueError, match="Batch 0 contains NaN or inf in its targets"):
        GGNOperator(model, loss_fn, [(X, yn)])
    # NaN appearing after construction: named, not "the data changed"
    Xc = X.clone()
    op = HessianOperator(model, loss_fn, DataLoader(TensorDataset(Xc, y), batch_size=4))
    v = _v(op)
    op @ v
    Xc[2, 0] = float("nan")
    with pytest.raises(ValueError, match="Batch 0 contains NaN"):
        op @ v
    single = HessianOperator(model, loss_fn, (Xc[4:].clone(), y[4:]))
    single @ _v(single)
    single.data[0][0, 0] = float("inf")  # a single batch changed in place (bumps _version)
    with pytest.raises(ValueError, match="NaN or inf in its inputs"):
        single @ _v(single)


# ------------------------------------------------------------------ random forwards
class _NoisyModel(nn.Module):
    """An mlp whose forward adds N(0, 0.1) noise: random even in eval mode."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x + 0.1 * torch.randn_like(x))


class _Attention(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True).double()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=True)
        return self.head(h.mean(1))


def test_random_forwards_are_refused_and_leave_the_rng_alone():
    X, y = classification_data(6, (3, 4), 3)
    loss_fn = nn.CrossEntropyLoss()
    X2, _ = classification_data(6, (5,), 3)
    for model, mode in ((_Attention(0.5), "train"), (_NoisyModel(), "eval")):
        op = HessianOperator(model, loss_fn, (X if mode == "train" else X2, y), mode=mode)
        before = torch.get_rng_state()
        with pytest.raises(ValueError, match="random numbers"):
            op @ _v(op)
        assert torch.equal(before, torch.get_rng_state())
    # attention dropout is off in eval mode: accepted and exact
    model = _Attention(0.5)
    H = HessianOperator(model, loss_fn, (X, y))
    assert rel_err(H.to_dense(), dense_hessian(model, loss_fn, X, y)) < EXACT


# ------------------------------------------------------------------ the global RNG
def _train(model, loader, steps, op=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        for X, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
            if op is not None:
                op @ torch.ones(op.shape[0], dtype=torch.float64)
                op.loss_and_gradient()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("shuffle", [False, True])
def test_training_with_products_interleaved_is_bit_identical(shuffle):
    """Every pass (construction scan, products, loss_and_gradient, the BackPACK loop) leaves the RNG alone."""
    _, loss_fn, (X, y) = make_case("mlp", n=12)
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=shuffle)
    model = mlp()
    torch.manual_seed(5)
    plain = _train(model, loader, 2)
    plain_state = torch.get_rng_state()
    model = mlp()
    torch.manual_seed(5)
    op = HessianOperator(model, loss_fn, DataLoader(TensorDataset(X, y), batch_size=4, shuffle=shuffle))
    ggn_diagonal(model, loss_fn, DataLoader(TensorDataset(X, y), batch_size=4, shuffle=shuffle))
    with_products = _train(model, loader, 2, op)
    assert torch.equal(plain, with_products)
    assert torch.equal(plain_state, torch.get_rng_state())


# ------------------------------------------------------------------ the cache
def test_cache_sees_sum_preserving_writes_and_changed_targets():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    H = HessianOperator(model, loss_fn, (X, y))
    v = _v(H)
    H @ v
    w = model[0].weight
    w.data.copy_(w.data[[1, 0, 2, 3, 4, 5]])  # two rows swapped through .data: sums unchanged
    assert rel_err(H @ v, dense_hessian(model, loss_fn, X, y) @ v) < EXACT
    yt = y.clone()
    EF = FisherOperator(model, loss_fn, (X, yt), kind="empirical")
    EF @ v
    yt[0] = (yt[0] + 1) % 3  # in place (bumps _version)
    assert rel_err(EF @ v, dense_empirical_fisher(model, loss_fn, X, yt) @ v) < EXACT
    yt.data[1] = (yt[1] + 1) % 3  # through .data (no version bump): the checksum
    assert rel_err(EF @ v, dense_empirical_fisher(model, loss_fn, X, yt) @ v) < EXACT
    G = GGNOperator(model, loss_fn, (X.clone(), y))
    G @ v
    G.data[0].data[:2] = G.data[0].data[[1, 0]].clone()  # inputs permuted through .data
    assert rel_err(G @ v, dense_ggn(model, loss_fn, G.data[0], y) @ v) < EXACT


class _TanhBackward(torch.autograd.Function):
    """``g (1 - out^2)`` with no derivative of its own, as fused kernels without double backward."""

    @staticmethod
    def forward(ctx, g, out):
        return g * (1 - out * out)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for fused_tanh_backward is not implemented")


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return _TanhBackward.apply(g, out)


class _Switchable(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.fused = mlp(), True

    def forward(self, x):
        h = self.net[0](x)
        h = _Tanh.apply(h) if self.fused else torch.tanh(h)
        return self.net[4](self.net[3](self.net[2](h)))


def test_a_failed_product_leaves_no_broken_state():
    model, loss_fn = _Switchable(), nn.CrossEntropyLoss()
    X, y = classification_data(6, (5,), 3)
    H = HessianOperator(model, loss_fn, (X, y))
    v = _v(H)
    with pytest.raises(RuntimeError, match="fused_tanh_backward"):
        H @ v
    assert H._state is None
    model.fused = False  # the cause removed: the next product works, without clear_cache()
    assert rel_err(H @ v, dense_hessian(model.net, loss_fn, X, y) @ v) < EXACT


# ------------------------------------------------------------------ vectors with requires_grad, sparse Embedding
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_products_are_differentiable_in_the_vector(cls):
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    op = cls(model, loss_fn, [(X[:5], y[:5]), (X[5:], y[5:])])
    A = (dense_hessian if cls is HessianOperator else dense_ggn)(model, loss_fn, X, y)
    v = _v(op).requires_grad_(True)
    u = _v(op, 1).requires_grad_(True)
    Av = op @ v
    assert Av.requires_grad and rel_err(Av.detach(), A @ v.detach()) < EXACT
    (g,) = torch.autograd.grad(Av @ u, v, create_graph=True)
    assert rel_err(g, A @ u) < EXACT  # d(u^T A v)/dv = A u
    (g2,) = torch.autograd.grad((g * g).sum(), u)  # through the backward product as well
    assert rel_err(g2, 2 * A @ (A @ u)) < EXACT
    V = torch.stack([v.detach(), u.detach()], 1).requires_grad_(True)
    (gV,) = torch.autograd.grad((op @ V).sum(), V)
    assert rel_err(gV, (A @ torch.ones(A.shape[0], 2, dtype=A.dtype))) < EXACT


class _Bag(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 3, sparse=sparse).double()
        self.head = nn.Linear(3, 2).double()

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


def test_sparse_embedding_gives_the_dense_answer():
    sparse, dense = _Bag(True), _Bag(False)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 6, (5, 3), generator=g), torch.randint(0, 2, (5,), generator=g)
    for cls in (HessianOperator, GGNOperator):
        op = cls(sparse, loss_fn, [(ids[:2], y[:2]), (ids[2:], y[2:])])
        truth = (dense_hessian if cls is HessianOperator else dense_ggn)(dense, loss_fn, ids, y)
        assert rel_err(op.to_dense(), truth) < EXACT
    _, grad = HessianOperator(sparse, loss_fn, (ids, y)).loss_and_gradient()
    assert rel_err(grad, dense_gradient(dense, loss_fn, ids, y)) < EXACT
    assert sparse.emb.sparse  # the user's flag restored


def test_single_batch_is_screened_for_nan_by_sums_with_the_fingerprint_naming_the_culprit():
    from curvature._empirical_risk import BatchLoop

    model, loss_fn, (X, y) = make_case("regression", n=8)
    Xn = X.clone()
    Xn[3, 0] = float("nan")
    with pytest.raises(ValueError, match="Batch 0 contains NaN or inf in its inputs"):
        HessianOperator(model, loss_fn, (Xn, y))
    yn = y.clone()
    yn[0, 0] = -float("inf")
    with pytest.raises(ValueError, match="Batch 0 contains NaN or inf in its targets"):
        BatchLoop((X, yn), "cpu", "mean")
    # finite entries whose sum overflows: accepted (the screen's non-finite sum is rechecked)
    huge = torch.full((4, 3), 1e308, dtype=torch.float64)
    loop = BatchLoop((huge, torch.zeros(4, 1, dtype=torch.float64)), "cpu", "mean")
    assert loop.num_data == 4 and [b for b, *_ in loop] == [0]
    huge[1, 2] = float("nan")
    with pytest.raises(ValueError, match="Batch 0 contains NaN or inf in its inputs"):
        BatchLoop((huge, torch.zeros(4, 1, dtype=torch.float64)), "cpu", "mean")
    # integer inputs (token ids) need no screen
    assert BatchLoop((torch.arange(6).reshape(3, 2), torch.zeros(3)), "cpu", "sum").num_data == 3
