"""EKFAC: eigenvalue-corrected K-FAC (George et al. 2018), with its exact damped inverse.

K-FAC's block ``G ⊗ A = (Q_G ⊗ Q_A) diag(g ⊗ a) (Q_G ⊗ Q_A)^T`` has the right
eigenbasis guess but products ``g_i a_j`` as eigenvalues.  EKFAC keeps the basis
``Q = Q_G ⊗ Q_A`` and replaces the eigenvalues by the exact second moments of the
per-example gradients in that basis::

    D_ij = sum_n sum_k w_b ((Q_G^T Grad_nk Q_A)_ij)^2,     Grad_nk = sum_t g_nkt x_nt^T

(``g_nkt`` the output gradient of column ``k`` of the loss-curvature factor at position
``t``, ``x`` the layer input, augmented by 1 for a joint weight+bias block; ``w_b`` the
batch's loss weight).  So ``diag(Q^T F Q) = D`` for ``F = sum_{n,k} vec(Grad_nk)
vec(Grad_nk)^T``, the matrix K-FAC approximates: the GGN block (``kind="kflr"``), the MC
Fisher block (``"kfac"``) or the empirical Fisher block (``"empirical"``) whenever each
example contributes one loss term (outputs ``[B, C]``, any Conv2d/Linear weight sharing
inside; per-position losses on ``[B, T, C]`` outputs add the cross-position terms of the
columns back-propagated for all positions at once, as in curvlinops).  Among all
operators ``Q diag(d) Q^T`` it is the closest to ``F`` in Frobenius norm, hence never
farther than K-FAC (tested).

Every operation goes through ``(Q_G, Q_A, D)``: product ``Q_G ((Q_G^T M Q_A) * D) Q_A^T``,
exact damped solve with ``D + lam`` in place of ``D``, ``logdet = sum log(D + lam)``.
Cost: two passes over the data (K-FAC factors, then the corrections), each one forward and
``K`` output-gradient backwards per batch, plus ``O(out^3 + in^3)`` eigendecompositions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._kfac_capture import capture_rows
from .backpack import batch_seed
from .kfac import accumulate_factors, check_kfac_args, factor_sizes
from .kronecker import LayerBlockOperator, MatrixLayoutOperator
from .linear_operator import all_finite

__all__ = ["EKFACBlock", "EKFACOperator", "ekfac"]


class EKFACBlock(MatrixLayoutOperator):
    """``(Q_A ⊗ Q_B) diag(vec(D) + shift) (Q_A ⊗ Q_B)^T`` on ``vec(W)`` for ``W`` ``[p, q]``.

    Args:
        QA: orthogonal ``[p, p]`` (output side).
        QB: orthogonal ``[q, q]`` (input side).
        scales: ``D`` ``[p, q]``, the eigenvalues (``>= 0`` for a curvature block).
        shift: exact additive damping.
        with_bias, param_shapes: the layout of :class:`~curvature.kronecker.MatrixLayoutOperator`.
    """

    def __init__(self, QA: Tensor, QB: Tensor, scales: Tensor, *, shift: float = 0.0, with_bias: bool = False,
                 param_shapes: Sequence[torch.Size] | None = None) -> None:
        p, q = QA.shape[0], QB.shape[0]
        if QA.shape != (p, p) or QB.shape != (q, q) or scales.shape != (p, q):
            raise ValueError(f"EKFACBlock needs QA [p, p], QB [q, q], scales [p, q]; got {tuple(QA.shape)}, "
                             f"{tuple(QB.shape)}, {tuple(scales.shape)}.")
        if not math.isfinite(float(shift)):
            raise ValueError(f"shift must be finite, got {shift}.")
        if not all_finite(scales):
            raise ValueError("EKFACBlock: the eigenvalue corrections have NaN/inf entries.")
        super().__init__(p, q, dtype=scales.dtype, device=scales.device, is_symmetric=True, with_bias=with_bias,
                         param_shapes=param_shapes)
        self.QA, self.QB, self.scales, self.shift = QA, QB, scales, float(shift)

    def eigenvalues(self) -> Tensor:
        """``D + shift`` ``[p, q]``: the eigenvalue of ``QA[:, i] ⊗ QB[:, j]`` at ``[i, j]``."""
        return self.scales + self.shift

    def _matmat(self, X: Tensor) -> Tensor:
        M = self._to_mat(X)
        return self._from_mat(self.QA @ ((self.QA.T @ M @ self.QB) * self.eigenvalues()) @ self.QB.T)

    def _solve_exact(self, Bm: Tensor) -> Tensor:
        lam = self.eigenvalues()
        big = float(lam.abs().max())
        tiny = lam.numel() * torch.finfo(self.dtype).eps * max(big, torch.finfo(self.dtype).tiny)
        if float(lam.abs().min()) <= tiny:
            raise ZeroDivisionError(
                f"EKFACBlock.solve: singular (smallest |eigenvalue| {float(lam.abs().min()):.3e} vs largest "
                f"{big:.3e}); add damping, e.g. op.damped(lam).")
        M = self._to_mat(Bm)
        return self._from_mat(self.QA @ ((self.QA.T @ M @ self.QB) / lam) @ self.QB.T)

    def damped(self, damping: float, mode: str = "exact") -> EKFACBlock:
        """``EKFAC + lam I`` (still exact in the eigenbasis); only ``mode="exact"`` exists for EKFAC."""
        lam = float(damping)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"damping must be finite and >= 0, got {damping}.")
        if mode != "exact":
            raise ValueError(f"EKFAC has no factored damping (its eigenvalues are not products); mode must be "
                             f"'exact', got {mode!r}.")
        return EKFACBlock(self.QA, self.QB, self.scales, shift=self.shift + lam, with_bias=self.with_bias,
                          param_shapes=self.param_shapes)

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        Q = torch.kron(self.QA, self.QB)
        return self._permute_dense((Q * self.eigenvalues().reshape(-1)) @ Q.T)

    def diagonal(self, chunk_size: int = 256) -> Tensor:
        return self._permute_vec(((self.QA ** 2) @ self.eigenvalues() @ (self.QB ** 2).T).reshape(-1))

    def trace(self) -> Tensor:
        return self.eigenvalues().sum()

    def logdet(self) -> Tensor:
        lam = self.eigenvalues()
        if bool((lam <= 0).any()):
            raise ValueError("logdet: the operator is not positive definite; add damping.")
        return torch.log(lam).sum()

    def __repr__(self) -> str:
        extra = f", shift={self.shift:g}" if self.shift else ""
        return (f"EKFACBlock([{self.p}x{self.q}]{extra}{', with_bias' if self.with_bias else ''}, "
                f"dtype={self.dtype}, device={self.device})")


class EKFACOperator(LayerBlockOperator):
    """Block-diagonal EKFAC: one :class:`EKFACBlock` per layer (built by :func:`ekfac`)."""

    def eigenbases(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """``{block name: (QA, QB, D)}``."""
        return {n: (b.QA, b.QB, b.scales) for n, b in zip(self.names, self.blocks)}


def _rotated_square_moments(g: Tensor, x: Tensor | None, QA: Tensor, QB: Tensor | None) -> Tensor:
    """``sum_n ((QA^T Grad_n QB)^2)`` ``[out, in]`` for ``Grad_n = sum_t g_nt x_nt^T`` (bias: ``[out, 1]``).

    ``g`` ``[B, T, out]``, ``x`` ``[B, T, in]``.  ``T = 1``: rank one, ``(gQ)^2^T (xQ)^2``;
    else per-example gradients (memory ``B out in``) or, when smaller, the position Gramians
    (memory ``B T^2 (out + in)``), as curvlinops chooses.
    """
    gr = g @ QA
    if x is None:
        return (gr.sum(1) ** 2).sum(0)[:, None]
    xr = x @ QB
    B, T, out = gr.shape
    d_in = xr.shape[-1]
    if T == 1:
        return (gr[:, 0] ** 2).T @ (xr[:, 0] ** 2)
    if T * T * (out + d_in) < out * d_in:
        Yg = torch.einsum("bso,bto->bsto", gr, gr)
        Xg = torch.einsum("bsi,bti->bsti", xr, xr)
        return torch.einsum("bsto,bsti->oi", Yg, Xg)
    return torch.einsum("bto,bti->boi", gr, xr).square_().sum(0)


def ekfac(
    model: nn.Module,
    loss_fn,
    data,
    params=None,
    *,
    kind: str = "kflr",
    approx: str = "expand",
    mc_samples: int = 1,
    seed: int | None = 0,
    mode: str = "eval",
    separate_bias: bool = False,
    check_data: bool = True,
    process_group=None,
) -> EKFACOperator:
    """Eigenvalue-corrected K-FAC of ``loss_fn(model(X), y)`` over ``data``, one block per layer.

    Same arguments and models as :func:`curvature.kfac` (``kind`` ``"kflr"``/``"exact"``,
    ``"kfac"``/``"mc"`` or ``"empirical"``; ``approx`` chooses the eigenbasis, i.e.
    the K-FAC factors, for weight sharing; ``process_group=`` for the data-parallel
    operator: the factors and the eigenvalue corrections are each summed over the ranks
    in one ``all_reduce``, every rank computes the same eigenbases).

    Returns:
        An :class:`EKFACOperator` ``[n, n]`` over the flat ``params``; ``.solve``,
        ``.inverse()`` and ``.damped(lam)`` are exact in the eigenbasis.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import curvature
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> E = curvature.ekfac(model, nn.CrossEntropyLoss(), (X, y))
        >>> x = E.damped(1e-3).solve(torch.ones(E.shape[0]))  # exact (E + 1e-3 I)^{-1} 1

    Cost: twice :func:`~curvature.kfac`'s passes (factors, then corrections).
    """
    model, kind, seed, loop, names, tensors, blocks = check_kfac_args(
        model, loss_fn, data, params, kind=kind, mc_samples=mc_samples, seed=seed, mode=mode, approx=approx,
        separate_bias=separate_bias, check_data=check_data, caller="ekfac", process_group=process_group)
    if kind == "kfra":
        raise ValueError("ekfac: kind='kfra' has no per-example gradients; use 'kflr', 'kfac' or 'empirical'.")
    params_by_name = dict(zip(names, tensors))
    factors = accumulate_factors(model, loss_fn, loop, blocks, params_by_name, kind=kind,
                                 mc_samples=int(mc_samples), seed=seed, mode=mode, approx=approx)
    bases = []
    for G, A in factors:
        QA = torch.linalg.eigh(G).eigenvectors
        QB = None if A is None else torch.linalg.eigh(A).eigenvectors
        bases.append((QA, QB))
    D: list[Tensor] = []  # the corrections [d_out, d_in] ([d_out, 1] for a bias block), summed over ranks
    for blk, (QA, _) in zip(blocks, bases):
        d_out, d_in = factor_sizes(blk, params_by_name)
        D.append(QA.new_zeros(d_out, 1 if d_in is None else d_in))
    with loop.shards.summed(D):
        for rows in capture_rows(model, loss_fn, loop, blocks, params_by_name, kind=kind, mc_samples=int(mc_samples),
                                 seed_of_batch=lambda b: batch_seed(seed, b), mode=mode):
            for i, (x, gs) in enumerate(zip(rows.inputs, rows.grads)):
                QA, QB = bases[i]
                for g in gs:
                    D[i].add_(_rotated_square_moments(g, x, QA, QB), alpha=rows.weight)
    shapes = {n: p.shape for n, p in zip(names, tensors)}
    ops = []
    for blk, (QA, QB), d in zip(blocks, bases, D):
        if QB is None:
            QB = torch.ones(1, 1, dtype=QA.dtype, device=QA.device)
        ops.append(EKFACBlock(QA, QB, d, with_bias=blk.how == "joint",
                              param_shapes=[shapes[n] for n in blk.param_names]))
    return EKFACOperator(ops, names=[b.name for b in blocks], param_names=[b.param_names for b in blocks])
