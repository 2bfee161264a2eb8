"""Hessian-vector products by central differences of the gradient, for where double backward fails.

``H v ~ (g(theta + h v) - g(theta - h v)) / (2 h)`` from two ordinary gradient passes
of the model *as it is* (its own ``forward`` and backward hooks: FSDP's all-gathers and
reduce-scatters, custom kernels without second derivatives).  No ``functional_call``
with shifted parameters: the parameters themselves are shifted in place for the
two passes and restored bit-exactly from a saved copy afterwards -- also when a pass
raises.  The writes go through ``.data`` (for FSDP: the local shard), so version
counters do not move: autograd graphs the caller saved earlier and the caches of
other operators stay valid, because the values they saw are back.

Step.  With ``u = v / ||v||`` and the perturbation length ``delta = h ||v||``::

    FD - H v = (delta^2 / 6) ||v|| T[u, u, .] + O(delta^4)      (truncation, T = third derivative)
             + (e_plus - e_minus) / (2 h)                         (rounding: e = a gradient's error)

so ``||FD - H v|| / ||v|| <= delta^2 K3 / 6 + eps_g / delta`` with ``K3 = ||T[u, u, .]||``
and ``eps_g`` the absolute rounding error of one gradient pass (about ``eps`` times the
magnitude of the terms summed into the gradient).  The default
``delta = eps^(1/3) (1 + ||theta||)`` (``eps`` = the parameters' machine epsilon,
``theta`` = the parameters of the block) balances the two terms when ``K3`` and
``eps_g / eps`` are of order ``1 / (1 + ||theta||)^2`` and ``1 + ||theta||``, giving a
relative error of order ``eps^(2/3)`` (``3.7e-11`` in float64, ``2.4e-5`` in float32,
``3.9e-2`` in bfloat16).  Measured ``||FD v - H v|| / ||H v||`` on the test MLP and CNN:
0.8-5.3 times ``eps^(2/3)`` in all three dtypes (``benchmarks/results_distributed.md``;
asserted ``<= 10 eps^(2/3)`` in ``tests/test_finite_difference.py``); so bfloat16 gives
a rough estimate only (5-15 % error).  Not a guaranteed bound: ``K3`` and ``eps_g`` are
properties of the model and can be larger.
``step=`` overrides ``delta`` relative to ``(1 + ||theta||)``.  The difference of the
two gradients is formed in at least float32.

Cost per column: two gradient passes (forward + backward) per batch, no graph kept
between products; memory: one copy of the parameters being shifted and two gradients.

Data parallel: as every operator here, ``process_group=`` sums the per-rank products
(see :mod:`curvature.distributed`).  FSDP2 (``torch.distributed.fsdp.fully_shard``)
models, whose backward already reduces gradients over the ranks, need
``process_group=`` (the FSDP group) and the same number of batches on every rank (the
passes are collectives); the vectors stay full-length and replicated (each rank shifts
its own shard, the gradients are all-gathered), so estimators work unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._empirical_risk import EmpiricalRiskOperator, model_state
from .params import unflatten

__all__ = ["FiniteDifferenceHessianOperator", "default_step"]


def default_step(dtype: torch.dtype) -> float:
    """``eps^(1/3)`` of ``dtype``: the relative perturbation length balancing truncation and rounding."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _local_rows(p, full: Tensor) -> Tensor:
    """The rows of ``full`` (shaped like the global ``p``) that this rank's shard of ``p`` holds."""
    local = p.to_local()
    mesh = p.device_mesh
    if mesh.ndim != 1 or len(p.placements) != 1 or not p.placements[0].is_shard(0):
        raise NotImplementedError(
            f"FiniteDifferenceHessianOperator supports parameters sharded on dim 0 of a 1-D mesh "
            f"(FSDP2's default); got placements {p.placements} on a {mesh.ndim}-D mesh."
        )
    chunks = torch.chunk(torch.arange(full.shape[0]), mesh.size())
    rank = mesh.get_local_rank()
    rows = chunks[rank] if rank < len(chunks) else torch.arange(0)
    if rows.numel() != local.shape[0]:
        raise NotImplementedError("The shard layout of a parameter is not torch.chunk's; cannot locate it.")
    return full[rows[0]:rows[0] + rows.numel()] if rows.numel() else full[:0]


class FiniteDifferenceHessianOperator(EmpiricalRiskOperator):
    """The loss Hessian applied by central differences of gradients (approximate; see the module doc).

    Args:
        model, loss_fn, data, params, mode, reduction, check_data, process_group: see
            :class:`~curvature._empirical_risk.EmpiricalRiskOperator` (nothing is
            cached: the per-batch state is the batch itself).
        step: the perturbation length relative to ``1 + ||theta||`` (default
            :func:`default_step` of the parameters' dtype, ``eps^(1/3)``).

    Shape ``[n, n]``, dtype and device of the parameters, marked symmetric (the exact
    Hessian is; the differences are symmetric only up to the error above).

    Example:
        >>> H = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X, y))
        >>> Hv = H @ v        # two gradient passes per column; error ~ eps^(2/3) relative
    """

    def __init__(self, model, loss_fn, data, params=None, *, step: float | None = None, **kwargs) -> None:
        if kwargs.pop("cache", False):
            raise ValueError("FiniteDifferenceHessianOperator keeps no state between products; drop cache=.")
        kwargs.pop("cache_check", None)
        super().__init__(model, loss_fn, data, params, cache=False, **kwargs)
        self.step = default_step(self.dtype) if step is None else float(step)
        if not (math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"step must be a positive number, got {step!r}.")
        DTensor = _dtensor_class()
        self.sharded = DTensor is not None and any(isinstance(p, DTensor) for p in self.params)
        if self.sharded:
            shards = self._loop.shards
            if shards.group is None:
                raise ValueError(
                    "The model's parameters are sharded (DTensor, e.g. FSDP's fully_shard): pass "
                    "process_group= (the group they are sharded over); every rank takes part in each pass."
                )
            if not shards.all_equal(self._loop.local_num_batches):
                raise ValueError(
                    "A sharded (FSDP) model runs collectives in every forward and backward pass: every rank "
                    "must hold the same number of batches (none empty)."
                )

    # ---------------------------------------------------------------- passes
    def _build_state(self, X: Tensor, y: Tensor, batch_index: int):
        return X, y, 1.0  # the batch, and the factor on its loss (FSDP: see _block_products)

    def _local(self, p: Tensor) -> Tensor:
        """The tensor to shift in place: ``p.data`` (no version bump), or this rank's shard."""
        return p.to_local().data if self.sharded and hasattr(p, "to_local") else p.data

    def _gradient(self, X: Tensor, y: Tensor, idx: list[int], scale: float) -> list[Tensor]:
        """Full-length gradients of ``scale * loss`` w.r.t. ``params[idx]`` from the model's own passes."""
        chosen = [self.params[i] for i in idx]
        with torch.enable_grad(), model_state(self.model, self.mode):
            loss = self._loss(self.adapter.prediction(X.call(self.model)), y) * scale
            if not self.sharded:
                gs = torch.autograd.grad(loss, chosen, allow_unused=True)
                return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, chosen)]
            # FSDP: gradients exist only through .backward() (its hooks reduce-scatter into .grad)
            everything = list(self.model.parameters())
            saved = [p.grad for p in everything]
            try:
                for p in everything:
                    p.grad = None
                loss.backward()
                return [torch.zeros(p.shape, dtype=p.dtype, device=self.device) if p.grad is None
                        else p.grad.full_tensor() for p in chosen]
            finally:
                for p, g in zip(everything, saved):
                    p.grad = g

    def _apply_state(self, state, V: Tensor, idx=None) -> Tensor:
        X, y, scale = state
        idx = list(range(len(self.params))) if idx is None else idx
        chosen = [self.params[i] for i in idx]
        locals_ = [self._local(p) for p in chosen]
        saved = [t.clone() for t in locals_]
        theta_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in saved))
        if self.sharded:  # the shards' squares summed over the ranks
            theta_norm = math.sqrt(self._loop.shards.sum_scalar(theta_norm ** 2))
        delta = self.step * (1.0 + theta_norm)
        work = torch.promote_types(V.dtype, torch.float32)
        out = torch.zeros_like(V)
        try:
            for c in range(V.shape[1]):
                v = V[:, c]
                v_norm = float(torch.linalg.vector_norm(v.to(work)))
                if v_norm == 0.0:
                    continue
                h = delta / v_norm
                pieces = unflatten(v, [p.shape for p in chosen])
                grads = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for t, t0, piece, p in zip(locals_, saved, pieces, chosen):
                            shift = _local_rows(p, piece) if self.sharded else piece
                            t.copy_(t0).add_(shift.to(t.dtype), alpha=sign * h)
                    grads.append(torch.cat([g.reshape(-1).to(work) for g in self._gradient(X, y, idx, scale)]))
                out[:, c] = ((grads[0] - grads[1]) / (2.0 * h)).to(V.dtype)
        finally:
            with torch.no_grad():
                for t, t0 in zip(locals_, saved):
                    t.copy_(t0)
        return out

    def _block_products(self, blocks, check_finite: bool = False):
        if not self.sharded:
            return super()._block_products(blocks, check_finite)
        # FSDP's backward averages the ranks' gradients, so each rank scales its batch loss by
        # size * w (w from the global denominators): the averaged gradient is the weighted sum
        # over ranks, the same on every rank; no all_reduce of the products.
        outs = [torch.zeros_like(V) for _, V in blocks]
        size = self._loop.shards.size
        for _, X, y, w in self._loop:
            for out, (idx, V) in zip(outs, blocks):
                out.add_(self._apply_state((X, y, size * w), V, idx))
        if check_finite and not all(bool(torch.isfinite(o).all()) for o in outs):
            raise self._nonfinite_error()
        return outs
