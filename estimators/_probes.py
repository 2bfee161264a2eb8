"""Random probe vectors and the one place estimators turn ``seed=`` into a generator.

Every estimator draws its randomness from an explicit ``torch.Generator`` living on
the operator's device, so that the same call gives the same numbers (on one device
and torch version).  ``seed=None`` together with ``generator=None`` means seed 0:
calls are reproducible by default; pass a different seed for independent draws.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvature import LinearOperator

from ._validate import check_seed

__all__ = ["make_generator", "rademacher", "gaussian", "sphere", "draw_probes", "PROBE_KINDS"]

PROBE_KINDS = ("rademacher", "gaussian", "sphere")


def make_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device | str
) -> tuple[torch.Generator, int | None]:
    """Return ``(generator, seed)``.

    Args:
        seed: an integer seed in ``[-2^63, 2^64 - 1]``, or ``None`` (seed 0); floats
            and bools are refused (no silent truncation).
        generator: an existing generator (wins over ``seed``; it must live on ``device``).
        device: the device the probes are drawn on (the operator's).

    Returns:
        The generator to draw from and the seed recorded in results (``None`` when a
        caller-owned generator was passed: its state, not a seed, defines the draw).
    """
    device = torch.device(device)
    if generator is not None:
        if seed is not None:
            raise ValueError("Pass either seed= or generator=, not both.")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if generator.device.type != device.type:
            raise ValueError(
                f"The generator lives on {generator.device} but the operator on {device}; "
                f"create it with torch.Generator(device={str(device)!r})."
            )
        return generator, None
    seed = 0 if seed is None else check_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen, seed


def rademacher(n: int, k: int, *, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """``[n, k]`` independent entries, exactly ``+1`` or ``-1`` with probability 1/2 each.

    Drawn directly in ``dtype`` (the same numbers as int64 bits on the CPU, measured) and
    mapped in place: one ``[n, k]`` tensor, not three (an int64 draw would take 8 bytes an entry).
    """
    bits = torch.randint(0, 2, (n, k), generator=generator, device=device, dtype=dtype)
    return bits.mul_(2).sub_(1)


def gaussian(n: int, k: int, *, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """``[n, k]`` independent standard normal entries (``E[w w^T] = I``)."""
    return torch.randn(n, k, generator=generator, device=device, dtype=dtype)


def sphere(n: int, k: int, *, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """``[n, k]`` columns uniform on the sphere of radius ``sqrt(n)`` (``E[w w^T] = I``)."""
    W = gaussian(n, k, generator=generator, dtype=dtype, device=device)
    return W * (math.sqrt(n) / W.norm(dim=0, keepdim=True).clamp(min=torch.finfo(dtype).tiny))


def draw_probes(op: LinearOperator, k: int, kind: str, generator: torch.Generator) -> Tensor:
    """``k`` probes ``[n, k]`` of ``kind`` (``"rademacher"``, ``"gaussian"``, ``"sphere"``)
    in the operator's dtype and device; each satisfies ``E[w w^T] = I``."""
    fn = {"rademacher": rademacher, "gaussian": gaussian, "sphere": sphere}.get(kind)
    if fn is None:
        raise ValueError(f"Unknown probe distribution {kind!r}; use one of {PROBE_KINDS}.")
    return fn(op.shape[1], k, generator=generator, dtype=op.dtype, device=op.device)


def check_square(op: LinearOperator, what: str, *, symmetric: bool = False) -> int:
    """Raise a clear error unless ``op`` is a square (symmetric) LinearOperator; return n."""
    if not isinstance(op, LinearOperator):
        raise TypeError(f"{what} needs a curvature.LinearOperator, got {type(op).__name__}.")
    m, n = op.shape
    if m != n:
        raise ValueError(f"{what} needs a square operator, got shape {op.shape}.")
    if symmetric and not op.is_symmetric:
        raise ValueError(
            f"{what} needs a symmetric operator; {type(op).__name__} is not marked symmetric "
            "(is_symmetric=False). Symmetrize it, e.g. 0.5 * (A + A.T), if that is what you mean."
        )
    if n == 0:
        raise ValueError(f"{what}: the operator is empty (n = 0).")
    return n
