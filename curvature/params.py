"""Conversion between flat vectors and vectors shaped like a list of parameters.

Curvature operators act on the concatenation of all parameters they are defined
over (``n = sum(p.numel() for p in params)``).  Users often hold vectors in
"parameter format" instead: a list of tensors, one per parameter, each shaped like
that parameter (``p.shape``), or with a trailing column dimension (``[*p.shape, k]``)
for a block of ``k`` vectors.  These helpers convert between the two formats; the
order of the flat vector is the order of ``params``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["flatten", "unflatten", "param_shapes", "num_params"]


def param_shapes(params: Iterable[Tensor]) -> list[torch.Size]:
    """Shapes of ``params``, in order."""
    return [p.shape for p in params]


def num_params(shapes: Sequence[torch.Size]) -> int:
    """Total number of entries of tensors with the given ``shapes``."""
    return sum(int(torch.Size(s).numel()) for s in shapes)


def flatten(tensors: Sequence[Tensor], shapes: Sequence[torch.Size] | None = None) -> Tensor:
    """Concatenate parameter-shaped tensors into a flat vector or a block of columns.

    Args:
        tensors: one tensor per parameter, each of shape ``p.shape`` (a vector) or
            ``[*p.shape, k]`` (``k`` columns).  All must agree on ``k``.
        shapes: the parameter shapes; when given, every tensor is checked against
            its shape (a clear ``ValueError`` names the first mismatch).

    Returns:
        A tensor of shape ``[n]`` (vectors) or ``[n, k]`` (columns).
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("flatten: got an empty list of tensors.")
    if shapes is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    if len(tensors) != len(shapes):
        raise ValueError(
            f"Expected {len(shapes)} parameter-shaped tensors, got {len(tensors)}."
        )
    first = tensors[0]
    shape0 = torch.Size(shapes[0])
    if first.shape == shape0:
        columns = None
    elif first.dim() == len(shape0) + 1 and first.shape[:-1] == shape0:
        columns = first.shape[-1]
    else:
        raise ValueError(
            f"Parameter-shaped tensor 0 has shape {tuple(first.shape)}; expected "
            f"{tuple(shape0)} or {tuple(shape0) + ('k',)}."
        )
    flat = []
    for i, (t, s) in enumerate(zip(tensors, shapes)):
        expected = torch.Size(s) if columns is None else torch.Size(s) + (columns,)
        if t.shape != expected:
            raise ValueError(
                f"Parameter-shaped tensor {i} has shape {tuple(t.shape)}; expected "
                f"{tuple(expected)}."
            )
        flat.append(t.reshape(-1) if columns is None else t.reshape(-1, columns))
    return torch.cat(flat)


def unflatten(vector: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a flat vector ``[n]`` or block ``[n, k]`` into parameter-shaped tensors.

    The inverse of :func:`flatten`: returns tensors of shape ``p.shape`` (or
    ``[*p.shape, k]`` for a block).  The results are views of ``vector``.
    """
    n = num_params(shapes)
    if vector.shape[0] != n or vector.dim() not in (1, 2):
        raise ValueError(
            f"Cannot unflatten a tensor of shape {tuple(vector.shape)} into parameters "
            f"with {n} entries in total; expected [{n}] or [{n}, k]."
        )
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    pieces = torch.split(vector, sizes, dim=0)
    if vector.dim() == 1:
        return [piece.view(s) for piece, s in zip(pieces, shapes)]
    k = vector.shape[1]
    return [piece.reshape(*s, k) for piece, s in zip(pieces, shapes)]
