"""Shared plumbing of the approximate-Newton optimizers (private).

:class:`~solvers.NewtonCG` and :class:`~solvers.GNSNewton` take one joint step over
*all* their parameters, so they work on flat vectors: the concatenation of the
parameters in the order the optimizer holds them (the order the curvature operator
uses too).  This module gathers and scatters those vectors, evaluates closures,
builds the curvature operator over exactly the optimizer's parameters, and checks
the constructor arguments both optimizers share.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import curvature as _curvature
from curvature import LinearOperator

__all__ = [
    "CURVATURES",
    "check_params",
    "gather_flat",
    "gather_flat_grad",
    "set_flat_",
    "set_flat_grad_",
    "evaluate_closure",
    "default_closure",
    "resolve_closure",
    "build_curvature",
    "check_positive",
    "check_nonnegative",
    "check_int_at_least",
]

#: Names accepted for ``curvature=`` and the operator class each one builds.
CURVATURES = {"ggn": "GGNOperator", "hessian": "HessianOperator", "fisher": "FisherOperator"}


# ------------------------------------------------------------------ validation
def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number > 0).")


def check_nonnegative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number >= 0).")


def check_int_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r} (must be an integer >= {low}).")


def check_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of the (single) param group, checked for a joint flat step.

    Raises:
        ValueError: more than one param group (the step is joint, as in LBFGS), a
            parameter that does not require grad, or parameters that disagree on
            dtype or device.
    """
    name = type(optimizer).__name__
    if len(optimizer.param_groups) != 1:
        raise ValueError(
            f"{name} doesn't support per-parameter options (parameter groups): its step "
            "solves one linear system over all parameters jointly. Pass a single list of "
            "parameters (it may hold any number of tensors)."
        )
    params = optimizer.param_groups[0]["params"]
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(
                f"{name}: parameter {i} (shape {tuple(p.shape)}) does not require grad; pass "
                "only trainable parameters, e.g. [p for p in model.parameters() if p.requires_grad]."
            )
        if not p.is_floating_point():
            raise ValueError(f"{name}: parameter {i} has non-floating dtype {p.dtype}.")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"{name} needs all parameters on one device in one dtype (it solves one flat "
            f"linear system); got dtypes {sorted(map(str, dtypes))} and devices "
            f"{sorted(map(str, devices))}."
        )
    return params


# ---------------------------------------------------------------- flat vectors
def gather_flat(params: Sequence[Tensor]) -> Tensor:
    """The parameters as one detached flat vector ``[n]`` (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def gather_flat_grad(params: Sequence[Tensor], name: str | None = None) -> Tensor:
    """The ``.grad`` fields as one flat vector ``[n]``; a missing grad counts as zero.

    With ``name`` given, a closure that left *every* ``.grad`` empty is an error (it
    forgot ``loss.backward()``).
    """
    if name is not None and all(p.grad is None for p in params):
        raise RuntimeError(
            f"{name}: after the closure no parameter has a .grad; the closure must call "
            "loss.backward() (or use step(batch=(X, y)) with model= and loss_fn=)."
        )
    return torch.cat(
        [torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.detach().reshape(-1) for p in params]
    )


def set_flat_(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy the flat vector ``flat`` ``[n]`` into the parameters, in place."""
    offset = 0
    with torch.no_grad():
        for p in params:
            k = p.numel()
            p.copy_(flat[offset : offset + k].view_as(p))
            offset += k


def set_flat_grad_(params: Sequence[Tensor], flat: Tensor) -> None:
    """Write the flat vector ``flat`` ``[n]`` into the parameters' ``.grad`` fields."""
    offset = 0
    for p in params:
        k = p.numel()
        value = flat[offset : offset + k].view_as(p)
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)
        offset += k


# -------------------------------------------------------------------- closures
def evaluate_closure(closure: Callable[[], Any], name: str) -> tuple[Any, float]:
    """Call ``closure()`` with grad enabled; return ``(loss as returned, float(loss))``."""
    with torch.enable_grad():
        loss = closure()
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"{name}: the closure must return a scalar loss, got a tensor of shape "
                f"{tuple(loss.shape)} (reduce it with .mean() or .sum())."
            )
        value = float(loss.detach().reshape(()))
    elif isinstance(loss, (int, float)):
        value = float(loss)
    else:
        raise TypeError(
            f"{name}: the closure must return the loss (a scalar tensor or a float), got "
            f"{type(loss).__name__}."
        )
    return loss, value


def default_closure(optimizer, model, loss_fn, batch) -> Callable[[], Tensor]:
    """The closure used when ``step(batch=...)`` is called without one.

    It zeroes the gradients, evaluates ``loss_fn(model(X), y)`` (any batch format of
    :class:`curvature.BatchAdapter`: pairs, dicts with ``labels``, ...) and backpropagates.
    """
    check_batch(batch, type(optimizer).__name__)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = batch_loss(model, loss_fn, batch)
        loss.backward()
        return loss

    return closure


def resolve_closure(optimizer, closure, batch, model, loss_fn) -> tuple[Callable[[], Any], bool]:
    """``(closure, own)``: the user's closure, or the default one built from the batch (``own``)."""
    if closure is not None:
        return closure, False
    name = type(optimizer).__name__
    if batch is None:
        raise ValueError(f"{name}.step needs a closure or a batch: call step(closure) or step(batch=(X, y)).")
    if model is None or loss_fn is None:
        raise ValueError(f"{name}.step(batch=...) without a closure needs model= and loss_fn= in the constructor.")
    return default_closure(optimizer, model, loss_fn, batch), True


def start_step(optimizer, closure, batch, model, loss_fn):
    """The opening shared by the curvature optimizers' ``step``.

    Resolves the closure, evaluates it and gathers the flat gradient.

    Returns:
        ``(closure, own_closure, loss, f0, g)``: the closure used, whether it is the
        default one built from ``batch``, the loss as the closure returned it, its float
        value and the flat gradient ``[n]``.

    Raises:
        FloatingPointError: the loss or its gradient is not finite (nothing is changed).
    """
    name = type(optimizer).__name__
    params = check_params(optimizer)
    closure, own = resolve_closure(optimizer, closure, batch, model, loss_fn)
    loss, f0 = evaluate_closure(closure, name)
    g = gather_flat_grad(params, name if math.isfinite(f0) else None)
    if not math.isfinite(f0) or not bool(torch.isfinite(g).all()):
        raise FloatingPointError(
            f"{name}: the loss ({f0}) or its gradient at the current parameters is not finite; "
            "no step was taken."
        )
    return closure, own, loss, f0, g


def loss_only(model, loss_fn, batch, name: str) -> float:
    """``loss_fn(model(X), y)`` without building a graph (trial-point evaluations)."""
    check_batch(batch, name)
    with torch.no_grad():
        loss = batch_loss(model, loss_fn, batch)
    return float(loss.reshape(()))


def batch_loss(model, loss_fn, batch) -> Tensor:
    """``loss_fn(prediction, target)`` of one batch, read by the default :class:`curvature.BatchAdapter`."""
    adapter = _curvature.BatchAdapter()
    inputs, y = adapter.split(batch)
    return loss_fn(adapter.prediction(inputs.call(model)), y)


def check_batch(batch, name: str) -> None:
    """Refuse what :class:`curvature.BatchAdapter` cannot read: not a Mapping nor a tuple/list of >= 2 entries."""
    if isinstance(batch, Mapping):
        return
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"{name}: batch must be a pair (X, y) of model inputs and targets (or a dict with 'labels'), got "
            f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}."
        )


def _split_batch(batch, name: str):
    """``(X, y)`` of a batch that must be a plain pair (per-example paths that vmap over ``X``)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"{name}: batch must be a pair (X, y) of model inputs and targets, got "
            f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}."
        )
    return batch[0], batch[1]


# ------------------------------------------------------------------- curvature
def check_curvature_spec(curvature, model, loss_fn, name: str) -> None:
    """Validate ``curvature=`` at construction time."""
    if isinstance(curvature, str):
        if curvature not in CURVATURES:
            raise ValueError(
                f"{name}: unknown curvature {curvature!r}; use one of {sorted(CURVATURES)} or a "
                "callable factory(params, batch) -> LinearOperator."
            )
        if model is None or loss_fn is None:
            raise ValueError(
                f"{name}: curvature={curvature!r} needs the model and the loss: pass "
                "model=... and loss_fn=... (or give a callable curvature factory)."
            )
    elif not callable(curvature):
        raise TypeError(
            f"{name}: curvature must be one of {sorted(CURVATURES)} or a callable "
            f"factory(params, batch) -> LinearOperator, got {type(curvature).__name__}."
        )


def build_curvature(
    curvature,
    params: list[Tensor],
    batch,
    *,
    model,
    loss_fn,
    curvature_kwargs: dict | None,
    seed: int,
    name: str,
) -> LinearOperator:
    """The curvature operator at the current parameters, over exactly ``params``.

    A string builds ``curvature.GGNOperator`` / ``HessianOperator`` / ``FisherOperator``
    on ``(model, loss_fn, batch, params=params, **curvature_kwargs)``; the Fisher gets
    ``seed=seed`` unless ``curvature_kwargs`` sets a seed or generator.  A callable is called as
    ``curvature(params, batch)``.  The result is checked to be a symmetric
    ``LinearOperator`` of shape ``(n, n)`` in the parameters' dtype.
    """
    n = sum(p.numel() for p in params)
    kwargs = dict(curvature_kwargs or {})
    if isinstance(curvature, str):
        if batch is None:
            raise ValueError(
                f"{name}: curvature={curvature!r} needs the batch: call step(closure, batch=(X, y))."
            )
        cls = getattr(_curvature, CURVATURES[curvature], None)
        if cls is None:  # pragma: no cover - only while the operator is being written
            raise ImportError(f"curvature.{CURVATURES[curvature]} is not available in this installation.")
        if curvature == "fisher" and "seed" not in kwargs and "generator" not in kwargs:
            kwargs["seed"] = seed
        op = cls(model, loss_fn, batch if isinstance(batch, dict) else tuple(batch), params=params, **kwargs)
    else:
        op = curvature(params, batch)
    if not isinstance(op, LinearOperator):
        raise TypeError(
            f"{name}: the curvature factory must return a curvature.LinearOperator, got "
            f"{type(op).__name__}."
        )
    if tuple(op.shape) != (n, n):
        raise ValueError(
            f"{name}: the curvature operator has shape {tuple(op.shape)} but the optimizer "
            f"holds {n} parameter entries; it must act on exactly the optimizer's parameters "
            "(build it with params=<the optimizer's parameters>)."
        )
    if not op.is_symmetric:
        raise ValueError(f"{name}: the curvature operator must be symmetric (is_symmetric=True).")
    if op.dtype != params[0].dtype:
        raise TypeError(
            f"{name}: the curvature operator works in {op.dtype} but the parameters are "
            f"{params[0].dtype}."
        )
    return op
