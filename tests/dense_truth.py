"""Independent dense curvature matrices for tests (float64, small models only).

Nothing here uses the operators under test.  Conventions: ``params`` is a list of
parameter tensors of ``model`` (default: all with ``requires_grad``, in model order);
every matrix is over the concatenation of the flattened ``params``; the model is
evaluated in eval mode (flags restored afterwards); ``X, y`` is one batch (concatenate
batches first).  Never use ``torch.func.hessian`` / ``jvp(jacrev(.))`` for truth: they
are wrong through ``layer_norm`` in torch 2.13/2.14.

* :func:`dense_hessian`: row by row double backward (reverse over reverse).
* :func:`fd_hessian`: central finite differences of the gradient (cross-check).
* :func:`dense_jacobian`: ``dz/dtheta`` row by row (one vjp per output entry).
* :func:`dense_output_hessian`: closed-form ``Lambda`` (block diagonal) for CE/MSE/BCE.
* :func:`dense_ggn`: ``J^T Lambda J``;  :func:`dense_empirical_fisher`: ``c sum g_n g_n^T``
  with per-example gradients from a loop over examples;
  :func:`dense_lowrank_fisher`: ``J^T (S S^T) J`` for given output factors ``S``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = [
    "trainable",
    "flat",
    "loss_of_flat",
    "dense_gradient",
    "dense_hessian",
    "fd_hessian",
    "dense_jacobian",
    "reduction_scale",
    "dense_output_hessian",
    "dense_ggn",
    "per_example_gradients",
    "dense_empirical_fisher",
    "dense_lowrank_fisher",
    "rel_err",
]


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat(tensors) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)``."""
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


@contextlib.contextmanager
def _eval(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _output_of_flat(model, params, X):
    names = {id(p): n for n, p in model.named_parameters()}
    pnames = [names[id(p)] for p in params]
    sizes = [p.numel() for p in params]

    def f(theta: Tensor) -> Tensor:
        pieces = torch.split(theta, sizes)
        d = {n: q.view(p.shape) for n, q, p in zip(pnames, pieces, params)}
        return torch.func.functional_call(model, d, (X,))

    return f


def loss_of_flat(model, loss_fn, X, y, params=None):
    """``theta -> loss_fn(model_theta(X), y)`` over the flattened ``params``."""
    params = trainable(model) if params is None else list(params)
    out = _output_of_flat(model, params, X)
    return lambda theta: loss_fn(out(theta), y)


def dense_gradient(model, loss_fn, X, y, params=None) -> Tensor:
    params = trainable(model) if params is None else list(params)
    f = loss_of_flat(model, loss_fn, X, y, params)
    theta = flat(params).requires_grad_(True)
    with _eval(model):
        return torch.autograd.grad(f(theta), theta)[0]


def dense_hessian(model, loss_fn, X, y, params=None) -> Tensor:
    """``[n, n]`` Hessian, one double-backward row per parameter entry."""
    params = trainable(model) if params is None else list(params)
    f = loss_of_flat(model, loss_fn, X, y, params)
    theta = flat(params).requires_grad_(True)
    with _eval(model):
        (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
        rows = []
        for i in range(theta.numel()):
            (r,) = torch.autograd.grad(g[i], theta, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(theta) if r is None else r)
    return torch.stack(rows)


def fd_hessian(model, loss_fn, X, y, params=None, eps: float = 1e-5) -> Tensor:
    """Central differences of the gradient: error ``O(eps^2 |f'''|) + O(macheps |g| / eps)``."""
    params = trainable(model) if params is None else list(params)
    f = loss_of_flat(model, loss_fn, X, y, params)
    theta0 = flat(params)

    def grad(theta):
        theta = theta.clone().requires_grad_(True)
        return torch.autograd.grad(f(theta), theta)[0]

    with _eval(model):
        cols = []
        for i in range(theta0.numel()):
            e = torch.zeros_like(theta0)
            e[i] = eps
            cols.append((grad(theta0 + e) - grad(theta0 - e)) / (2 * eps))
    H = torch.stack(cols, dim=1)
    return 0.5 * (H + H.T)


def dense_jacobian(model, X, params=None) -> Tensor:
    """``[m, n]`` Jacobian of the flattened output (``m = z.numel()``), one vjp per row."""
    params = trainable(model) if params is None else list(params)
    out = _output_of_flat(model, params, X)
    theta = flat(params).requires_grad_(True)
    with _eval(model):
        z = out(theta).reshape(-1)
        rows = []
        for i in range(z.numel()):
            (r,) = torch.autograd.grad(z[i], theta, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(theta) if r is None else r)
    return torch.stack(rows)


def reduction_scale(loss_fn, z: Tensor) -> float:
    """``c`` with ``loss = c * sum_n (per-example summed loss)``: PyTorch's mean conventions."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1.0 / (z.numel() // z.shape[1])
    return 1.0 / z.numel()


def dense_output_hessian(loss_fn, z: Tensor) -> Tensor:
    """``[m, m]`` closed-form Hessian of the loss w.r.t. the flattened ``[B, C]`` output."""
    z = z.detach()
    B, C = z.shape
    c = reduction_scale(loss_fn, z)
    if isinstance(loss_fn, nn.MSELoss):
        return 2.0 * c * torch.eye(B * C, dtype=z.dtype)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = torch.sigmoid(z).reshape(-1)
        return c * torch.diag(s * (1 - s))
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = torch.softmax(z, dim=1)
        return c * torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])
    raise NotImplementedError(type(loss_fn).__name__)


def dense_ggn(model, loss_fn, X, y, params=None) -> Tensor:
    """``J^T Lambda J`` with explicit ``J`` and the closed-form ``Lambda``."""
    J = dense_jacobian(model, X, params)
    with _eval(model), torch.no_grad():
        z = model(X)
    return J.T @ dense_output_hessian(loss_fn, z) @ J


def per_example_gradients(model, loss_fn, X, y, params=None) -> Tensor:
    """``[N, n]`` gradients of the per-example *summed* loss (a loop over examples)."""
    params = trainable(model) if params is None else list(params)
    loss_sum = type(loss_fn)(reduction="sum")
    return torch.stack([dense_gradient(model, loss_sum, X[i:i + 1], y[i:i + 1], params)
                        for i in range(X.shape[0])])


def dense_empirical_fisher(model, loss_fn, X, y, params=None) -> Tensor:
    """``c sum_n g_n g_n^T`` (``c`` from the reduction, e.g. ``1/N`` for CE mean)."""
    G = per_example_gradients(model, loss_fn, X, y, params)
    with _eval(model), torch.no_grad():
        z = model(X)
    return reduction_scale(loss_fn, z) * G.T @ G


def dense_curvature(kind: str, model, loss_fn, X, y, params=None) -> Tensor:
    """The dense matrix an operator of ``kind`` stands for: ``"hessian"``, an empirical Fisher
    (a kind ending in ``"empirical"``), otherwise the GGN (the exact Fisher of these losses)."""
    if kind == "hessian":
        return dense_hessian(model, loss_fn, X, y, params)
    if kind.endswith("empirical"):
        return dense_empirical_fisher(model, loss_fn, X, y, params)
    return dense_ggn(model, loss_fn, X, y, params)


def dense_lowrank_fisher(model, X, S: Tensor, params=None) -> Tensor:
    """``J^T (sum_m s_m s_m^T per example) J`` for output factors ``S`` ``[M, B, C]``."""
    J = dense_jacobian(model, X, params)
    M, B = S.shape[0], S.shape[1]
    Sf = S.reshape(M, B, -1)
    Lam = torch.block_diag(*[Sf[:, b, :].T @ Sf[:, b, :] for b in range(B)])
    return J.T @ Lam @ J
