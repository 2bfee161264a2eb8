"""Bounded memory: ``micro_batch_size=`` and ``max_block_bytes=`` of the model curvature operators.

Both options must leave the matrix unchanged: every product is checked in float64 against the
unsplit / unchunked product (to 1e-12 relative) and against dense truth built independently
(double backward, explicit Jacobians; tests/dense_truth.py).  That the options really bound
the working set is checked by counting what one pass does: columns per batch product, and
batch states built per product.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature import FisherOperator, GGNOperator, HessianOperator, TokenCrossEntropyLoss
from curvature.losses import sample_output_gradients
from dense_truth import dense_curvature, dense_hessian, dense_lowrank_fisher, rel_err
from models import batchnorm_dropout, classification_data, cnn, mlp

TOL = 1e-12


def _probe(n: int, k: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _counting(op):
    """Wrap ``op``'s per-batch hooks: returns the lists of column counts and of built states."""
    columns, built = [], []
    apply_state, build_state = op._apply_state, op._build_state

    def counted_apply(state, V, idx=None):
        columns.append(V.shape[1])
        return apply_state(state, V, idx)

    def counted_build(X, y, b):
        built.append((b, X.batch_size))
        return build_state(X, y, b)

    op._apply_state, op._build_state = counted_apply, counted_build
    return columns, built


# ----------------------------------------------------------------- micro-batches
OPERATORS = {
    "hessian": lambda *a, **k: HessianOperator(*a, **k),
    "ggn": lambda *a, **k: GGNOperator(*a, **k),
    "ggn_forward": lambda *a, **k: GGNOperator(*a, jvp="forward", **k),
    "fisher_exact": lambda *a, **k: FisherOperator(*a, kind="exact", **k),
    "fisher_empirical": lambda *a, **k: FisherOperator(*a, kind="empirical", **k),
}



@pytest.mark.parametrize("kind", list(OPERATORS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batches", [(10,), (7, 3)])
def test_micro_batches_equal_whole_batches_and_dense_truth(kind, reduction, batches):
    model = mlp()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    X, y = classification_data(n=sum(batches))
    data = (X, y) if len(batches) == 1 else list(zip(X.split(list(batches)), y.split(list(batches))))
    whole = OPERATORS[kind](model, loss_fn, data)
    micro = OPERATORS[kind](model, loss_fn, data, micro_batch_size=3)
    V = _probe(whole.shape[0], 4)
    ref = whole @ V
    columns, built = _counting(micro)
    got = micro @ V
    assert rel_err(got, ref) < TOL
    assert rel_err(got, dense_curvature(kind, model, loss_fn, X, y) @ V) < 1e-10
    # every batch in micro-batches of at most 3 examples: 10 -> 3,3,3,1; 7,3 -> 3,3,1,3
    assert [n for _, n in built] == ([3, 3, 3, 1] if len(batches) == 1 else [3, 3, 1, 3])
    assert micro @ V is not None and rel_err(micro @ V, ref) < TOL  # a second product (no stale cache)


def test_micro_batches_on_a_conv_net_and_the_gradient():
    model = cnn()
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(n=9, in_shape=(1, 7, 7))
    whole = HessianOperator(model, loss_fn, (X, y))
    micro = HessianOperator(model, loss_fn, (X, y), micro_batch_size=4)
    V = _probe(whole.shape[0], 3)
    assert rel_err(micro @ V, whole @ V) < TOL
    (l0, g0), (l1, g1) = whole.loss_and_gradient(), micro.loss_and_gradient()
    assert abs(float(l1 - l0)) < TOL * abs(float(l0)) and rel_err(g1, g0) < TOL


def test_micro_batches_with_ignored_targets_and_class_weights():
    """The mean divides by the class-weighted count of non-ignored targets; micro-batches re-weight by it."""
    model = mlp()
    weight = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-100)
    X, y = classification_data(n=10)
    y = y.clone()
    y[[0, 1, 2, 7]] = -100  # micro-batch 0 (rows 0..2) has every target ignored: skipped
    data = list(zip(X.split([6, 4]), y.split([6, 4])))
    whole = HessianOperator(model, loss_fn, data)
    micro = HessianOperator(model, loss_fn, data, micro_batch_size=3)
    columns, built = _counting(micro)
    V = _probe(whole.shape[0], 2)
    got = micro @ V
    assert rel_err(got, whole @ V) < TOL
    assert rel_err(got, dense_hessian(model, loss_fn, X, y) @ V) < 1e-10
    assert [n for _, n in built] == [3, 3, 1]  # rows 0..2 skipped (nothing to average)
    ggn_whole = GGNOperator(model, loss_fn, data)
    ggn_micro = GGNOperator(model, loss_fn, data, micro_batch_size=3)
    assert rel_err(ggn_micro @ V, ggn_whole @ V) < TOL


def test_micro_batches_of_a_token_level_language_model():
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 7)).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 7, (5, 6), generator=g)
    ids[1, 4:] = 0
    ids[3, 2:] = 0
    labels = ids.masked_fill(ids == 0, -100)  # padding not counted: micro-batches have unequal token counts
    loss_fn = TokenCrossEntropyLoss(shift=True)
    for make in (HessianOperator, GGNOperator,
                 lambda *a, **k: FisherOperator(*a, kind="empirical", ef_granularity="token", **k)):
        whole = make(lm, loss_fn, (ids, labels))
        micro = make(lm, loss_fn, (ids, labels), micro_batch_size=2)
        V = _probe(whole.shape[0], 3)
        assert rel_err(micro @ V, whole @ V) < TOL


def test_micro_batched_mc_fisher_draws_labels_per_micro_batch():
    """A fixed matrix: sum_j (n_j / N) J_j^T S_j S_j^T J_j with S_j sampled from micro-batch j's generator."""
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(n=7)
    F = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=2, seed=5, micro_batch_size=4)
    truth = torch.zeros(F.shape, dtype=torch.float64)
    for j, (Xj, yj) in enumerate(zip(X.split(4), y.split(4))):
        with torch.no_grad():
            zj = model(Xj)
        S = sample_output_gradients(loss_fn, zj, "mean", 2, F._batch_generator((0, j)), yj)
        truth += (Xj.shape[0] / 7) * dense_lowrank_fisher(model, Xj, S)
    V = _probe(F.shape[0], 3)
    assert rel_err(F @ V, truth @ V) < 1e-10
    assert rel_err(F @ V, F @ V) == 0.0  # the same labels on every pass
    # not split (micro-batch as large as the batch): the labels of the whole batch, as without the option
    same = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=2, seed=5, micro_batch_size=7)
    plain = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=2, seed=5)
    assert rel_err(same @ V, plain @ V) < TOL


def test_micro_batches_follow_parameter_changes():
    """A split batch is rebuilt every product: an optimizer step is seen (no stale cached state)."""
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(n=10)
    H = HessianOperator(model, loss_fn, (X, y), micro_batch_size=4)
    V = _probe(H.shape[0], 2)
    H @ V
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    assert rel_err(H @ V, dense_hessian(model, loss_fn, X, y) @ V) < 1e-10


def test_unsplit_single_batch_stays_cached():
    model = mlp()
    X, y = classification_data(n=10)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), micro_batch_size=10)
    _, built = _counting(H)
    V = _probe(H.shape[0], 2)
    H @ V
    H @ V
    assert len(built) == 1


# ------------------------------------------------------------- column chunks
@pytest.mark.parametrize("make", [HessianOperator, GGNOperator,
                                  lambda *a, **k: GGNOperator(*a, jvp="forward", **k),
                                  lambda *a, **k: HessianOperator(*a, batched=True, **k)])
def test_max_block_bytes_chunks_columns_without_changing_the_product(make):
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(n=10)
    data = list(zip(X.split(5), y.split(5)))
    unbounded = make(model, loss_fn, data, max_block_bytes=None)
    n = unbounded.shape[0]
    V = _probe(n, 16)
    ref = unbounded @ V
    cols, _ = _counting(unbounded)
    unbounded @ V
    assert cols == [16, 16]  # one call per batch with every column
    state_column = unbounded._column_bytes(unbounded._build_state(*unbounded._loop.adapter.split(data[0]),
                                                                   0), n)
    bounded = make(model, loss_fn, data, max_block_bytes=5 * state_column + 1)
    cols, built = _counting(bounded)
    got = bounded @ V
    assert rel_err(got, ref) < TOL
    assert cols == [5, 5, 5, 1] * 2  # 16 columns in chunks of 5, for each of the 2 batches
    assert len(built) == 2  # the chunks share each batch's state: no extra forward / backward
    tiny = make(model, loss_fn, data, max_block_bytes=1)  # below one column: one column at a time
    cols, _ = _counting(tiny)
    assert rel_err(tiny @ V, ref) < TOL and cols == [1] * 32


def test_column_estimate_counts_the_output_for_the_ggn():
    model = mlp()
    X, y = classification_data(n=10)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    n = H.shape[0]
    assert H._column_bytes(None, n) == 4 * n * 8
    state = G._build_state(*G._loop.adapter.split((X, y)), 0)
    assert G._column_bytes(state, n) == 4 * n * 8 + 2 * 10 * 3 * 8  # z is [10, 3]
    assert H.max_block_bytes == 2**30 and H.micro_batch_size is None  # the documented defaults


def test_both_bounds_together_on_parameter_blocks():
    """Micro-batches and column chunks compose, also for the per-layer blocks sharing one loop."""
    import curvature

    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    X, y = classification_data(n=10)
    whole = curvature.block_diagonal(HessianOperator, model, loss_fn, (X, y))
    bounded = curvature.block_diagonal(HessianOperator, model, loss_fn, (X, y), micro_batch_size=3,
                                       max_block_bytes=4 * 8 * 40)
    for a, b in zip(whole.blocks, bounded.blocks):
        V = _probe(a.shape[0], 6)
        assert rel_err(b @ V, a @ V) < TOL


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["micro_batch_size", "max_block_bytes"])
@pytest.mark.parametrize("value, error", [(0, ValueError), (-4, ValueError), (2.5, TypeError), (True, TypeError),
                                          ("1GB", TypeError)])
def test_bad_bounds_are_refused(name, value, error):
    X, y = classification_data(n=4)
    with pytest.raises(error, match=name):
        HessianOperator(mlp(), nn.CrossEntropyLoss(), (X, y), **{name: value})


def test_micro_batches_refused_where_they_would_change_the_matrix():
    X, y = classification_data(n=6, in_shape=(4,))
    model = batchnorm_dropout()
    model[3].p = 0.0
    with pytest.raises(ValueError, match="batch statistics"):
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), mode="train", micro_batch_size=2)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), micro_batch_size=2)  # eval mode: per example
    V = _probe(H.shape[0], 2)
    assert rel_err(H @ V, HessianOperator(model, nn.CrossEntropyLoss(), (X, y)) @ V) < TOL

    def plain_loss(z, t):  # no reduction attribute: how examples combine is unknown
        return nn.functional.cross_entropy(z, t)

    X, y = classification_data(n=6)
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(mlp(), plain_loss, (X, y), micro_batch_size=2)
    H = HessianOperator(mlp(), plain_loss, (X, y), micro_batch_size=2, reduction="mean")
    ref = HessianOperator(mlp(), nn.CrossEntropyLoss(), (X, y))
    V = _probe(H.shape[0], 2)
    assert rel_err(H @ V, ref @ V) < TOL


class _KeywordModel(nn.Module):
    """``model(features=..., scale=...)``: ``scale`` is one tensor for the whole batch (not sliced)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, features, scale):
        return self.body(features) * scale


def test_micro_batches_of_mapping_batches_slice_only_per_example_tensors():
    model = _KeywordModel()
    X, y = classification_data(n=9)
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # first dim 3 != 9: passed whole
    batch = {"features": X, "scale": scale, "labels": y}
    whole = HessianOperator(model, nn.CrossEntropyLoss(), batch)
    micro = HessianOperator(model, nn.CrossEntropyLoss(), batch, micro_batch_size=4)
    _, built = _counting(micro)
    V = _probe(whole.shape[0], 3)
    assert rel_err(micro @ V, whole @ V) < TOL
    assert [n for _, n in built] == [4, 4, 1]


# ---------------------------------------------------------- data parallel
def _micro_problem():
    model = mlp(seed=3)
    X, y = classification_data(n=12, seed=4)
    y = y.clone()
    y[[1, 6, 7]] = -100  # ignored targets, unevenly spread over ranks and micro-batches
    return model, X, y


def _micro_rank(rank: int, world: int) -> dict:
    """Rank 0 holds batches of 4 and 2 examples, rank 1 one of 6; micro-batches of 3 everywhere."""
    import torch.distributed as dist

    model, X, y = _micro_problem()
    data = [[(X[0:4], y[0:4]), (X[4:6], y[4:6])], [(X[6:12], y[6:12])]][rank]
    group = dist.group.WORLD
    V = _probe(sum(p.numel() for p in model.parameters()), 3)
    loss_fn = nn.CrossEntropyLoss()
    return {name: (make(model, loss_fn, data, process_group=group, micro_batch_size=3) @ V)
            for name, make in (("hessian", HessianOperator), ("ggn", GGNOperator))}


def test_micro_batches_under_data_parallel_equal_the_single_process_product(tmp_path):
    from dist_harness import spawn

    outs = spawn("test_memory_bounds", "_micro_rank", 2, tmp_path)
    model, X, y = _micro_problem()
    V = _probe(sum(p.numel() for p in model.parameters()), 3)
    truth = {"hessian": HessianOperator(model, nn.CrossEntropyLoss(), (X, y)) @ V,
             "ggn": GGNOperator(model, nn.CrossEntropyLoss(), (X, y)) @ V}
    for out in outs:
        for name, ref in truth.items():
            assert rel_err(out[name], ref) < TOL
