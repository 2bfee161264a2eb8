"""Fisher information matrices of a model: exact, Monte-Carlo and empirical.

All three share the GGN's product ``J^T Lambda J`` (see :mod:`curvature.ggn`) and differ
in the output curvature ``Lambda`` (``c`` = the loss's reduction factor, see
:func:`curvature.losses.reduction_factor`):

* ``kind="exact"``: the Fisher of the model's predictive distribution, ``Lambda`` in
  closed form; equals the GGN for CrossEntropy, MSE and BCEWithLogits (exponential
  families in their natural parameters).  Other losses raise ``NotImplementedError``.
* ``kind="mc"``: ``Lambda_n = c (1/M) sum_m s_m s_m^T`` with ``s_m`` the output gradient of
  the per-example loss at a label sampled from the model (``M = mc_samples``).  An
  unbiased estimate of the exact Fisher.  Labels are drawn from a generator seeded
  from ``(seed, batch index)``, so the operator is one *fixed* matrix for its lifetime
  (Lanczos and CG need that) and the global RNG is never touched; the data must come
  in the same batches in the same order on every pass (checked).
* ``kind="empirical"``: ``Lambda_n = c r_n r_n^T`` with ``r_n`` the output gradient of the
  per-example loss at the *data* label, i.e. ``EF = c sum_n g_n g_n^T`` with ``g_n`` the
  per-example parameter gradient (for ``reduction="mean"`` on ``[N, C]`` outputs with
  CrossEntropy: ``(1/N) sum_n g_n g_n^T``; for ``MSELoss`` mean: ``1/(N C)`` times the
  outer products of the gradients of the per-example *summed* squared errors -- the
  scaling under which the EF equals the Fisher when labels follow the model; the same
  convention as curvlinops' ``EFLinearOperator``).  Works for any loss that decomposes
  over examples; for other losses with mean reduction ``c = 1/B`` (the per-example loss
  is the loss on that example alone).  Beware (Kunstner et al. 2019): the EF is not the
  Fisher away from the optimum.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._empirical_risk import check_loss
from .ggn import GGNOperator
from .losses import (
    ClosedFormOutputHessian,
    LowRankOutputCurvature,
    has_closed_form,
    output_gradient_factors,
    sample_output_gradients,
)

__all__ = ["FisherOperator"]


def _unsupported(loss_fn, kind: str) -> NotImplementedError:
    return NotImplementedError(
        f"FisherOperator(kind={kind!r}) is not supported for {type(loss_fn).__name__}: the model's "
        "predictive distribution is known only for CrossEntropyLoss, MSELoss and BCEWithLogitsLoss "
        "(reduction 'mean'/'sum', no class weights / pos_weight / ignored targets). "
        "Use GGNOperator or FisherOperator(kind='empirical')."
    )


class FisherOperator(GGNOperator):
    """Fisher information ``J^T Lambda J`` with ``Lambda`` exact, sampled, or empirical.

    Args:
        model, loss_fn, data, params: as for :class:`~curvature.GGNOperator`.
        kind: ``"mc"`` (default), ``"exact"`` or ``"empirical"``.
        mc_samples: labels sampled per example for ``kind="mc"`` (default 1).
        seed: integer seed of the sampled labels (``kind="mc"``); default 0.
        generator: alternatively a ``torch.Generator``: one integer is drawn from it at
            construction and used as ``seed``.
        **kwargs: ``mode``, ``reduction``, ``cache``, ``check_data``, ``batched``.

    Raises:
        NotImplementedError: ``kind`` "mc"/"exact" with an unsupported loss.
        ValueError: unknown ``kind``, ``mc_samples < 1``.
    """

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        kind: str = "mc",
        mc_samples: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> None:
        if kind not in ("mc", "exact", "empirical"):
            raise ValueError(f"kind must be 'mc', 'exact' or 'empirical', got {kind!r}.")
        check_loss(loss_fn)
        if kind != "empirical" and not has_closed_form(loss_fn):
            raise _unsupported(loss_fn, kind)
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
        if seed is not None and generator is not None:
            raise ValueError("Pass seed= or generator=, not both.")
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        self.kind = kind
        self.mc_samples = int(mc_samples)
        self.seed = 0 if seed is None else int(seed)
        self._order_sensitive = kind == "mc"
        super().__init__(model, loss_fn, data, params, **kwargs)
        if self.reduction is None:
            raise ValueError(
                "FisherOperator needs the loss's reduction to scale per-example terms: loss_fn has no "
                "'reduction' attribute; pass reduction='mean' or 'sum'."
            )

    def _batch_generator(self, batch_index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed & (2**63 - 1), batch_index]).generate_state(2, np.uint32)
        g = torch.Generator(device=self.device)
        g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
        return g

    def _output_curvature(self, z: Tensor, y: Tensor, batch_index: int):
        self._loss(z.detach(), y)  # scalar check
        reduction = self.reduction
        if reduction is None:
            raise ValueError(
                "FisherOperator needs the loss's reduction to scale per-example terms: loss_fn has no "
                "'reduction' attribute; pass reduction='mean' or 'sum'."
            )
        if self.kind == "empirical":
            return LowRankOutputCurvature(output_gradient_factors(self.loss_fn, z, y, reduction))
        if not has_closed_form(self.loss_fn, y):
            raise _unsupported(self.loss_fn, self.kind)
        if self.kind == "exact":
            return ClosedFormOutputHessian(self.loss_fn, z, reduction)
        S = sample_output_gradients(self.loss_fn, z, reduction, self.mc_samples, self._batch_generator(batch_index))
        return LowRankOutputCurvature(S)
