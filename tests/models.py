"""Small test models and data factories shared by the test suite.

Every factory takes ``seed`` (models and data are reproducible) and ``dtype`` (float64
for exactness checks).  Parameters are perturbed away from their initial values so no
curvature term is accidentally zero.  ``CASES`` lists (model, loss, data) triples for
the operator tests::

    model, loss_fn, (X, y) = make_case("layernorm", dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "mlp",
    "cnn",
    "layernorm_residual",
    "regression_mlp",
    "batchnorm_dropout",
    "classification_data",
    "regression_data",
    "binary_data",
    "make_case",
    "CASES",
]


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward is marked once-differentiable (as many hand-written kernels are).

    torch 2.13 silently drops the second derivatives through it (no error): a trap for tests.
    """

    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * (1 - out * out)


def _finish(model: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(seed + 1000)
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def mlp(d_in: int = 5, hidden: int = 6, d_out: int = 3, *, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """``Linear - Tanh - Linear - Sigmoid - Linear`` (smooth: non-zero second derivatives everywhere)."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Sigmoid(), nn.Linear(hidden, d_out)), seed, dtype)


def cnn(channels: int = 2, d_out: int = 3, *, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """``Conv2d(1, c, 3) - Tanh - Conv2d(c, c, 3, stride 2) - Tanh - Flatten - Linear``; input ``[N, 1, 7, 7]``."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(
        nn.Conv2d(1, channels, 3), nn.Tanh(), nn.Conv2d(channels, channels, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(channels * 2 * 2, d_out)), seed, dtype)


class _ResidualLayerNorm(nn.Module):
    """``x + W2 tanh(W1 LayerNorm(x))``: a pre-norm residual block as in transformers."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


def layernorm_residual(d_in: int = 4, width: int = 5, d_out: int = 3, *, seed: int = 0, dtype=torch.float64):
    """``Linear - LayerNorm - Tanh - [residual pre-norm block] - Linear``."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(nn.Linear(d_in, width), nn.LayerNorm(width), nn.Tanh(),
                                 _ResidualLayerNorm(width, 4), nn.Linear(width, d_out)), seed, dtype)


def regression_mlp(d_in: int = 3, hidden: int = 5, d_out: int = 2, *, seed: int = 0, dtype=torch.float64):
    """Multi-output regression ``Linear - Tanh - Linear`` (for MSE)."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)), seed, dtype)


def batchnorm_dropout(d_in: int = 4, hidden: int = 6, d_out: int = 3, *, seed: int = 0, dtype=torch.float64):
    """``Linear - BatchNorm1d - Tanh - Dropout(0.3) - Linear`` with non-trivial running statistics."""
    torch.manual_seed(seed)
    model = _finish(nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.Tanh(),
                                  nn.Dropout(0.3), nn.Linear(hidden, d_out)), seed, dtype)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(0.3 * torch.randn(hidden, generator=g, dtype=dtype))
        bn.running_var.copy_(0.5 + torch.rand(hidden, generator=g, dtype=dtype))
        bn.num_batches_tracked.fill_(5)
    return model


def classification_data(n: int = 10, in_shape=(5,), classes: int = 3, *, seed: int = 0, dtype=torch.float64):
    """``X ~ N(0, 1)`` of shape ``[n, *in_shape]``, integer labels in ``[0, classes)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *in_shape), generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def regression_data(n: int = 10, d_in: int = 3, d_out: int = 2, *, seed: int = 0, dtype=torch.float64):
    """``X ~ N(0, 1)`` ``[n, d_in]``, targets ``[n, d_out]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


def binary_data(n: int = 10, d_in: int = 5, d_out: int = 3, *, seed: int = 0, dtype=torch.float64):
    """``X ~ N(0, 1)`` ``[n, d_in]``, multi-label targets in ``{0, 1}`` ``[n, d_out]`` (BCEWithLogits)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, 2, (n, d_out), generator=g).to(dtype)


def _case_mlp(dtype, n, reduction):
    return mlp(dtype=dtype), nn.CrossEntropyLoss(reduction=reduction), classification_data(n, (5,), 3, dtype=dtype)


def _case_cnn(dtype, n, reduction):
    return cnn(dtype=dtype), nn.CrossEntropyLoss(reduction=reduction), classification_data(n, (1, 7, 7), 3, dtype=dtype)


def _case_layernorm(dtype, n, reduction):
    return (layernorm_residual(dtype=dtype), nn.CrossEntropyLoss(reduction=reduction),
            classification_data(n, (4,), 3, dtype=dtype))


def _case_regression(dtype, n, reduction):
    return regression_mlp(dtype=dtype), nn.MSELoss(reduction=reduction), regression_data(n, 3, 2, dtype=dtype)


def _case_bce(dtype, n, reduction):
    return mlp(dtype=dtype), nn.BCEWithLogitsLoss(reduction=reduction), binary_data(n, 5, 3, dtype=dtype)


def _case_batchnorm(dtype, n, reduction):
    return (batchnorm_dropout(dtype=dtype), nn.CrossEntropyLoss(reduction=reduction),
            classification_data(n, (4,), 3, dtype=dtype))


CASES = {
    "mlp": _case_mlp,
    "cnn": _case_cnn,
    "layernorm": _case_layernorm,
    "regression": _case_regression,
    "bce": _case_bce,
    "batchnorm": _case_batchnorm,
}


def make_case(name: str, *, dtype=torch.float64, n: int = 10, reduction: str = "mean"):
    """``(model, loss_fn, (X, y))`` for a named case in :data:`CASES`."""
    return CASES[name](dtype, n, reduction)
