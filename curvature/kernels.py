"""Kernel selection for derivatives: one context around every forward that will be differentiated.

PyTorch picks kernels for speed, and several fast kernels lack the derivatives a
curvature product needs (measured in torch 2.13, float64, against finite differences):

* ``F.scaled_dot_product_attention``'s flash / memory-efficient back ends (used by
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` too) have no double
  backward and no forward-mode derivative; the math back end is exact.
* ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast paths
  (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``) run whenever no
  input requires grad -- which is the case under forward-mode AD -- and have no
  forward-mode derivative.
* The fused ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm`` and the old
  ``nn.utils.weight_norm``): its double backward is wrong (18% off finite differences
  on a Linear-Tanh-Linear net) and it has no forward-mode derivative; the unfused
  ``v * (g / norm_except_dim(v, 2, dim))`` is exact in both.
* ``hardsigmoid``: no derivative of ``hardsigmoid_backward`` (neither double backward
  nor forward-over-reverse); ``relu6(x + 3) / 6`` is the same function (bit for bit,
  with the same zero pattern of the derivative at the kinks; its slope is exactly 1/6,
  where ``hardsigmoid_backward`` uses float32's 1/6 even in float64) and twice
  differentiable.

:func:`derivative_kernels` selects, for its body only, the math attention back end,
the non-fused attention paths and (only for models containing weight-norm or
``nn.Hardsigmoid`` modules, so other models pay nothing) the unfused formulations; it
restores every setting on exit, also when the body raises.  The operators enter it
around each per-batch forward they differentiate, so a user never rewrites a model.

Ops without the needed derivative anywhere in PyTorch (found: ``embedding_bag``,
``cdist``, ``ctc_loss`` have neither; ``grid_sample``, ``conv_tbc``, ``index_reduce``,
``huber_loss``'s backward lack forward mode) cannot be routed around here:
:func:`derivative_errors` turns autograd's raw "derivative for ... is not implemented"
into a :class:`MissingDerivativeError` naming the op and the alternatives.

Example:
    >>> from curvature.kernels import derivative_kernels
    >>> with derivative_kernels(model):             # standalone, around your own code
    ...     loss = loss_fn(model(X), y)
    ...     g = torch.autograd.grad(loss, params, create_graph=True)
    >>> hv = torch.autograd.grad(g, params, grad_outputs=v)   # exact, attention included
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = [
    "derivative_kernels",
    "derivative_errors",
    "MissingDerivativeError",
    "rewritten_modules",
    "forward_mode_problems",
    "forward_mode_verified",
    "refuse_once_differentiable",
]

_NEEDS = ("first", "second", "forward")


def _needs(needs) -> frozenset[str]:
    """Normalise ``needs`` (a name, ``"all"`` or an iterable of names) to a set."""
    if needs == "all":
        return frozenset(("second", "forward"))
    names = (needs,) if isinstance(needs, str) else tuple(needs)
    unknown = [n for n in names if n not in _NEEDS]
    if unknown or not names:
        raise ValueError(f"needs must be 'all' or some of {_NEEDS}, got {needs!r}.")
    return frozenset(names) - {"first"}


# -------------------------------------------------------------- unfused formulations
def _unfused_weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` as composite ops: exact double backward and forward mode."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _hardsigmoid_relu6(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid`` as ``relu6(x + 3) / 6`` (same values, twice differentiable)."""
    out = F.relu6(input + 3.0) / 6.0
    return input.copy_(out) if inplace else out


_REWRITES = {torch._weight_norm: _unfused_weight_norm, F.hardsigmoid: _hardsigmoid_relu6}


class _TwiceDifferentiableOps(TorchFunctionMode):
    """Replaces the ops of ``_REWRITES`` by their unfused formulations (thread-local, scoped)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return _REWRITES.get(func, func)(*args, **kwargs)


def rewritten_modules(model: nn.Module | None) -> list[str]:
    """Names of the modules of ``model`` whose forward :func:`derivative_kernels` rewrites.

    Weight-norm parametrizations (``nn.utils.parametrizations.weight_norm``), old-style
    weight-norm hooks (``nn.utils.weight_norm``) and ``nn.Hardsigmoid``.  A
    ``F.hardsigmoid`` called in a custom ``forward`` is not seen (an ``nn.Module`` scan
    cannot see functional calls): it fails with a :class:`MissingDerivativeError` that
    says so.  Cost: one pass over ``model.modules()``.
    """
    if model is None:
        return []
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Hardsigmoid):
            found.append(name)
        elif any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            found.append(name)
        elif parametrize.is_parametrized(m) and any(
                isinstance(p, _WeightNorm) for plist in m.parametrizations.values() for p in plist):
            found.append(name)
    return found


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def derivative_kernels(model: nn.Module | None = None, needs: str | Iterable[str] = "all") -> Iterator[None]:
    """Select, for the body only, kernels that have the derivatives ``needs`` names.

    Args:
        model: the model whose forward runs in the body (scanned for modules that need
            an unfused formulation, see :func:`rewritten_modules`); ``None``: attention
            settings only.
        needs: ``"second"`` (double backward: Hessian products, the GGN's double-vjp
            ``J v``), ``"forward"`` (forward-mode AD: ``jvp``, ``jvp(grad)``),
            ``"first"`` (a plain gradient: nothing changes), a list of these, or
            ``"all"`` (default: second and forward).

    Inside (unless only ``"first"`` is needed): ``scaled_dot_product_attention`` uses
    the math back end only (``sdpa_kernel(SDPBackend.MATH)``), the
    ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` fast paths are off
    (``torch.backends.mha.set_fastpath_enabled(False)``), and, if ``model`` has such
    modules, ``torch._weight_norm`` and ``F.hardsigmoid`` run as twice-differentiable
    composite ops (a thread-local ``TorchFunctionMode``, active only then: other models
    pay nothing).  On exit every setting is what it was, also when the body raises.
    The attention settings are process-global flags of PyTorch (as with
    ``sdpa_kernel`` itself): another thread running attention meanwhile sees them too.

    Costs: math attention materialises the ``[L, S]`` attention matrix (memory
    ``O(L S)`` per head instead of ``O(L)``) and is slower than the fused kernels;
    see benchmarks/results_attention.md for the measured ratio.

    Example:
        >>> with derivative_kernels(model, needs="second"):
        ...     g = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
    """
    wanted = _needs(needs)
    if not wanted:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(_mha_fastpath(False))
        if rewritten_modules(model):
            stack.enter_context(_TwiceDifferentiableOps())
        yield


# ------------------------------------------------------------------ forward-mode AD
# Module types whose forward is verified exact under forward-mode AD in this torch
# (tests/test_kernels.py checks every entry against the reverse-mode J v, float64).
# Exact types only: a subclass may override forward.
_FORWARD_VERIFIED = frozenset({
    nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid,
    nn.Softmax, nn.LogSoftmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.Dropout, nn.Embedding,
})


def forward_mode_problems(model: nn.Module, mode: str = "eval") -> list[str]:
    """Reasons forward-mode AD is known to give a wrong number or to fail on ``model`` (empty: none known).

    Known in torch 2.13: ``nn.Embedding(padding_idx=...)`` (forward mode does not mask
    the padding row: the GGN is 5-12% off and asymmetric) and ``mode="train"`` with
    BatchNorm (running-statistics updates are in-place writes under a grad transform).
    """
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "padding_idx", None) is not None:
            problems.append(f"{name or 'model'}: {type(m).__name__}(padding_idx={m.padding_idx}) (forward-mode AD "
                            "does not mask the padding row: wrong numbers)")
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "scale_grad_by_freq", False):
            problems.append(f"{name or 'model'}: {type(m).__name__}(scale_grad_by_freq=True) (its backward rescales "
                            "by token counts, forward mode does not: the two disagree)")
        if mode == "train" and isinstance(m, nn.modules.batchnorm._NormBase):
            problems.append(f"{name or 'model'}: {type(m).__name__} in mode='train' updates its buffers in place")
    return problems


def forward_mode_verified(model: nn.Module, mode: str = "eval") -> bool:
    """Whether every module of ``model`` is of a type verified exact under forward-mode AD.

    ``True`` only if the model itself and every submodule have an exact type in the
    verified list (standard layers, activations, pooling, norms; ``nn.Sequential`` as
    the only container: a custom ``forward`` may call anything), no forward hooks, no
    :func:`forward_mode_problems`, and BatchNorm only in eval mode with running
    statistics.  The GGN's ``jvp="auto"`` uses forward mode only then.
    """
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    for m in model.modules():
        if type(m) not in _FORWARD_VERIFIED or m._forward_hooks or m._forward_pre_hooks:
            return False
        if isinstance(m, nn.modules.batchnorm._NormBase) and (mode != "eval" or m.running_mean is None):
            return False
        if isinstance(m, nn.Dropout) and mode != "eval":
            return False
    return not forward_mode_problems(model, mode)


# ------------------------------------------------------------------ error translation
class MissingDerivativeError(NotImplementedError):
    """PyTorch lacks a derivative the requested product needs; the message names the op.

    Attributes:
        op: the op PyTorch names (e.g. ``"_embedding_bag_backward"``).
        kind: ``"second"`` (no double backward) or ``"forward"`` (no forward-mode AD).
    """

    def __init__(self, message: str, op: str, kind: str) -> None:
        super().__init__(message)
        self.op = op
        self.kind = kind


_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx, *g: g).__code__


def refuse_once_differentiable(output: Tensor) -> None:
    """Raise :class:`MissingDerivativeError` if ``output``'s graph holds a once-differentiable Function.

    A custom ``torch.autograd.Function`` whose ``backward`` is decorated with
    ``@torch.autograd.function.once_differentiable`` computes its backward without a graph.
    Measured in torch 2.13: a double backward through such a node raises *nothing*, it
    silently drops every second derivative that passes through it (a Hessian 68% off on a
    small net).  This walks the autograd graph of ``output`` once (Python, O(nodes)) and names
    the Function.  Cost: one graph traversal; call it on the first build of a state only.
    """
    if not isinstance(output, Tensor) or output.grad_fn is None:
        return
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        backward = getattr(cls, "backward", None) if cls is not None else None
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
            name = cls.__qualname__
            raise MissingDerivativeError(
                f"The model's forward uses {name}, a custom autograd Function whose backward is marked "
                "@once_differentiable: PyTorch would silently drop the second derivatives through it (no "
                "error, a wrong Hessian / GGN). Give it a twice-differentiable backward (or a jvp for "
                "forward mode), or use "
                "curvature.FiniteDifferenceHessianOperator, which needs first derivatives only.",
                op=name, kind="second",
            )
        stack.extend(f for f, _ in node.next_functions)


_PATTERNS = (
    (re.compile(r"derivative for (?:aten::)?'?([\w.]+)'? is not implemented"), "second"),
    (re.compile(r"Trying to use forward AD with (?:aten::)?([\w.]+) that does not support it"), "forward"),
)

_HINTS = {
    "hardsigmoid": "nn.Hardsigmoid modules are rewritten automatically, but F.hardsigmoid called in a custom "
                   "forward is not seen: use an nn.Hardsigmoid module or write it as F.relu6(x + 3) / 6.",
    "_weight_norm": "weight norm applied outside nn.utils.parametrizations.weight_norm / nn.utils.weight_norm is "
                    "not seen: write it as v * (g / torch.norm_except_dim(v, 2, dim)).",
    "scaled_dot_product": "a fused attention kernel ran outside curvature.kernels.derivative_kernels "
                          "(e.g. a forward computed by your own code): wrap it in derivative_kernels(model).",
    "_transformer_encoder_layer_fwd": "the nn.TransformerEncoderLayer fast path ran outside "
                                      "curvature.kernels.derivative_kernels: wrap the forward in it.",
    "_native_multi_head_attention": "the nn.MultiheadAttention fast path ran outside "
                                    "curvature.kernels.derivative_kernels: wrap the forward in it.",
}


def _missing_op(message: str) -> tuple[str, str] | None:
    for pattern, kind in _PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1), kind
    return None


def _missing_derivative_error(exc: BaseException, what: str) -> MissingDerivativeError | None:
    """The :class:`MissingDerivativeError` for autograd's ``exc``, or ``None`` if it is another error."""
    found = _missing_op(str(exc))
    if found is None:
        return None
    op, kind = found
    lacks = "double backward (second derivative)" if kind == "second" else "forward-mode derivative"
    hint = next((h for key, h in _HINTS.items() if key in op), None)
    if kind == "second":
        alternatives = ("GGNOperator / FisherOperator with jvp='forward' (forward-mode J v, first derivatives "
                        "of the backward not needed), or curvature.FiniteDifferenceHessianOperator "
                        "(first derivatives only)")
    else:
        alternatives = ("the reverse-mode path (GGNOperator(..., jvp='reverse'), "
                        "HessianOperator(..., product='double_backward'))")
    message = (f"PyTorch has no {lacks} for the op {op!r}, which this model uses, so {what} cannot be "
                 f"computed exactly. {hint + ' ' if hint else ''}Alternatives: {alternatives}; or replace the op "
                 "by a twice-differentiable formulation.")
    return MissingDerivativeError(message, op, kind)


@contextlib.contextmanager
def derivative_errors(what: str) -> Iterator[None]:
    """Re-raise autograd's missing-derivative errors in the body as :class:`MissingDerivativeError`.

    Args:
        what: the computation, for the message (e.g. ``"the Hessian product (double backward)"``).

    Other exceptions pass unchanged.
    """
    try:
        yield
    except MissingDerivativeError:
        raise
    except RuntimeError as exc:  # NotImplementedError is a RuntimeError too
        err = _missing_derivative_error(exc, what)
        if err is None:
            raise
        raise err from exc
