"""Per-layer and per-parameter curvature blocks: ``block_diagonal(HessianOperator, ...)``.

The block-diagonal approximation keeps only the curvature within each group of
parameters (a layer's weight and bias together, or each parameter alone).  Per-layer
spectra are the most requested view of a network's curvature::

    B = curvature.block_diagonal(curvature.HessianOperator, model, loss_fn, data)
    for name, block in zip(B.names, B.blocks):
        print(name, block.shape)       # each block is a full operator on its own params

Each block is a square ``LinearOperator`` on its group's parameters, so anything that
takes an operator works on one block; the whole is a
:class:`~curvature.BlockDiagonalOperator` over the parameters in model order.  The
blocks share one loop over the data and one cached gradient graph (memory of one
graph, not one per layer).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._empirical_risk import EmpiricalRiskOperator, resolve_params
from .linear_operator import LinearOperator
from .structured import BlockDiagonalOperator

__all__ = ["block_diagonal", "parameter_groups", "ParameterBlock", "CurvatureBlockDiagonal"]


def parameter_groups(model: nn.Module, params=None, grouping: str = "layer") -> list[tuple[str, list[str]]]:
    """Group parameter names: ``"layer"`` (by owning module) or ``"parameter"`` (one each).

    Returns:
        ``[(group name, [parameter names])]`` in parameter order.
    """
    if grouping not in ("layer", "parameter"):
        raise ValueError(f"grouping must be 'layer' or 'parameter', got {grouping!r}.")
    names, _ = resolve_params(model, params)
    if grouping == "parameter":
        return [(n, [n]) for n in names]
    groups: dict[str, list[str]] = {}
    for n in names:
        layer = n.rsplit(".", 1)[0] if "." in n else n
        groups.setdefault(layer, []).append(n)
    return list(groups.items())


class ParameterBlock(LinearOperator):
    """The diagonal block of a model curvature operator for a group of its parameters.

    Shares the parent's data loop and single-batch cache (one gradient graph for all
    blocks, not one per block).  Attributes: ``name``, ``param_names``, ``params``.
    """

    def __init__(self, parent: EmpiricalRiskOperator, idx: list[int], name: str) -> None:
        shapes = [parent.param_shapes[i] for i in idx]
        n = sum(int(torch.Size(s).numel()) for s in shapes)
        super().__init__((n, n), dtype=parent.dtype, device=parent.device, is_symmetric=True, param_shapes=shapes)
        self.parent = parent
        self.idx = list(idx)
        self.name = name
        self.param_names = [parent.param_names[i] for i in idx]
        self.params = [parent.params[i] for i in idx]

    _checks_own_finiteness = True  # NaN / inf refused in the parent's one host read per pass

    def _matmat(self, X: Tensor) -> Tensor:
        return self.parent._block_products([(self.idx, X)], self.check_finite)[0]

    def clear_cache(self) -> None:
        """Free the shared cached state."""
        self.parent.clear_cache()

    def __repr__(self) -> str:
        return f"ParameterBlock({self.name!r}, n={self.shape[0]}, of {type(self.parent).__name__})"


class CurvatureBlockDiagonal(BlockDiagonalOperator):
    """Block-diagonal curvature whose product makes one pass over the data for all blocks.

    Per batch: one forward and one gradient graph (cached for a single batch), then the
    products of every block from it.  ``.blocks`` are :class:`ParameterBlock`.
    """

    def __init__(self, parent: EmpiricalRiskOperator, groups: list[tuple[str, list[int]]]) -> None:
        blocks = [ParameterBlock(parent, idx, name) for name, idx in groups]
        super().__init__(blocks, names=[name for name, _ in groups])
        self.parent = parent

    _checks_own_finiteness = True  # NaN / inf refused in the parent's one host read per pass

    def _matmat(self, X: Tensor) -> Tensor:
        parts = torch.split(X, self.sizes, dim=0)
        outs = self.parent._block_products([(blk.idx, part) for blk, part in zip(self.blocks, parts)],
                                           self.check_finite)
        return torch.cat(outs, dim=0)

    def clear_cache(self) -> None:
        """Free the shared cached state."""
        self.parent.clear_cache()


def block_diagonal(
    operator_cls,
    model: nn.Module,
    loss_fn,
    data,
    params=None,
    *,
    grouping: str = "layer",
    **kwargs,
) -> BlockDiagonalOperator:
    """A block-diagonal curvature operator with one block per layer or per parameter.

    Args:
        operator_cls: ``HessianOperator``, ``GGNOperator``, ``FisherOperator`` (or any
            class taking ``(model, loss_fn, data, params=..., **kwargs)``).
        model, loss_fn, data, params: as for the operator; ``params`` restricts which
            parameters appear (default: all trainable ones).
        grouping: ``"layer"`` (weight and bias of a module together; the default) or
            ``"parameter"``.
        **kwargs: passed to the operator (``mode=``, ``kind=``, ``seed=``, ...).

    Returns:
        A :class:`~curvature.BlockDiagonalOperator` with ``.names`` (layer or parameter
        names) and ``.blocks`` (each a square operator on its group, usable on its own,
        e.g. for per-layer spectra); ``param_shapes`` set.  For the operators of this
        package the blocks share one data loop and one cached gradient graph: a
        product of the whole costs one pass over the data (per batch one forward and
        gradient graph, then the block products); other classes get one operator per
        block.
    """
    groups = parameter_groups(model, params, grouping)
    if isinstance(operator_cls, type) and issubclass(operator_cls, EmpiricalRiskOperator):
        ordered = [n for _, members in groups for n in members]
        parent = operator_cls(model, loss_fn, data, params=ordered, **kwargs)
        spans, start = [], 0
        for name, members in groups:
            spans.append((name, list(range(start, start + len(members)))))
            start += len(members)
        return CurvatureBlockDiagonal(parent, spans)
    blocks = [operator_cls(model, loss_fn, data, params=members, **kwargs) for _, members in groups]
    return BlockDiagonalOperator(blocks, names=[name for name, _ in groups])
