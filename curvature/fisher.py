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
  in the same batches in the same order on every pass (checked).  With
  ``micro_batch_size=`` the labels are drawn per micro-batch, from ``(seed, batch index,
  micro-batch index)``: another fixed sample of the same expectation.
* ``kind="empirical"``: ``Lambda = c r r^T`` with ``r`` the output gradient of the summed
  per-entry losses at the *data* targets, i.e. the gradient outer products
  ``EF = c sum_terms g g^T``, ``c`` = ``1 / D`` for a mean (``D`` the mean's denominator,
  :func:`curvature.losses.mean_denominator`: examples for ``[N, C]`` CE, counted tokens for
  token-level CE, ``N C`` entries for ``MSELoss``) and ``1`` for a sum -- the scaling under
  which the EF equals the Fisher when labels follow the model.  What a *term* is, is
  ``ef_granularity``:

  - ``"sequence"`` (default): one outer product per example, ``g_n`` the gradient of
    example ``n``'s summed loss (for sequence outputs, the sum over its tokens);
  - ``"token"``: one outer product per position, ``g_{n,t}`` the gradient of the loss
    of one position (a token: the class dim of CE, the last dim for other losses,
    :func:`curvature.losses.position_dim`).  This is curvlinops' ``EFLinearOperator``
    convention (it flattens ``[B, C, T]`` CE outputs to ``[B T, C]`` rows and
    ``[B, T, C]`` others to ``[B T, C]``; on one batch they agree, tested).

  For ``[N, C]`` outputs the two coincide; with ``T`` positions per sequence they differ
  by the cross terms ``sum_{t != t'} g_t g_{t'}^T``.  Works for any loss that decomposes
  over examples; for a plain function with ``reduction="mean"`` ``c = 1 / B`` (the mean
  over examples), and a loss module whose mean denominator is unknown needs the
  operator's ``denominator=``.  Beware (Kunstner et al. 2019): the EF is not the Fisher
  away from the optimum.

Cross-entropy targets that are ignored, or probability targets that do not sum to one,
scale each position's exact / MC Fisher by its target mass ``r`` (see
:mod:`curvature.losses`): ignored and all-zero rows contribute nothing, and the exact
Fisher equals the GGN.  Class weights (``weight=``) are refused for ``"exact"``/``"mc"``.
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
    MeanDenominatorError,
    fisher_refusal,
    knows_mean_denominator,
    output_gradient_factors,
    position_dim,
    sample_output_gradients,
)

__all__ = ["FisherOperator"]


def _unsupported(loss_fn, kind: str, y=None) -> NotImplementedError:
    return NotImplementedError(
        f"FisherOperator(kind={kind!r}) is not defined: {fisher_refusal(loss_fn, y)}. "
        "Use GGNOperator or FisherOperator(kind='empirical')."
    )


class FisherOperator(GGNOperator):
    """Fisher information ``J^T Lambda J`` with ``Lambda`` exact, sampled, or empirical.

    Args:
        model, loss_fn, data, params: as for :class:`~curvature.GGNOperator`.
        kind: ``"mc"`` (default), ``"exact"`` or ``"empirical"``.
        mc_samples: labels sampled per example for ``kind="mc"`` (default 1).
        seed: integer seed of the sampled labels (``kind="mc"``); default 0.
        ef_granularity: ``kind="empirical"`` only: ``"sequence"`` (default: one gradient
            outer product per example) or ``"token"`` (one per position, curvlinops'
            convention); see the module docstring.
        generator: alternatively a ``torch.Generator``: one integer is drawn from it at
            construction and used as ``seed``.
        **kwargs: ``mode``, ``reduction``, ``cache``, ``check_data``, ``batched``,
            ``jvp``, ``denominator``.

    Raises:
        NotImplementedError: ``kind`` "mc"/"exact" with an unsupported loss.
        MeanDenominatorError: ``kind="empirical"``, ``reduction="mean"`` and a loss module
            whose mean denominator is unknown, without ``denominator=``.
        ValueError: unknown ``kind`` or ``ef_granularity``, ``mc_samples < 1``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from curvature import FisherOperator, TokenCrossEntropyLoss
        >>> lm = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7)).double()
        >>> ids = torch.tensor([[1, 2, 3, 4], [5, 6, 1, 0]])
        >>> labels = ids.masked_fill(ids == 0, -100)  # padding not counted
        >>> EF = FisherOperator(lm, TokenCrossEntropyLoss(shift=True), (ids, labels),
        ...                     kind="empirical", ef_granularity="token")
        >>> EF.shape
        (63, 63)
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
        ef_granularity: str = "sequence",
        **kwargs,
    ) -> None:
        if kind not in ("mc", "exact", "empirical"):
            raise ValueError(f"kind must be 'mc', 'exact' or 'empirical', got {kind!r}.")
        if ef_granularity not in ("sequence", "token"):
            raise ValueError(f"ef_granularity must be 'sequence' or 'token', got {ef_granularity!r}.")
        if ef_granularity != "sequence" and kind != "empirical":
            raise ValueError("ef_granularity applies to kind='empirical' only.")
        check_loss(loss_fn)
        if kind != "empirical" and fisher_refusal(loss_fn) is not None:
            raise _unsupported(loss_fn, kind)
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
        if seed is not None and generator is not None:
            raise ValueError("Pass seed= or generator=, not both.")
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        self.kind = kind
        self.ef_granularity = ef_granularity
        self.mc_samples = int(mc_samples)
        self.seed = 0 if seed is None else int(seed)
        self._order_sensitive = kind == "mc"
        super().__init__(model, loss_fn, data, params, **kwargs)
        if self.reduction is None:
            raise ValueError(
                "FisherOperator needs the loss's reduction to scale per-example terms: loss_fn has no "
                "'reduction' attribute; pass reduction='mean' or 'sum'."
            )
        if kind == "empirical" and self.reduction == "mean" and self.denominator is None \
                and not knows_mean_denominator(loss_fn):
            raise MeanDenominatorError(
                f"FisherOperator(kind='empirical') scales gradient outer products by the loss's mean "
                f"denominator, unknown for {type(loss_fn).__name__} (not a built-in loss, or its forward is "
                "overridden): pass denominator=lambda X, y: <what the mean divides by>, or use reduction='sum'."
            )
        self._batch_inputs = None

    def _build_state(self, X: Tensor, y: Tensor, batch_index: int):
        self._batch_inputs = X  # for an explicit denominator(X, y) of the empirical Fisher
        try:
            return super()._build_state(X, y, batch_index)
        finally:
            self._batch_inputs = None

    def _batch_generator(self, batch_index: int | tuple[int, int]) -> torch.Generator:
        """The label sampler of a batch (or of micro-batch ``(batch, j)``), seeded from ``seed`` and the index."""
        index = list(batch_index) if isinstance(batch_index, tuple) else [batch_index]
        state = np.random.SeedSequence([self.seed & (2**63 - 1), *index]).generate_state(2, np.uint32)
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
            denominator = None
            if self.denominator is not None and reduction == "mean":
                denominator = float(self.denominator(self._batch_inputs, y))
            S = output_gradient_factors(self.loss_fn, z, y, reduction, denominator=denominator)
            pos = position_dim(self.loss_fn, z) if self.ef_granularity == "token" else None
            return LowRankOutputCurvature(S, position_dim=pos)
        if fisher_refusal(self.loss_fn, y) is not None:
            raise _unsupported(self.loss_fn, self.kind, y)
        if self.kind == "exact":
            return ClosedFormOutputHessian(self.loss_fn, z, reduction, y)
        S = sample_output_gradients(self.loss_fn, z, reduction, self.mc_samples,
                                    self._batch_generator(batch_index), y)
        return LowRankOutputCurvature(S)
