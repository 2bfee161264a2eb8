"""What each loss function means to curvature: mean denominators, output Hessians, samplers.

One table, :data:`LOSS_TABLE`, holds per loss class everything the operators need:

* **the mean's denominator** ``D``: with ``reduction="mean"`` PyTorch returns
  ``(sum of the per-entry losses) / D`` for one batch; a batch ``b`` of a data set
  then gets weight ``D_b / sum_b D_b`` so that a mean over batches equals the mean on
  the concatenated data (``curvature._empirical_risk.BatchLoop``).  ``D`` is computed
  from the targets ``y`` alone (the loop never runs the model for it):

  ================================================  =============================================
  loss                                              ``D`` (``reduction="mean"``)
  ================================================  =============================================
  ``CrossEntropyLoss`` / ``NLLLoss`` /               class indices: ``sum`` of ``weight[y]`` over
  ``LinearCrossEntropyLoss``                        targets ``!= ignore_index`` (their number
                                                    without ``weight``; label smoothing does not
                                                    change it); probability targets ``[B, C, ...]``:
                                                    ``y.numel() / C``
  :class:`TokenCrossEntropyLoss`                    number of targets ``!= ignore_index`` (after
                                                    the shift)
  ``KLDivLoss``                                     ``"batchmean"``: ``y.shape[0]``; ``"mean"``:
                                                    ``y.numel()``
  ``MultiLabelSoftMarginLoss``,                     ``y.numel() / y.shape[1]`` (the batch size)
  ``MultiLabelMarginLoss``
  MSE, L1, SmoothL1, Huber, BCE, BCEWithLogits,     ``y.numel()`` (elementwise losses: the target
  SoftMargin, HingeEmbedding, PoissonNLL,           has the output's shape; weights and
  MultiMargin                                       ``pos_weight`` do not change ``D``)
  ================================================  =============================================

  ``GaussianNLLLoss``, ``CosineEmbeddingLoss``, ``MarginRankingLoss``, the triplet
  losses and ``CTCLoss`` cannot be called as ``loss_fn(output, target)`` (CTC's mean,
  a mean of per-sequence losses divided by target lengths, is also not ``sum / D``).
* **closed forms** of the output Hessian ``Lambda`` (the Hessian of the batch loss, as
  the loss returns it, w.r.t. the model output ``z``), of the MC-Fisher label sampler and
  of a factor ``Lambda = S S^T``, for three families (``c`` = ``1 / D`` or ``1`` for "sum"):

  ============================  ==================================  ===========================
  loss                          ``Lambda`` per position             MC sample ``s``, E[s s^T]
  ============================  ==================================  ===========================
  CE on logits (class dim)      ``c r (diag(p) - p p^T)``           ``sqrt(c r) (p - onehot(y~))``
  ``MSELoss`` (no 1/2!)         ``2 c I``                           ``sqrt(2 c) N(0, I)``
  BCE with logits               ``c diag(s (1 - s))``               ``sqrt(c) (s - Bernoulli(s))``
  ============================  ==================================  ===========================

  ``r`` is the weight a position has in the cross-entropy at its data target: with
  targets ``q`` (one-hot or probabilities, after label smoothing ``q (1 - eps) + eps / C``)
  and class weights ``w``, the loss of a position is ``-sum_c w_c q_c log p_c``, whose
  Hessian in the logits is ``(sum_c w_c q_c) (diag p - p p^T)``; so ``r = sum_c w_c q_c``:
  ``1`` for a counted one-hot target (also with label smoothing, no weights),
  ``w_y (1 - eps) + eps mean(w)`` with class weights, ``0`` for an ignored target, and the
  target mass ``sum_c q_c`` for probability targets (an all-zero padding row gives ``0``).

Closed forms (and the table's denominator) are used **only for the exact class or a
subclass that keeps the class's** ``forward`` (no instance ``forward``, no forward
hooks): a focal loss subclassing ``CrossEntropyLoss`` gets autograd output Hessians, no
MC/exact Fisher, and no mean over several batches unless the operator is given
``denominator=``.  Such losses, and any loss module whose class is not in the table,
raise :class:`MeanDenominatorError` over several batches with ``reduction="mean"``.
The GGN's :func:`output_hessian` also gives the function ``F.cross_entropy`` itself the
closed form of its defaults (``nn.CrossEntropyLoss()``).  A
plain function (no ``reduction`` attribute) keeps its documented meaning: the user
passes ``reduction="mean"`` to the operator meaning *the mean over examples*
(``D = batch size``) or ``"sum"``.

Output-curvature objects (``matmat(V)`` for ``V`` of shape ``[k, *z.shape]``):
:class:`ClosedFormOutputHessian`, :class:`AutogradOutputHessian` (double backward on the
output, any scalar loss), :class:`LowRankOutputCurvature` (``sum_m s_m s_m^T`` per example
or per position: the MC and empirical Fishers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TokenCrossEntropyLoss",
    "MeanDenominatorError",
    "LossSpec",
    "LOSS_TABLE",
    "SUPPORTED_LOSSES",
    "loss_spec",
    "loss_reduction",
    "reduction_factor",
    "mean_denominator",
    "knows_mean_denominator",
    "position_dim",
    "has_closed_form",
    "fisher_refusal",
    "output_hessian",
    "ClosedFormOutputHessian",
    "AutogradOutputHessian",
    "LowRankOutputCurvature",
    "sample_output_gradients",
    "output_gradient_factors",
    "output_hessian_sqrt",
]


class MeanDenominatorError(ValueError):
    """The loss's ``reduction="mean"`` denominator is unknown, so batches cannot be combined."""


# ----------------------------------------------------------------------- token-level CE
class TokenCrossEntropyLoss(nn.Module):
    """Cross-entropy over tokens: logits ``[B, T, V]`` (class dim LAST), targets ``[B, T]``.

    ``loss = sum over counted tokens of -log softmax(logits)[target]`` divided, for
    ``reduction="mean"``, by the number of counted tokens (targets ``!= ignore_index``),
    exactly as ``F.cross_entropy`` on the flattened tokens.  ``shift=True`` is the
    causal-LM convention of Hugging Face: the logits at position ``t`` predict the target
    at ``t + 1`` (the last position's logits and the first target are unused), so
    ``labels`` can be the input ids themselves.

    Args:
        ignore_index: target value that is not counted (default ``-100``, padding).
        reduction: ``"mean"`` (over counted tokens), ``"sum"`` or ``"none"`` (per token,
            shape ``[B, T]``, ``[B, T - 1]`` with ``shift``).
        label_smoothing: as for ``nn.CrossEntropyLoss``.
        shift: predict the next token (default ``False``).

    Every operator of the package knows this loss: closed-form output Hessian, MC /
    exact / empirical Fisher, and the token-count denominator across batches.

    Example:
        >>> import torch
        >>> from curvature import TokenCrossEntropyLoss
        >>> logits = torch.randn(2, 5, 11)
        >>> labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
        >>> loss = TokenCrossEntropyLoss(shift=True)(logits, labels)  # mean over 6 tokens
        >>> bool(torch.isclose(loss, torch.nn.functional.cross_entropy(
        ...     logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))))
        True
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 shift: bool = False) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.shift = bool(shift)

    def aligned(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, target)`` of the scored positions (after the shift), shapes checked."""
        if target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(f"TokenCrossEntropyLoss needs integer class targets, got {target.dtype}.")
        if logits.dim() != target.dim() + 1 or logits.shape[:-1] != target.shape or target.dim() < 1:
            raise ValueError(
                "TokenCrossEntropyLoss expects logits [B, T, V] (class dim last) and targets [B, T]; got "
                f"logits {tuple(logits.shape)} and targets {tuple(target.shape)}."
            )
        if self.shift:
            return logits[..., :-1, :], target[..., 1:]
        return logits, target

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        z, t = self.aligned(logits, target)
        out = F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1), ignore_index=self.ignore_index,
                              reduction=self.reduction, label_smoothing=self.label_smoothing)
        return out.reshape(t.shape) if self.reduction == "none" else out

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, shift={self.shift}")


# ------------------------------------------------------------------ mean denominators
def _ignore_index(loss_fn) -> int:
    idx = getattr(loss_fn, "ignore_index", -100)
    return -100 if idx is None else int(idx)


def _class_index_denominator(loss_fn, y: Tensor) -> float:
    """Targets ``!= ignore_index``, each counted with its class weight when ``weight`` is set."""
    mask = y != _ignore_index(loss_fn)
    weight = getattr(loss_fn, "weight", None)
    if weight is None:
        return float(mask.sum())
    return float(weight.to(y.device)[y[mask]].sum(dtype=torch.float64))


def _per_row(y: Tensor) -> float:
    """``y.numel() / y.shape[1]``: positions of a ``[B, C, ...]`` tensor (1 for unbatched ``[C]``)."""
    return float(y.numel() // y.shape[1]) if y.dim() >= 2 else 1.0


def _cross_entropy_denominator(loss_fn, y: Tensor) -> float:
    return _per_row(y) if y.is_floating_point() else _class_index_denominator(loss_fn, y)


def _token_denominator(loss_fn, y: Tensor) -> float:
    y = y[..., 1:] if loss_fn.shift else y
    return float((y != loss_fn.ignore_index).sum())


def _kl_denominator(loss_fn, y: Tensor) -> float:
    if loss_fn.reduction == "batchmean":
        return float(y.shape[0]) if y.dim() > 0 else 1.0
    return float(y.numel())


def _linear_cross_entropy_denominator(loss_fn, y: Tensor) -> float:
    if y.is_floating_point():
        raise MeanDenominatorError("LinearCrossEntropyLoss with probability targets: its mean denominator is "
                                   "not in the table; pass the operator denominator= or use reduction='sum'.")
    return _class_index_denominator(loss_fn, y)


def _numel(loss_fn, y: Tensor) -> float:
    return float(y.numel())


# ------------------------------------------------------------- closed-form families
def _cross_entropy_rows(loss_fn, z: Tensor, y: Tensor | None) -> tuple[int, Tensor, Tensor]:
    """``(class dim d, softmax p, row weight r)`` with ``r`` shaped like ``z`` but size 1 along ``d``.

    ``r`` = ``sum_c w_c q_c`` (see the module docstring); ``y=None`` counts every scored
    position with weight 1 (no ignored targets).
    """
    if isinstance(loss_fn, TokenCrossEntropyLoss):
        d = z.dim() - 1
        if y is None:
            r = torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)
            if loss_fn.shift:
                r[..., -1] = 0.0
        else:
            loss_fn.aligned(z, y)  # shape check
            counted = (y != loss_fn.ignore_index).to(z.dtype)
            # with the shift, position t is scored against target t + 1 and the last position is unused
            r = torch.cat([counted[..., 1:], torch.zeros_like(counted[..., :1])], dim=-1) if loss_fn.shift \
                else counted
        return d, torch.softmax(z, dim=d), r.unsqueeze(d)
    d = 1 if z.dim() >= 2 else 0
    C = z.shape[d]
    eps = float(getattr(loss_fn, "label_smoothing", 0.0))
    weight = getattr(loss_fn, "weight", None)
    w = None if weight is None else weight.to(device=z.device, dtype=z.dtype)
    if y is None:
        if w is not None:
            raise ValueError("The cross-entropy curvature with class weights needs the targets y.")
        shape = list(z.shape)
        shape[d] = 1
        r = torch.ones(shape, dtype=z.dtype, device=z.device)
    elif y.is_floating_point():  # probability targets, z's shape
        if y.shape != z.shape:
            raise ValueError(f"Probability targets must have the logits' shape {tuple(z.shape)}, got "
                             f"{tuple(y.shape)}.")
        q = y.to(z.dtype) * (1 - eps) + eps / C
        if w is not None:
            wshape = [1] * z.dim()
            wshape[d] = C
            q = q * w.reshape(wshape)
        r = q.sum(dim=d, keepdim=True)
    elif w is None:  # (1 - eps) * 1 + eps * 1 = 1 for every counted target
        r = (y != _ignore_index(loss_fn)).to(z.dtype).unsqueeze(d)
    else:
        mask = y != _ignore_index(loss_fn)
        w_y = w[torch.where(mask, y, torch.zeros_like(y))]
        r = (mask.to(z.dtype) * ((1 - eps) * w_y + eps * w.mean())).unsqueeze(d)
    return d, torch.softmax(z, dim=d), r


class _CrossEntropyFamily:
    """Softmax cross-entropy on logits: ``Lambda = c r (diag p - p p^T)`` per position."""

    name = "cross-entropy"

    @staticmethod
    def hessian_refusal(loss_fn) -> str | None:
        return None

    @staticmethod
    def fisher_refusal(loss_fn, y: Tensor | None) -> str | None:
        if getattr(loss_fn, "weight", None) is not None:
            return ("class weights (weight=) make the Fisher of the predictive distribution ambiguous (are "
                    "sampled labels weighted?)")
        if y is not None and y.is_floating_point() and bool((y < 0).any()):
            return "probability targets with negative entries have no Fisher"
        return None


class _MSEFamily:
    name = "squared error"

    @staticmethod
    def hessian_refusal(loss_fn) -> str | None:
        return None

    fisher_refusal = staticmethod(lambda loss_fn, y: None)


class _BCEWithLogitsFamily:
    name = "binary cross-entropy on logits"

    @staticmethod
    def hessian_refusal(loss_fn) -> str | None:
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            return "weight= / pos_weight= (the output Hessian is computed by autograd instead)"
        return None

    @staticmethod
    def fisher_refusal(loss_fn, y) -> str | None:
        return _BCEWithLogitsFamily.hessian_refusal(loss_fn)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LossSpec:
    """What the package knows about one loss class.

    Attributes:
        denominator: ``(loss_fn, y) -> D``, what ``reduction="mean"`` divides the batch
            sum by; ``None`` when the mean is not ``sum / D`` or the loss cannot be
            called as ``loss_fn(output, target)``.
        position_dim: the output dim holding one position's outputs (classes for CE,
            features for elementwise losses): the empirical Fisher's ``"token"``
            outer products and :func:`output_hessian_sqrt` group entries along it.
        family: the closed-form output Hessian / sampler family, or ``None`` (autograd).
        note: why ``denominator`` is ``None`` (used in error messages).
    """

    denominator: Callable[[object, Tensor], float] | None
    position_dim: int = -1
    family: type | None = None
    note: str = ""


_NOT_TWO_ARGS = "its forward takes more than (output, target)"

LOSS_TABLE: dict[type, LossSpec] = {
    nn.CrossEntropyLoss: LossSpec(_cross_entropy_denominator, 1, _CrossEntropyFamily),
    TokenCrossEntropyLoss: LossSpec(_token_denominator, -1, _CrossEntropyFamily),
    nn.NLLLoss: LossSpec(_cross_entropy_denominator, 1),
    nn.MSELoss: LossSpec(_numel, -1, _MSEFamily),
    nn.BCEWithLogitsLoss: LossSpec(_numel, -1, _BCEWithLogitsFamily),
    nn.KLDivLoss: LossSpec(_kl_denominator),
    nn.L1Loss: LossSpec(_numel),
    nn.SmoothL1Loss: LossSpec(_numel),
    nn.HuberLoss: LossSpec(_numel),
    nn.BCELoss: LossSpec(_numel),
    nn.SoftMarginLoss: LossSpec(_numel),
    nn.HingeEmbeddingLoss: LossSpec(_numel),
    nn.PoissonNLLLoss: LossSpec(_numel),
    nn.MultiMarginLoss: LossSpec(_numel),  # target [B]: one term (already / C) per example
    nn.MultiLabelSoftMarginLoss: LossSpec(lambda loss_fn, y: _per_row(y)),
    nn.MultiLabelMarginLoss: LossSpec(lambda loss_fn, y: _per_row(y)),
    nn.GaussianNLLLoss: LossSpec(None, note=_NOT_TWO_ARGS + " (input, target, var)"),
    nn.CosineEmbeddingLoss: LossSpec(None, note=_NOT_TWO_ARGS),
    nn.MarginRankingLoss: LossSpec(None, note=_NOT_TWO_ARGS),
    nn.TripletMarginLoss: LossSpec(None, note=_NOT_TWO_ARGS),
    nn.TripletMarginWithDistanceLoss: LossSpec(None, note=_NOT_TWO_ARGS),
    nn.CTCLoss: LossSpec(None, note="its mean averages per-sequence losses divided by the target lengths, "
                                    "which is not a sum over a count"),
}
if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.13: the input is hidden states, not logits
    LOSS_TABLE[nn.LinearCrossEntropyLoss] = LossSpec(_linear_cross_entropy_denominator, -1)

SUPPORTED_LOSSES = tuple(cls for cls, spec in LOSS_TABLE.items() if spec.family is not None)


def _table_class(loss_fn) -> type | None:
    return next((c for c in type(loss_fn).__mro__ if c in LOSS_TABLE), None)


def loss_spec(loss_fn) -> LossSpec | None:
    """The table entry of ``loss_fn``, or ``None`` when its forward is not a table class's own.

    A subclass gets its base's entry only if it does not override ``forward`` (nor
    ``__call__``), has no instance attribute ``forward`` and no forward (pre-)hooks: a
    focal loss subclassing ``CrossEntropyLoss`` gets ``None``.
    """
    base = _table_class(loss_fn)
    if base is None:
        return None
    cls = type(loss_fn)
    if cls is not base and (cls.forward is not base.forward or cls.__call__ is not base.__call__):
        return None
    if "forward" in vars(loss_fn) or getattr(loss_fn, "_forward_hooks", None) or \
            getattr(loss_fn, "_forward_pre_hooks", None):
        return None
    return LOSS_TABLE[base]


def _describe(loss_fn) -> str:
    base = _table_class(loss_fn)
    name = type(loss_fn).__name__
    if base is not None and loss_spec(loss_fn) is None:
        return f"{name} (its forward is not {base.__name__}'s: a subclass overriding forward, or hooks)"
    return name


def loss_reduction(loss_fn, default: str | None = None) -> str | None:
    """How batch losses combine: ``"mean"``, ``"sum"`` or ``"none"`` (``"batchmean"`` is a mean).

    The ``reduction`` attribute of a loss module (``KLDivLoss``'s ``"batchmean"`` is
    reported as ``"mean"``: a sum divided by a denominator, see :func:`mean_denominator`),
    else ``default``.
    """
    red = getattr(loss_fn, "reduction", None)
    if not isinstance(red, str):
        return default
    return "mean" if red == "batchmean" else red


def _unknown_mean(loss_fn) -> MeanDenominatorError:
    spec = loss_spec(loss_fn)
    why = f": {spec.note}" if spec is not None and spec.note else ""
    return MeanDenominatorError(
        f"Cannot weight batches of {_describe(loss_fn)} with reduction='mean': what its mean divides the "
        f"batch sum by is unknown{why}. Use reduction='sum', pass the data as a single batch, or give the "
        "operator denominator=lambda X, y: <what the mean divides by> (e.g. the number of counted targets)."
    )


def mean_denominator(loss_fn, y: Tensor, batch_size: int) -> float:
    """What ``reduction="mean"`` divides the summed batch loss by (see the module table).

    A plain callable without a ``reduction`` attribute: ``batch_size`` (the documented
    meaning of ``reduction="mean"`` passed to an operator: the mean over examples).

    Raises:
        MeanDenominatorError: a loss module that is not in the table, or whose forward is
            not its table class's own (a subclass overriding ``forward``), or whose mean is
            not ``sum / D`` (CTC) -- the mean over several batches cannot be formed.
    """
    spec = loss_spec(loss_fn)
    if spec is None:
        if loss_reduction(loss_fn) is None:
            return float(batch_size)
        raise _unknown_mean(loss_fn)
    if spec.denominator is None:
        raise _unknown_mean(loss_fn)
    return spec.denominator(loss_fn, y)


def knows_mean_denominator(loss_fn) -> bool:
    """Whether :func:`mean_denominator` can answer for ``loss_fn`` (table entry or plain callable)."""
    spec = loss_spec(loss_fn)
    if spec is None:
        return loss_reduction(loss_fn) is None
    return spec.denominator is not None


def reduction_factor(loss_fn, z: Tensor, reduction: str, y: Tensor | None = None, *,
                     denominator: float | None = None) -> float:
    """The factor ``c`` with ``batch loss = c * (sum of the per-entry losses)``.

    ``1`` for ``reduction="sum"``; for ``"mean"`` ``1 / D``, ``D`` = ``denominator`` when
    given, else :func:`mean_denominator` of the targets ``y``; without ``y``: every
    position counted once (``z.numel() / C`` for cross-entropy, ``z.numel()`` for
    elementwise losses).  ``0`` when ``D = 0`` (every target ignored).
    """
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if denominator is None:
        spec = loss_spec(loss_fn)
        if y is not None:
            denominator = mean_denominator(loss_fn, y, z.shape[0] if z.dim() else 1)
        elif spec is not None and spec.family is _CrossEntropyFamily:
            denominator = float(_cross_entropy_rows(loss_fn, z, None)[2].sum())
        elif spec is not None and spec.family is not None:
            denominator = float(z.numel())
        else:
            raise ValueError(f"reduction_factor of {_describe(loss_fn)} needs the targets y.")
    return 1.0 / denominator if denominator > 0 else 0.0


def position_dim(loss_fn, z: Tensor) -> int:
    """The (non-negative) dim of ``z`` holding one position's outputs (see :class:`LossSpec`).

    Class dim ``1`` for ``CrossEntropyLoss`` / ``NLLLoss`` (``0`` unbatched), the last dim
    for :class:`TokenCrossEntropyLoss`, elementwise losses and losses not in the table
    (as curvlinops flattens outputs); losses not in the table on outputs with more than
    two dims raise ``ValueError`` (the grouping would be a guess).
    """
    spec = loss_spec(loss_fn)
    if spec is None and z.dim() > 2:
        raise ValueError(
            f"Which output dim holds one position's outputs is unknown for {_describe(loss_fn)} on outputs of "
            f"shape {tuple(z.shape)}; use ef_granularity='sequence' or a built-in loss."
        )
    d = -1 if spec is None else spec.position_dim
    if d == 1 and z.dim() < 2:
        return 0
    return d % z.dim()


def _family(loss_fn):
    spec = loss_spec(loss_fn)
    if spec is None or spec.family is None or loss_reduction(loss_fn) not in ("mean", "sum"):
        return None
    return spec.family


def has_closed_form(loss_fn, y: Tensor | None = None) -> bool:
    """Whether ``loss_fn`` has a closed-form output Hessian (exact class, see the module doc).

    Cross-entropy (``nn.CrossEntropyLoss`` with any weights / ``ignore_index`` /
    label smoothing / probability targets, :class:`TokenCrossEntropyLoss`), ``MSELoss``,
    and ``BCEWithLogitsLoss`` without ``weight``/``pos_weight``; reduction "mean"/"sum".
    ``y`` is accepted for backward compatibility and not needed.
    """
    fam = _family(loss_fn)
    return fam is not None and fam.hessian_refusal(loss_fn) is None


def fisher_refusal(loss_fn, y: Tensor | None = None) -> str | None:
    """Why the exact / MC Fisher is not defined for ``loss_fn`` (on ``y``), or ``None``.

    Defined for the closed-form families where the loss is a negative log-likelihood of
    the model's predictive distribution.  Cross-entropy positions are scaled by their
    ``r`` (module docstring): an ignored target or an all-zero probability row
    contributes nothing, a soft target row of mass ``m`` contributes ``m`` times the
    Fisher of its position; with this scaling the exact Fisher equals the GGN.
    Refused: class weights, negative probability targets, BCE ``weight``/``pos_weight``,
    every loss without a closed form (including subclasses overriding ``forward``).
    """
    fam = _family(loss_fn)
    if fam is None:
        return (f"the model's predictive distribution is unknown for {_describe(loss_fn)} (known for "
                "CrossEntropyLoss, TokenCrossEntropyLoss, MSELoss and BCEWithLogitsLoss of exactly those "
                "classes, reduction 'mean' or 'sum')")
    return fam.fisher_refusal(loss_fn, y)


# ------------------------------------------------------------- output curvature objects
class ClosedFormOutputHessian:
    """``Lambda V`` in closed form for CE / token CE / MSE / BCEWithLogits (see the module table).

    Args:
        loss_fn: the loss module (:func:`has_closed_form` must hold).
        z: the model output (detached inside).
        reduction: ``"mean"`` or ``"sum"``.
        y: the targets (needed for ignored targets, class weights, probability targets;
            ``None``: every position counted with weight 1).
    """

    def __init__(self, loss_fn, z: Tensor, reduction: str, y: Tensor | None = None) -> None:
        fam = _family(loss_fn)
        if fam is None or fam.hessian_refusal(loss_fn) is not None:
            raise TypeError(f"No closed-form output Hessian for {_describe(loss_fn)}.")
        z = z.detach()
        self.scale = reduction_factor(loss_fn, z, reduction, y)
        self.kind = fam
        if fam is _CrossEntropyFamily:
            self.dim, self.p, r = _cross_entropy_rows(loss_fn, z, y)
            lo, hi = torch.aminmax(r) if r.numel() else (r.new_ones(()), r.new_ones(()))
            if float(lo) == float(hi):  # one weight for every position (the common case): fold it into c
                self.scale *= float(lo)
                self.row_scale = None
            else:  # c r: one number per position (size 1 along the class dim), never a p-sized copy
                self.row_scale = self.scale * r
        elif fam is _BCEWithLogitsFamily:
            s = torch.sigmoid(z)
            self.d = s * (1 - s)

    def matmat(self, V: Tensor) -> Tensor:
        """``Lambda V`` for ``V`` of shape ``[k, *z.shape]``."""
        if self.kind is _MSEFamily:
            return (2.0 * self.scale) * V
        if self.kind is _BCEWithLogitsFamily:
            return self.scale * self.d * V
        return self._cross_entropy_matmat(V)

    def _cross_entropy_matmat(self, V: Tensor) -> Tensor:
        """``c r (diag p - p p^T) v = c (r p) * (v - <p, v>)`` per position, never a ``[C, C]`` matrix.

        Memory: one tensor of ``V``'s size (the result) plus ``k x positions`` dot products
        (the state is ``p`` and one weight per position); with the class dim last (``[N, C]``
        logits, token logits ``[B, T, V]``) the dots are batched matrix products, otherwise
        one ``V``-sized temporary ``p * V`` is freed before the result is allocated.  Time:
        four passes over ``V``.  Measured at
        ``N x C = 512 x 50,304`` in ``benchmarks/bench_ce_hessian.py`` (BENCHMARKS.md).
        """
        d = self.dim + 1  # the class dim of V
        p = self.p
        V = V.to(torch.promote_types(V.dtype, p.dtype))  # no copy in the common case (same dtype)
        if d == V.dim() - 1 and V.shape[0] > 0:
            pc = p.unsqueeze(-1).to(V.dtype)  # [..., C, 1]
            dots = torch.stack([torch.matmul(V[j].unsqueeze(-2), pc).squeeze(-1) for j in range(V.shape[0])])
        else:
            dots = (p * V).sum(dim=d, keepdim=True)
        out = V - dots
        out.mul_(p)
        if self.row_scale is not None:
            out.mul_(self.row_scale)
        elif self.scale != 1.0:
            out.mul_(self.scale)
        return out


class AutogradOutputHessian:
    """``Lambda V`` by double backward of ``loss_fn(z, y)`` w.r.t. ``z`` (any scalar loss).

    Cost: one gradient w.r.t. the output at construction, one small backward per column.
    """

    def __init__(self, loss_fn, z: Tensor, y: Tensor) -> None:
        self.name = type(loss_fn).__name__
        self.z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(self.z, y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    "The loss must return a scalar (reduction 'mean' or 'sum'), got shape "
                    f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}."
                )
            (self.g,) = torch.autograd.grad(loss.reshape(()), self.z, create_graph=True)
        self.linear = not self.g.requires_grad

    def matmat(self, V: Tensor) -> Tensor:
        if self.linear:
            return torch.zeros_like(V)
        try:
            cols = [
                torch.autograd.grad(self.g, self.z, grad_outputs=V[j], retain_graph=True, allow_unused=True)[0]
                for j in range(V.shape[0])
            ]
        except RuntimeError as err:
            if "derivative for" not in str(err) or "not implemented" not in str(err):
                raise
            from .kernels import MissingDerivativeError

            raise MissingDerivativeError(
                f"{self.name} has no second derivative in PyTorch ({str(err).split(chr(10))[0]}), and the GGN / "
                "Hessian need one. Use FisherOperator(kind='empirical'), or write the loss with ordinary "
                "differentiable torch operations.", op=self.name, kind="second",
            ) from err
        return torch.stack([torch.zeros_like(V[0]) if c is None else c for c in cols])


class LowRankOutputCurvature:
    """``Lambda = sum_m s_m s_m^T`` per example, or per position: ``S`` has shape ``[M, *z.shape]``.

    ``position_dim=None``: one outer product per example (over all of an example's
    outputs, e.g. a whole sequence); ``position_dim=d``: one per position, grouping
    ``z``'s entries along dim ``d`` (classes / features) only.  Any scaling (reduction
    factor, ``1/M``) must already be in ``S``.  Memory ``M k |z|``.
    """

    def __init__(self, S: Tensor, position_dim: int | None = None) -> None:
        self.S = S
        self.position_dim = position_dim

    def matmat(self, V: Tensor) -> Tensor:
        S = self.S
        prod = S.unsqueeze(1) * V.unsqueeze(0)  # [M, k, *z.shape]
        if self.position_dim is None:
            M, k, B = S.shape[0], V.shape[0], V.shape[1]
            coef = prod.reshape(M, k, B, -1).sum(-1).reshape(M, k, B, *((1,) * (S.dim() - 2)))
        else:
            coef = prod.sum(dim=self.position_dim + 2, keepdim=True)
        return (S.unsqueeze(1) * coef).sum(0)


_F_CROSS_ENTROPY = nn.CrossEntropyLoss()  # what F.cross_entropy(z, y) computes with its defaults


def output_hessian(loss_fn, z: Tensor, y: Tensor, reduction: str):
    """The output-curvature object for the GGN: closed form where known, else autograd.

    Closed form for the table's losses (see :func:`has_closed_form`) and for the function
    ``torch.nn.functional.cross_entropy`` itself (its defaults: the mean over targets
    ``!= -100``, class dim 1), whose Hessian is that of ``nn.CrossEntropyLoss()`` whatever
    ``reduction`` the operator uses to combine batches.  Any other callable (a lambda or
    ``functools.partial`` around ``F.cross_entropy`` included) gets autograd.
    """
    if loss_fn is F.cross_entropy:
        return ClosedFormOutputHessian(_F_CROSS_ENTROPY, z, "mean", y)
    if has_closed_form(loss_fn):
        return ClosedFormOutputHessian(loss_fn, z, reduction, y)
    return AutogradOutputHessian(loss_fn, z, y)


def _fisher_check(loss_fn, y) -> None:
    why = fisher_refusal(loss_fn, y)
    if why is not None:
        raise NotImplementedError(
            f"The Monte-Carlo / exact Fisher is not defined here: {why}. Use GGNOperator (autograd output "
            "Hessian) or FisherOperator(kind='empirical') instead."
        )


def sample_output_gradients(loss_fn, z: Tensor, reduction: str, mc_samples: int, generator: torch.Generator,
                            y: Tensor | None = None) -> Tensor:
    """Scaled Monte-Carlo output gradients ``S`` of shape ``[mc_samples, *z.shape]``.

    Each ``s`` is the gradient w.r.t. ``z`` of a position's loss at a label drawn from
    the model's predictive distribution, times ``sqrt(c r / M)`` (cross-entropy row weight
    ``r``, from ``y``; ``y=None`` counts every position once), so that
    ``E[LowRankOutputCurvature(S)] = ClosedFormOutputHessian`` per position (one
    independent label per position and sample).

    Raises:
        NotImplementedError: see :func:`fisher_refusal`.
    """
    _fisher_check(loss_fn, y)
    fam = _family(loss_fn)
    z = z.detach()
    c = reduction_factor(loss_fn, z, reduction, y)
    M = int(mc_samples)
    scale = math.sqrt(c / M)
    if fam is _MSEFamily:
        eps = torch.randn((M, *z.shape), generator=generator, device=z.device, dtype=z.dtype)
        return (scale * math.sqrt(2.0)) * eps
    if fam is _BCEWithLogitsFamily:
        s = torch.sigmoid(z)
        u = torch.rand((M, *z.shape), generator=generator, device=z.device, dtype=z.dtype)
        return scale * (s - (u < s).to(z.dtype))
    dim, p, r = _cross_entropy_rows(loss_fn, z, y)
    C = p.shape[dim]
    moved = p.movedim(dim, -1)
    idx = torch.multinomial(moved.reshape(-1, C), M, replacement=True, generator=generator)  # [rows, M]
    onehot = F.one_hot(idx.T, C).to(z.dtype).reshape(M, *moved.shape).movedim(-1, dim + 1)
    return scale * r.sqrt() * (p.unsqueeze(0) - onehot)


def output_gradient_factors(loss_fn, z: Tensor, y: Tensor, reduction: str, *,
                            denominator: float | None = None) -> Tensor:
    """``S = [grad_z(batch loss) / sqrt(c)]`` (shape ``[1, *z.shape]``) at the data labels.

    ``grad_z(batch loss) = c r`` with ``r`` the gradient of the summed per-entry losses,
    so ``LowRankOutputCurvature(S)`` is ``c r_n r_n^T`` per example (or per position with
    ``position_dim``): the empirical Fisher's output curvature.  ``c`` is
    :func:`reduction_factor` (``denominator`` overrides ``D``); a plain callable with
    ``reduction="mean"`` has ``c = 1 / batch size``.

    Raises:
        MeanDenominatorError: ``reduction="mean"`` for a loss module whose denominator is
            unknown (a subclass overriding ``forward``...) and no ``denominator`` given.
    """
    zl = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(zl, y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("The loss must return a scalar (reduction 'mean' or 'sum').")
        (g,) = torch.autograd.grad(loss.reshape(()), zl)
    c = reduction_factor(loss_fn, z, reduction, y, denominator=denominator)
    if c == 0.0:  # every target ignored: the batch contributes nothing
        return torch.zeros_like(g).unsqueeze(0)
    return (g / math.sqrt(c)).unsqueeze(0)


def output_hessian_sqrt(loss_fn, z: Tensor, reduction: str, y: Tensor | None = None) -> Tensor:
    """A factor ``S`` with ``Lambda = sum_i S[i] S[i]^T`` per position (K-FAC, tests, dense truth).

    Shape ``[C', *z.shape]`` with ``C'`` the size of the position dim
    (:func:`position_dim`): ``S[i]`` restricted to one position is column ``i`` of that
    position's factor.  Any output shape of the closed-form losses; ``y`` as for
    :class:`ClosedFormOutputHessian`.

    Raises:
        NotImplementedError: no closed form, or a cross-entropy row weight ``r < 0``.
    """
    fam = _family(loss_fn)
    if fam is None or fam.hessian_refusal(loss_fn) is not None:
        raise NotImplementedError(f"output_hessian_sqrt: no closed-form output Hessian for {_describe(loss_fn)}.")
    z = z.detach()
    c = reduction_factor(loss_fn, z, reduction, y)
    d = position_dim(loss_fn, z)
    C = z.shape[d]
    eye = torch.eye(C, dtype=z.dtype, device=z.device)
    e = eye.reshape(C, *([1] * d), C, *([1] * (z.dim() - d - 1)))
    if fam is _MSEFamily:
        return (math.sqrt(2.0 * c) * e).expand(C, *z.shape).clone()
    if fam is _BCEWithLogitsFamily:
        s = torch.sigmoid(z)
        return math.sqrt(c) * e * (s * (1 - s)).sqrt().unsqueeze(0)
    dim, p, r = _cross_entropy_rows(loss_fn, z, y)
    if bool((r < 0).any()):
        raise NotImplementedError("output_hessian_sqrt: a negative cross-entropy row weight has no square root.")
    # per position: r (diag p - p p^T) = sum_i [sqrt(r p_i) (e_i - p)] [...]^T
    sq = (p * r).sqrt().movedim(dim, 0).unsqueeze(dim + 1)  # [C', ..., 1 at dim, ...]
    return math.sqrt(c) * sq * (e - p.unsqueeze(0))
