"""The generalized Gauss-Newton matrix ``G = sum_b w_b J_b^T Lambda_b J_b`` as a LinearOperator.

``J_b`` is the Jacobian of the model output ``z`` on batch ``b`` w.r.t. the parameters
and ``Lambda_b`` the Hessian of the batch loss w.r.t. ``z`` (closed form for
CrossEntropy / MSE / BCEWithLogits, autograd on the output for any other loss; see
:mod:`curvature.losses`).  ``G`` is positive semi-definite whenever the loss is convex
in ``z``, which is what makes it the curvature of choice for CG-based (Hessian-free)
training.

Product path (measured, see benchmarks/results_operators.md), per batch:

* ``J v`` by the double-vjp trick: with a dummy ``u`` shaped like ``z``, the graph of
  ``J^T u`` is built once; ``J v = d(J^T u)/du [v]`` is one backward pass through it;
* ``Lambda (J v)`` in output space (cheap);
* ``J^T w`` is one backward pass through the output graph.

Both graphs are kept for a single batch, so a product column costs about two
backward passes of the model and no forward pass.  ``jvp="forward"`` computes ``J v``
with forward-mode ``torch.func.jvp`` instead (no ``J^T u`` graph to build, but one
forward-mode pass per column, cached or not).  Measured on CPU (results_operators.md):
the double-vjp trick wins on the MLP and for cached single-batch products (what
Lanczos/CG use); forward mode wins for fresh products on the small CNN, where the
create-graph backward through convolutions is expensive (there forward mode also won
for cached products).  The default ``jvp="auto"`` picks forward mode for models with
convolution layers *whose forward mode is verified exact*
(:func:`curvature.kernels.forward_mode_verified`: every module of a verified type,
no ``Embedding(padding_idx=...)``, BatchNorm in eval mode only) and the double-vjp
trick otherwise; if forward mode still fails at run time under ``"auto"``, the
operator switches to the double-vjp trick for good (same numbers, no error).  An
explicit ``jvp="forward"`` on a model where forward mode is known to be wrong
(:func:`curvature.kernels.forward_mode_problems`) raises ``ValueError``.

Every per-batch forward runs inside :func:`curvature.kernels.derivative_kernels`
(math attention, no fused fast paths, unfused weight norm / hardsigmoid), so
attention models need no rewrite; an op PyTorch cannot differentiate as needed raises
:class:`curvature.kernels.MissingDerivativeError` naming it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._empirical_risk import EmpiricalRiskOperator, model_state
from .kernels import derivative_errors, derivative_kernels, forward_mode_problems, forward_mode_verified
from .losses import output_hessian
from .params import unflatten

__all__ = ["GGNOperator"]


class GGNOperator(EmpiricalRiskOperator):
    """Generalized Gauss-Newton ``J^T Lambda J`` of ``loss_fn(model(X), y)`` over ``data``.

    Args:
        model, loss_fn, data, params, mode, reduction, cache, check_data: see
            :class:`~curvature._empirical_risk.EmpiricalRiskOperator`.
        batched: multiply the columns of a block with vmapped backward passes
            (``is_grads_batched=True``) instead of a loop over columns (default ``False``).
        jvp: how ``J v`` is computed: ``"reverse"`` (double-vjp trick through a cached
            graph), ``"forward"`` (``torch.func.jvp`` per column), or ``"auto"``
            (default: forward for models with convolutions when forward mode is verified
            exact for every module, see :func:`curvature.kernels.forward_mode_verified`;
            reverse otherwise, and reverse whenever forward mode fails at run time).

    Raises:
        ValueError: ``jvp="forward"`` on a model where forward-mode AD is known to be
            wrong or to fail (``Embedding(padding_idx=...)``, train-mode BatchNorm).
        curvature.kernels.MissingDerivativeError: (at product time) an op of the model
            lacks the derivative the chosen path needs; the message names it.

    Shape ``[n, n]``, symmetric PSD for convex losses; ``param_shapes`` set.

    Cost per product of ``k`` columns, per batch: ``jvp="reverse"``: one forward pass
    and one backward with ``create_graph`` (skipped for a cached single batch), then
    ``2k`` backward passes; ``jvp="forward"``: one forward pass (skipped when cached),
    then ``k`` forward-mode passes and ``k`` backward passes.
    """

    def __init__(self, model, loss_fn, data, params=None, *, batched: bool = False, jvp: str = "auto",
                 **kwargs) -> None:
        if jvp not in ("auto", "reverse", "forward"):
            raise ValueError(
                f"jvp must be 'auto', 'reverse' (double-vjp trick) or 'forward' (torch.func.jvp), got {jvp!r}."
            )
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.batched = bool(batched)
        self._jvp_auto = jvp == "auto"
        if jvp == "auto":  # measured: forward mode wins on conv nets, the double-vjp trick elsewhere
            has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
            jvp = "forward" if has_conv and forward_mode_verified(model, self.mode) else "reverse"
        elif jvp == "forward":
            problems = forward_mode_problems(model, self.mode)
            if problems:
                raise ValueError(
                    "jvp='forward' is wrong or fails for this model under PyTorch's forward-mode AD: "
                    + "; ".join(problems) + ". Use jvp='reverse' or jvp='auto'."
                )
        self.jvp = jvp
        self._kernel_needs = "second" if jvp == "reverse" else "all"

    def _output_curvature(self, z: Tensor, y: Tensor, batch_index: int):
        """The object whose ``matmat(V)`` (``V``: ``[k, *z.shape]``) applies ``Lambda``."""
        self._loss(z.detach(), y)  # scalar check with a clear message
        return output_hessian(self.loss_fn, z, y, self.reduction or "mean")

    def _build_state(self, X: Tensor, y: Tensor, batch_index: int):
        with derivative_errors("the GGN's output graph"):
            leaves, z = self._forward(X)
        lam = self._output_curvature(z, y, batch_index)
        if not z.requires_grad:
            return leaves, z, None, [], [], lam
        if self.jvp == "forward":
            return leaves, z, X, None, None, lam
        return self._reverse_state(leaves, z, lam)

    def _column_bytes(self, state, rows: int) -> int:
        """Per column: the base estimate plus ``J v`` and ``Lambda J v`` (two output-sized tensors)."""
        return super()._column_bytes(state, rows) + 2 * state[1].numel() * self.dtype.itemsize

    @staticmethod
    def _reverse_state(leaves: list[Tensor], z: Tensor, lam):
        """State of the double-vjp trick: the graph of ``J^T u`` for a dummy ``u`` shaped like ``z``.

        ``J v = d(J^T u)/du [v]`` for every ``u``; ``u = 1`` rather than ``0`` because some
        backward formulas take the log of the incoming gradient (``logcumsumexp``: NaN at
        ``u = 0``, exact at ``u = 1``; tests/test_kernels.py).
        """
        u = torch.ones_like(z, requires_grad=True)
        jtu = torch.autograd.grad(z, leaves, grad_outputs=u, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(jtu) if g is not None]
        return leaves, z, u, [jtu[i] for i in used], used, lam

    def _forward_jv(self, X: Tensor, idx: list[int], pieces: list[Tensor]) -> Tensor:
        """``J V`` ``[k, *z.shape]`` by forward mode (``torch.func.jvp``), one pass per column."""
        primals = tuple(self.params[i].detach() for i in idx)
        names = [self.param_names[i] for i in idx]
        fixed = {n: p.detach() for n, p in self.model.named_parameters()}

        def f(*ps):
            return self._predict(X, {**fixed, **dict(zip(names, ps))})

        k = pieces[0].shape[-1]
        with model_state(self.model, self.mode), derivative_kernels(self.model, "forward"), \
                derivative_errors("the GGN's forward-mode J v (jvp='forward')"):
            return torch.stack([torch.func.jvp(f, primals, tuple(t[..., c] for t in pieces))[1] for c in range(k)])

    def _apply_state(self, state, V: Tensor, idx=None) -> Tensor:
        try:
            with derivative_errors(f"the GGN product (jvp={self.jvp!r})"):
                return self._apply(state, V, idx)
        except Exception:
            self.clear_cache()  # a state that failed once is not reused (e.g. after the user fixes the model)
            raise

    def _fall_back_to_reverse(self, state):
        """Under ``jvp="auto"``: switch to the double-vjp trick for good; the reverse state for ``state``'s batch."""
        leaves, z, _, _, _, lam = state
        self.jvp, self._kernel_needs = "reverse", "second"
        new = self._reverse_state(leaves, z, lam)
        if self._state is state:
            self._state = new
        return new

    def _apply(self, state, V: Tensor, idx=None) -> Tensor:
        leaves, z, u, jtu, used, lam = state
        idx = list(range(len(leaves))) if idx is None else idx
        if jtu is None and used is None:  # forward mode: u holds the batch input
            if not z.requires_grad:
                return torch.zeros_like(V)
            inputs = [leaves[i] for i in idx]
            try:
                JV = self._forward_jv(u, idx, unflatten(V, [p.shape for p in inputs]))
            except RuntimeError:  # torch's forward AD lacks or mishandles an op (internal errors included)
                if not self._jvp_auto:
                    raise
                return self._apply(self._fall_back_to_reverse(state), V, idx)
            W = lam.matmat(JV)
            out_t = torch.empty(V.shape[1], V.shape[0], dtype=V.dtype, device=V.device)
            for c in range(V.shape[1]):
                res = torch.autograd.grad(z, inputs, grad_outputs=W[c], retain_graph=True, allow_unused=True)
                torch.cat([torch.zeros(p.numel(), dtype=V.dtype, device=V.device) if r is None
                           else r.reshape(-1) for r, p in zip(res, inputs)], out=out_t[c])
            return out_t.T  # a view: the caller accumulates it (no [n, k] copy)
        shapes = [leaves[i].shape for i in idx]
        inputs = [leaves[i] for i in idx]
        rows = [j for j, i in enumerate(idx) if i in used]  # parameters that influence the output
        outputs = [jtu[used.index(idx[j])] for j in rows]
        if not outputs:
            return torch.zeros_like(V)
        k = V.shape[1]
        pieces = unflatten(V, shapes)
        if self.batched and k > 1:
            gouts = [pieces[j].movedim(-1, 0) for j in rows]
            (JV,) = torch.autograd.grad(outputs, u, grad_outputs=gouts, retain_graph=True, is_grads_batched=True)
            W = lam.matmat(JV)
            res = torch.autograd.grad(z, inputs, grad_outputs=W, retain_graph=True,
                                      allow_unused=True, is_grads_batched=True)
            cols = [torch.zeros(k, p.numel(), dtype=V.dtype, device=V.device) if r is None
                    else r.reshape(k, -1) for r, p in zip(res, inputs)]
            return torch.cat(cols, dim=1).T  # a view: the caller accumulates it (no [n, k] copy)
        # J v through the graph of J^T u (double-vjp trick), then Lambda, then J^T w
        # contiguous per-column gradient inputs (strided views of V slow the backward)
        Vt = V.T.contiguous()
        cols_in = [unflatten(Vt[c], shapes) for c in range(k)]
        JV = torch.stack([
            torch.autograd.grad(outputs, u, grad_outputs=[cols_in[c][j] for j in rows], retain_graph=True)[0]
            for c in range(k)
        ])
        W = lam.matmat(JV)
        out_t = torch.empty(k, V.shape[0], dtype=V.dtype, device=V.device)
        for c in range(k):
            res = torch.autograd.grad(z, inputs, grad_outputs=W[c], retain_graph=True, allow_unused=True)
            torch.cat([torch.zeros(p.numel(), dtype=V.dtype, device=V.device) if r is None
                       else r.reshape(-1) for r, p in zip(res, inputs)], out=out_t[c])
        return out_t.T  # a view: the caller accumulates it (no [n, k] copy)
