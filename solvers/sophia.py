"""Sophia: second-order clipped stochastic optimization (Liu, Li, Hall, Liang, Ma 2023).

A ``torch.optim.Optimizer`` with a pluggable diagonal curvature estimator
(:class:`~solvers.curvature_estimators.GNBEstimator` for Sophia-G,
:class:`~solvers.curvature_estimators.HutchinsonEstimator` for Sophia-H, or any
diagonal you supply), refreshed every ``update_interval`` steps by the optimizer
itself, and :class:`SophiaGRecipe`, the official SophiaG training loop
(Liuhong99/Sophia, ``train_sophiag.py``) as a small helper.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from curvature import DiagonalOperator, unflatten

from ._torch_optim import OptimizerConventions, check_lr, lr_value
from .curvature_estimators import DiagonalCurvatureEstimator, GNBEstimator

__all__ = ["Sophia", "SophiaGRecipe", "official_lr", "official_param_groups"]

#: Manual-curvature mode (``update_interval=None``): warn once when this many steps passed without any curvature.
MANUAL_CURVATURE_GRACE_STEPS = 100


class Sophia(OptimizerConventions, Optimizer):
    r"""Sophia with per-coordinate clipping, decoupled weight decay and a lazy curvature EMA.

    Every step ``t`` (1-based), per coordinate, with ``g`` the current ``.grad``::

        theta <- theta * (1 - lr * weight_decay)                       (decoupled decay)
        m     <- beta1 * m + (1 - beta1) * g                           (no bias correction)
        theta <- theta - lr * clip(m / (max(gamma * h, 0) + eps), -1, 1)

    and the curvature is refreshed from an estimate ``h_hat`` at the parameters
    reached after steps ``k, 2k, 3k, ...`` (``k = update_interval``)::

        h <- beta2 * h + (1 - beta2) * h_hat        (h starts at 0, no bias correction)

    as in the official code (``update_hessian`` after iterations ``k-1, 2k-1, ...``,
    0-based).  The refresh is carried out at the *start* of the next step (steps
    ``k+1, 2k+1, ...``): the parameters are the same, so the numbers are the same,
    and the estimate is validated before anything is written.  The first ``k``
    steps, before any curvature, are sign-momentum steps of size ``lr``, and every
    coordinate of every step moves by at most ``lr`` (plus the decay).  ``h_hat`` is
    an unbiased diagonal estimate *of the mean loss*; the GNB estimator already
    includes the batch factor (``h_hat = N * g_hat**2``).

    Mapping of hyperparameters (ours = official SophiaG code = paper, Algorithm 3):

    * ``lr`` = official ``lr`` = paper ``eta_t``;
    * ``gamma`` (alias ``rho``) = official ``rho`` = paper ``gamma``;
    * our ``h`` = official ``bs * h`` (official ``update_hessian`` stores ``g*g`` and
      multiplies by ``bs`` = tokens per step at use time; our GNB multiplies by the
      number of loss terms N when it estimates), i.e. official
      ``min(|m| / (rho * bs * h_off + 1e-15), 1) = min(|m| / (gamma * h + eps), 1)``
      here with the official ``eps = 1e-15`` (equal to rounding: the recipe test
      matches the official loop to 1e-11); a negative entry of ``h`` (Hutchinson
      estimates can be negative) counts as 0, i.e. that coordinate is clipped, as
      with the paper's ``max(gamma * h, eps)``;
    * ``eps`` = official ``1e-15`` added to the denominator (paper ``epsilon``);
    * paper v1 form ``eta * clip(m / max(h, eps), rho_v1)`` = ours with
      ``lr = eta * rho_v1`` and ``gamma = rho_v1``.

    For the whole official training loop (fresh batch for the estimate, clipping of
    the sampled-label gradient, weight-decay groups, lr schedule) use
    :class:`SophiaGRecipe`.

    Args:
        params: parameters or param groups (none may be empty).
        lr: step size (``>= 0``, a number or a 1-element tensor read at every step),
            the largest move of a coordinate per step.
        betas: ``(beta1, beta2)`` for the gradient and curvature EMAs.
        rho: the clipping scale ``gamma`` (``> 0``); ``gamma=`` is an alias.  Larger
            values clip less often (higher win rate).  Paper defaults: 0.05 for
            GNB, 0.01 for Hutchinson (levanter).
        weight_decay: decoupled weight decay (``>= 0``).
        eps: added to the denominator ``max(gamma * h, 0) + eps`` (``> 0``; official 1e-15).
        estimator: a :class:`DiagonalCurvatureEstimator` over (a superset of) the
            parameters.  Required unless ``update_interval=None``: without curvature
            Sophia is sign momentum, so a missing estimator is refused instead of
            training as sign momentum forever.
        update_interval: ``k``; refresh every ``k`` steps (default 10).  ``None`` (or
            ``0``): manual mode, you feed curvature through :meth:`update_curvature`;
            a ``RuntimeWarning`` is issued once if :data:`MANUAL_CURVATURE_GRACE_STEPS`
            steps pass without any.
        foreach: use the multi-tensor ``torch._foreach_*`` path (default ``True``)
            or the single-tensor reference loop.
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` when a
            gradient or a curvature estimate has NaN/inf entries, before anything
            is written (parameters, buffers, counters and the estimator's RNG are
            left as they were); ``"skip"`` skips such a step with a warning
            (counted in ``num_skipped_steps``; a due refresh is retried next step).
            Both cost one host read per step (and one per refresh).  ``"off"``: no
            check and no host read (for GPU loops that watch the loss themselves);
            a NaN/inf gradient or estimate then reaches the parameters, as in
            ``torch.optim.AdamW``.

    Attributes:
        last_win_rate: fraction of coordinates (all groups) *not* clipped at the
            last step, ``|m| < gamma * h`` (the official code's "win rate"; healthy
            runs sit in 0.1-0.5).  ``last_win_rates``: the same per group.
        num_steps, num_curvature_updates, num_skipped_steps: counters (saved in the
            ``state_dict``, together with the estimator's RNG state, so a restored
            optimizer continues bit-identically; ``copy.deepcopy`` and ``pickle``
            keep them too).

    Example::

        est = GNBEstimator(model, loss="ce", seed=0)
        opt = Sophia(model.parameters(), lr=3e-4, rho=0.05, estimator=est, update_interval=10)
        for X, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(X).flatten(0, -2), y.flatten()).backward()
            opt.step(curvature_input=X)   # refreshes h itself every 10 steps

    Cost per step: a few elementwise passes over the parameters (like AdamW); every
    ``k`` steps one estimator call (GNB: one forward + backward; Hutchinson: one
    gradient with graph + one HVP per probe).  Memory: two buffers per parameter.
    """

    _instance_attributes = ("estimator", "update_interval", "foreach", "nonfinite", "num_steps",
                            "num_curvature_updates", "num_skipped_steps", "_win", "_warned_no_curvature")
    _param_shaped_state = ("exp_avg", "hessian")

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, *, eps: float = 1e-15,
                 gamma: float | None = None, estimator: DiagonalCurvatureEstimator | None = None,
                 update_interval: int | None = 10, foreach: bool = True, nonfinite: str = "raise") -> None:
        if gamma is not None:
            rho = gamma
        if update_interval is not None and (isinstance(update_interval, bool) or not isinstance(update_interval, int)
                                            or update_interval < 0):
            raise ValueError(f"Invalid update_interval: {update_interval!r} (must be an integer >= 0 or None).")
        if nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'off', got {nonfinite!r}.")
        if estimator is not None and not isinstance(estimator, DiagonalCurvatureEstimator):
            raise TypeError(f"estimator must be a DiagonalCurvatureEstimator, got {type(estimator).__name__}.")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)
        if estimator is None and update_interval:
            raise ValueError(
                "Sophia needs a curvature estimator: pass estimator=GNBEstimator(model, 'ce') (Sophia-G) or "
                "HutchinsonEstimator(model, loss_fn) (Sophia-H); without one it would train as sign momentum "
                "forever. To feed curvature yourself through update_curvature(), pass update_interval=None."
            )
        self.estimator = estimator
        self.update_interval = int(update_interval) if update_interval else 0
        self.foreach = bool(foreach)
        self.nonfinite = nonfinite
        self.num_steps = 0
        self.num_curvature_updates = 0
        self.num_skipped_steps = 0
        self._win: dict[int, tuple] = {}  # group index -> (not-clipped count, total)
        self._warned_no_curvature = False

    def _check_param_group(self, group: dict) -> None:
        check_lr(group["lr"], allow_zero=True)
        b1, b2 = group["betas"]
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"Invalid beta1: {b1} (must be in [0, 1)).")
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"Invalid beta2: {b2} (must be in [0, 1)).")
        if not group["rho"] > 0:
            raise ValueError(f"Invalid rho/gamma: {group['rho']} (must be > 0).")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']} (must be >= 0).")
        if not group["eps"] > 0:
            raise ValueError(f"Invalid eps: {group['eps']} (must be > 0).")
        for p in group["params"]:
            if p.is_complex() or p.is_sparse or not p.is_floating_point():
                raise ValueError(f"Sophia supports dense real floating parameters only, got {p.dtype}"
                                 f"{' (sparse)' if p.is_sparse else ''}.")

    # ---------------------------------------------------------------- state
    def _state_for(self, p: Tensor) -> dict:
        st = self.state[p]
        if len(st) == 0:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["sophia"] = {
            "num_steps": self.num_steps,
            "num_curvature_updates": self.num_curvature_updates,
            "num_skipped_steps": self.num_skipped_steps,
            "estimator_rng_state": None if self.estimator is None else self.estimator.get_rng_state().clone(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sophia", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.num_steps = int(extra["num_steps"])
            self.num_curvature_updates = int(extra["num_curvature_updates"])
            self.num_skipped_steps = int(extra["num_skipped_steps"])
            rng = extra.get("estimator_rng_state")
            if rng is not None and self.estimator is not None:
                self.estimator.set_rng_state(rng)

    # ------------------------------------------------------------ win rate
    @property
    def last_win_rates(self) -> list[float]:
        """Per group: fraction of coordinates not clipped at the last step (nan before any step)."""
        out = []
        for gi in range(len(self.param_groups)):
            w = self._win.get(gi)
            out.append(float("nan") if w is None else float(w[0]) / max(float(w[1]), 1.0))
        return out

    @property
    def last_win_rate(self) -> float:
        """Fraction of all coordinates not clipped at the last step (nan before any step)."""
        ws = list(self._win.values())
        if not ws:
            return float("nan")
        return float(sum(float(w[0]) for w in ws)) / max(sum(float(w[1]) for w in ws), 1.0)

    # ------------------------------------------------------------ curvature
    def needs_curvature(self) -> bool:
        """Whether the *next* :meth:`step` refreshes the curvature (then it needs ``curvature_input``).

        True before steps ``k+1, 2k+1, ...``: the estimate is taken at the parameters
        reached after steps ``k, 2k, ...``, where the official code takes it.
        """
        k = self.update_interval
        return bool(k) and self.estimator is not None and self.num_steps > 0 and self.num_steps % k == 0

    @torch.no_grad()
    def update_curvature(self, curvature=None) -> None:
        """EMA-update ``h`` with one diagonal estimate (manual mode, or an extra refresh).

        Args:
            curvature: a ``DiagonalOperator`` over the flattened parameters (all
                groups, in order), a list of parameter-shaped tensors, or the input
                of the estimator (a batch, model input or closure; see the
                estimator).  ``None`` is not allowed.

        Raises:
            FloatingPointError: the estimate has NaN/inf entries (nothing changed).
        """
        diag = self._curvature_tensors(curvature)
        self._write_curvature(diag)

    def _curvature_tensors(self, curvature) -> list[Tensor]:
        """The validated estimate as parameter-shaped tensors; nothing is written.

        Raises ``FloatingPointError`` on NaN/inf entries; the estimator's RNG is
        restored on any failure, so a failed estimate leaves no trace.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        if curvature is None:
            raise ValueError("update_curvature needs a diagonal estimate or the estimator's input "
                             "(a batch (X, y), the model input, or a closure).")
        if isinstance(curvature, DiagonalOperator):
            n = sum(p.numel() for p in params)
            if curvature.diag.numel() != n:
                raise ValueError(f"The DiagonalOperator has {curvature.diag.numel()} entries for {n} parameter "
                                 "entries.")
            diag = unflatten(curvature.diag, [p.shape for p in params])
        elif isinstance(curvature, (list, tuple)) and len(curvature) == len(params) and all(
                isinstance(t, Tensor) and t.shape == p.shape for t, p in zip(curvature, params)):
            diag = list(curvature)
        else:
            if self.estimator is None:
                raise ValueError("No estimator: pass a DiagonalOperator or parameter-shaped tensors.")
            rng = self.estimator.get_rng_state()
            try:
                diag = self._estimate(curvature, params)
                if self.nonfinite != "off" and not all_finite(diag):
                    raise FloatingPointError("Sophia: the curvature estimate has NaN/inf entries; parameters, "
                                             "buffers and counters were left unchanged.")
            except BaseException:
                self.estimator.set_rng_state(rng)
                raise
            return diag
        if self.nonfinite != "off" and not all_finite(diag):
            raise FloatingPointError("Sophia: the curvature estimate has NaN/inf entries; h was left unchanged.")
        return diag

    def _write_curvature(self, diag: list[Tensor]) -> None:
        i = 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            hs = []
            ds = []
            for p in group["params"]:
                hs.append(self._state_for(p)["hessian"])
                ds.append(diag[i].detach().to(dtype=p.dtype, device=p.device))
                i += 1
            if self.foreach:
                torch._foreach_mul_(hs, beta2)
                torch._foreach_add_(hs, ds, alpha=1 - beta2)
            else:
                for h, d in zip(hs, ds):
                    h.mul_(beta2).add_(d, alpha=1 - beta2)
        self.num_curvature_updates += 1

    def _estimate(self, data, params: list[Tensor]) -> list[Tensor]:
        est = self.estimator
        index = {id(q): j for j, q in enumerate(est.params)}
        missing = [j for j, p in enumerate(params) if id(p) not in index]
        if missing:
            raise ValueError(f"The estimator does not cover optimizer parameter(s) {missing}; build it over "
                             "the same model/parameters.")
        with torch.enable_grad():
            tensors = est.estimate_tensors(data)
        return [tensors[index[id(p)]] for p in params]

    # ----------------------------------------------------------------- step
    def _reject(self, message: str, loss):
        """A non-finite gradient or estimate: raise, or skip the step (``nonfinite='skip'``)."""
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{message}; nothing was changed (pass nonfinite='skip' to skip such steps).")
        warnings.warn(f"{message}; step skipped.", RuntimeWarning, stacklevel=3)
        self.num_skipped_steps += 1
        return loss

    @torch.no_grad()
    def step(self, closure=None, *, curvature_input=None):
        """One Sophia step; first refreshes the curvature when :meth:`needs_curvature`.

        Everything is validated before anything is written: the gradients, then the
        curvature estimate due at this step; only then are ``h``, ``m``, the
        parameters and the counters updated.

        Args:
            closure: optional; re-evaluates the loss and calls ``backward`` (returned).
            curvature_input: what the estimator needs on refresh steps (a batch
                ``(X, y)``, the model input, or a closure; see the estimator).  The
                official recipe uses a fresh batch, not the step's own (see
                :class:`SophiaGRecipe`).  Missing on a refresh step: ``ValueError``
                (call :meth:`needs_curvature` to know in advance).

        Returns:
            The closure's loss, or ``None``.
        """
        refresh = self.needs_curvature()
        if refresh and curvature_input is None:
            raise ValueError("This step refreshes the curvature: pass curvature_input= (a batch, the model "
                             "input or a closure for the estimator), or set update_interval=None.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise ValueError("Sophia does not support sparse gradients.")
            groups.append(ps)
        all_grads = [p.grad for ps in groups for p in ps]
        if all_grads and self.nonfinite != "off" and not all_finite(all_grads):
            return self._reject("Sophia.step: a gradient has NaN/inf entries", loss)
        diag = None
        if refresh:
            try:
                diag = self._curvature_tensors(curvature_input)
            except FloatingPointError:
                return self._reject("Sophia.step: the curvature estimate has NaN/inf entries (parameters, "
                                    "buffers, counters and the estimator's RNG are as before)", loss)
        elif (not self.update_interval and not self._warned_no_curvature and self.num_curvature_updates == 0
              and self.num_steps + 1 >= MANUAL_CURVATURE_GRACE_STEPS):
            self._warned_no_curvature = True
            warnings.warn(f"Sophia: {self.num_steps + 1} steps without any curvature (update_interval=None and "
                          "update_curvature() never called): these are sign-momentum steps. Call "
                          "update_curvature() or pass an estimator with update_interval=k.",
                          RuntimeWarning, stacklevel=2)
        # ---- validated: write
        if diag is not None:
            self._write_curvature(diag)
        for gi, (group, ps) in enumerate(zip(self.param_groups, groups)):
            if not ps:
                continue
            grads = [p.grad for p in ps]
            sts = [self._state_for(p) for p in ps]
            m = [s["exp_avg"] for s in sts]
            h = [s["hessian"] for s in sts]
            for s in sts:
                s["step"] += 1
            fn = _multi_tensor_sophia if self.foreach else _single_tensor_sophia
            self._win[gi] = fn(ps, grads, m, h, lr=lr_value(group["lr"]), beta1=group["betas"][0],
                               gamma=group["rho"], weight_decay=group["weight_decay"], eps=group["eps"])
        self.num_steps += 1
        return loss


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite; one host sync.

    Uses the max-norm (``ord=inf``), which propagates NaN/inf but, unlike the
    2-norm, cannot overflow for finite entries (a float32 gradient with entries
    1e30 is finite although its squared norm is not).
    """
    tensors = [t.detach() for t in tensors if t.numel() > 0]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def _single_tensor_sophia(params, grads, exp_avgs, hessians, *, lr, beta1, gamma, weight_decay, eps):
    """Reference loop; returns (not-clipped count, total); the count stays a tensor (no sync)."""
    count = None
    total = 0
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        denom = (h * gamma).clamp_min_(0.0).add_(eps)
        ratio = (m / denom).clamp_(-1.0, 1.0)
        c = ratio.abs().floor_().sum()  # clipped coordinates: |ratio| == 1
        count = c if count is None else count + c
        total += ratio.numel()
        p.add_(ratio, alpha=-lr)
    return total - count, total


def _multi_tensor_sophia(params, grads, exp_avgs, hessians, *, lr, beta1, gamma, weight_decay, eps):
    """``torch._foreach_*`` version of :func:`_single_tensor_sophia` (same operations)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    denom = torch._foreach_mul(hessians, gamma)
    torch._foreach_clamp_min_(denom, 0.0)
    torch._foreach_add_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    clipped = torch._foreach_abs(ratio)
    torch._foreach_floor_(clipped)  # 1 where clipped (|ratio| == 1), else 0
    count = torch.stack(torch._foreach_norm(clipped, 1)).sum()
    total = sum(r.numel() for r in ratio)
    torch._foreach_add_(params, ratio, alpha=-lr)
    return total - count, total


# ------------------------------------------------------------------------------ the official recipe
def official_lr(it: int, *, lr: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """The official learning-rate schedule (nanoGPT / Liuhong99/Sophia ``get_lr``) at iteration ``it`` (0-based).

    Linear warmup from 0 (``lr * it / warmup_iters``: the first step has lr 0), then
    cosine decay from ``lr`` to ``min_lr`` at ``lr_decay_iters``, then ``min_lr``.
    """
    if it < warmup_iters:
        return lr * it / warmup_iters
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


_NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The official weight-decay split (``GPT.configure_optimizers``): two param groups.

    Weights of ``nn.Linear`` get ``weight_decay``; biases and the weights of
    normalization layers and embeddings get none; a weight tied to an embedding
    (GPT-2's ``lm_head``) is not decayed (the official code removes it from the
    decay set).  Parameters are sorted by name within each group, as there.

    Raises:
        ValueError: a trainable parameter of another kind of module (the official
            recipe defines no decay rule for it; pass your own param groups).
    """
    names = {}
    for n, p in model.named_parameters():  # deduplicates tied parameters (first name kept)
        if p.requires_grad:
            names[id(p)] = n
    decay, no_decay = set(), set()
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if id(p) not in names:
                continue
            if pn.endswith("bias") or isinstance(m, _NO_DECAY_MODULES):
                no_decay.add(id(p))
            elif pn.endswith("weight") and isinstance(m, nn.Linear):
                decay.add(id(p))
    decay -= no_decay  # tied to an embedding / norm: not decayed
    unknown = [names[i] for i in names if i not in decay and i not in no_decay]
    if unknown:
        raise ValueError(f"official_param_groups: no weight-decay rule for parameter(s) {unknown} (the official "
                         "recipe decays Linear weights only and exempts biases, norms and embeddings); pass "
                         "param_groups= yourself.")
    params = {id(p): p for p in model.parameters()}
    order = sorted(names, key=names.get)
    return [{"params": [params[i] for i in order if i in decay], "weight_decay": weight_decay},
            {"params": [params[i] for i in order if i in no_decay], "weight_decay": 0.0}]


class SophiaGRecipe:
    """The official SophiaG training loop (Liuhong99/Sophia ``train_sophiag.py``) as a helper.

    Point by point, each :meth:`step` (iteration ``it``, 0-based) does what the
    official loop does:

    1. ``lr = official_lr(it)``: linear warmup from 0 over ``warmup_iters``, cosine
       decay to ``min_lr`` at ``lr_decay_iters`` (default ``max_iters``), set in every group;
    2. forward/backward of the mean cross-entropy on a training batch
       (``get_batch()``), ``clip_grad_norm_(grad_clip)``, Sophia step, ``zero_grad``;
    3. after iterations ``k-1, 2k-1, ...`` the Hessian EMA is refreshed from a
       *fresh* batch (the next ``get_batch()``, drawn between two training batches
       exactly as there), at the updated parameters, by GNB: labels sampled from
       the model, the sampled-label gradient of the mean loss clipped to
       ``grad_clip`` before squaring, times the batch's token count ``N`` (the
       official ``bs = total_bs * block_size``: the same when the Hessian batch has
       the training batch's size).  No estimate before the first step (as there):
       ``h = 0`` makes the first ``k`` steps sign-momentum steps, but the warmup
       keeps their lr at most ``k / warmup_iters * lr``;
    4. weight decay by :func:`official_param_groups` (Linear weights only).

    Defaults are the official GPT-2 small (125M) SophiaG config: ``lr=6e-4``,
    ``rho=0.05``, ``weight_decay=0.2``, ``betas=(0.965, 0.99)``, ``k=10``,
    ``grad_clip=1.0``, ``warmup_iters=2000``, ``max_iters=100_000``, ``min_lr=1.5e-5``
    (GPT-2 medium: ``lr=7e-4, rho=0.08, min_lr=1e-5``; large: ``lr=3e-4``).  The official
    AdamW baseline is lr ``6e-4`` (small), betas ``(0.9, 0.95)``, weight decay 0.1, min
    lr ``3e-5``, the same groups, schedule and clipping.  Not reproduced: gradient
    accumulation over micro-batches (pass the whole batch: ``N`` is its token
    count), bf16 autocast and ``torch.compile``.  Under DDP (``process_group=``) the estimate
    is over all ranks' Hessian batches, scaled by their total token count (the official
    script scales by one rank's count: its ``rho`` is our ``rho / world_size``; see
    :class:`~solvers.curvature_estimators.GNBEstimator`).  The update rule is equal to
    the official ``SophiaG`` up to its additive ``1e-15`` (ours: ``max(., 1e-15)``).

    Args:
        model: the language model; ``model(X)`` returns logits ``[..., V]`` (or use
            ``output_fn``, e.g. ``lambda out: out[0]`` for ``(logits, loss)``).
        get_batch: ``() -> (X, Y)``, a fresh random training batch per call (the
            official ``get_batch('train')``); ``Y`` holds the next-token targets.
        lr, rho, weight_decay, betas, update_interval, grad_clip: as above
            (``grad_clip=0`` disables both clippings, as there).
        max_iters, warmup_iters, lr_decay_iters, min_lr, decay_lr: the schedule.
        param_groups: override :func:`official_param_groups` (dicts with ``params`` and
            optionally ``weight_decay``).
        seed: seed of the GNB label sampling.
        foreach: Sophia's multi-tensor path.
        process_group: for a ``DistributedDataParallel`` model, its group (e.g.
            ``torch.distributed.group.WORLD``): every rank's ``get_batch`` gives its own
            shard, DDP averages the training gradient and the estimator the sampled-label
            gradient, so every rank takes identical steps.

    Example::

        recipe = SophiaGRecipe(model, get_batch, lr=6e-4, max_iters=5000, warmup_iters=100)
        for it in range(recipe.max_iters):
            loss = recipe.step()          # a 0-d tensor (no host sync)
        print(recipe.optimizer.last_win_rate)

    Cost per step: one forward + backward (and on every ``k``-th iteration one more,
    with sampled labels), as the official loop.
    """

    def __init__(self, model: nn.Module, get_batch: Callable[[], tuple[Tensor, Tensor]], *, lr: float = 6e-4,
                 rho: float = 0.05, weight_decay: float = 0.2, betas: tuple[float, float] = (0.965, 0.99),
                 update_interval: int = 10, grad_clip: float = 1.0, max_iters: int = 100_000,
                 warmup_iters: int = 2000, lr_decay_iters: int | None = None, min_lr: float = 1.5e-5,
                 decay_lr: bool = True, output_fn: Callable[[object], Tensor] | None = None,
                 param_groups: list[dict] | None = None, seed: int = 0, foreach: bool = True,
                 process_group=None) -> None:
        if not callable(get_batch):
            raise TypeError(f"get_batch must be a callable () -> (X, Y), got {type(get_batch).__name__}.")
        if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ValueError(f"update_interval must be an integer >= 1, got {update_interval!r}.")
        if not grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip}.")
        lr_decay_iters = max_iters if lr_decay_iters is None else lr_decay_iters
        if not (isinstance(warmup_iters, int) and 0 <= warmup_iters < lr_decay_iters):
            raise ValueError(f"Need 0 <= warmup_iters < lr_decay_iters, got {warmup_iters} and {lr_decay_iters}.")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"Need 0 <= min_lr <= lr, got min_lr={min_lr}, lr={lr}.")
        self.model = model
        self.get_batch = get_batch
        self.output_fn = output_fn
        self.grad_clip = float(grad_clip)
        self.lr, self.min_lr, self.decay_lr = float(lr), float(min_lr), bool(decay_lr)
        self.max_iters, self.warmup_iters, self.lr_decay_iters = int(max_iters), int(warmup_iters), int(lr_decay_iters)
        groups = official_param_groups(model, weight_decay) if param_groups is None else param_groups
        groups = [g for g in groups if len(g["params"]) > 0]
        estimator = GNBEstimator(model, "ce", output_fn=output_fn, max_grad_norm=self.grad_clip or None, seed=seed,
                                 process_group=process_group)
        self.optimizer = Sophia(groups, lr=lr, betas=betas, rho=rho, weight_decay=weight_decay,
                                estimator=estimator, update_interval=update_interval, foreach=foreach)
        self.iter_num = 0

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration ``it`` (0-based)."""
        if not self.decay_lr:
            return self.lr
        return official_lr(it, lr=self.lr, warmup_iters=self.warmup_iters, lr_decay_iters=self.lr_decay_iters,
                           min_lr=self.min_lr)

    def _logits(self, X: Tensor) -> Tensor:
        out = self.model(X)
        return out if self.output_fn is None else self.output_fn(out)

    def step(self) -> Tensor:
        """One official iteration; returns the training loss (0-d tensor, detached)."""
        opt = self.optimizer
        lr = self.lr_at(self.iter_num)
        for group in opt.param_groups:
            group["lr"] = lr
        # the official loop draws the Hessian batch right after the k-th training batch
        hessian_batch = self.get_batch() if opt.needs_curvature() else None
        X, Y = self.get_batch()
        self.model.train()
        logits = self._logits(X)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=-1)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        opt.step(curvature_input=hessian_batch)
        opt.zero_grad(set_to_none=True)
        self.iter_num += 1
        return loss.detach()
