"""Data semantics: batches vs concatenated data, shuffling, BatchNorm/dropout, model left unchanged."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from curvature import FisherOperator, GGNOperator, HessianOperator
from dense_truth import dense_curvature, dense_ggn, dense_hessian, rel_err
from models import batchnorm_dropout, classification_data, make_case

EXACT = 1e-10



def _op(kind, model, loss_fn, data, **kw):
    if kind == "hessian":
        return HessianOperator(model, loss_fn, data, **kw)
    if kind == "ggn":
        return GGNOperator(model, loss_fn, data, **kw)
    return FisherOperator(model, loss_fn, data, kind=kind, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "exact", "empirical"])
@pytest.mark.parametrize("name", ["mlp", "regression"])
def test_unequal_batches_equal_concatenated_data(kind, reduction, name):
    model, loss_fn, (X, y) = make_case(name, n=10, reduction=reduction)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)  # batches of 4, 4, 2
    op = _op(kind, model, loss_fn, loader)
    assert op.num_data == 10 and op.num_batches == 3
    assert rel_err(op.to_dense(), dense_curvature(kind, model, loss_fn, X, y)) < EXACT


def test_sum_is_n_times_mean():
    model, _, (X, y) = make_case("cnn", n=10)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    for cls in (HessianOperator, GGNOperator):
        mean = cls(model, nn.CrossEntropyLoss(), batches) @ V
        total = cls(model, nn.CrossEntropyLoss(reduction="sum"), batches) @ V
        assert rel_err(total, 10 * mean) < EXACT


def test_mc_fisher_over_batches_is_weighted_sum_of_per_batch_fishers():
    model, loss_fn, (X, y) = make_case("mlp", n=10)
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    op = FisherOperator(model, loss_fn, batches, kind="mc", mc_samples=2, seed=4)
    # batch b of the multi-batch operator draws from the generator seeded by (seed, b)
    parts = []
    for b, (Xb, yb) in enumerate(batches):
        single = FisherOperator(model, loss_fn, (Xb, yb), kind="mc", mc_samples=2, seed=4)
        single._batch_generator = lambda _i, b=b, s=single: FisherOperator._batch_generator(s, b)
        parts.append(Xb.shape[0] / 10 * single.to_dense())
    assert rel_err(op.to_dense(), parts[0] + parts[1]) < EXACT


def test_shuffled_loader_same_answer_or_refused():
    model, loss_fn, (X, y) = make_case("mlp", n=10)
    H = dense_hessian(model, loss_fn, X, y)
    shuffled = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    # Hessian/GGN/EF do not depend on the order: accepted, and the answer is the same
    assert rel_err(HessianOperator(model, loss_fn, shuffled).to_dense(), H) < EXACT
    # MC Fisher ties sampled labels to batch positions: a reordering is refused
    mc = FisherOperator(model, loss_fn, shuffled, kind="mc", seed=0)
    with pytest.raises(RuntimeError, match="shuffl"):
        mc.to_dense()
    # drop_last with shuffling changes the data set between passes: refused
    dropping = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(0))
    op = GGNOperator(model, loss_fn, dropping)
    with pytest.raises(RuntimeError, match="drop_last"):
        for _ in range(5):  # some pass drops a different example than the construction pass
            op @ torch.ones(op.shape[0], dtype=torch.float64)


class _Augmented(Dataset):
    """Adds fresh noise to every input on every access (random augmentation)."""

    def __init__(self, X, y):
        self.X, self.y, self.g = X, y, torch.Generator().manual_seed(0)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + 0.1 * torch.randn(self.X[i].shape, generator=self.g, dtype=self.X.dtype), self.y[i]


def test_random_augmentation_refused():
    model, loss_fn, (X, y) = make_case("mlp", n=10)
    op = HessianOperator(model, loss_fn, DataLoader(_Augmented(X, y), batch_size=5))
    with pytest.raises(RuntimeError, match="augmentation"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def _snapshot(model):
    return ([m.training for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


@pytest.mark.parametrize("kind", ["hessian", "ggn", "mc", "empirical"])
def test_batchnorm_dropout_eval_mode_and_model_untouched(kind):
    model = batchnorm_dropout()
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(8, (4,), 3)
    model.train()
    model[4].weight.grad = torch.full_like(model[4].weight, 0.25)  # a user's leftover gradient
    before = _snapshot(model)
    kw = {"seed": 0} if kind == "mc" else {}
    op = _op(kind, model, loss_fn, [(X[:5], y[:5]), (X[5:], y[5:])], **kw)
    D = op.to_dense()
    assert torch.equal(D, op.to_dense())  # deterministic: no dropout, running statistics
    if kind in ("hessian", "ggn"):  # truth evaluates in eval mode
        truth = (dense_hessian if kind == "hessian" else dense_ggn)(model, loss_fn, X, y)
        assert rel_err(D, truth) < EXACT
    after = _snapshot(model)
    assert after[0] == before[0] and all(after[0])  # every training flag restored
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # parameters and buffers
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before[2], after[2]))


def test_train_mode_batch_statistics_restores_buffers_and_refuses_dropout():
    model = batchnorm_dropout()
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(8, (4,), 3)
    with pytest.raises(ValueError, match="dropout"):
        HessianOperator(model, loss_fn, (X, y), mode="train")
    model[3].p = 0.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    op = HessianOperator(model, loss_fn, (X, y), mode="train")
    D = op.to_dense()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # truth: double backward through the batch statistics (train-mode BatchNorm)
    params = list(model.parameters())
    model.train()
    (g,) = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)])]
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, retain_graph=True)])
            for i in range(g.numel())]
    model.load_state_dict(state)
    assert rel_err(D, torch.stack(rows)) < EXACT
    assert rel_err(D, dense_hessian(model, loss_fn, X, y)) > 1e-3  # differs from eval mode


def test_batches_moved_to_parameter_device_and_dtype_follows():
    model, loss_fn, (X, y) = make_case("mlp", n=6, dtype=torch.float32)
    op = GGNOperator(model, loss_fn, (X, y))
    assert op.dtype == torch.float32 and op.device == next(model.parameters()).device
    assert (op @ torch.ones(op.shape[0])).dtype == torch.float32


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical"])
@pytest.mark.parametrize("variant", ["ignore_index", "class_weights"])
def test_weighted_or_ignored_targets_over_batches(kind, variant):
    """PyTorch's CE mean divides by the (class-weighted) count of non-ignored targets."""
    model, _, (X, y) = make_case("mlp", n=10)
    y = torch.tensor([0, 1, 2, 1, 0, 1, 2, 2, 1, 1])
    if variant == "ignore_index":
        loss_fn = nn.CrossEntropyLoss(ignore_index=1)
    else:
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    op = _op(kind, model, loss_fn, batches)
    if kind == "empirical":  # c sum_n g_n g_n^T with c = 1 / (weighted count), per-example summed loss
        from dense_truth import dense_gradient

        per = type(loss_fn)(reduction="sum", **({"ignore_index": 1} if variant == "ignore_index"
                                                 else {"weight": loss_fn.weight}))
        G = torch.stack([dense_gradient(model, per, X[i:i + 1], y[i:i + 1]) for i in range(10)])
        denom = float((y != 1).sum()) if variant == "ignore_index" else float(loss_fn.weight[y].sum())
        truth = G.T @ G / denom
    elif kind == "hessian":
        truth = dense_hessian(model, loss_fn, X, y)
    else:  # GGN with the output Hessian of the weighted / masked loss by autograd
        from dense_truth import dense_jacobian

        J = dense_jacobian(model, X)
        with torch.no_grad():
            z = model.eval()(X)
        Hz = torch.autograd.functional.hessian(lambda t: loss_fn(t.reshape(z.shape), y), z.reshape(-1))
        truth = J.T @ Hz @ J
    assert rel_err(op.to_dense(), truth) < EXACT


def test_all_ignored_batch_contributes_nothing():
    model, _, (X, y) = make_case("mlp", n=6)
    y = torch.tensor([1, 1, 0, 2, 1, 0])
    loss_fn = nn.CrossEntropyLoss(ignore_index=1)
    op = HessianOperator(model, loss_fn, [(X[:2], y[:2]), (X[2:], y[2:])])  # first batch: all ignored
    assert rel_err(op.to_dense(), dense_hessian(model, loss_fn, X, y)) < EXACT


def test_empirical_fisher_needs_reduction_for_plain_function():
    model, _, (X, _) = make_case("mlp", n=6)
    t = torch.randn(6, 3, dtype=torch.float64)

    def sq(z, target):
        return ((z - target) ** 2).sum()

    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        FisherOperator(model, sq, (X, t), kind="empirical") @ torch.ones(
            sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    op = FisherOperator(model, sq, (X, t), kind="empirical", reduction="sum")
    from dense_truth import per_example_gradients

    G = per_example_gradients(model, nn.MSELoss(reduction="sum"), X, t)
    assert rel_err(op.to_dense(), G.T @ G) < EXACT


class _HostReads:
    """Counts host reads (device syncs on CUDA) and float64 copies made under it."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.reads, self.f64_copies = 0, []
        tolist = torch.Tensor.tolist

        def counting_tolist(t):
            counter.reads += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
                    counter.reads += 1
                if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float64:
                    counter.f64_copies.append(args[0].numel())
                return func(*args, **kwargs)

        self.mode = Mode()

    def __enter__(self):
        self.reads, self.f64_copies = 0, []
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_product_pass_reads_back_once_and_copies_no_batch(monkeypatch):
    """The data fingerprint stays on the device: host reads per product do not grow with the number of
    batches (one read per pass), and no float64 copy of a batch is made (float32 data)."""
    model, loss_fn, (X, y) = make_case("regression", n=24)
    model, X, y = model.float(), X.float(), y.float()
    counter = _HostReads(monkeypatch)
    reads = {}
    for nb in (2, 6):
        loader = DataLoader(TensorDataset(X, y), batch_size=24 // nb)
        op = HessianOperator(model, loss_fn, loader)
        v = torch.ones(op.shape[0])
        op @ v  # warm-up
        with counter:
            Hv = op @ v
        reads[nb] = counter.reads
        assert not any(n >= X[: 24 // nb].numel() for n in counter.f64_copies), counter.f64_copies
        truth = dense_hessian(model.double(), loss_fn, X.double(), y.double()) @ v.double()
        model.float()
        assert rel_err(Hv.double(), truth) < 1e-4  # float32 rounding over ~50 parameters
    assert reads[2] == reads[6], reads


def test_one_batch_loader_is_cached_and_still_checked():
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    for data in ([(X, y)], DataLoader(TensorDataset(X, y), batch_size=8)):
        op = HessianOperator(model, loss_fn, data)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert rel_err(op @ v, dense_hessian(model, loss_fn, X, y) @ v) < EXACT
        state = op._state
        assert state is not None
        assert rel_err(op @ v, dense_hessian(model, loss_fn, X, y) @ v) < EXACT and op._state is state
        with torch.no_grad():  # an optimizer step rebuilds the cached state
            for p in model.parameters():
                p.add_(0.01)
        assert rel_err(op @ v, dense_hessian(model, loss_fn, X, y) @ v) < EXACT and op._state is not state
    # the determinism check still applies: a one-batch loader whose batch changes is refused
    batches = [(X.clone(), y)]
    op = GGNOperator(model, loss_fn, batches)
    op @ v
    batches[0] = (1.1 * X, y)  # as random augmentation would
    with pytest.raises(RuntimeError, match="data changed between passes"):
        op @ v
    # without the check the state is not cached (a changing batch would otherwise go unnoticed)
    assert GGNOperator(model, loss_fn, batches, check_data=False)._cacheable is False


def test_cache_check_version_skips_the_checksum_sync(monkeypatch):
    model, loss_fn, (X, y) = make_case("mlp", n=8)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    counter, reads = _HostReads(monkeypatch), {}
    for check in ("checksum", "version"):
        op = HessianOperator(model, loss_fn, (X, y), cache_check=check)
        op.check_finite = False  # the NaN/inf test shares the checksum's read (tests/test_host_syncs.py)
        op @ v
        with counter:
            op @ v
        reads[check] = counter.reads
        with torch.no_grad():  # in-place updates bump _version: caught by both
            model[0].weight.add_(0.1)
        assert rel_err(op @ v, dense_hessian(model, loss_fn, X, y) @ v) < EXACT
    assert reads["checksum"] == reads["version"] + 1  # exactly one sync per product for the checksum
    with pytest.raises(ValueError, match="cache_check must be"):
        HessianOperator(model, loss_fn, (X, y), cache_check="never")
