"""Kronecker-factored operators: ``A ⊗ B`` on a flattened matrix parameter, and K-FAC blocks.

Vectorization convention (row-major, what ``W.reshape(-1)`` does in torch):

    (A ⊗ B) vec(W) = vec(A W B^T)     for W [p, q], A [p, p], B [q, q],

with ``vec(W) = W.reshape(-1)`` and ``⊗`` = ``torch.kron``.  (The literature's
column-stacking vec has the factors the other way round: ``(B ⊗ A) vec_col(W)``.)  For a
layer ``z = W x`` with ``W`` [out, in], the output-side factor ``A`` is ``[out, out]`` and
the input-side factor ``B`` is ``[in, in]``; a Conv2d weight ``[out, c, kh, kw]`` is the
matrix ``[out, c*kh*kw]``, matching the order of ``torch.nn.functional.unfold``.

Weight and bias jointly (``with_bias=True``): the operator acts on the flat vector
``[W.reshape(-1), b]`` (our parameter order: weight, then bias) as ``A ⊗ B`` on the matrix
``[W | b]`` of shape ``[p, q]`` (``B`` is ``[q, q]`` for the input augmented by a
constant 1, so ``W`` has ``q - 1`` columns); a fixed permutation maps between the two
orders.

Every operation goes through the factors (never the ``pq x pq`` matrix):

* product: two small matrix products, ``O(pq(p + q))`` per column;
* exact solve of ``A ⊗ B + s I`` (``s >= 0``, symmetric factors): eigendecompositions
  ``A = Q_a diag(a) Q_a^T``, ``B = Q_b diag(b) Q_b^T`` (computed once, cached), then
  ``X = Q_a [(Q_a^T M Q_b) / (a b^T + s)] Q_b^T``; non-symmetric factors with ``s = 0``
  use ``A^{-1} M B^{-T}`` (two ``torch.linalg.solve``);
* ``diagonal`` = ``diag(A) ⊗ diag(B) + s``, ``trace`` = ``tr A tr B + s pq``,
  ``logdet`` from the eigenvalues, ``to_dense`` = ``torch.kron(A, B) + s I``.

Damping (:meth:`KroneckerOperator.damped`): ``mode="exact"`` is ``A ⊗ B + lam I`` (the
contract of :meth:`LinearOperator.damped`, solved exactly through the eigenvalues);
``mode="factored"`` is ``(A + sqrt(lam) I) ⊗ (B + sqrt(lam) I)``, and ``"factored_pi"``
the trace-balanced ``(A + pi sqrt(lam) I) ⊗ (B + sqrt(lam)/pi I)`` with
``pi = sqrt((tr A / p) / (tr B / q))`` (Martens & Grosse 2015, sec. 6.3).  Factored
damping is a different matrix (it adds ``sqrt(lam) (A ⊗ I + I ⊗ B)`` too); it is what
K-FAC optimizers use, because its inverse is again a Kronecker product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .linear_operator import LinearOperator, all_finite
from .structured import BlockDiagonalOperator

__all__ = ["MatrixLayoutOperator", "KroneckerOperator", "LayerBlockOperator", "KFACOperator"]

_MODES = ("exact", "factored", "factored_pi")


def _is_sym(M: Tensor) -> bool:
    """``M`` equals ``M^T`` up to ``64 eps max|M|``; exactly symmetric factors (K-FAC's) cost one comparison."""
    if torch.equal(M, M.T):
        return True
    if not M.is_floating_point():
        return False
    eps = torch.finfo(M.dtype).eps
    dev, scale = torch.stack([(M - M.T).abs().max(), M.abs().max()]).tolist()  # one host sync
    return dev <= 64 * eps * max(scale, 1e-300)


class MatrixLayoutOperator(LinearOperator):
    """Base of operators on one layer's flat parameters viewed as a matrix ``[p, q]``.

    Holds the layout shared by :class:`KroneckerOperator` and
    :class:`curvature.ekfac.EKFACBlock`: the flat vector is ``W.reshape(-1)`` of ``W``
    ``[p, q]``, or with ``with_bias`` the vector ``[W.reshape(-1), b]`` of ``W`` ``[p, q - 1]``
    and ``b`` ``[p]`` (the bias is the last column of the matrix ``[W | b]``).  Subclasses
    implement the product on ``[k, p, q]`` stacks of matrices.
    """

    def __init__(self, p: int, q: int, *, dtype: torch.dtype, device: torch.device, is_symmetric: bool,
                 with_bias: bool = False, param_shapes: Sequence[torch.Size] | None = None) -> None:
        if with_bias and q < 2:
            raise ValueError("with_bias=True needs an input factor B of size >= 2 (weight columns + 1).")
        if param_shapes is None:
            param_shapes = [torch.Size((p, q - 1)), torch.Size((p,))] if with_bias else [torch.Size((p, q))]
        param_shapes = [torch.Size(s) for s in param_shapes]
        if sum(s.numel() for s in param_shapes) != p * q:
            raise ValueError(f"param_shapes {[tuple(s) for s in param_shapes]} do not have {p}*{q}={p * q} entries.")
        super().__init__((p * q, p * q), dtype=dtype, device=device, is_symmetric=is_symmetric,
                         param_shapes=param_shapes)
        self.p, self.q, self.with_bias = p, q, bool(with_bias)
        # perm[i] = position in the row-major vec of the [p, q] matrix of our flat entry i
        if with_bias:
            grid = torch.arange(p * q, device=device).reshape(p, q)
            self._perm = torch.cat([grid[:, :-1].reshape(-1), grid[:, -1]])
        else:
            self._perm = None

    # ------------------------------------------------------------ layout maps
    def _to_mat(self, X: Tensor) -> Tensor:
        """``[n, k]`` flat (our order) -> ``[k, p, q]`` matrices."""
        if self._perm is not None:
            Y = torch.empty_like(X)
            Y[self._perm] = X
            X = Y
        return X.T.reshape(-1, self.p, self.q)

    def _from_mat(self, M: Tensor) -> Tensor:
        """``[k, p, q]`` -> ``[n, k]`` flat (our order)."""
        X = M.reshape(M.shape[0], -1).T
        return X[self._perm] if self._perm is not None else X

    def _permute_vec(self, v: Tensor) -> Tensor:
        return v[self._perm] if self._perm is not None else v

    def _permute_dense(self, D: Tensor) -> Tensor:
        """A dense ``[pq, pq]`` matrix in row-major vec order -> our flat order."""
        return D[self._perm][:, self._perm] if self._perm is not None else D


class KroneckerOperator(MatrixLayoutOperator):
    """``A ⊗ B + shift * I`` acting on ``vec(W) = W.reshape(-1)`` for ``W`` of shape ``[p, q]``.

    Args:
        A: output-side factor ``[p, p]``.
        B: input-side factor ``[q, q]`` (same dtype and device as ``A``).
        shift: an exact additive damping ``s`` (the operator is ``A ⊗ B + s I``).
        with_bias: the flat vector is ``[W.reshape(-1), b]`` for ``W`` ``[p, q - 1]`` and
            ``b`` ``[p]`` (the last column of the matrix is the bias), see the module doc.
        param_shapes: shapes of the parameters the flat vector stacks (default
            ``[(p, q)]``, or ``[(p, q - 1), (p,)]`` with ``with_bias``); only their
            total size must match.
        symmetric: whether both factors are symmetric.  ``None`` (default) checks it
            (``A = A^T`` and ``B = B^T`` to ``64 eps`` of their largest entry, one
            comparison per factor); ``True`` / ``False`` is the caller's knowledge, not
            checked: pass ``True`` only for factors symmetric by construction (those of
            :func:`curvature.kfac` are symmetrized exactly; :meth:`damped` passes on its own flag).

    Raises:
        ValueError: factors not square 2-d, ``with_bias`` with ``q < 2``, or
            ``param_shapes`` of the wrong total size.
        TypeError: factors of different dtypes or devices.
    """

    def __init__(self, A: Tensor, B: Tensor, *, shift: float = 0.0, with_bias: bool = False,
                 param_shapes: Sequence[torch.Size] | None = None, symmetric: bool | None = None) -> None:
        for name, F in (("A", A), ("B", B)):
            if not isinstance(F, Tensor) or F.dim() != 2 or F.shape[0] != F.shape[1]:
                raise ValueError(f"Kronecker factor {name} must be a square 2-d tensor, got "
                                 f"{tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__}.")
        if A.dtype != B.dtype or A.device != B.device:
            raise TypeError(f"Kronecker factors must share dtype and device: A is {A.dtype} on {A.device}, "
                            f"B is {B.dtype} on {B.device}.")
        if not math.isfinite(float(shift)):
            raise ValueError(f"shift must be finite, got {shift}.")
        if not all_finite(A, B):  # one host sync for both
            name = "B" if all_finite(A) else "A"
            raise ValueError(f"Kronecker factor {name} has NaN/inf entries (non-finite parameters or data?).")
        sym = (_is_sym(A) and _is_sym(B)) if symmetric is None else bool(symmetric)
        super().__init__(A.shape[0], B.shape[0], dtype=A.dtype, device=A.device, is_symmetric=sym,
                         with_bias=with_bias, param_shapes=param_shapes)
        self.A, self.B, self.shift = A, B, float(shift)
        self._eig = None

    # ---------------------------------------------------------------- product
    def _matmat(self, X: Tensor) -> Tensor:
        M = self._to_mat(X)
        Y = self._from_mat(self.A @ M @ self.B.T)
        return Y + self.shift * X if self.shift != 0.0 else Y

    def _adjoint(self) -> LinearOperator:
        if self.is_symmetric:
            return self
        return KroneckerOperator(self.A.T, self.B.T, shift=self.shift, with_bias=self.with_bias,
                                 param_shapes=self.param_shapes)

    # ------------------------------------------------------------------ solve
    def eigendecomposition(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a, Q_a, b, Q_b)`` with ``A = Q_a diag(a) Q_a^T`` and ``B = Q_b diag(b) Q_b^T`` (cached).

        Cost: ``O(p^3 + q^3)`` once.  Symmetric factors only.
        """
        if not self.is_symmetric:
            raise ValueError("eigendecomposition() needs symmetric Kronecker factors.")
        if self._eig is None:
            a, Qa = torch.linalg.eigh(self.A)
            b, Qb = torch.linalg.eigh(self.B)
            self._eig = (a, Qa, b, Qb)
        return self._eig

    def _eigenvalue_grid(self) -> Tensor:
        a, _, b, _ = self.eigendecomposition()
        return torch.outer(a, b) + self.shift

    def _solve_exact(self, Bm: Tensor) -> Tensor | None:
        M = self._to_mat(Bm)
        if self.is_symmetric:
            a, Qa, b, Qb = self.eigendecomposition()
            lam = self._eigenvalue_grid()
            big = float(lam.abs().max()) if lam.numel() else 0.0
            tiny = lam.numel() * torch.finfo(self.dtype).eps * max(big, torch.finfo(self.dtype).tiny)
            if float(lam.abs().min()) <= tiny:
                raise ZeroDivisionError(
                    f"KroneckerOperator.solve: A ⊗ B + {self.shift:g} I is singular (smallest |eigenvalue| "
                    f"{float(lam.abs().min()):.3e} vs largest {big:.3e}); add damping, e.g. op.damped(lam)."
                )
            X = Qa @ ((Qa.T @ M @ Qb) / lam) @ Qb.T
            return self._from_mat(X)
        if self.shift != 0.0:
            return None
        X = torch.linalg.solve(self.A, M)  # A^{-1} M
        X = torch.linalg.solve(self.B, X.transpose(1, 2)).transpose(1, 2)  # (B^{-1} (A^{-1}M)^T)^T
        return self._from_mat(X)

    # ------------------------------------------------------------------ extras
    def damped(self, damping: float, mode: str = "exact") -> KroneckerOperator:
        """A damped copy, solvable exactly through the factors.

        Args:
            damping: ``lam >= 0``.
            mode: ``"exact"`` -> ``A ⊗ B + lam I``; ``"factored"`` ->
                ``(A + sqrt(lam) I) ⊗ (B + sqrt(lam) I)``; ``"factored_pi"`` ->
                ``(A + pi sqrt(lam) I) ⊗ (B + sqrt(lam)/pi I)``, ``pi`` balancing the mean
                eigenvalues (Martens & Grosse 2015).  Factored modes keep ``shift``.
        """
        lam = float(damping)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"damping must be finite and >= 0, got {damping}.")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if mode == "exact":
            return KroneckerOperator(self.A, self.B, shift=self.shift + lam, with_bias=self.with_bias,
                                     param_shapes=self.param_shapes, symmetric=self.is_symmetric)
        pi = 1.0
        if mode == "factored_pi":
            ta, tb = float(torch.trace(self.A)) / self.p, float(torch.trace(self.B)) / self.q
            pi = math.sqrt(ta / tb) if ta > 0 and tb > 0 else 1.0
        r = math.sqrt(lam)
        Ia = torch.eye(self.p, dtype=self.dtype, device=self.device)
        Ib = torch.eye(self.q, dtype=self.dtype, device=self.device)
        return KroneckerOperator(self.A + pi * r * Ia, self.B + (r / pi) * Ib, shift=self.shift,
                                 with_bias=self.with_bias, param_shapes=self.param_shapes,
                                 symmetric=self.is_symmetric)  # A + c I is symmetric iff A is

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        D = self._permute_dense(torch.kron(self.A, self.B))
        if self.shift != 0.0:
            D = D + self.shift * torch.eye(D.shape[0], dtype=self.dtype, device=self.device)
        return D

    def diagonal(self, chunk_size: int = 256) -> Tensor:
        d = torch.outer(torch.diagonal(self.A), torch.diagonal(self.B)).reshape(-1) + self.shift
        return self._permute_vec(d)

    def trace(self) -> Tensor:
        """``tr(A) tr(B) + shift * p q`` (a 0-d tensor)."""
        return torch.trace(self.A) * torch.trace(self.B) + self.shift * self.p * self.q

    def logdet(self) -> Tensor:
        """``log det(A ⊗ B + shift I)`` from the factor eigenvalues (must all be positive)."""
        lam = self._eigenvalue_grid()
        if bool((lam <= 0).any()):
            raise ValueError("logdet: the operator is not positive definite; add damping.")
        return torch.log(lam).sum()

    def __repr__(self) -> str:
        extra = f", shift={self.shift:g}" if self.shift else ""
        return (f"KroneckerOperator(A [{self.p}x{self.p}] ⊗ B [{self.q}x{self.q}]{extra}"
                f"{', with_bias' if self.with_bias else ''}, dtype={self.dtype}, device={self.device})")


class LayerBlockOperator(BlockDiagonalOperator):
    """Block-diagonal operator with one block per layer (or parameter), built by :func:`curvature.kfac` / ``ekfac``.

    ``blocks[i]`` acts on the parameters ``param_names[i]`` (names in the model),
    ``names[i]`` is the block name.  Exact solve, damping, diagonal, trace and logdet go
    block by block.
    """

    def __init__(self, blocks: Sequence[LinearOperator], names: Sequence[str] | None = None,
                 param_names: Sequence[Sequence[str]] | None = None) -> None:
        super().__init__(blocks, names)
        self.param_names = [list(p) for p in param_names] if param_names is not None else None

    def damped(self, damping: float, mode: str = "exact"):
        """Every block damped (see the blocks' ``damped``); ``"exact"`` is ``K + lam I``."""
        return type(self)([b.damped(damping, mode) for b in self.blocks], self.names, self.param_names)

    def trace(self) -> Tensor:
        """Sum of the blocks' traces (a 0-d tensor)."""
        return torch.stack([b.trace() for b in self.blocks]).sum()

    def logdet(self) -> Tensor:
        """Sum of the blocks' log-determinants."""
        return torch.stack([b.logdet() for b in self.blocks]).sum()


class KFACOperator(LayerBlockOperator):
    """Block-diagonal K-FAC: one :class:`KroneckerOperator` per layer (or per parameter).

    Built by :func:`curvature.kfac`.  ``blocks[i]`` acts on the parameters
    ``param_names[i]`` (names in the model), ``names[i]`` is the layer name.  Exact solve,
    damping, diagonal, trace and logdet go block by block through the factors.
    """

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, B)}`` (for a separate bias block the name ends in ``.bias``)."""
        return {n: (b.A, b.B) for n, b in zip(self.names, self.blocks)}
