"""The one place estimators check their integer, seed and tolerance arguments.

Every public estimator validates its counts (``k``, ``num_probes``, ``num_steps``,
``block_size``, budgets), seeds and tolerances here, so that ``k=2.7`` (truncation),
``k=True`` (a bool is an int in Python), ``rtol=-1`` or ``seed=1.5`` are refused with a
message naming the argument, instead of being silently converted.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_seed", "check_tolerance", "SEED_RANGE"]

# torch.Generator.manual_seed accepts [-2^63, 2^64 - 1]
SEED_RANGE = (-(2**63), 2**64 - 1)


def _is_integral(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    # 0-d integer tensors / numpy integer scalars expose __index__
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
                and value.dtype != torch.bool
    except ImportError:  # pragma: no cover
        pass
    return False


def check_int(value: object, name: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as a Python ``int`` if it is an integer in ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an integer (floats such as ``2.0`` or ``2.7`` and
            bools are refused: no silent truncation).
        ValueError: out of range.
    """
    if not _is_integral(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    v = int(value)
    if minimum is not None and v < minimum:
        need = "a positive integer" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {need}, got {v}.")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}.")
    return v


def check_seed(seed: object) -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in ``[-2^63, 2^64 - 1]``."""
    if not _is_integral(seed):
        raise TypeError(f"seed must be an integer (or None), got {seed!r} ({type(seed).__name__}).")
    s = int(seed)
    lo, hi = SEED_RANGE
    if not lo <= s <= hi:
        raise ValueError(f"seed must lie in [-2**63, 2**64 - 1] (torch.Generator's range), got {s}.")
    return s


def check_tolerance(value: object, name: str, *, allow_zero: bool = False) -> float:
    """A finite real tolerance, ``> 0`` (or ``>= 0`` with ``allow_zero``), as a float.

    Raises:
        TypeError: not a real number (bools and strings are refused).
        ValueError: negative, zero (unless allowed), NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:
            import torch

            ok = isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {need}, got {v}.")
    return v
