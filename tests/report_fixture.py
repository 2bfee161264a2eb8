"""Factories for the ``--model MODULE:FUNCTION`` tests of ``curvature spectrum``.

Imported by name (``report_fixture:make``) after the tests directory is put on
``sys.path``.  Tiny float64 models so dense truth is cheap.
"""

from __future__ import annotations

import torch
from torch import nn

D_IN, HIDDEN, D_OUT, N = 4, 5, 3, 40


def data(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, D_OUT, (n,), generator=g)
    return X, y


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D_OUT)).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the initialization: an indefinite Hessian
        for p in m.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


def make():
    """``(model, loss_fn, (X, y))``: a 4-5-3 tanh MLP (43 parameters), cross-entropy."""
    return model(), nn.CrossEntropyLoss(), data()


def make_loader():
    """The same problem with the data split into two unequal batches."""
    X, y = data()
    return model(), nn.CrossEntropyLoss(), [(X[:25], y[:25]), (X[25:], y[25:])]


def bad_return():
    """Returns two things instead of three."""
    return model(), nn.CrossEntropyLoss()


def bad_model():
    """Returns something that is not a module in the model position."""
    return "not a model", nn.CrossEntropyLoss(), data()


def no_data():
    """Returns ``None`` as the data."""
    return model(), nn.CrossEntropyLoss(), None


def empty_loader():
    """Returns an empty list of batches."""
    return model(), nn.CrossEntropyLoss(), []


NOT_CALLABLE = 3
