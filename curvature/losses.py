"""Curvature of the loss with respect to the model output, per loss function.

A GGN or Fisher product on a batch is ``J^T (Lambda (J v))`` where ``J`` is the Jacobian
of the model output ``z`` (shape ``[B, C, ...]``) w.r.t. the parameters and ``Lambda``
the curvature of the *batch loss as the loss function returns it* w.r.t. ``z``.  This
module supplies ``Lambda`` as an object with one method, ``matmat(V)`` for ``V`` of shape
``[k, *z.shape]`` (``k`` output-space directions), in three flavours:

* :class:`ClosedFormOutputHessian`: closed forms for ``CrossEntropyLoss`` (class dim 1,
  any trailing dims), ``MSELoss`` and ``BCEWithLogitsLoss`` with ``reduction`` "mean"
  or "sum" (research/algorithms.md section 8):

  ============================  ===========================  ==========================
  loss (summed per example)     ``Lambda`` per example       MC sample ``s``, E[s s^T]
  ============================  ===========================  ==========================
  CE on logits                  ``diag(p) - p p^T``          ``p - onehot(y~)``, y~ ~ p
  ``MSELoss`` (no 1/2!)         ``2 I``                      ``sqrt(2) * N(0, I)``
  BCE with logits               ``diag(s (1 - s))``          ``s - Bernoulli(s)``
  ============================  ===========================  ==========================

  times the reduction factor ``c`` (``1`` for "sum"; for "mean" ``1 / B`` for CE with
  ``B`` = number of entries over which PyTorch averages = ``z.numel() / C``, and
  ``1 / z.numel()`` for MSE and BCE).
* :class:`AutogradOutputHessian`: any other scalar loss, by double backward on the
  output (``z`` is small: this costs one small backward per column).
* :class:`LowRankOutputCurvature`: ``c * (1/M) sum_m s_m s_m^T`` per example, for the
  Monte-Carlo Fisher (``s_m`` sampled from the model's predictive distribution) and the
  empirical Fisher (``s`` = the output gradient at the data labels).

The Fisher of the predictive distribution equals the GGN for these three losses
(exponential families in their natural parameters), so ``FisherOperator(kind="exact")``
uses the closed forms and refuses other losses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "SUPPORTED_LOSSES",
    "loss_reduction",
    "reduction_factor",
    "mean_denominator",
    "has_closed_form",
    "output_hessian",
    "ClosedFormOutputHessian",
    "AutogradOutputHessian",
    "LowRankOutputCurvature",
    "sample_output_gradients",
    "output_gradient_factors",
    "output_hessian_sqrt",
]

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def loss_reduction(loss_fn, default: str | None = None) -> str | None:
    """The ``reduction`` of a loss module (``"mean"``/``"sum"``/``"none"``), else ``default``."""
    red = getattr(loss_fn, "reduction", None)
    return red if isinstance(red, str) else default


def has_closed_form(loss_fn, y: Tensor | None = None) -> bool:
    """Whether ``loss_fn`` (on targets ``y``) has a closed-form output Hessian and sampler.

    Closed forms cover ``CrossEntropyLoss`` without class weights on integer targets
    (targets equal to ``ignore_index`` are refused), ``MSELoss`` and
    ``BCEWithLogitsLoss`` without ``weight``/``pos_weight``, each with reduction
    "mean" or "sum".
    """
    if loss_reduction(loss_fn) not in ("mean", "sum"):
        return False
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None:
            return False
        if y is not None and not y.is_floating_point() and bool((y == loss_fn.ignore_index).any()):
            return False
        return True
    if isinstance(loss_fn, nn.MSELoss):
        return True
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return loss_fn.weight is None and loss_fn.pos_weight is None
    return False


def mean_denominator(loss_fn, y: Tensor, batch_size: int) -> float:
    """What PyTorch divides the summed batch loss by under ``reduction="mean"``.

    ``CrossEntropyLoss`` with integer targets: the number of targets not equal to
    ``ignore_index``, each counted with its class weight when ``weight`` is set; with
    probability targets ``[B, C, ...]``: ``y.numel() / C``.  ``MSELoss`` /
    ``BCEWithLogitsLoss``: ``y.numel()`` (the output has the target's shape).  Any other
    loss: ``batch_size`` (assumed to average over examples).  Batches are weighted by
    their share of the total denominator, so a mean over batches equals the mean on
    the concatenated data also with ignored targets and class weights.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if y.is_floating_point():
            return float(y.numel() / y.shape[1]) if y.dim() >= 2 else 1.0
        mask = y != loss_fn.ignore_index
        if loss_fn.weight is None:
            return float(mask.sum())
        return float(loss_fn.weight.to(y.device)[y[mask]].sum())
    if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        return float(y.numel())
    return float(batch_size)


def reduction_factor(loss_fn, z: Tensor, reduction: str, y: Tensor | None = None) -> float:
    """The factor ``c`` with ``batch loss = c * sum_n loss_n`` (``loss_n`` summed over outputs).

    ``1`` for ``reduction="sum"``.  For ``"mean"``: ``1 / D`` with ``D`` the mean's
    denominator (:func:`mean_denominator`, from the targets ``y`` when given):
    ``z.numel() / z.shape[1]`` for ``CrossEntropyLoss`` (PyTorch averages over the batch
    and any trailing dims, not over classes; non-ignored targets and class weights
    when ``y`` is given), ``z.numel()`` for ``MSELoss`` / ``BCEWithLogitsLoss``, and
    ``z.shape[0]`` (average over examples) for any other loss.
    """
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if z.dim() < 2:
            return 1.0  # a single unbatched example
        if y is not None and not y.is_floating_point():
            d = mean_denominator(loss_fn, y, z.shape[0])
            return 1.0 / d if d > 0 else 0.0
        return z.shape[1] / z.numel()
    if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        return 1.0 / z.numel()
    return 1.0 / z.shape[0] if z.dim() > 0 else 1.0


def _class_dim(z: Tensor) -> int:
    return 1 if z.dim() >= 2 else 0


class ClosedFormOutputHessian:
    """``Lambda V`` in closed form for CE / MSE / BCEWithLogits (see the module table).

    Args:
        loss_fn: the loss module.
        z: the model output ``[B, C, ...]`` (detached inside).
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, loss_fn, z: Tensor, reduction: str) -> None:
        self.loss_fn = loss_fn
        self.scale = reduction_factor(loss_fn, z, reduction)
        z = z.detach()
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            self.kind = "ce"
            self.dim = _class_dim(z)
            self.p = torch.softmax(z, dim=self.dim)
        elif isinstance(loss_fn, nn.MSELoss):
            self.kind = "mse"
        elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
            self.kind = "bce"
            s = torch.sigmoid(z)
            self.d = s * (1 - s)
        else:  # pragma: no cover - guarded by has_closed_form
            raise TypeError(f"No closed-form output Hessian for {type(loss_fn).__name__}.")

    def matmat(self, V: Tensor) -> Tensor:
        """``Lambda V`` for ``V`` of shape ``[k, *z.shape]``."""
        if self.kind == "mse":
            return (2.0 * self.scale) * V
        if self.kind == "bce":
            return self.scale * self.d * V
        pV = self.p * V
        return self.scale * (pV - self.p * pV.sum(dim=self.dim + 1, keepdim=True))


class AutogradOutputHessian:
    """``Lambda V`` by double backward of ``loss_fn(z, y)`` w.r.t. ``z`` (any scalar loss).

    Cost: one gradient w.r.t. the output at construction, one small backward per column.
    """

    def __init__(self, loss_fn, z: Tensor, y: Tensor) -> None:
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
        cols = [
            torch.autograd.grad(self.g, self.z, grad_outputs=V[j], retain_graph=True, allow_unused=True)[0]
            for j in range(V.shape[0])
        ]
        return torch.stack([torch.zeros_like(V[0]) if c is None else c for c in cols])


class LowRankOutputCurvature:
    """``Lambda_n = sum_m s_{m,n} s_{m,n}^T`` per example ``n``: ``S`` has shape ``[M, *z.shape]``.

    Any scaling (reduction factor, ``1/M``) must already be in ``S``.
    """

    def __init__(self, S: Tensor) -> None:
        self.S = S

    def matmat(self, V: Tensor) -> Tensor:
        # coef[m, j, n] = <S_{m,n}, V_{j,n}>;  out[j] = sum_m S_m * coef[m, j]   (memory M k |z|)
        S = self.S
        M, k, B = S.shape[0], V.shape[0], V.shape[1]
        prod = S.unsqueeze(1) * V.unsqueeze(0)  # [M, k, B, ...]
        coef = prod.reshape(M, k, B, -1).sum(-1)
        coef = coef.reshape(M, k, B, *((1,) * (S.dim() - 2)))
        return (S.unsqueeze(1) * coef).sum(0)


def output_hessian(loss_fn, z: Tensor, y: Tensor, reduction: str):
    """The output-curvature object for the GGN: closed form where known, else autograd."""
    if has_closed_form(loss_fn, y):
        return ClosedFormOutputHessian(loss_fn, z, reduction)
    return AutogradOutputHessian(loss_fn, z, y)


def sample_output_gradients(
    loss_fn, z: Tensor, reduction: str, mc_samples: int, generator: torch.Generator
) -> Tensor:
    """Scaled Monte-Carlo output gradients ``S`` of shape ``[mc_samples, *z.shape]``.

    Each ``s`` is the gradient w.r.t. ``z`` of the per-example loss at a label drawn from
    the model's predictive distribution, so ``E[s s^T] = Lambda_n / c``; the returned
    ``S`` carries ``sqrt(c / mc_samples)`` so that :class:`LowRankOutputCurvature` of it is
    an unbiased estimate of the closed-form ``Lambda``.

    Raises:
        NotImplementedError: for losses without a known predictive distribution.
    """
    if not has_closed_form(loss_fn):
        raise NotImplementedError(
            f"Monte-Carlo / exact Fisher needs the model's predictive distribution, known for "
            f"CrossEntropyLoss, MSELoss and BCEWithLogitsLoss (no class weights / pos_weight) "
            f"with reduction 'mean' or 'sum'; got {type(loss_fn).__name__}. Use GGNOperator "
            f"(autograd output Hessian) or FisherOperator(kind='empirical') instead."
        )
    z = z.detach()
    scale = math.sqrt(reduction_factor(loss_fn, z, reduction) / mc_samples)
    M = mc_samples
    if isinstance(loss_fn, nn.MSELoss):
        eps = torch.randn((M, *z.shape), generator=generator, device=z.device, dtype=z.dtype)
        return (scale * math.sqrt(2.0)) * eps
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = torch.sigmoid(z)
        u = torch.rand((M, *z.shape), generator=generator, device=z.device, dtype=z.dtype)
        return scale * (s - (u < s).to(z.dtype))
    dim = _class_dim(z)
    p = torch.softmax(z, dim=dim)
    C = p.shape[dim]
    p2 = p.movedim(dim, -1).reshape(-1, C)
    idx = torch.multinomial(p2, M, replacement=True, generator=generator)  # [rows, M]
    onehot = torch.nn.functional.one_hot(idx.T, C).to(z.dtype)  # [M, rows, C]
    moved = p.movedim(dim, -1).shape
    onehot = onehot.reshape(M, *moved).movedim(-1, dim + 1)
    return scale * (p.unsqueeze(0) - onehot)


def output_gradient_factors(loss_fn, z: Tensor, y: Tensor, reduction: str) -> Tensor:
    """``S = [sqrt(c) * grad_z loss_n]`` (shape ``[1, *z.shape]``) at the data labels.

    ``LowRankOutputCurvature(S)`` gives the empirical Fisher's output curvature
    ``c * r_n r_n^T`` with ``r_n`` the gradient of the per-example (summed) loss.  The
    gradient comes from autograd (``grad_z`` of the batch loss divided by ``c``), so any
    loss decomposing over examples works.
    """
    zl = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(zl, y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("The loss must return a scalar (reduction 'mean' or 'sum').")
        (g,) = torch.autograd.grad(loss.reshape(()), zl)
    c = reduction_factor(loss_fn, z, reduction, y)
    if c == 0.0:  # every target ignored: the batch contributes nothing
        return torch.zeros_like(g).unsqueeze(0)
    return (g / math.sqrt(c)).unsqueeze(0)


def output_hessian_sqrt(loss_fn, z: Tensor, reduction: str) -> Tensor:
    """A factor ``S`` with ``Lambda_n = S_n S_n^T`` per example (for tests and dense truth).

    Shape ``[C', *z.shape]``: column ``i`` of the per-example factor is ``S[i]``; defined
    for ``[B, C]`` outputs of the three closed-form losses.
    """
    if not has_closed_form(loss_fn) or z.dim() != 2:
        raise NotImplementedError("output_hessian_sqrt: closed-form losses on [B, C] outputs only.")
    z = z.detach()
    c = reduction_factor(loss_fn, z, reduction)
    B, C = z.shape
    eye = torch.eye(C, dtype=z.dtype, device=z.device)
    if isinstance(loss_fn, nn.MSELoss):
        S = math.sqrt(2.0 * c) * eye.unsqueeze(1).expand(C, B, C)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = torch.sigmoid(z)
        S = math.sqrt(c) * eye.unsqueeze(1) * (s * (1 - s)).sqrt().unsqueeze(0)
    else:
        p = torch.softmax(z, dim=1)
        sq = p.sqrt()
        # per example: diag(sqrt p) - p sqrt(p)^T, column i = sqrt(p_i) (e_i - p)
        S = math.sqrt(c) * sq.T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))
    return S
