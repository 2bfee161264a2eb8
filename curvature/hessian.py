"""The Hessian of a model's loss over a data set, as a matrix-free LinearOperator.

Products are reverse-over-reverse (double backward): per batch, the graph of the
gradient ``g = dL/dtheta`` is built once (``create_graph=True``) and every column of a
block ``V`` is one backward pass through it.  This is exact through every operation
PyTorch differentiates twice, including ``layer_norm``, where ``torch.func.hessian``
(forward-over-reverse) returns wrong second derivatives in torch 2.13/2.14.  With a
single batch the gradient graph is cached between products (Lanczos and CG send one
column at a time), so a Hessian-vector product costs about one backward pass.

Choice of column strategy (measured, see benchmarks/results_operators.md): a loop of
``torch.autograd.grad(..., retain_graph=True)`` over the columns, versus
``is_grads_batched=True`` (vmap over the backward), selectable with ``batched=``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._empirical_risk import EmpiricalRiskOperator
from .function import FunctionHessianOperator
from .params import unflatten

__all__ = ["HessianOperator"]


class HessianOperator(EmpiricalRiskOperator):
    """``d^2 L / dtheta^2`` for ``L = loss over data`` (mean/sum reduction respected).

    Args:
        model, loss_fn, data, params, mode, reduction, cache, check_data: see
            :class:`~curvature._empirical_risk.EmpiricalRiskOperator`.
        batched: multiply the columns of a block with one vmapped backward
            (``is_grads_batched=True``) instead of a loop over columns reusing the
            graph (default ``False``: the loop measured faster on CPU).

    Shape ``[n, n]`` with ``n`` the number of entries of ``params``; dtype and device of
    the parameters; ``param_shapes`` set (parameter-format vectors work).

    Cost per product of ``k`` columns: per batch one forward and one backward with
    ``create_graph`` (skipped for a cached single batch) plus ``k`` backward passes
    through the gradient graph.

    Example:
        >>> H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
        >>> Hv = H @ v                       # v: [n] or [n, k] or a list like params
    """

    def __init__(self, model, loss_fn, data, params=None, *, batched: bool = False, **kwargs) -> None:
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.batched = bool(batched)

    @staticmethod
    def from_function(f, x: Tensor) -> FunctionHessianOperator:
        """The Hessian of a plain scalar function ``f`` at ``x``: a :class:`FunctionHessianOperator`."""
        return FunctionHessianOperator(f, x)

    def _build_state(self, X: Tensor, y: Tensor, batch_index: int):
        leaves, z = self._forward(X)
        loss = self._loss(z, y)
        if not loss.requires_grad:
            return leaves, [], []
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # Only gradients that still depend on the parameters carry second derivatives.
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return leaves, [grads[i] for i in used], used

    def _apply_state(self, state, V: Tensor, idx=None) -> Tensor:
        leaves, grads, used = state
        idx = list(range(len(leaves))) if idx is None else idx
        shapes = [leaves[i].shape for i in idx]
        inputs = [leaves[i] for i in idx]
        rows = [j for j, i in enumerate(idx) if i in used]  # blocks whose gradient carries curvature
        outputs = [grads[used.index(idx[j])] for j in rows]
        if not outputs:
            return torch.zeros_like(V)
        k = V.shape[1]
        pieces = unflatten(V, shapes)  # [*p.shape, k]
        if self.batched and k > 1:
            gouts = [pieces[j].movedim(-1, 0) for j in rows]
            res = torch.autograd.grad(outputs, inputs, grad_outputs=gouts, retain_graph=True,
                                      allow_unused=True, is_grads_batched=True)
            cols = [torch.zeros(k, p.numel(), dtype=V.dtype, device=V.device) if r is None
                    else r.reshape(k, -1) for r, p in zip(res, inputs)]
            return torch.cat(cols, dim=1).T.contiguous()
        out = torch.empty_like(V)
        for c in range(k):
            gouts = [pieces[j][..., c] for j in rows]
            res = torch.autograd.grad(outputs, inputs, grad_outputs=gouts, retain_graph=True, allow_unused=True)
            out[:, c] = torch.cat([torch.zeros(p.numel(), dtype=V.dtype, device=V.device) if r is None
                                   else r.reshape(-1) for r, p in zip(res, inputs)])
        return out
