"""The closed-form softmax cross-entropy output Hessian: exact against autograd, large vocabularies.

Truth: ``torch.autograd.functional.hessian`` of the loss w.r.t. the flattened logits
(float64, small class counts), i.e. double backward through PyTorch's own cross-entropy,
for every target convention the closed form accepts (ignore_index, label smoothing,
class weights, probability targets, token logits with the causal shift).  At a vocabulary
of 200,000 a ``[C, C]`` matrix would need 320 GB, so the large-C test shows none is formed.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature import GGNOperator, TokenCrossEntropyLoss
from curvature.losses import AutogradOutputHessian, ClosedFormOutputHessian, output_hessian
from tests.dense_truth import dense_ggn, rel_err
from tests.models import classification_data, mlp

EXACT = 1e-12


def _targets(shape, C, g, ignore=()):
    y = torch.randint(0, C, shape, generator=g)
    for idx in ignore:
        y[idx] = -100
    return y


def _cases():
    g = torch.Generator().manual_seed(0)
    C = 7
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    q = torch.softmax(torch.randn(5, C, generator=g, dtype=torch.float64), dim=1)
    q[2] = 0.0  # a padding row of probability targets: no curvature
    return {
        # name: (loss, logits shape, targets)
        "ce-2d-mean": (nn.CrossEntropyLoss(), (5, C), _targets((5,), C, g)),
        "ce-2d-sum-ignore": (nn.CrossEntropyLoss(reduction="sum"), (5, C), _targets((5,), C, g, [(1,), (3,)])),
        "ce-2d-smoothing-ignore": (nn.CrossEntropyLoss(label_smoothing=0.2), (5, C), _targets((5,), C, g, [(0,)])),
        "ce-2d-weights-ignore": (nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), (5, C),
                                 _targets((5,), C, g, [(4,)])),
        "ce-2d-probabilities": (nn.CrossEntropyLoss(), (5, C), q),
        "ce-3d-class-dim-1": (nn.CrossEntropyLoss(), (3, C, 4), _targets((3, 4), C, g, [(0, 1), (2, 3)])),
        "ce-unbatched": (nn.CrossEntropyLoss(), (C,), torch.tensor(3)),
        "token-ce-shift-ignore": (TokenCrossEntropyLoss(shift=True), (2, 5, C), _targets((2, 5), C, g, [(0, 4)])),
        "token-ce-sum-smoothing": (TokenCrossEntropyLoss(reduction="sum", label_smoothing=0.3), (2, 5, C),
                                   _targets((2, 5), C, g, [(1, 0)])),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_form_equals_double_backward(name):
    loss_fn, shape, y = CASES[name]
    g = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda t: loss_fn(t.reshape(shape), y), z.reshape(-1))
    V = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    lam = output_hessian(loss_fn, z, y, loss_fn.reduction)
    assert isinstance(lam, ClosedFormOutputHessian)
    expected = (H @ V.reshape(3, -1).T).T.reshape(V.shape)
    assert rel_err(lam.matmat(V), expected) < EXACT
    # the autograd path (what every other loss gets) is the same matrix
    assert rel_err(AutogradOutputHessian(loss_fn, z, y).matmat(V), expected) < EXACT
    # the input is not modified and zero columns are allowed
    V0 = V.clone()
    lam.matmat(V)
    assert torch.equal(V, V0)
    assert lam.matmat(V[:0]).shape == (0, *shape)


def test_matmat_keeps_the_promoted_dtype():
    z = torch.randn(4, 5, dtype=torch.float32)
    y = torch.randint(0, 5, (4,))
    lam = output_hessian(nn.CrossEntropyLoss(), z, y, "mean")
    V = torch.randn(2, 4, 5, dtype=torch.float64)
    out = lam.matmat(V)
    assert out.dtype == torch.float64
    p = torch.softmax(z.double(), dim=1)
    assert rel_err(out, (p * (V - (p * V).sum(-1, keepdim=True))) / 4) < 1e-6


def test_large_vocabulary_never_forms_a_class_by_class_matrix():
    """C = 200,000 (a [C, C] float64 matrix would be 320 GB): the product against its definition per entry."""
    C = 200_000
    g = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(2, 3, C, generator=g, dtype=torch.float64)
    y = torch.tensor([[5, -100, 7], [C - 1, 0, 1]])
    loss_fn = TokenCrossEntropyLoss()
    lam = output_hessian(loss_fn, z, y, "mean")
    V = torch.randn(2, 2, 3, C, generator=g, dtype=torch.float64)
    p = torch.softmax(z, dim=-1)
    counted = (y != -100).double().unsqueeze(-1)
    expected = counted * p * (V - (p * V).sum(-1, keepdim=True)) / 5
    assert rel_err(lam.matmat(V), expected) < EXACT
    # the row of an ignored target is exactly zero
    assert torch.count_nonzero(lam.matmat(V)[:, 0, 1]) == 0


def test_functional_cross_entropy_gets_the_closed_form():
    """``F.cross_entropy`` itself: closed form, the GGN equal to nn.CrossEntropyLoss()'s dense GGN."""
    model = mlp(4, 5, 3)
    X, y = classification_data(6, (4,), 3)
    y[2] = -100  # F.cross_entropy's default ignore_index: the mean over the 5 counted targets
    z = model(X).detach()
    assert isinstance(output_hessian(F.cross_entropy, z, y, "mean"), ClosedFormOutputHessian)
    # a wrapper is an arbitrary callable: autograd, same numbers
    wrapped = functools.partial(F.cross_entropy, label_smoothing=0.0)
    assert isinstance(output_hessian(wrapped, z, y, "mean"), AutogradOutputHessian)
    G_true = dense_ggn(model, nn.CrossEntropyLoss(), X[[0, 1, 3, 4, 5]], y[[0, 1, 3, 4, 5]])
    G = GGNOperator(model, F.cross_entropy, (X, y), reduction="mean").to_dense()
    assert rel_err(G, G_true) < EXACT
    G_wrapped = GGNOperator(model, wrapped, (X, y), reduction="mean").to_dense()
    assert rel_err(G_wrapped, G_true) < EXACT


def test_subclass_overriding_forward_gets_autograd():
    class Focal(nn.CrossEntropyLoss):
        def forward(self, z, y):
            logp = F.log_softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
            return (-(1 - logp.exp()) ** 2 * logp).mean()

    z = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    assert isinstance(output_hessian(Focal(), z, y, "mean"), AutogradOutputHessian)
