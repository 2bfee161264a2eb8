"""The finite-difference Hessian product against the exact (double-backward, float64) one.

Truth: ``curvature.HessianOperator`` on a float64 copy of the model at the same
parameter values (itself checked against dense row-by-row double backward in
``test_hessian.py``), and ``dense_hessian`` directly where cheap.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvature
import estimators
from curvature.finite_difference import FiniteDifferenceHessianOperator, default_step
from dense_truth import dense_hessian
from models import OnceDifferentiableTanh, classification_data, cnn, mlp

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
#: documented (module docstring): relative error of order eps^(2/3); measured 0.8-5.3 x on these models
BOUND_FACTOR = 10.0


def _case(name: str, dtype):
    if name == "mlp":
        model, (X, y) = mlp(5, 6, 3, seed=3), classification_data(16, (5,), 3, seed=4)
    else:
        model, (X, y) = cnn(seed=1), classification_data(16, (1, 7, 7), 3, seed=4)
    return model.to(dtype), X.to(dtype), y


def _block(n: int, k: int = 3) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _exact(model, X, y, V):
    m64 = copy.deepcopy(model).double()
    return curvature.HessianOperator(m64, nn.CrossEntropyLoss(), (X.double(), y)) @ V


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_relative_error_is_of_order_eps_two_thirds(name, dtype):
    model, X, y = _case(name, dtype)
    V = _block(sum(p.numel() for p in model.parameters()))
    F = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    fd = (F @ V.to(dtype)).double()
    exact = _exact(model, X, y, V.to(dtype).double())
    rel = (fd - exact).norm(dim=0) / exact.norm(dim=0)
    eps = torch.finfo(dtype).eps
    assert float(rel.max()) <= BOUND_FACTOR * eps ** (2 / 3), f"{rel.tolist()} vs eps^(2/3) = {eps ** (2 / 3):.1e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_error_within_truncation_plus_rounding_bound(dtype):
    """``||FD - Hv|| <= ||exact-arithmetic FD - Hv|| + (e+ + e-) / 2h`` with both terms measured in float64.

    The truncation term is the central difference of float64 gradients at the same
    step, the rounding terms ``e+-`` the distance of the ``dtype`` gradient at the
    rounded shifted point from the float64 gradient at the exact shifted point; and the
    leading-order truncation ``delta^2 K3 ||v|| / 6`` predicts the former.
    """
    model, X, y = _case("mlp", dtype)
    m64 = copy.deepcopy(model).double()
    params, params64 = list(model.parameters()), list(m64.parameters())
    loss_fn = nn.CrossEntropyLoss()
    v = _block(sum(p.numel() for p in params), 1)[:, 0].to(dtype)
    fd = (FiniteDifferenceHessianOperator(model, loss_fn, (X, y)) @ v).double()
    theta = torch.cat([p.detach().double().reshape(-1) for p in params])
    delta = default_step(dtype) * (1 + float(theta.norm()))
    v64 = v.double()
    h = delta / float(v64.norm())

    def grad_at(m, ps, flat_point, Xd):
        with torch.no_grad():
            for p, piece in zip(ps, torch.split(flat_point, [q.numel() for q in ps])):
                p.copy_(piece.view(p.shape).to(p.dtype))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(m(Xd), y), ps)]).double()

    H64 = curvature.HessianOperator(m64, loss_fn, (X.double(), y))
    exact = H64 @ v64
    rounding = 0.0
    g64 = {}
    for sign in (1, -1):
        point64 = theta + sign * h * v64
        point_low = torch.cat([p.detach().clone().add_(piece.view(p.shape).to(dtype), alpha=sign * h).reshape(-1)
                               for p, piece in zip(params, torch.split(v64, [q.numel() for q in params]))])
        g_low = _grad_low(model, loss_fn, X, y, point_low)
        g64[sign] = grad_at(m64, params64, point64, X.double())
        rounding += float((g_low - g64[sign]).norm()) / (2 * h)
    truncation = float(((g64[1] - g64[-1]) / (2 * h) - exact).norm())
    # K3 = ||T[u, u, .]|| by float64 central differences of exact Hessian products
    u, s = v64 / v64.norm(), 1e-4
    with torch.no_grad():
        for p, piece in zip(params64, torch.split(theta + s * u, [q.numel() for q in params64])):
            p.copy_(piece.view(p.shape))
    Hp = curvature.HessianOperator(m64, loss_fn, (X.double(), y)) @ u
    with torch.no_grad():
        for p, piece in zip(params64, torch.split(theta - s * u, [q.numel() for q in params64])):
            p.copy_(piece.view(p.shape))
    Hm = curvature.HessianOperator(m64, loss_fn, (X.double(), y)) @ u
    K3 = float(((Hp - Hm) / (2 * s)).norm())
    leading = delta ** 2 * K3 * float(v64.norm()) / 6
    err = float((fd - exact).norm())
    output_rounding = torch.finfo(dtype).eps * float(fd.norm())  # the result is stored in dtype
    assert err <= 1.01 * (truncation + rounding) + output_rounding
    assert 0.5 * leading <= truncation <= 2.0 * leading  # the documented leading-order truncation term


def _grad_low(model, loss_fn, X, y, flat_point):
    """The gradient of a copy of ``model`` (its dtype) at ``flat_point`` (already in that dtype)."""
    m = copy.deepcopy(model)
    ps = list(m.parameters())
    with torch.no_grad():
        for p, piece in zip(ps, torch.split(flat_point, [q.numel() for q in ps])):
            p.copy_(piece.view(p.shape))
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(m(X), y), ps)]).double()


def test_parameters_versions_and_grads_untouched_also_on_errors():
    model, X, y = _case("mlp", torch.float64)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    F = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    F @ _block(F.shape[0])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert versions == [p._version for p in model.parameters()]
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())

    calls = {"n": 0}

    def failing_loss(z, t):  # the second gradient pass (the shifted-minus point) raises
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("kernel failure in the second pass")
        return nn.functional.cross_entropy(z, t)

    failing_loss.reduction = "mean"
    G = FiniteDifferenceHessianOperator(model, failing_loss, (X, y))
    with pytest.raises(RuntimeError, match="second pass"):
        G @ _block(G.shape[0], 1)[:, 0]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class _KernelNet(nn.Module):
    def __init__(self, inner: nn.Sequential, fused: bool) -> None:
        super().__init__()
        self.inner, self.fused = inner, fused

    def forward(self, x):
        h = self.inner[0](x)
        h = OnceDifferentiableTanh.apply(h) if self.fused else torch.tanh(h)
        return self.inner[2](h)


def test_a_kernel_without_second_derivative():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fused, plain = _KernelNet(inner, True), _KernelNet(inner, False)
    X, y = classification_data(10, (5,), 3, seed=2)
    V = _block(sum(p.numel() for p in inner.parameters()))
    # (double backward through this kernel silently drops the first layer's second derivatives
    # in torch 2.13: the gradient leaves the graph at the once-differentiable backward)
    exact = dense_hessian(plain, nn.CrossEntropyLoss(), X, y) @ V
    fd = FiniteDifferenceHessianOperator(fused, nn.CrossEntropyLoss(), (X, y)) @ V
    assert float(((fd - exact).norm(dim=0) / exact.norm(dim=0)).max()) < BOUND_FACTOR * 2.2e-16 ** (2 / 3)


def test_batches_blocks_and_an_estimator():
    model, X, y = _case("mlp", torch.float64)
    batches = [(X[:5], y[:5]), (X[5:7], y[5:7]), (X[7:], y[7:])]
    V = _block(sum(p.numel() for p in model.parameters()))
    exact = dense_hessian(model, nn.CrossEntropyLoss(), X, y)
    tol = BOUND_FACTOR * 2.2e-16 ** (2 / 3)
    fd = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), batches) @ V
    assert float(((fd - exact @ V).norm(dim=0) / (exact @ V).norm(dim=0)).max()) < tol
    B = curvature.block_diagonal(FiniteDifferenceHessianOperator, model, nn.CrossEntropyLoss(), batches)
    exact_blocks = curvature.block_diagonal(curvature.HessianOperator, model, nn.CrossEntropyLoss(), batches)
    assert float(((B @ V - exact_blocks @ V).norm(dim=0) / (exact_blocks @ V).norm(dim=0)).max()) < tol
    top = estimators.top_eigenvalues(FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X, y)), k=2,
                                     seed=0, tol=1e-8)
    truth = torch.linalg.eigvalsh(exact).flip(0)[:2]
    assert float((top.eigenvalues - truth).abs().max()) < 1e-7 * float(truth[0])


def test_bad_arguments():
    model, X, y = _case("mlp", torch.float64)
    with pytest.raises(ValueError, match="step must be a positive"):
        FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X, y), step=0.0)
    with pytest.raises(ValueError, match="keeps no state"):
        FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache=True)
    assert math.isclose(default_step(torch.float64), 2.0 ** (-52 / 3))
