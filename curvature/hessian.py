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

Opt-in alternative ``product="jvp_grad"``: forward-over-reverse ``torch.func.jvp`` of
``torch.func.grad`` (exact through ``layer_norm``, unlike ``jvp(jacrev)``; tested against
finite differences).  It keeps no graph between products (each column costs a forward
and a backward carrying tangents).  Measured on this CPU (benchmarks/results_operators.md)
it ties with double backward on a conv net's single cold product (3.67x vs 3.74x a
gradient), loses on blocks (4.1x vs 2.65x per column: the double-backward graph is
shared by the columns) and on an MLP (2.25x vs 1.74x), and the cached warm product
(2.5x) beats both; so double backward stays the default everywhere and the option is
there to measure on an accelerator.

Every per-batch forward runs inside :func:`curvature.kernels.derivative_kernels` (math
attention back end, no fused fast paths, unfused weight norm / hardsigmoid, whose
fused double backward is wrong or missing), so attention models need no rewrite;
an op without a second derivative in PyTorch raises
:class:`curvature.kernels.MissingDerivativeError` naming it and the alternatives.
``product="jvp_grad"`` is refused where forward-mode AD is known to be wrong
(:func:`curvature.kernels.forward_mode_problems`: ``Embedding(padding_idx=...)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._empirical_risk import EmpiricalRiskOperator, model_state
from .kernels import derivative_errors, derivative_kernels, forward_mode_problems
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
        product: ``"double_backward"`` (default: reverse-over-reverse, gradient graph
            cached for a single batch) or ``"jvp_grad"`` (forward-over-reverse
            ``jvp(grad)``, no cached graph; ``mode="eval"`` only). Both are exact
            (through ``layer_norm`` too); double backward measured faster on CPU for
            MLPs and conv nets.

    Shape ``[n, n]`` with ``n`` the number of entries of ``params``; dtype and device of
    the parameters; ``param_shapes`` set (parameter-format vectors work).

    Cost per product of ``k`` columns: per batch one forward and one backward with
    ``create_graph`` (skipped for a cached single batch) plus ``k`` backward passes
    through the gradient graph.

    Example:
        >>> H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
        >>> Hv = H @ v                       # v: [n] or [n, k] or a list like params
    """

    def __init__(self, model, loss_fn, data, params=None, *, batched: bool = False,
                 product: str = "double_backward", **kwargs) -> None:
        if product not in ("double_backward", "jvp_grad"):
            raise ValueError(f"product must be 'double_backward' or 'jvp_grad', got {product!r}.")
        if product == "jvp_grad" and kwargs.get("mode", "eval") != "eval":
            raise ValueError("product='jvp_grad' needs mode='eval' (train-mode buffer updates cannot carry "
                             "forward-mode tangents); use product='double_backward'.")
        if product == "jvp_grad" and forward_mode_problems(model):
            raise ValueError(
                "product='jvp_grad' is wrong for this model under PyTorch's forward-mode AD: "
                + "; ".join(forward_mode_problems(model)) + ". Use product='double_backward'."
            )
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.batched = bool(batched)
        self.product = product
        self._kernel_needs = "second" if product == "double_backward" else "all"

    @staticmethod
    def from_function(f, x: Tensor) -> FunctionHessianOperator:
        """The Hessian of a plain scalar function ``f`` at ``x``: a :class:`FunctionHessianOperator`."""
        return FunctionHessianOperator(f, x)

    def _build_state(self, X: Tensor, y: Tensor, batch_index: int):
        if self.product == "jvp_grad":
            return "jvp_grad", X, y  # nothing to reuse between products
        with derivative_errors("the Hessian's gradient graph"):
            leaves, z = self._forward(X)
            loss = self._loss(z, y)
            if not loss.requires_grad:
                return leaves, [], []
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # Only gradients that still depend on the parameters carry second derivatives.
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return leaves, [grads[i] for i in used], used

    def _jvp_grad_product(self, X: Tensor, y: Tensor, V: Tensor, idx=None) -> Tensor:
        """``H V`` by ``torch.func.jvp(torch.func.grad(loss))``, one column at a time."""
        idx = list(range(len(self.params))) if idx is None else idx
        names = [self.param_names[i] for i in idx]
        base = {n: p.detach() for n, p in self.model.named_parameters()}
        primals = tuple(base[n] for n in names)

        def loss_of(ps):
            tensors = dict(base)
            tensors.update(zip(names, ps))
            return self._loss(self._predict(X, tensors), y)

        grad_fn = torch.func.grad(loss_of)
        pieces = unflatten(V, [p.shape for p in primals])  # [*p.shape, k]
        out = torch.empty_like(V)
        with model_state(self.model, self.mode), derivative_kernels(self.model, "all"):
            for c in range(V.shape[1]):
                _, hv = torch.func.jvp(grad_fn, (primals,), (tuple(t[..., c] for t in pieces),))
                out[:, c] = torch.cat([h.reshape(-1) for h in hv])
        return out

    def _apply_state(self, state, V: Tensor, idx=None) -> Tensor:
        what = ("the Hessian product (forward-over-reverse, product='jvp_grad')" if self.product == "jvp_grad"
                else "the Hessian product (double backward)")
        try:
            with derivative_errors(what):
                return self._apply(state, V, idx)
        except Exception:
            self.clear_cache()  # a state that failed once is not reused (e.g. after the user fixes the model)
            raise

    def _apply(self, state, V: Tensor, idx=None) -> Tensor:
        if state[0] == "jvp_grad":
            return self._jvp_grad_product(state[1], state[2], V, idx)
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
            return torch.cat(cols, dim=1).T  # a view: the caller accumulates it (no [n, k] copy)
        # one contiguous row per column: strided views of V as gradient inputs slow the
        # backward itself (measured 1.10x at 10 columns, 1.24x at 32 in plain torch)
        Vt = V.T.contiguous()
        out_t = torch.empty(k, V.shape[0], dtype=V.dtype, device=V.device)
        for c in range(k):
            col = unflatten(Vt[c], shapes)
            gouts = [col[j] for j in rows]
            res = torch.autograd.grad(outputs, inputs, grad_outputs=gouts, retain_graph=True, allow_unused=True)
            torch.cat([torch.zeros(p.numel(), dtype=V.dtype, device=V.device) if r is None
                       else r.reshape(-1) for r, p in zip(res, inputs)], out=out_t[c])
        return out_t.T  # a view: the caller accumulates it (no [n, k] copy)
