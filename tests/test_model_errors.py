"""Clear exceptions for bad input to the model curvature operators."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvature import FisherOperator, GGNOperator, HessianOperator, block_diagonal
from models import classification_data, make_case, mlp


@pytest.fixture
def setup():
    return make_case("mlp", n=6)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator])
def test_non_scalar_loss(setup, cls):
    model, _, data = setup
    with pytest.raises(ValueError, match="scalar.*reduction='none'"):
        cls(model, nn.CrossEntropyLoss(reduction="none"), data)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_non_scalar_loss_from_a_plain_function(setup, cls):
    model, _, data = setup
    op = cls(model, lambda z, y: z.pow(2).sum(1), data)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_no_trainable_parameters(setup):
    model, loss_fn, data = setup
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, loss_fn, data)


def test_empty_data(setup):
    model, loss_fn, (X, y) = setup
    with pytest.raises(ValueError, match="data is empty"):
        GGNOperator(model, loss_fn, [])
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator(model, loss_fn, DataLoader(TensorDataset(X[:0], y[:0]), batch_size=2))


def test_one_shot_iterator_and_bad_batches(setup):
    model, loss_fn, (X, y) = setup
    with pytest.raises(TypeError, match="one-shot iterator"):
        HessianOperator(model, loss_fn, iter([(X, y)]))
    with pytest.raises(TypeError, match=r"pair \(X, y\)"):
        HessianOperator(model, loss_fn, [(X,)])  # (X1, ..., y) with 3+ entries is a valid batch now


def test_vector_of_wrong_shape_dtype_device(setup):
    model, loss_fn, data = setup
    op = HessianOperator(model, loss_fn, data)
    n = op.shape[0]
    with pytest.raises(ValueError, match="Dimension mismatch"):
        op @ torch.ones(n + 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype mismatch"):
        op @ torch.ones(n, dtype=torch.float32)
    with pytest.raises(ValueError, match="Device mismatch"):
        op @ torch.ones(n, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="shape"):
        op @ [torch.ones(3)]  # parameter format with the wrong pieces


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.lin(x) * torch.sqrt(-torch.ones(1, dtype=x.dtype))  # NaN


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_nan_in_product(cls):
    X, y = classification_data(6)
    op = cls(_NaNModel(), nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["mc", "exact"])
def test_unsupported_loss_for_mc_and_exact_fisher(setup, kind):
    model, _, data = setup
    with pytest.raises(NotImplementedError, match="predictive distribution"):
        FisherOperator(model, nn.HuberLoss(), data, kind=kind)
    weighted = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="predictive distribution"):
        FisherOperator(model, weighted, data, kind=kind)


def test_ignored_targets_count_nothing_in_the_exact_fisher(setup):
    """An ignored target is defined (it contributes nothing), no longer refused: see test_loss_semantics."""
    model, loss_fn, (X, y) = setup
    y = y.clone()
    y[0] = -100
    op = FisherOperator(model, loss_fn, (X, y), kind="exact")
    ref = FisherOperator(model, loss_fn, (X[1:], y[1:]), kind="exact")
    v = torch.ones(op.shape[0], dtype=torch.float64)
    assert float(((op @ v) - (ref @ v)).norm() / (ref @ v).norm()) < 1e-10


def test_bad_params_and_options(setup):
    model, loss_fn, data = setup
    with pytest.raises(ValueError, match="not a parameter of the model"):
        HessianOperator(model, loss_fn, data, params=[torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="Unknown parameter name"):
        HessianOperator(model, loss_fn, data, params=["nope.weight"])
    with pytest.raises(ValueError, match="duplicates"):
        HessianOperator(model, loss_fn, data, params=["0.weight", "0.weight"])
    with pytest.raises(ValueError, match="params is empty"):
        HessianOperator(model, loss_fn, data, params=[])
    with pytest.raises(ValueError, match="mode must be"):
        HessianOperator(model, loss_fn, data, mode="test")
    with pytest.raises(ValueError, match="kind must be"):
        FisherOperator(model, loss_fn, data, kind="true")
    with pytest.raises(ValueError, match="jvp must be"):
        GGNOperator(model, loss_fn, data, jvp="fwd")
    with pytest.raises(ValueError, match="mc_samples"):
        FisherOperator(model, loss_fn, data, mc_samples=0)
    with pytest.raises(ValueError, match="grouping"):
        block_diagonal(HessianOperator, model, loss_fn, data, grouping="module")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        HessianOperator(lambda x: x, loss_fn, data)


def test_reduction_needed_for_plain_loss_over_batches():
    model = mlp()
    X, y = classification_data(6)

    def ce(z, t):
        return nn.functional.cross_entropy(z, t)

    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        HessianOperator(model, ce, [(X[:3], y[:3]), (X[3:], y[3:])])
    op = HessianOperator(model, ce, [(X[:3], y[:3]), (X[3:], y[3:])], reduction="mean")
    ref = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    assert float(((op @ v) - (ref @ v)).norm() / (ref @ v).norm()) < 1e-10
