"""The batch adapter: dict / multi-input batches and structured model outputs, against dense truth."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from curvature import BatchAdapter, FisherOperator, GGNOperator, HessianOperator
from curvature.batches import ModelInputs, tensor_leaves, to_device
from dense_truth import dense_gradient, dense_ggn, dense_hessian, rel_err
from models import classification_data, mlp

EXACT = 1e-10
VOCAB, T, C = 7, 4, 3


class TinyTextClassifier(nn.Module):
    """``Embedding - masked mean over tokens - Tanh - Linear``, called as ``model(input_ids=, attention_mask=)``.

    Returns a Hugging-Face-like object with ``.logits`` (and ``.loss`` when ``labels`` is passed).
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 4).double()
        self.head = nn.Linear(4, C).double()

    def forward(self, input_ids, attention_mask, labels=None):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        logits = self.head(torch.tanh(h))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels) * 100.0  # never used
        return SimpleNamespace(logits=logits, loss=loss)


class DictCall(nn.Module):
    """Truth-side wrapper: ``model(batch_dict) = inner(**batch_dict).logits`` (same parameter order)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(**batch).logits


def text_data(n: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::2, -1] = 0  # unequal lengths
    labels = torch.randint(0, C, (n,), generator=g)
    return ids, mask, labels


class DictDataset(Dataset):
    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _truth(kind, model, loss_fn, X: dict, y):
    if kind != "empirical":
        return {"hessian": dense_hessian, "ggn": dense_ggn}[kind](model, loss_fn, X, y)
    # (1/N) sum_n g_n g_n^T with g_n the gradient of example n's loss
    G = torch.stack([dense_gradient(model, loss_fn, {k: v[i:i + 1] for k, v in X.items()}, y[i:i + 1])
                     for i in range(len(y))])
    return G.T @ G / len(y)


def _op(kind, model, loss_fn, data, **kw):
    if kind == "hessian":
        return HessianOperator(model, loss_fn, data, **kw)
    if kind == "ggn":
        return GGNOperator(model, loss_fn, data, **kw)
    return FisherOperator(model, loss_fn, data, kind=kind, **kw)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical"])
def test_dict_batches_over_a_loader_equal_the_concatenated_data(kind):
    model, loss_fn = TinyTextClassifier(), nn.CrossEntropyLoss()
    ids, mask, labels = text_data(9)
    loader = DataLoader(DictDataset(ids, mask, labels), batch_size=4)  # 4, 4, 1: unequal batches
    op = _op(kind, model, loss_fn, loader)
    assert op.num_data == 9 and op.num_batches == 3
    truth = _truth(kind, DictCall(model), loss_fn, {"input_ids": ids, "attention_mask": mask}, labels)
    assert rel_err(op.to_dense(), truth) < EXACT
    # one dict batch (a single batch, cached) gives the same matrix
    single = _op(kind, model, loss_fn, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert single._single and rel_err(single.to_dense(), truth) < EXACT


def test_labels_passed_to_the_model_on_request_and_its_own_loss_ignored():
    model, loss_fn = TinyTextClassifier(), nn.CrossEntropyLoss()
    ids, mask, labels = text_data(6)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    default = HessianOperator(model, loss_fn, batch).to_dense()
    assert seen[-1] == ["attention_mask", "input_ids"]  # labels not passed: no loss computed by the model
    passed = HessianOperator(model, loss_fn, batch, adapter=BatchAdapter(pass_labels=True)).to_dense()
    assert seen[-1] == ["attention_mask", "input_ids", "labels"]
    truth = dense_hessian(DictCall(model), loss_fn, {"input_ids": ids, "attention_mask": mask}, labels)
    assert rel_err(default, truth) < EXACT and rel_err(passed, truth) < EXACT


class TwoInputs(nn.Module):
    """``model(a, b) = mlp(cat(a, 2 b))``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(d_in=5)

    def forward(self, a, b):
        return self.net(torch.cat([a, 2 * b], dim=1))


def test_batches_with_several_inputs_target_last():
    model, loss_fn = TwoInputs(), nn.CrossEntropyLoss()
    X, y = classification_data(8, (5,), 3)
    a, b = X[:, :2], X[:, 2:]
    op = GGNOperator(model, loss_fn, [(a[:3], b[:3], y[:3]), (a[3:], b[3:], y[3:])])
    assert op.num_data == 8
    truth = dense_ggn(model.net, loss_fn, torch.cat([a, 2 * b], dim=1), y)
    assert rel_err(op.to_dense(), truth) < EXACT
    assert rel_err(GGNOperator(model, loss_fn, (a, b, y)).to_dense(), truth) < EXACT  # one batch of 3 tensors


class Outputs(nn.Module):
    """The mlp with its output wrapped as ``kind`` ("tuple", "dict", "object")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = mlp(), kind

    def forward(self, x):
        z = self.net(x)
        if self.kind == "tuple":
            return z, z.detach() * 0
        if self.kind == "dict":
            return {"hidden": z * 0, "logits": z}
        return SimpleNamespace(logits=z, loss=None)


@pytest.mark.parametrize("kind", ["tuple", "dict", "object"])
def test_structured_outputs_give_the_prediction(kind):
    model, loss_fn = Outputs(kind), nn.CrossEntropyLoss()
    X, y = classification_data(6, (5,), 3)
    truth = dense_hessian(model.net, loss_fn, X, y)
    assert rel_err(HessianOperator(model, loss_fn, (X, y)).to_dense(), truth) < EXACT


def test_custom_adapter_callables():
    model, loss_fn = TwoInputs(), nn.CrossEntropyLoss()
    X, y = classification_data(7, (5,), 3)
    batches = [{"first": X[:4, :2], "second": X[:4, 2:], "target": y[:4], "note": "text"},
               {"first": X[4:, :2], "second": X[4:, 2:], "target": y[4:], "note": "more"}]
    adapter = BatchAdapter(inputs=lambda bt: ((bt["first"],), {"b": bt["second"]}), target=lambda bt: bt["target"])
    op = HessianOperator(model, loss_fn, batches, adapter=adapter)
    truth = dense_hessian(model.net, loss_fn, torch.cat([X[:, :2], 2 * X[:, 2:]], dim=1), y)
    assert rel_err(op.to_dense(), truth) < EXACT
    pred = BatchAdapter(prediction=lambda out: out["logits"])
    assert rel_err(HessianOperator(Outputs("dict"), loss_fn, (X, y), adapter=pred).to_dense(),
                   dense_hessian(Outputs("dict").net, loss_fn, X, y)) < EXACT


def test_bad_batches_and_outputs_are_refused_clearly():
    model, loss_fn = TinyTextClassifier(), nn.CrossEntropyLoss()
    ids, mask, labels = text_data(4)
    with pytest.raises(KeyError, match="'labels'"):
        HessianOperator(model, loss_fn, {"input_ids": ids, "attention_mask": mask})
    with pytest.raises(TypeError, match="pair"):
        HessianOperator(mlp(), loss_fn, [torch.zeros(3, 5)])
    X, y = classification_data(4, (5,), 3)
    with pytest.raises(TypeError, match="logits"):
        HessianOperator(nn.Sequential(Outputs("dict").net, _ToDict()), loss_fn, (X, y)) @ torch.ones(
            sum(p.numel() for p in mlp().parameters()), dtype=torch.float64)
    with pytest.raises(TypeError, match="callable"):
        BatchAdapter(target="labels")
    with pytest.raises(TypeError, match="BatchAdapter"):
        HessianOperator(mlp(), loss_fn, (X, y), adapter=lambda b: b)


class _ToDict(nn.Module):
    def forward(self, z):
        return {"scores": z}


def test_to_device_and_leaves_of_nested_batches():
    with torch.inference_mode():
        inf = torch.ones(2)
    batch = {"a": (torch.zeros(2), [torch.ones(1)]), "b": inf, "note": "x"}
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list) and moved["note"] == "x"
    assert not moved["b"].is_inference() and torch.equal(moved["b"], inf)  # cloned outside inference mode
    assert [t.numel() for t in tensor_leaves(moved)] == [2, 1, 2]
    inputs, target = BatchAdapter().split({"x": torch.zeros(5, 2), "labels": torch.zeros(5)})
    assert isinstance(inputs, ModelInputs) and inputs.batch_size == 5 and list(inputs.kwargs) == ["x"]


def test_dict_batch_changed_between_passes_is_detected():
    """A sum-preserving change of the attention mask (moving a padded position) is caught by the fingerprint."""
    model, loss_fn = TinyTextClassifier(), nn.CrossEntropyLoss()
    ids, mask, labels = text_data(8)
    data = DictDataset(ids, mask.clone(), labels)
    op = GGNOperator(model, loss_fn, DataLoader(data, batch_size=4))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    op @ v
    data.mask[0] = torch.tensor([0, 1, 1, 1])  # was [1, 1, 1, 0]: same sum
    with pytest.raises(RuntimeError, match="data changed between passes"):
        op @ v
