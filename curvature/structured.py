"""Small explicit operators: dense, diagonal, block-diagonal, and one from a function.

These are the building blocks for tests (a ``DenseOperator`` with a prescribed
spectrum), preconditioners (``DiagonalOperator``), per-layer curvature
(``BlockDiagonalOperator``) and user code that already has a product
(``CallableOperator``).  Each knows its exact solve, diagonal and dense form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .linear_operator import IdentityOperator, LinearOperator, check_real_dtype

__all__ = [
    "DenseOperator",
    "DiagonalOperator",
    "IdentityOperator",
    "BlockDiagonalOperator",
    "CallableOperator",
]


class DenseOperator(LinearOperator):
    """An explicit matrix ``[m, n]`` as an operator.

    Args:
        matrix: the matrix, real floating (an integer or complex matrix raises
            ``TypeError``: convert it, e.g. ``matrix.to(torch.float64)``); its dtype
            and device become the operator's.
        is_symmetric: ``None`` (default) checks ``matrix == matrix.T`` up to
            rounding; pass ``True``/``False`` to skip the check.

    Example:
        >>> import torch
        >>> from curvature import DenseOperator
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> A.is_symmetric, (A @ torch.ones(2, dtype=torch.float64)).tolist()
        (True, [3.0, 4.0])
    """

    def __init__(self, matrix: Tensor, *, is_symmetric: bool | None = None, param_shapes=None) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            raise ValueError(
                f"DenseOperator needs a 2-d tensor, got "
                f"{type(matrix).__name__ if not isinstance(matrix, Tensor) else tuple(matrix.shape)}."
            )
        check_real_dtype(matrix.dtype, "DenseOperator")
        if is_symmetric is None:
            is_symmetric = matrix.shape[0] == matrix.shape[1] and bool(
                torch.allclose(matrix, matrix.T, rtol=1e-10, atol=1e-12 * float(matrix.abs().max().clamp(min=1)))
            )
        super().__init__(
            tuple(matrix.shape), dtype=matrix.dtype, device=matrix.device,
            is_symmetric=is_symmetric, param_shapes=param_shapes,
        )
        self.matrix = matrix

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X

    def _adjoint(self) -> LinearOperator:
        return self if self.is_symmetric else DenseOperator(self.matrix.T, is_symmetric=False)

    def _solve_exact(self, B: Tensor) -> Tensor:
        return torch.linalg.solve(self.matrix, B)

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        return self.matrix.clone()

    def diagonal(self, chunk_size: int = 256) -> Tensor:
        return torch.diagonal(self.matrix).clone()


class DiagonalOperator(LinearOperator):
    """``diag(d)`` for a vector ``d`` of shape ``[n]``.  Solves exactly (``b / d``)."""

    def __init__(self, diagonal: Tensor, *, param_shapes=None) -> None:
        if not isinstance(diagonal, Tensor) or diagonal.dim() != 1:
            raise ValueError("DiagonalOperator needs a 1-d tensor of diagonal entries.")
        check_real_dtype(diagonal.dtype, "DiagonalOperator")
        n = diagonal.shape[0]
        super().__init__((n, n), dtype=diagonal.dtype, device=diagonal.device,
                         is_symmetric=True, param_shapes=param_shapes)
        self.diag = diagonal

    def _matmat(self, X: Tensor) -> Tensor:
        return self.diag.unsqueeze(1) * X

    def _solve_exact(self, B: Tensor) -> Tensor:
        if bool((self.diag == 0).any()):
            raise ZeroDivisionError("DiagonalOperator.solve: the diagonal has zero entries (singular).")
        return B / self.diag.unsqueeze(1)

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        return torch.diag(self.diag)

    def diagonal(self, chunk_size: int = 256) -> Tensor:
        return self.diag.clone()

    def sqrt(self) -> DiagonalOperator:
        """``diag(sqrt(d))``; raises if an entry is negative."""
        if bool((self.diag < 0).any()):
            raise ValueError("DiagonalOperator.sqrt: negative diagonal entries.")
        return DiagonalOperator(self.diag.sqrt(), param_shapes=self.param_shapes)

    def __pow__(self, power: float) -> DiagonalOperator:
        return DiagonalOperator(self.diag ** power, param_shapes=self.param_shapes)


class BlockDiagonalOperator(LinearOperator):
    """``diag(A_1, ..., A_b)`` for square blocks, e.g. one curvature block per layer.

    Args:
        blocks: square operators with one dtype and device.
        names: optional label per block (layer names), kept in ``self.names``.
    """

    def __init__(self, blocks: Sequence[LinearOperator], names: Sequence[str] | None = None) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("BlockDiagonalOperator needs at least one block.")
        for i, blk in enumerate(blocks):
            if blk.shape[0] != blk.shape[1]:
                raise ValueError(f"Block {i} is not square: shape {blk.shape}.")
            if blk.dtype != blocks[0].dtype or blk.device != blocks[0].device:
                raise ValueError(f"Block {i} has dtype/device {blk.dtype}/{blk.device}; "
                                 f"expected {blocks[0].dtype}/{blocks[0].device}.")
        if names is not None and len(names) != len(blocks):
            raise ValueError(f"Got {len(names)} names for {len(blocks)} blocks.")
        n = sum(b.shape[0] for b in blocks)
        shapes = None
        if all(b.param_shapes is not None for b in blocks):
            shapes = [s for b in blocks for s in b.param_shapes]
        super().__init__((n, n), dtype=blocks[0].dtype, device=blocks[0].device,
                         is_symmetric=all(b.is_symmetric for b in blocks), param_shapes=shapes)
        self.blocks = blocks
        self.names = list(names) if names is not None else [str(i) for i in range(len(blocks))]
        self.sizes = [b.shape[0] for b in blocks]

    def _matmat(self, X: Tensor) -> Tensor:
        parts = torch.split(X, self.sizes, dim=0)
        return torch.cat([blk.matmat(p) for blk, p in zip(self.blocks, parts)], dim=0)

    def _adjoint(self) -> LinearOperator:
        return self if self.is_symmetric else BlockDiagonalOperator([b.T for b in self.blocks], self.names)

    def _solve_exact(self, B: Tensor) -> Tensor | None:
        parts = torch.split(B, self.sizes, dim=0)
        out = []
        for blk, p in zip(self.blocks, parts):
            x = blk._solve_exact(p)
            if x is None:
                return None
            out.append(x)
        return torch.cat(out, dim=0)

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        return torch.block_diag(*[b.to_dense(chunk_size) for b in self.blocks])

    def diagonal(self, chunk_size: int = 256) -> Tensor:
        return torch.cat([b.diagonal(chunk_size) for b in self.blocks])


class CallableOperator(LinearOperator):
    """An operator from a function ``X -> A @ X`` on ``[n, k]`` blocks.

    The function's output is checked on every product: it must be ``[m, k]`` in the
    declared dtype (``ValueError`` / ``TypeError`` otherwise), so a function returning
    the wrong number of rows cannot pass silently.

    Args:
        matmat: the product on blocks of columns.
        shape: ``(m, n)``.
        dtype, device: of inputs and outputs.
        is_symmetric: whether ``A`` is symmetric.
        rmatmat: optional ``X -> A^T @ X`` for non-symmetric operators.
    """

    def __init__(
        self,
        matmat: Callable[[Tensor], Tensor],
        shape: tuple[int, int],
        *,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        is_symmetric: bool = False,
        rmatmat: Callable[[Tensor], Tensor] | None = None,
        param_shapes=None,
    ) -> None:
        super().__init__(shape, dtype=dtype, device=device, is_symmetric=is_symmetric, param_shapes=param_shapes)
        self._fn = matmat
        self._rfn = rmatmat

    def _matmat(self, X: Tensor) -> Tensor:
        return self._fn(X)

    def _adjoint(self) -> LinearOperator:
        if self.is_symmetric:
            return self
        if self._rfn is None:
            raise NotImplementedError("CallableOperator: pass rmatmat= to get the adjoint.")
        return CallableOperator(self._rfn, (self.shape[1], self.shape[0]), dtype=self.dtype,
                                device=self.device, rmatmat=self._fn)
