"""A sharpness monitor for training loops: edge of stability, progressive sharpening, exports.

::

    monitor = SharpnessMonitor(model, loss_fn, (X, y), optimizer, every=10)
    for step in range(1000):
        optimizer.zero_grad(); loss_fn(model(X), y).backward(); optimizer.step()
        monitor.step(step)                      # measures when step % every == 0
    monitor.save_plot("sharpness.png"); monitor.to_csv("sharpness.csv")
    print(monitor.eos_onset, monitor.progressive_sharpening)

Each measurement (on the full ``data``, model in eval mode) records the loss, the
gradient norm, the top-``k`` Hessian (or GGN) eigenvalues by Lanczos warm-started from
the previous measurement's eigenvectors, optionally the preconditioned sharpness of an
adaptive optimizer and the alignment ``||V_k^T g|| / ||g||`` of the gradient with the top
eigenvectors (the "tiny subspace" of Gur-Ari, Roberts and Dyer 2018), and the
stability threshold of the optimizer at that moment (``2/lr`` for GD, see
:func:`~estimators.sharpness.stability_threshold`; learning-rate schedules are followed).

Rules (documented, deterministic):

* **Edge-of-stability onset**: the first measurement whose tracked sharpness (the
  preconditioned one for adaptive optimizers with ``preconditioned=True``, the raw one
  otherwise) is at least ``eos_fraction`` (default 0.95) times its threshold.
* **Progressive sharpening**: over the measurements before the onset (all of them if
  there is none; at least 3), the least-squares slope of sharpness against step is
  positive and the last value exceeds the first by at least ``sharpening_rise``
  (default 10 %).

The monitor does not change training: products go through ``torch.autograd.grad``
(``.grad`` untouched), the model is evaluated in eval mode with every module's
``training`` flag restored (BatchNorm running statistics are not updated, dropout
draws nothing), the Lanczos start vector comes from the monitor's own seeded
generator and the global RNG state is restored around each measurement
(``torch.random.fork_rng``).
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from curvature import ConvergenceWarning

from ._validate import check_int, check_seed, check_tolerance
from .sharpness import (
    SharpnessResult,
    _scaled_operator,
    _top,
    curvature_operator,
    is_adaptive,
    optimizer_preconditioner,
    stability_threshold,
)

__all__ = ["SharpnessMonitor", "SharpnessRecord"]


@dataclass(frozen=True)
class SharpnessRecord:
    """One measurement.

    Attributes:
        step: the training step passed to :meth:`SharpnessMonitor.step`.
        loss: full-data loss at this step (eval mode).
        sharpness: top Hessian/GGN eigenvalue (largest algebraic).
        eigenvalues: the top-``k`` eigenvalues, descending.
        residual: largest Lanczos residual ``||H x - theta x||`` among the ``k`` pairs.
        converged: all pairs met ``tol`` within the product budget.
        threshold: the optimizer's stability threshold for the raw sharpness (``2/lr``
            for GD; ``None`` for adaptive optimizers or without optimizer/threshold).
        ratio: ``sharpness / threshold`` (``None`` without a threshold).
        preconditioned_sharpness: ``lambda_max(P^{-1/2} H P^{-1/2})`` or ``None``.
        preconditioned_threshold: e.g. ``38/lr`` for Adam (``None`` if not measured).
        preconditioned_ratio: their ratio (``None`` if not measured).
        grad_norm: ``||grad L||`` on the full data.
        grad_alignment: ``||V_k^T g|| / ||g||`` with ``V_k`` the top-``k`` eigenvectors
            (``None`` unless ``track_grad_alignment``).
        lr: the learning rate of the optimizer's first group (``None`` without one).
        num_matvecs: curvature products spent by this measurement (raw + preconditioned).
        num_gradients: full-data gradient evaluations spent (1 per measurement).
        seconds: wall time of the measurement.
        train_loss: the loss passed to ``step(..., loss=)`` by the caller, if any.
    """

    step: int
    loss: float
    sharpness: float
    eigenvalues: list[float]
    residual: float
    converged: bool
    threshold: float | None
    ratio: float | None
    preconditioned_sharpness: float | None
    preconditioned_threshold: float | None
    preconditioned_ratio: float | None
    grad_norm: float
    grad_alignment: float | None
    lr: float | None
    num_matvecs: int
    num_gradients: int
    seconds: float
    train_loss: float | None = None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


@dataclass
class _WarmStart:
    raw: Tensor | None = None
    preconditioned: Tensor | None = None
    count: int = field(default=0)


class SharpnessMonitor:
    """Track sharpness against the stability threshold during training (see the module docs).

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(model(X), y)`` -> scalar.
        data: the data the sharpness is measured on -- one batch ``(X, y)`` or a
            re-iterable of batches (full batch; use a fixed subset for large sets).
        optimizer: the training optimizer; gives the threshold (``stability_threshold``)
            and, for Adam/AdamW/RMSprop/Adagrad, the preconditioner.
        every: measure when ``step % every == 0``.
        k: top eigenpairs per measurement (the gradient alignment uses all ``k``).
        preconditioned: also measure ``lambda_max(P^{-1/2} H P^{-1/2})`` (needs an
            adaptive optimizer).
        track_grad_alignment: record ``||V_k^T g|| / ||g||``.
        operator: ``"hessian"`` (default) or ``"ggn"``.
        params: parameters (default all trainable).
        tol: Lanczos relative residual tolerance (default ``1e-4``: the eigenvalue error
            is at most ``tol * sharpness`` and typically ``~tol^2 * sharpness / relgap``).
        max_matvecs: product budget of each eigen-solve (raw, and preconditioned): the
            cost of a measurement is at most ``max_matvecs`` (twice that with
            ``preconditioned``) curvature products plus one gradient.  Measurements
            stopped by the budget are recorded with ``converged=False``.
        threshold: a fixed threshold for the raw sharpness (e.g. ``2/lr`` for a
            hand-written GD loop); default from ``optimizer``.
        eos_fraction: onset rule, see the module docstring.
        sharpening_rise: progressive-sharpening rule, see the module docstring.
        warm_start: reuse the previous eigenvectors (default ``True``).
        guard: extra eigenpairs computed and carried between measurements (default:
            1 for ``k = 1``, else 0): the warm start is the previous top ``k + guard``
            vectors, which keeps a crossing of the top two eigenvalues from going
            unnoticed (see :func:`~estimators.sharpness.sharpness`; for ``k >= 2`` the
            top-k block already guards the sharpness, and a guard pair deep in the bulk
            would be expensive to converge).  Crossings from further below within one
            interval can still be missed: measure more often, raise ``guard``, or pass
            ``warm_start=False`` for independent (costlier) solves.
        seed: seed of the monitor's own generator (cold-start vectors).
        mode: model mode for the measurements (``"eval"``, default, or ``"train"``).

    Attributes:
        history: list of :class:`SharpnessRecord`, one per measurement.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 10,
        k: int = 1,
        preconditioned: bool = False,
        track_grad_alignment: bool = False,
        operator: str = "hessian",
        params=None,
        tol: float = 1e-4,
        max_matvecs: int = 100,
        threshold: float | None = None,
        eos_fraction: float = 0.95,
        sharpening_rise: float = 0.1,
        warm_start: bool = True,
        guard: int | None = None,
        seed: int = 0,
        mode: str = "eval",
        process_group=None,
    ) -> None:
        every = check_int(every, "every")
        k = check_int(k, "k")
        tol = check_tolerance(tol, "tol")
        max_matvecs = check_int(max_matvecs, "max_matvecs")
        seed = check_seed(seed)
        if max_matvecs < k + 1:
            raise ValueError(f"max_matvecs = {max_matvecs} must be at least k + 1 = {k + 1}.")
        if not 0 < eos_fraction <= 2:
            raise ValueError(f"eos_fraction must lie in (0, 2], got {eos_fraction}.")
        if preconditioned and (optimizer is None or not is_adaptive(optimizer)):
            raise ValueError(
                "preconditioned=True needs an adaptive optimizer (Adam, AdamW, RMSprop, Adagrad) to read "
                f"the preconditioner from; got {type(optimizer).__name__ if optimizer is not None else None}."
            )
        if threshold is not None and not (float(threshold) > 0):
            raise ValueError(f"threshold must be positive, got {threshold}.")
        self.model = model
        self.optimizer = optimizer
        self.every = int(every)
        self.k = int(k)
        self.preconditioned = bool(preconditioned)
        self.track_grad_alignment = bool(track_grad_alignment)
        self.tol = float(tol)
        self.max_matvecs = int(max_matvecs)
        self.fixed_threshold = None if threshold is None else float(threshold)
        self.eos_fraction = float(eos_fraction)
        self.sharpening_rise = float(sharpening_rise)
        self.warm_start = bool(warm_start)
        guard = (1 if k == 1 else 0) if guard is None else check_int(guard, "guard", minimum=None)
        if guard < 0:
            raise ValueError(f"guard must be >= 0, got {guard}.")
        self.guard = guard
        self.seed = int(seed)
        self.operator_kind = operator
        # process_group: data parallel, identical records on every rank (curvature.distributed)
        self.op = curvature_operator(model, loss_fn, data, params=params, operator=operator, mode=mode,
                                     process_group=process_group)
        if self.k > self.op.shape[0]:
            raise ValueError(f"k = {k} exceeds the number of parameters n = {self.op.shape[0]}.")
        self.history: list[SharpnessRecord] = []
        self._warm = _WarmStart()
        self._calls = 0
        if optimizer is not None and self.fixed_threshold is None:
            self._thresholds()  # fail now, not after the first measurement's products

    # ------------------------------------------------------------------ thresholds
    def _thresholds(self) -> tuple[float | None, float | None, float | None]:
        """(raw threshold, preconditioned threshold, lr) at this moment."""
        opt = self.optimizer
        lr = None
        if opt is not None:
            lr_v = opt.param_groups[0]["lr"]
            lr = float(lr_v)
        raw = self.fixed_threshold
        pre = None
        if opt is not None:
            thr = stability_threshold(opt)
            if is_adaptive(opt):
                pre = thr if self.preconditioned else None
            elif raw is None:
                raw = thr
        return raw, pre, lr

    # ------------------------------------------------------------------ measuring
    def step(self, step_index: int | None = None, loss: float | Tensor | None = None) -> SharpnessRecord | None:
        """Call once per training step (after ``optimizer.step()``); measures every ``every`` steps.

        Args:
            step_index: the training step (default: the number of previous calls).
            loss: optionally the training loss of this step (stored as ``train_loss``).

        Returns:
            The new :class:`SharpnessRecord` when a measurement was taken, else ``None``.
        """
        idx = self._calls if step_index is None else int(step_index)
        self._calls += 1
        if idx % self.every != 0:
            return None
        return self.measure(idx, loss=loss)

    __call__ = step

    def _solve(self, A, v0, counter, kind, scale) -> SharpnessResult:
        warm = self.warm_start and v0 is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return _top(A, self.k, v0 if warm else None, self.tol, self.seed + self._warm.count,
                        self.max_matvecs, counter, kind, self.guard, scale if warm else None)

    def measure(self, step_index: int, loss: float | Tensor | None = None) -> SharpnessRecord:
        """Take a measurement now (regardless of ``every``) and append it to ``history``."""
        t0 = time.perf_counter()
        device = self.op.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                value, grad = self.op.loss_and_gradient()
                last = self.history[-1] if self.history else None
                res = self._solve(self.op, self._warm.raw, self.op, self.operator_kind,
                                  None if last is None else last.sharpness)
                pre = None
                if self.preconditioned:
                    P = optimizer_preconditioner(self.optimizer, self.op.params)
                    pre = self._solve(_scaled_operator(self.op, P), self._warm.preconditioned,
                                      self.op, "preconditioned",
                                      None if last is None else last.preconditioned_sharpness)
            finally:
                self.op.clear_cache()  # free the gradient graph between measurements
        self._warm.raw = res.warm_start
        self._warm.preconditioned = None if pre is None else pre.warm_start
        self._warm.count += 1
        gnorm = float(grad.norm())
        align = None
        if self.track_grad_alignment:
            align = float((res.eigenvectors.T @ grad).norm() / grad.norm()) if gnorm > 0 else 0.0
        raw_thr, pre_thr, lr = self._thresholds()
        pre_val = None if pre is None else pre.value
        rec = SharpnessRecord(
            step=int(step_index),
            loss=float(value),
            sharpness=res.value,
            eigenvalues=[float(e) for e in res.eigenvalues],
            residual=float(res.residuals.max()),
            converged=res.converged and (pre is None or pre.converged),
            threshold=raw_thr,
            ratio=_ratio(res.value, raw_thr),
            preconditioned_sharpness=pre_val,
            preconditioned_threshold=pre_thr,
            preconditioned_ratio=_ratio(pre_val, pre_thr),
            grad_norm=gnorm,
            grad_alignment=align,
            lr=lr,
            num_matvecs=res.num_matvecs + (0 if pre is None else pre.num_matvecs),
            num_gradients=1,
            seconds=time.perf_counter() - t0,
            train_loss=None if loss is None else float(loss.detach() if isinstance(loss, Tensor) else loss),
        )
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------ analysis
    def _tracked(self) -> list[tuple[int, float, float | None]]:
        """(step, tracked sharpness, its threshold) per record."""
        out = []
        for r in self.history:
            if r.preconditioned_sharpness is not None and r.preconditioned_threshold is not None:
                out.append((r.step, r.preconditioned_sharpness, r.preconditioned_threshold))
            else:
                out.append((r.step, r.sharpness, r.threshold))
        return out

    @property
    def eos_onset_index(self) -> int | None:
        """Index in ``history`` of the edge-of-stability onset (``None`` if not reached)."""
        for i, (_, s, thr) in enumerate(self._tracked()):
            if thr is not None and s >= self.eos_fraction * thr:
                return i
        return None

    @property
    def eos_onset(self) -> int | None:
        """Training step of the edge-of-stability onset (first sharpness >= eos_fraction x threshold)."""
        i = self.eos_onset_index
        return None if i is None else self.history[i].step

    @property
    def progressive_sharpening(self) -> bool:
        """Whether sharpness rose before the onset (see the module docstring for the rule)."""
        tr = self._tracked()
        i = self.eos_onset_index
        pre = tr if i is None else tr[: i + 1]
        if len(pre) < 3:
            return False
        steps = torch.tensor([float(s) for s, _, _ in pre], dtype=torch.float64)
        vals = torch.tensor([v for _, v, _ in pre], dtype=torch.float64)
        sc = steps - steps.mean()
        slope = float((sc * (vals - vals.mean())).sum() / (sc * sc).sum().clamp(min=1e-300))
        return slope > 0 and float(vals[-1]) >= (1.0 + self.sharpening_rise) * float(vals[0])

    def eos_ratio_median(self) -> float | None:
        """Median of tracked sharpness / threshold over the measurements after the onset."""
        i = self.eos_onset_index
        if i is None:
            return None
        ratios = [s / thr for _, s, thr in self._tracked()[i:] if thr is not None]
        return float(torch.tensor(ratios, dtype=torch.float64).median()) if ratios else None

    def summary(self) -> dict:
        """Counts, costs and the two detections in one dictionary."""
        mv = [r.num_matvecs for r in self.history]
        return {
            "measurements": len(self.history),
            "eos_onset": self.eos_onset,
            "eos_ratio_median": self.eos_ratio_median(),
            "progressive_sharpening": self.progressive_sharpening,
            "total_matvecs": int(sum(mv)),
            "mean_matvecs": (sum(mv) / len(mv)) if mv else None,
            "max_matvecs": max(mv) if mv else None,
            "total_seconds": sum(r.seconds for r in self.history),
            "eos_fraction": self.eos_fraction,
        }

    # ------------------------------------------------------------------ exports
    def to_records(self) -> list[dict]:
        """``history`` as plain dictionaries (JSON-ready)."""
        return [asdict(r) for r in self.history]

    def to_json(self, path) -> None:
        """Write ``{"summary": ..., "history": [...]}`` as JSON."""
        with open(path, "w") as f:
            json.dump({"summary": self.summary(), "history": self.to_records()}, f, indent=1)

    def to_csv(self, path) -> None:
        """Write one row per measurement (``eigenvalues`` joined by ``;``)."""
        names = list(SharpnessRecord.__dataclass_fields__)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for rec in self.to_records():
                rec["eigenvalues"] = ";".join(repr(e) for e in rec["eigenvalues"])
                w.writerow({k: ("" if v is None else v) for k, v in rec.items()})

    def save_plot(self, path, title: str | None = None) -> None:
        """PNG: loss (top) and sharpness against the threshold (bottom; a third panel for
        the preconditioned sharpness), with the onset marked."""
        save_history_plot(self.history, path, title=title, onset=self.eos_onset)


def save_history_plot(history: list[SharpnessRecord], path, *, title: str | None = None,
                      onset: int | None = None) -> None:
    """Plot a list of :class:`SharpnessRecord` (see :meth:`SharpnessMonitor.save_plot`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("Nothing to plot: the monitor has no measurements yet.")
    pre = any(r.preconditioned_sharpness is not None for r in history)
    fig, axes = plt.subplots(3 if pre else 2, 1, figsize=(7, 7.5 if pre else 5.5), sharex=True)
    steps = [r.step for r in history]
    ax = axes[0]
    ax.plot(steps, [r.loss for r in history], color="k", lw=1)
    ax.set_yscale("log" if all(r.loss > 0 for r in history) else "linear")
    ax.set_ylabel("loss")
    ax = axes[1]
    ax.plot(steps, [r.sharpness for r in history], "o-", ms=2.5, lw=1, label="sharpness $\\lambda_{max}(H)$")
    if any(r.threshold is not None for r in history):
        ax.step(steps, [math.nan if r.threshold is None else r.threshold for r in history], "--",
                where="post", color="tab:red", label="threshold (2/lr for GD)")
    ax.set_ylabel("sharpness")
    ax.legend(loc="lower right", fontsize=8)
    if pre:
        ax = axes[2]
        ax.plot(steps, [math.nan if r.preconditioned_sharpness is None else r.preconditioned_sharpness
                        for r in history], "o-", ms=2.5, lw=1, color="tab:green",
                label="preconditioned $\\lambda_{max}(P^{-1}H)$")
        ax.step(steps, [math.nan if r.preconditioned_threshold is None else r.preconditioned_threshold
                        for r in history], "--", where="post", color="tab:red", label="threshold")
        ax.set_ylabel("preconditioned")
        ax.legend(loc="lower right", fontsize=8)
    if onset is not None:
        for a in axes:
            a.axvline(onset, color="gray", lw=0.8, ls=":")
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
