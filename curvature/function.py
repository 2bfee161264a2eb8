"""The Hessian of a plain function ``f: R^n -> R`` at a point, as a LinearOperator.

This is the curvature the deterministic solvers use (logistic regression, matrix
sensing, test functions such as Rosenbrock).  Products are reverse-over-reverse
(double backward): the graph of ``grad f(x)`` is built once when the operator is
created and reused by every product, so one Hessian-vector product costs about one
extra backward pass.  Double backward is exact through every op PyTorch
differentiates twice, including ``layer_norm`` where ``torch.func.hessian`` is wrong
in torch 2.13/2.14.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .linear_operator import LinearOperator

__all__ = ["FunctionHessianOperator"]


class FunctionHessianOperator(LinearOperator):
    """``∇²f(x)`` of a scalar function at a fixed point ``x`` (frozen: never re-evaluated).

    Args:
        f: a function taking a tensor shaped like ``x`` and returning a scalar tensor.
        x: the point; any shape (flattened to ``n = x.numel()`` entries).  Its dtype
            and device become the operator's.

    Attributes:
        value: ``f(x)`` (detached scalar).
        gradient: ``∇f(x)``, flat ``[n]`` (detached).

    Cost: building the operator costs one gradient; each product column one
    backward pass through the gradient's graph (kept in memory while the operator
    lives).
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
        super().__init__((x.numel(), x.numel()), dtype=x.dtype, device=x.device, is_symmetric=True)
        self._x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = f(self._x)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    "f must return a scalar tensor (a single number), got "
                    f"{type(value).__name__ if not isinstance(value, Tensor) else tuple(value.shape)}."
                )
            value = value.reshape(())
            if not value.requires_grad:
                raise ValueError("f(x) does not depend on x through differentiable torch operations.")
            (grad,) = torch.autograd.grad(value, self._x, create_graph=True)
        self._grad = grad.reshape(-1)
        self.value = value.detach()
        self.gradient = self._grad.detach()
        self._linear = not self._grad.requires_grad  # f is (at most) linear: Hessian = 0

    def _matmat(self, X: Tensor) -> Tensor:
        if self._linear:
            return torch.zeros_like(X)
        cols = []
        for j in range(X.shape[1]):
            (hv,) = torch.autograd.grad(
                self._grad, self._x, grad_outputs=X[:, j], retain_graph=True, allow_unused=True
            )
            cols.append(torch.zeros_like(X[:, j]) if hv is None else hv.reshape(-1))
        return torch.stack(cols, dim=1)
